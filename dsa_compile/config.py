"""User configuration of the dsa compiler: one frozen dataclass, built from ``options=``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MODES = ("inductor", "eager")


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
        for name in ("topk", "index_heads", "index_dim", "query_block"):
            value = getattr(self, name)
            if name == "query_block" and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                raise DSAConfigError(f"option {name!r} must be an integer >= 1, got {value!r}")
        for name in ("key_block", "candidate_blocks"):
            value = getattr(self, name)
            if name == "key_block" and value is None:
                continue
            if not isinstance(value, int) or value < 0:
                raise DSAConfigError(f"option {name!r} must be an integer >= 0, got {value!r}")
        if self.min_seq_len is not None and (not isinstance(self.min_seq_len, int)
                                             or self.min_seq_len < 0):
            raise DSAConfigError(f"option 'min_seq_len' must be an integer >= 0, got "
                                 f"{self.min_seq_len!r}")
        if self.mode not in MODES:
            raise DSAConfigError(f"option 'mode' must be one of {MODES}, got {self.mode!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(p, str) for p in value):
                raise DSAConfigError(f"option {name!r} must be a string or a list of strings")
            else:
                object.__setattr__(self, name, tuple(value))

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
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise DSAConfigError(
                f"unknown dsa option(s) {unknown}; valid options are: {', '.join(valid)}"
            )
        return cls(**options)

    def replace(self, **changes: Any) -> DSAConfig:
        return dataclasses.replace(self, **changes)
