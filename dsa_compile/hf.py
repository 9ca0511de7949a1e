"""``attn_implementation="dsa"``: transformers models run their attention on the dsa ops.

``import dsa_compile`` registers ``"dsa"`` in transformers' ``AttentionInterface`` (and its mask
interface, with SDPA's masks), at once if transformers is loaded, else right after it loads.
Every family whose attention goes through the interface then runs :func:`dsa_attention_forward`:
the module's own indexer (``<attention module>.dsa_indexer``, attached by :func:`configure` or
loaded by ``load_adapter``) selects the keys and the sparse ops attend, in prefill and in each
decode step of ``generate()``. Options live per model (:func:`configure`), not in globals.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
import weakref
from typing import Any

import torch

from .config import DSAConfig, DSAConfigError, resolve_config
from .kernels.attention import dsa_attention
from .ownership import attach, indexers_of
from .passes.indexers import DSAIndexer

logger = logging.getLogger("dsa_compile")

NAME = "dsa"
# The options each indexer runs with (set by configure; an indexer without an entry runs the
# DSAConfig defaults).
_RUN_CONFIG: weakref.WeakKeyDictionary[DSAIndexer, DSAConfig] = weakref.WeakKeyDictionary()
_SAID: set[tuple[type, str]] = set()  # (module class, reason) warned about


def dsa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any
                          ) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: ``query [B, H, Lq, D]``, ``key / value
    [B, Hkv, Lk, D|Dv]`` (the KV cache already updated), ``attention_mask`` as SDPA takes it;
    returns ``([B, Lq, H, Dv], None)``. Features the sparse ops do not have (soft-capping, a
    position bias, dropout in training, attention weights) run SDPA's dense path and log why."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    reason = _dense_reason(module, dropout, kwargs)
    if reason is not None:
        if (type(module), reason) not in _SAID:  # once, not at every layer and step
            _SAID.add((type(module), reason))
            logger.warning("dsa: %s runs dense: %s", type(module).__name__, reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    indexer = getattr(module, "dsa_indexer", None)
    if not isinstance(indexer, DSAIndexer) or indexer.detached:
        raise DSAConfigError(
            f"{type(module).__name__} runs attn_implementation='dsa' but has no indexer: call "
            "dsa_compile.configure(model) (training-free indexers) or "
            "dsa_compile.load_adapter(model, DIR) first")
    # Handed over by an indexer key cache's update for this very call (see key_cache.py);
    # taken now, so it can never serve a later call.
    pending, indexer.pending_keys = getattr(indexer, "pending_keys", None), None
    cached = pending[1] if pending is not None and pending[0] is key else None
    config = _RUN_CONFIG.get(indexer) or DSAConfig()
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if causal and kv_length > q_length:  # keys past the queries (a static cache's empty slots)
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        cached = None if cached is None else cached[:, :q_length]
    out = dsa_attention(query, key, value, attention_mask, *indexer.tensors(), is_causal=causal,
                        scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                        topk=config.topk, dense_up_to=config.dense_up_to,
                        query_block=config.query_block, key_block=config.key_block,
                        candidate_blocks=config.candidate_blocks,
                        per_kv_head=indexer.info.per_kv_head, cached_keys=cached,
                        indexer_fp8=config.indexer_fp8)
    return out.transpose(1, 2).contiguous(), None


def _dense_reason(module: torch.nn.Module, dropout: float, kwargs: dict) -> str | None:
    if kwargs.get("softcap") is not None:
        return "attention logit soft-capping"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    if dropout and module.training:
        return "attention dropout in training"
    return None


def configure(model: torch.nn.Module, *example_inputs: Any, config: DSAConfig | None = None,
              **options: Any) -> DSAConfig:
    """Makes an HF model run ``attn_implementation="dsa"`` with these options (``topk``,
    ``min_seq_len``, granularity, ...; :class:`DSAConfig` fields) and returns them.

    A model without indexers gets training-free ones first (``dsa_compile.attach``, traced on
    ``example_inputs``, or on 32 random token ids when none are given); loaded or calibrated
    indexers are kept. Options are the model's own: calling again changes them in place.
    """
    register()
    if not indexers_of(model):
        if not example_inputs:
            vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
            device = next(model.parameters()).device
            example_inputs = (torch.randint(0, vocab, (1, 32), device=device),)
        previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
        _set_implementation(model, "sdpa")  # the pass finds the attention as SDPA calls
        try:
            attach(model, *example_inputs, config=config, **options)
        finally:
            if previous is not None:
                _set_implementation(model, previous)
    base = config or getattr(model, "dsa_config", None) or DSAConfig()
    run = resolve_config(base, {k: v for k, v in options.items()
                                if k not in ("index_heads", "index_dim")})
    indexers = indexers_of(model)
    if not indexers:
        raise DSAConfigError("the model has no attention site the pass can rewrite "
                             "(dsa_compile.explain(model, ...) says why)")
    for indexer in indexers.values():
        _RUN_CONFIG[indexer] = run
    model.dsa_config = run
    _set_implementation(model, NAME)
    return run


def _set_implementation(model: torch.nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise DSAConfigError(f"{type(model).__name__} is not a transformers model "
                             "(no set_attn_implementation)")
    setter(name)


def register() -> None:
    """Registers ``"dsa"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, dsa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


class _AfterTransformersLoads(importlib.abc.MetaPathFinder):
    """Registers once ``transformers.modeling_utils`` has executed (no import of transformers
    at ``import dsa_compile``: it costs seconds)."""

    TARGET = "transformers.modeling_utils"

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            try:
                register()
            except Exception:  # a transformers without the interface: "dsa" stays unknown
                logger.warning("dsa: could not register attn_implementation='dsa'",
                               exc_info=True)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """At ``import dsa_compile``: register now if transformers is loaded, else after it loads."""
    if _AfterTransformersLoads.TARGET in sys.modules:
        try:
            register()
        except Exception:
            logger.warning("dsa: could not register attn_implementation='dsa'", exc_info=True)
    elif importlib.util.find_spec("transformers") is not None and not any(
            isinstance(f, _AfterTransformersLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersLoads())
