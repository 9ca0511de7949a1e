"""The FP8 indexer (``indexer_fp8``, :mod:`dsa_compile.kernels.fp8`): queries scaled per token and
index head (the scale folded into the head weights), keys per key (``k_scale``); the selection is
exactly the selection of the dequantised values, and close to the 16-bit one."""

from __future__ import annotations

import pytest
import torch
from models import OpCounter, tiny_model

import dsa_compile
from dsa_compile import DSAInputError, indexer_topk
from dsa_compile.config import DSAConfig, DSAConfigError
from dsa_compile.kernels.attention import capture_selections
from dsa_compile.kernels.fp8 import FP8, dequantize_indexer, quantize_indexer


def _inputs(seed: int = 0):
    """Indexer inputs whose query tokens differ in magnitude by up to 10^4 (per-token scales
    matter) and whose head weights have both signs."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 300, 4, 32, generator=gen)
    q = q * 10 ** (4 * torch.rand(2, 300, 1, 1, generator=gen) - 2)
    k = torch.randn(2, 900, 32, generator=gen) * torch.tensor([1.0, 30.0]).view(2, 1, 1)
    w = torch.randn(2, 300, 4, generator=gen)
    return q, k, w


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of b's selected keys (not -1) that a selects too, over all rows."""
    hits = total = 0
    for x, y in zip(a.flatten(0, -2).tolist(), b.flatten(0, -2).tolist(), strict=True):
        want = {i for i in y if i >= 0}
        hits += len(want & set(x))
        total += len(want)
    return hits / total


def test_fp8_quantisation_rounds_each_vector_on_its_own_scale():
    q, k, w = _inputs()
    q8, k8, w8, k_scale = quantize_indexer(q, k, w)
    assert q8.dtype == FP8 and k8.dtype == FP8 and w8.dtype == k_scale.dtype == torch.float32
    assert k_scale.shape == (2, 900)
    qd, kd = dequantize_indexer(q8, k8, q, k)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each vector's largest entry
    assert ((qd - q).abs() <= q.abs().amax(-1, keepdim=True) / 16).all()
    assert ((kd - k).abs() <= k.abs().amax(-1, keepdim=True) / 16).all()
    torch.testing.assert_close(k8.float() * k_scale[..., None], kd)
    torch.testing.assert_close(w8, w * (q.abs().amax(-1) / 448))


@pytest.mark.parametrize("query_block,key_block", [(1, 0), (64, 0), (16, 32), (128, 64)])
def test_fp8_selection_is_the_selection_of_the_dequantised_inputs(query_block, key_block):
    """Exact per query, per query tile and two-stage: what the dequantised inputs select; and
    at least 90% of the fp32 selection on these inputs."""
    q, k, w = _inputs(1)
    q8, k8, w8, k_scale = quantize_indexer(q, k, w)
    qd, kd = dequantize_indexer(q8, k8, q, k)
    args = (64, True, 600, None, query_block, key_block, 0)
    got = indexer_topk(q8, k8, w8, *args, k_scale)
    assert torch.equal(got.sort(-1).values, indexer_topk(qd, kd, w, *args).sort(-1).values)
    assert _overlap(got, indexer_topk(q, k, w, *args)) >= 0.9


def test_fp8_inputs_are_checked():
    q, k, w = _inputs()
    q8, k8, w8, k_scale = quantize_indexer(q, k, w)
    with pytest.raises(DSAInputError, match="both be float8_e4m3fn or neither"):
        indexer_topk(q8, k, w8, 8)
    with pytest.raises(DSAInputError, match="weights must be float32"):
        indexer_topk(q8, k8, w8.to(FP8), 8)
    with pytest.raises(DSAInputError, match=r"k_scale.shape\[1\] \(keys Lk"):
        indexer_topk(q8, k8, w8, 8, k_scale=k_scale[:, :-1])
    with pytest.raises(DSAInputError, match="k_scale must be float32"):
        indexer_topk(q8, k8, w8, 8, k_scale=k_scale.half())
    with pytest.raises(DSAConfigError, match="indexer_fp8"):
        DSAConfig(indexer_fp8=1)


def test_an_fp8_indexer_model_selects_close_to_the_16_bit_one():
    """A Llama rewritten with ``indexer_fp8``: dense where top-k covers every key, and where it
    does not, most of the keys its 16-bit indexer selects."""
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(2))
    options = dict(mode="eager", topk=12, query_block=1, key_block=0)
    with torch.no_grad():
        dense = model(ids)[0]
        fp8_all = dsa_compile.compile(model, indexer_fp8=True, **{**options, "topk": 48})(ids)[0]
        torch.testing.assert_close(fp8_all, dense, rtol=1e-4, atol=1e-5)
        with capture_selections() as wide:
            dsa_compile.compile(model, **options)(ids)
        with capture_selections() as narrow:
            dsa_compile.compile(model, indexer_fp8=True, **options)(ids)
    assert len(wide) == len(narrow) == 2
    for a, b in zip(narrow, wide, strict=True):
        assert 0.8 <= _overlap(a, b) < 1.0 or torch.equal(a, b)


def test_generate_with_an_fp8_indexer_decodes_sparse_like_a_full_forward():
    """The decode steps (the indexer key cache, the lean decode path) score in FP8 as the
    prefill does, so each step's logits are the full forward's at that position."""
    model = tiny_model("llama", "dsa")
    dsa_compile.configure(model, topk=8, query_block=1, key_block=0, indexer_fp8=True)
    prompt = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), OpCounter() as counter:
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        full = model(out.sequences).logits[0, 19:-1]
    assert counter.counts["dsa.decode_attention"] == 5 * 2
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full, rtol=0, atol=1e-5)


def test_torch_export_keeps_the_fp8_indexer():
    """``dsa_compile.export`` holds the quantisation and ``indexer_topk`` with its key scales,
    and computes what the compiled FP8 model computes."""
    model = tiny_model("llama", "sdpa")
    model.config.use_cache = False
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(5))
    options = dict(topk=8, query_block=1, key_block=0, indexer_fp8=True)
    program = dsa_compile.export(model, (ids,), **options)
    topk_calls = [n for n in program.graph.nodes if str(n.target) == "dsa.indexer_topk.default"]
    assert len(topk_calls) == 2
    assert all(n.args[1].meta["val"].dtype == FP8 and n.args[-1].meta["val"].shape == (1, 40)
               for n in topk_calls)
    with torch.no_grad():
        expected = dsa_compile.compile(model, mode="eager", **options)(ids).logits
        got = program.module()(ids)[0]
    torch.testing.assert_close(got, expected)


def test_onnx_export_refuses_the_fp8_indexer(tmp_path):
    pytest.importorskip("onnxscript")
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (2, 40))
    with pytest.raises(DSAConfigError, match="indexer_fp8=True cannot be exported"):
        dsa_compile.export_onnx(model, (ids,), tmp_path / "m.onnx", topk=8, indexer_fp8=True)
