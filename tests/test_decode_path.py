"""The lean decode path (kernels/decode.py) equals the ops it stands in for:
``dsa::indexer_topk`` (exact selection) followed by ``dsa::sparse_attention``."""

from __future__ import annotations

import pytest
import torch

from dsa_compile.kernels import decode
from dsa_compile.kernels.attention import dsa_attention
from dsa_compile.kernels.ops import indexer_topk, sparse_attention


def _inputs(batch=2, heads=8, kv_heads=2, lq=1, lk=300, dim=16, index_heads=3, index_dim=8,
            seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(q=randn(batch, heads, lq, dim), k=randn(batch, kv_heads, lk, dim),
                v=randn(batch, kv_heads, lk, dim + 4), q_idx=randn(batch, lq, index_heads, index_dim),
                k_idx=randn(batch, lk, index_dim), weights=randn(batch, lq, index_heads).abs())


def _through_ops(x, visible, topk, scale):
    indices = indexer_topk(x["q_idx"], x["k_idx"], x["weights"], min(topk, x["k"].shape[2]),
                           False, 0, visible)
    out, _ = sparse_attention(x["q"], x["k"], x["v"], indices, scale)
    return out


@pytest.mark.parametrize("lq", [1, 5])
@pytest.mark.parametrize("topk", [16, 300, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_ops(lq, topk, masked):
    x = _inputs(lq=lq, seed=lq + topk)
    visible = None
    if masked:  # padding on the left of row 0, a static cache's empty slots on the right
        visible = torch.ones(2, 300, dtype=torch.bool)
        visible[0, :40] = False
        visible[:, 260:] = False
    got = decode.decode_attention(**x, visible=visible, topk=topk, scale=0.3)
    torch.testing.assert_close(got, _through_ops(x, visible, topk, 0.3), rtol=1e-5, atol=1e-5)


def test_score_ties_at_the_kth_place_follow_the_ops_rule():
    """ReLU zeros tie: half the keys score exactly 0, the k-th place falls among them."""
    x = _inputs(lk=64, seed=3)
    x["q_idx"] = x["q_idx"].abs()
    x["k_idx"] = x["k_idx"].abs()
    x["k_idx"][:, 1::2] *= -1  # every odd key scores relu(negative) = 0
    got = decode.decode_attention(**x, visible=None, topk=40, scale=None)
    torch.testing.assert_close(got, _through_ops(x, None, 40, None), rtol=1e-5, atol=1e-5)


def test_queries_laid_out_as_hf_attention_gives_them():
    """q as transformers makes it: ``[B, L, H, D]`` transposed to ``[B, H, L, D]`` (not
    contiguous), several queries (assisted decoding)."""
    x = _inputs(lq=5, seed=11)
    x["q"] = x["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not x["q"].is_contiguous()
    got = decode.decode_attention(**x, visible=None, topk=16, scale=None)
    torch.testing.assert_close(got, _through_ops(x, None, 16, None), rtol=1e-5, atol=1e-5)


def test_a_query_that_sees_no_key_gets_zeros_like_the_ops():
    x = _inputs(lq=2, lk=50)
    visible = torch.ones(2, 50, dtype=torch.bool)
    visible[1] = False
    got = decode.decode_attention(**x, visible=visible, topk=8, scale=None)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got, _through_ops(x, visible, 8, None), rtol=1e-5, atol=1e-5)


def test_bfloat16_stays_close_to_the_ops():
    x = _inputs(seed=5, dtype=torch.bfloat16)
    got = decode.decode_attention(**x, visible=None, topk=32, scale=None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _through_ops(x, None, 32, None), rtol=2e-2, atol=2e-2)


def _site(lq, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, lq, 16, generator=g), torch.randn(1, 2, 500, 16, generator=g),
               torch.randn(1, 2, 500, 16, generator=g))
    indexer = (torch.randn(64, 2 * 8, generator=g), torch.randn(32, 8, generator=g),
               torch.rand(2, generator=g))
    return q, k, v, indexer


def _dsa(q, k, v, indexer, mask=None, causal=False, query_block=None):
    return dsa_attention(q, k, v, mask, *indexer, is_causal=causal, scale=None, enable_gqa=True,
                         topk=32, dense_up_to=32, query_block=query_block, key_block=None,
                         candidate_blocks=0)


@pytest.mark.parametrize("case", ["decode", "keys-only mask", "causal", "many queries",
                                  "tiles", "4-D mask", "grad"])
def test_dsa_attention_takes_the_decode_path_only_where_it_applies(case, monkeypatch):
    calls = []
    original = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **kw: calls.append(1) or
                        original(*a, **kw))
    q, k, v, indexer = _site(9 if case == "many queries" else 3)
    mask = None
    if case == "keys-only mask":
        mask = torch.ones(1, 1, 1, 500, dtype=torch.bool)
        mask[..., 480:] = False
    if case == "4-D mask":  # differs per query: the general path
        mask = torch.rand(1, 1, q.shape[2], 500, generator=torch.Generator().manual_seed(1)) > 0.3
    if case == "grad":
        q.requires_grad_(True)
    out = _dsa(q, k, v, indexer, mask, causal=case == "causal",
               query_block=4 if case == "tiles" else None)
    assert len(calls) == (case in ("decode", "keys-only mask"))
    if calls:  # and it equals the general path, forced by a tracked gradient
        again = _dsa(q.clone().requires_grad_(True), k, v, indexer, mask)
        assert len(calls) == 1
        torch.testing.assert_close(out, again.detach(), rtol=1e-5, atol=1e-5)
    if case == "grad":
        out.sum().backward()
        assert q.grad is not None and q.grad.abs().sum() > 0


def test_the_tie_rule_compiles_without_a_data_dependent_branch():
    from dsa_compile.kernels.topk import topk_lowest_ties

    scores = torch.tensor([[3.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    compiled = torch.compile(topk_lowest_ties, backend="eager", fullgraph=True)
    for k in (2, 4, 5, 7):
        values, picked = compiled(scores, k)
        expected_values, expected_picked = topk_lowest_ties(scores, k)
        assert torch.equal(values, expected_values)
        assert [set(r) for r in picked.tolist()] == [set(r) for r in expected_picked.tolist()]
    assert set(compiled(scores, 4)[1][0].tolist()) == {0, 3, 6, 1}  # the lowest of the zeros
