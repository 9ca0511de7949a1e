"""The indexer key cache: during generation each layer keeps its indexer's keys of past tokens
beside the KV cache, so a decode step projects only its new tokens' keys (DI values per token
and layer; ``groups * DI`` with one selection per kv head) instead of re-reading all of K.

``index_cache(model, cache)`` extends a transformers ``Cache`` (``DynamicCache`` by default,
``StaticCache`` too): after the cache's own ``update`` for layer i it projects the new keys
with layer i's indexer, appends them (dynamic) or writes them at ``cache_position`` (static),
and hands the layer's whole key set to that layer's attention call
(``attn_implementation="dsa"``), which runs right after. Whatever the hand-off cannot vouch for
(a reordered or cropped cache, keys of another length) is recomputed from the keys: never stale.
"""

from __future__ import annotations

from typing import Any

import torch

from .kernels.attention import index_keys
from .passes.indexers import DSAIndexer

_INVALIDATING = ("reorder_cache", "crop", "reset", "batch_select_indices", "batch_repeat_interleave")


def _layer_indexers(model: torch.nn.Module) -> dict[int, DSAIndexer]:
    """``{layer_idx: indexer}`` of the attention modules that have one."""
    found = {}
    for module in model.modules():
        indexer = getattr(module, "dsa_indexer", None)
        layer = getattr(module, "layer_idx", None)
        if isinstance(indexer, DSAIndexer) and isinstance(layer, int):
            found[layer] = indexer
    return found


class IndexKeys:
    """The indexer keys of one cache, per layer: ``[B, L, groups * DI]`` (dynamic: the tokens
    so far; static: the cache's full length, written at ``cache_position``)."""

    def __init__(self, indexers: dict[int, DSAIndexer]):
        self.indexers = indexers
        self.keys: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        self.keys.clear()

    def after_update(self, layer: int, new_keys: torch.Tensor, keys: torch.Tensor,
                     written: torch.Tensor | None) -> None:
        """``new_keys`` were just written to layer ``layer``'s cache, whose keys are now
        ``keys``; ``written``: the positions a static cache wrote them at (None if unknown)."""
        indexer = self.indexers.get(layer)
        if indexer is None:
            return
        k_proj = indexer.k_proj.detach()
        held, total, new = self.keys.get(layer), keys.shape[2], new_keys.shape[2]
        if held is not None and held.shape[1] + new == total:  # dynamic: append
            held = torch.cat([held, index_keys(new_keys, k_proj)], dim=1)
        elif held is not None and held.shape[1] == total and written is not None:
            # static: write where the cache wrote (its own index_copy_ checked the range)
            held.index_copy_(1, written, index_keys(new_keys, k_proj).to(held.dtype))
        elif new == total:
            held = index_keys(new_keys, k_proj)
        else:  # nothing to vouch for (a first static step, a cache filled elsewhere)
            held = index_keys(keys, k_proj)
        self.keys[layer] = held
        indexer.pending_keys = (keys, held)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys.values())


def index_cache(model: torch.nn.Module, cache: Any = None) -> Any:
    """``cache`` (a transformers ``Cache``; a new ``DynamicCache`` by default) keeping the
    indexer keys of ``model``'s dsa layers; pass it to ``generate(past_key_values=...)``. The
    model must run ``attn_implementation="dsa"`` with indexers (``dsa_compile.configure``)."""
    from transformers import DynamicCache

    indexers = _layer_indexers(model)
    if not indexers:
        raise ValueError("the model has no indexers on attention modules with a layer_idx: "
                         "dsa_compile.configure(model) first")
    if cache is None:
        cache = DynamicCache(config=getattr(model, "config", None))
    store = IndexKeys(indexers)
    update = cache.update

    def update_with_index_keys(key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(key_states, value_states, layer_idx, *args, **kwargs)
        store.after_update(layer_idx, key_states, keys,
                           _static_positions(cache, layer_idx, key_states.shape[2]))
        return keys, values

    cache.update = update_with_index_keys
    for name in _INVALIDATING:
        method = getattr(cache, name, None)
        if callable(method):
            setattr(cache, name, _clearing(method, store))
    cache.dsa_index_keys = store
    return cache


def _static_positions(cache: Any, layer: int, new: int) -> torch.Tensor | None:
    """The positions where a static cache layer wrote its last ``new`` tokens, as the layer
    computes them (its ``cumulative_length`` tensor counts the tokens written; tensor ops only,
    so a compiled decode step neither breaks its graph nor recompiles per token), or None for
    other layers."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer >= len(layers):
        return None
    written = getattr(layers[layer], "cumulative_length", None)
    if not isinstance(written, torch.Tensor) or not hasattr(layers[layer], "max_cache_len"):
        return None
    return torch.arange(new, device=written.device) + (written - new)


def _clearing(method: Any, store: IndexKeys) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        store.clear()
        return method(*args, **kwargs)

    return call
