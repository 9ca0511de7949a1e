"""scripts/mutation_check.py: its table still applies to the code, and it tells a bug the
tests catch from one they miss without touching the checkout (on a toy repository)."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutation_applies_to_the_current_code(mc):
    """A stale entry (its old text edited away or repeated) must be updated with the code."""
    names = [m.name for m in mc.MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    for m in mc.MUTATIONS:
        text = (REPO / m.file).read_text()
        assert text.count(m.old) == 1, f"{m.name}: old text found {text.count(m.old)} times in {m.file}"
        assert m.new != m.old, m.name
        paths = [a.split("::")[0] for a in m.tests if a.startswith("tests/")]
        assert paths and all((REPO / p).exists() for p in paths), f"{m.name}: {shlex.join(m.tests)}"


def test_reports_killed_and_survived_on_a_toy_repository(mc, tmp_path, monkeypatch, capsys):
    (tmp_path / "toy_src").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"toy" = "toy_src"\n')
    source = "def double(x):\n    return 2 * x\n"
    (tmp_path / "toy_src" / "__init__.py").write_text(source)
    (tmp_path / "tests" / "test_toy.py").write_text(
        "from toy import double\n\n\ndef test_double():\n    assert double(2) == 4\n")
    tests = ("tests/test_toy.py",)
    monkeypatch.setattr(mc, "MUTATIONS", [
        mc.Mutation("triples", "toy_src/__init__.py", "2 * x", "3 * x", tests),
        mc.Mutation("same value", "toy_src/__init__.py", "2 * x", "x + x", tests),
    ])
    assert mc.main(["--root", str(tmp_path)]) == 1
    table = capsys.readouterr().out
    assert "KILLED" in table.split("triples")[0].splitlines()[-1]
    assert "SURVIVED" in table.split("same value")[0].splitlines()[-1]
    assert "1 of 2 mutations killed" in table
    assert (tmp_path / "toy_src" / "__init__.py").read_text() == source  # checkout untouched
