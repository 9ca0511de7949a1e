"""Indexers owned by the model: attach, detach, in-place updates, save / load adapters."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from models import tiny_model

import dsa_compile
from dsa_compile import DSAAdapterError, DSAConfig, DSAIndexer
from dsa_compile.dynamo_compat import traced_locals
from dsa_compile.ownership import indexers_of

ROUND_TRIP = ["llama", "qwen2", "gpt2", "bert", "deepseek_v32"]
# Above topk (sparse), with 4-query tiles so that a changed indexer changes the selection.
OPTIONS = {"topk": 8, "query_block": 4, "key_block": 0}
LENGTH = 40


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new instances of a few HF classes: Dynamo keeps compiled code per code
    object, and past its recompile limit it would run them uncompiled (dense)."""
    torch.compiler.reset()
    yield


def _ids(seed: int = 1, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, 100, (1, length), generator=torch.Generator().manual_seed(seed))


def _hidden(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _run(model, ids, **options) -> torch.Tensor:
    with torch.no_grad():
        return _hidden(dsa_compile.compile(model, **options)(ids))


def _change_indexers(model) -> None:
    """Moves every indexer of the model (ours, or the model's own) to other weights."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        targets = [p for m in indexers_of(model).values() for p in m.tensors()] or \
            [p for path in model.dsa_model_indexers
             for p in model.get_submodule(path).parameters()]
        for p in targets:
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(0.5))


def test_attach_makes_the_indexers_model_state():
    model = tiny_model("llama", "sdpa")
    before = set(model.state_dict())
    report = dsa_compile.attach(model, _ids(), **OPTIONS)
    added = sorted(set(model.state_dict()) - before)
    assert added == [f"model.layers.{i}.self_attn.dsa_indexer.{p}" for i in range(2)
                     for p in ("head_weights", "k_proj", "q_proj")]
    indexer = model.model.layers[0].self_attn.dsa_indexer
    assert isinstance(indexer, DSAIndexer)
    assert list(indexer.q_proj.shape) == [4 * 16, 4 * 32] and list(indexer.k_proj.shape) == [32, 32]
    assert model.dsa_config.topk == 8
    assert [s["indexer"] for s in report.rewritten] == \
        ["model.layers.0.self_attn.dsa_indexer", "model.layers.1.self_attn.dsa_indexer"]
    with pytest.raises(DSAAdapterError, match="already has dsa indexers"):
        dsa_compile.attach(model, _ids())


@pytest.mark.parametrize("arch", ROUND_TRIP)
def test_round_trip_attach_change_save_load(arch, tmp_path):
    """attach -> change the indexers -> save -> load into a fresh model: equal outputs (eager
    and Inductor) at a length above topk."""
    model = tiny_model(arch, "sdpa")
    ids = _ids()
    dsa_compile.attach(model, ids, **OPTIONS)
    dense = _hidden(model(ids))
    initial = _run(model, ids, mode="eager")
    _change_indexers(model)
    changed = _run(model, ids, mode="eager")
    assert not torch.allclose(changed, initial, atol=1e-4)  # the change is seen
    assert not torch.allclose(changed, dense, atol=1e-4)  # sparse at this length
    dsa_compile.save_adapter(model, tmp_path)

    fresh = tiny_model(arch, "sdpa")
    names = dsa_compile.load_adapter(fresh, tmp_path, ids)
    assert names and fresh.dsa_config.topk == 8
    assert set(fresh.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.testing.assert_close(_run(fresh, ids, mode="eager"), changed, rtol=0, atol=0)
    torch.testing.assert_close(_run(fresh, ids), changed, rtol=1e-4, atol=1e-4)  # Inductor


def test_detach_gives_back_the_dense_model_exactly(tmp_path):
    model = tiny_model("llama", "sdpa")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes, dense = set(vars(model)), _hidden(model(_ids()))
    dsa_compile.attach(model, _ids(), **OPTIONS)
    _change_indexers(model)
    removed = dsa_compile.detach(model)
    assert sorted(removed) == ["model.layers.0.self_attn.dsa_indexer",
                               "model.layers.1.self_attn.dsa_indexer"]
    assert set(vars(model)) == attributes and not hasattr(model, "dsa_config")
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_hidden(model(_ids())), dense)


def test_detach_restores_the_own_indexer_an_adapter_overwrote(tmp_path):
    source = tiny_model("deepseek_v32", "sdpa")
    dsa_compile.attach(source, _ids(), **OPTIONS)
    _change_indexers(source)
    dsa_compile.save_adapter(source, tmp_path)
    model = tiny_model("deepseek_v32", "sdpa")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dsa_compile.load_adapter(model, tmp_path)
    assert not torch.equal(model.state_dict()["model.layers.0.self_attn.indexer.wk.weight"],
                           state["model.layers.0.self_attn.indexer.wk.weight"])
    dsa_compile.detach(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def _graphs_logged(caplog) -> int:
    return sum(r.getMessage().startswith("graph ") for r in caplog.records
               if r.name == "dsa_compile")


def test_in_place_updates_change_the_compiled_output_without_recompile(caplog):
    """torch.compile(backend="dsa", Inductor) reads the model's own indexer parameters."""
    caplog.set_level(logging.INFO, logger="dsa_compile")
    model = tiny_model("llama", "sdpa")
    ids = _ids()
    dsa_compile.attach(model, ids, **OPTIONS)
    compiled = torch.compile(model, backend="dsa")  # options come from the attached config
    with torch.no_grad():
        first = _hidden(compiled(ids))
    graphs = _graphs_logged(caplog)
    _change_indexers(model)
    with torch.no_grad():
        second = _hidden(compiled(ids))
    assert _graphs_logged(caplog) == graphs  # no recompile
    assert not torch.allclose(first, second, atol=1e-4)
    torch.testing.assert_close(second, _run(model, ids, mode="eager"), rtol=1e-4, atol=1e-4)


def test_torch_compile_attaches_at_first_capture_and_keeps_them():
    model = tiny_model("gpt2", "sdpa")
    compiled = torch.compile(model, backend="dsa", options={**OPTIONS, "mode": "eager"})
    with torch.no_grad():
        compiled(_ids())
    indexers = indexers_of(model)
    assert sorted(indexers) == ["transformer.h.0.attn.dsa_indexer",
                                "transformer.h.1.attn.dsa_indexer"]
    assert model.dsa_config.topk == 8
    _change_indexers(model)
    kept = {n: [t.clone() for t in m.tensors()] for n, m in indexers.items()}
    with torch.no_grad():  # another batch size: a recompile, which must not re-initialise
        out = _hidden(compiled(torch.cat([_ids(), _ids(2)])))
    assert indexers_of(model) == indexers
    for name, tensors in kept.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, indexers[name].tensors(),
                                                     strict=True))
    torch.testing.assert_close(out[:1], _run(model, _ids(), mode="eager"), rtol=1e-5, atol=1e-5)


