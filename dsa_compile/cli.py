"""The ``dsa`` command line.

A mistake in the input (an unknown flag, a bad value, a model that cannot be loaded safely) is
reported in one line, ``dsa: error: ...``, with exit status 2; ``dsa`` alone prints the help to
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from ._version import __version__
from .config import DSAConfig, DSAConfigError


class CLIError(Exception):
    """A mistake in the command line's input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line (``dsa: error: ...``) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"dsa: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """An argparse ``type=``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dsa",
        description=(
            "dsa-compile: compile dense attention in PyTorch models into DeepSeek-style sparse "
            "attention (lightning indexer + top-k sparse attention)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dsa-compile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        # every flag's help ends with its default
        return sub.add_parser(name, help=summary, description=summary,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    ops = command("ops", "list the registered dsa ops and their schemas")
    ops.set_defaults(handler=_list_ops)

    demo = command("demo", "the main job on the embedded MiniLM: sites, exactness, selection "
                           "recall, embedding similarity, speed")
    demo.add_argument("--topk", type=positive_int, default=64, help="keys each query attends to")
    demo.add_argument("--length", type=positive_int, default=512,
                      help="tokens of real text (at most 512, MiniLM's maximum)")
    demo.add_argument("--no-speed", action="store_true", help="skip the Inductor timing")
    demo.add_argument("--calibrate-steps", type=int, default=60,
                      help="calibration steps for the side-by-side column (0: skip)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of a report")
    demo.set_defaults(handler=_demo)

    bench = command("bench", "end-to-end prefill of a Llama-shaped model: backend='dsa' against "
                             "backend='inductor' (dense)")
    bench.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 8192, 16384],
                       help="prefill lengths in tokens")
    bench.add_argument("--layers", type=positive_int, default=8, help="decoder layers")
    bench.add_argument("--repeats", type=positive_int, default=2,
                       help="timed runs per length (the best counts)")
    bench.add_argument("--topk", type=positive_int, default=2048, help="keys each query attends to")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="where to run (fp32 on the CPU, bf16 on a GPU; default: the GPU "
                            "when there is one)")
    bench.add_argument("--model", choices=["hf", "plain"], default="hf",
                       help="transformers' Llama, or the same layers in plain PyTorch (SDPA "
                            "with is_causal: the best dense baseline)")
    bench.add_argument("--shape", choices=["small", "8b"], default="small",
                       help="hidden 1024 / 16 heads of 64, or Llama-8B's layers")
    bench.add_argument("--out", metavar="PREFIX",
                       help="write PREFIX.md, PREFIX.json and PREFIX.png (e.g. "
                            "results/llama_prefill); without it nothing is written")
    bench.set_defaults(handler=_bench)

    inspect = command("inspect", "list the attention sites of a model and whether each would be "
                                 "rewritten (and why not)")
    convert = command("convert", "calibrate each attention site's indexer on the model's own "
                      "dense attention; write the adapter and a report (md, png, json)")
    convert.add_argument("model", help="'minilm' (the embedded default) or a local HF model "
                         "directory (safetensors, no custom code)")
    convert.add_argument("--out", required=True, help="directory for the adapter and report")
    convert.add_argument("--calib", nargs="+", default=[], metavar="FILE",
                         help="calibration text files (default: Python's pydoc topics, minus "
                         "the held-out ones)")
    convert.add_argument("--steps", type=positive_int, default=150, help="optimizer steps")
    convert.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    convert.add_argument("--objective", choices=["recall", "output"], default="recall",
                         help="what calibration optimises: attention mass kept by the "
                         "selection, or the error of each site's sparse output")
    convert.add_argument("--topk", type=positive_int, default=64,
                         help="the budget calibrated for and evaluated at")
    convert.add_argument("--index-heads", type=positive_int, default=4, help="indexer heads HI")
    convert.add_argument("--index-dim", type=positive_int, default=32, help="indexer dim DI")
    convert.add_argument("--query-block", type=positive_int, default=None,
                         help="queries sharing a selection (default: the device's)")
    convert.add_argument("--key-block", type=int, default=None,
                         help="two-stage key block, 0 = score every key (default: the device's)")
    convert.add_argument("--eval-windows", type=positive_int, default=4,
                         help="held-out windows of --length tokens the report averages over")
    convert.add_argument("--selection", choices=["shared", "kv_head"], default="shared",
                         help="one selection for all heads, or one per kv head")
    convert.add_argument("--length", type=positive_int, default=512,
                         help="tokens per calibration window and of the held-out text")
    convert.add_argument("--to", choices=["adapter", "deepseek_v32"], default="adapter",
                         help="adapter: a dsa indexer adapter for any model; deepseek_v32: a "
                         "DeepseekV3 checkpoint rewritten as a DeepseekV32 checkpoint (its own "
                         "V3.2 indexer; --index-heads / --index-dim / --topk size it, DeepSeek "
                         "uses 64 / 128 / 2048)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(handler=_convert)

    export = command("export", "export a model with its attention rewritten to an ONNX file "
                     "(dsa-domain nodes with standard-op functions: any runtime runs it)")
    export.add_argument("model", help="'minilm' (the embedded default) or a local HF model "
                                      "directory (safetensors weights; no custom model code)")
    export.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    export.add_argument("--adapter", default=None, metavar="DIR",
                        help="indexers from this adapter (default: training-free)")
    export.add_argument("--topk", type=positive_int, default=64,
                        help="keys per query tile; sequences of at most topk keys run dense")
    export.add_argument("--query-block", type=positive_int, default=None,
                        help="queries sharing a selection (default: the GPU's, 64)")
    export.add_argument("--length", type=positive_int, default=None,
                        help="tokens of the example input (default: 2 * topk, capped by the "
                             "model's positions)")
    export.add_argument("--no-check", action="store_true",
                        help="skip the ONNX Runtime parity check at three lengths")
    export.set_defaults(handler=_export)

    trt = command("trt", "TensorRT: build an engine from an exported ONNX file (the dsa sparse "
                  "attention runs as a plugin whose kernel is the Triton kernel, compiled ahead "
                  "of time)")
    trt.add_argument("action", choices=["build"], help="build: ONNX file -> serialized engine")
    trt.add_argument("onnx", help="an ONNX file written by `dsa export`")
    trt.add_argument("--out", required=True, help="the engine file to write")
    trt.add_argument("--fp16", action="store_true", help="let TensorRT run layers in fp16")
    trt.add_argument("--max-batch", type=positive_int, default=8)
    trt.add_argument("--min-length", type=positive_int, default=1)
    trt.add_argument("--opt-length", type=positive_int, default=2048)
    trt.add_argument("--max-length", type=positive_int, default=8192)
    trt.set_defaults(handler=_trt)

    inspect.add_argument("model", help="'minilm' (the embedded default) or a local HF model "
                                       "directory (safetensors weights; no custom model code)")
    inspect.add_argument("--length", type=positive_int, default=128, help="tokens of the probe input")
    inspect.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                         help="HF attention implementation to load")
    inspect.add_argument("--topk", type=positive_int, default=2048,
                         help="keys each query attends to; sequences of at most topk keys run dense")
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
    from .demo import MAX_LENGTH, format_report, run_demo

    if args.length > MAX_LENGTH:
        raise CLIError(f"argument --length: the demo runs at most {MAX_LENGTH} tokens (MiniLM's "
                       f"maximum), got {args.length}")
    result = run_demo(topk=args.topk, length=args.length, speed=not args.no_speed,
                      calibrate_steps=args.calibrate_steps)
    if args.json:
        result.pop("sites_table")
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import render_table, run_bench, save

    config = DSAConfig(topk=args.topk)
    result = run_bench(args.lengths, args.layers, args.repeats, config, progress=print,
                       device=args.device, model=args.model, shape=args.shape)
    print(render_table(result))
    if args.out is not None:
        written = save(result, Path(args.out))
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _remote_code_reason(config: dict[str, Any]) -> str | None:
    """Why loading a checkpoint with this ``config.json`` would need ``trust_remote_code``."""
    from transformers import CONFIG_MAPPING
    from transformers import __version__ as transformers_version

    if "auto_map" in config:
        return "its config.json has an 'auto_map': the model's code ships with the checkpoint"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return f"its model_type {model_type!r} is unknown to transformers {transformers_version}"
    return None


