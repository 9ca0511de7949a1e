"""Indexers as the model's own state: attach, change, save as an adapter, load into a fresh
copy of the model, detach (a small Llama made here, random weights: nothing is downloaded).

    python examples/adapter_round_trip.py [DIR]
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dsa_compile


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same base weights every time
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def main(directory: str | None = None, length: int = 96, topk: int = 32) -> dict[str, object]:
    directory = directory or tempfile.mkdtemp(prefix="dsa-adapter-")
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    with torch.no_grad():
        dense = model(ids).logits

    # 1. Attach: one capture; each site's indexer becomes <module path>.dsa_indexer.
    dsa_compile.attach(model, ids, topk=topk, query_block=16)
    keys = [k for k in model.state_dict() if ".dsa_indexer." in k]
    print(f"attached {len(keys) // 3} indexers, e.g. {keys[0]}")

    # 2. Change them in place (what calibration does): the compiled model follows at once.
    compiled = torch.compile(model, backend="dsa", options={"mode": "eager"})
    with torch.no_grad():
        before = compiled(ids).logits
        for indexer in (m for m in model.modules() if isinstance(m, dsa_compile.DSAIndexer)):
            indexer.head_weights.mul_(torch.tensor([1.0, 0.0, 0.0, 2.0]))
        after = compiled(ids).logits

    # 3. Save the adapter (dsa_config.json + dsa_indexer.safetensors), load into a fresh model.
    dsa_compile.save_adapter(model, directory)
    fresh = tiny_llama()
    dsa_compile.load_adapter(fresh, directory)
    with torch.no_grad():
        loaded = torch.compile(fresh, backend="dsa", options={"mode": "eager"})(ids).logits

    # 4. Detach: the dense model as it was.
    dsa_compile.detach(model)
    with torch.no_grad():
        detached = model(ids).logits
    result = {
        "adapter": directory,
        "indexers": len(keys) // 3,
        "changed_by_update": float((after - before).abs().max()),
        "loaded_vs_saved": float((loaded - after).abs().max()),
        "detached_vs_dense": float((detached - dense).abs().max()),
        "state_dict_after_detach": sum(".dsa_indexer." in k for k in model.state_dict()),
    }
    print(f"in-place update moved the compiled output by {result['changed_by_update']:.3f}")
    print(f"fresh model + adapter vs the saved one: max |diff| = {result['loaded_vs_saved']:.1e}")
    print(f"after detach: max |diff| to the dense model = {result['detached_vs_dense']:.1e}, "
          f"{result['state_dict_after_detach']} indexer keys")
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
