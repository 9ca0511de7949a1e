"""dsa_compile.export: an ExportedProgram that holds the dsa ops and computes the same thing;
and library calls (export, explain) that leave the caller's compiled models as they were."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from models import tiny_model

import dsa_compile
from dsa_compile.dynamo_compat import compile_isolated, fresh_entry

REPO = Path(__file__).resolve().parents[1]


def test_export_llama_holds_dsa_ops_and_matches():
    model = tiny_model("llama", "sdpa")
    model.config.use_cache = False  # the program then returns the logits alone
    ids = torch.randint(0, 100, (1, 40))
    program = dsa_compile.export(model, (ids,), topk=16, query_block=4)
    assert isinstance(program, torch.export.ExportedProgram)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("dsa.indexer_topk.default") == 2
    assert targets.count("dsa.sparse_attention.default") == 2
    with torch.no_grad():
        expected = torch.compile(model, backend="dsa",
                                 options={"topk": 16, "query_block": 4, "mode": "eager"})(ids).logits
        outputs = program.module()(ids)
    assert len(outputs) == 1
    got = outputs[0]
    torch.testing.assert_close(got, expected)


class CountingBackend:
    """A Dynamo backend that counts the graphs it compiles and runs them as they are."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


class _Unrelated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


def test_explain_and_export_keep_the_callers_compiled_models():
    """No torch.compiler.reset(): a model the caller compiled is not compiled again."""
    backend = CountingBackend()
    users = torch.compile(_Unrelated(), backend=backend)
    x = torch.randn(2, 4)
    users(x)
    assert backend.graphs == 1

    model = tiny_model("llama", "sdpa")
    model.config.use_cache = False
    ids = torch.randint(0, 100, (1, 24))
    assert len(dsa_compile.explain(model, ids, topk=16).rewritten) == 2
    dsa_compile.export(model, (ids,), topk=16)
    users(x)
    assert backend.graphs == 1


def test_library_code_never_resets_dynamo():
    sources = [p for folder in ("dsa_compile", "passes", "kernels", "plugins")
               for p in (REPO / folder).glob("*.py")]
    assert len(sources) > 20
    assert not [p.name for p in sources if "compiler.reset(" in p.read_text()]


def test_fresh_entry_has_a_code_object_of_its_own():
    model = _Unrelated()
    first, second = fresh_entry(model), fresh_entry(model)
    assert first.__code__ is not second.__code__
    x = torch.randn(3, 4)
    torch.testing.assert_close(first(x), model(x))


class _Limited(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_compile_isolated_compiles_past_the_models_recompile_limit():
    """Once the model's own code hit Dynamo's recompile limit (8), torch.compile(model) runs
    it uncompiled; the isolated entry still compiles it."""
    model = _Limited()
    direct = CountingBackend()
    for n in range(1, 11):
        torch.compile(model, backend=direct, dynamic=False)(torch.randn(n))
    assert direct.graphs < 10  # the limit was hit
    isolated = CountingBackend()
    for n in (11, 12):
        compile_isolated(model, backend=isolated, dynamic=False)(torch.randn(n))
    assert isolated.graphs == 2


def test_explain_a_model_from_a_module_not_in_sys_modules(tmp_path):
    """Dynamo imports the module of globals it meets outside its first frame's scope by name:
    the fresh entry shares the model's globals, as torch.compile(model) would start there."""
    (tmp_path / "unlisted_model.py").write_text(
        "import torch\n"
        "import torch.nn.functional as F\n\n\n"
        "class Attention(torch.nn.Module):\n"
        "    def forward(self, q):\n"
        "        return F.scaled_dot_product_attention(q, q, q, is_causal=True)\n")
    spec = importlib.util.spec_from_file_location("unlisted_model", tmp_path / "unlisted_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "unlisted_model" not in sys.modules
    report = dsa_compile.explain(module.Attention(), torch.randn(1, 2, 16, 8), topk=4)
    assert len(report.rewritten) == 1


def test_dynamo_compat_wrappers_for_dynamic_capture():
    """specialized_floats keeps a model's float attribute a constant of a dynamic-shape graph
    (torch's default lifts it to an input); size_symbol names a size's symbol."""
    from dsa_compile.dynamo_compat import size_symbol, specialized_floats

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 0.5

        def forward(self, x):
            return x * self.scale

    def inputs_of(specialize: bool) -> list:
        seen: list = []

        def backend(gm, example_inputs):
            seen.extend(n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder"))
            return gm.forward

        compiled = compile_isolated(Scaled(), backend=backend, dynamic=True)
        if specialize:
            with specialized_floats():
                compiled(torch.randn(3, 5))
        else:
            compiled(torch.randn(3, 5))
        return seen

    lifted = inputs_of(False)
    kept = inputs_of(True)
    assert len(lifted) > len(kept)
    tensor = next(v for v in kept if isinstance(v, torch.Tensor))
    rows, cols = tensor.shape
    assert size_symbol(rows) == size_symbol(tensor.shape[0]) != size_symbol(cols)
