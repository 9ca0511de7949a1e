"""User configuration of the dsa compiler: one frozen dataclass, built from ``options=``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

MODES = ("inductor", "eager")

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
      picks per device what measured fastest: 128 / 64 on CPU (two-stage), 64 / 0 on CUDA
      (the Triton indexer scores every key; see BENCHMARKS.md).
    - ``mode``: ``"inductor"`` compiles the rewritten graph, ``"eager"`` runs it as is
      (debugging; no compile cost).
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
    mode: str = "inductor"

    def __post_init__(self) -> None:
        for name, low in _INT_OPTIONS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            # bool is an int subclass: topk=True would silently mean topk=1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DSAConfigError(f"option {name!r} must be an integer >= {low}, got {value!r}")
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


def resolve_config(config: Mapping[str, Any] | DSAConfig | None, options: Mapping[str, Any]) -> DSAConfig:
    """The config of a user call: ``config`` (or the defaults) with keyword ``options`` applied."""
    base = DSAConfig.from_options(config)
    return base.replace(**options) if options else base


def _check_names(options: Mapping[str, Any]) -> None:
    valid = [f.name for f in fields(DSAConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DSAConfigError(f"unknown dsa option(s) {unknown}; valid options are: {', '.join(valid)}")
