"""Whole models on the accelerator when there is one (CUDA), else on the CPU: what mixes
devices only fails on a GPU, so a GPU session runs this file (with
``tests/test_triton_kernels.py``) under pytest.

The pass builds each site's indexer from the q / k projection weights it finds upstream; those
weights live on the model's device. On a GPU this once failed (a CPU basis written from CUDA
eigenvectors) and every site stayed dense: the compiled model was silently as slow as Inductor.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_model

import dsa_compile
from dsa_compile.ownership import indexers_of

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("selection", ["shared", "kv_head"])
def test_indexers_initialise_from_weights_on_the_models_device(selection):
    torch.compiler.reset()
    model = tiny_model("llama", "sdpa").to(DEVICE)
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        dense = model(ids).logits
        # top-8 of 40 keys: truly sparse, so a site left dense would not match the check below
        sparse = dsa_compile.compile(model, mode="eager", topk=8, query_block=1, key_block=0,
                                     selection=selection)(ids).logits
    indexers = indexers_of(model)
    assert len(indexers) == model.config.num_hidden_layers
    for indexer in indexers.values():
        assert "weights, RoPE-aware" in indexer.info.init, indexer.info.init
        assert {p.device.type for p in indexer.parameters()} == {DEVICE}
    assert sparse.device.type == DEVICE and torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_deepseek_v3_converts_and_calibrates_on_the_models_device(tmp_path):
    """V3 -> V32 where the model lives: the indexer init, the calibration and the recall read
    weights and activations on that device (the converted model stays there)."""
    from test_deepseek_convert import tiny_v3

    from dsa_compile.deepseek import convert_v3_checkpoint

    model = tiny_v3().to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (1, 24), generator=gen).to(DEVICE) for _ in range(2)]
    report = convert_v3_checkpoint(model, tmp_path, batches, steps=2, progress=False,
                                   index_n_heads=2, index_head_dim=16, index_topk=8)
    assert len(report["log"]) == 2 and len(report["after"]["indexer"]) == 2
    assert all(0 < r <= 1 for r in report["after"]["indexer"] + report["before"]["random"])
    assert (tmp_path / "model.safetensors").exists()


def test_calibrate_save_load_and_generate_on_the_models_device(tmp_path):
    """The user's path on a GPU: indexers calibrated where the model lives, saved as a
    safetensors adapter, loaded into a fresh ``attn_implementation="dsa"`` model there, which
    then generates sparse (exact per-query selection: each step equals the full forward)."""
    options = dict(topk=8, query_block=1, key_block=0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 100, (1, 40), generator=gen).to(DEVICE) for _ in range(2)]
    source = tiny_model("llama", "sdpa").to(DEVICE)
    result = dsa_compile.calibrate(source, batches, steps=3, progress=False, **options)
    assert len(result.steps) == 3 and all(0 < s["recall"] <= 1 for s in result.steps)
    dsa_compile.save_adapter(source, tmp_path)
    target = tiny_model("llama", "dsa").to(DEVICE)
    dsa_compile.load_adapter(target, tmp_path)
    dsa_compile.configure(target, **options)
    assert {p.device.type for p in target.parameters()} == {DEVICE}
    with torch.no_grad():
        torch.compiler.reset()
        expected = dsa_compile.compile(source, mode="eager", **options)(batches[0]).logits
        torch.testing.assert_close(target(batches[0]).logits, expected, rtol=0, atol=1e-5)
        out = target.generate(batches[1][:, :20], max_new_tokens=6, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
        full = target(out.sequences).logits[0, 19:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full, rtol=0, atol=1e-4)


def test_plain_pytorch_decoder_is_rewritten_and_exact_at_full_top_k():
    """The benchmark's best dense baseline (``dsa_compile.plain_model``: SDPA with
    ``is_causal`` and ``enable_gqa``) is a model the pass rewrites site by site, RoPE-aware;
    with top-k = L the rewritten model is the dense one, with top-8 it is not."""
    from dsa_compile.bench import MODEL_SHAPE
    from dsa_compile.plain_model import plain_decoder

    model = plain_decoder(2, {**MODEL_SHAPE, "hidden_size": 128, "intermediate_size": 256}).to(DEVICE)
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    options = dict(query_block=1, key_block=0, min_seq_len=0)
    torch.compiler.reset()
    report = dsa_compile.explain(model, ids, topk=8, **options)
    assert len(report.sites) == 2 and not report.dense, report.table()
    assert all(s["mask"] == "causal" and "RoPE-aware" in s["indexer_init"] for s in report.sites)
    with torch.no_grad():
        dense = model(ids)
        torch.compiler.reset()
        exact = dsa_compile.compile(model, mode="eager", topk=48, **options)(ids)
        torch.compiler.reset()
        sparse = dsa_compile.compile(model, mode="eager", topk=8, **options)(ids)
    torch.testing.assert_close(exact, dense, rtol=0, atol=1e-3 if DEVICE == "cuda" else 1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_fp8_indexer_compiles_and_selects_close_to_the_16_bit_one():
    """``indexer_fp8`` under Inductor where the model lives (on a GPU: the quantisation traced
    into the graph, FP8 products on the indexer kernel): dense where top-k covers every key,
    most of the 16-bit selection where it does not."""
    from dsa_compile.kernels.attention import capture_selections

    model = tiny_model("llama", "sdpa").to(DEVICE)
    ids = torch.randint(0, 100, (1, 48), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    options = dict(topk=12, query_block=1, key_block=0)
    with torch.no_grad():
        dense = model(ids).logits
        torch.compiler.reset()
        full = dsa_compile.compile(model, indexer_fp8=True, **{**options, "topk": 48})(ids).logits
        torch.testing.assert_close(full, dense, rtol=1e-3, atol=1e-4)
        torch.compiler.reset()
        with capture_selections() as wide:
            dsa_compile.compile(model, mode="eager", **options)(ids)
        with capture_selections() as narrow:
            dsa_compile.compile(model, mode="eager", indexer_fp8=True, **options)(ids)
    shared = [len(set(a.tolist()) & set(b.tolist())) / len(b)
              for x, y in zip(narrow, wide, strict=True)
              for a, b in zip(x.flatten(0, -2), y.flatten(0, -2), strict=True)]
    assert sum(shared) / len(shared) >= 0.8
