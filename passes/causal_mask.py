"""Causal masks spelled out as tensors, proved causal and turned back into ``is_causal=True``.

HF transformers builds its SDPA mask from position aranges while compiling (with torch before
2.14 it never relies on ``is_causal`` under Dynamo):

    kv_idx = arange(Lk)[None, None, None, :]      q_idx = arange(Lq)[None, None, :, None]
    attn_mask = (kv_idx <= q_idx).expand(B, 1, Lq, Lk)

That boolean mask is exactly SDPA's top-left causal mask, but as a tensor it costs an
``[Lq, Lk]`` read per use, and the sparse path would gather it as a bias. :func:`prove_causal`
accepts only the spellings it can prove: ``le``/``ge`` of two aranges starting at 0 (plus a
literal 0), laid along the key and query dims by ``None``-indexing/``unsqueeze``, then
``expand``-ed; anything else (offsets, padding terms, ``lt``, positions cast to a float dtype
that cannot count to L) leaves the mask as it is. Hand-written sites qualify when that mask is
their only one (``where(causal, s, -inf)`` or ``masked_fill(~causal, -inf)``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import arg, is_call
from .sites import AttentionSite, MaskTerm, Refinement, TermKind, example_value

_LE = (operator.le, torch.le, "le", "__le__")
_GE = (operator.ge, torch.ge, "ge", "__ge__")
_BROADCASTS = ("expand", "expand_as", "contiguous", "to", "bool")
_INT_CASTS = ("to", "long", "int")
_INVERTS = (operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "__invert__",
            "bitwise_not")


def _same(a: Any, b: Any) -> bool:
    """Sizes equal for every shape the graph may see (SymInts included), without new guards."""
    return statically_known_true(a == b)


def _is_positions_index(index: Any) -> bool:
    """A getitem index made only of ``None``, ``:`` and ``...`` (moves no element)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or i == slice(None, None, None) for i in items)


def _arange_along(node: Any, axis: int, length: Any) -> bool:
    """True if ``node`` holds ``0 .. length-1`` along ``axis`` and size 1 on every other dim."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    shape = list(value.shape)
    axis = axis % len(shape)
    if not _same(shape[axis], length) or any(not _same(n, 1) for i, n in enumerate(shape)
                                             if i != axis):
        return False
    while True:
        if _is_float(node):  # positions past the mantissa would round (bf16: L > 256)
            return False
        moves_nothing = is_call(node, operator.getitem) and _is_positions_index(node.args[1])
        if moves_nothing or is_call(node, "unsqueeze", torch.unsqueeze, *_INT_CASTS):
            node = node.args[0]
        elif is_call(node, operator.add, torch.add, "add") and len(node.args) == 2:
            a, b = node.args
            if isinstance(b, int) and b == 0 and not isinstance(b, bool):
                node = a
            elif isinstance(a, int) and a == 0 and not isinstance(a, bool):
                node = b
            else:
                return False
        else:
            break
    if not is_call(node, torch.arange) or _is_float(node):
        return False
    args = list(node.args)
    if len(args) == 1:
        return True  # arange(n): 0 .. n-1 (n matches the dim checked above)
    step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    return len(args) >= 2 and args[0] == 0 and step == 1


def _is_float(node: Any) -> bool:
    value = example_value(node)
    return not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or \
        value.dtype.is_complex


def prove_causal(mask: Any, lq: Any, lk: Any) -> bool:
    """True if the boolean ``mask`` node is ``key_position <= query_position`` for positions
    ``0 .. Lq-1`` and ``0 .. Lk-1``: SDPA's ``is_causal`` (top-left aligned)."""
    value = example_value(mask)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() < 2:
        return False
    while is_call(mask, *_BROADCASTS):
        inner = mask.args[0]
        inner_value = example_value(inner)
        if not isinstance(inner_value, torch.Tensor) or inner_value.dtype != torch.bool:
            return False
        mask = inner
    if is_call(mask, *_LE):
        kv, q = mask.args[0], arg(mask, 1, "other")
    elif is_call(mask, *_GE):
        q, kv = mask.args[0], arg(mask, 1, "other")
    else:
        return False
    return _arange_along(kv, -1, lk) and _arange_along(q, -2, lq)


def _causal_term(term: MaskTerm, lq: Any, lk: Any) -> bool:
    """A mask term that removes exactly the keys after each query (SDPA's ``is_causal``)."""
    if term.fill != float("-inf"):
        return False
    if term.kind is TermKind.KEEP:
        return prove_causal(term.node, lq, lk)
    if term.kind is TermKind.DROP and is_call(term.node, *_INVERTS):
        return prove_causal(term.node.args[0], lq, lk)
    return False


def causal_mask_as_flag(site: AttentionSite) -> None:
    """Drops a site's only mask and sets ``is_causal`` when the mask is proved causal (no query
    has all its keys masked then, so what fully masked rows compute does not matter)."""
    if not site.rewritable or site.is_causal or len(site.mask.terms) != 1:
        return
    q, k = example_value(site.q), example_value(site.k)
    if _causal_term(site.mask.terms[0], q.shape[-2], k.shape[-2]):
        site.mask.terms = []
        site.is_causal = True
        site.tags.append(Refinement.CAUSAL_MASK)