def test_a_detached_compiled_model_runs_dense(caplog):
    model = tiny_model("llama", "sdpa")
    ids = _ids()
    dsa_compile.attach(model, ids, **OPTIONS)
    compiled = dsa_compile.compile(model, mode="eager")
    with torch.no_grad():
        sparse = _hidden(compiled(ids))
        dsa_compile.detach(model)
        dense = _hidden(compiled(ids))
    assert not torch.allclose(sparse, dense, atol=1e-4)
    torch.testing.assert_close(dense, _hidden(model(ids)), rtol=1e-5, atol=1e-5)
    assert any("detached" in r.getMessage() for r in caplog.records)


def test_the_adapter_option_loads_inside_torch_compile(tmp_path):
    model = tiny_model("bert", "sdpa")
    ids = _ids()
    dsa_compile.attach(model, ids, **OPTIONS)
    _change_indexers(model)
    dsa_compile.save_adapter(model, tmp_path)
    expected = _run(model, ids, mode="eager")
    fresh = tiny_model("bert", "sdpa")
    compiled = torch.compile(fresh, backend="dsa", options={"adapter": str(tmp_path),
                                                            "mode": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(_hidden(compiled(ids)), expected, rtol=0, atol=0)
    assert fresh.dsa_config.adapter == str(tmp_path) and fresh.dsa_config.topk == 8
    torch.testing.assert_close(fresh.encoder.layer[1].attention.self.dsa_indexer.q_proj,
                               model.encoder.layer[1].attention.self.dsa_indexer.q_proj)


def test_adapter_files(tmp_path):
    model = tiny_model("qwen2", "sdpa")
    dsa_compile.attach(model, _ids(), **OPTIONS)
    dsa_compile.save_adapter(model, tmp_path)
    document = json.loads((tmp_path / "dsa_config.json").read_text())
    assert document["format_version"] == 1
    assert DSAConfig.from_dict(document["config"]) == DSAConfig(**OPTIONS)
    site = document["sites"][0]
    assert site["name"] == "model.layers.0.self_attn.dsa_indexer"
    assert (site["heads"], site["kv_heads"], site["head_dim"]) == (4, 2, 16)
    assert site["shapes"] == {"q_proj": [64, 128], "k_proj": [32, 32], "head_weights": [4]}
    assert site["base_weights"]["q"]["name"] == "model.layers.0.self_attn.q_proj.weight"
    assert site["init"].startswith("weights, RoPE-aware")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "dsa_indexer.safetensors"))
    assert len(tensors) == 6 and "model.layers.1.self_attn.dsa_indexer.k_proj" in tensors


