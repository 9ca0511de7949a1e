from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (on CPU tensors). Set before any
# test imports dsa_compile: the kernels are wrapped for the interpreter when they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_indexer_inputs(batch: int, lq: int, lk: int, heads: int = 4, dim: int = 8,
                        dtype: torch.dtype = torch.float32):
    """Random lightning-indexer inputs: q_idx [B, Lq, HI, DI], k_idx [B, Lk, DI], w [B, Lq, HI]."""
    q_idx = torch.randn(batch, lq, heads, dim, dtype=dtype)
    k_idx = torch.randn(batch, lk, dim, dtype=dtype)
    weights = torch.randn(batch, lq, heads, dtype=dtype)
    return q_idx, k_idx, weights


def make_attention_inputs(batch: int, heads: int, kv_heads: int, lq: int, lk: int, dim: int = 16,
                          dim_v: int | None = None, dtype: torch.dtype = torch.float32):
    """Random q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]."""
    q = torch.randn(batch, heads, lq, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, lk, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, lk, dim_v or dim, dtype=dtype)
    return q, k, v


def random_indices(batch: int, rows: int, lk: int, topk: int, pad_fraction: float = 0.3,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Distinct random key positions per row (int32 [B, rows, topk]), some slots -1."""
    idx = torch.stack([
        torch.stack([torch.randperm(lk, generator=generator)[:topk] for _ in range(rows)])
        for _ in range(batch)
    ])
    if idx.shape[-1] < topk:
        idx = torch.cat([idx, idx.new_full((batch, rows, topk - idx.shape[-1]), -1)], dim=-1)
    pad = torch.rand(idx.shape, generator=generator) < pad_fraction
    return idx.masked_fill(pad, -1).to(torch.int32)
