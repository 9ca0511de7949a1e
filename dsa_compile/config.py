"""User configuration of the dsa compiler: one frozen dataclass, built from ``options=``.

A leaf module: the API builds a :class:`DSAConfig`, the pass and the ops read it (the pass
takes the object itself; the ops take its fields as arguments), adapters store it as json.
It imports nothing from the package, so every layer may import it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

MODES = ("inductor", "eager")
SELECTIONS = ("shared", "kv_head")

# Integer options and their lowest valid value; those in _OPTIONAL may also be None.
_INT_OPTIONS = {"topk": 1, "min_seq_len": 0, "index_heads": 1, "index_dim": 1, "query_block": 1,
                "key_block": 0, "candidate_blocks": 0}
_OPTIONAL = {"min_seq_len", "query_block", "key_block"}


class DSAConfigError(ValueError):
    """An option of ``torch.compile(..., backend="dsa", options=...)`` is unknown or invalid."""


@dataclass(frozen=True)
class DSAConfig:
    """How attention sites are rewritten.

    - ``topk``: keys each query (or query tile) attends to once a sequence is long.
    - ``min_seq_len``: at or below this many keys a site runs dense SDPA, which is exactly what
      a full selection computes (default: ``topk``); above it the sparse ops run.
    - ``include`` / ``exclude``: ``fnmatch`` patterns on module paths (e.g. ``"*.layers.0.*"``);
      a site is rewritten when it matches some include pattern (all, if none is given) and no
      exclude pattern.
    - ``index_heads`` / ``index_dim``: size of each site's lightning indexer (HI, DI).
    - ``query_block`` / ``key_block`` / ``candidate_blocks``: selection granularity of
      ``dsa::indexer_topk`` (``query_block=1, key_block=0`` is exact per-query top-k). ``None``
      picks per device what measured fastest: on CPU 128 / 64 (two-stage) for budgets from
      512 keys, finer below (tiles of ``topk / 4`` queries, ``topk / 8``-key blocks:
      :func:`budget_granularity`); 64 / 0 on CUDA (the Triton indexer scores every key; see
      BENCHMARKS.md).
    - ``selection``: ``"shared"``, one selection for all heads of a query (tile), or
      ``"kv_head"``, one per kv head (per head in MHA models; FlashMLA's ``[s_q, h_kv, topk]``):
      new indexers get one index head group per kv head.
    - ``indexer_fp8``: score the indexer in FP8 e4m3, as DeepSeek V3.2 does (queries scaled per
      token and index head, keys per key: every scale depends on its own token only; the
      selection is exactly that of the dequantised values, :mod:`dsa_compile.kernels.fp8`). Off
      by default: its speed is not yet measured on a GPU, and ONNX export keeps the 16-bit
      indexer (it refuses this option).
    - ``mode``: ``"inductor"`` compiles the rewritten graph, ``"eager"`` runs it as is
      (debugging; no compile cost).
    - ``adapter``: a directory written by ``dsa_compile.save_adapter``; ``torch.compile`` loads
      it into the model at the first capture (as ``dsa_compile.load_adapter`` does).
    """

    topk: int = 2048
    min_seq_len: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    index_heads: int = 4
    index_dim: int = 32
    query_block: int | None = None
    key_block: int | None = None
    candidate_blocks: int = 0
    selection: str = "shared"
    indexer_fp8: bool = False
    mode: str = "inductor"
    adapter: str | None = None

    def __post_init__(self) -> None:
        for name, low in _INT_OPTIONS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            # bool is an int subclass: topk=True would silently mean topk=1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DSAConfigError(f"option {name!r} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.selection, str) or self.selection not in SELECTIONS:
            raise DSAConfigError(f"option 'selection' must be one of {SELECTIONS}, got "
                                 f"{self.selection!r}")
        if not isinstance(self.indexer_fp8, bool):
            raise DSAConfigError(f"option 'indexer_fp8' must be True or False, got "
                                 f"{self.indexer_fp8!r}")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise DSAConfigError(f"option 'mode' must be one of {MODES}, got {self.mode!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                patterns: tuple | None = (value,)
            else:
                patterns = tuple(value) if isinstance(value, Iterable) else None
            if patterns is None or not all(isinstance(p, str) for p in patterns):
                raise DSAConfigError(f"option {name!r} must be a string or a list of strings, "
                                     f"got {value!r}")
            object.__setattr__(self, name, patterns)
        if self.adapter is not None:
            if not isinstance(self.adapter, (str, os.PathLike)):
                raise DSAConfigError(f"option 'adapter' must be a directory path, got "
                                     f"{self.adapter!r}")
            object.__setattr__(self, "adapter", os.fspath(self.adapter))

    @property
    def dense_up_to(self) -> int:
        """Sequences with at most this many keys run dense."""
        return self.topk if self.min_seq_len is None else self.min_seq_len

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | DSAConfig | None) -> DSAConfig:
        """Builds a config from ``torch.compile``'s ``options=`` dict (or passes one through)."""
        if options is None:
            return cls()
        if isinstance(options, DSAConfig):
            return options
        if not isinstance(options, Mapping):
            raise DSAConfigError(f"dsa options must be a dict of option names to values or a "
                                 f"DSAConfig, got {type(options).__name__}")
        _check_names(options)
        return cls(**options)

    def replace(self, **changes: Any) -> DSAConfig:
        """A copy with ``changes`` applied (checked like :meth:`from_options`)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DSAConfig:
        """The inverse of :meth:`to_dict` (unknown names are an error, missing ones default)."""
        return cls.from_options(dict(data))

    def selects(self, module_path: str) -> str | None:
        """None when the site at ``module_path`` may be rewritten, else why not."""
        if self.include and not any(fnmatch.fnmatch(module_path, p) for p in self.include):
            return f"not matched by include={list(self.include)}"
        for pattern in self.exclude:
            if fnmatch.fnmatch(module_path, pattern):
                return f"excluded by {pattern!r}"
        return None

    def granularity(self, device_type: str) -> tuple[int, int]:
        """``(query_block, key_block)`` on ``device_type``, unset fields from the device's
        defaults for this budget (:func:`device_granularity`)."""
        return device_granularity(device_type, self.query_block, self.key_block, self.topk)


# Selection granularity (query_block, key_block) when the config leaves it to the device, for
# large budgets (topk >= 512): what measured fastest at long context (CPU:
# benchmarks/results/cpu_ops.md; CUDA: BENCHMARKS.md). The one place per-device defaults live;
# the ops resolve ``None`` through :func:`device_granularity` at run time.
DEVICE_GRANULARITY = {"cpu": (128, 64), "cuda": (64, 0)}


# At most this many queries (decode steps): the default selects per query and scores every key.
# Tiles and two-stage selection pay off by sharing work over many queries; for a decode step,
# scoring all cached indexer keys is one small GEMV, cheaper than recomputing block bounds and
# padding the score rows to a tile (benchmarks/results/decode_*.md).
DECODE_QUERIES = 8


def _power_of_two_at_most(value: int) -> int:
    return 1 << (max(1, value).bit_length() - 1)


def budget_granularity(topk: int, query_block: int, key_block: int) -> tuple[int, int]:
    """The CPU default scaled to a budget of ``topk`` keys: tiles of at most ``topk / 4``
    queries (a tile shares one selection, which must hold every query's own recent keys with
    room to spare) and two-stage key blocks of at most ``topk / 8`` keys (never under 4 keys a
    block; the ops score at least 32 candidate blocks); powers of two, capped at
    ``(query_block, key_block)``.
    On MiniLM at topk 64 this lifts pooled-embedding cosine from 0.81 to 0.90, for about a
    third of the fixed default's speed-up at 16K tokens (benchmarks/results/granularity.md)."""
    return (min(query_block, _power_of_two_at_most(topk // 4)),
            min(key_block, max(4, _power_of_two_at_most(topk // 8))))


def device_granularity(device_type: str, query_block: int | None, key_block: int | None,
                       topk: int, queries: int | None = None) -> tuple[int, int]:
    """``(query_block, key_block)`` with ``None`` replaced by ``device_type``'s default for a
    budget of ``topk`` keys (CPU: :func:`budget_granularity`; for a call with at most
    :data:`DECODE_QUERIES` ``queries``: 1 and 0)."""
    qb, kb = DEVICE_GRANULARITY.get(device_type, DEVICE_GRANULARITY["cpu"])
    if device_type != "cuda":
        qb, kb = budget_granularity(topk, qb, kb)
    if isinstance(queries, int) and queries <= DECODE_QUERIES:
        qb, kb = 1, 0  # a tile of so few queries only pads their score rows to its size
    return (qb if query_block is None else query_block, kb if key_block is None else key_block)


def resolve_config(config: Mapping[str, Any] | DSAConfig | None, options: Mapping[str, Any]) -> DSAConfig:
    """The config of a user call: ``config`` (or the defaults) with keyword ``options`` applied."""
    base = DSAConfig.from_options(config)
    return base.replace(**options) if options else base


def _check_names(options: Mapping[str, Any]) -> None:
    valid = [f.name for f in fields(DSAConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DSAConfigError(f"unknown dsa option(s) {unknown}; valid options are: {', '.join(valid)}")