def _saved(tmp_path, arch="llama", **options):
    model = tiny_model(arch, "sdpa")
    dsa_compile.attach(model, _ids(), **{**OPTIONS, **options})
    dsa_compile.save_adapter(model, tmp_path)
    return model


def test_loading_into_another_model_names_the_first_mismatching_site(tmp_path):
    _saved(tmp_path)
    with pytest.raises(DSAAdapterError, match=r"'model\.layers\.0\.self_attn'.*q_proj\.weight "
                                              "differs"):
        dsa_compile.load_adapter(tiny_model("qwen2", "sdpa"), tmp_path)  # same shapes
    with pytest.raises(DSAAdapterError, match=r"'model\.layers\.0\.self_attn'.*no module"):
        dsa_compile.load_adapter(tiny_model("gpt2", "sdpa"), tmp_path)
    with pytest.raises(DSAAdapterError, match="differs"):
        dsa_compile.load_adapter(tiny_model("llama", "sdpa", seed=3), tmp_path)
    other = tiny_model("llama", "sdpa", seed=3)
    dsa_compile.load_adapter(other, tmp_path, strict=False)  # the user's call
    assert len(indexers_of(other)) == 2


def test_shape_mismatch_names_the_site(tmp_path):
    import transformers

    _saved(tmp_path)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4)
    with pytest.raises(DSAAdapterError, match=r"'model\.layers\.0\.self_attn'.*64 rows.*32"):
        dsa_compile.load_adapter(transformers.LlamaForCausalLM(config), tmp_path)


def test_missing_and_unexpected_sites(tmp_path):
    _saved(tmp_path, include="*.layers.0.*")
    attached = tiny_model("llama", "sdpa")
    dsa_compile.attach(attached, _ids(), **OPTIONS)
    with pytest.raises(DSAAdapterError, match=r"indexer at 'model\.layers\.1\.self_attn"):
        dsa_compile.load_adapter(attached, tmp_path)
    fresh = tiny_model("llama", "sdpa")
    dsa_compile.load_adapter(fresh, tmp_path)  # the adapter's own include: one site
    assert list(indexers_of(fresh)) == ["model.layers.0.self_attn.dsa_indexer"]
    with pytest.raises(DSAAdapterError, match=r"'model\.layers\.1\.self_attn' of the model has "
                                              "no indexer"):
        dsa_compile.load_adapter(tiny_model("llama", "sdpa"), tmp_path, _ids(), include=())
    with pytest.raises(DSAAdapterError, match="fixed by the adapter"):
        dsa_compile.load_adapter(tiny_model("llama", "sdpa"), tmp_path, index_heads=2)
    with pytest.raises(DSAAdapterError, match="dsa_config.json is missing"):
        dsa_compile.load_adapter(tiny_model("llama", "sdpa"), tmp_path / "nowhere")
    with pytest.raises(DSAAdapterError, match="no dsa indexers to save"):
        dsa_compile.save_adapter(tiny_model("llama", "sdpa"), tmp_path / "empty")


