"""Export the bundled MiniLM with sparse attention to ONNX and run it in ONNX Runtime.

One file serves every batch size and length: short inputs take each site's dense branch,
longer ones the dsa nodes (run here through their standard-op functions).

    python examples/export_onnx.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import dsa_compile
from dsa_compile.demo import load_minilm, real_text_ids
from dsa_compile.onnx_export import FirstOutput
from dsa_compile.plugins.onnx_export import ort_session


def main(topk: int = 64, lengths: tuple[int, ...] = (40, 200, 512)) -> dict:
    model, tokenizer = load_minilm()
    wrapped = FirstOutput(model)  # (input_ids, attention_mask) -> last hidden state
    text = real_text_ids(tokenizer, max(lengths))
    example = (text[:, :96].repeat(2, 1), torch.ones(2, 96, dtype=torch.long))  # batch 2: dynamic
    gaps = {}
    with tempfile.TemporaryDirectory() as tmp:
        result = dsa_compile.export_onnx(wrapped, example, Path(tmp, "minilm_dsa.onnx"),
                                         input_names=["input_ids", "attention_mask"], topk=topk)
        session = ort_session(result.path)
        reference = dsa_compile.compile(wrapped, result.config)  # the torch model, same options
        for length in lengths:
            ids = text[:, :length]
            mask = torch.ones_like(ids)
            with torch.no_grad():
                expected = reference(ids, mask).numpy()
            (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
            gaps[length] = float(np.abs(got - expected).max())
            print(f"{length:4d} tokens: max |ORT - torch| = {gaps[length]:.2e}")
    print(f"{result.dsa_nodes} dsa nodes; dynamic dims {result.dynamic}")
    return {"dsa_nodes": result.dsa_nodes, "gaps": gaps}


if __name__ == "__main__":
    main()