def _read_config(name: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory of ``name`` and its ``config.json``, checked before loading."""
    if name == "minilm":
        from .demo import minilm_path

        path = minilm_path()
    else:
        path = Path(name)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CLIError(f"{name!r} is neither 'minilm' nor a directory with a config.json (models "
                       "are loaded from local files only)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read {config_file}: {err}") from err
    if not isinstance(config, dict):
        raise CLIError(f"{config_file} is not a JSON object")
    reason = _remote_code_reason(config)
    if reason is not None:
        raise CLIError(f"{name} needs trust_remote_code ({reason}); dsa inspect never runs code "
                       "from a checkpoint")
    return path, config


def _load_model(path: Path, attn: str):
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                          trust_remote_code=False, attn_implementation=attn)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load {path}: {err}") from err
    return model.eval()


def _inspect(args: argparse.Namespace) -> int:
    import torch

    from .api import explain

    config = DSAConfig(topk=args.topk)
    path, model_config = _read_config(args.model)
    most = model_config.get("max_position_embeddings")
    if isinstance(most, int) and args.length > most:
        raise CLIError(f"argument --length: the model takes at most {most} positions "
                       f"(max_position_embeddings), got {args.length}")
    model = _load_model(path, args.attn)
    vocab = getattr(model.config, "vocab_size", 1000)
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    report = explain(model, ids, config=config)
    print(json.dumps(report.sites, indent=2) if args.json else report.table())
    if args.length <= config.dense_up_to:
        note = (f"note: at --length {args.length} every site runs dense SDPA: sequences of at "
                f"most min_seq_len = {config.dense_up_to} keys (topk by default) stay dense; "
                "the rewritten sites switch to the sparse ops above that")
        print(note, file=sys.stderr if args.json else sys.stdout)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    path, model_config = _read_config(args.model)
    most = model_config.get("max_position_embeddings")
    if isinstance(most, int) and args.length > most:
        raise CLIError(f"argument --length: the model takes at most {most} positions "
                       f"(max_position_embeddings), got {args.length}")
    if args.lr <= 0:
        raise CLIError(f"argument --lr: must be > 0, got {args.lr}")
    for file in args.calib:
        if not Path(file).is_file():
            raise CLIError(f"argument --calib: {file} is not a file")

    def load():
        from transformers import AutoTokenizer

        return _load_model(path, "sdpa"), AutoTokenizer.from_pretrained(path, local_files_only=True)

    if args.to == "deepseek_v32":
        return _convert_v3(args, path, model_config)

    options = {"topk": args.topk, "index_heads": args.index_heads, "index_dim": args.index_dim,
               "query_block": args.query_block, "key_block": args.key_block,
               "selection": args.selection}
    result = convert(load, args.out, files=args.calib, steps=args.steps, lr=args.lr,
                     objective=args.objective, eval_windows=args.eval_windows,
                     length=args.length, progress=not args.quiet, **options)
    from .convert import report_markdown

    print(report_markdown(result))
    print(f"adapter and report written to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .onnx_export import FirstOutput, export_onnx

    path, model_config = _read_config(args.model)
    if args.adapter is not None and not Path(args.adapter, "dsa_config.json").is_file():
        raise CLIError(f"argument --adapter: {args.adapter} holds no dsa_config.json")
    most = model_config.get("max_position_embeddings")
    most = most if isinstance(most, int) else 1 << 20
    length = args.length or min(2 * args.topk, most)
    if length > most or length < 2:
        raise CLIError(f"argument --length: must be in [2, {most}], got {length}")
    model = FirstOutput(_load_model(path, "sdpa"))
    vocab = int(getattr(model.model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    example = (torch.randint(0, vocab, (2, length), generator=gen),
               torch.ones(2, length, dtype=torch.long))
    options = {"topk": args.topk, "query_block": args.query_block, "adapter": args.adapter}
    result = export_onnx(model, example, args.onnx, input_names=["input_ids", "attention_mask"],
                         output_names=["output"], **options)
    size = Path(args.onnx).stat().st_size / 2**20
    print(f"wrote {args.onnx} ({size:.1f} MiB): {result.dsa_nodes} dsa nodes, query_block "
          f"{result.config.query_block}, topk {args.topk}; dynamic dims {result.dynamic}")
    if args.no_check:
        return 0
    from .backend import make_backend
    from .dynamo_compat import compile_isolated
    from .plugins.onnx_export import ort_session

    session = ort_session(args.onnx)
    reference = compile_isolated(model, backend=make_backend(result.config, root=model),
                                 dynamic=False)
    for probe in sorted({max(2, args.topk // 2), min(args.topk + 1, most), min(3 * args.topk,
                                                                               most)}):
        ids = torch.randint(0, vocab, (1, probe), generator=gen)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            expected = reference(ids, mask)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        gap = float(np.abs(got - expected.numpy()).max())
        print(f"  length {probe}: max |ORT - torch| = {gap:.2e}")
    return 0


def trt_profile(onnx_path: str, max_batch: int, lengths: tuple[int, int, int]
                ) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes of each graph input of an exported file: dim 0 batch, dim 1
    sequence, other dims as the file fixes them."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    profile = {}
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        shapes = []
        for batch, length in ((1, lengths[0]), (1, lengths[1]), (max_batch, lengths[2])):
            shape = [batch if i == 0 and n is None else length if i == 1 and n is None else n
                     for i, n in enumerate(fixed)]
            if any(n is None for n in shape):
                raise CLIError(f"input {graph_input.name} has a dynamic dim past the first two")
            shapes.append(tuple(shape))
        profile[graph_input.name] = tuple(shapes)
    return profile


def _trt(args: argparse.Namespace) -> int:
    if not Path(args.onnx).is_file():
        raise CLIError(f"{args.onnx} is not a file")
    if not args.min_length <= args.opt_length <= args.max_length:
        raise CLIError("lengths must satisfy --min-length <= --opt-length <= --max-length")
    profile = trt_profile(args.onnx, args.max_batch,
                          (args.min_length, args.opt_length, args.max_length))
    from .plugins.tensorrt import build_engine

    try:
        build_engine(args.onnx, args.out, profile, fp16=args.fp16)
    except RuntimeError as err:
        raise CLIError(str(err)) from err
    print(f"wrote {args.out}")
    return 0


def _convert_v3(args: argparse.Namespace, path: Path, model_config: dict[str, Any]) -> int:
    import transformers

    from .convert import calibration_text, token_batches
    from .deepseek import convert_v3_checkpoint
    from .demo import real_text_ids

    if model_config.get("model_type") != "deepseek_v3":
        raise CLIError(f"--to deepseek_v32 converts DeepseekV3 checkpoints; {args.model} has "
                       f"model_type {model_config.get('model_type')!r}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False).eval()
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load {path} (a tokenizer and safetensors weights are needed): "
                       f"{err}") from err
    held_out = real_text_ids(tokenizer, args.length)
    train = token_batches(tokenizer, calibration_text(args.calib), args.length, 64)
    result = convert_v3_checkpoint(model, args.out, [held_out, *train], steps=args.steps,
                                   lr=args.lr, progress=not args.quiet,
                                   index_n_heads=args.index_heads,
                                   index_head_dim=args.index_dim, index_topk=args.topk)
    tokenizer.save_pretrained(args.out)
    before, after = result["before"], result["after"]
    print(f"DeepseekV32 checkpoint written to {args.out}; indexer recall of the dense attention "
          f"on {args.length} held-out tokens, top-{args.topk}:")
    print("| layer | training-free | calibrated | random selection | best selection |")
    print("|---|---|---|---|---|")
    for i, row in enumerate(zip(before["indexer"], after["indexer"], after["random"],
                                after["best"], strict=True)):
        print(f"| {i} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (CLIError, DSAConfigError) as err:
        print("dsa: error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
