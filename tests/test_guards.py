"""What the pass proves before a rewrite (passes/guards.py, the typed mask of passes/sites.py).

Each reproducer of issue 9 (A: in-place ops on the scores, B: lossy casts, C: large finite
masks, D: broadcasting and shared scores, E: fully masked rows and float position masks) is
either kept dense with a reason that names the problem, or rewritten exactly: with every key
forced through the sparse ops (``min_seq_len=0``, topk >= L) the output equals eager, NaN where
eager has NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import OpCounter
from torch import nn

import dsa_compile
from dsa_compile.kernels.attention import MASKED_BIAS_MARGIN, capture_selections
from dsa_compile.passes.guards import check_lossless_casts, mutated_inputs
from dsa_compile.passes.sites import KeepDense

B, H, L, D = 2, 2, 40, 8
FORCED = {"mode": "eager", "min_seq_len": 0, "topk": L, "query_block": 1, "key_block": 0}
MIN32 = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every case wraps its function in the same Fn.forward: start each below the recompile
    limit, or Dynamo would run later cases uncompiled."""
    torch._dynamo.reset()


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def qkv(lq: int = L, lk: int = L, batch: int = B):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, H, lq, D, generator=g), torch.randn(batch, H, lk, D, generator=g),
            torch.randn(batch, H, lk, D, generator=g))


def site_of(fn, *inputs, **options) -> dict:
    report = dsa_compile.explain(Fn(fn), *inputs, **{"topk": L, "min_seq_len": 0, **options})
    assert len(report.sites) == 1, report.sites
    return report.sites[0]


def compiled(fn, *inputs, **options):
    model = torch.compile(Fn(fn), backend="dsa", options={**FORCED, **options})
    with OpCounter() as counter:
        out = model(*inputs)
    return out, counter.counts.get("dsa.sparse_attention", 0)


def assert_exact(fn, *inputs, rewritten: bool, **options) -> None:
    """Compiled (every key through the sparse ops) equals eager; each run gets fresh inputs."""
    expected = fn(*(t.clone() for t in inputs))
    out, sparse_calls = compiled(fn, *(t.clone() for t in inputs), **options)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert (sparse_calls > 0) is rewritten


CAUSAL = torch.tril(torch.ones(L, L, dtype=torch.bool))


# A: in-place ops on the raw scores ------------------------------------------------------------
def masked_fill_inplace(q, k, v):
    s = q @ k.transpose(-1, -2)
    s.masked_fill_(~CAUSAL, float("-inf"))
    return s.softmax(-1) @ v


def mul_inplace(q, k, v):
    s = q @ k.transpose(-1, -2)
    s.mul_(0.3)
    return s.softmax(-1) @ v


def setitem(q, k, v):
    s = q @ k.transpose(-1, -2)
    s[..., :4] = float("-inf")
    return s.softmax(-1) @ v


def add_inplace_on_view(q, k, v):
    s = q @ k.transpose(-1, -2)
    s.view(-1)[:5].add_(3.0)
    return s.softmax(-1) @ v


def value_mutated_after_scores(q, k, v):
    s = (q @ k.transpose(-1, -2)).softmax(-1)
    q.mul_(2.0)  # the site would read the doubled q at p @ v
    return s @ v


