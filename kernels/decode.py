"""The decode step's sparse attention in one lean pass (CPU, plain torch ops).

A decode step has a handful of queries against a long cache, so the general chunked ops
(:mod:`.indexer`, :mod:`.sparse_attention`) spend most of their time on per-call bookkeeping
over the whole key length (masks, unions, plans), not on the work: scoring ``Lk`` indexer keys,
one top-k, gathering ``topk`` rows of K and V. :func:`decode_attention` does only that work, per
query, and equals ``dsa::indexer_topk`` (exact selection, same scores, same tie rule) followed
by ``dsa::sparse_attention`` over its indices. It covers what decoding meets: no causal mask
(the cache precedes the queries), no mask or a boolean mask over keys only (padding, a static
cache's empty slots), inference (no autograd); :func:`applies` says when.
"""

from __future__ import annotations

import torch

from . import checks
from .indexer import score_chunk
from .topk import topk_lowest_ties

NEG_INF = float("-inf")


def applies(q: torch.Tensor, is_causal: bool, mask_over_keys_only: bool, blocks: tuple[int, int],
            decode_queries: int, tensors: tuple[torch.Tensor, ...]) -> bool:
    """True when :func:`decode_attention` computes what the ops compute for this call: CPU, at
    most ``decode_queries`` queries, exact selection (``blocks == (1, 0)``), not causal, no mask
    or a keys-only boolean one (``mask_over_keys_only``), and no gradient to track."""
    if q.device.type != "cpu" or q.shape[2] > decode_queries or blocks != (1, 0) or is_causal:
        return False
    if not mask_over_keys_only:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                     k_idx: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor | None,
                     topk: int, scale: float | None) -> torch.Tensor:
    """Sparse attention of a few queries with their own top-k keys each.

    ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``; indexer inputs ``q_idx
    [B, Lq, HI, DI]``, ``k_idx [B, Lk, DI]``, ``weights [B, Lq, HI]``; ``visible [B, Lk]`` bool
    (True = may be attended) or None. Each query attends over the ``min(topk, Lk)`` visible keys
    with the best indexer scores (ties toward lower positions); a query that sees no key gets
    zeros. Returns ``[B, H, Lq, Dv]`` in ``q``'s dtype.
    """
    checks.check_attention_inputs("decode_attention", q, k, v)  # as the ops it stands in for
    if torch.compiler.is_compiling():  # Dynamo would warn that it drops the profiler range
        return _decode_attention(q, k, v, q_idx, k_idx, weights, visible, topk, scale)
    with torch.profiler.record_function("dsa::decode_attention"):
        return _decode_attention(q, k, v, q_idx, k_idx, weights, visible, topk, scale)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                      k_idx: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor | None,
                      topk: int, scale: float | None) -> torch.Tensor:
    batch, heads, lq, dim = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    scale = dim ** -0.5 if scale is None else scale
    count = min(topk, lk)
    out = q.new_empty(batch, heads, lq, dv)
    k_idx32 = k_idx.float()
    rows = torch.arange(kv_heads, device=q.device)[:, None] * lk  # each kv head's first flat row
    for b in range(batch):
        scores = score_chunk(q_idx[b].float(), weights[b].float(), k_idx32[b])  # [Lq, Lk]
        if visible is not None:
            scores = scores.masked_fill_(~visible[b], NEG_INF)
        values, picked = topk_lowest_ties(scores, count)  # [Lq, count]
        empty = torch.isneginf(values)  # slots past the visible keys
        flat = (picked.flatten()[None] + rows).flatten()  # [Hkv * Lq * count]
        keys = k[b].reshape(kv_heads * lk, dim).index_select(0, flat)
        vals = v[b].reshape(kv_heads * lk, dv).index_select(0, flat)
        keys = keys.view(kv_heads, lq, count, dim).float()
        vals = vals.view(kv_heads, lq, count, dv).float()
        queries = q[b].reshape(kv_heads, group, lq, dim).float()
        logits = torch.einsum("hgqd,hqsd->hgqs", queries, keys).mul_(scale)
        logits.masked_fill_(empty, NEG_INF)
        probs = logits.softmax(dim=-1).nan_to_num_(0.0)  # a row with no key: zeros
        mixed = torch.einsum("hgqs,hqsd->hgqd", probs, vals)
        out[b] = mixed.reshape(heads, lq, dv).to(out.dtype)
    return out
