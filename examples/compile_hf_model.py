"""Compile an HF transformers model with ``backend="dsa"`` (a small Llama made here, random
weights: nothing is downloaded) and check it against the dense model.

    python examples/compile_hf_model.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(short: int = 48, long: int = 160, topk: int = 64) -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    # Sequences up to topk keys run dense (exact); longer ones use the indexer + sparse ops.
    compiled = torch.compile(model, backend="dsa", options={"topk": topk, "query_block": 16})
    result = {}
    with torch.no_grad():
        ids = torch.randint(0, 1000, (1, short))
        result["short_max_abs_diff"] = float((compiled(ids).logits - model(ids).logits).abs().max())
        ids = torch.randint(0, 1000, (1, long))
        sparse, dense = compiled(ids).logits, model(ids).logits
        result["long_top1_agreement"] = float((sparse.argmax(-1) == dense.argmax(-1)).float().mean())
    print(f"{short} tokens (<= topk={topk}): max |dsa - dense| = {result['short_max_abs_diff']:.2e}")
    print(f"{long} tokens (> topk): next-token agreement with dense = "
          f"{result['long_top1_agreement']:.2%} (random weights, training-free indexer)")
    return result


if __name__ == "__main__":
    main()
