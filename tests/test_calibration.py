"""Calibration of the indexers on the model's own attention, and ``dsa convert``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_model

import dsa_compile
from dsa_compile.calibrate import calibrate, measure_recall
from dsa_compile.cli import main as dsa
from dsa_compile.kernels.attention import SiteCall
from dsa_compile.kernels.calibration import selection_recall, site_loss, soft_selection
from dsa_compile.ownership import indexers_of

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()


def _call(causal: bool, lq: int = 40, lk: int = 40, mask: bool = False) -> SiteCall:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h, n in ((4, lq), (2, lk), (2, lk)))
    attn_mask = None
    if mask:
        attn_mask = torch.rand(2, 1, lq, lk, generator=gen) > 0.3
        attn_mask[..., 0] = True
    params = [torch.randn(64, 2 * 8, generator=gen).requires_grad_(),
              torch.randn(32, 8, generator=gen).requires_grad_(),
              torch.rand(2, generator=gen).requires_grad_()]

    def dense() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=True)

    return SiteCall(q, k, v, attn_mask, *params, causal, None, True, dense)


def test_soft_selection_ignores_shift_and_scale_and_marks_topk():
    scores = torch.randn(3, 50)
    scores[:, :5] = float("-inf")
    soft = soft_selection(scores, 8)
    torch.testing.assert_close(soft_selection(scores * 3.0 + 7.0, 8), soft)
    assert torch.equal((soft > 0.5).sum(-1), torch.full((3,), 8))
    assert torch.equal(soft > 0.5, torch.zeros_like(soft, dtype=torch.bool).scatter_(
        -1, scores.topk(8, -1).indices, True))
    assert (soft[:, :5] == 0).all()


@pytest.mark.parametrize("causal,mask,query_block", [(False, False, 1), (True, False, 4),
                                                     (False, True, 1), (True, True, 8)])
def test_site_loss_recall_matches_the_runtime_selection(causal, mask, query_block):
    """site_loss's recall (exact top-k of tile scores) is what dsa::indexer_topk selects with
    every key scored; its best is the best selection at that granularity."""
    call = _call(causal, mask=mask)
    measured = site_loss(call, 8, query_block)
    recall, best = selection_recall(call, 8, query_block, key_block=0)
    assert measured.recall == pytest.approx(recall, abs=1e-5)
    assert measured.best_recall == pytest.approx(best, abs=1e-5)
    assert 0 < recall <= best <= 1
    measured.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (call.q_proj, call.k_proj, call.head_weights))


def test_selection_recall_against_a_brute_force_count():
    call = _call(False)
    recall, best = selection_recall(call, 8, 1, 0)
    probs = torch.softmax(torch.einsum("bhtd,bhsd->bhts", call.q,
                                       call.k.repeat_interleave(2, 1)) * 16**-0.5, -1).mean(1)
    assert best == pytest.approx(float(probs.topk(8, -1).values.sum(-1).mean()), abs=1e-5)
    assert recall < best  # a random indexer is worse than the best selection


def _minilm_windows(length: int, count: int):
    from dsa_compile.convert import calibration_text, token_batches
    from dsa_compile.demo import load_minilm, real_text_ids

    model, tokenizer = load_minilm("sdpa")
    return (model, token_batches(tokenizer, calibration_text(), length, count),
            real_text_ids(tokenizer, length))


def test_calibration_raises_held_out_recall_on_minilm(capsys):
    """Trained on other text, evaluated on held-out text: exact per-query top-16 recall rises
    and the indexers stay the model's own."""
    model, train, held_out = _minilm_windows(128, 16)
    dsa_compile.attach(model, train[0], topk=16, query_block=1, key_block=0, min_seq_len=0)
    before = measure_recall(model, [held_out])
    indexer = model.encoder.layer[2].attention.self.dsa_indexer
    initial = indexer.q_proj.clone()
    # 60 steps: ties now go to lower key indices (the [CLS] sink among them), which raised the
    # training-free recall; 30 steps gained only 0.007 over it.
    result = calibrate(model, train, steps=60, lr=1e-3)
    after = measure_recall(model, [held_out])
    mean = {name: sum(v[0] for v in r.values()) / len(r) for name, r in (("b", before),
                                                                        ("a", after))}
    best = sum(v[1] for v in after.values()) / len(after)
    assert mean["a"] > mean["b"] + 0.01, (mean, best)
    assert mean["a"] <= best
    assert not torch.equal(indexer.q_proj, initial)
    assert not indexer.q_proj.requires_grad  # frozen again
    assert "calibrated (recall): 60 steps" in indexer.info.init
    assert len(result.steps) == 60 and result.steps[-1]["loss"] < 0
    assert "calibrate [" in capsys.readouterr().err


def test_calibrate_attaches_when_needed_and_checks_its_input():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (1, 24))
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="has none"):
        measure_recall(model, [ids])
    calibrate(model, [ids], steps=2, progress=False, topk=4, query_block=2)
    assert len(indexers_of(model)) == 2 and model.dsa_config.topk == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(out: Path, world: int) -> None:
    port = str(_free_port())
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-P", str(TESTS / "distributed_calibration.py"),
                               str(out)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(world)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()[-3000:]


