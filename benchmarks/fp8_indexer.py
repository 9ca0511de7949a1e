"""Selection quality of the FP8 indexer (``indexer_fp8``) against the indexer in the model's dtype,
on the bundled MiniLM and real text (512 tokens of Python's pydoc topics).

For the model in fp32 and in bf16 (the indexer then projects in bf16), with training-free
(weight-based) indexers, exact per-query selection, at three budgets: the attention-mass recall
of the selection (mean over layers, heads and queries; ``dsa_compile.measure_recall``), the share
of the 16-bit / fp32 selection the FP8 selection keeps, and the pooled-embedding cosine of the
sparse model to the dense one. FP8 here is emulated on the CPU (e4m3 values upcast); a GPU runs
the same values through FP8 tensor-core products, so the selection is the same up to fp32
summation order.

    python benchmarks/fp8_indexer.py --out benchmarks/results/fp8_indexer
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

import dsa_compile
from dsa_compile.demo import embedding_cosine, load_minilm, real_text_ids
from dsa_compile.kernels.attention import capture_selections

LENGTH, BUDGETS = 512, (32, 64, 128)


def _kept(fp8: list[torch.Tensor], base: list[torch.Tensor]) -> float:
    """Share of the base selections' keys the FP8 selections also hold, over sites and rows."""
    hits = total = 0
    for a, b in zip(fp8, base, strict=True):
        for x, y in zip(a.flatten(0, -2).tolist(), b.flatten(0, -2).tolist(), strict=True):
            want = {i for i in y if i >= 0}
            hits += len(want & set(x))
            total += len(want)
    return hits / total


def measure(dtype: torch.dtype) -> list[dict]:
    model, tokenizer = load_minilm()
    model = model.to(dtype)
    ids = real_text_ids(tokenizer, LENGTH)
    dsa_compile.attach(model, ids)
    with torch.no_grad():
        dense = model(ids).last_hidden_state.float()
    rows = []
    for topk in BUDGETS:
        options = dict(topk=topk, query_block=1, key_block=0, mode="eager")
        row = {"dtype": str(dtype).removeprefix("torch."), "topk": topk}
        selections = {}
        for name, fp8 in (("base", False), ("fp8", True)):
            sites = dsa_compile.measure_recall(model, [ids], **options, indexer_fp8=fp8)
            row[f"recall_{name}"] = sum(r for r, _ in sites.values()) / len(sites)
            row["best"] = sum(b for _, b in sites.values()) / len(sites)
            torch.compiler.reset()
            sparse = dsa_compile.compile(model, **options, indexer_fp8=fp8)
            with torch.no_grad(), capture_selections() as picked:
                out = sparse(ids).last_hidden_state.float()
            selections[name] = picked
            row[f"cosine_{name}"] = embedding_cosine(out, dense)
        row["kept"] = _kept(selections["fp8"], selections["base"])
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_indexer"))
    args = parser.parse_args(argv)
    rows = measure(torch.float32) + measure(torch.bfloat16)
    lines = ["# FP8 indexer: selection quality against the indexer in the model's dtype", "",
             f"{datetime.date.today()}, {platform.machine()}, torch {torch.__version__}, "
             f"dsa-compile {dsa_compile.__version__}; MiniLM (all-MiniLM-L6-v2, 6 layers), "
             f"{LENGTH} tokens of pydoc topics, training-free indexers (HI=4, DI=32), exact "
             "per-query top-k. `python benchmarks/fp8_indexer.py`", "",
             "| model dtype | top-k | recall, indexer in model dtype | recall, FP8 indexer | "
             "best head-shared | FP8 keeps of the selection | cosine, model dtype | "
             "cosine, FP8 |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['topk']} | {r['recall_base']:.4f} | {r['recall_fp8']:.4f} | "
              f"{r['best']:.4f} | {r['kept']:.3f} | {r['cosine_base']:.4f} | "
              f"{r['cosine_fp8']:.4f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
