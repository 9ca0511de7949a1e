"""The retrieval benchmark's task and committed model (benchmarks/needle), on a short version:
the model finds its needles densely, and through ``attn_implementation="dsa"`` with the indexer
key cache it still finds them, unless the selection is broken on purpose."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import dsa_compile
from dsa_compile.ownership import indexers_of

NEEDLE = Path(__file__).resolve().parents[1] / "benchmarks" / "needle"


def _module(name: str):
    sys.path.insert(0, str(NEEDLE))
    try:
        spec = importlib.util.spec_from_file_location(f"needle_{name}", NEEDLE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(NEEDLE))
    return module


@pytest.fixture(scope="module")
def task():
    return _module("task")


@pytest.fixture(scope="module")
def evaluate():
    return _module("evaluate")


def test_records_hold_the_queried_pairs(task):
    batch = task.make_batch(3, 200, 40, 10, torch.Generator().manual_seed(0))
    assert batch.context.shape == (3, 201) and (batch.context[:, 0] == task.BOS).all()
    records = batch.context.gather(1, batch.where) - task.RECORD0
    assert torch.equal(records // task.VALUES, batch.keys - task.KEY0)
    assert torch.equal(records % task.VALUES, batch.values - task.VALUE0)
    for row in batch.context[:, 1:]:
        found = row[row >= task.RECORD0] - task.RECORD0
        assert found.numel() == 40 and (found // task.VALUES).unique().numel() == 40
    tokens, answers = batch.with_queries()
    assert torch.equal(tokens[:, answers], batch.keys)
    assert torch.equal(tokens[:, answers + 1], batch.values)
    with pytest.raises(ValueError, match="pairs"):
        task.make_batch(1, 10, 20, 5, torch.Generator())


def test_sparse_decoding_finds_the_needles_and_a_broken_selection_does_not(task, evaluate):
    generator = torch.Generator().manual_seed(7)
    batches = [task.make_batch(1, 1536, 96, 16, generator) for _ in range(2)]

    def accuracy(model, cached):
        return torch.cat([evaluate.answers(model, b, cached) for b in batches]).float().mean()

    dense = accuracy(evaluate.load("sdpa"), False)
    model = evaluate.load("dsa")
    dsa_compile.configure(model, torch.randint(0, task.VOCAB, (1, 64)), topk=128)
    sparse = accuracy(model, True)
    assert dense >= 0.95
    assert sparse >= dense - 0.05
    with torch.no_grad():  # selection turned upside down: the needles are what it drops
        for indexer in indexers_of(model).values():
            indexer.head_weights.neg_()
    assert accuracy(model, True) < 0.5


def test_training_script_writes_a_safetensors_model_and_its_log(tmp_path):
    train = _module("train")
    train.main(["--steps", "2", "--out", str(tmp_path)])
    assert (tmp_path / "model.safetensors").stat().st_size > 1_000_000
    assert not list(tmp_path.glob("*.bin"))
    log = (tmp_path / "train_log.txt").read_text()
    assert log.startswith("seed 0, steps 2")
    committed = (NEEDLE / "model" / "train_log.txt").read_text()
    assert "length 8192 unlocked" in committed  # the committed model saw the longest contexts
