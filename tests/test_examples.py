"""Examples run and say what they claim (so they cannot rot)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ops_quickstart():
    report = load("ops_quickstart").main(length=300, topk=64)
    assert report["max_abs_err_full_selection_vs_sdpa"] < 1e-5
    assert report["selected_per_query_mean"] > 50
    assert report["rows_tile_shared"] == 5
    assert 0 < report["rel_diff_sparse_vs_dense"] < 1.5
    assert report["lse_finite"]
