"""The catalog of attention patterns.

Each pattern is one function ``match_<name>(node) -> AttentionSite | None`` that looks at a
single node of a Dynamo FX graph and, when that node computes attention in its spelling,
returns the site (with ``keep_dense(reason)`` when the spelling is recognised but cannot be
rewritten exactly). Add a spelling by adding one function to :data:`CATALOG` and one test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .causal_mask import causal_mask_as_flag
from .handwritten import match_matmul_softmax_matmul, unrepeat
from .model_indexer import use_model_indexer
from .sites import AttentionSite, example_value

_SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_PARAMS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa"]
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def bind_arguments(node: fx.Node, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """The node's arguments by parameter name (positional and keyword), defaults filled in."""
    bound = dict(defaults)
    bound.update(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _is_literal(value: Any) -> bool:
    return not isinstance(value, fx.Node)


def match_sdpa(node: fx.Node) -> AttentionSite | None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)`` in all its forms."""
    if node.op != "call_function" or node.target not in _SDPA_TARGETS:
        return None
    args = bind_arguments(node, _SDPA_PARAMS, _SDPA_DEFAULTS)
    site = AttentionSite(
        node=node, pattern="sdpa", q=args["query"], k=args["key"], v=args["value"],
        attn_mask=args["attn_mask"], is_causal=args["is_causal"], scale=args["scale"],
        enable_gqa=args["enable_gqa"],
    )
    if not _is_literal(args["dropout_p"]) or args["dropout_p"] != 0.0:
        return site.keep_dense(f"dropout_p={args['dropout_p']} (training-mode dropout is not "
                               "reproduced by the sparse ops)")
    if not isinstance(args["is_causal"], bool):
        return site.keep_dense("is_causal is computed at run time (not a Python bool)")
    if not isinstance(args["enable_gqa"], bool):
        return site.keep_dense("enable_gqa is computed at run time (not a Python bool)")
    q, k, v = (example_value(x) for x in (site.q, site.k, site.v))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return site.keep_dense("q, k, v are not all rank-4 [B, H, L, D] tensors")
    if q.shape[1] != k.shape[1] and not args["enable_gqa"]:
        return site.keep_dense("query and key head counts differ without enable_gqa")
    mask = example_value(site.attn_mask)
    if site.attn_mask is not None and not isinstance(mask, torch.Tensor):
        return site.keep_dense("attn_mask is not a tensor")
    if isinstance(mask, torch.Tensor) and mask.dim() > 4:
        return site.keep_dense(f"attn_mask has rank {mask.dim()} > 4")
    if site.is_causal and site.attn_mask is not None:
        return site.keep_dense("SDPA rejects is_causal together with attn_mask")
    # K/V repeated for GQA before the call (HF's repeat_kv when it cannot use enable_gqa):
    # attend to the kv heads themselves (no H/Hkv-fold copies; the indexer sees the real keys).
    (k_source, k_repeated), (v_source, v_repeated) = unrepeat(site.k), unrepeat(site.v)
    if k_repeated and v_repeated and not site.enable_gqa and \
            example_value(k_source).shape[1] == example_value(v_source).shape[1]:
        site.k, site.v, site.enable_gqa = k_source, v_source, True
    return site


CATALOG: list[Callable[[fx.Node], AttentionSite | None]] = [
    match_sdpa,
    match_matmul_softmax_matmul,
]


# Applied to every matched site, in order: each may refine what the rewrite will do.
REFINEMENTS: list[Callable[[AttentionSite], None]] = [use_model_indexer, causal_mask_as_flag]
