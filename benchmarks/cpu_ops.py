"""CPU benchmark of the dsa ops against dense SDPA and FlexAttention, in one run.

For each sequence length L (causal prefill, B=1, H=16, Hkv=4, D=64, fp32; indexer HI=4, DI=64;
topk=2048) it times, interleaved over several repeats (the minimum counts):

- ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, the baseline;
- ``dsa``: the whole DSA layer, ``indexer_topk`` (tile-shared, two-stage) + ``sparse_attention``;
- ``indexer`` and ``sparse_attn``: the two parts of ``dsa`` alone;
- ``sparse_rand``: ``sparse_attention`` over a random causal choice of 128-key blocks
  (16 per 128-query tile, the diagonal one included: a budget of 2048 keys);
- ``flex_rand``: compiled ``flex_attention`` with a block mask of exactly the same blocks.

It prints a table of times and speed-ups over SDPA, and writes ``<out>.md``, ``<out>.json``
and ``<out>.png`` (speed-up against L).

    python benchmarks/cpu_ops.py --out benchmarks/results/cpu_ops
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dsa_compile import indexer_topk, sparse_attention

SHAPE = dict(batch=1, heads=16, kv_heads=4, dim=64, index_heads=4, index_dim=64, topk=2048)
QUERY_BLOCK, KEY_BLOCK, RAND_BLOCK = 128, 64, 128


def random_causal_blocks(length: int, block: int, budget_blocks: int, seed: int) -> torch.Tensor:
    """For each query block i: block i plus up to ``budget_blocks - 1`` random earlier blocks.

    Returns int64 ``[nq, budget_blocks]``, -1 padded, sorted.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-length // block)
    chosen = torch.full((blocks, budget_blocks), -1, dtype=torch.int64)
    for i in range(blocks):
        earlier = torch.randperm(i, generator=gen)[: budget_blocks - 1]
        row = torch.cat([earlier, torch.tensor([i])]).sort().values
        chosen[i, : row.numel()] = row
    return chosen


def blocks_to_token_indices(chosen: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """Block rows ``[R, nb]`` -> token rows int32 ``[1, R, nb * block]`` (-1 for empty slots)."""
    tokens = chosen[..., None] * block + torch.arange(block)
    tokens = torch.where((chosen[..., None] >= 0) & (tokens < length), tokens, -1)
    return tokens.flatten(1).to(torch.int32)[None]


def flex_runner(q, k, v, chosen: torch.Tensor, block: int) -> Callable[[], torch.Tensor] | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return None
    length = q.shape[2]
    blocks = chosen.shape[0]
    counts = (chosen >= 0).sum(-1).to(torch.int32)
    dense = torch.zeros(blocks, blocks, dtype=torch.int32)
    dense[:, : chosen.shape[1]] = chosen.clamp(min=0).to(torch.int32)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = BlockMask.from_kv_blocks(
        counts[None, None], dense[None, None], BLOCK_SIZE=block, mask_mod=causal,
        seq_lengths=(length, length),
    )
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_length(length: int, repeats: int, with_flex: bool, seed: int = 0) -> dict[str, float]:
    s = SHAPE
    torch.manual_seed(seed)
    q = torch.randn(s["batch"], s["heads"], length, s["dim"])
    k = torch.randn(s["batch"], s["kv_heads"], length, s["dim"])
    v = torch.randn(s["batch"], s["kv_heads"], length, s["dim"])
    q_idx = torch.randn(s["batch"], length, s["index_heads"], s["index_dim"])
    k_idx = torch.randn(s["batch"], length, s["index_dim"])
    weights = torch.randn(s["batch"], length, s["index_heads"])
    topk = s["topk"]

    def select():
        return indexer_topk(q_idx, k_idx, weights, topk, causal=True,
                            query_block=QUERY_BLOCK, key_block=KEY_BLOCK)

    selected = select()
    chosen = random_causal_blocks(length, RAND_BLOCK, topk // RAND_BLOCK, seed)
    random_tokens = blocks_to_token_indices(chosen, RAND_BLOCK, length)
    runners: dict[str, Callable[[], object]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "dsa": lambda: sparse_attention(q, k, v, select(), causal=True, query_block=QUERY_BLOCK),
        "indexer": select,
        "sparse_attn": lambda: sparse_attention(q, k, v, selected, causal=True,
                                                query_block=QUERY_BLOCK),
        "sparse_rand": lambda: sparse_attention(q, k, v, random_tokens, causal=True,
                                                query_block=RAND_BLOCK),
    }
    if with_flex:
        flex = flex_runner(q, k, v, chosen, RAND_BLOCK)
        if flex is not None:
            flex()  # compile outside the timed region
            runners["flex_rand"] = flex
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):  # interleaved, so drift of a shared machine hits all alike
        for name, fn in runners.items():
            best[name] = min(best[name], time_once(fn))
    return best


def render(results: dict[int, dict[str, float]]) -> str:
    names = list(next(iter(results.values())))
    head = "| L | " + " | ".join(f"{n} (s)" for n in names) + " | dsa speed-up | " \
        "sparse_rand speed-up | flex_rand speed-up |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for length, t in results.items():
        speed = [t["sdpa"] / t[n] if n in t else float("nan")
                 for n in ("dsa", "sparse_rand", "flex_rand")]
        cells = [f"{t[n]:.3f}" for n in names] + [f"{x:.2f}x" for x in speed]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, label in [("dsa", "DSA layer (indexer + top-k + sparse attention)"),
                        ("sparse_attn", "sparse attention alone (indexer's choice)"),
                        ("sparse_rand", "sparse attention, random blocks"),
                        ("flex_rand", "FlexAttention, same random blocks")]:
        if all(name in results[n] for n in lengths):
            ax.plot(lengths, [results[n]["sdpa"] / results[n][name] for n in lengths], "o-",
                    label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    ax.set_xlabel("sequence length (causal prefill)")
    ax.set_ylabel("speed-up over dense SDPA (x)")
    ax.set_title(f"dsa ops on CPU ({torch.get_num_threads()} threads), topk={SHAPE['topk']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention peer")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md, OUT.json, OUT.png")
    args = parser.parse_args(argv)
    results = {}
    for length in args.lengths:
        results[length] = bench_length(length, args.repeats, not args.no_flex)
        print(f"L={length}: " + ", ".join(f"{k}={v:.3f}s" for k, v in results[length].items()),
              flush=True)
    table = render(results)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cpu = platform.processor() or platform.machine()
        meta = (f"{datetime.date.today()}, torch {torch.__version__}, {cpu}, "
                f"{torch.get_num_threads()} threads, shapes {SHAPE}, query_block={QUERY_BLOCK}, "
                f"key_block={KEY_BLOCK}, best of {args.repeats}")
        args.out.with_suffix(".md").write_text(f"{meta}\n\n{table}\n")
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results},
                                                            indent=2))
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
