"""Memory-bounded implementation of the lightning indexer ops (any device, plain torch ops).

Scores ``I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])`` are computed for a chunk of queries at
a time (fp32), so extra memory is O(chunk * HI * width), never O(Lq * Lk).

Selection granularity (see :func:`indexer_topk`):

- ``query_block = 1`` (exact): each query gets its own top-k keys.
- ``query_block = Q > 1`` (tile-shared): the Q consecutive queries of a tile share one index row,
  the top-k keys of the tile score ``max over the tile's queries that see s of I[t, s]``. Sparse
  attention then multiplies one gathered K/V tile by Q queries (dense GEMMs, not gathers).
- ``key_block = 0``: every visible key is scored.
- ``key_block = P > 0`` (two-stage): key blocks of P tokens are scored first by an upper bound
  of ``max_{s in block} I[t, s]`` (Quest-style per-channel min/max of the indexer keys), the
  ``candidate_blocks`` best blocks are kept, and only their tokens are scored exactly.
"""

from __future__ import annotations

import torch

from .checks import index_rows
from .chunking import (
    iter_chunks,
    mask_invisible_,
    queries_to_rows,
    query_visibility,
    row_columns,
    rows_per_chunk,
)
from .topk import topk_lowest_ties

NEG_INF = float("-inf")

# Two-stage selection scores at least this many candidate blocks exactly: with small budgets
# 2 * topk / key_block blocks prune away keys the best selection keeps (MiniLM, top-64 at
# (16, 8): recall 0.939 -> 0.961 of the best with 32 instead of 16, for ~13% more time;
# benchmarks/results/granularity.md). From topk 1024 at 64-key blocks it changes nothing.
MIN_CANDIDATE_BLOCKS = 32


def score_chunk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """fp32 ``[C, HI, DI]``, ``[C, HI]``, ``[S, DI]`` -> indexer scores ``[C, S]``."""
    c, heads, dim = q.shape
    logits = torch.matmul(q.reshape(c * heads, dim), keys.T).view(c, heads, -1).relu_()
    return torch.bmm(w.unsqueeze(1), logits).squeeze(1)


