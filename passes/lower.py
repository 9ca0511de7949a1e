"""The one lowering: a typed :class:`~.sites.AttentionSite` -> graph nodes computing it sparsely.

Every site, SDPA or hand-written, becomes ``q, k, v`` in ``[B, H, L, D]``, one SDPA-style
``attn_mask`` (rank 4), a scale, then the attention call the rewrite chooses, what fully masked
rows compute in the original (:class:`~.sites.EmptyRows`), and the site's output layout.
Call :func:`emit_operands` and :func:`emit_output` inside ``graph.inserting_before(site.node)``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from torch import fx

from ..kernels.attention import combine_masks, flat_mask_in_view, restore_empty_rows
from .sites import AttentionSite, EmptyRows, Factor, Layout


@dataclass
class Operands:
    """SDPA-equivalent operands of a site (graph nodes or constants)."""

    q: Any
    k: Any
    v: Any
    attn_mask: Any
    scale: Any  # None: SDPA's default D ** -0.5


def product(graph: fx.Graph, factors: list[Factor] | tuple[Factor, ...]) -> Any:
    """The product of the factors: a number, or a node when some factor is a node."""
    number, nodes = 1.0, []
    for factor in factors:
        value = factor.value
        if isinstance(value, fx.Node):
            nodes.append(graph.call_function(operator.truediv, (1.0, value))
                         if factor.reciprocal else value)
        else:
            number = number / value if factor.reciprocal else number * value
    result: Any = number
    for node in nodes:
        result = graph.call_function(operator.mul, (result, node))
    return result


def emit_operands(graph: fx.Graph, site: AttentionSite) -> Operands:
    q, k, v = site.q, site.k, site.v
    scale = None
    if site.scale is not None:
        tensors = [f for f in site.scale if f.tensor]
        if tensors:  # (q . k) * t == (q * t) . k: run-time tensor scales go into q
            q = graph.call_function(operator.mul, (q, product(graph, tensors)))
        scale = product(graph, [f for f in site.scale if not f.tensor])
    mask = None
    if site.mask.terms:
        terms = [(t.kind.value, _in_view(graph, site, t.node) if t.flat else t.node, t.fill,
                  product(graph, t.factors)) for t in site.mask.terms]
        mask = graph.call_function(combine_masks, (terms, site.layout is Layout.BATCHED))
    if site.layout is Layout.BATCH_VIEW:  # [B*H, L, D] -> [B, H, L, D], where the masks live
        q, k, v = (graph.call_method("unflatten", (x, 0, tuple(site.view_shape))) for x in (q, k, v))
    elif site.layout is Layout.BATCHED:  # B*H batches of one head each
        q, k, v = (graph.call_method("unsqueeze", (x, 1)) for x in (q, k, v))
    return Operands(q, k, v, mask, scale)


def _in_view(graph: fx.Graph, site: AttentionSite, mask: fx.Node) -> fx.Node:
    """A mask of the ``[B*H, Lq, Lk]`` scores, for their ``[B, H, Lq, Lk]`` view."""
    return graph.call_function(flat_mask_in_view, (mask, site.view_shape[1]))


def emit_output(graph: fx.Graph, site: AttentionSite, out: fx.Node, operands: Operands) -> fx.Node:
    """What the site's users read: fully masked rows as the original computes them, in the
    site's layout."""
    if operands.attn_mask is not None and site.mask.empty_rows is not EmptyRows.ZERO:
        out = graph.call_function(restore_empty_rows, (out, operands.attn_mask, operands.v,
                                                       site.mask.empty_rows.value))
    if site.layout is Layout.BATCH_VIEW:
        return graph.call_method("flatten", (out, 0, 1))
    if site.layout is Layout.BATCHED:
        return graph.call_method("squeeze", (out, 1))
    return out

