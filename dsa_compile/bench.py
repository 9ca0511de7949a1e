"""``dsa bench``: end-to-end prefill of a Llama-shaped model, ``backend="dsa"`` against
``backend="inductor"`` (dense) in the same run, with a ratio table and a PNG plot; on the CPU
(fp32) or a GPU (bf16), the HF Llama or the same layers in plain PyTorch
(:mod:`.plain_model`)."""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .backend import make_backend
from .config import DSAConfig
from .dynamo_compat import compile_isolated

log = logging.getLogger("dsa_compile")

# A small Llama (head dim 64; attention is most of a long prefill): what ``dsa bench`` runs.
MODEL_SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, intermediate_size=2816)
# Llama-3-8B's layer shapes (head dim 128, GQA 4; its projections and MLP are ~60% of a 32K
# prefill's FLOPs, which bounds what sparse attention can save).
LLAMA_8B_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336)


def llama_model(layers: int, seed: int = 0, shape: dict | None = None) -> torch.nn.Module:
    """A Llama decoder of ``shape`` (default :data:`MODEL_SHAPE`) with ``layers`` layers (random
    weights; no LM head: prefill hidden states)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, max_position_embeddings=131072, attn_implementation="sdpa",
                         **{**(shape or MODEL_SHAPE), "num_hidden_layers": layers})
    return LlamaModel(config).eval()


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds (a CUDA device synchronised
    around each, so its queued kernels count)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _time_backend(model, backend, lengths: list[int], repeats: int,
                  device: torch.device) -> list[tuple[float, float]]:
    """(best seconds, warm-up seconds) per length for one backend: compiled once with dynamic
    shapes on the CPU, once per length on a GPU (static shapes, as serving compiles)."""
    compiled = compile_isolated(model, backend=backend, dynamic=device.type == "cpu")
    times = []
    with torch.no_grad():
        for length in lengths:
            ids = torch.randint(0, 1000, (1, length),
                                generator=torch.Generator().manual_seed(length)).to(device)
            warm = best_time(lambda i=ids: compiled(i), 1)  # compile / warm up, not timed
            times.append((best_time(lambda i=ids: compiled(i), repeats), warm))
    return times


MODELS = ("hf", "plain")
SHAPES = ("small", "8b")


def shape_dims(shape: str) -> dict:
    """The layer sizes a shape name stands for: "small" :data:`MODEL_SHAPE`, "8b"
    :data:`LLAMA_8B_SHAPE` (read at call time, so a patched ``MODEL_SHAPE`` counts)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    return MODEL_SHAPE if shape == "small" else LLAMA_8B_SHAPE


def bench_model(kind: str, layers: int, shape: str) -> torch.nn.Module:
    """The benchmarked decoder: ``kind`` "hf" (transformers' Llama) or "plain"
    (:mod:`.plain_model`), ``shape`` "small" (:data:`MODEL_SHAPE`) or "8b"
    (:data:`LLAMA_8B_SHAPE`), ``layers`` layers, random weights."""
    from .plain_model import plain_decoder

    if kind not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    dims = shape_dims(shape)
    return llama_model(layers, shape=dims) if kind == "hf" else plain_decoder(layers, dims)


def run_bench(lengths: list[int], layers: int = 8, repeats: int = 2,
              config: DSAConfig | None = None,
              progress: Callable[[str], None] | None = None, device: str | None = None,
              model: str = "hf", shape: str = "small") -> dict[str, Any]:
    """Times prefill at each length with both backends, one backend after the other.

    ``device``: "cpu" (fp32) or "cuda" (bf16); default the GPU when there is one. ``model``,
    ``shape``: see :func:`bench_model`. ``progress`` gets a line per step (default: the
    ``dsa_compile`` logger at INFO).
    """
    if not lengths or min(lengths) < 1 or layers < 1 or repeats < 1:
        raise ValueError(f"lengths, layers and repeats must be >= 1, got lengths={lengths}, "
                         f"layers={layers}, repeats={repeats}")
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("dsa bench --device cuda: torch sees no CUDA device here; run with "
                         "--device cpu, or on a machine with a GPU and a CUDA build of torch")
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    config = config or DSAConfig()
    progress = progress or (lambda line: log.info("%s", line))
    net = bench_model(model, layers, shape).to(where, dtype)
    dense = _time_backend(net, "inductor", lengths, repeats, where)
    progress("dense: " + ", ".join(f"{n}: {t:.2f} s" for n, (t, _) in zip(lengths, dense, strict=True)))
    sparse = _time_backend(net, make_backend(config), lengths, repeats, where)
    rows = []
    for length, (t_dense, _), (t_sparse, _) in zip(lengths, dense, sparse, strict=True):
        rows.append({"tokens": length, "inductor_s": t_dense, "dsa_s": t_sparse,
                     "speedup": t_dense / t_sparse})
        progress(f"{length:>6} tokens: inductor {t_dense:.2f} s, dsa {t_sparse:.2f} s, "
                 f"{t_dense / t_sparse:.2f}x")
    dims = shape_dims(shape)
    return {"date": str(datetime.date.today()), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."),
            "model": {"kind": model, **dims, "num_hidden_layers": layers},
            "config": _resolved(config, where), "rows": rows}


def _resolved(config: DSAConfig, device: torch.device) -> dict[str, Any]:
    """The options as run on ``device`` (per-device defaults filled in)."""
    from .kernels.attention import granularity

    options = dict(vars(config))
    options["query_block"], options["key_block"] = granularity(
        device, config.query_block, config.key_block, config.topk)
    return options


def render_table(result: dict[str, Any]) -> str:
    lines = ["| tokens | inductor (dense) s | dsa s | speed-up |", "|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['tokens']} | {row['inductor_s']:.2f} | {row['dsa_s']:.2f} | "
                     f"{row['speedup']:.2f}x |")
    return "\n".join(lines)


def save(result: dict[str, Any], out: Path) -> list[Path]:
    """Writes ``OUT.json``, ``OUT.md`` and ``OUT.png`` (``out`` is a path prefix); returns them."""
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend stays

    paths = [out.with_name(f"{out.name}.{suffix}") for suffix in ("json", "md", "png")]
    out.parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps(result, indent=2))
    device = result.get("device", "cpu")
    meta = (f"{result['date']}, torch {result['torch']}, {device} ({result.get('dtype', 'float32')}), "
            f"{result['threads']} CPU threads, model {result['model']}, dsa config {result['config']}")
    paths[1].write_text(f"{meta}\n\n{render_table(result)}\n")
    tokens = [r["tokens"] for r in result["rows"]]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.plot(tokens, [r["speedup"] for r in result["rows"]], "o-", label="dsa / inductor (dense)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(tokens, [f"{t // 1024}K" if t >= 1024 else str(t) for t in tokens])
    ax.set_xlabel("prefill tokens")
    ax.set_ylabel("speed-up over dense Inductor (x)")
    ax.set_title(f"Llama-shaped prefill on {device} ({result['model']['num_hidden_layers']} layers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    return paths
