"""Helpers that the chunked (memory-bounded) implementations share.

Queries are processed in chunks of whole index rows (a row serves ``query_block`` queries), so
that every temporary is O(chunk * width), never O(Lq * Lk).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .checks import index_rows

# Elements of the largest fp32 temporary a chunk may allocate (64 MiB).
CHUNK_BUDGET = 1 << 24


@dataclass(frozen=True)
class Chunk:
    """Rows ``r0:r1`` of an index tensor and the queries ``t0:t1`` they serve."""

    r0: int
    r1: int
    t0: int
    t1: int

    @property
    def queries(self) -> int:
        return self.t1 - self.t0


def iter_chunks(lq: int, query_block: int, rows_per_chunk: int) -> Iterator[Chunk]:
    rows = index_rows(lq, query_block)
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        yield Chunk(r0, r1, r0 * query_block, min(lq, r1 * query_block))


def rows_per_chunk(query_block: int, per_query_width: int) -> int:
    """How many index rows fit a chunk whose temporaries hold ``per_query_width`` per query."""
    queries = max(1, CHUNK_BUDGET // max(1, per_query_width))
    return max(1, queries // query_block)


def row_columns(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of the keys that index rows ``[R, K]`` list, and each row's membership.

    Returns ``cols`` (int64 ``[S]``, sorted, distinct, no ``-1``) and ``member`` (bool
    ``[R, S]``: True where the row lists that key). A key listed twice in a row counts once.
    """
    valid = rows >= 0
    rows = rows.long()
    cols = torch.unique(rows[valid])
    width = cols.numel()
    pos = torch.searchsorted(cols, rows.clamp(min=0))
    pos = torch.where(valid, pos, torch.full_like(pos, width))
    member = torch.zeros(rows.shape[0], width + 1, dtype=torch.bool, device=rows.device)
    member.scatter_(1, pos, True)
    return cols, member[:, :width]


def rows_to_queries(per_row: torch.Tensor, query_block: int, queries: int) -> torch.Tensor:
    """Repeats each row of ``[R, ...]`` for the ``query_block`` queries it serves -> ``[queries, ...]``."""
    if query_block == 1:
        return per_row
    return per_row.repeat_interleave(query_block, dim=0)[:queries]


def queries_to_rows(per_query: torch.Tensor, query_block: int, fill: float) -> torch.Tensor:
    """Max of ``[Cq, S]`` over the queries of each row -> ``[R, S]`` (missing queries = ``fill``)."""
    if query_block == 1:
        return per_query
    cq, width = per_query.shape
    rows = -(-cq // query_block)
    pad = rows * query_block - cq
    if pad:
        per_query = torch.cat([per_query, per_query.new_full((pad, width), fill)])
    return per_query.view(rows, query_block, width).amax(dim=1)


def query_visibility(
    positions: torch.Tensor,
    t0: int,
    t1: int,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Bool ``[t1 - t0, S]`` (None when everything is visible) for queries ``t0:t1``.

    ``positions`` (int64 ``[S]``) is the key position of each column; ``key_mask`` is one batch
    element's mask, ``[Lk]`` or ``[Lq, Lk]``.
    """
    if not causal and key_mask is None:
        return None
    visible = torch.ones(t1 - t0, positions.numel(), dtype=torch.bool, device=positions.device)
    if causal:
        last = torch.arange(t0, t1, device=positions.device)[:, None] + q_offset
        visible &= positions[None, :] <= last
    if key_mask is not None:
        mask = key_mask if key_mask.dim() == 1 else key_mask[t0:t1]
        visible &= mask[..., positions]
    return visible


def mask_invisible_(
    scores: torch.Tensor,
    positions: torch.Tensor,
    t0: int,
    t1: int,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Sets ``scores [t1 - t0, S]`` to -inf where query t may not see the key of column s.

    ``positions`` (int64 ``[S]``) must be sorted: under causality alone only the columns past
    the first query's horizon can be invisible, so only that tail is touched.
    """
    if key_mask is None:
        if causal:
            split = int(torch.searchsorted(positions, q_offset + t0, right=True))
            if split < positions.numel():
                tail = query_visibility(positions[split:], t0, t1, True, q_offset, None)
                scores[:, split:].masked_fill_(~tail, float("-inf"))
        return scores
    visible = query_visibility(positions, t0, t1, causal, q_offset, key_mask)
    return scores.masked_fill_(~visible, float("-inf"))
