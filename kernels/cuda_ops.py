"""CUDA implementations of the ``dsa`` ops: the Triton kernels, visible to Inductor.

Each op gets two CUDA paths:

- eager (``register_kernel("cuda")``): the kernels launched directly;
- compiled: when AOTAutograd functionalises a graph (``torch.compile``), a CUDA call of the op
  is decomposed into its kernels wrapped by :func:`torch.library.wrap_triton`, so Inductor
  sees (and can fuse around) the Triton kernels themselves - what ``torch.library.triton_op``
  does, but only for CUDA inputs: on CPU the op stays the opaque memory-bounded reference.
  ``torch.export`` keeps the ops whole (its default), so exported programs hold ``dsa::*``.

CPU tensors never reach these functions. Importing this module without Triton registers nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import checks, torch_compat
from . import indexer as reference_indexer
from . import triton_indexer as tix
from . import triton_sparse_attention as tsa


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _as_sets(indices: torch.Tensor, unique_indices: bool) -> torch.Tensor:
    """Rows the kernels can take: they count a repeated key twice, so rows not known to be
    duplicate-free (``unique_indices``: the indexer's own top-k) are de-duplicated (a sort)."""
    return indices if unique_indices else tsa.unique_rows(indices)


def _sparse_attention(q, k, v, indices, scale=None, bias=None, causal=False, q_offset=0,
                      query_block=1, unique_indices=False, launch=None):
    # Eager calls check the index range (one host sync); traced calls rely on the kernel, which
    # treats an out-of-range index as an empty slot (memory-safe).
    checks.check_sparse_attention_args(q, k, v, indices, bias, q_offset, query_block,
                                       check_index_range=launch is None)
    return tsa.sparse_attention_fwd(q, k, v, _as_sets(indices, unique_indices), _scale(q, scale),
                                    bias, causal, q_offset, query_block, launch=launch)


def _sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, scale, bias, causal,
                               q_offset, query_block, unique_indices=False, launch=None):
    dq, dk, dv, dbias = tsa.sparse_attention_bwd(
        grad_out, grad_lse, q, k, v, _as_sets(indices, unique_indices), out, lse,
        _scale(q, scale), bias, causal, q_offset, query_block, launch=launch,
    )
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


def _indexer_scores(q_idx, k_idx, weights, causal=False, q_offset=0, key_mask=None, launch=None):
    checks.check_indexer_args("indexer_scores", q_idx, k_idx, weights, q_offset, key_mask)
    return tix.indexer_scores_cuda(q_idx, k_idx, weights, causal, q_offset, key_mask,
                                   launch=launch)


def _indexer_topk(q_idx, k_idx, weights, topk, causal=False, q_offset=0, key_mask=None,
                  query_block=1, key_block=0, candidate_blocks=0, k_scale=None):
    checks.check_indexer_args("indexer_topk", q_idx, k_idx, weights, q_offset, key_mask, k_scale)
    checks.check_selection_args("indexer_topk", topk, query_block, key_block, candidate_blocks)
    if q_idx.dtype == torch.float8_e4m3fn:
        _check_fp8_products(q_idx.device)
    if key_block:  # two-stage selection: the torch implementation (runs on the GPU as well)
        return reference_indexer.indexer_topk(q_idx, k_idx, weights, topk, causal, q_offset,
                                              key_mask, query_block, key_block, candidate_blocks,
                                              k_scale)
    return tix.indexer_topk_cuda(q_idx, k_idx, weights, topk, causal, q_offset, key_mask,
                                 query_block, k_scale=k_scale)


def _check_fp8_products(device: torch.device) -> None:
    """FP8 tensor-core products need compute capability 8.9 (Ada) or later."""
    if device.type != "cuda":  # the interpreter (tests) runs them on the CPU
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise checks.DSAInputError(
            f"dsa.indexer_topk: FP8 indexer inputs (indexer_fp8=True) need FP8 tensor cores "
            f"(compute capability 8.9+, Ada / Hopper); {torch.cuda.get_device_name(device)} is "
            f"sm_{major}{minor}: use indexer_fp8=False")


def _decomposition(impl: Callable) -> Callable:
    """A FunctionalTensorMode rule: CUDA calls run ``impl`` with wrap_triton launches (traced
    into the graph), anything else stays the op."""

    def rule(mode, op, types, args, kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_cuda = bool(tensors) and tensors[0].device.type == "cuda"
        if not on_cuda or not torch_compat.decompose_triton_ops():
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return impl(*args, **kwargs, launch=torch.library.wrap_triton)

    return rule


def register(ops) -> None:
    """Registers the CUDA paths on the op objects of :mod:`.ops` (called once by it)."""
    pairs = [
        (ops.sparse_attention, _sparse_attention, True),
        (ops.sparse_attention_backward, _sparse_attention_backward, True),
        (ops.indexer_scores, _indexer_scores, True),
        (ops.indexer_topk, _indexer_topk, False),  # a chunk loop: stays one opaque op
    ]
    for op, impl, traced in pairs:
        op.register_kernel("cuda")(impl)
        if traced:
            op.register_torch_dispatch(torch_compat.functional_tensor_mode(), _decomposition(impl))
