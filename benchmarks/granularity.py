"""Selection granularity on CPU: quality against speed, at small budgets.

For each budget (top-64, top-128) and each ``(query_block, key_block)`` it measures, in one run:

- quality: MiniLM's pooled-embedding cosine, sparse vs dense, on the held-out pydoc windows
  that ``dsa convert`` reports on (4 x 512 tokens, training-free indexers, every site sparse),
  and attention-mass recall as a fraction of the best selection at the row's granularity;
- speed: one causal attention layer of MiniLM's head shape (12 heads x 32) at ``--length``
  tokens through ``dsa_attention`` (indexer + top-k + sparse attention), against SDPA.

Rows: the old fixed CPU default (128, 64), the budget-scaled default
(:func:`dsa_compile.config.budget_granularity`, at least 32 candidate blocks), the same with
16 candidate blocks (``2 * topk / key_block``, the rule before the minimum), a few neighbours,
and exact per-query top-k.
Writes ``<out>.md``, ``<out>.json`` and ``<out>.png`` (cosine against speed-up).

    python benchmarks/granularity.py --out benchmarks/results/granularity
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from dsa_compile.backend import make_backend
from dsa_compile.bench import best_time
from dsa_compile.config import DSAConfig
from dsa_compile.convert import _hidden, _mean_cosine, _recall, held_out_windows
from dsa_compile.demo import load_minilm
from dsa_compile.dynamo_compat import compile_isolated
from dsa_compile.kernels.attention import dsa_attention
from dsa_compile.ownership import attach
from dsa_compile.passes.indexer_init import initial_indexer

BUDGETS = (64, 128)
# selection options per row; {} = the CPU default for the budget
GRANULARITIES = ({"query_block": 128, "key_block": 64}, {}, {"candidate_blocks": 16},
                 {"query_block": 32, "key_block": 8}, {"query_block": 16, "key_block": 16},
                 {"query_block": 16, "key_block": 0}, {"query_block": 1, "key_block": 0})
HEADS, DIM = 12, 32  # MiniLM's attention


def quality(budgets=BUDGETS, granularities=GRANULARITIES) -> dict[tuple, tuple[float, float]]:
    """Per (topk, row): (pooled-embedding cosine, attention-mass recall / best at the row's
    granularity), means over the held-out windows."""
    model, tokenizer = load_minilm("sdpa")
    windows = held_out_windows(tokenizer, 512, 4)
    with torch.no_grad():
        dense = [_hidden(model, ids) for ids in windows]
    attach(model, windows[0], config=DSAConfig(min_seq_len=0))
    result = {}
    for topk in budgets:
        for row, options in enumerate(granularities):
            config = DSAConfig(topk=topk, min_seq_len=0, mode="eager", **options)
            sparse = compile_isolated(model, backend=make_backend(config, root=model),
                                      dynamic=False)
            recall = _recall(model, windows, config)
            result[topk, row] = (_mean_cosine(sparse, windows, dense),
                                 recall["recall"] / recall["best"])
    return result


def layer_seconds(length: int, budgets=BUDGETS, granularities=GRANULARITIES,
                  repeats: int = 2) -> tuple[float, dict[tuple, float]]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, DIM, generator=gen) for _ in range(3))
    init = initial_indexer(HEADS, HEADS, DIM, 4, 32, None, None)
    with torch.no_grad():
        sdpa = best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
        times = {}
        for topk in budgets:
            for row, options in enumerate(granularities):

                def run(topk=topk, options=options) -> torch.Tensor:
                    return dsa_attention(q, k, v, None, init.q_proj, init.k_proj,
                                         init.head_weights, is_causal=True, scale=None,
                                         enable_gqa=False, topk=topk, dense_up_to=0,
                                         query_block=options.get("query_block"),
                                         key_block=options.get("key_block"),
                                         candidate_blocks=options.get("candidate_blocks", 0))

                run()
                times[topk, row] = best_time(run, repeats)
    return sdpa, times


def _label(topk: int, options: dict) -> str:
    config = DSAConfig(topk=topk, **options)
    qb, kb = config.granularity("cpu")
    defaults = not options
    candidates = f", {options['candidate_blocks']} candidates" if "candidate_blocks" in options \
        else ""
    return f"({qb}, {kb}{candidates})" + (" default" if defaults else "")


def render(result: dict) -> str:
    lines = [f"{result['date']}, {result['machine']}, torch {result['torch']}, "
             f"{result['threads']} threads. Command: `python benchmarks/granularity.py "
             f"--length {result['length']}`.", "",
             "Pooled-embedding cosine (MiniLM, 4 held-out windows of 512 tokens, training-free "
             f"indexers) and one causal layer of MiniLM's head shape at {result['length']} "
             f"tokens (SDPA: {result['sdpa_s']:.3f} s):", "",
             "| top-k | (query_block, key_block) | cosine | recall / best | layer seconds | "
             "vs SDPA |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['topk']} | {row['granularity']} | {row['cosine']:.4f} | "
                     f"{row['recall_ratio']:.3f} | {row['seconds']:.3f} | "
                     f"{result['sdpa_s'] / row['seconds']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for topk, marker in zip(result["budgets"], "osd^", strict=False):
        rows = [r for r in result["rows"] if r["topk"] == topk]
        xs = [result["sdpa_s"] / r["seconds"] for r in rows]
        ax.scatter(xs, [r["cosine"] for r in rows], marker=marker, label=f"top-{topk}")
        for x, r in zip(xs, rows, strict=True):
            ax.annotate(r["granularity"], (x, r["cosine"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel(f"speed-up over SDPA, one causal layer at {result['length']} tokens (CPU)")
    ax.set_ylabel("pooled-embedding cosine vs dense (MiniLM)")
    ax.set_title("Selection granularity: quality against speed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json, OUT.png")
    args = parser.parse_args(argv)
    measured = quality(args.budgets)
    sdpa, times = layer_seconds(args.length, args.budgets, repeats=args.repeats)
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "length": args.length, "sdpa_s": sdpa, "budgets": args.budgets,
              "rows": [{"topk": topk, "granularity": _label(topk, GRANULARITIES[row]),
                        "cosine": measured[topk, row][0],
                        "recall_ratio": measured[topk, row][1], "seconds": times[topk, row]}
                       for topk, row in measured]}
    table = render(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("# Selection granularity on CPU\n\n" + table)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        plot(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
