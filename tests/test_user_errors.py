"""Mistakes in the command line's input end in one line (``dsa: error: ...``) and exit status 2,
never a traceback; ``dsa inspect`` refuses checkpoints that need their own code."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from models import tiny_model

from dsa_compile.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``dsa ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, expected: str) -> None:
    assert code == 2, (out, err)
    assert out == "" and "Traceback" not in err
    assert err.startswith("dsa: error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err


@pytest.mark.parametrize(("argv", "expected"), [
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["demo", "--length", "0"], "argument --length: must be an integer >= 1, got '0'"),
    (["demo", "--length", "ten"], "argument --length: must be an integer >= 1, got 'ten'"),
    (["demo", "--topk", "0"], "argument --topk: must be an integer >= 1"),
    (["inspect", "minilm", "--length", "-5"], "argument --length: must be an integer >= 1, got '-5'"),
    (["inspect", "minilm", "--topk", "0"], "argument --topk: must be an integer >= 1"),
    (["inspect", "minilm", "--attn", "flash"], "argument --attn: invalid choice: 'flash'"),
    (["inspect"], "the following arguments are required: model"),
    (["bench", "--repeats", "0"], "argument --repeats: must be an integer >= 1"),
    (["bench", "--layers", "0"], "argument --layers: must be an integer >= 1"),
    (["bench", "--lengths", "0"], "argument --lengths: must be an integer >= 1"),
    (["bench", "--lengths", "4096", "-1"], "argument --lengths: must be an integer >= 1, got '-1'"),
    (["bench", "--topk", "0"], "argument --topk: must be an integer >= 1"),
    (["demo", "--length", "513"], "at most 512 tokens"),
])
def test_bad_arguments_are_one_line(argv, expected, capsys):
    assert_one_line_error(*run_cli(argv, capsys), expected)


def test_bare_dsa_prints_help_to_stderr_and_fails(capsys):
    code, out, err = run_cli([], capsys)
    assert code == 2 and out == "" and err.startswith("usage: dsa")
    done = subprocess.run([sys.executable, "-m", "dsa_compile.cli"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2 and done.stdout == "" and "COMMAND" in done.stderr


@pytest.mark.parametrize("command", ["demo", "bench", "inspect"])
def test_every_flag_shows_its_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    entries = re.split(r"\n  (?=-)", options)[1:]  # one entry per flag, wrapped lines included
    assert len(entries) >= 4
    for entry in entries:
        if not entry.startswith("-h, --help"):
            assert "(default: " in " ".join(entry.split()), entry


@pytest.mark.parametrize(("config", "expected"), [
    ({"model_type": "llama", "auto_map": {"AutoModel": "modeling_mine.MyModel"}},
     "needs trust_remote_code \\(its config.json has an 'auto_map'"),
    ({"model_type": "my_own_arch"},
     "needs trust_remote_code \\(its model_type 'my_own_arch' is unknown to transformers"),
    ({"hidden_size": 8}, "needs trust_remote_code \\(its model_type None is unknown"),
    ([1, 2], "is not a JSON object"),
])
def test_inspect_refuses_checkpoints_that_need_their_own_code(config, expected, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run_cli(["inspect", str(tmp_path)], capsys), expected)


def test_inspect_reports_unloadable_directories_in_one_line(tmp_path, capsys):
    assert_one_line_error(*run_cli(["inspect", str(tmp_path / "missing")], capsys),
                          "neither 'minilm' nor a directory with a config.json")
    (tmp_path / "config.json").write_text("{not json")
    assert_one_line_error(*run_cli(["inspect", str(tmp_path)], capsys), "cannot read .*config.json")
    tiny_model("llama", "sdpa").config.save_pretrained(tmp_path)  # a config, no weights
    assert_one_line_error(*run_cli(["inspect", str(tmp_path)], capsys), "cannot load ")
    assert_one_line_error(*run_cli(["inspect", "minilm", "--length", "600"], capsys),
                          "the model takes at most 512 positions")


def test_inspect_says_when_the_length_runs_dense(tmp_path, capsys):
    tiny_model("llama", "sdpa").save_pretrained(tmp_path)
    code, out, err = run_cli(["inspect", str(tmp_path), "--length", "24", "--topk", "32"], capsys)
    assert code == 0, err
    assert "2 attention site(s): 2 rewritten" in out
    assert "note: at --length 24 every site runs dense SDPA" in out
    code, out, err = run_cli(["inspect", str(tmp_path), "--length", "24", "--topk", "16", "--json"],
                             capsys)
    assert code == 0 and len(json.loads(out)) == 2  # stdout stays JSON
    assert "runs dense" not in out + err  # 24 > 16: sparse
    code, out, err = run_cli(["inspect", str(tmp_path), "--length", "16", "--topk", "16", "--json"],
                             capsys)
    assert code == 0 and len(json.loads(out)) == 2 and "every site runs dense SDPA" in err


FAKE_RESULT = {"date": "2025-01-01", "torch": "x", "threads": 1, "model": {"num_hidden_layers": 1},
               "config": {}, "rows": [{"tokens": 64, "inductor_s": 1.0, "dsa_s": 0.5,
                                       "speedup": 2.0}]}


def test_bench_writes_files_only_under_out(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_bench(lengths, layers, repeats, config, progress, device, model, shape):
        calls.append((lengths, layers, repeats, config.topk, device, model, shape))
        return FAKE_RESULT

    monkeypatch.setattr("dsa_compile.bench.run_bench", fake_run_bench)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out, _ = run_cli(["bench", "--lengths", "64", "--layers", "1", "--repeats", "1",
                            "--topk", "16"], capsys)
    assert code == 0 and "| 64 | 1.00 | 0.50 | 2.00x |" in out
    assert calls == [([64], 1, 1, 16, None, "hf", "small")]  # device None: the GPU if any
    run_cli(["bench", "--lengths", "64", "--device", "cpu", "--model", "plain", "--shape", "8b"],
            capsys)
    assert calls[-1][4:] == ("cpu", "plain", "8b")
    assert list(cwd.iterdir()) == []  # nothing written without --out

    code, out, _ = run_cli(["bench", "--lengths", "64", "--out", str(tmp_path / "res" / "run.v2")],
                           capsys)
    assert code == 0 and "wrote " in out
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["run.v2.json", "run.v2.md",
                                                                    "run.v2.png"]
    assert list(cwd.iterdir()) == []
