"""dsa_compile.export: an ExportedProgram that holds the dsa ops and computes the same thing."""

from __future__ import annotations

import torch
from models import tiny_model

import dsa_compile


def test_export_llama_holds_dsa_ops_and_matches():
    model = tiny_model("llama", "sdpa")
    model.config.use_cache = False  # the program then returns the logits alone
    ids = torch.randint(0, 100, (1, 40))
    program = dsa_compile.export(model, (ids,), topk=16, query_block=4)
    assert isinstance(program, torch.export.ExportedProgram)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("dsa.indexer_topk.default") == 2
    assert targets.count("dsa.sparse_attention.default") == 2
    torch.compiler.reset()
    with torch.no_grad():
        expected = torch.compile(model, backend="dsa",
                                 options={"topk": 16, "query_block": 4, "mode": "eager"})(ids).logits
        outputs = program.module()(ids)
    assert len(outputs) == 1
    got = outputs[0]
    torch.testing.assert_close(got, expected)
