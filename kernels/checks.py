"""Argument checks shared by every implementation of the ``dsa`` ops.

Each check raises :class:`DSAInputError` (a ``ValueError``) whose message names the argument,
the shape or dtype it got and the one it expects, so bad input never reaches a kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def index_rows(lq, query_block: int):
    """Rows of an index tensor for ``lq`` queries, ``query_block`` queries a row (SymInt-safe)."""
    return (lq + query_block - 1) // query_block


class DSAInputError(ValueError):
    """A ``dsa`` op was called with arguments it cannot compute a correct answer for."""


def _fail(op: str, message: str) -> None:
    raise DSAInputError(f"dsa.{op}: {message}")


def check_rank(op: str, name: str, tensor: torch.Tensor, layout: str) -> None:
    """``layout`` names the dimensions, e.g. ``"[B, Lq, HI, DI]"``; its length is the rank."""
    rank = len(layout.strip("[]").split(","))
    if tensor.dim() != rank:
        _fail(op, f"{name} must have rank {rank} {layout}, got shape {tuple(tensor.shape)}")


def check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def check_dim(op: str, name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    got = tensor.shape[dim]
    if got != expected:
        _fail(
            op,
            f"{name}.shape[{dim}] ({what}) must be {expected}, got {got} "
            f"(shape {tuple(tensor.shape)})",
        )


def check_same_device(op: str, tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    present = [(name, t) for name, t in tensors if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            _fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_positive(op: str, name: str, value: int) -> None:
    if value < 1:
        _fail(op, f"{name} must be >= 1, got {value}")


def check_non_negative(op: str, name: str, value: int) -> None:
    if value < 0:
        _fail(op, f"{name} must be >= 0, got {value}")


def check_indexer_args(
    op: str,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    q_offset: int,
    key_mask: torch.Tensor | None,
    k_scale: torch.Tensor | None = None,
) -> None:
    """Checks the inputs of ``indexer_scores`` / ``indexer_topk`` (``k_scale``: the latter's
    per-key scales, fp32 ``[B, Lk]``)."""
    check_rank(op, "q_idx", q_idx, "[B, Lq, HI, DI]")
    check_rank(op, "k_idx", k_idx, "[B, Lk, DI]")
    check_rank(op, "weights", weights, "[B, Lq, HI]")
    fp8 = [t.dtype == torch.float8_e4m3fn for t in (q_idx, k_idx)]
    if any(fp8) and not all(fp8):  # an FP8 indexer (kernels/fp8.py) quantises both
        _fail(op, f"q_idx and k_idx must both be float8_e4m3fn or neither, got {q_idx.dtype} and "
                  f"{k_idx.dtype}")
    for name, t in (("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights)):
        if t.dtype != torch.float8_e4m3fn or name == "weights":
            check_float(op, name, t)
    batch, lq, heads, dim = q_idx.shape
    check_dim(op, "k_idx", k_idx, 0, batch, "batch, as q_idx.shape[0]")
    check_dim(op, "k_idx", k_idx, 2, dim, "indexer head dim DI, as q_idx.shape[3]")
    check_dim(op, "weights", weights, 0, batch, "batch, as q_idx.shape[0]")
    check_dim(op, "weights", weights, 1, lq, "queries Lq, as q_idx.shape[1]")
    check_dim(op, "weights", weights, 2, heads, "indexer heads HI, as q_idx.shape[2]")
    check_non_negative(op, "q_offset", q_offset)
    if key_mask is not None:
        check_key_mask(op, key_mask, batch, lq, k_idx.shape[1])
    if k_scale is not None:
        check_rank(op, "k_scale", k_scale, "[B, Lk]")
        if k_scale.dtype != torch.float32:
            _fail(op, f"k_scale must be float32, got {k_scale.dtype}")
        check_dim(op, "k_scale", k_scale, 0, batch, "batch, as q_idx.shape[0]")
        check_dim(op, "k_scale", k_scale, 1, k_idx.shape[1], "keys Lk, as k_idx.shape[1]")
    check_same_device(
        op, [("q_idx", q_idx), ("k_idx", k_idx), ("weights", weights), ("key_mask", key_mask),
             ("k_scale", k_scale)]
    )


def check_key_mask(op: str, key_mask: torch.Tensor, batch: int, lq: int, lk: int) -> None:
    if key_mask.dtype != torch.bool:
        _fail(op, f"key_mask must be bool (True = key may be selected), got {key_mask.dtype}")
    if key_mask.dim() == 2:
        expected = (batch, lk)
    elif key_mask.dim() == 3:
        expected = (batch, lq, lk)
    else:
        expected = None
    if expected is None or tuple(key_mask.shape) != expected:
        _fail(
            op,
            f"key_mask must have shape [B, Lk] = ({batch}, {lk}) or [B, Lq, Lk] = "
            f"({batch}, {lq}, {lk}), got {tuple(key_mask.shape)}",
        )


def check_selection_args(
    op: str, topk: int, query_block: int, key_block: int, candidate_blocks: int
) -> None:
    check_positive(op, "topk", topk)
    check_positive(op, "query_block", query_block)
    check_non_negative(op, "key_block", key_block)
    check_non_negative(op, "candidate_blocks", candidate_blocks)
    if candidate_blocks and not key_block:
        _fail(op, "candidate_blocks is only meaningful with key_block > 0")


def check_attention_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]`` of one float dtype, H a
    multiple of Hkv."""
    check_rank(op, "q", q, "[B, H, Lq, D]")
    check_rank(op, "k", k, "[B, Hkv, Lk, D]")
    check_rank(op, "v", v, "[B, Hkv, Lk, Dv]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
    if not (q.dtype == k.dtype == v.dtype):
        _fail(op, f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, _, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    check_dim(op, "k", k, 0, batch, "batch, as q.shape[0]")
    check_dim(op, "k", k, 3, dim, "head dim D, as q.shape[3]")
    check_dim(op, "v", v, 0, batch, "batch, as q.shape[0]")
    check_dim(op, "v", v, 1, kv_heads, "kv heads Hkv, as k.shape[1]")
    check_dim(op, "v", v, 2, lk, "keys Lk, as k.shape[2]")
    if kv_heads < 1 or heads % kv_heads != 0:
        _fail(op, f"the query heads H={heads} must be a multiple of the kv heads Hkv={kv_heads}")


def check_sparse_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    q_offset: int,
    query_block: int,
    check_index_range: bool = True,
) -> None:
    """Checks the inputs of ``sparse_attention`` (and its backward)."""
    op = "sparse_attention"
    check_rank(op, "indices", indices, "[B, rows, K]")
    check_attention_inputs(op, q, k, v)
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    check_positive(op, "query_block", query_block)
    check_non_negative(op, "q_offset", q_offset)
    if indices.dtype not in INDEX_DTYPES:
        _fail(op, f"indices must be int32 or int64, got {indices.dtype}")
    check_dim(op, "indices", indices, 0, batch, "batch, as q.shape[0]")
    rows = index_rows(lq, query_block)
    check_dim(op, "indices", indices, 1, rows, f"rows = ceil(Lq / query_block) = ceil({lq}/{query_block})")
    if bias is not None:
        check_float(op, "bias", bias)
        expected = (batch, heads, lq, lk)
        if bias.dim() != 4 or any(b not in (1, e) for b, e in zip(bias.shape, expected, strict=True)):
            _fail(
                op,
                f"bias must broadcast to [B, H, Lq, Lk] = {expected} (each dim full or 1), "
                f"got {tuple(bias.shape)}",
            )
    check_same_device(op, [("q", q), ("k", k), ("v", v), ("indices", indices), ("bias", bias)])
    if check_index_range and indices.numel() and indices.device.type != "meta":
        low, high = int(indices.min()), int(indices.max())
        if low < -1 or high >= lk:
            _fail(
                op,
                f"indices must lie in [-1, Lk) = [-1, {lk}) (-1 = empty slot), "
                f"found values in [{low}, {high}]",
            )