def test_load_updates_attached_indexers_in_place(tmp_path):
    source = _saved(tmp_path)
    model = tiny_model("llama", "sdpa")
    dsa_compile.attach(model, _ids(), **OPTIONS)
    _change_indexers(model)
    indexer = model.model.layers[0].self_attn.dsa_indexer
    compiled = dsa_compile.compile(model, mode="eager")
    with torch.no_grad():
        compiled(_ids())
    dsa_compile.load_adapter(model, tmp_path)
    assert model.model.layers[0].self_attn.dsa_indexer is indexer  # the same parameters
    torch.testing.assert_close(indexer.q_proj, source.model.layers[0].self_attn.dsa_indexer.q_proj)
    with torch.no_grad():
        torch.testing.assert_close(_hidden(compiled(_ids())), _run(source, _ids(), mode="eager"))


def test_explain_and_export_use_the_attached_indexers():
    model = tiny_model("llama", "sdpa")
    dsa_compile.attach(model, _ids(), **OPTIONS)
    keys = set(model.state_dict())
    report = dsa_compile.explain(model, _ids())
    assert [s["indexer"] for s in report.rewritten] == \
        ["model.layers.0.self_attn.dsa_indexer", "model.layers.1.self_attn.dsa_indexer"]
    program = dsa_compile.export(model, (_ids(),))
    assert "model.layers.1.self_attn.dsa_indexer.q_proj" in program.state_dict
    assert "model.layers.1.self_attn.q_proj.weight" in program.state_dict
    assert set(model.state_dict()) == keys  # neither changed the model


def test_explain_never_changes_an_unattached_model():
    model = tiny_model("llama", "sdpa")
    keys = set(model.state_dict())
    assert dsa_compile.explain(model, _ids(), **OPTIONS).rewritten
    assert set(model.state_dict()) == keys and not hasattr(model, "dsa_config")


def test_config_dict_round_trip():
    config = DSAConfig(topk=64, include=["*.layers.0.*"], query_block=1, adapter="x")
    data = json.loads(json.dumps(config.to_dict()))
    assert DSAConfig.from_dict(data) == config
    with pytest.raises(dsa_compile.DSAConfigError, match="unknown"):
        DSAConfig.from_dict({**data, "bogus": 1})


def test_traced_locals_is_empty_outside_a_compile_and_names_self_inside():
    assert traced_locals() == {}
    seen = {}

    def backend(gm, example_inputs):
        seen.update(traced_locals())
        return gm.forward

    model = torch.nn.Linear(3, 3)
    torch.compile(model, backend=backend)(torch.randn(2, 3))
    assert any(v is model for v in seen.values())


def test_instances_sharing_compiled_code_use_their_own_indexers(caplog, tmp_path):
    """Dynamo reuses one class's compiled code for its other instances: each must still run on
    its own indexers (attached: its module's; never attached: the training-free init of its
    own weights)."""
    import copy

    caplog.set_level(logging.INFO, logger="dsa_compile")
    ids = _ids()
    a, b, c = (tiny_model("llama", "sdpa", seed=s) for s in (0, 1, 2))
    c_attached = copy.deepcopy(c)
    for model in (a, b, c_attached):
        dsa_compile.attach(model, ids, **OPTIONS)
    _change_indexers(b)
    dsa_compile.save_adapter(b, tmp_path)
    d = tiny_model("llama", "sdpa", seed=1)
    dsa_compile.load_adapter(d, tmp_path)  # no capture: d's graph is a's compiled code
    expected_b, expected_c = _run(b, ids, mode="eager"), _run(c_attached, ids, mode="eager")
    torch.compiler.reset()
    options = {**OPTIONS, "mode": "eager"}
    with torch.no_grad():
        torch.compile(a, backend="dsa", options=options)(ids)
        graphs = _graphs_logged(caplog)
        out_b = _hidden(torch.compile(b, backend="dsa", options=options)(ids))
        out_c = _hidden(torch.compile(c, backend="dsa", options=options)(ids))
        out_d = _hidden(torch.compile(d, backend="dsa", options=options)(ids))
    assert _graphs_logged(caplog) == graphs  # b, c and d ran a's compiled code
    torch.testing.assert_close(out_b, expected_b, rtol=0, atol=0)
    torch.testing.assert_close(out_d, expected_b, rtol=0, atol=0)
    torch.testing.assert_close(out_c, expected_c, rtol=0, atol=0)
    assert not indexers_of(c)  # c's indexers were made for the call, not registered
