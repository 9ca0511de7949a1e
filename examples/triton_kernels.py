"""The Triton kernels of the dsa ops, called directly: a DSA layer (indexer top-k + sparse
attention) checked against the reference, and timed against SDPA on a GPU.

    python examples/triton_kernels.py                      # on a CUDA machine
    TRITON_INTERPRET=1 python examples/triton_kernels.py   # anywhere (Triton's interpreter, slow)

On a GPU it uses Llama-8B-like shapes at 16K tokens; in the interpreter, tiny ones.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dsa_compile.kernels import triton_indexer, triton_sparse_attention
from dsa_compile.kernels.reference import sparse_attention_reference


def main(length: int | None = None, topk: int | None = None) -> dict:
    gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    length = length or (16384 if gpu else 48)
    topk = topk or (2048 if gpu else 16)
    heads, kv_heads, dim, index_heads, index_dim, query_block = 32, 8, 128, 8, 64, 64
    if not gpu:
        heads, kv_heads, dim, index_heads, index_dim, query_block = 4, 2, 16, 2, 16, 4
    torch.manual_seed(0)
    q = torch.randn(1, heads, length, dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, length, dim, device=device, dtype=dtype)
    q_idx = torch.randn(1, length, index_heads, index_dim, device=device, dtype=dtype)
    k_idx = torch.randn(1, length, index_dim, device=device, dtype=dtype)
    weights = torch.rand(1, length, index_heads, device=device)

    def layer():
        indices = triton_indexer.indexer_topk_cuda(q_idx, k_idx, weights, topk, True, 0, None,
                                                   query_block)
        return triton_sparse_attention.sparse_attention_fwd(q, k, v, indices, dim ** -0.5, None,
                                                            True, 0, query_block)

    out, lse = layer()
    indices = triton_indexer.indexer_topk_cuda(q_idx, k_idx, weights, topk, True, 0, None,
                                               query_block)
    result = {"device": device, "tokens": length, "topk": topk, "query_block": query_block}
    if length <= 4096:  # the dense reference needs [Lq, Lk] memory
        ref, _ = sparse_attention_reference(q.float(), k.float(), v.float(), indices, dim ** -0.5,
                                            None, True, 0, query_block)
        result["rel_err_vs_reference"] = float((out.float() - ref).norm() / ref.norm())
    if gpu:
        import triton.testing

        group = heads // kv_heads
        k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        result["dsa_ms"] = triton.testing.do_bench(layer, return_mode="median")
        result["sdpa_ms"] = triton.testing.do_bench(
            lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True),
            return_mode="median")
        result["speedup"] = result["sdpa_ms"] / result["dsa_ms"]
    result["finite"] = bool(torch.isfinite(out).all() and not torch.isnan(lse).any())
    return result


if __name__ == "__main__":
    print(main())
