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
    return parser


def _list_ops(_: argparse.Namespace) -> int:
    import torch

    from . import kernels  # noqa: F401  (registers torch.ops.dsa)

    for name in ("indexer_scores", "indexer_topk", "sparse_attention"):
        print(getattr(torch.ops.dsa, name).default._schema)
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
