"""Ahead-of-time compilation of the dsa Triton kernels for a GPU target, on any machine.

``triton.compile`` needs no GPU: it produces PTX and a cubin for, e.g., Hopper
(``GPUTarget("cuda", 90, 32)``). Used by the tests (the kernels compile for sm_90, fit its
shared memory and use its tensor-core instructions) and as the ground for plugins that embed
the same kernels in other runtimes (TensorRT).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_indexer as tix
from . import triton_sparse_attention as tsa
from . import triton_topk as ttk
from . import triton_topk_cooperative as ttc
from . import triton_topk_threshold as ttt

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

    def registers(self, arch: int = 90) -> tuple[int, int]:
        """``(registers a thread, bytes spilled to local memory)`` as ``ptxas -v`` reports
        them for this PTX (register pressure is what a larger tile risks)."""
        return ptxas_usage(self.ptx, arch)


def ptxas_usage(ptx: str, arch: int = 90) -> tuple[int, int]:
    """``(registers, spill bytes)`` of a PTX kernel, from Triton's bundled ``ptxas -v``
    (``triton.backends.nvidia.compiler.get_ptxas``: not a documented API, used here only)."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}",
                                 str(source), "-o", str(Path(tmp) / "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stdout + result.stderr
    used = re.search(r"Used (\d+) registers", text)
    if used is None:
        raise RuntimeError(f"ptxas -v reported no register count: {text[-500:]}")
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return int(used.group(1)), spills


def _jit_function(kernel) -> triton.JITFunction:
    """The JIT function behind a kernel (also when the interpreter wrapped it)."""
    if isinstance(kernel, triton.JITFunction):
        return kernel
    return triton.JITFunction(kernel.fn)


def compile_kernel(kernel, pointer_types: dict[str, str], constants: dict, scalar_types:
                   dict[str, str] | None = None, target: GPUTarget = HOPPER,
                   as_launched: bool = False) -> CompiledKernel:
    """Compiles ``kernel`` with every argument not in ``constants`` typed: pointers from
    ``pointer_types`` (``"*bf16"``), floats from ``scalar_types``, the rest ``i32``.

    ``as_launched``: declare pointers and integers divisible by 16, as Triton's launcher
    specialises them for real tensors at the shapes that matter (16-byte aligned storage,
    strides and sizes multiples of 16), to predict what the JIT builds: that specialisation
    enables vectorised, pipelined (``cp.async``) loads that take shared memory (without it an
    MLA variant compiled to 180 KB here and asked for 287 KB on an H200, run 6). A kernel shipped
    ahead of time (the TensorRT plugin) must not assume it: its sizes are whatever comes."""
    fn = _jit_function(kernel)
    options = {k: constants[k] for k in ("num_warps", "num_stages") if k in constants}
    constexprs = {k: v for k, v in constants.items() if k not in options}
    signature = {}
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointer_types.get(name) or (scalar_types or {}).get(name, "i32")
        if as_launched and (signature[name].startswith("*") or signature[name] == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options)
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
                          {"qk_scale": "fp32"}, target, as_launched=True)


_BACKWARD_POINTERS = dict(LSE="*fp32", DELTA="*fp32", DQ="*fp32", DK="*fp32", DV="*fp32",
                         DBIAS="*fp32")
_BACKWARD_UNIT_STRIDES = dict(sq_d=1, sk_d=1, sv_d=1, si_k=1, sdo_d=1, sdq_d=1, sdk_d=1, sdv_d=1)


def sparse_attention_backward(dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
                              dim_v: int, query_block: int = 1, causal: bool = True,
                              tuning: dict | None = None,
                              target: GPUTarget = HOPPER) -> list[CompiledKernel]:
    """The backward sparse-attention kernels as :func:`.triton_sparse_attention.
    sparse_attention_bwd` launches them in ``tuning["mode"]`` (default: the module's mode; no
    bias, no lse gradient: what training a model through the rewritten graph runs): one kernel,
    or the key-major dK / dV kernel and the dQ kernel for ``key_major_split``."""
    group = heads // kv_heads
    t = "*" + _TRITON_TYPES[dtype]
    pointers = dict(Q=t, K=t, V=t, IDX="*i32", BIAS=t, DO=t, **_BACKWARD_POINTERS)
    mode = tsa.backward_mode(dim, dim_v, tuning)
    if mode == "query_major":
        _, meta = tsa.backward_config(group, query_block, dim, dim_v, causal, False, tuning)
        return [compile_kernel(tsa._sparse_attention_bwd, pointers,
                               {**meta, **_BACKWARD_UNIT_STRIDES}, {"scale": "fp32"}, target,
                               as_launched=True)]
    split = mode == "key_major_split"
    _, meta = tsa.backward_kv_config(group, query_block, dim, dim_v, causal, False, not split,
                                     tuning)
    kernels = [compile_kernel(tsa._sparse_attention_bwd_kv, pointers,
                              {**meta, **_BACKWARD_UNIT_STRIDES}, {"scale": "fp32"}, target,
                              as_launched=True)]
    if split:
        _, meta = tsa.backward_q_config(group, query_block, dim, dim_v, causal, False, tuning)
        unit = {k: v for k, v in _BACKWARD_UNIT_STRIDES.items() if k not in ("sdk_d", "sdv_d")}
        kernels.append(compile_kernel(tsa._sparse_attention_bwd_q, {**pointers, "DQ": t},
                                      {**meta, **unit}, {"scale": "fp32"}, target,
                                      as_launched=True))
    return kernels