def test_two_gloo_ranks_give_the_adapter_of_one_rank(tmp_path):
    """Data-parallel calibration: 2 ranks (one batch each per step, gradients all-reduced)
    equal 1 rank running both batches per step, to 1e-5."""
    from safetensors.torch import load_file

    _ranks(tmp_path / "one", 1)
    _ranks(tmp_path / "two", 2)
    one = load_file(str(tmp_path / "one" / "dsa_indexer.safetensors"))
    two = load_file(str(tmp_path / "two" / "dsa_indexer.safetensors"))
    assert one.keys() == two.keys() and len(one) == 6
    initial = tiny_model("llama", "sdpa")
    dsa_compile.attach(initial, torch.randint(0, 100, (1, 48)), topk=8, query_block=1)
    moved = max(float((one[k] - initial.state_dict()[k]).abs().max()) for k in one)
    assert moved > 1e-3  # calibration changed them
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5)


def test_dsa_convert_writes_adapter_and_report(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert dsa(["convert", "minilm", "--out", str(out), "--steps", "3", "--length", "128",
                "--topk", "16", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| recall, exact per-query top-k |" in printed
    # the granularity it ran at, resolved: top-16 on CPU -> 4-query tiles, 4-key blocks
    assert "query_block=4, key_block=4 on cpu (the device's default for this budget)" in printed
    for name in ("dsa_config.json", "dsa_indexer.safetensors", "report.md", "report.png",
                 "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    saved = "after" if report["saved"] == "calibrated" else "before"
    assert report["cosine_via_adapter"] == pytest.approx(report[saved]["cosine"], abs=1e-5)
    assert report[saved]["cosine"] == max(report["before"]["cosine"], report["after"]["cosine"])
    assert set(report["before"]["budget"]) == {"16", "32", "64", "128", "256"}
    assert 0 < report["before"]["cosine"] <= report["before"]["cosine_double_topk"] + 0.05 <= 1.05
    assert len(report["after"]["default"]["per_layer"]) == 6
    fresh, _ = dsa_compile.demo.load_minilm("sdpa")
    assert len(dsa_compile.load_adapter(fresh, out)) == 6


def test_dsa_convert_never_saves_indexers_worse_than_training_free(tmp_path, capsys):
    """A calibration that lowers the held-out cosine (here: an absurd learning rate) leaves the
    training-free indexers in the adapter, and the report says so."""
    out = tmp_path / "adapter"
    assert dsa(["convert", "minilm", "--out", str(out), "--steps", "3", "--length", "128",
                "--topk", "16", "--lr", "5", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["cosine"] < report["before"]["cosine"] - 0.01
    assert report["saved"] == "training-free"
    assert report["cosine_via_adapter"] == pytest.approx(report["before"]["cosine"], abs=1e-5)
    assert "keeps what it was calibrated from" in (out / "report.md").read_text()


def test_dsa_convert_errors(tmp_path, capsys):
    assert dsa(["convert", "minilm", "--out", str(tmp_path), "--length", "4096"]) == 2
    assert "at most 512 positions" in capsys.readouterr().err
    assert dsa(["convert", "minilm", "--out", str(tmp_path), "--calib", "nope.txt"]) == 2
    assert "nope.txt is not a file" in capsys.readouterr().err
    assert dsa(["convert", str(tmp_path), "--out", str(tmp_path)]) == 2


def test_causal_rows_with_one_visible_key_give_finite_gradients():
    call = _call(True)
    site_loss(call, 8, 1).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in (call.q_proj, call.k_proj,
                                                      call.head_weights))


def test_output_objective_measures_the_sparse_output_error():
    from dsa_compile.kernels.calibration import _output_error

    call = _call(False)
    probs = torch.softmax(torch.randn(2, 4, 40, 40), -1)
    every = torch.ones(2, 40, 40)
    assert float(_output_error(call, probs, every, 1, 40)) == pytest.approx(0.0, abs=1e-10)
    few = site_loss(call, 4, 1, "output")
    many = site_loss(call, 32, 1, "output")
    assert 0 < float(many.loss.detach()) < float(few.loss.detach())
    few.loss.backward()
    assert call.q_proj.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="objective"):
        site_loss(call, 4, 1, "kl")


def test_dsa_convert_a_local_causal_checkpoint(tmp_path, capsys):
    """MODEL as a local HF directory (safetensors + tokenizer): a causal Llama converts, and
    its adapter loads strictly into the checkpoint loaded again."""
    import transformers

    from dsa_compile.demo import load_minilm

    source, out = tmp_path / "llama", tmp_path / "adapter"
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512)
    transformers.LlamaForCausalLM(config).save_pretrained(source, safe_serialization=True)
    load_minilm()[1].save_pretrained(source)
    assert dsa(["convert", str(source), "--out", str(out), "--steps", "2", "--length", "64",
                "--topk", "8", "--eval-windows", "2"]) == 0
    phases = capsys.readouterr().err
    assert "dsa convert: calibrating on" in phases and "calibrate [" in phases
    report = json.loads((out / "report.json").read_text())
    assert report["held_out_windows"] == 2 and len(report["after"]["exact"]["per_layer"]) == 2
    again = transformers.AutoModel.from_pretrained(source, local_files_only=True)
    assert dsa_compile.load_adapter(again, out) == [f"layers.{i}.self_attn.dsa_indexer"
                                                    for i in range(2)]
