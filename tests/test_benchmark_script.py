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


def test_decode_benchmark_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("decode_bench", BENCH.parent / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--contexts", "300", "--topk", "32", "--steps", "1", "--out", str(tmp_path)])
    table = (tmp_path / "decode_static.md").read_text()
    assert "| 300 |" in table and "step speed-up" in table
    assert (tmp_path / "decode_static.png").stat().st_size > 10_000
    row = json.loads((tmp_path / "decode_static.json").read_text())[0]
    # layers x (tokens + 8 free slots of the static cache) x DI x fp32
    assert row["index_cache_mib"] * 2**20 == 8 * (300 + 8) * 32 * 4


def test_granularity_benchmark_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("granularity", BENCH.parent / "granularity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "granularity"
    result = module.main(["--budgets", "16", "--length", "256", "--repeats", "1", "--out",
                          str(out)])
    rows = {row["granularity"]: row for row in result["rows"]}
    # top-16 on CPU: the budget's own default is 4-query tiles and 4-key blocks
    assert set(rows) == {"(128, 64)", "(4, 4) default", "(4, 4, 16 candidates)",
                         "(32, 8)", "(16, 16)", "(16, 0)", "(1, 0)"}
    assert all(0.0 < row["cosine"] <= 1.0 and 0.0 < row["recall_ratio"] <= 1.0 + 1e-6
               and row["seconds"] > 0 for row in rows.values())
    # exact per-query top-16 keeps the embedding closer than one selection per 128 queries
    assert rows["(1, 0)"]["cosine"] > rows["(128, 64)"]["cosine"]
    assert "| 16 | (4, 4) default |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_session_script_calls_what_the_scripts_accept():
    """``benchmarks/gpu_session.sh`` is run once per GPU session, on a machine lent for minutes:
    it must be valid bash, know every part it documents, and pass arguments that the scripts
    it calls accept (a misspelt section would be skipped, an unknown flag would cost the run)."""
    import re
    import shlex
    import subprocess

    pytest.importorskip("triton")
    path = BENCH.parent / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(path)], check=True)
    usage = subprocess.run(["bash", str(path)], capture_output=True, text=True,
                           env={"OUT": "/nonexistent-gpu-session", "PATH": "/usr/bin:/bin"})
    assert usage.returncode == 2 and "kernels|models|decode" in usage.stderr
    text = path.read_text().replace("\\\n", " ")
    gpu_check, decode = _load("gpu_check"), _load("decode")
    checks = re.findall(r"^\s*check (\d+) (.+)$", text, flags=re.M)
    assert len(checks) == 2
    for cap, args in checks:
        args = gpu_check.parse_args(shlex.split(args))
        assert args.budget_s < int(cap), "a section may start just before the budget ends"
    kernels = gpu_check.parse_args(shlex.split(checks[0][1]))
    assert {"correct", "layer", "mla", "decode"} <= set(kernels.only)
    call = re.search(r"python3 benchmarks/decode\.py (.+?) >>", text).group(1)
    args = decode.parse_args(shlex.split(call.replace('"$OUT', '"/tmp')))
    assert args.device == "cuda" and args.selector == "cooperative" and args.compile
