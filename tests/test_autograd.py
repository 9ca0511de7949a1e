"""Gradients of the ops against autograd through the dense references."""

from __future__ import annotations

import pytest
import torch

from dsa_compile import indexer_scores, sparse_attention
from dsa_compile.kernels.reference import indexer_scores_reference, sparse_attention_reference

from conftest import make_attention_inputs, make_indexer_inputs, random_indices


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize(("heads", "kv_heads", "query_block", "bias_shape"), [
    (4, 4, 1, None),
    (8, 2, 1, (2, 8, 21, 30)),
    (8, 1, 4, (1, 1, 21, 30)),
    (4, 2, 3, (2, 1, 1, 30)),
])
def test_sparse_attention_grads_match_masked_dense(heads, kv_heads, query_block, bias_shape):
    q, k, v = make_attention_inputs(2, heads, kv_heads, 21, 30, dim=8, dim_v=6)
    indices = random_indices(2, -(-21 // query_block), 30, 10)
    bias = torch.randn(bias_shape) if bias_shape else None
    grad_out = torch.randn(2, heads, 21, 6)
    grad_lse = torch.randn(2, heads, 21)

    def run(fn, tensors):
        qq, kk, vv, *bb = tensors
        out, lse = fn(qq, kk, vv, indices, 0.4, bb[0] if bb else None, True, 5, query_block)
        finite = torch.isfinite(lse)
        loss = (out * grad_out).sum() + (lse.where(finite, 0) * grad_lse).sum()
        return torch.autograd.grad(loss, tensors)

    inputs = [q, k, v] + ([bias] if bias is not None else [])
    got = run(sparse_attention, leaves(*inputs))
    want = run(sparse_attention_reference, leaves(*inputs))
    for name, g, w in zip(["dq", "dk", "dv", "dbias"], got, want, strict=False):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_sparse_attention_grads_pass_gradcheck_in_float64_reference_terms():
    """Finite differences on a tiny case (the op computes in fp32, so loose tolerances)."""
    q, k, v = make_attention_inputs(1, 2, 1, 3, 5, dim=4)
    indices = torch.tensor([[[0, 2, -1], [1, 3, 4], [4, -1, -1]]], dtype=torch.int32)
    q, k, v = leaves(q.double(), k.double(), v.double())

    def fn(q, k, v):
        return sparse_attention(q.float(), k.float(), v.float(), indices)[0].double()

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_indexer_scores_grads_match_reference():
    q_idx, k_idx, w = make_indexer_inputs(2, 13, 17)
    key_mask = torch.rand(2, 17) > 0.3
    grad = torch.randn(2, 13, 17)

    def run(fn, tensors):
        scores = fn(*tensors, True, 4, key_mask)
        return torch.autograd.grad((scores.where(torch.isfinite(scores), 0) * grad).sum(), tensors)

    got = run(indexer_scores, leaves(q_idx, k_idx, w))
    want = run(indexer_scores_reference, leaves(q_idx, k_idx, w))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
