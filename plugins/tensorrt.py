"""TensorRT plugin for ``dsa::SparseAttention``, built from the same Triton kernel the torch op
runs on CUDA, compiled ahead of time (``tensorrt.plugin``: ``register``, ``autotune``,
``aot_impl``; TensorRT >= 10.7): the engine embeds the PTX, so it runs with no Python.

TensorRT's ONNX parser maps a node to a plugin when its ``op_type`` is the plugin's name and it
carries ``plugin_namespace`` (every dsa node does). ``dsa::IndexerTopK`` has no plugin: its
local function (standard ops; TensorRT's TopK takes k <= 3840) is what the parser imports.

Only the kernel's launch is planned here (:func:`sparse_attention_kernel`: PTX, grid, block,
shared memory and the int32 scalars, as expressions of the input shapes): it works with plain
ints (tests) and with TensorRT's symbolic shape expressions alike. TensorRT calls the kernel
as ``(inputs..., scalars..., outputs...)``: :func:`..kernels.triton_sparse_attention.
sparse_attention_fwd_plugin` has exactly that signature.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from triton.backends.compiler import GPUTarget

from ..kernels import triton_sparse_attention as tsa
from ..kernels.triton_aot import _TRITON_TYPES, compile_kernel
from .onnx_ops import PLUGIN_NAMESPACE

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::SparseAttention"
LOG2E = 1.4426950408889634
INPUTS = ("q", "k", "v", "indices", "bias")
SCALARS = ("sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_s", "sv_b", "sv_h", "sv_s", "si_b", "si_r",
           "sb_b", "sb_h", "sb_t", "sb_s", "so_b", "so_h", "so_t", "sl_b", "sl_h", "sl_t",
           "LQ", "LK", "TOPK", "GROUP", "q_offset")


class PluginError(ValueError):
    """A plugin call the kernel cannot serve (a size that must be known at build time is not)."""


@dataclass
class PluginKernel:
    """One ahead-of-time compiled launch: ``grid`` and ``extra_args`` are ints or shape
    expressions (whatever the shapes were)."""

    name: str
    ptx: str
    grid: tuple[Any, Any, Any]
    block: int
    shared: int
    extra_args: list[Any] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)


def _static(value: Any, what: str) -> int:
    if isinstance(value, int):
        return value
    if getattr(value, "is_constant", False):
        return int(value.constant_value)
    raise PluginError(f"{what} must be known when the engine is built (it is dynamic)")


def _is_one(value: Any) -> bool:
    return (value == 1) if isinstance(value, int) else bool(
        getattr(value, "is_constant", False) and value.constant_value == 1)


def _contiguous_strides(shape: list[Any]) -> list[Any]:
    strides, running = [], 1
    for extent in reversed(shape):
        strides.append(running)
        running = extent * running
    return strides[::-1]


def _broadcast_strides(shape: list[Any]) -> list[Any]:
    """Strides of a contiguous tensor, 0 along dims of (build-time) size 1."""
    return [0 if _is_one(n) else s for n, s in zip(shape, _contiguous_strides(shape), strict=True)]


def target_arch() -> int:
    """The SM the engine is built for: ``DSA_TRT_SM`` (e.g. ``90``), else the visible GPU's,
    else 90 (Hopper)."""
    if os.environ.get("DSA_TRT_SM"):
        return int(os.environ["DSA_TRT_SM"])
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90


def _drop_hidden_params(ptx: str, name: str, expected: int) -> str:
    """Triton (>= 3.3) appends scratch-buffer pointers to every kernel's parameters; TensorRT
    passes only the plugin's. They are removed from the entry's signature when the body never
    reads them (no global or profiling scratch), else this is an error."""
    entry = re.search(rf"\.entry {re.escape(name)}\(([^)]*)\)", ptx, re.S)
    if entry is None:
        raise PluginError(f"no .entry {name} in the PTX")
    params = [p.strip() for p in entry.group(1).split(",") if p.strip()]
    if len(params) < expected:
        raise PluginError(f"{name} takes {len(params)} parameters, the plugin passes {expected}")
    body = ptx[entry.end():]
    for param in params[expected:]:
        if param.split()[-1] in body:
            raise PluginError(f"{name} reads its hidden parameter {param.split()[-1]}: it "
                              "needs scratch memory that TensorRT does not pass")
    signature = ",\n\t".join(params[:expected])
    return ptx[:entry.start(1)] + "\n\t" + signature + "\n" + ptx[entry.end(1):]


@dataclass
class PluginLaunch:
    """The launch of ``sparse_attention_fwd_plugin`` for some input shapes: grid, int32
    scalars (ints or shape expressions, as the shapes were) and compile-time constants."""

    grid: tuple[Any, Any, Any]
    extra_args: list[Any]
    constants: dict[str, Any]


def sparse_attention_launch(q_shape: list[Any], k_shape: list[Any], v_shape: list[Any],
                            idx_shape: list[Any], bias_shape: list[Any], scale: float,
                            causal: bool, q_offset: int, query_block: int) -> PluginLaunch:
    """The plugin's launch of ``dsa::SparseAttention`` for these (contiguous) input shapes:
    ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``, ``indices [B, R, K]``,
    ``bias [B|1, H|1, Lq|1, Lk|1]`` (H, Hkv, D, Dv must be static; B, Lq, Lk, R, K may be
    dynamic). Same tiling, grid and scalars as the torch op's Triton launch with one split."""
    batch, heads, lq, _ = q_shape
    kv_heads, lk = k_shape[1], k_shape[2]
    heads_n, kv_n = _static(heads, "the head count"), _static(kv_heads, "the kv head count")
    dim, dim_v = _static(q_shape[3], "the head dim"), _static(v_shape[3], "the value dim")
    if heads_n % kv_n:
        raise PluginError(f"{heads_n} heads do not split into {kv_n} kv heads")
    rows, topk = idx_shape[1], idx_shape[2]
    group = heads_n // kv_n
    tiling, meta = tsa.forward_config(group, query_block, dim, dim_v, bool(causal), True)
    sq, sk, sv = (_contiguous_strides(list(s)) for s in (q_shape, k_shape, v_shape))
    si = _contiguous_strides(list(idx_shape))
    sb = _broadcast_strides(list(bias_shape))
    so = _contiguous_strides([batch, heads, lq, dim_v])
    sl = _contiguous_strides([batch, heads, lq])
    extra = [*sq[:3], *sk[:3], *sv[:3], *si[:2], *sb, *so[:3], *sl[:3], lq, lk, topk, group,
             q_offset]
    grid = (rows * tiling.sub_tiles, kv_heads * tiling.head_blocks, batch)
    return PluginLaunch(grid, extra, {**meta, "QK_SCALE": float(scale) * LOG2E})


