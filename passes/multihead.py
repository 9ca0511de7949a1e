"""``nn.MultiheadAttention`` opened up: Dynamo records ``F.multi_head_attention_forward`` as one
opaque call; :func:`expand_multihead_attention` replaces it, before matching, by its
projections, one ``F.scaled_dot_product_attention`` and its output projection (what PyTorch's
own ``need_weights=False`` path computes), so the SDPA pattern finds the attention inside.

Expanded only when that path is the one PyTorch runs: ``need_weights=False`` (the default
``True`` returns head-averaged weights, which sparse attention does not compute), batched
inputs, one packed in-projection, no ``bias_k``/``bias_v``/``add_zero_attn``/``static_k``/
``static_v``, and no dropout in training. Otherwise the call stays opaque and ``explain()``
says which condition failed.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .graph_utils import emit
from .sites import example_value

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def bound_arguments(node: fx.Node) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def why_opaque(args: dict[str, Any]) -> str | None:
    """None when the call can be expanded, else the reason it stays one opaque call."""
    query = example_value(args["query"])
    checks = [
        (args["need_weights"] is not False, "need_weights=True returns the head-averaged "
         "attention weights (call it with need_weights=False)"),
        (not isinstance(query, torch.Tensor) or query.dim() != 3, "unbatched inputs"),
        (args["use_separate_proj_weight"] is not False or
         not isinstance(args["in_proj_weight"], fx.Node), "separate q/k/v projection weights"),
        (any(args[name] is not None for name in ("bias_k", "bias_v", "static_k", "static_v")),
         "bias_k / bias_v / static_k / static_v"),
        (args["add_zero_attn"] is not False, "add_zero_attn"),
        (args["training"] is not False and args["dropout_p"] != 0.0,
         "dropout in training mode"),
        (not isinstance(args["num_heads"], int) or not isinstance(args["is_causal"], bool),
         "heads or is_causal computed at run time"),
    ]
    reasons = [why for failed, why in checks if failed]
    return "; ".join(reasons) or None


def mha_operands(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                 in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None,
                 key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``query [Lq, B, E]``, ``key``/``value [Lk, B, E]`` -> SDPA's ``q [B, H, Lq, E/H]``,
    ``k``, ``v [B, H, Lk, E/H]`` and one additive ``attn_mask`` (or None), as
    ``F.multi_head_attention_forward`` builds them (boolean masks: True = masked out)."""
    tgt_len, batch, embed = query.shape
    head_dim = embed // num_heads
    weights = in_proj_weight.chunk(3)
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases,
                                                    strict=True))

    def heads(x: torch.Tensor) -> torch.Tensor:  # [L, B, E] -> [B, H, L, E/H]
        return x.view(x.shape[0], batch * num_heads, head_dim).transpose(0, 1) \
            .view(batch, num_heads, x.shape[0], head_dim)

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype != torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device) \
            .masked_fill(mask, float("-inf"))

    mask = None
    if attn_mask is not None:  # [Lq, Lk], [1, Lq, Lk] or [B * H, Lq, Lk]
        mask = additive(attn_mask)
        if mask.dim() == 3:
            mask = mask.unsqueeze(0) if mask.shape[0] == 1 else \
                mask.view(batch, num_heads, tgt_len, -1)
    if key_padding_mask is not None:  # [B, Lk]
        padding = additive(key_padding_mask).view(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return heads(q), heads(k), heads(v), mask


def mha_output(attention: torch.Tensor, out_proj_weight: torch.Tensor,
               out_proj_bias: torch.Tensor | None) -> torch.Tensor:
    """SDPA's ``[B, H, Lq, E/H]`` -> the module's ``[Lq, B, E]`` after the output projection."""
    batch, heads, tgt_len, head_dim = attention.shape
    out = attention.permute(2, 0, 1, 3).contiguous().view(batch * tgt_len, heads * head_dim)
    return F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, batch, -1)


def expand_multihead_attention(graph: fx.Graph) -> None:
    """Replaces each expandable ``F.multi_head_attention_forward`` call (see the module doc)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
            continue
        args = bound_arguments(node)
        users = list(node.users)
        if why_opaque(args) or not all(u.target is operator.getitem and u.args[1] in (0, 1)
                                       for u in users) or \
                any(u.args[1] == 1 and u.users for u in users):
            continue
        # PyTorch's rule: the is_causal hint replaces the mask unless a padding mask is merged.
        causal = args["is_causal"] and args["key_padding_mask"] is None
        mask = None if causal else args["attn_mask"]
        meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        with graph.inserting_before(node):
            operands = emit(graph, meta, mha_operands, args["query"], args["key"],
                             args["value"], args["num_heads"], args["in_proj_weight"],
                             args["in_proj_bias"], args["key_padding_mask"], mask)
            q, k, v = (emit(graph, meta, operator.getitem, operands, i) for i in range(3))
            attn_mask = None if mask is None and args["key_padding_mask"] is None else \
                emit(graph, meta, operator.getitem, operands, 3)
            attention = emit(graph, meta, F.scaled_dot_product_attention, q, k, v,
                              attn_mask=attn_mask, dropout_p=0.0, is_causal=causal)
            out = emit(graph, meta, mha_output, attention, args["out_proj_weight"],
                        args["out_proj_bias"])
        for user in users:
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
