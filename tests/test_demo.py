"""The main job on the embedded MiniLM, and the inspect command (real model, real text)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsa_compile.demo import format_report, run_demo


@pytest.mark.slow
def test_demo_measures_what_it_claims():
    result = run_demo(topk=64, length=512, speed=False)
    assert len(result["sites"]) == 6 and all(s["rewritten"] for s in result["sites"])
    assert result["exactness_max_abs_diff"] < 1e-4
    # The training-free indexer reaches >= 0.9 of the best head-shared selection.
    assert result["recall_ratio"] >= 0.9, result["recall_per_layer"]
    assert 0.5 < result["best_head_shared_recall"] < 1
    assert result["embedding_cosine"] > 0.85
    assert "recall" in format_report(result)


def test_inspect_cli_json_on_minilm():
    done = subprocess.run([sys.executable, "-m", "dsa_compile.cli", "inspect", "minilm",
                           "--length", "32", "--json"], capture_output=True, text=True, check=True)
    sites = json.loads(done.stdout[done.stdout.index("["):])
    assert [s["module"] for s in sites] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
    assert all(s["pattern"] == "sdpa" and s["rewritten"] for s in sites)