def sparse_attention_kernel(q_shape: list[Any], k_shape: list[Any], v_shape: list[Any],
                            idx_shape: list[Any], bias_shape: list[Any], dtype: torch.dtype,
                            scale: float, causal: bool, q_offset: int, query_block: int,
                            arch: int | None = None) -> PluginKernel:
    """:func:`sparse_attention_launch` with the kernel compiled for ``arch`` (PTX whose entry
    takes exactly the plugin's parameters)."""
    launch = sparse_attention_launch(q_shape, k_shape, v_shape, idx_shape, bias_shape, scale,
                                     causal, q_offset, query_block)
    kind = "*" + _TRITON_TYPES[dtype]
    pointers = dict(Q=kind, K=kind, V=kind, IDX="*i32", BIAS=kind, OUT=kind, LSE="*fp32")
    compiled = compile_kernel(tsa.sparse_attention_fwd_plugin, pointers, launch.constants,
                              target=GPUTarget("cuda", arch or target_arch(), 32))
    ptx = _drop_hidden_params(compiled.ptx, compiled.name, len(INPUTS) + len(SCALARS) + 2)
    return PluginKernel(compiled.name, ptx, launch.grid, compiled.num_warps * 32,
                        compiled.shared, launch.extra_args, launch.constants)


def register(trtp: Any, trt: Any) -> None:
    """Registers the ``dsa::SparseAttention`` plugin with ``tensorrt.plugin`` (``trtp``; ``trt``
    is the ``tensorrt`` module). Call once per process, before parsing an ONNX file."""
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16,
              trt.bfloat16: torch.bfloat16}

    @trtp.register(PLUGIN_ID)
    def sparse_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                              indices: trtp.TensorDesc, bias: trtp.TensorDesc, scale: float,
                              causal: int, q_offset: int, query_block: int
                              ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        out = q.like()
        out.shape_expr[3] = v.shape_expr[3]
        lse = trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]),
                                   dtype=trt.float32)
        return out, lse

    @trtp.autotune(PLUGIN_ID)
    def sparse_attention_autotune(q, k, v, indices, bias, outputs) -> list:
        return [trtp.AutoTuneCombination(f"{t}, {t}, {t}, INT32, {t}, {t}, FP32")
                for t in ("FP32", "FP16", "BF16")]

    @trtp.aot_impl(PLUGIN_ID)
    def sparse_attention_aot(q, k, v, indices, bias, scale: float, causal: int, q_offset: int,
                             query_block: int, outputs, tactic: int):
        kernel = sparse_attention_kernel(
            list(q.shape_expr), list(k.shape_expr), list(v.shape_expr),
            list(indices.shape_expr), list(bias.shape_expr), dtypes[q.dtype], scale,
            bool(causal), q_offset, query_block)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = kernel.grid
        params.block_x = kernel.block
        params.shared_mem = kernel.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in kernel.extra_args])
        return kernel.name.encode(), kernel.ptx.encode(), params, extra


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
                 fp16: bool = False) -> None:
    """Parses ``onnx_path`` with the plugin registered and writes a serialized engine.
    ``profile``: per dynamic input, (min, opt, max) shapes."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise RuntimeError("building a TensorRT engine needs TensorRT >= 10.7 with its Python "
                           "plugin API (pip install tensorrt, on a machine with an NVIDIA "
                           "GPU)") from err
    register(trtp, trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}")
    with open(engine_path, "wb") as out:
        out.write(engine)
