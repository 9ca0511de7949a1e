"""``dsa_attention``: what a rewritten attention site runs (indexer + top-k + sparse attention).

It takes the site's own q, k, v (post-RoPE, as the model's attention saw them), its mask, and
the site's indexer parameters, and computes

    q_idx = (q as [B, Lq, H * D]) @ q_proj            -> [B, Lq, HI, DI]
    k_idx = (k as [B, Lk, Hkv * D]) @ k_proj          -> [B, Lk, DI]
    I[t, s] = sum_j w[j] * relu(q_idx[t, j] . k_idx[s])
    out = softmax attention of each query over the top-k keys of I (masked like the original)

With at most ``dense_up_to`` keys it runs dense SDPA instead: with L <= topk every visible key
is selected, so that is exactly what the sparse path would compute, only faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .ops import indexer_topk, sparse_attention

# Set by capture_selections(): a list that receives each site's selection (for measurements).
_capture: list[torch.Tensor] | None = None


@contextlib.contextmanager
def capture_selections() -> Iterator[list[torch.Tensor]]:
    """Collects the indices (``[B, rows, topk]``) each rewritten site selects, in call order,
    also when a site runs dense (short sequences), so selection quality can be measured on the
    dense model's own q and k. For eager-mode graphs (compiled code does not call back)."""
    global _capture
    previous, _capture = _capture, []
    try:
        yield _capture
    finally:
        _capture = previous


def mask_to_bias_and_visibility(
    attn_mask: torch.Tensor | None, batch: int, lq: int, lk: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An SDPA ``attn_mask`` -> (additive bias ``[B|1, H|1, Lq|1, Lk]``, key visibility
    ``[B, Lk]`` or ``[B, Lq, Lk]`` bool, True = may be selected).

    Boolean masks mean True = attend; float masks are added to the scores, and values at or
    below half the dtype's most negative finite number (what HF models use) count as masked.
    """
    if attn_mask is None:
        return None, None
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        visible = mask
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )
    else:
        visible = mask > torch.finfo(mask.dtype).min / 2
        bias = mask
    # A key may be selected when some head of the query may attend it.
    visible = visible.any(dim=1)  # [B|1, Lq|1, Lk|1]
    if visible.shape[1] == 1:
        return bias, visible[:, 0].expand(batch, lk)
    return bias, visible.expand(batch, lq, lk)


# Selection granularity (query_block, key_block) when the config leaves it to the device: what
# measured fastest at long context (CPU: benchmarks/results/cpu_ops.md; CUDA: BENCHMARKS.md).
DEFAULT_GRANULARITY = {"cpu": (128, 64), "cuda": (64, 0)}


def granularity(device: torch.device, query_block: int | None, key_block: int | None
                ) -> tuple[int, int]:
    """``(query_block, key_block)`` with ``None`` replaced by the device's default."""
    qb, kb = DEFAULT_GRANULARITY.get(device.type, DEFAULT_GRANULARITY["cpu"])
    return (qb if query_block is None else query_block, kb if key_block is None else key_block)


def dsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    head_weights: torch.Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    topk: int,
    dense_up_to: int,
    query_block: int | None,
    key_block: int | None,
    candidate_blocks: int,
) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale,
    enable_gqa=enable_gqa)`` over ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``.

    Indexer parameters: ``q_proj [H * D, HI * DI]``, ``k_proj [Hkv * D, DI]``,
    ``head_weights [HI]``. SDPA's ``is_causal`` is top-left aligned: query t sees keys s <= t.
    """
    batch, heads, lq, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    dense = lk <= dense_up_to
    query_block, key_block = granularity(q.device, query_block, key_block)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)

    if dense and _capture is None:
        return sdpa()
    index_dim = k_proj.shape[1]
    index_heads = head_weights.shape[0]
    proj_dtype = q_proj.dtype
    q_flat = q.transpose(1, 2).reshape(batch, lq, heads * dim).to(proj_dtype)
    k_flat = k.transpose(1, 2).reshape(batch, lk, kv_heads * dim).to(proj_dtype)
    q_idx = (q_flat @ q_proj).view(batch, lq, index_heads, index_dim)
    k_idx = k_flat @ k_proj
    weights = head_weights.expand(batch, lq, index_heads)
    bias, visible = mask_to_bias_and_visibility(attn_mask, batch, lq, lk)
    indices = indexer_topk(q_idx, k_idx, weights, topk, is_causal, 0, visible, query_block,
                           key_block, candidate_blocks)
    if _capture is not None:
        _capture.append(indices)
        if dense:  # measuring only: the site still computes what it would without the probe
            return sdpa()
    out, _ = sparse_attention(q, k, v, indices, scale, bias, is_causal, 0, query_block)
    return out


def indexed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    indices: torch.Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """SDPA restricted to the keys a model's own indexer chose (``indices [B, Lq, K]``), with
    ``attn_mask`` (the mask before the index mask was folded in) as bias."""
    batch, _, lq, _ = q.shape
    bias, _ = mask_to_bias_and_visibility(attn_mask, batch, lq, k.shape[2])
    out, _ = sparse_attention(q, k, v, indices, scale, bias, is_causal, 0, 1)
    return out


def combine_masks(
    additive: list[torch.Tensor],
    scales: list[float],
    keep: list[torch.Tensor],
    drop: list[torch.Tensor],
) -> torch.Tensor:
    """One SDPA ``attn_mask`` from the masks a hand-written attention applies to its scores:
    ``sum_i scales[i] * additive[i]``, then -inf where a ``keep`` mask is False or a ``drop``
    mask is True. A lone boolean mask stays boolean (True = attend)."""
    if not additive:
        allowed = None
        for mask in keep:
            allowed = mask if allowed is None else allowed & mask
        for mask in drop:
            allowed = ~mask if allowed is None else allowed & ~mask
        return allowed
    total = additive[0] * scales[0]
    for mask, scale in zip(additive[1:], scales[1:], strict=True):
        total = total + mask * scale
    blocked = [~m for m in keep] + list(drop)
    for mask in blocked:
        total = total.masked_fill(mask, float("-inf"))
    return total


def rank3_mask_to_rank4(mask: torch.Tensor) -> torch.Tensor:
    """A mask of rank-3 attention (``[B*H | 1, Lq, Lk]``) for its rank-4 form
    (``[B*H, 1, Lq, Lk]``: one head per batch entry)."""
    return mask.unsqueeze(1) if mask.dim() == 3 else mask
