"""sparse_attention against SDPA (full selection) and the masked dense reference (subsets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsa_compile import indexer_topk, sparse_attention
from dsa_compile.kernels.reference import sparse_attention_reference

from conftest import make_attention_inputs, random_indices


def full_selection(batch: int, lq: int, lk: int, causal: bool, q_offset: int = 0) -> torch.Tensor:
    """Every visible key of every query, as an index tensor (what top-k with k >= Lk returns)."""
    q_idx = torch.ones(batch, lq, 1, 1)
    k_idx = torch.ones(batch, lk, 1)
    return indexer_topk(q_idx, k_idx, torch.ones(batch, lq, 1), lk, causal=causal,
                        q_offset=q_offset)


def sdpa(q, k, v, scale, causal, q_offset=0, bias=None):
    lq, lk = q.shape[2], k.shape[2]
    mask = bias
    if causal:
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + q_offset
        causal_bias = torch.zeros(lq, lk).masked_fill(~visible, float("-inf"))
        mask = causal_bias if mask is None else mask + causal_bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "lq", "lk", "causal", "q_offset"),
    [
        (4, 4, 37, 37, True, 0),  # causal prefill, MHA
        (4, 4, 37, 53, False, 0),  # cross / bidirectional
        (8, 2, 41, 41, True, 0),  # GQA 4:1
        (8, 1, 29, 29, True, 0),  # MQA
        (4, 2, 5, 70, True, 65),  # decode-style: 5 new queries at the end of a 70-key cache
        (4, 4, 1, 33, True, 32),  # a single decode step
    ],
)
def test_full_selection_equals_sdpa(heads, kv_heads, lq, lk, causal, q_offset):
    q, k, v = make_attention_inputs(2, heads, kv_heads, lq, lk, dim=16)
    indices = full_selection(2, lq, lk, causal, q_offset)
    out, lse = sparse_attention(q, k, v, indices, 0.3)
    expected = sdpa(q, k, v, 0.3, causal, q_offset)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("bias_shape", [(2, 4, 23, 31), (1, 1, 23, 31), (2, 1, 1, 31), (1, 4, 1, 1)])
def test_full_selection_with_bias_equals_sdpa(bias_shape):
    q, k, v = make_attention_inputs(2, 4, 2, 23, 31)
    bias = torch.randn(bias_shape)
    out, _ = sparse_attention(q, k, v, full_selection(2, 23, 31, False), None, bias)
    torch.testing.assert_close(out, sdpa(q, k, v, None, False, bias=bias), atol=2e-5, rtol=1e-5)


def test_causal_flag_with_full_rows_equals_sdpa():
    """Rows listing all keys + causal=True applies causality inside the op."""
    q, k, v = make_attention_inputs(1, 4, 4, 19, 19)
    everything = torch.arange(19, dtype=torch.int32).expand(1, 19, 19).contiguous()
    out, _ = sparse_attention(q, k, v, everything, None, causal=True)
    torch.testing.assert_close(out, sdpa(q, k, v, None, True), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("query_block", [1, 3, 8])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dim_v", [8, 12])  # equal head dims take the fused CPU kernel
def test_random_subsets_equal_masked_dense(query_block, heads, kv_heads, causal, with_bias, dim_v):
    lq, lk, topk = 45, 61, 12
    q, k, v = make_attention_inputs(2, heads, kv_heads, lq, lk, dim=8, dim_v=dim_v)
    rows = -(-lq // query_block)
    indices = random_indices(2, rows, lk, topk)
    bias = torch.randn(2, 1, lq, lk) if with_bias else None
    got = sparse_attention(q, k, v, indices, 0.5, bias, causal, 3, query_block)
    want = sparse_attention_reference(q, k, v, indices, 0.5, bias, causal, 3, query_block)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_offset", [0, 20])
def test_tile_rows_with_causal_tail_equal_masked_dense(q_offset):
    """Tile-shared rows that reach past their first query: unmasked head + masked tail, merged."""
    q, k, v = make_attention_inputs(1, 4, 2, 40, 60)
    rows = torch.stack([torch.randperm(min(60, q_offset + 8 * r + 16))[:16] for r in range(5)])[None]
    got = sparse_attention(q, k, v, rows.to(torch.int32), None, None, True, q_offset, 8)
    want = sparse_attention_reference(q, k, v, rows, 0.25, None, True, q_offset, 8)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_duplicate_indices_count_once():
    q, k, v = make_attention_inputs(1, 2, 2, 3, 10)
    dup = torch.tensor([[[1, 1, 4, -1], [2, 2, 2, 2], [0, 9, 9, 0]]], dtype=torch.int32)
    dedup = torch.tensor([[[1, 4, -1, -1], [2, -1, -1, -1], [0, 9, -1, -1]]], dtype=torch.int32)
    torch.testing.assert_close(sparse_attention(q, k, v, dup)[0], sparse_attention(q, k, v, dedup)[0])


def test_empty_rows_give_zeros_and_neg_inf_lse():
    q, k, v = make_attention_inputs(1, 4, 2, 4, 9)
    indices = torch.tensor([[[3, 5], [-1, -1], [8, -1], [-1, -1]]], dtype=torch.int32)
    out, lse = sparse_attention(q, k, v, indices)
    assert (out[:, :, [1, 3]] == 0).all()
    assert torch.isneginf(lse[:, :, [1, 3]]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, [0, 2]]).all()
    # Causality can empty a row too: key 8 is in the future of query 2 at q_offset 0.
    out, lse = sparse_attention(q, k, v, torch.tensor([[[0, 1], [0, 1], [8, -1], [0, -1]]],
                                                      dtype=torch.int32), causal=True)
    assert torch.isneginf(lse[:, :, 2]).all() and (out[:, :, 2] == 0).all()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = make_attention_inputs(2, 8, 2, 33, 47, dtype=dtype)
    indices = random_indices(2, 33, 47, 16)
    out, lse = sparse_attention(q, k, v, indices, None, None, True, 14)
    ref, ref_lse = sparse_attention_reference(q.float(), k.float(), v.float(), indices, 0.25, None,
                                              True, 14)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_large_chunks_split_into_many(monkeypatch):
    """A tiny chunk budget forces many chunks: results must not depend on chunking."""
    from dsa_compile.kernels import chunking

    q, k, v = make_attention_inputs(1, 4, 2, 50, 64)
    indices = random_indices(1, 50, 64, 20)
    want = sparse_attention(q, k, v, indices, None, None, True)
    monkeypatch.setattr(chunking, "CHUNK_BUDGET", 64)
    got = sparse_attention(q, k, v, indices, None, None, True)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_rewritten_sites_promise_unique_rows_and_user_rows_do_not():
    """dsa_attention hands the indexer's own top-k rows to dsa::sparse_attention with
    unique_indices=True (the CUDA path then skips its sort); the op's default keeps set
    semantics for rows a user passes."""
    from models import DispatchLog

    from dsa_compile.kernels.attention import dsa_attention
    from dsa_compile.passes.indexer_init import initial_indexer

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 40, 16, generator=gen) for _ in range(3))
    init = initial_indexer(4, 4, 16, 2, 8, None, None)
    with DispatchLog() as log:
        dsa_attention(q, k, v, None, init.q_proj, init.k_proj, init.head_weights, is_causal=True,
                      scale=None, enable_gqa=False, topk=8, dense_up_to=0, query_block=4,
                      key_block=0, candidate_blocks=0)
        torch.ops.dsa.sparse_attention(q, k, v, torch.zeros(1, 40, 3, dtype=torch.int32))
    promises = [bool(kwargs.get("unique_indices", args[9] if len(args) > 9 else False))
                for func, args, kwargs in log.calls if func is torch.ops.dsa.sparse_attention.default]
    assert promises == [True, False]
