"""One selection per kv head (``selection="kv_head"``): the ops run it as a batch of
single-kv-head problems; pinned to a loop over kv heads of the shared-selection path."""

from __future__ import annotations

import pytest
import torch
from models import tiny_model

import dsa_compile
from dsa_compile.kernels.attention import SiteCall, dsa_attention
from dsa_compile.kernels.calibration import selection_recall, site_loss
from dsa_compile.ownership import indexers_of
from dsa_compile.passes.indexer_init import per_kv_head_indexer

OPS = dict(topk=6, dense_up_to=0, query_block=1, key_block=0, candidate_blocks=0)


def _inputs(heads: int, kv_heads: int, length: int = 24, dim: int = 8):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, heads, length, dim, generator=gen)
    k, v = (torch.randn(2, kv_heads, length, dim, generator=gen) for _ in range(2))
    init = per_kv_head_indexer(heads, kv_heads, dim, 2, 4, torch.randn(heads * dim, 16,
                                                                       generator=gen),
                               torch.randn(kv_heads * dim, 16, generator=gen))
    return q, k, v, init


def _group_slices(init, heads: int, kv_heads: int, dim: int, g: int):
    """Group g's own indexer (a shared-selection indexer of a one-kv-head site)."""
    group = heads // kv_heads
    per = init.head_weights.shape[0] // kv_heads
    width = init.k_proj.shape[1] // kv_heads
    q_proj = init.q_proj[g * group * dim:(g + 1) * group * dim, g * per * width:(g + 1) * per * width]
    k_proj = init.k_proj[g * dim:(g + 1) * dim, g * width:(g + 1) * width]
    return q_proj, k_proj, init.head_weights[g * per:(g + 1) * per]


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 3)])
@pytest.mark.parametrize("mask", [None, "keys", "heads"])
@pytest.mark.parametrize("causal", [False, True])
def test_per_kv_head_equals_a_loop_over_kv_heads(heads, kv_heads, mask, causal):
    q, k, v, init = _inputs(heads, kv_heads)
    gen = torch.Generator().manual_seed(2)
    attn_mask = None
    if mask == "keys":
        attn_mask = torch.rand(2, 1, 1, 24, generator=gen) > 0.2
    elif mask == "heads":
        attn_mask = torch.randn(2, heads, 24, 24, generator=gen)
    out = dsa_attention(q, k, v, attn_mask, init.q_proj, init.k_proj, init.head_weights,
                        is_causal=causal, scale=None, enable_gqa=True, per_kv_head=True, **OPS)
    group = heads // kv_heads
    for g in range(kv_heads):
        hs = slice(g * group, (g + 1) * group)
        sub_mask = attn_mask if attn_mask is None or attn_mask.shape[1] == 1 else attn_mask[:, hs]
        want = dsa_attention(q[:, hs], k[:, g:g + 1], v[:, g:g + 1], sub_mask,
                             *_group_slices(init, heads, kv_heads, 8, g), is_causal=causal,
                             scale=None, enable_gqa=True, **OPS)
        torch.testing.assert_close(out[:, hs], want, rtol=1e-5, atol=1e-5)


def test_mha_with_full_index_dim_selects_each_heads_top_logits():
    """MHA, DI = D: group h's score is relu(q_h . k_h) / sqrt(D): the head's own top-k."""
    q, k, v, _ = _inputs(4, 4)
    init = per_kv_head_indexer(4, 4, 8, 4, 8, None, None)
    assert list(init.q_proj.shape) == [32, 32] and list(init.head_weights.shape) == [4]
    out = dsa_attention(q, k, v, None, init.q_proj, init.k_proj, init.head_weights,
                        is_causal=False, scale=None, enable_gqa=False, per_kv_head=True, **OPS)
    logits = q @ k.transpose(-1, -2) * 8**-0.5
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(6, -1).indices,
                                                               True)
    want = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v
    # ties of relu at 0 aside (rows whose 6th logit is negative), the selections agree
    positive = (logits.topk(6, -1).values[..., -1] > 0)
    torch.testing.assert_close(out[positive], want[positive], rtol=1e-5, atol=1e-5)
    assert positive.float().mean() > 0.5


def test_calibration_objective_folds_per_kv_head():
    q, k, v, init = _inputs(4, 2)
    params = [t.clone().requires_grad_() for t in (init.q_proj, init.k_proj, init.head_weights)]
    call = SiteCall(q, k, v, None, *params, True, None, True, lambda: q, per_kv_head=True)
    measured = site_loss(call, 6, 1)
    recall, best = selection_recall(call, 6, 1, 0)
    assert measured.recall == pytest.approx(recall, abs=1e-5)
    assert measured.best_recall == pytest.approx(best, abs=1e-5)
    measured.loss.backward()
    assert params[0].grad.abs().sum() > 0


def test_selection_kv_head_end_to_end(tmp_path):
    """selection="kv_head" on a GQA Llama: exact at L <= topk, its own indexer shapes, explain
    says so, and adapters keep the mode."""
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    report = dsa_compile.attach(model, ids, topk=8, selection="kv_head", query_block=4,
                                key_block=0)
    assert all("one per kv head (2)" in s["granularity"] for s in report.rewritten)
    indexer = model.model.layers[0].self_attn.dsa_indexer
    assert indexer.info.per_kv_head and indexer.groups == 2
    assert list(indexer.k_proj.shape) == [32, 32] and list(indexer.q_proj.shape) == [64, 64]
    with torch.no_grad():
        dense = model(ids).logits
        short = dsa_compile.compile(model, mode="eager", topk=64)(ids).logits
        per_head = dsa_compile.compile(model, mode="eager")(ids).logits
    torch.testing.assert_close(short, dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_head, dense, atol=1e-4)
    dsa_compile.save_adapter(model, tmp_path)
    fresh = tiny_model("llama", "sdpa")
    dsa_compile.load_adapter(fresh, tmp_path)
    assert all(m.info.per_kv_head for m in indexers_of(fresh).values())
    with torch.no_grad():
        torch.compiler.reset()
        again = dsa_compile.compile(fresh, mode="eager")(ids).logits
    torch.testing.assert_close(again, per_head, rtol=0, atol=0)
    with pytest.raises(dsa_compile.DSAConfigError, match="selection"):
        dsa_compile.DSAConfig(selection="per_head")


def test_calibration_keeps_per_kv_head_indexers_block_diagonal():
    """Training moves each group's own block only: group g still reads only g's queries and
    kv head g's keys (an Adam step on the zero blocks once wrecked recall after one step)."""
    torch.compiler.reset()
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(2))
    dsa_compile.attach(model, ids[:1], topk=8, selection="kv_head", query_block=4, key_block=0)
    indexer = model.model.layers[0].self_attn.dsa_indexer
    before = {name: getattr(indexer, name).detach().clone() for name in ("q_proj", "k_proj")}
    masks = indexer.structure_masks()
    assert masks["q_proj"].sum() < masks["q_proj"].numel()  # some blocks are off
    dsa_compile.calibrate(model, [ids[:1], ids[1:]], steps=3, lr=1e-2, progress=False)
    for name, mask in masks.items():
        after = getattr(indexer, name).detach()
        assert torch.equal(after[mask == 0], before[name][mask == 0])
        assert not torch.equal(after[mask == 1], before[name][mask == 1])
        assert (before[name][mask == 0] == 0).all()
