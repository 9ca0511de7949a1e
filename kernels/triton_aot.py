"""Ahead-of-time compilation of the dsa Triton kernels for a GPU target, on any machine.

``triton.compile`` needs no GPU: it produces PTX and a cubin for, e.g., Hopper
(``GPUTarget("cuda", 90, 32)``). Used by the tests (the kernels compile for sm_90, fit its
shared memory and use its tensor-core instructions) and as the ground for plugins that embed
the same kernels in other runtimes (TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_indexer as tix
from . import triton_sparse_attention as tsa
from . import triton_topk as ttk

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 232448  # per block, opt-in maximum of sm_90 (227 KiB)

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.float8_e4m3fn: "fp8e4nv", torch.int32: "i32", torch.uint8: "u8"}


@dataclass
class CompiledKernel:
    name: str
    ptx: str
    cubin: bytes
    shared: int  # bytes of shared memory per block
    num_warps: int

    @property
    def uses_wgmma(self) -> bool:
        """Hopper's warpgroup tensor-core instructions are in the code."""
        return "wgmma.mma_async" in self.ptx


def _jit_function(kernel) -> triton.JITFunction:
    """The JIT function behind a kernel (also when the interpreter wrapped it)."""
    if isinstance(kernel, triton.JITFunction):
        return kernel
    return triton.JITFunction(kernel.fn)


def compile_kernel(kernel, pointer_types: dict[str, str], constants: dict, scalar_types:
                   dict[str, str] | None = None, target: GPUTarget = HOPPER) -> CompiledKernel:
    """Compiles ``kernel`` with every argument not in ``constants`` typed: pointers from
    ``pointer_types`` (``"*bf16"``), floats from ``scalar_types``, the rest ``i32``."""
    fn = _jit_function(kernel)
    options = {k: constants[k] for k in ("num_warps", "num_stages") if k in constants}
    constexprs = {k: v for k, v in constants.items() if k not in options}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = (scalar_types or {}).get(name, "i32")
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
    return CompiledKernel(fn.__name__, compiled.asm["ptx"], compiled.asm["cubin"],
                          compiled.metadata.shared, compiled.metadata.num_warps)


_UNIT_STRIDES = dict(sq_d=1, sk_d=1, sv_d=1, si_k=1, so_d=1)


def sparse_attention_forward(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, dim_v: int,
                             query_block: int = 1, causal: bool = True, has_bias: bool = False,
                             tuning: dict | None = None,
                             target: GPUTarget = HOPPER) -> CompiledKernel:
    """The forward sparse-attention kernel exactly as :func:`.triton_sparse_attention.
    sparse_attention_fwd` would launch it for these shapes."""
    _, meta = tsa.forward_config(heads // kv_heads, query_block, dim, dim_v, causal, has_bias,
                                 tuning)
    t = "*" + _TRITON_TYPES[dtype]
    pointers = dict(Q=t, K=t, V=t, IDX="*i32", BIAS=t, OUT=t, LSE="*fp32")
    return compile_kernel(tsa._sparse_attention_fwd, pointers, {**meta, **_UNIT_STRIDES},
                          {"qk_scale": "fp32"}, target)


def sparse_attention_backward(dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
                              dim_v: int, query_block: int = 1, causal: bool = True,
                              target: GPUTarget = HOPPER) -> CompiledKernel:
    """The backward sparse-attention kernel as :func:`.triton_sparse_attention.
    sparse_attention_bwd` launches it (no bias, no lse gradient: what training a model
    through the rewritten graph runs)."""
    _, meta = tsa.backward_config(heads // kv_heads, query_block, dim, dim_v, causal, False,
                                  False)
    t = "*" + _TRITON_TYPES[dtype]
    pointers = dict(Q=t, K=t, V=t, IDX="*i32", BIAS=t, DO=t, LSE="*fp32", DELTA="*fp32",
                    GLSE="*fp32", DQ="*fp32", DK="*fp32", DV="*fp32", DBIAS="*fp32")
    unit = dict(sq_d=1, sk_d=1, sv_d=1, si_k=1, sdo_d=1, sdq_d=1, sdk_d=1, sdv_d=1)
    return compile_kernel(tsa._sparse_attention_bwd, pointers, {**meta, **unit},
                          {"scale": "fp32"}, target)


def radix_topk(target: GPUTarget = HOPPER) -> CompiledKernel:
    """The radix top-k selector (:mod:`.triton_topk`) as :func:`.triton_topk.radix_topk`
    launches it."""
    pointers = dict(scores="*fp32", out_values="*fp32", out_index="*i64")
    return compile_kernel(ttk.radix_topk_kernel, pointers,
                          {"BLOCK": ttk.BLOCK, "BINS": ttk.BINS, "num_warps": ttk.NUM_WARPS},
                          target=target)


def indexer_scores(dtype: torch.dtype, index_heads: int, index_dim: int, query_block: int = 1,
                   causal: bool = True, target: GPUTarget = HOPPER) -> CompiledKernel:
    """The indexer-scores kernel as :func:`.triton_indexer.score_block` launches it for
    prefill (``query_block`` 1: per query; more: tile max)."""
    meta = tix.scores_config(index_heads, index_dim, query_block, causal, False, False)
    t = "*" + _TRITON_TYPES[dtype]
    pointers = dict(Q=t, K=t, W="*fp32", KSCALE="*fp32", MASK="*u8", OUT="*fp32")
    return compile_kernel(tix._indexer_scores_kernel, pointers,
                          {**meta, "sq_d": 1, "sk_d": 1, "so_s": 1}, target=target)


MLA_ALL_HEADS = {"rows_target": 128, "num_warps": 8}

STANDARD_CONFIGS = {
    # name: (heads, kv_heads, dim, dim_v, query_block)
    "llama8b_exact": (32, 8, 128, 128, 1),
    "llama8b_tile64": (32, 8, 128, 128, 64),
    "mla_mqa": (128, 1, 576, 512, 1),
}


def report() -> dict[str, dict]:
    """Shared memory, warps and wgmma use of the standard configurations, compiled for sm_90."""
    out = {}
    for name, (heads, kv_heads, dim, dim_v, qb) in STANDARD_CONFIGS.items():
        kernel = sparse_attention_forward(torch.bfloat16, heads, kv_heads, dim, dim_v, qb)
        out[f"sparse_attention/{name}"] = kernel
        out[f"sparse_attention_backward/{name}"] = sparse_attention_backward(
            torch.bfloat16, heads, kv_heads, dim, dim_v, qb)
    # MLA with all 128 heads in one program (K / V rows gathered once a query, not twice):
    # a candidate for the next GPU session (benchmarks/gpu_check.py --only mla times it)
    out["sparse_attention/mla_mqa_128_rows"] = sparse_attention_forward(
        torch.bfloat16, 128, 1, 576, 512, 1, tuning=MLA_ALL_HEADS)
    for qb in (1, 64):
        out[f"indexer_scores/qb{qb}"] = indexer_scores(torch.bfloat16, 8, 64, qb)
    out["radix_topk"] = radix_topk()
    return {name: {"shared": k.shared, "fits": k.shared <= HOPPER_SHARED_BYTES,
                   "num_warps": k.num_warps, "wgmma": k.uses_wgmma} for name, k in out.items()}


if __name__ == "__main__":  # python -m dsa_compile.kernels.triton_aot: JSON report
    import json

    print(json.dumps(report(), indent=1))