def mask_mutated_after_use(q, k, v):
    mask = torch.zeros(L, L)
    s = q @ k.transpose(-1, -2) + mask
    mask.fill_(float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("fn, reason", [
    (masked_fill_inplace, "in place by masked_fill_"),
    (mul_inplace, "in place by mul_"),
    (setitem, "in place by setitem"),
    (add_inplace_on_view, "used elsewhere"),
    (value_mutated_after_scores, "mul_ changes"),
    (mask_mutated_after_use, "fill_ changes"),
])
def test_in_place_ops_keep_the_site_dense(fn, reason):
    q, k, v = qkv()
    site = site_of(fn, q.clone(), k, v)
    assert not site["rewritten"] and reason in site["reason"], site
    assert_exact(fn, q.clone(), k, v, rewritten=False)


def test_in_place_step_on_exclusive_scores_is_rewritten():
    def fill_then_softmax(q, k, v):
        s = (q @ k.transpose(-1, -2)).masked_fill_(~CAUSAL, float("-inf"))
        return s.softmax(-1) @ v

    assert_exact(fill_then_softmax, *qkv(), rewritten=True)


def test_mutated_inputs_finds_each_spelling():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")
    cases = [
        graph.call_method("add_", (x, 1)),
        graph.call_function(torch.relu_, (x,)),
        graph.call_function(__import__("operator").setitem, (x, 0, 1.0)),
        graph.call_function(__import__("operator").iadd, (x, y)),
        graph.call_function(torch.ops.aten.add_.Tensor, (x, y)),
        graph.call_function(torch.add, (y, y), {"out": x}),
    ]
    for node in cases:
        assert mutated_inputs(node) == [x], node.format_node()
    assert mutated_inputs(graph.call_function(torch.add, (x, y))) == []
    assert mutated_inputs(graph.call_method("__and__", (x, y))) == []


# B: casts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, rewritten, reason", [
    (lambda q, k, v: F.softmax((q @ k.mT).to(torch.int32).to(torch.float32), -1) @ v, False,
     "not float -> float"),
    (lambda q, k, v: F.softmax((q @ k.mT).to(torch.bfloat16).float(), -1) @ v, False,
     "loses precision"),
    (lambda q, k, v: F.softmax((q @ k.mT).half().float(), -1) @ v, False, "loses precision"),
    (lambda q, k, v: F.softmax((q @ k.mT).double().float(), -1) @ v, True, "rewritten"),
    (lambda q, k, v: F.softmax((q @ k.mT).float(), -1) @ v, True, "rewritten"),
])
def test_only_lossless_float_casts_are_transparent(fn, rewritten, reason):
    q, k, v = qkv()
    site = site_of(fn, q, k, v)
    assert site["rewritten"] is rewritten and reason in site["reason"], site
    assert_exact(fn, q, k, v, rewritten=rewritten)


def test_cast_table():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, dtype=torch.float16)
    cast = graph.call_method("float", (x,))
    cast.meta["val"] = torch.empty(2, dtype=torch.float32)
    check_lossless_casts([cast], torch.float32)
    check_lossless_casts([cast], torch.float16)
    with pytest.raises(KeepDense, match="loses precision"):
        check_lossless_casts([cast], torch.float64)


# C: large negative finite masks --------------------------------------------------------------
TRIL = torch.tril(torch.ones(L, L))