def radix_topk(target: GPUTarget = HOPPER) -> CompiledKernel:
    """The radix top-k selector (:mod:`.triton_topk`) as :func:`.triton_topk.radix_topk`
    launches it."""
    pointers = dict(scores="*fp32", out_values="*fp32", out_index="*i64")
    return compile_kernel(ttk.radix_topk_kernel, pointers,
                          {"BLOCK": ttk.BLOCK, "BINS": ttk.BINS, "num_warps": ttk.NUM_WARPS},
                          target=target, as_launched=True)


def cooperative_topk(k: int = 2048, slices: int = 128, target: GPUTarget = HOPPER
                     ) -> dict[str, CompiledKernel]:
    """The cooperative top-k's kernels (:mod:`.triton_topk_cooperative`: three radix rounds,
    the write, the finish that sorts ``k``) as :func:`.triton_topk_cooperative.cooperative_topk`
    launches them."""
    sizes = {"BLOCK": ttc.BLOCK, "BINS": ttc.BINS, "LAST_BINS": ttc.LAST_BINS,
             "num_warps": ttc.NUM_WARPS}
    rows = dict(scores="*fp32", workspace="*i32", own="*i32", skip="*i8")
    sizes["HAS_SKIP"] = False
    kernels = {f"round{r}": compile_kernel(ttc.cooperative_round_kernel, rows,
                                           {**sizes, "ROUND": r}, target=target,
                                           as_launched=True) for r in range(3)}
    kernels["write"] = compile_kernel(
        ttc.cooperative_write_kernel, {**rows, "pairs": "*i64"},
        {**sizes, "SLICES": triton.next_power_of_2(slices)}, target=target, as_launched=True)
    kernels["finish"] = compile_kernel(
        ttc.cooperative_finish_kernel,
        dict(scores="*fp32", pairs="*i64", out_values="*fp32", out_index="*i32", skip="*i8"),
        {"KP": triton.next_power_of_2(k), "HAS_VALUES": False, "MISSING_AS_MINUS_ONE": True,
         "HAS_SKIP": False,
         "num_warps": ttc.NUM_WARPS}, target=target, as_launched=True)
    return kernels


def threshold_topk(k: int = 2048, target: GPUTarget = HOPPER) -> CompiledKernel:
    """The threshold top-k kernel (:mod:`.triton_topk_threshold`) as
    :func:`.triton_topk_threshold.threshold_topk_into` launches it for ``k``."""
    pointers = dict(scores="*fp32", pairs="*i64", out_index="*i32", done="*i8", workspace="*i32")
    return compile_kernel(ttt.threshold_topk_kernel, pointers,
                          {"CAP": ttt.capacity(k), "SAMPLE_RUNS": ttt.SAMPLE_RUNS, "RUN": ttt.RUN,
                           "BLOCK": ttt.BLOCK, "ROW_WORDS": ttc.ROW_WORDS,
                           "num_warps": ttt.NUM_WARPS},
                          target=target, as_launched=True)


def indexer_scores(dtype: torch.dtype, index_heads: int, index_dim: int, query_block: int = 1,
                   causal: bool = True, target: GPUTarget = HOPPER) -> CompiledKernel:
    """The indexer-scores kernel as :func:`.triton_indexer.score_block` launches it for
    prefill (``query_block`` 1: per query; more: tile max)."""
    meta = tix.scores_config(index_heads, index_dim, query_block, causal, False, False,
                             fp8=dtype == torch.float8_e4m3fn)
    t = "*" + _TRITON_TYPES[dtype]
    pointers = dict(Q=t, K=t, W="*fp32", KSCALE="*fp32", MASK="*u8", OUT="*fp32")
    return compile_kernel(tix._indexer_scores_kernel, pointers,
                          {**meta, "sq_d": 1, "sk_d": 1, "so_s": 1}, target=target,
                          as_launched=True)


