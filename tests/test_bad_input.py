"""Bad input raises DSAInputError naming the argument, never a crash inside a kernel."""

from __future__ import annotations

import pytest
import torch

from dsa_compile import DSAInputError, indexer_scores, indexer_topk, sparse_attention

from conftest import make_attention_inputs, make_indexer_inputs

Q_IDX, K_IDX, W = make_indexer_inputs(2, 6, 8)
Q, K, V = make_attention_inputs(2, 4, 2, 6, 8)
IDX = torch.zeros(2, 6, 3, dtype=torch.int32)


def topk(**kw):
    args = dict(q_idx=Q_IDX, k_idx=K_IDX, weights=W, topk=3)
    args.update(kw)
    return lambda: indexer_topk(**args)


def attn(**kw):
    args = dict(q=Q, k=K, v=V, indices=IDX)
    args.update(kw)
    return lambda: sparse_attention(**args)


BAD = {
    "q_idx rank": (topk(q_idx=Q_IDX[0]), "q_idx must have rank 4"),
    "k_idx dim": (topk(k_idx=torch.randn(2, 8, 5)), "k_idx.shape[2]"),
    "weights heads": (topk(weights=torch.randn(2, 6, 3)), "weights.shape[2]"),
    "weights batch": (topk(weights=torch.randn(1, 6, 4)), "weights.shape[0]"),
    "topk zero": (topk(topk=0), "topk must be >= 1"),
    "query_block zero": (topk(query_block=0), "query_block must be >= 1"),
    "negative q_offset": (topk(q_offset=-1), "q_offset must be >= 0"),
    "int q_idx": (topk(q_idx=Q_IDX.long()), "q_idx must be float32"),
    "key_mask dtype": (topk(key_mask=torch.ones(2, 8)), "key_mask must be bool"),
    "key_mask shape": (topk(key_mask=torch.ones(2, 7, dtype=torch.bool)), "key_mask must have shape"),
    "candidates without blocks": (topk(candidate_blocks=2), "candidate_blocks is only meaningful"),
    "scores shape": (lambda: indexer_scores(Q_IDX, K_IDX[:1], W), "k_idx.shape[0]"),
    "q rank": (attn(q=Q[0]), "q must have rank 4"),
    "heads not multiple": (attn(q=torch.randn(2, 3, 6, 16)), "multiple of the kv heads"),
    "head dim": (attn(k=torch.randn(2, 2, 8, 8)), "k.shape[3]"),
    "v keys": (attn(v=torch.randn(2, 2, 7, 16)), "v.shape[2]"),
    "dtype mix": (attn(k=K.double()), "k must be float32"),
    "dtype mismatch": (attn(k=K.half(), v=V.half()), "must share a dtype"),
    "float indices": (attn(indices=IDX.float()), "indices must be int32 or int64"),
    "index too large": (attn(indices=torch.full((2, 6, 3), 8, dtype=torch.int32)), "[-1, 8)"),
    "index below -1": (attn(indices=torch.full((2, 6, 3), -2, dtype=torch.int32)), "[-1, 8)"),
    "index rows": (attn(indices=IDX[:, :5]), "indices.shape[1]"),
    "index rows with tiles": (lambda: sparse_attention(Q, K, V, IDX, query_block=4), "ceil(6/4)"),
    "bias shape": (attn(bias=torch.randn(2, 4, 6, 7)), "bias must broadcast"),
    "bias rank": (attn(bias=torch.randn(6, 8)), "bias must broadcast"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_problem(case):
    fn, message = BAD[case]
    with pytest.raises(DSAInputError) as err:
        fn()
    assert message in str(err.value), str(err.value)


def test_devices_must_match():
    meta_k = K.to("meta")
    with pytest.raises(DSAInputError, match="k is on meta but q is on cpu"):
        sparse_attention(Q, meta_k, V, IDX)


def test_bad_input_fails_at_trace_time_under_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(q, k, v, idx):
        return sparse_attention(q, k, v, idx)[0]

    with pytest.raises(Exception, match="multiple of the kv heads"):
        f(torch.randn(2, 3, 6, 16), K, V, IDX)