@pytest.mark.parametrize("fill_after_scale", [-1e4, -1e9, MIN32 / 8])
def test_finite_causal_masks_never_leak(fill_after_scale):
    def old_style(q, k, v):
        return F.softmax(q @ k.mT / math.sqrt(D) + (1.0 - TRIL) * fill_after_scale, -1) @ v

    q, k, v = qkv()
    assert_exact(old_style, q, k, v, rewritten=True)  # exact with every key selected
    topk = L // 4
    options = {**FORCED, "topk": topk}
    model = torch.compile(Fn(old_style), backend="dsa", options=options)
    with capture_selections() as selections:
        out = model(q, k, v)
    chosen = selections[0]  # [B, Lq, topk]
    future = chosen.long() > torch.arange(L)[None, :, None]
    assert not future.any(), "a masked future key was selected ahead of a visible one"
    later = [t.clone() for t in (q, k, v)]
    for t in later:
        t[:, :, L // 2:] = torch.randn_like(t[:, :, L // 2:])
    out_perturbed = torch.compile(Fn(old_style), backend="dsa", options=options)(*later)
    torch.testing.assert_close(out_perturbed[:, :, : L // 2], out[:, :, : L // 2], atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("query_block", [4, 8])
def test_tiles_never_attend_to_keys_a_finite_mask_removes(query_block):
    """A tile shares one selection, which may hold only keys one of its queries must not see
    (the tile's later keys). Values alone change here, so the selection is fixed: any change
    before p means some query weighted a key its -1e4 mask removes."""
    def old_style(q, k, v):
        return F.softmax(q @ k.mT / math.sqrt(D) + (1.0 - TRIL) * -1e4, -1) @ v

    q, k, v = qkv()
    model = torch.compile(Fn(old_style), backend="dsa",
                          options={**FORCED, "topk": 1, "query_block": query_block})
    out = model(q, k, v)
    for p in range(1, L):
        later = v.clone()
        later[:, :, p:] = -later[:, :, p:] + 1.0
        torch.testing.assert_close(model(q, k, later)[:, :, :p], out[:, :, :p], atol=1e-6,
                                   rtol=0)


def test_finfo_min_added_before_the_scale_is_masked_for_selection():
    def before_scale(q, k, v):
        return F.softmax((q @ k.mT + (1.0 - TRIL) * MIN32) / math.sqrt(D), -1) @ v

    q, k, v = qkv()
    assert_exact(before_scale, q, k, v, rewritten=True)
    model = torch.compile(Fn(before_scale), backend="dsa", options={**FORCED, "topk": 5})
    with capture_selections() as selections:
        model(q, k, v)
    assert not (selections[0].long() > torch.arange(L)[None, :, None]).any()


def test_real_valued_mask_before_a_scale_is_scaled():
    bias = torch.randn(L, L) * 3

    def mask_then_scale(q, k, v):
        return F.softmax((q @ k.mT + bias) / math.sqrt(D), -1) @ v

    assert_exact(mask_then_scale, *qkv(), rewritten=True)


def test_soft_biases_stay_selectable():
    """A real-valued bias within the margin never hides keys from selection (ALiBi-like)."""
    slope = (MASKED_BIAS_MARGIN / 2) / L
    alibi = -slope * (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs().float()

    def with_alibi(q, k, v):
        return F.softmax(q @ k.mT + alibi, -1) @ v

    q, k, v = qkv()
    model = torch.compile(Fn(with_alibi), backend="dsa", options={**FORCED, "topk": L - 1})
    with capture_selections() as selections:
        model(q, k, v)
    assert (selections[0] >= 0).all()  # every slot filled: no key was ruled out


# D: broadcasting, odd mask ranks, shared scores ---------------------------------------------
def test_latent_queries_broadcast_over_the_batch_stay_dense():
    latent = torch.randn(1, H, 16, D)

    def perceiver(q, k, v):
        return F.softmax(latent @ k.mT, -1) @ v

    q, k, v = qkv()
    site = site_of(perceiver, q, k, v)
    assert not site["rewritten"] and "broadcast over the batch" in site["reason"]
    assert_exact(perceiver, q, k, v, rewritten=False)


def test_sdpa_broadcasting_q_over_the_batch_stays_dense():
    latent = torch.randn(1, H, 16, D)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(latent.expand(1, H, 16, D), k[:1], v[:1])

    q, k, v = qkv()
    assert_exact(sdpa, q, k, v, rewritten=True)

    def broadcast(q, k, v):
        return F.scaled_dot_product_attention(latent, k, v)

    site = site_of(broadcast, q, k, v)
    assert not site["rewritten"] and "batch" in site["reason"]


@pytest.mark.parametrize("bias", [torch.ones(1), torch.randn(L), torch.randn(1, L, 1)],
                         ids=["rank1-scalar", "rank1-keys", "rank3-queries"])
def test_low_rank_additive_biases_are_exact(bias):
    def biased(q, k, v):
        return F.softmax(q @ k.mT + bias, -1) @ v

    assert_exact(biased, *qkv(), rewritten=True)


def test_mask_that_enlarges_the_scores_stays_dense():
    bias = torch.randn(3, H, L, L)  # one batch of q, k, v; the mask makes it three

    def enlarged(q, k, v):
        return F.softmax(q @ k.mT + bias, -1) @ v

    q, k, v = qkv(batch=1)
    site = site_of(enlarged, q, k, v)
    assert not site["rewritten"] and "does not broadcast to the scores" in site["reason"], site
    assert_exact(enlarged, q, k, v, rewritten=False)


def test_two_outputs_sharing_one_score_node_stay_dense():
    def shared(q, k, v):
        s = q @ k.mT
        return F.softmax(s, -1) @ v + F.softmax(s * 2, -1) @ v

    q, k, v = qkv()
    report = dsa_compile.explain(Fn(shared), q, k, v, topk=L, min_seq_len=0)
    assert [s["rewritten"] for s in report.sites] == [False, False]
    assert all("used elsewhere" in s["reason"] for s in report.sites)
    assert_exact(shared, q, k, v, rewritten=False)


# E: fully masked rows, float position masks --------------------------------------------------
PADDED_ROW = torch.zeros(B, 1, 1, L)
PADDED_ROW[1] = MIN32


@pytest.mark.parametrize("fn", [
    lambda q, k, v: F.softmax(q @ k.mT + PADDED_ROW, -1) @ v,
    lambda q, k, v: F.softmax((q @ k.mT).masked_fill(PADDED_ROW < 0, MIN32), -1) @ v,
    lambda q, k, v: F.softmax((q @ k.mT).masked_fill(PADDED_ROW < 0, -1e4), -1) @ v,
    lambda q, k, v: F.softmax(torch.where(PADDED_ROW == 0, q @ k.mT, -1e9), -1) @ v,
    lambda q, k, v: F.softmax((q @ k.mT).masked_fill(PADDED_ROW < 0, float("-inf")), -1) @ v,
    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=PADDED_ROW == 0),
    lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=PADDED_ROW),
], ids=["add-finfo.min", "fill-finfo.min", "fill-1e4", "where-1e9", "fill-inf", "sdpa-bool",
        "sdpa-finfo.min"])
def test_fully_masked_rows_keep_the_original_semantics(fn):
    assert_exact(fn, *qkv(), rewritten=True)


def test_finite_fill_combined_with_an_additive_mask_stays_dense():
    bias = torch.randn(L, L)

    def mixed(q, k, v):
        return F.softmax((q @ k.mT).masked_fill(PADDED_ROW < 0, -1e4) + bias, -1) @ v

    q, k, v = qkv()
    site = site_of(mixed, q, k, v)
    assert not site["rewritten"] and "finite fill" in site["reason"]
    assert_exact(mixed, q, k, v, rewritten=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_position_masks_in_a_float_dtype_are_not_proved_causal(dtype):
    """bf16 positions past 256 round (L=300: the mask is not causal); floats are never proved."""
    n = 300

    def arange_mask(q, k, v):
        i = torch.arange(q.shape[2], dtype=dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=i[None, :] <= i[:, None])

    q, k, v = qkv(n, n, batch=1)
    site = site_of(arange_mask, q, k, v, topk=n)
    assert ("causal_mask" in site["pattern"]) is (dtype == torch.int64), site
    assert_exact(arange_mask, q, k, v, rewritten=True, topk=n)


def test_index_dims_above_the_site_are_cut_out_loud(caplog):
    def plain(q, k, v):
        return F.softmax(q @ k.mT, -1) @ v

    with caplog.at_level("DEBUG", logger="dsa_compile"):
        site = site_of(plain, *qkv(), index_dim=64, index_heads=8)
    assert "index_dim 64 > 16" in site["indexer_init"] and "index_heads 8 > 2" in \
        site["indexer_init"], site
    assert "index_dim 64 > 16" in caplog.text


def test_topk_beyond_the_keys_is_clamped():
    def plain(q, k, v):
        return F.softmax(q @ k.mT, -1) @ v

    q, k, v = qkv()
    model = torch.compile(Fn(plain), backend="dsa", options={**FORCED, "topk": 2**31 - 1})
    with capture_selections() as selections:
        torch.testing.assert_close(model(q, k, v), plain(q, k, v), atol=2e-5, rtol=1e-5)
    assert selections[0].shape[-1] == L


@pytest.mark.parametrize("bias", [torch.rand(L, L) > 0.5, (torch.rand(L, L) > 0.5).long() * -7,
                                  torch.randn(L, L).half()], ids=["bool", "int", "fp16"])
def test_additive_masks_of_other_dtypes_add_their_values(bias):
    """``scores + bool_mask`` adds 1 where True (it is not a keep mask); int and fp16 biases
    promote to the scores' dtype."""
    def biased(q, k, v):
        return F.softmax(q @ k.mT + bias, -1) @ v

    q, k, v = qkv()
    assert_exact(biased, q, k, v, rewritten=True)
    dense = torch.compile(Fn(biased), backend="dsa", options={"mode": "eager", "topk": L})
    torch.testing.assert_close(dense(q, k, v), biased(q, k, v), atol=2e-5, rtol=1e-5)


def test_probabilities_rounded_below_v_stay_dense():
    def rounded(q, k, v):
        return F.softmax(q @ k.mT, -1).bfloat16().float() @ v

    q, k, v = qkv()
    site = site_of(rounded, q, k, v)
    assert not site["rewritten"] and "probabilities are cast to torch.bfloat16" in \
        site["reason"], site
    assert_exact(rounded, q, k, v, rewritten=False)


def test_one_kv_head_broadcast_by_matmul_is_mqa():
    def mqa(q, k, v):
        return F.softmax(q @ k[:, :1].mT, -1) @ v[:, :1]

    assert_exact(mqa, *qkv(), rewritten=True)


# Found by a red-team corpus ------------------------------------------------------------------
def test_one_attention_output_feeding_the_next_site():
    def chained(q, k, v):
        first = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        second = F.scaled_dot_product_attention(first, k, v, is_causal=True)
        return F.softmax(second @ k.mT / 4, -1) @ v

    assert_exact(chained, *qkv(), rewritten=True)


def test_a_restored_output_feeding_the_next_site():
    """The first site's output goes through a restore of fully masked rows (NaN): the node the
    second site reads carries the first site's shape."""
    def chained(q, k, v):
        first = F.softmax((q @ k.mT / 4).masked_fill(~CAUSAL, float("-inf")), -1) @ v
        return F.softmax((first @ k.mT / 4).masked_fill(~CAUSAL.T, float("-inf")), -1) @ v

    assert_exact(chained, *qkv(), rewritten=True)


def test_float64_sites_stay_dense():
    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (t.double() for t in qkv())
    site = site_of(causal, q, k, v)
    assert not site["rewritten"] and "float64" in site["reason"]
    assert_exact(causal, q, k, v, rewritten=False)


@pytest.mark.parametrize("fill, scale, rewritten", [(-1e9, 1e-9, False), (-1e4, 1e-3, False),
                                                    (-1e9, 0.125, True), (-1e4, 0.125, True)])
def test_a_fill_scaled_afterwards_must_stay_a_mask(fill, scale, rewritten):
    def fill_then_scale(q, k, v):
        return F.softmax((q @ k.mT).masked_fill(~CAUSAL, fill) * scale, -1) @ v

    q, k, v = qkv()
    assert site_of(fill_then_scale, q, k, v)["rewritten"] is rewritten
    assert_exact(fill_then_scale, q, k, v, rewritten=rewritten)


def test_a_fill_scaled_by_a_run_time_value_stays_dense():
    def fill_then_tensor_scale(q, k, v, t):
        return F.softmax((q @ k.mT).masked_fill(~CAUSAL, float("-inf")) * t, -1) @ v

    q, k, v = qkv()
    site = site_of(fill_then_tensor_scale, q, k, v, torch.tensor(-0.5))
    assert not site["rewritten"] and "run time" in site["reason"]


def test_nan_in_a_float_mask_poisons_like_sdpa():
    mask = torch.zeros(L, L)
    mask[:, 5] = float("nan")

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    assert_exact(sdpa, *qkv(), rewritten=True)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_future_key_never_reaches_earlier_queries(value):
    q, k, v = qkv()
    k[:, :, 20, 0] = value

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    exact, _ = compiled(causal, q, k, v)
    torch.testing.assert_close(exact, causal(q, k, v), atol=1e-5, rtol=1e-5, equal_nan=True)
    sparse, _ = compiled(causal, q, k, v, topk=8)
    assert not sparse[:, :, :20].isnan().any()


def test_dynamic_shapes_keep_sites_rewritten():
    """dynamic=True makes head counts symbolic: they are specialised (architecture), the site
    is rewritten, and stays exact at two lengths."""
    def plain(q, k, v):
        return F.softmax(q @ k[:, :1].mT / 4, -1) @ v[:, :1]

    model = torch.compile(Fn(plain), backend="dsa", dynamic=True, options={**FORCED, "topk": 64})
    for n in (40, 56):
        q, k, v = qkv(n, n)
        with OpCounter() as counter:
            torch.testing.assert_close(model(q, k, v), plain(q, k, v), atol=2e-5, rtol=1e-5)
        assert counter.counts.get("dsa.sparse_attention") == 1


@pytest.mark.parametrize("qk_eq, pv_eq, layout", [
    ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "blhd"),
    ("bhqd,bhkd->bhqk", "bhqk,bhkd->bqhd", "bhld"),
    ("...qd,...kd->...qk", "...qk,...kd->...qd", "bhld"),
    ("bhqd,bhdk->bhqk", "bhqk,bhkd->bhqd", "bhld-kT"),
], ids=["blhd", "output-permuted", "ellipsis", "k-transposed"])
def test_einsum_layouts_are_rewritten_exactly(qk_eq, pv_eq, layout):
    """Einsums in any operand layout (passes/einsum.py brings them to the canonical one)."""
    def einsum_attention(q, k, v):
        if layout == "blhd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if layout == "bhld-kT":
            k = k.transpose(-1, -2).contiguous()
        s = torch.einsum(qk_eq, q, k) / 4
        if s.shape[-1] == s.shape[-2]:
            s = s.masked_fill(~CAUSAL, float("-inf"))
        return torch.einsum(pv_eq, torch.softmax(s, -1), v)

    q, k, v = qkv()
    assert site_of(einsum_attention, q, k, v)["rewritten"]
    assert_exact(einsum_attention, q, k, v, rewritten=True)


def test_einsum_softmax_over_queries_stays_dense():
    def over_queries(q, k, v):
        s = torch.einsum("bhqd,bhkd->bhkq", q, k)  # keys as rows: softmax runs over queries
        return torch.einsum("bhkq,bhqd->bhkd", torch.softmax(s, -1), v)

    q, k, v = qkv()
    assert_exact(over_queries, q, k, v, rewritten=False)


@pytest.mark.parametrize("queries,op", [(12, "dsa.sparse_attention"),
                                        (6, "dsa.decode_attention")])  # <= 8: the decode path
def test_key_and_value_lengths_unproven_equal_are_rewritten_and_checked_at_run_time(queries, op):
    """Under dynamic shapes a KV cache's keys and values have separate length symbols: the pass
    rewrites them, and the dsa ops (or the decode path) check the lengths at run time: a
    mismatch is an error naming v (SDPA's CPU kernel silently reads only Lk rows of v there)."""
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    compiled = torch.compile(Fn(attend), backend="dsa", dynamic=True,
                             options={**FORCED, "topk": 4})
    q = torch.randn(B, H, queries, D)
    with torch.no_grad(), OpCounter() as counter:
        for length in (20, 27):
            k, v = torch.randn(B, H, length, D), torch.randn(B, H, length, D)
            out = compiled(q, k, v)
            assert out.shape == (B, H, queries, D)
    assert counter.counts[op] == 2
    with pytest.raises(dsa_compile.DSAInputError, match="v"):
        compiled(q, torch.randn(B, H, 30, D), torch.randn(B, H, 31, D))


@pytest.mark.parametrize("per_query", [False, True])
def test_boolean_masks_without_a_query_dim_drop_the_bias_exactly(per_query):
    """A boolean mask that only hides keys adds nothing over the selected keys (the selection
    never picks a hidden key): the ops run without the bias. One that varies per query keeps
    it. Both equal the same mask given as a float bias."""
    from dsa_compile.kernels.attention import dsa_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 24, 8, generator=gen) for _ in range(3))
    shape = (2, 1, 24, 24) if per_query else (2, 1, 1, 24)
    keep = torch.rand(shape, generator=gen) > 0.3
    keep[..., 0] = True
    q_proj, k_proj = torch.randn(32, 16, generator=gen), torch.randn(32, 8, generator=gen)
    weights = torch.rand(2, generator=gen)
    options = dict(is_causal=False, scale=None, enable_gqa=False, topk=6, dense_up_to=0,
                   query_block=4, key_block=0, candidate_blocks=0)
    as_bool = dsa_attention(q, k, v, keep, q_proj, k_proj, weights, **options)
    as_float = dsa_attention(q, k, v, torch.zeros(shape).masked_fill(~keep, float("-inf")),
                             q_proj, k_proj, weights, **options)
    torch.testing.assert_close(as_bool, as_float, rtol=0, atol=1e-6)
