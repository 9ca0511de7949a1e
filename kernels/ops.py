"""The ``dsa`` custom ops (``torch.ops.dsa.*``): registration, fake (meta) kernels, autograd.

Every op validates its arguments (clear :class:`DSAInputError` naming the argument) in both the
real and the fake kernel, so a bad call fails at trace time under ``torch.compile`` too.
The real kernels are the memory-bounded implementations of :mod:`.indexer` and
:mod:`.sparse_attention` (any device); with Triton installed, CUDA calls run the Triton kernels
instead (:mod:`.cuda_ops`, visible to Inductor under ``torch.compile``).

Ops
---
``dsa::indexer_scores(q_idx, k_idx, weights, causal=False, q_offset=0, key_mask=None)``
    fp32 ``[B, Lq, Lk]``: ``sum_j weights[t, j] * relu(q_idx[t, j] . k_idx[s])``, ``-inf`` where
    key s is not visible to query t. Differentiable w.r.t. q_idx, k_idx, weights.
``dsa::indexer_topk(q_idx, k_idx, weights, topk, causal=False, q_offset=0, key_mask=None,
query_block=1, key_block=0, candidate_blocks=0, k_scale=None)``
    int32 ``[B, ceil(Lq / query_block), topk]``: the best visible keys per index row, sorted by
    descending score, ``-1`` padding when fewer are visible. See :mod:`.indexer` for the two
    granularity knobs (``query_block``, ``key_block``); the defaults are exact per-query top-k.
    ``k_scale`` fp32 ``[B, Lk]``: per-key scales (FP8 keys, :mod:`.fp8`): key s scores as
    ``k_scale[s] * k_idx[s]``.
``dsa::sparse_attention(q, k, v, indices, scale=None, bias=None, causal=False, q_offset=0,
query_block=1)``
    ``(out [B, H, Lq, Dv], lse fp32 [B, H, Lq])``: softmax attention of each query over the keys
    of its index row only. Differentiable w.r.t. q, k, v, bias.

Shapes: ``q_idx [B, Lq, HI, DI]``, ``k_idx [B, Lk, DI]`` (fp32 / fp16 / bf16, or both FP8 e4m3),
``weights [B, Lq, HI]``,
``key_mask`` bool ``[B, Lk]`` or ``[B, Lq, Lk]`` (True = may be selected), ``q [B, H, Lq, D]``,
``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``, ``indices`` int32/int64 ``[B, rows, K]``,
``bias`` broadcastable to ``[B, H, Lq, Lk]`` (each dim full or 1). Query t sits at absolute
position ``q_offset + t``; under ``causal`` it sees keys ``s <= q_offset + t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, indexer
from . import sparse_attention as sparse

# ---------------------------------------------------------------------------------------------
# indexer_scores


@torch.library.custom_op("dsa::indexer_scores", mutates_args=())
def indexer_scores(
    q_idx: Tensor,
    k_idx: Tensor,
    weights: Tensor,
    causal: bool = False,
    q_offset: int = 0,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Lightning-indexer scores, fp32 ``[B, Lq, Lk]`` (``-inf`` where not visible)."""
    checks.check_indexer_args("indexer_scores", q_idx, k_idx, weights, q_offset, key_mask)
    return indexer.indexer_scores(q_idx, k_idx, weights, causal, q_offset, key_mask)


@indexer_scores.register_fake
def _indexer_scores_fake(q_idx, k_idx, weights, causal=False, q_offset=0, key_mask=None):
    checks.check_indexer_args("indexer_scores", q_idx, k_idx, weights, q_offset, key_mask)
    return q_idx.new_empty((q_idx.shape[0], q_idx.shape[1], k_idx.shape[1]), dtype=torch.float32)


