"""The ``dsa`` command line."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsa",
        description=(
            "dsa-compile: compile dense attention in PyTorch models into DeepSeek-style sparse "
            "attention (lightning indexer + top-k sparse attention)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dsa-compile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ops = sub.add_parser("ops", help="list the registered dsa ops and their schemas")
    ops.set_defaults(handler=_list_ops)

    demo = sub.add_parser("demo", help="the main job on the embedded MiniLM: sites, exactness, "
                                       "selection recall, embedding similarity, speed")
    demo.add_argument("--topk", type=int, default=64)
    demo.add_argument("--length", type=int, default=512)
    demo.add_argument("--no-speed", action="store_true", help="skip the Inductor timing")
    demo.add_argument("--json", action="store_true", help="print JSON instead of a report")
    demo.set_defaults(handler=_demo)

    bench = sub.add_parser("bench", help="end-to-end prefill of a Llama-shaped model: "
                                         "backend='dsa' against backend='inductor' (dense)")
    bench.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    bench.add_argument("--layers", type=int, default=8)
    bench.add_argument("--repeats", type=int, default=2)
    bench.add_argument("--topk", type=int, default=2048)
    bench.add_argument("--out", default="benchmarks/results/llama_prefill",
                       help="writes OUT.md, OUT.json and OUT.png")
    bench.set_defaults(handler=_bench)

    inspect = sub.add_parser("inspect", help="list the attention sites of a model and whether "
                                             "each would be rewritten (and why not)")
    inspect.add_argument("model", help="'minilm' (the embedded default) or a local HF model "
                                       "directory (safetensors weights)")
    inspect.add_argument("--length", type=int, default=128, help="tokens of the probe input")
    inspect.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                         help="HF attention implementation to load")
    inspect.add_argument("--topk", type=int, default=2048)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(handler=_inspect)
    return parser


def _list_ops(_: argparse.Namespace) -> int:
    import torch

    from . import kernels  # noqa: F401  (registers torch.ops.dsa)

    for name in ("indexer_scores", "indexer_topk", "sparse_attention"):
        print(getattr(torch.ops.dsa, name).default._schema)
    print(f"implementations: CPU (memory-bounded torch); CUDA: {_cuda_kernels()}")
    return 0


def _cuda_kernels() -> str:
    """Which implementation CUDA calls of the ops get here."""
    try:
        import triton
    except ImportError:
        return "the torch implementation (install dsa-compile[triton] for the Triton kernels)"
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    return f"Triton {triton.__version__} kernels ({gpu})"


def _demo(args: argparse.Namespace) -> int:
    import json

    from .demo import format_report, run_demo

    result = run_demo(topk=args.topk, length=args.length, speed=not args.no_speed)
    if args.json:
        result.pop("sites_table")
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import render_table, run_bench, save
    from .config import DSAConfig

    result = run_bench(args.lengths, args.layers, args.repeats, DSAConfig(topk=args.topk))
    print(render_table(result))
    save(result, Path(args.out))
    return 0


def _load_model(name: str, attn: str):
    from pathlib import Path

    if name == "minilm":
        from .demo import load_minilm

        return load_minilm(attn)[0]
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"dsa inspect: {name!r} is neither 'minilm' nor a directory with a "
                         "config.json (models are loaded from local files only)")
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                     attn_implementation=attn).eval()


def _inspect(args: argparse.Namespace) -> int:
    import json

    import torch

    from .api import explain

    model = _load_model(args.model, args.attn)
    vocab = getattr(model.config, "vocab_size", 1000)
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    report = explain(model, ids, topk=args.topk)
    print(json.dumps(report.sites, indent=2) if args.json else report.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
