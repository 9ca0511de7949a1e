"""attn_implementation="dsa": HF models run the dsa ops through transformers' attention
interface, with their own indexers, in prefill and in every decode step of generate()."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import transformers
from models import OpCounter, tiny_model

import dsa_compile
from dsa_compile.hf import dsa_attention_forward
from dsa_compile.ownership import indexers_of

EXACT = dict(topk=8, query_block=1, key_block=0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_dsa_implementation_equals_the_compiled_rewrite(arch):
    model = tiny_model(arch, "sdpa")
    ids = _ids(2, 40)
    with torch.no_grad():
        dense = model(ids)[0]
        reference = dsa_compile.compile(model, mode="eager", **EXACT)(ids)[0]
    torch.compiler.reset()
    fresh = tiny_model(arch, "dsa")  # the same weights (seeded), loaded as "dsa"
    assert fresh.config._attn_implementation == "dsa"
    with pytest.raises(dsa_compile.DSAConfigError, match="configure"):
        fresh(ids)
    config = dsa_compile.configure(fresh, ids, **EXACT)
    assert config.topk == 8 and fresh.config._attn_implementation == "dsa"
    assert len(indexers_of(fresh)) == 2
    with torch.no_grad():
        got = fresh(ids)[0]
        short = fresh(ids[:, :8])[0]
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(got, dense, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(short, model(ids[:, :8])[0], rtol=1e-5, atol=1e-5)


def test_generate_decodes_sparse_and_each_step_equals_the_full_forward():
    """Exact per-query selection: a decode step selects for its query what a full forward
    selects for that position, so its logits match the full forward's there."""
    model = tiny_model("llama", "dsa")
    dsa_compile.configure(model, **EXACT)
    prompt = _ids(1, 20, 3)
    with torch.no_grad(), OpCounter() as counter:
        out = model.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    # prefill through the ops, then 9 steps through the lean decode path, 2 layers each
    assert counter.counts["dsa.indexer_topk"] == 2
    assert counter.counts["dsa.decode_attention"] == 9 * 2
    with torch.no_grad():
        full = model(out.sequences).logits[0, 19:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full, rtol=0, atol=1e-5)
    with torch.no_grad():  # at most topk keys: every step is dense SDPA, tokens as dense
        model.set_attn_implementation("sdpa")
        dense = model.generate(prompt[:, :4], max_new_tokens=4, do_sample=False)
        model.set_attn_implementation("dsa")
        sparse = model.generate(prompt[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(dense, sparse)


def test_configure_again_changes_the_options_in_place():
    model = tiny_model("qwen2", "dsa")
    ids = _ids(1, 40, 4)
    dsa_compile.configure(model, **EXACT)
    indexers = dict(indexers_of(model))
    with torch.no_grad():
        eight = model(ids).logits
        dsa_compile.configure(model, topk=4)
        four = model(ids).logits
    assert model.dsa_config.topk == 4 and indexers_of(model) == indexers  # same indexers
    assert not torch.allclose(eight, four, atol=1e-4)


def test_adapter_loaded_into_a_dsa_model(tmp_path):
    source = tiny_model("llama", "sdpa")
    ids = _ids(1, 40, 5)
    dsa_compile.attach(source, ids, **EXACT)
    with torch.no_grad():
        source.model.layers[0].self_attn.dsa_indexer.q_proj.mul_(-2.0)
        expected = dsa_compile.compile(source, mode="eager", **EXACT)(ids).logits
    dsa_compile.save_adapter(source, tmp_path)
    target = tiny_model("llama", "dsa")
    dsa_compile.load_adapter(target, tmp_path)
    dsa_compile.configure(target, **EXACT)  # keeps the loaded indexers
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, expected, rtol=0, atol=1e-6)


def test_compiled_generate_runs_the_dsa_ops_and_leaves_the_model_alone():
    model = tiny_model("llama", "sdpa")
    prompt = _ids(1, 20, 6)
    compiled = dsa_compile.compile(model, mode="eager", **EXACT)
    with torch.no_grad(), OpCounter() as counter:
        compiled.generate(prompt, max_new_tokens=4, do_sample=False)
    # prefill through the ops, the 3 decode steps (dynamic shapes) through the decode path
    assert counter.counts["dsa.sparse_attention"] == 2
    assert counter.counts["dsa.decode_attention"] == 3 * 2
    assert "forward" not in vars(model) and "generate" not in vars(model)


def test_features_the_ops_lack_run_dense_and_say_why(caplog, monkeypatch):
    monkeypatch.setattr(sys.modules["dsa_compile.hf"], "_SAID", set())
    model = tiny_model("llama", "dsa")
    dsa_compile.configure(model, **EXACT)
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 12, 16)
    k, v = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    bias = torch.randn(1, 4, 12, 12)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with caplog.at_level(logging.WARNING, logger="dsa_compile"):
        for _ in range(2):  # said once, not at every call
            got, _ = dsa_attention_forward(attention, q, k, v, None, scaling=0.25,
                                           position_bias=bias)
    expected, _ = sdpa_attention_forward(attention, q, k, v, None, scaling=0.25,
                                         position_bias=bias)
    torch.testing.assert_close(got, expected)
    assert caplog.text.count("runs dense: a position bias") == 1


@pytest.mark.parametrize("order", ["dsa_compile first", "transformers first"])
def test_import_registers_the_implementation(order):
    imports = ["import dsa_compile", "import transformers"]
    if order == "transformers first":
        imports.reverse()
    code = "; ".join([*imports, "from transformers import AttentionInterface",
                      "from transformers.masking_utils import AttentionMaskInterface",
                      "assert 'dsa' in AttentionInterface._global_mapping",
                      "assert 'dsa' in AttentionMaskInterface._global_mapping"])
    env = {k: v for k, v in os.environ.items()}
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_transformers_is_not_imported_by_dsa_compile():
    code = "import sys, dsa_compile; assert 'transformers' not in sys.modules"
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