@torch.library.custom_op("dsa::indexer_scores_backward", mutates_args=())
def indexer_scores_backward(
    grad: Tensor,
    q_idx: Tensor,
    k_idx: Tensor,
    weights: Tensor,
    causal: bool,
    q_offset: int,
    key_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``indexer_scores`` w.r.t. ``(q_idx, k_idx, weights)``."""
    return indexer.indexer_scores_backward(grad, q_idx, k_idx, weights, causal, q_offset, key_mask)


@indexer_scores_backward.register_fake
def _indexer_scores_backward_fake(grad, q_idx, k_idx, weights, causal, q_offset, key_mask):
    return torch.empty_like(q_idx), torch.empty_like(k_idx), torch.empty_like(weights)


def _indexer_scores_setup(ctx, inputs, output):
    q_idx, k_idx, weights, causal, q_offset, key_mask = inputs
    ctx.save_for_backward(q_idx, k_idx, weights, key_mask)
    ctx.causal, ctx.q_offset = causal, q_offset


def _indexer_scores_grad(ctx, grad):
    q_idx, k_idx, weights, key_mask = ctx.saved_tensors
    dq, dk, dw = indexer_scores_backward(
        grad, q_idx, k_idx, weights, ctx.causal, ctx.q_offset, key_mask
    )
    return dq, dk, dw, None, None, None


indexer_scores.register_autograd(_indexer_scores_grad, setup_context=_indexer_scores_setup)

# ---------------------------------------------------------------------------------------------
# indexer_topk


def _check_topk_args(q_idx, k_idx, weights, topk, q_offset, key_mask, query_block, key_block,
                     candidate_blocks, k_scale=None):
    checks.check_indexer_args("indexer_topk", q_idx, k_idx, weights, q_offset, key_mask, k_scale)
    checks.check_selection_args("indexer_topk", topk, query_block, key_block, candidate_blocks)


@torch.library.custom_op("dsa::indexer_topk", mutates_args=())
def indexer_topk(
    q_idx: Tensor,
    k_idx: Tensor,
    weights: Tensor,
    topk: int,
    causal: bool = False,
    q_offset: int = 0,
    key_mask: Tensor | None = None,
    query_block: int = 1,
    key_block: int = 0,
    candidate_blocks: int = 0,
    k_scale: Tensor | None = None,
) -> Tensor:
    """Top-k visible keys per index row, int32 ``[B, ceil(Lq / query_block), topk]``, -1 padded."""
    _check_topk_args(q_idx, k_idx, weights, topk, q_offset, key_mask, query_block, key_block,
                     candidate_blocks, k_scale)
    return indexer.indexer_topk(
        q_idx, k_idx, weights, topk, causal, q_offset, key_mask,
        query_block, key_block, candidate_blocks, k_scale,
    )


@indexer_topk.register_fake
def _indexer_topk_fake(q_idx, k_idx, weights, topk, causal=False, q_offset=0, key_mask=None,
                       query_block=1, key_block=0, candidate_blocks=0, k_scale=None):
    _check_topk_args(q_idx, k_idx, weights, topk, q_offset, key_mask, query_block, key_block,
                     candidate_blocks, k_scale)
    rows = checks.index_rows(q_idx.shape[1], query_block)
    return q_idx.new_empty((q_idx.shape[0], rows, topk), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# sparse_attention


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


@torch.library.custom_op("dsa::sparse_attention", mutates_args=())
def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    scale: float | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    q_offset: int = 0,
    query_block: int = 1,
    unique_indices: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention over the selected keys: ``(out [B, H, Lq, Dv], lse fp32 [B, H, Lq])``.

    ``scale`` defaults to ``D ** -0.5``. A row of ``indices`` is a set of key positions (-1 =
    empty slot) shared by all heads; head h reads kv head ``h // (H // Hkv)``. ``bias`` is added
    to ``scale * q . k`` at the selected positions. A query with no selected (visible) key
    gets zeros and ``lse = -inf``. ``unique_indices``: the caller guarantees that no row lists a
    key twice (``indexer_topk``'s rows), so the CUDA path skips de-duplicating them (a sort per
    call); a row with a repeat then counts that key twice. The CPU path needs no such promise.
    """
    checks.check_sparse_attention_args(q, k, v, indices, bias, q_offset, query_block)
    return sparse.sparse_attention_forward(
        q, k, v, indices, _scale(q, scale), bias, causal, q_offset, query_block
    )


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, indices, scale=None, bias=None, causal=False, q_offset=0,
                           query_block=1, unique_indices=False):
    checks.check_sparse_attention_args(
        q, k, v, indices, bias, q_offset, query_block, check_index_range=False
    )
    batch, heads, lq, _ = q.shape
    out = q.new_empty((batch, heads, lq, v.shape[-1]))
    return out, q.new_empty((batch, heads, lq), dtype=torch.float32)


@torch.library.custom_op("dsa::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float | None,
    bias: Tensor | None,
    causal: bool,
    q_offset: int,
    query_block: int,
    unique_indices: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dbias)``; ``dbias`` is an empty tensor when there is no bias."""
    dq, dk, dv, dbias = sparse.sparse_attention_backward(
        grad_out, grad_lse, q, k, v, indices, out, lse, _scale(q, scale), bias, causal,
        q_offset, query_block,
    )
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


@sparse_attention_backward.register_fake
def _sparse_attention_backward_fake(grad_out, grad_lse, q, k, v, indices, out, lse, scale, bias,
                                    causal, q_offset, query_block, unique_indices=False):
    dbias = torch.empty_like(bias) if bias is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _sparse_attention_setup(ctx, inputs, output):
    q, k, v, indices, scale, bias, causal, q_offset, query_block, unique_indices = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, indices, out, lse, bias)
    ctx.scale, ctx.causal, ctx.q_offset, ctx.query_block = scale, causal, q_offset, query_block
    ctx.unique_indices = unique_indices


def _sparse_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, indices, out, lse, bias = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dbias = sparse_attention_backward(
        grad_out, grad_lse, q, k, v, indices, out, lse, ctx.scale, bias, ctx.causal,
        ctx.q_offset, ctx.query_block, ctx.unique_indices,
    )
    return dq, dk, dv, None, None, dbias if bias is not None else None, None, None, None, None


sparse_attention.register_autograd(_sparse_attention_grad, setup_context=_sparse_attention_setup)


def _register_cuda_kernels() -> None:
    """CUDA calls run the Triton kernels (:mod:`.cuda_ops`) when Triton is installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    import sys

    from . import cuda_ops

    cuda_ops.register(sys.modules[__name__])


_register_cuda_kernels()
