"""The two DSA ops by hand: a lightning indexer picks top-k keys, sparse attention uses them.

    python examples/ops_quickstart.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsa_compile import indexer_topk, sparse_attention


def main(length: int = 1024, topk: int = 256) -> dict[str, float]:
    torch.manual_seed(0)
    batch, heads, kv_heads, dim = 1, 8, 2, 64  # GQA: 4 query heads per kv head
    q = torch.randn(batch, heads, length, dim)
    k = torch.randn(batch, kv_heads, length, dim)
    v = torch.randn(batch, kv_heads, length, dim)
    # Indexer projections (in a model these come from small linear layers on the hidden states).
    q_idx = torch.randn(batch, length, 4, 32)  # [B, Lq, HI, DI]
    k_idx = torch.randn(batch, length, 32)  # [B, Lk, DI]
    weights = torch.rand(batch, length, 4)  # [B, Lq, HI]

    # 1. Exact per-query selection: int32 [B, Lq, topk], -1 where fewer keys are visible.
    indices = indexer_topk(q_idx, k_idx, weights, topk, causal=True)
    out, lse = sparse_attention(q, k, v, indices, causal=True)  # out [B, H, Lq, D], lse [B, H, Lq]

    # 2. The fast CPU granularity: 64 queries share a row; key blocks of 64 are scored first.
    rows = indexer_topk(q_idx, k_idx, weights, topk, causal=True, query_block=64, key_block=64)
    fast, _ = sparse_attention(q, k, v, rows, causal=True, query_block=64)

    # 3. With topk >= L every visible key is selected and the result is dense attention.
    everything = indexer_topk(q_idx, k_idx, weights, length, causal=True)
    exact, _ = sparse_attention(q, k, v, everything, causal=True)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    report = {
        "selected_per_query_mean": float((indices >= 0).sum(-1).float().mean()),
        "rows_tile_shared": rows.shape[1],
        "max_abs_err_full_selection_vs_sdpa": float((exact - dense).abs().max()),
        "rel_diff_sparse_vs_dense": float((out - dense).norm() / dense.norm()),
        "rel_diff_tile_vs_dense": float((fast - dense).norm() / dense.norm()),
        "lse_finite": bool(torch.isfinite(lse).all()),
    }
    for name, value in report.items():
        print(f"{name:>36}: {value}")
    return report


if __name__ == "__main__":
    main()
