"""Plain dense references of the ``dsa`` ops: O(Lq * Lk) memory, written to be read, not run fast.

They define the semantics that every implementation (the chunked CPU path, the Triton kernels)
is tested against.

Visibility: key ``s`` is visible to query ``t`` when ``(not causal or s <= q_offset + t)`` and the
key mask (``[B, Lk]`` or ``[B, Lq, Lk]``, True = allowed) allows it.
"""

from __future__ import annotations

import torch


def visibility(
    batch: int,
    lq: int,
    lk: int,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Bool ``[B, Lq, Lk]``: True where query t may see key s."""
    visible = torch.ones(batch, lq, lk, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(lq, device=device)[:, None] + q_offset
        visible &= torch.arange(lk, device=device)[None, :] <= rows
    if key_mask is not None:
        visible &= key_mask[:, None, :] if key_mask.dim() == 2 else key_mask
    return visible


def indexer_scores_reference(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    causal: bool = False,
    q_offset: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``I[b, t, s] = sum_j weights[b, t, j] * relu(q_idx[b, t, j] . k_idx[b, s])``, fp32.

    q_idx ``[B, Lq, HI, DI]``, k_idx ``[B, Lk, DI]``, weights ``[B, Lq, HI]`` ->
    ``[B, Lq, Lk]`` with ``-inf`` where key s is not visible to query t.
    """
    logits = torch.einsum("btjd,bsd->btjs", q_idx.float(), k_idx.float()).relu()
    scores = torch.einsum("btjs,btj->bts", logits, weights.float())
    batch, lq, lk = scores.shape
    visible = visibility(batch, lq, lk, causal, q_offset, key_mask, scores.device)
    return scores.masked_fill(~visible, float("-inf"))


def selection_mask(
    indices: torch.Tensor, lq: int, lk: int, query_block: int = 1
) -> torch.Tensor:
    """Bool ``[B, Lq, Lk]``: True where key s is listed in the index row of query t.

    Row ``r`` of ``indices`` ``[B, ceil(Lq / query_block), K]`` serves queries
    ``r * query_block .. (r + 1) * query_block - 1``; ``-1`` entries are empty slots.
    """
    batch = indices.shape[0]
    valid = indices >= 0
    rows = torch.zeros(batch, indices.shape[1], lk + 1, dtype=torch.bool, device=indices.device)
    # Empty slots write into the extra column lk, which is dropped.
    slots = torch.where(valid, indices.long(), torch.full_like(indices.long(), lk))
    rows.scatter_(2, slots, True)
    rows = rows[..., :lk]
    return rows.repeat_interleave(query_block, dim=1)[:, :lq]


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    q_offset: int = 0,
    query_block: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention masked to the selected keys: ``(out [B, H, Lq, Dv], lse fp32 [B, H, Lq])``.

    ``scores = scale * q . k + bias`` over the keys listed in the query's index row (a set:
    a repeated index counts once) that are visible under ``causal``/``q_offset``. Head h reads
    kv head ``h // (H // Hkv)``. A query with no selected key gets zeros and ``lse = -inf``.
    Differentiable through torch autograd (the ground truth for the op's backward).
    """
    batch, heads, lq, _ = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    group = heads // kv_heads
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    allowed = selection_mask(indices, lq, lk, query_block)
    allowed &= visibility(batch, lq, lk, causal, q_offset, None, q.device)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    out = torch.matmul(probs, vf)
    return out.to(q.dtype), lse
