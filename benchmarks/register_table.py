"""Registers, spills and shared memory of the sparse-attention kernels' sm_90 compiles, per
launch configuration (no GPU needed: ``triton.compile`` for Hopper, then ``ptxas -v``).

    python benchmarks/register_table.py        # prints the markdown table of BENCHMARKS.md

Spilled bytes are a compile-time hint for the GPU sweeps (``benchmarks/gpu_check.py``), not a
timing.
"""

from __future__ import annotations

import torch

from dsa_compile.kernels import triton_aot as aot

LLAMA_TILES = (32, 8, 128, 128, 64)  # heads, kv heads, D, Dv, query block
MLA = (128, 1, 576, 512, 1)

ROWS = [
    # label, kind, shapes, config label, tuning
    ("forward, 64-query tiles", "fwd", LLAMA_TILES, "default (4 warps)", {}),
    ("forward, 64-query tiles", "fwd", LLAMA_TILES, "8 warps", {"num_warps": 8}),
    ("forward, 64-query tiles", "fwd", LLAMA_TILES, "32-key steps", {"block_k": 32}),
    ("forward, MLA", "fwd", MLA, "default", {}),
    ("forward, MLA, 128 heads a program", "fwd", MLA, "`MLA_ALL_HEADS`", aot.MLA_ALL_HEADS),
    ("forward, MLA, 64 rows, 16-key steps", "fwd", MLA, "",
     {"rows_target": 64, "num_warps": 8, "block_k": 16}),
    ("backward query-major, tiles", "bwd", LLAMA_TILES, "default (32 rows, 4 warps)",
     {"mode": "query_major"}),
    ("backward query-major, tiles", "bwd", LLAMA_TILES, "8 warps",
     {"mode": "query_major", "num_warps": 8}),
    ("backward query-major, tiles", "bwd", LLAMA_TILES, "256 rows, 8 warps",
     {"mode": "query_major", "rows_target": 256, "num_warps": 8}),
    ("backward key-major, tiles", "bwd", LLAMA_TILES, "32 rows, 64 slots, 8 warps",
     {"mode": "key_major", "rows_target": 32, "num_warps": 8}),
    ("backward key-major, tiles", "bwd", LLAMA_TILES, "default (64 rows, 64 slots, 4 warps)",
     {"mode": "key_major"}),
    ("backward key-major-split: dK / dV, dQ", "bwd", LLAMA_TILES,
     "32 rows, 8 warps; dQ 32-key steps",
     {"mode": "key_major_split", "rows_target": 32, "num_warps": 8, "dq_block_k": 32}),
    ("backward key-major-split: dK / dV, dQ", "bwd", LLAMA_TILES,
     "defaults (64 rows, 4 warps; dQ 64-key steps)", {"mode": "key_major_split"}),
]


def main() -> None:
    print("| kernel (Llama-8B shapes unless named) | config | shared KB | spilled bytes |")
    print("|---|---|---|---|")
    for label, kind, shapes, config, tuning in ROWS:
        kernels = [aot.sparse_attention_forward(torch.bfloat16, *shapes, tuning=tuning)] \
            if kind == "fwd" else aot.sparse_attention_backward(torch.bfloat16, *shapes,
                                                                tuning=tuning)
        shared = ", ".join(str(round(k.shared / 1000)) for k in kernels)
        spilled = ", ".join(str(k.registers()[1]) for k in kernels)
        print(f"| {label} | {config} | {shared} | {spilled} |")


if __name__ == "__main__":
    main()
