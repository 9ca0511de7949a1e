"""``dsa bench`` end to end on a tiny size (numbers not asserted: speed is for benchmarks)."""

from __future__ import annotations

import json

import pytest
import torch

from dsa_compile import DSAConfig
from dsa_compile.bench import render_table, run_bench, save


def test_bench_runs_both_backends_and_writes_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr("dsa_compile.bench.MODEL_SHAPE", dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128))
    result = run_bench([64, 96], layers=1, repeats=1,
                       config=DSAConfig(topk=16, mode="eager"), progress=lambda _: None)
    assert [r["tokens"] for r in result["rows"]] == [64, 96]
    assert all(r["inductor_s"] > 0 and r["dsa_s"] > 0 for r in result["rows"])
    assert save(result, tmp_path / "bench") == [tmp_path / f"bench.{s}" for s in ("json", "md", "png")]
    assert "| 96 |" in render_table(result)
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["topk"] == 16
    assert (tmp_path / "bench.png").stat().st_size > 10_000


@pytest.mark.parametrize(("lengths", "layers", "repeats"), [([], 1, 1), ([0], 1, 1), ([64], 0, 1),
                                                            ([64], 1, 0)])
def test_bench_rejects_empty_work(lengths, layers, repeats):
    with pytest.raises(ValueError, match="must be >= 1"):
        run_bench(lengths, layers, repeats)


def test_bench_times_the_plain_pytorch_model_too(monkeypatch):
    """``--model plain``: the same layers without transformers (SDPA with ``is_causal``); the
    result says which model and device it measured."""
    monkeypatch.setattr("dsa_compile.bench.MODEL_SHAPE", dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128))
    result = run_bench([64], layers=1, repeats=1, config=DSAConfig(topk=16, mode="eager"),
                       progress=lambda _: None, device="cpu", model="plain")
    assert result["model"]["kind"] == "plain" and result["model"]["hidden_size"] == 64
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    assert result["rows"][0]["dsa_s"] > 0


def test_bench_names_what_it_cannot_run():
    with pytest.raises(ValueError, match="model must be one of"):
        run_bench([64], layers=1, repeats=1, device="cpu", model="gpt")
    with pytest.raises(ValueError, match="shape must be one of"):
        run_bench([64], layers=1, repeats=1, device="cpu", shape="70b")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            run_bench([64], layers=1, repeats=1, device="cuda")