def indexer_scores_decode(dtype: torch.dtype, index_heads: int, index_dim: int,
                          target: GPUTarget = HOPPER) -> CompiledKernel:
    """The decode indexer-scores kernel (index heads as the product's rows) as
    :func:`.triton_indexer.score_block` launches it for a few queries."""
    meta = tix.scores_config(index_heads, index_dim, 1, True, False, False,
                             fp8=dtype == torch.float8_e4m3fn)
    t = "*" + _TRITON_TYPES[dtype]
    pointers = dict(Q=t, K=t, W="*fp32", KSCALE="*fp32", MASK="*u8", OUT="*fp32")
    constants = {k: meta[k] for k in ("HI", "DI", "DIP", "CAUSAL", "HAS_SCALE", "HAS_MASK")}
    return compile_kernel(tix._indexer_scores_decode_kernel, pointers,
                          {**constants, "HIP": max(16, triton.next_power_of_2(index_heads)),
                           "BN": 128, "num_warps": 4, "sq_d": 1, "sk_d": 1, "so_s": 1},
                          target=target, as_launched=True)


# All 128 MLA heads in one program, in 16-key steps: 217 KB of shared memory, ~5 KB of spills a
# thread, 50 TFLOP/s on an H200 (run 6; in 32-key steps it asks for 287 KB: refused).
MLA_ALL_HEADS = {"rows_target": 128, "block_k": 16, "num_warps": 8}

STANDARD_CONFIGS = {
    # name: (heads, kv_heads, dim, dim_v, query_block)
    "llama8b_exact": (32, 8, 128, 128, 1),
    "llama8b_tile64": (32, 8, 128, 128, 64),
    "mla_mqa": (128, 1, 576, 512, 1),
}


def report() -> dict[str, dict]:
    """Shared memory, warps, wgmma use, registers and spills of the standard configurations,
    compiled for sm_90."""
    out = {}
    for name, (heads, kv_heads, dim, dim_v, qb) in STANDARD_CONFIGS.items():
        kernel = sparse_attention_forward(torch.bfloat16, heads, kv_heads, dim, dim_v, qb)
        out[f"sparse_attention/{name}"] = kernel
        out[f"sparse_attention_backward/{name}"], = sparse_attention_backward(
            torch.bfloat16, heads, kv_heads, dim, dim_v, qb, tuning={"mode": "query_major"})
    # key-major backward at the shapes it is for (tile-shared selection; key_major_split is the
    # default, benchmarks/gpu_check.py --only backward times the modes)
    llama_tiles = STANDARD_CONFIGS["llama8b_tile64"]
    out["sparse_attention_backward_key_major/llama8b_tile64"], = sparse_attention_backward(
        torch.bfloat16, *llama_tiles, tuning={"mode": "key_major"})
    (out["sparse_attention_backward_key_major_split/llama8b_tile64"],
     out["sparse_attention_backward_dq/llama8b_tile64"]) = sparse_attention_backward(
        torch.bfloat16, *llama_tiles, tuning={"mode": "key_major_split"})
    # MLA with all 128 heads in one program (K / V rows gathered once a query, not twice;
    # benchmarks/gpu_check.py --only mla times it: 50 TFLOP/s in run 6)
    out["sparse_attention/mla_mqa_128_rows"] = sparse_attention_forward(
        torch.bfloat16, 128, 1, 576, 512, 1, tuning=MLA_ALL_HEADS)
    # MLA with V read from the K tile (v = k[..., :512]): Q stays in shared memory, one
    # 576-wide gather a key step (tsa.SHARED_KV_VIEWS; gpu_check --only mla times it)
    out["sparse_attention/mla_mqa_shared_kv"] = sparse_attention_forward(
        torch.bfloat16, 128, 1, 576, 512, 1, tuning={"shared_kv": True})
    for qb in (1, 64):
        out[f"indexer_scores/qb{qb}"] = indexer_scores(torch.bfloat16, 8, 64, qb)
        # FP8 (config indexer_fp8) at a 16-wide head dim: padded to the 32 FP8 products need
        out[f"indexer_scores_fp8/qb{qb}"] = indexer_scores(torch.float8_e4m3fn, 4, 16, qb)
    out["indexer_scores_decode/bf16"] = indexer_scores_decode(torch.bfloat16, 8, 64)
    out["indexer_scores_decode/fp8"] = indexer_scores_decode(torch.float8_e4m3fn, 4, 16)
    out["radix_topk"] = radix_topk()
    out.update({f"cooperative_topk/{name}": kernel for name, kernel in cooperative_topk().items()})
    out["threshold_topk"] = threshold_topk()
    report = {}
    for name, kernel in out.items():
        registers, spilled = kernel.registers()
        report[name] = {"shared": kernel.shared, "fits": kernel.shared <= HOPPER_SHARED_BYTES,
                        "num_warps": kernel.num_warps, "wgmma": kernel.uses_wgmma,
                        "registers": registers, "spill_bytes": spilled}
    return report


if __name__ == "__main__":  # python -m dsa_compile.kernels.triton_aot: JSON report
    import json

    print(json.dumps(report(), indent=1))
