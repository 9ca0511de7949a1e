"""The dsa backend on tiny configs of real HF architectures, eager and sdpa attention."""

from __future__ import annotations

import pytest
import torch
from models import ARCHS, LAYERS, OpCounter, tiny_model

import dsa_compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()  # HF families share forward code: keep under the recompile limit
    yield
    torch.compiler.reset()


def first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.logits if hasattr(output, "logits") \
        else output.last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_sites_found_exact_when_short_sparse_when_long(arch, impl):
    model = tiny_model(arch, impl)
    ids = torch.randint(0, 100, (2, 48))
    report = dsa_compile.explain(model, ids, topk=16)
    assert len(report.sites) == LAYERS, report.table()
    assert len(report.rewritten) == LAYERS, report.table()
    expected_pattern = "sdpa" if impl == "sdpa" else "matmul_softmax_matmul"
    # (+causal_mask where HF materialises its causal mask under Dynamo: transformers < 5.24)
    assert {s["pattern"].split("+")[0] for s in report.sites} == {expected_pattern}

    with torch.no_grad():
        reference = first_output(model(ids))
        short = torch.compile(model, backend="dsa", options={"topk": 64, "mode": "eager"})
        counter = OpCounter()
        with counter:
            out = first_output(short(ids))
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
        assert counter.counts.get("dsa.sparse_attention", 0) == 0  # dense below topk

        torch.compiler.reset()
        long = torch.compile(model, backend="dsa",
                             options={"topk": 16, "mode": "eager", "query_block": 4})
        counter = OpCounter()
        with counter:
            sparse = first_output(long(ids))
        assert counter.counts.get("dsa.sparse_attention", 0) == LAYERS
        assert counter.counts.get("dsa.indexer_topk", 0) == LAYERS
        assert torch.isfinite(sparse).all()
        assert not torch.allclose(sparse, reference)  # 16 of 48 keys: it really is sparse


@pytest.mark.parametrize("arch, impl", [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager"),
                                        ("bloom", "eager"), ("falcon", "eager"), ("falcon", "sdpa")])
def test_later_tokens_never_change_earlier_outputs_at_topk_below_length(arch, impl):
    """Causal HF models with left padding, a quarter of the keys selected per query: exact with
    every key, and no output before position p moves when the tokens from p on change."""
    model = tiny_model(arch, impl)
    ids = torch.randint(0, 100, (2, 48))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :6] = 0
    options = {"mode": "eager", "min_seq_len": 0, "query_block": 1, "key_block": 0}
    report = dsa_compile.explain(model, ids, topk=12, min_seq_len=0)
    assert len(report.rewritten) == LAYERS, report.table()
    with torch.no_grad():
        reference = first_output(model(ids, attention_mask=mask))
        exact = torch.compile(model, backend="dsa", options={**options, "topk": 48})
        torch.testing.assert_close(first_output(exact(ids, attention_mask=mask)), reference,
                                   atol=2e-5, rtol=1e-4)
        torch.compiler.reset()
        sparse = torch.compile(model, backend="dsa", options={**options, "topk": 12})
        out = first_output(sparse(ids, attention_mask=mask))
        later = ids.clone()
        later[:, 24:] = torch.randint(0, 100, (2, 24))
        moved = first_output(sparse(later, attention_mask=mask))
    torch.testing.assert_close(moved[:, 6:24], out[:, 6:24], atol=1e-5, rtol=0)


def test_padding_mask_is_respected_by_the_sparse_path():
    """BERT with padding: padded keys must never be attended, dense or sparse."""
    model = tiny_model("bert", "sdpa")
    ids = torch.randint(0, 100, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).last_hidden_state
        exact = torch.compile(model, backend="dsa", options={"topk": 64, "mode": "eager"})
        torch.testing.assert_close(exact(ids, attention_mask=mask).last_hidden_state, reference,
                                   atol=2e-5, rtol=1e-4)
        torch.compiler.reset()
        # topk = every unpadded key of row 1: selection must skip the 15 padded keys exactly.
        sparse = torch.compile(model, backend="dsa",
                               options={"topk": 25, "min_seq_len": 0, "mode": "eager",
                                        "query_block": 1, "key_block": 0})
        out = sparse(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[1], reference[1], atol=2e-5, rtol=1e-4)


def test_inductor_compiles_the_rewritten_llama():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        reference = model(ids).logits
        exact = torch.compile(model, backend="dsa", options={"topk": 64})
        torch.testing.assert_close(exact(ids).logits, reference, atol=2e-5, rtol=1e-4)


def test_inductor_with_dynamic_lengths_matches_the_eager_rewrite():
    model = tiny_model("llama", "sdpa")
    options = {"topk": 16, "query_block": 4}
    graphs = []
    backend = dsa_compile.backend.make_backend(dsa_compile.DSAConfig(**options), graphs.append)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    eager = torch.compile(model, backend="dsa", options={**options, "mode": "eager"},
                          dynamic=True)
    counts = []
    with torch.no_grad():
        for length in (20, 33, 47):
            ids = torch.randint(0, 100, (1, length))
            torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, atol=1e-4,
                                       rtol=1e-4)
            counts.append(len(graphs))
    assert counts[0] >= 1 and counts == [counts[0]] * 3  # no recompile for a new length


def test_dynamic_lengths_do_not_recompile_per_length():
    model = tiny_model("llama", "eager")
    graphs = []
    backend = dsa_compile.backend.make_backend(
        dsa_compile.DSAConfig(topk=8, mode="eager", query_block=4), graphs.append)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    counter = OpCounter()
    with torch.no_grad(), counter:
        for length in (20, 29, 37, 44):
            assert torch.isfinite(compiled(torch.randint(0, 100, (1, length))).logits).all()
    assert len(graphs) == 1
    assert counter.counts["dsa.sparse_attention"] == 4 * LAYERS


def test_include_exclude_select_sites():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (1, 24))
    report = dsa_compile.explain(model, ids, topk=8, exclude=["*.layers.1.*"])
    assert [s["rewritten"] for s in report.sites] == [True, False]
    assert "excluded by" in report.sites[1]["reason"]
    torch.compiler.reset()
    report = dsa_compile.explain(model, ids, topk=8, include=["*.layers.1.*"])
    assert [s["rewritten"] for s in report.sites] == [False, True]
    assert "layers.1.self_attn" in report.table()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_deepseek_v32_runs_sparse_on_its_own_indexer(impl):
    """HF folds DeepseekV32's top-k into a dense mask; the rewrite uses the indices directly."""
    model = tiny_model("deepseek_v32", impl)
    ids = torch.randint(0, 100, (1, 40))  # index_topk = 8 < 40: really sparse
    report = dsa_compile.explain(model, ids)
    assert len(report.rewritten) == LAYERS, report.table()
    assert all("+model_indexer" in s["pattern"] for s in report.sites)
    graphs = []
    backend = dsa_compile.backend.make_backend(dsa_compile.DSAConfig(mode="eager"), graphs.append)
    torch.compiler.reset()
    with torch.no_grad(), OpCounter() as counter:
        out = torch.compile(model, backend=backend)(ids).logits
        reference = model(ids).logits
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    assert counter.counts.get("dsa.sparse_attention") == LAYERS
    assert counter.counts.get("dsa.indexer_topk") is None  # the model's indexer selects
    rewritten_code = graphs[0].graph_module.code
    assert "scatter" not in rewritten_code  # the dense [B, 1, S, T] index mask is gone
