"""Models whose attention already has an indexer (HF transformers' DeepseekV32).

In eager / SDPA mode, HF folds the indexer's top-k into a dense mask before attention:

    index_mask = ones[B, S, T].scatter(-1, topk_indices.long(), False).unsqueeze(1)
    mask = mask & ~index_mask            (boolean masks)
    mask = mask.masked_fill(index_mask, finfo.min)   (additive masks)

which costs O(S * T) memory and no speed-up. :func:`use_model_indexer` recognises that chain in
an attention site's mask, and the rewrite then runs ``sparse_attention`` on the model's own
indices with the original mask as bias: the same output, without the dense index mask.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

from .graph_utils import CASTS, arg, is_call
from .handwritten import MASK_FILL_MAX
from .sites import AttentionSite, Refinement


def _strip_casts(node: Any) -> Any:
    while is_call(node, *CASTS, "long", "int"):
        node = node.args[0]
    return node


def _index_mask_indices(node: Any) -> fx.Node | None:
    """``ones.scatter(-1, idx, False).unsqueeze(1)`` -> ``idx`` (before its integer casts)."""
    if not is_call(node, "unsqueeze", torch.unsqueeze) or node.args[1] != 1:
        return None
    scatter = node.args[0]
    if not is_call(scatter, "scatter", torch.scatter):
        return None
    ones, dim, index = scatter.args[0], arg(scatter, 1, "dim"), arg(scatter, 2, "index")
    value = arg(scatter, 3, "value")
    if dim not in (-1, 2) or value not in (False, 0) or \
            not is_call(ones, "new_ones", torch.ones, torch.ones_like):
        return None
    return _strip_casts(index)


def strip_index_mask(mask: Any) -> tuple[Any, fx.Node] | None:
    """``(base mask, model indices)`` when ``mask`` is a base mask with an index mask folded in."""
    if is_call(mask, operator.and_, torch.logical_and, torch.bitwise_and, "__and__"):
        for base, other in (mask.args[:2], mask.args[1::-1]):
            if is_call(other, operator.invert, torch.logical_not, torch.bitwise_not, "logical_not",
                       "__invert__"):
                indices = _index_mask_indices(other.args[0])
                if indices is not None:
                    return base, indices
    if is_call(mask, "masked_fill", torch.masked_fill):
        value = arg(mask, 2, "value")
        indices = _index_mask_indices(arg(mask, 1, "mask"))
        if indices is not None and isinstance(value, (int, float)) and value <= MASK_FILL_MAX:
            return mask.args[0], indices
    return None


def use_model_indexer(site: AttentionSite) -> None:
    """Points a site at the model's own top-k indices when one of its masks folds them in."""
    if not site.rewritable:
        return
    for i, term in enumerate(site.mask.terms):
        found = strip_index_mask(term.node)
        if found:
            site.owned.append(term.node)
            base, site.model_indices = found
            site.mask.terms[i] = dataclasses.replace(term, node=base)
            site.tags.append(Refinement.MODEL_INDEXER)
            return
