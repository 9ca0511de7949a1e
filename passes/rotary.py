"""Detecting rotary position embeddings (RoPE) between a site's projections and its attention.

The indexer is applied to the q and k the attention sees, i.e. after RoPE. When RoPE is there,
the training-free indexer must commute with it (see :mod:`.indexer_init`), so the rewrite asks
:func:`applies_rotary` about the site's q and k. Recognised: HF's non-interleaved form over the
whole head dim (Llama, Qwen2/3, Mistral, Gemma, ...),

    x * cos + rotate_half(x) * sin,   rotate_half(x) = cat((-x[..., D/2:], x[..., :D/2]), -1)

in either operand order, followed by ops that keep each head's vector intact (casts,
transposes and reshapes that keep the last dim, KV-cache concatenation along the sequence,
scalar scaling). Anything else (interleaved or partial rotary, complex-number RoPE) is not
recognised, and the plain weight-based init is used.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from .graph_utils import CASTS, is_call, is_scalar, normalized_dim, rank, tensor_value

_DEPTH = 12
_LAYOUT = ("transpose", torch.transpose, "permute", torch.permute, "view", "reshape",
           torch.reshape, "expand", "unsqueeze", torch.unsqueeze, "clone", torch.clone,
           operator.getitem, torch.cat)
_MULS = (operator.mul, torch.mul, "mul")
_ADDS = (operator.add, torch.add, "add")
_NEGS = (operator.neg, torch.neg, "neg")


def applies_rotary(node: Any, dim: int) -> bool:
    """True when ``node`` (a site's q or k, last dim ``dim``) is HF-style RoPE of its input,
    up to ops that keep every head's ``dim``-vector intact."""
    return _rotary(node, dim, _DEPTH)


def _last_dim(node: Any) -> int | None:
    value = tensor_value(node)
    return int(value.shape[-1]) if value is not None and value.dim() > 0 else None


def _rotary(node: Any, dim: int, depth: int) -> bool:
    if depth == 0 or not isinstance(node, fx.Node) or _last_dim(node) != dim:
        return False
    if rotary_input(node) is not None:
        return True
    if is_call(node, torch.cat):  # a KV cache: the new keys must be rotated (past keys given
        # as graph inputs were made by the same site, so they are not inspected)
        parts = [p for p in node.args[0] if not _empty(p) and
                 not (isinstance(p, fx.Node) and p.op == "placeholder")]
        cat_dim = normalized_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0),
                                 rank(node))
        return bool(parts) and cat_dim != rank(node) - 1 and \
            all(_rotary(p, dim, depth - 1) for p in parts)
    source = _pass_through(node)
    return source is not None and _rotary(source, dim, depth - 1)


def _empty(node: Any) -> bool:
    """A tensor known to have no elements (a cache's initial ``torch.tensor([])``)."""
    value = tensor_value(node)
    return value is not None and any(isinstance(d, int) and d == 0 for d in value.shape)


def _pass_through(node: fx.Node) -> fx.Node | None:
    """The input of an op that moves or scales whole head vectors, else None."""
    if is_call(node, *_MULS) and len(node.args) == 2:  # scaling by a number, either order
        a, b = node.args
        return a if is_scalar(b) and isinstance(a, fx.Node) else \
            b if is_scalar(a) and isinstance(b, fx.Node) else None
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, ndim = node.args[0], rank(node)
    if is_call(node, *CASTS):
        return source
    if is_call(node, operator.truediv, torch.div, "div"):
        return source if len(node.args) == 2 and is_scalar(node.args[1]) else None
    if not is_call(node, *_LAYOUT) or is_call(node, torch.cat) or _last_dim(source) != _last_dim(node):
        return None
    if is_call(node, "transpose", torch.transpose):
        dims = {normalized_dim(d, ndim) for d in node.args[1:3]}
        return source if ndim and ndim - 1 not in dims else None
    if is_call(node, "permute", torch.permute):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return source if ndim and normalized_dim(dims[-1], ndim) == ndim - 1 else None
    if is_call(node, operator.getitem):
        index = node.args[1]
        whole_last = isinstance(index, tuple) and index and index[-1] == slice(None) and \
            not any(isinstance(i, fx.Node) for i in index)
        first_dim_only = isinstance(index, (int, slice)) and (rank(source) or 0) > 1
        return source if whole_last or first_dim_only else None
    # view / reshape / expand / unsqueeze / clone with the same last dim: rows stay rows.
    return source


def rotary_input(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is ``x * cos + rotate_half(x) * sin`` (any operand order)."""
    if not is_call(node, *_ADDS) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    for plain, rotated in ((a, b), (b, a)):
        for x in _factors(plain):
            if any(_rotate_half_of(r) is x for r in _factors(rotated)):
                return x
    return None


def _factors(node: Any) -> list[fx.Node]:
    """The tensor factors ``x`` of ``node = x * c`` (both, when both are tensors)."""
    if not is_call(node, *_MULS) or len(node.args) != 2:
        return []
    return [f for f in node.args if isinstance(f, fx.Node) and tensor_value(f) is not None]


def _rotate_half_of(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is ``cat((-x[..., h:], x[..., :h]), dim=-1)`` with ``2 h = x.shape[-1]``."""
    if not is_call(node, torch.cat) or not node.args or len(node.args[0]) != 2:
        return None
    cat_dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if normalized_dim(cat_dim, rank(node)) != (rank(node) or 0) - 1:
        return None
    negated, first = node.args[0]
    if not is_call(negated, *_NEGS):
        return None
    second = negated.args[0]
    x_first, x_second = _half_of(first), _half_of(second)
    if x_first is None or x_first is not x_second:
        return None
    dim = _last_dim(x_first)
    if dim is None or dim % 2 or _half_bounds(first) != (0, dim // 2) or \
            _half_bounds(second) != (dim // 2, dim):
        return None
    return x_first


def _half_of(node: Any) -> fx.Node | None:
    if is_call(node, operator.getitem) and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _half_bounds(node: fx.Node) -> tuple[int, int] | None:
    """(start, stop) of a getitem that slices only the last dim, e.g. ``x[..., :h]``."""
    x, index = node.args[0], node.args[1]
    ndim, dim = rank(x), _last_dim(x)
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice) or \
            ndim is None or dim is None:
        return None
    leading = index[:-1]
    if not all(i is Ellipsis or i == slice(None) for i in leading) or \
            (Ellipsis not in leading and len(index) != ndim):
        return None
    last = index[-1]
    start, stop = last.start, last.stop
    if last.step not in (None, 1) or not isinstance(start, (int, type(None))) or \
            not isinstance(stop, (int, type(None))):
        return None
    return _bound(start, 0, dim), _bound(stop, dim, dim)


def _bound(value: int | None, default: int, dim: int) -> int:
    if value is None:
        return default
    return max(0, min(value + dim if value < 0 else value, dim))
