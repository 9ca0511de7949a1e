"""Decode speed: per-token latency of the Llama-shaped model of ``dsa bench`` (8 layers, hidden
1024, 16 / 4 heads of 64) at long context, batch 1, fp32 on the CPU (bf16 on a GPU): dense SDPA
against ``attn_implementation="dsa"`` with the indexer key cache, in the same run. The KV cache
is filled with random keys and values (speed does not depend on what they hold); the dsa
cache's indexer keys are projected once when it is filled, as a prefill would. Also one layer's
attention alone (SDPA vs ``dsa_attention`` with cached indexer keys).

    python benchmarks/decode.py [--contexts 32768 65536] [--topk 2048] [--cache static|dynamic]
                                [--compile [--compile-mode reduce-overhead]] [--device cuda]
                                [--layers N] [--selector cooperative] [--out benchmarks/results]

On a GPU a batch-1 step is a few dozen small launches; ``--compile --compile-mode
reduce-overhead`` replays each compiled step as a CUDA graph (not yet run on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

import dsa_compile
from dsa_compile.bench import MODEL_SHAPE, best_time, llama_model
from dsa_compile.kernels.attention import dsa_attention, index_keys


def filled_cache(model, context: int, dsa: bool, kind: str = "static", room: int = 8,
                 seed: int = 0):
    """A KV cache holding ``context`` random tokens per layer: ``static`` (written in place,
    ``room`` free slots) or ``dynamic`` (transformers' DynamicCache concatenates, i.e. copies
    the whole cache, at every step: that copy then dominates both paths)."""
    from transformers import DynamicCache, StaticCache

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    cache = StaticCache(config=config, max_cache_len=context + room) if kind == "static" else \
        DynamicCache(config=config)
    if dsa:
        cache = dsa_compile.index_cache(model, cache)
    gen = torch.Generator().manual_seed(seed)
    weight = next(model.parameters())
    for layer in range(config.num_hidden_layers):
        k = torch.randn(1, kv_heads, context, dim, generator=gen).to(weight.device, weight.dtype)
        v = torch.randn(1, kv_heads, context, dim, generator=gen).to(weight.device, weight.dtype)
        cache.update(k, v, layer)
    for module in model.modules():  # filling is not an attention call: nothing to hand over
        if hasattr(module, "pending_keys"):
            module.pending_keys = None
    return cache


def step_time(model, cache, context: int, steps: int, forward=None) -> float:
    """Seconds per decode step (the fastest of ``steps``; the context grows by one each);
    ``forward``: what runs the step (default: the model itself, eager)."""
    forward = forward or model
    device = next(model.parameters()).device
    times = []
    for i in range(steps):
        ids = torch.tensor([[7 + i]], device=device)
        position = torch.tensor([[context + i]], device=device)
        times.append(best_time(lambda i=ids, p=position: forward(
            input_ids=i, past_key_values=cache, position_ids=p, cache_position=p[0],
            use_cache=True), 1))
    return min(times)


def attention_times(context: int, topk: int, repeats: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[float, float]:
    heads, kv_heads = MODEL_SHAPE["num_attention_heads"], MODEL_SHAPE["num_key_value_heads"]
    dim = MODEL_SHAPE["hidden_size"] // heads
    q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, context, dim, device=device, dtype=dtype) for _ in range(2))
    q_proj = torch.randn(heads * dim, 4 * 32, device=device) / dim
    k_proj = torch.randn(kv_heads * dim, 32, device=device) / dim
    weights = torch.ones(4, device=device)
    cached = index_keys(k, k_proj)
    rounds = [(best_time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                         repeats),
               best_time(lambda: dsa_attention(
                   q, k, v, None, q_proj, k_proj, weights, is_causal=False, scale=None,
                   enable_gqa=True, topk=topk, dense_up_to=topk, query_block=None,
                   key_block=None, candidate_blocks=0, cached_keys=cached), repeats))
              for _ in range(5)]  # interleaved: both see the same machine state
    sdpa, sparse = min(r[0] for r in rounds), min(r[1] for r in rounds)
    return sdpa, sparse


def plot(rows: list[dict], path: Path) -> None:
    """Per-token step time and one layer's attention time, SDPA vs dsa, per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [str(r["context"]) for r in rows]
    series = {"step (ms)": [("SDPA", "sdpa_step_ms"), ("dsa", "dsa_step_ms")],
              "one layer's attention (ms)": [("SDPA", "attention_sdpa_ms"),
                                             ("dsa", "attention_dsa_ms")]}
    if "compiled_dsa_step_ms" in rows[0]:
        series["step (ms)"].append(("dsa, compiled", "compiled_dsa_step_ms"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (title, bars) in zip(axes, series.items(), strict=True):
        width = 0.8 / len(bars)
        for i, (label, key) in enumerate(bars):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r[key] for r in rows], width, label=label)
        ax.set_xticks(range(len(rows)), contexts)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cache", choices=["static", "dynamic"], default="static")
    parser.add_argument("--compile", action="store_true",
                        help="also time each step compiled by Inductor (static cache only)")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead"], default="default",
                        help="torch.compile mode of --compile (reduce-overhead: CUDA graphs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="fp32 on the CPU, bf16 on a GPU")
    parser.add_argument("--layers", type=int, default=MODEL_SHAPE["num_hidden_layers"])
    parser.add_argument("--selector", default=None,
                        choices=("torch", "radix", "cooperative", "threshold", "auto"),
                        help="the GPU top-k selector (triton_indexer.SELECTOR; default: its "
                        "default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.compile and args.cache != "static":
        parser.error("--compile needs --cache static (a static step's shapes never change)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.selector:  # Triton is optional: imported only when asked for
        from dsa_compile.kernels import triton_indexer

        triton_indexer.SELECTOR = args.selector
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = llama_model(args.layers).to(device, dtype)
    sparse = llama_model(args.layers).to(device, dtype)  # same seed: same weights
    sparse.set_attn_implementation("dsa")
    dsa_compile.configure(sparse, torch.randint(0, 1000, (1, 64), device=device), topk=args.topk)
    rows = []
    with torch.no_grad():
        for context in args.contexts:
            sdpa_step = step_time(dense, filled_cache(dense, context, False, args.cache),
                                  context, args.steps)
            dsa_cache = filled_cache(sparse, context, True, args.cache)
            dsa_step = step_time(sparse, dsa_cache, context, args.steps)
            memory = dsa_cache.dsa_index_keys.memory_bytes()
            compiled = {}
            if args.compile:  # warm-up steps compile (once: the shapes stay), then timed
                for name, model, cache in (("sdpa", dense, None), ("dsa", sparse, dsa_cache)):
                    cache = cache or filled_cache(dense, context, False, args.cache)
                    torch.compiler.reset()
                    forward = torch.compile(model.forward, mode=args.compile_mode)
                    step_time(model, cache, context, 2, forward)
                    compiled[name] = step_time(model, cache, context, args.steps, forward)
            del dsa_cache
            attn_sdpa, attn_dsa = attention_times(context, args.topk, args.steps, device, dtype)
            rows.append(dict(context=context, sdpa_step_ms=1e3 * sdpa_step,
                             dsa_step_ms=1e3 * dsa_step, step_speedup=sdpa_step / dsa_step,
                             attention_sdpa_ms=1e3 * attn_sdpa, attention_dsa_ms=1e3 * attn_dsa,
                             attention_speedup=attn_sdpa / attn_dsa,
                             index_cache_mib=memory / 2**20))
            if compiled:
                rows[-1].update(compiled_sdpa_step_ms=1e3 * compiled["sdpa"],
                                compiled_dsa_step_ms=1e3 * compiled["dsa"],
                                compiled_step_speedup=compiled["sdpa"] / compiled["dsa"])
            print(rows[-1], flush=True)
    lines = ["# Decode: per-token latency, dsa (indexer key cache) vs SDPA", "",
             f"{datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} "
             f"threads, torch {torch.__version__}, dsa-compile {dsa_compile.__version__}; "
             f"Llama-shaped ({MODEL_SHAPE}, {args.layers} layers), batch 1, {dtype}, "
             f"{args.device}, topk {args.topk}, default granularity, {args.cache} KV cache. "
             f"Command: `python benchmarks/decode.py --cache {args.cache} --device {args.device}"
             f"{' --compile --compile-mode ' + args.compile_mode if args.compile else ''}`", "",
             "| context | SDPA step (ms) | dsa step (ms) | step speed-up | attention SDPA (ms) "
             "| attention dsa (ms) | attention speed-up | indexer key cache (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['sdpa_step_ms']:.1f} | {r['dsa_step_ms']:.1f} | "
              f"{r['step_speedup']:.2f}x | {r['attention_sdpa_ms']:.2f} | "
              f"{r['attention_dsa_ms']:.2f} | {r['attention_speedup']:.2f}x | "
              f"{r['index_cache_mib']:.1f} |" for r in rows]
    if args.compile:
        lines += ["", "Each step compiled by Inductor (`torch.compile(model.forward)`, after two "
                  "warm-up steps; one graph each, compiled once):", "",
                  "| context | SDPA step (ms) | dsa step (ms) | step speed-up |", "|---|---|---|---|"]
        lines += [f"| {r['context']} | {r['compiled_sdpa_step_ms']:.1f} | "
                  f"{r['compiled_dsa_step_ms']:.1f} | {r['compiled_step_speedup']:.2f}x |"
                  for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"decode_{args.cache}" + ("" if args.device == "cpu" else f"_{args.device}")
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