assert transformers  # imported here so the models above resolve "dsa" in this process too


def _projections(monkeypatch) -> list[int]:
    """Token counts of every indexer-key projection (the attention's and the cache's)."""
    import dsa_compile.kernels.attention as attention

    key_cache = sys.modules["dsa_compile.key_cache"]
    seen: list[int] = []
    original = attention.index_keys

    def spy(k, k_proj):
        seen.append(k.shape[2])
        return original(k, k_proj)

    monkeypatch.setattr(attention, "index_keys", spy)
    monkeypatch.setattr(key_cache, "index_keys", spy)
    return seen


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_index_cache_projects_only_new_tokens(kind, monkeypatch):
    model = tiny_model("llama", "dsa")
    dsa_compile.configure(model, **EXACT)
    prompt = _ids(2, 20, 7)
    mask = torch.ones_like(prompt)
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, attention_mask=mask)
    with torch.no_grad():
        plain = model.generate(prompt, **settings)
        seen = _projections(monkeypatch)
        cache = None if kind == "dynamic" else transformers.StaticCache(config=model.config,
                                                                          max_cache_len=64)
        cache = dsa_compile.index_cache(model, cache)
        cached = model.generate(prompt, past_key_values=cache, **settings)
    assert torch.equal(plain.sequences, cached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(plain.logits), rtol=0,
                               atol=1e-5)
    first = 20 if kind == "dynamic" else 64  # a static cache's buffer is projected once
    assert seen == [first, first] + [1] * (2 * 5)  # 2 layers; then one token per step
    store = cache.dsa_index_keys
    length = 25 if kind == "dynamic" else 64
    assert {tuple(t.shape) for t in store.keys.values()} == {(2, length, 32)}
    assert store.memory_bytes() == 2 * 2 * length * 32 * 4  # layers x B x tokens x DI x fp32


def test_index_cache_after_a_beam_reorder_recomputes_instead_of_going_stale():
    model = tiny_model("llama", "dsa")
    dsa_compile.configure(model, **EXACT)
    prompt = _ids(1, 20, 8)
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=3)
    with torch.no_grad():
        plain = model.generate(prompt, **settings)
        cached = model.generate(prompt, past_key_values=dsa_compile.index_cache(model), **settings)
    assert torch.equal(plain, cached)


def test_index_cache_needs_indexers():
    with pytest.raises(ValueError, match="configure"):
        dsa_compile.index_cache(tiny_model("llama", "sdpa"))


def test_compiled_static_decode_step_is_one_graph_compiled_once():
    """A static cache keeps every step's shapes; the step with the indexer key cache then
    compiles to one graph, once, and decodes what the eager step decodes."""
    model = tiny_model("llama", "dsa")
    dsa_compile.configure(model, **EXACT)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(model.forward, backend=backend)
    prompt = _ids(1, 20, 9)
    logits = {}
    for name, run in (("eager", model.forward), ("compiled", step)):
        cache = dsa_compile.index_cache(model, transformers.StaticCache(config=model.config,
                                                                        max_cache_len=64))
        with torch.no_grad():
            token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            steps = []
            for i in range(8):  # 28 tokens > topk: sparse from the first step
                position = torch.tensor([[20 + i]])
                out = run(input_ids=token, past_key_values=cache, position_ids=position,
                          cache_position=position[0], use_cache=True).logits
                steps.append(out)
                token = out[:, -1:].argmax(-1)
        logits[name] = torch.cat(steps, 1)
    assert len(graphs) == 1
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=0, atol=1e-5)


def test_in_place_module_compile_makes_generate_sparse():
    """``model.compile(backend="dsa")`` (PyTorch's in-place form) compiles what ``generate``
    calls, unlike ``torch.compile(model, ...)``, whose ``generate`` is the original module's."""
    model = tiny_model("llama", "sdpa")
    model.compile(backend="dsa", options=dict(EXACT, mode="eager"))
    with torch.no_grad(), OpCounter() as counter:
        model.generate(_ids(1, 20, 10), max_new_tokens=4, do_sample=False)
    assert counter.counts["dsa.sparse_attention"] == 2  # prefill, 2 layers
    assert counter.counts["dsa.decode_attention"] == 3 * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_indexer_scores_in_the_models_16_bit_dtype(dtype, monkeypatch):
    """DSA's indexer is a low-precision scorer: in a bf16 / fp16 model its projections run in
    the model's dtype (in fp32 they cost a bf16 Llama on the GPU fp32 GEMMs and a tf32 indexer
    kernel), while its parameters stay fp32 (what calibration trains and adapters save); an
    fp32 model scores in fp32."""
    from dsa_compile.kernels import indexer as cpu_indexer

    seen = []
    real = cpu_indexer.indexer_topk

    def spy(q_idx, k_idx, weights, *args):
        seen.append((q_idx.dtype, k_idx.dtype, weights.dtype))
        return real(q_idx, k_idx, weights, *args)

    monkeypatch.setattr(cpu_indexer, "indexer_topk", spy)
    model = tiny_model("llama", "sdpa").to(dtype)
    with torch.no_grad():
        out = dsa_compile.compile(model, mode="eager", **EXACT)(_ids(1, 40))[0]
    assert seen and set(seen) == {(dtype, dtype, torch.float32)}
    params = [p for indexer in indexers_of(model).values() for p in indexer.parameters()]
    assert params and {p.dtype for p in params} == {torch.float32}
    assert out.dtype == dtype and torch.isfinite(out).all()
