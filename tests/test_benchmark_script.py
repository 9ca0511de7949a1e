"""The CPU benchmark script runs end to end on a tiny size (its numbers are not asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_ops.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("cpu_ops", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(module.SHAPE, "topk", 256)
    monkeypatch.setattr(module, "RAND_BLOCK", 32)
    monkeypatch.setattr(module, "QUERY_BLOCK", 32)
    monkeypatch.setattr(module, "KEY_BLOCK", 16)
    return module


def test_random_blocks_are_causal_and_include_the_diagonal(bench):
    chosen = bench.random_causal_blocks(1000, 100, 4, seed=1)
    for i, row in enumerate(chosen):
        ids = row[row >= 0]
        assert i in ids.tolist() and (ids <= i).all() and ids.numel() == min(i + 1, 4)


def test_benchmark_writes_table_json_and_plot(bench, tmp_path):
    out = tmp_path / "cpu_ops"
    bench.main(["--lengths", "256", "512", "--repeats", "1", "--no-flex", "--out", str(out)])
    table = out.with_suffix(".md").read_text()
    assert "| 512 |" in table and "dsa speed-up" in table
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]["256"]) >= {"sdpa", "dsa", "indexer", "sparse_attn", "sparse_rand"}
    assert out.with_suffix(".png").stat().st_size > 10_000
