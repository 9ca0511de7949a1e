"""ONNX Runtime vs torch on one exported model: a Llama-shaped decoder (random weights, the
shape of ``dsa bench``'s model, 2 layers) at 4K tokens, batch 1, fp32 on the CPU. Rows: torch
dense (SDPA), torch dsa (eager ops), ORT running the exported dsa file (its nodes' standard-op
functions), ORT running a dense export of the same model. Ratios are against torch dense in the
same run.

    python benchmarks/onnx_runtime.py [--length 4096] [--topk 256] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from pathlib import Path

import torch

import dsa_compile
from dsa_compile.backend import make_backend
from dsa_compile.bench import best_time, llama_model
from dsa_compile.dynamo_compat import compile_isolated
from dsa_compile.onnx_export import FirstOutput, export_onnx
from dsa_compile.plugins.onnx_export import ort_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--topk", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    model = FirstOutput(llama_model(args.layers))
    example = (torch.randint(0, 1000, (2, 2 * args.topk)),
               torch.ones(2, 2 * args.topk, dtype=torch.long))
    ids = torch.randint(0, 1000, (1, args.length))
    mask = torch.ones_like(ids)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sparse = export_onnx(model, example, Path(tmp, "dsa.onnx"),
                             input_names=["input_ids", "attention_mask"], topk=args.topk)
        dense = export_onnx(model, example, Path(tmp, "dense.onnx"),
                            input_names=["input_ids", "attention_mask"], topk=args.topk,
                            include=["no site"])
        config = sparse.config
        with torch.no_grad():
            torch_dense = best_time(lambda: model(ids, mask), args.repeats)
            runner = compile_isolated(model, backend=make_backend(config, root=model),
                                      dynamic=False)
            runner(ids, mask)
            torch_dsa = best_time(lambda: runner(ids, mask), args.repeats)
        for name, path in (("ORT dsa file", sparse.path), ("ORT dense file", dense.path)):
            session = ort_session(path)
            session.run(None, feeds)
            rows.append((name, best_time(lambda s=session: s.run(None, feeds), args.repeats)))
    rows = [("torch dense (SDPA)", torch_dense), ("torch dsa (eager ops)", torch_dsa), *rows]
    lines = [f"# ONNX Runtime vs torch, {args.length} tokens",
             "",
             f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"dsa-compile {dsa_compile.__version__}; Llama-shaped, {args.layers} layers, "
             f"batch 1, fp32; topk {args.topk}, query_block {config.query_block}, key_block 0 "
             "(what the file computes). Command: `python benchmarks/onnx_runtime.py`",
             "", "| runtime | seconds | vs torch dense |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.3f} | {torch_dense / seconds:.2f}x |" for name, seconds in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_runtime.md").write_text(text)


if __name__ == "__main__":
    main()
