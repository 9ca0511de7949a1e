"""A whole model rewritten on the accelerator when there is one (CUDA), else on the CPU.

The pass builds each site's indexer from the q / k projection weights it finds upstream; those
weights live on the model's device. On a GPU this once failed (a CPU basis written from CUDA
eigenvectors) and every site stayed dense: the compiled model was silently as slow as Inductor.
``tests/test_triton_kernels.py`` and this file are what a GPU session runs with pytest.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_model

import dsa_compile
from dsa_compile.ownership import indexers_of

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("selection", ["shared", "kv_head"])
def test_indexers_initialise_from_weights_on_the_models_device(selection):
    torch.compiler.reset()
    model = tiny_model("llama", "sdpa").to(DEVICE)
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        dense = model(ids).logits
        # top-8 of 40 keys: truly sparse, so a site left dense would not match the check below
        sparse = dsa_compile.compile(model, mode="eager", topk=8, query_block=1, key_block=0,
                                     selection=selection)(ids).logits
    indexers = indexers_of(model)
    assert len(indexers) == model.config.num_hidden_layers
    for indexer in indexers.values():
        assert "weights, RoPE-aware" in indexer.info.init, indexer.info.init
        assert {p.device.type for p in indexer.parameters()} == {DEVICE}
    assert sparse.device.type == DEVICE and torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, dense, atol=1e-3)
