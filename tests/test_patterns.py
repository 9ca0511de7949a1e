"""The pattern catalog on plain PyTorch modules written in each spelling.

Each case: the site is found with the expected pattern; rewritable ones are exact when every
key is selected and run the sparse ops when not; the others stay dense and say why.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import OpCounter
from torch import nn

import dsa_compile

B, H, HKV, L, D = 2, 4, 2, 24, 8


class Attention(nn.Module):
    """Projections + a spelling of attention (``fn(q, k, v, mask)``), like a model would have."""

    def __init__(self, fn, kv_heads: int = H, layout: int = 4):
        super().__init__()
        self.fn, self.kv_heads, self.layout = fn, kv_heads, layout
        self.q_proj = nn.Linear(H * D, H * D)
        self.k_proj = nn.Linear(H * D, kv_heads * D)
        self.v_proj = nn.Linear(H * D, kv_heads * D)

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, H, D).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, D).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, D).transpose(1, 2)
        if self.layout == 3:
            q, k, v = (t.reshape(-1, n, D) for t in (q, k, v))
        out = self.fn(q, k, v, mask)
        return out.reshape(b, -1, n, D)


def repeat_kv(x, n_rep):
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def causal_bool(n):
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


SPELLINGS = {
    # name: (fn, kv_heads, layout, pattern, rewritable, reason fragment)
    "sdpa_causal": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    H, 4, "sdpa", True, ""),
    "sdpa_bool_mask": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_bool(q.shape[2])), H, 4, "sdpa", True, ""),
    "sdpa_additive_scale": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.zeros(q.shape[2], q.shape[2]).masked_fill(
            ~causal_bool(q.shape[2]), float("-inf")), scale=0.3), H, 4, "sdpa", True, ""),
    "sdpa_gqa": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   enable_gqa=True),
                 HKV, 4, "sdpa", True, ""),
    "sdpa_train_dropout": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
                           H, 4, "sdpa", False, "dropout_p=0.1"),
    "matmul_div_sqrt": (lambda q, k, v, m: torch.matmul(
        torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D), dim=-1), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "operator_at_prescaled_q": (lambda q, k, v, m: (
        (q * D**-0.5) @ k.transpose(2, 3)).softmax(-1) @ v, H, 4, "matmul_softmax_matmul", True, ""),
    "bmm_rank3": (lambda q, k, v, m: torch.bmm(
        F.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1), v),
        H, 3, "matmul_softmax_matmul", True, ""),
    "baddbmm_mask": (lambda q, k, v, m: torch.bmm(F.softmax(torch.baddbmm(
        torch.zeros(q.shape[1], q.shape[1]).masked_fill(~causal_bool(q.shape[1]), -1e9),
        q, k.transpose(1, 2), alpha=0.3), dim=-1), v), H, 3, "matmul_softmax_matmul", True, ""),
    "einsum": (lambda q, k, v, m: torch.einsum(
        "bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.3).softmax(-1), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "masked_fill_tril": (lambda q, k, v, m: torch.matmul(torch.softmax(
        torch.matmul(q, k.transpose(-1, -2)).mul(0.3).masked_fill(
            torch.tril(torch.ones(q.shape[2], q.shape[2])) == 0, float("-inf")), -1), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "where_arange_finfo_min": (lambda q, k, v, m: torch.matmul(torch.softmax(torch.where(
        torch.arange(q.shape[2])[:, None] >= torch.arange(q.shape[2])[None, :],
        torch.matmul(q, k.transpose(-1, -2)) * 0.3, torch.finfo(torch.float32).min), -1), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "additive_mask_float32_softmax": (lambda q, k, v, m: torch.matmul(F.softmax(
        torch.matmul(q, k.transpose(2, 3)) * 0.3 + m, dim=-1, dtype=torch.float32).to(q.dtype),
        v), H, 4, "matmul_softmax_matmul", True, ""),
    "repeat_kv_gqa": (lambda q, k, v, m: torch.matmul(torch.softmax(
        torch.matmul(q, repeat_kv(k, H // HKV).transpose(2, 3)) * 0.3, -1), repeat_kv(v, H // HKV)),
        HKV, 4, "matmul_softmax_matmul", True, ""),
    "repeat_interleave_gqa": (lambda q, k, v, m: torch.matmul(torch.softmax(
        q @ k.repeat_interleave(H // HKV, dim=1).transpose(-2, -1) * 0.3, -1),
        v.repeat_interleave(H // HKV, dim=1)), HKV, 4, "matmul_softmax_matmul", True, ""),
    "eval_dropout": (lambda q, k, v, m: torch.matmul(F.dropout(torch.softmax(
        q @ k.transpose(-2, -1) * 0.3, -1), p=0.1, training=False), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "distilbert_full_fill": (lambda q, k, v, m: torch.softmax(  # Inductor's _sfdp_pattern_15
        (q @ k.transpose(-2, -1)).div(math.sqrt(D)).masked_fill(
            ((torch.arange(q.shape[2]) < q.shape[2] - 3).float() == 0).view(1, 1, 1, q.shape[2])
            .expand(q.shape[0], H, q.shape[2], q.shape[2]),
            torch.full((), -float("inf"), dtype=q.dtype)), dim=-1) @ v,
        H, 4, "matmul_softmax_matmul", True, ""),
    "gpt2_full_scale_where": (lambda q, k, v, m: torch.matmul(torch.softmax(torch.where(  # _18
        causal_bool(q.shape[2]), torch.matmul(q, k.permute(0, 1, 3, 2))
        / torch.full([], D**0.5, dtype=q.dtype),
        torch.full([], torch.finfo(q.dtype).min, dtype=q.dtype)), dim=-1), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "tensor_scale_at_run_time": (lambda q, k, v, m: torch.matmul(torch.softmax(
        q @ k.transpose(-2, -1) * torch.ones(()).mul(0.3), -1), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "tensor_scale_div_with_mask_after": (lambda q, k, v, m: torch.matmul(torch.softmax(
        (q @ k.transpose(-2, -1) + m).div(torch.ones(()).add(1.5)), -1), v),
        H, 4, "matmul_softmax_matmul", True, ""),
    "softcap_tanh": (lambda q, k, v, m: torch.matmul(torch.softmax(
        torch.tanh(q @ k.transpose(-2, -1) / 50.0) * 50.0, -1), v),
        H, 4, "matmul_softmax_matmul", False, "soft-capping"),
    "train_dropout": (lambda q, k, v, m: torch.matmul(F.dropout(torch.softmax(
        q @ k.transpose(-2, -1), -1), p=0.1, training=True), v), H, 4, None, None, None),
}


def additive_causal(n):
    return torch.zeros(n, n).masked_fill(~causal_bool(n), torch.finfo(torch.float32).min)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling(name):
    fn, kv_heads, layout, pattern, rewritable, reason = SPELLINGS[name]
    torch.manual_seed(0)
    module = Attention(fn, kv_heads, layout).eval()
    x, mask = torch.randn(B, L, H * D), additive_causal(L)
    report = dsa_compile.explain(module, x, mask, topk=8)
    if pattern is None:  # training-mode dropout on the probabilities: not an attention we touch
        assert report.rewritten == []
        return
    assert len(report.sites) == 1, report.table()
    site = report.sites[0]
    assert site["pattern"] == pattern
    assert site["rewritten"] is rewritable, site
    if not rewritable:
        assert reason in site["reason"]
        return
    with torch.no_grad():
        reference = module(x, mask)
        torch.compiler.reset()
        exact = torch.compile(module, backend="dsa", options={"topk": L, "mode": "eager"})
        torch.testing.assert_close(exact(x, mask), reference, atol=1e-5, rtol=1e-5)
        torch.compiler.reset()
        # every key through the sparse ops (min_seq_len=0): the rewrite itself is exact
        forced = torch.compile(module, backend="dsa", options={
            "topk": L, "min_seq_len": 0, "mode": "eager", "query_block": 1, "key_block": 0})
        with OpCounter() as counter:
            torch.testing.assert_close(forced(x, mask), reference, atol=1e-5, rtol=1e-5)
        assert counter.counts.get("dsa.sparse_attention") == 1
        torch.compiler.reset()
        sparse = torch.compile(module, backend="dsa",
                               options={"topk": 8, "mode": "eager", "query_block": 1,
                                        "key_block": 0})
        with OpCounter() as counter:
            out = sparse(x, mask)
    assert counter.counts.get("dsa.sparse_attention") == 1
    assert torch.isfinite(out).all()


def test_probabilities_used_elsewhere_stay_dense():
    class ReturnsProbs(nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(q @ k.transpose(-2, -1), -1)
            return p @ v, p

    q = torch.randn(1, 2, 6, 4)
    report = dsa_compile.explain(ReturnsProbs(), q, q, q, topk=2)
    assert report.sites[0]["rewritten"] is False
    assert "used elsewhere" in report.sites[0]["reason"]


def test_softmax_over_another_dim_is_not_rewritten():
    class WrongDim(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v

    q = torch.randn(1, 2, 6, 4)
    report = dsa_compile.explain(WrongDim(), q, q, q, topk=2)
    assert report.rewritten == []
    assert "last (key) dim" in report.sites[0]["reason"]


def test_an_added_matmul_of_another_length_keeps_the_site_dense():
    """Scores plus a relative-position term from another matmul: whichever operand the walk
    takes as q @ k^T, a rewrite that cannot pair k with v must not happen (nor crash)."""

    class RelativeScores(nn.Module):
        def forward(self, q, k, v, rel):
            scores = (q @ rel.transpose(-2, -1))[..., : k.shape[2]] + q @ k.transpose(-2, -1)
            return torch.softmax(scores, -1) @ v

    q, rel = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    module = RelativeScores()
    report = dsa_compile.explain(module, q, q, q, rel, topk=2)
    assert len(report.sites) == 1
    torch.compiler.reset()
    compiled = torch.compile(module, backend="dsa", options={"topk": 2, "mode": "eager"})
    if report.sites[0]["rewritten"]:  # the chain took q @ k^T as the scores: still exact
        reference = module(q, q, q, rel)
        full = torch.compile(module, backend="dsa", options={"topk": 6, "mode": "eager"})
        torch.testing.assert_close(full(q, q, q, rel), reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(compiled(q, q, q, rel)).all()


def test_masks_on_both_sides_of_a_batch_view_are_rewritten():
    """MBart adds its mask in a [B, H] view of [B*H] scores (Inductor's pattern 24); a second
    mask added back in the [B*H] view is split into the [B, H] view too: exact."""

    class TwoViews(nn.Module):
        def forward(self, q, k, v, mask4, mask3):
            scores = torch.bmm(q, k.transpose(1, 2))
            scores = scores.view(2, 3, 6, 6) + mask4
            scores = scores.view(6, 6, 6) + mask3
            return torch.bmm(torch.softmax(scores, -1), v)

    q, k, v = (torch.randn(6, 6, 4) for _ in range(3))
    masks = torch.randn(2, 1, 6, 6), torch.randn(6, 6, 6)
    report = dsa_compile.explain(TwoViews(), q, k, v, *masks, topk=2)
    assert report.sites[0]["rewritten"] is True, report.sites[0]
    forced = torch.compile(TwoViews(), backend="dsa", options={
        "topk": 6, "min_seq_len": 0, "mode": "eager", "query_block": 1, "key_block": 0})
    torch.testing.assert_close(forced(q, k, v, *masks), TwoViews()(q, k, v, *masks), atol=1e-5,
                               rtol=1e-5)


def test_sdpa_on_repeated_kv_attends_to_the_kv_heads():
    """HF's repeat_kv before SDPA (when it cannot pass enable_gqa): the site uses the kv heads
    with enable_gqa (no H/Hkv-fold K/V copies in the sparse path), and stays exact."""
    def fn(q, k, v, m):
        repeats = H // HKV
        return F.scaled_dot_product_attention(q, repeat_kv(k, repeats), repeat_kv(v, repeats),
                                              attn_mask=causal_bool(q.shape[2]))

    module = Attention(fn, HKV).eval()
    x = torch.randn(B, L, H * D)
    site = dsa_compile.explain(module, x, topk=8).sites[0]
    assert site["rewritten"] and site["gqa"] is True and site["k"][1] == HKV, site
    torch.compiler.reset()
    exact = torch.compile(module, backend="dsa", options={"topk": L, "min_seq_len": 0,
                                                          "mode": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(exact(x), module(x), atol=1e-5, rtol=1e-5)
