"""Shared vs per-kv-head selection on MiniLM: pooled-embedding cosine (sparse vs dense) on the
held-out demo text, and the cost of one causal attention layer of MiniLM's head shape at 16K
tokens (SDPA in the same run).

    python benchmarks/selection_modes.py [--no-speed]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from dsa_compile.bench import best_time
from dsa_compile.config import DSAConfig
from dsa_compile.demo import _run, load_minilm, mean_pooled, real_text_ids
from dsa_compile.kernels.attention import dsa_attention
from dsa_compile.passes.indexer_init import initial_indexer, per_kv_head_indexer

MODES = (("shared", 32), ("kv_head", 32), ("kv_head", 8))


def cosine_table() -> list[str]:
    model, tokenizer = load_minilm("sdpa")
    ids = real_text_ids(tokenizer, 512)
    with torch.no_grad():
        dense = mean_pooled(model(ids).last_hidden_state)
    rows = ["| selection | DI | top-64 CPU default | top-64 exact | top-128 CPU default | "
            "top-128 exact |", "|---|---|---|---|---|---|"]
    for selection, index_dim in MODES:
        cells = []
        for topk in (64, 128):
            for query_block, key_block in ((None, None), (1, 0)):
                config = DSAConfig(topk=topk, min_seq_len=0, mode="eager", selection=selection,
                                   index_dim=index_dim, query_block=query_block,
                                   key_block=key_block)
                cells.append(float((mean_pooled(_run(model, ids, config)) * dense).sum()))
        rows.append(f"| {selection} | {index_dim} | " + " | ".join(f"{c:.4f}" for c in cells)
                    + " |")
    return rows


def speed_table(length: int = 16384, heads: int = 12, dim: int = 32, topk: int = 64
                ) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen) for _ in range(3))
    with torch.no_grad():
        sdpa = best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 2)
    rows = [f"| one causal layer, {heads} heads x {dim}, {length} tokens, top-{topk} | seconds "
            "| vs SDPA |", "|---|---|---|", f"| SDPA | {sdpa:.3f} | 1.00x |"]
    for selection, index_dim in MODES:
        make = per_kv_head_indexer if selection == "kv_head" else initial_indexer
        init = make(heads, heads, dim, 4, index_dim, None, None)

        def run(init=init, selection=selection) -> torch.Tensor:
            return dsa_attention(q, k, v, None, init.q_proj, init.k_proj, init.head_weights,
                                 is_causal=True, scale=None, enable_gqa=False, topk=topk,
                                 dense_up_to=0, query_block=None, key_block=None,
                                 candidate_blocks=0, per_kv_head=selection == "kv_head")

        with torch.no_grad():
            run()
            seconds = best_time(run, 2)
        rows.append(f"| dsa {selection}, DI {index_dim} | {seconds:.3f} | {sdpa / seconds:.2f}x |")
    return rows


if __name__ == "__main__":
    print("\n".join(cosine_table()))
    if "--no-speed" not in sys.argv:
        print()
        print("\n".join(speed_table()))