def block_bounds(k: torch.Tensor, key_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max and min of the keys of each block: ``[B, Lk, DI]`` -> 2 x ``[B, nb, DI]``."""
    batch, lk, dim = k.shape
    blocks = -(-lk // key_block)
    pad = blocks * key_block - lk
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=NEG_INF)
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf"))
    hi = hi.view(batch, blocks, key_block, dim).amax(dim=2)
    lo = lo.view(batch, blocks, key_block, dim).amin(dim=2)
    return hi, lo


def block_score_bound(
    q: torch.Tensor, w: torch.Tensor, k_max: torch.Tensor, k_min: torch.Tensor
) -> torch.Tensor:
    """An upper bound of ``max_{s in block} I[t, s]``: ``[C, HI, DI]``, ``[C, HI]`` -> ``[C, nb]``.

    ``q . k <= relu(q) . k_max + min(q, 0) . k_min`` per channel (and the mirror image bounds
    it from below); ``w * relu(x)`` rises with x when ``w >= 0`` and falls when ``w < 0``.
    Both bounds come out of one GEMM: ``[q+, q-] @ [[k_max, k_min], [k_min, k_max]]^T``.
    """
    c, heads, dim = q.shape
    blocks = k_max.shape[0]
    signed = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1).view(c * heads, 2 * dim)
    table = torch.cat([torch.cat([k_max, k_min], dim=1), torch.cat([k_min, k_max], dim=1)])
    both = torch.matmul(signed, table.T).view(c, heads, 2, blocks).relu_()
    wj = w.unsqueeze(-1)
    return torch.where(wj >= 0, wj * both[:, :, 0], wj * both[:, :, 1]).sum(dim=1)


def indexer_scores(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Dense scores fp32 ``[B, Lq, Lk]``, ``-inf`` where not visible (see ``dsa::indexer_scores``)."""
    batch, lq, heads, _ = q_idx.shape
    lk = k_idx.shape[1]
    out = torch.empty(batch, lq, lk, dtype=torch.float32, device=q_idx.device)
    k32 = k_idx.float()
    positions = torch.arange(lk, device=q_idx.device)
    for b in range(batch):
        for ch in iter_chunks(lq, 1, rows_per_chunk(1, heads * lk)):
            scores = score_chunk(
                q_idx[b, ch.t0 : ch.t1].float(), weights[b, ch.t0 : ch.t1].float(), k32[b]
            )
            mask_b = key_mask[b] if key_mask is not None else None
            out[b, ch.t0 : ch.t1] = mask_invisible_(scores, positions, ch.t0, ch.t1, causal, q_offset,
                                                    mask_b)
    return out


def indexer_scores_backward(
    grad: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`indexer_scores` w.r.t. q_idx, k_idx, weights (chunked, fp32 math)."""
    batch, lq, heads, dim = q_idx.shape
    lk = k_idx.shape[1]
    dq = torch.zeros(q_idx.shape, dtype=torch.float32, device=q_idx.device)
    dk = torch.zeros(k_idx.shape, dtype=torch.float32, device=q_idx.device)
    dw = torch.zeros(weights.shape, dtype=torch.float32, device=q_idx.device)
    k32 = k_idx.float()
    positions = torch.arange(lk, device=q_idx.device)
    for b in range(batch):
        mask_b = key_mask[b] if key_mask is not None else None
        for ch in iter_chunks(lq, 1, rows_per_chunk(1, 2 * heads * lk)):
            g = grad[b, ch.t0 : ch.t1].float()
            visible = query_visibility(positions, ch.t0, ch.t1, causal, q_offset, mask_b)
            if visible is not None:
                g = g.masked_fill(~visible, 0.0)
            q = q_idx[b, ch.t0 : ch.t1].float()
            w = weights[b, ch.t0 : ch.t1].float()
            logits = torch.matmul(q, k32[b].T)  # [C, HI, Lk]
            dw[b, ch.t0 : ch.t1] = torch.bmm(logits.relu(), g.unsqueeze(-1)).squeeze(-1)
            dlogits = (logits > 0) * g.unsqueeze(1) * w.unsqueeze(-1)
            dq[b, ch.t0 : ch.t1] = torch.matmul(dlogits, k32[b])
            dk[b] += dlogits.reshape(-1, lk).T @ q.reshape(-1, dim)
    return dq.to(q_idx.dtype), dk.to(k_idx.dtype), dw.to(weights.dtype)


def _candidate_blocks(
    q: torch.Tensor,
    w: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    key_block: int,
    count: int,
    t0: int,
    t1: int,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
    query_block: int,
) -> torch.Tensor:
    """The ``count`` best key blocks of each index row of a chunk: int64 ``[R, count]``, -1 = none."""
    k_max, k_min = bounds
    if causal:  # blocks that start past the chunk's last query are never visible
        horizon = -(-min(k_max.shape[0] * key_block, q_offset + t1) // key_block)
        k_max, k_min = k_max[:horizon], k_min[:horizon]
        if key_mask is not None:
            key_mask = key_mask[..., : horizon * key_block]
    blocks = k_max.shape[0]
    bound = block_score_bound(q, w, k_max, k_min)  # [Cq, nb]
    starts = torch.arange(blocks, device=q.device) * key_block
    mask_invisible_(bound, starts, t0, t1, causal, q_offset, None)
    if key_mask is not None:  # a block is visible when any of its keys is
        rows = key_mask if key_mask.dim() == 1 else key_mask[t0:t1]
        padded = torch.nn.functional.pad(rows, (0, blocks * key_block - rows.shape[-1]))
        block_mask = padded.view(*rows.shape[:-1], blocks, key_block).any(dim=-1)
        bound.masked_fill_(~block_mask, NEG_INF)
    bound = queries_to_rows(bound, query_block, NEG_INF)
    values, chosen = bound.topk(min(count, blocks), dim=-1)
    return chosen.masked_fill_(torch.isneginf(values), -1)


def indexer_topk(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
    query_block: int = 1,
    key_block: int = 0,
    candidate_blocks: int = 0,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k visible keys per index row: int32 ``[B, ceil(Lq / query_block), topk]``.

    Entries of a row are sorted by descending score; when fewer than ``topk`` keys are visible
    (to any query of the row), the row lists all of them, then ``-1``.
    ``candidate_blocks = 0`` with ``key_block > 0`` means ``max(ceil(2 * topk / key_block),
    MIN_CANDIDATE_BLOCKS)``. ``k_scale [B, Lk]``: per-key scales of (FP8) keys, which score as
    ``k_scale[s] * k_idx[s]``.
    """
    batch, lq, heads, _ = q_idx.shape
    lk = k_idx.shape[1]
    rows = index_rows(lq, query_block)
    out = torch.full((batch, rows, topk), -1, dtype=torch.int32, device=q_idx.device)
    if lk == 0 or lq == 0:
        return out
    k32 = k_idx.float() if k_scale is None else k_idx.float() * k_scale.float()[..., None]
    if key_block:
        bounds = block_bounds(k32, key_block)
        count = candidate_blocks or max(-(-2 * topk // key_block), MIN_CANDIDATE_BLOCKS)
        per_chunk = max(1, 64 // query_block)
    else:
        per_chunk = rows_per_chunk(query_block, heads * lk)
    for b in range(batch):
        mask_b = key_mask[b] if key_mask is not None else None
        for ch in iter_chunks(lq, query_block, per_chunk):
            q = q_idx[b, ch.t0 : ch.t1].float()
            w = weights[b, ch.t0 : ch.t1].float()
            # Keys past the last query's causal horizon are never visible: skip them.
            end = min(lk, q_offset + ch.t1) if causal else lk
            if end <= 0:
                continue
            if key_block:
                chosen = _candidate_blocks(
                    q, w, (bounds[0][b], bounds[1][b]), key_block, count,
                    ch.t0, ch.t1, causal, q_offset, mask_b, query_block,
                )
                block_ids, member = row_columns(chosen)
                offsets = torch.arange(key_block, device=q.device)
                positions = (block_ids[:, None] * key_block + offsets).flatten()
                member = member.repeat_interleave(key_block, dim=1)
                keep = positions < end
                positions, member = positions[keep], member[:, keep]
                keys = k32[b].index_select(0, positions)
            else:
                positions = torch.arange(end, device=q.device)
                member = None
                keys = k32[b, :end]
            if positions.numel() == 0:
                continue
            scores = score_chunk(q, w, keys)
            mask_invisible_(scores, positions, ch.t0, ch.t1, causal, q_offset, mask_b)
            scores = queries_to_rows(scores, query_block, NEG_INF)
            if member is not None and member.shape[0] > 1:  # rows of the chunk differ
                scores.masked_fill_(~member, NEG_INF)
            found = min(topk, positions.numel())
            values, picked = topk_lowest_ties(scores, found)
            picked = positions[picked].masked_fill_(torch.isneginf(values), -1)
            out[b, ch.r0 : ch.r1, :found] = picked.to(torch.int32)
    return out
