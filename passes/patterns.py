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

from . import guards
from .causal_mask import causal_mask_as_flag
from .graph_utils import is_scalar
from .handwritten import broadcast_kv_head, match_matmul_softmax_matmul, unrepeat
from .model_indexer import use_model_indexer
from .multihead import bound_arguments, why_opaque
from .sites import (
    AttentionSite,
    Factor,
    KeepDense,
    MaskTerm,
    Refinement,
    SiteMask,
    TermKind,
    example_value,
)

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
    site = AttentionSite(node=node, pattern="sdpa", q=args["query"], k=args["key"],
                         v=args["value"], is_causal=args["is_causal"],
                         enable_gqa=args["enable_gqa"])
    try:
        _check_sdpa(site, args)
    except KeepDense as err:
        return site.keep_dense(str(err))
    return site


def _check_sdpa(site: AttentionSite, args: dict[str, Any]) -> None:
    if not _is_literal(args["dropout_p"]) or args["dropout_p"] != 0.0:
        raise KeepDense(f"dropout_p={args['dropout_p']} (training-mode dropout is not "
                        "reproduced by the sparse ops)")
    if not isinstance(args["is_causal"], bool):
        raise KeepDense("is_causal is computed at run time (not a Python bool)")
    if not isinstance(args["enable_gqa"], bool):
        raise KeepDense("enable_gqa is computed at run time (not a Python bool)")
    scale = args["scale"]
    if scale is not None:
        if not is_scalar(scale):
            raise KeepDense(f"scale {scale!r} is not a number")
        site.scale = [Factor(scale)]
    mask = args["attn_mask"]
    if mask is not None:
        if not isinstance(mask, fx.Node):
            raise KeepDense("attn_mask is not a tensor")
        if site.is_causal:
            raise KeepDense("SDPA rejects is_causal together with attn_mask")
        is_bool = getattr(example_value(mask), "dtype", None) == torch.bool
        site.mask = SiteMask([MaskTerm(TermKind.KEEP if is_bool else TermKind.ADD, mask)])
    q, k = example_value(site.q), example_value(site.k)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k)):
        raise KeepDense("q, k, v are not all rank-4 [B, H, L, D] tensors")
    if not site.enable_gqa and broadcast_kv_head(site.q, site.k, site.v):
        site.enable_gqa = True  # SDPA broadcasts one kv head over the query heads: MQA
    guards.check_operands(site)
    guards.check_no_autocast([(site.node, site.q)])
    if mask is not None:
        guards.check_mask_shape(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    # K/V repeated for GQA before the call (HF's repeat_kv when it cannot use enable_gqa):
    # attend to the kv heads themselves (no H/Hkv-fold copies; the indexer sees the real keys).
    (k_source, k_repeated), (v_source, v_repeated) = unrepeat(site.k), unrepeat(site.v)
    if k_repeated and v_repeated and not site.enable_gqa and \
            example_value(k_source).shape[1] == example_value(v_source).shape[1]:
        site.owned = [site.k, site.v]
        site.k, site.v, site.enable_gqa = k_source, v_source, True
        site.tags.append(Refinement.GQA_UNREPEATED)


_OPAQUE_MHA = {
    torch._native_multi_head_attention: "nn.MultiheadAttention's fused fast path "
    "(torch._native_multi_head_attention) runs attention inside one kernel",
    torch._transformer_encoder_layer_fwd: "nn.TransformerEncoderLayer's fused fast path "
    "(torch._transformer_encoder_layer_fwd) runs attention inside one kernel; "
    "torch.backends.mha.set_fastpath_enabled(False) before compiling exposes its "
    "nn.MultiheadAttention",
}


def match_opaque_mha(node: fx.Node) -> AttentionSite | None:
    """PyTorch's ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` as Dynamo records
    them: attention inside one call the pass cannot open. Reported, kept dense."""
    if node.op != "call_function":
        return None
    if node.target is F.multi_head_attention_forward:  # what expand_multihead_attention left
        why = why_opaque(bound_arguments(node)) or "its attention weights are used"
        reason = f"nn.MultiheadAttention kept as one call: {why}"
    elif node.target in _OPAQUE_MHA:
        reason = _OPAQUE_MHA[node.target]
    else:
        return None
    return AttentionSite(node=node, pattern="nn_multihead_attention").keep_dense(reason)


CATALOG: list[Callable[[fx.Node], AttentionSite | None]] = [
    match_sdpa,
    match_matmul_softmax_matmul,
    match_opaque_mha,
]


# Applied to every matched site, in order: each may refine what the rewrite will do.
REFINEMENTS: list[Callable[[AttentionSite], None]] = [use_model_indexer, causal_mask_as_flag]
