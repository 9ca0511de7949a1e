"""Does sparse attention still find the needle? Accuracy of the retrieval model (:mod:`task`,
trained by ``train.py``) at long context: dense SDPA against ``attn_implementation="dsa"`` with
the indexer key cache, training-free and calibrated indexers, over a range of ``topk``.

Each context (``BOS`` + filler with records) is prefilled once; then every query is decoded
token by token through the cache (``?``, the key: the argmax there is the answer; the true
value is fed next, as the model saw queries in training), so the answer comes from a decode
step that selects ``topk`` of the cached keys with the indexer key cache.

    python benchmarks/needle/evaluate.py [--contexts 4096 8192 16384] [--topk 64 ... 2048]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import dsa_compile
from dsa_compile.ownership import indexers_of

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from task import QUERY, VOCAB, make_batch  # noqa: E402

MODEL = HERE / "model"
TOPKS = (64, 128, 256, 512, 1024, 2048)


def load(attn: str, path: Path = MODEL):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


def answers(model, batch, index_cache: bool) -> torch.Tensor:
    """Correct answers ``[B, Q]`` (bool) of ``model`` on ``batch``: prefill the context, then
    decode each query through the (indexer key) cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if index_cache:
        cache = dsa_compile.index_cache(model, cache)
    correct = torch.zeros(batch.keys.shape, dtype=torch.bool)
    with torch.no_grad():
        model(batch.context, past_key_values=cache, use_cache=True)
        for i in range(batch.keys.shape[1]):
            mark = torch.full_like(batch.keys[:, i:i + 1], QUERY)
            model(mark, past_key_values=cache, use_cache=True)
            logits = model(batch.keys[:, i:i + 1], past_key_values=cache, use_cache=True).logits
            correct[:, i] = logits[:, -1].argmax(-1) == batch.values[:, i]
            model(batch.values[:, i:i + 1], past_key_values=cache, use_cache=True)
    return correct


def calibration_batches(count: int, length: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [make_batch(1, length, 64, 8, generator).with_queries()[0] for _ in range(count)]


def sparse_model(kind: str, calibration: dict) -> torch.nn.Module:
    """The retrieval model on ``attn_implementation="dsa"`` with training-free, calibrated
    (once, on training-like sequences the evaluation does not use) or random indexers."""
    model = load("dsa")
    if kind in ("training-free", "random"):
        dsa_compile.configure(model, torch.randint(0, VOCAB, (1, 64)))
        if kind == "random":  # a control: a selection that knows nothing about the task
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for indexer in indexers_of(model).values():
                    for tensor in indexer.tensors():
                        tensor.copy_(torch.randn(tensor.shape, generator=generator))
        return model
    if "adapter" not in calibration:
        dense = load("sdpa")
        batches = calibration_batches(calibration["batches"], calibration["length"], seed=1234)
        start = time.time()
        dsa_compile.calibrate(dense, batches, steps=calibration["steps"],
                              topk=calibration["topk"], progress=False)
        calibration["seconds"] = time.time() - start
        calibration["adapter"] = HERE / "model" / "calibrated"
        dsa_compile.save_adapter(dense, calibration["adapter"])
    dsa_compile.load_adapter(model, calibration["adapter"])
    dsa_compile.configure(model)
    return model


def evaluate(contexts, topks, samples: int, queries: int, calibration: dict,
             kinds=("training-free", "calibrated", "random")) -> list[dict]:
    rows = []
    dense = load("sdpa")
    models = {kind: sparse_model(kind, calibration) for kind in kinds}
    for context in contexts:
        generator = torch.Generator().manual_seed(context)
        batches = [make_batch(1, context, 128, queries, generator) for _ in range(samples)]
        base = torch.cat([answers(dense, b, False) for b in batches]).float().mean().item()
        rows.append(dict(context=context, indexer="dense", topk=None, accuracy=base))
        print(rows[-1], flush=True)
        for kind, model in models.items():
            for topk in topks:
                dsa_compile.configure(model, topk=topk)
                hits = torch.cat([answers(model, b, True) for b in batches]).float().mean().item()
                rows.append(dict(context=context, indexer=kind, topk=topk, accuracy=hits,
                                 ratio=hits / base if base else float("nan")))
                print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], contexts, topks) -> list[str]:
    lines = ["| context | dense | indexer | " + " | ".join(f"topk {k}" for k in topks) + " |",
             "|---|---|---|" + "---|" * len(topks)]
    for context in contexts:
        dense = next(r for r in rows if r["context"] == context and r["indexer"] == "dense")
        for kind in dict.fromkeys(r["indexer"] for r in rows if r["indexer"] != "dense"):
            cells = []
            for k in topks:
                r = next(r for r in rows if r["context"] == context and r["indexer"] == kind
                         and r["topk"] == k)
                cells.append(f"{r['accuracy']:.3f} ({r['ratio']:.2f}x)")
            lines.append(f"| {context} | {dense['accuracy']:.3f} | {kind} | "
                         + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], contexts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts), 3.4), sharey=True,
                             squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        dense = next(r for r in rows if r["context"] == context and r["indexer"] == "dense")
        ax.axhline(dense["accuracy"], color="black", linestyle="--", label="dense (SDPA)")
        for kind in dict.fromkeys(r["indexer"] for r in rows if r["indexer"] != "dense"):
            chosen = [r for r in rows if r["context"] == context and r["indexer"] == kind]
            ax.plot([r["topk"] for r in chosen], [r["accuracy"] for r in chosen], marker="o",
                    label=f"dsa, {kind}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"context {context}")
        ax.set_xlabel("topk")
    axes[0][0].set_ylabel("retrieval accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--topk", type=int, nargs="+", default=list(TOPKS))
    parser.add_argument("--samples", type=int, default=4, help="contexts per length")
    parser.add_argument("--queries", type=int, default=32, help="queries per context")
    parser.add_argument("--calib-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    calibration = dict(batches=8, length=2048, steps=args.calib_steps, topk=256)
    start = time.time()
    rows = evaluate(args.contexts, args.topk, args.samples, args.queries, calibration)
    lines = ["# Needle retrieval: sparse vs dense accuracy at long context", "",
             f"{datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, dsa-compile {dsa_compile.__version__}. Model: "
             "`benchmarks/needle/model` (trained by `benchmarks/needle/train.py`), "
             f"{args.samples} contexts x {args.queries} queries per length, answers decoded "
             "through the indexer key cache, CPU default granularity in prefill. Calibrated: "
             f"{calibration['steps']} steps on {calibration['batches']} training-like sequences "
             f"of {calibration['length']} tokens at topk {calibration['topk']} "
             f"({calibration.get('seconds', 0):.0f} s). Total {time.time() - start:.0f} s. "
             "Command: `python benchmarks/needle/evaluate.py`", "",
             "Accuracy (ratio to dense):", ""] + table(rows, args.contexts, args.topk)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "needle.md").write_text(text)
    (args.out / "needle.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.contexts, args.out / "needle.png")


if __name__ == "__main__":
    main()
