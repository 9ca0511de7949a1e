"""Small helpers for reading Dynamo FX graphs (torch-level ops: functions and methods)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .sites import example_value


def is_call(node: Any, *targets: Any) -> bool:
    """True if ``node`` calls one of ``targets``: functions (``torch.matmul``) or method names
    (``"transpose"``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_value(node: Any) -> torch.Tensor | None:
    value = example_value(node)
    return value if isinstance(value, torch.Tensor) else None


def rank(node: Any) -> int | None:
    value = tensor_value(node)
    return value.dim() if value is not None else None


def is_scalar(node: Any) -> bool:
    """A Python number, or a node whose value is a number or a 0-d tensor (e.g. ``x.item()``)."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return True
    if not isinstance(node, fx.Node):
        return False
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and \
        not isinstance(value, bool)


def normalized_dim(dim: Any, ndim: int | None) -> int | None:
    if not isinstance(dim, int) or ndim is None:
        return None
    return dim % ndim


MATMULS = (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
SAFE_SOFTMAXES = (torch.ops.aten._safe_softmax, torch.ops.aten._safe_softmax.default)
SOFTMAXES = (F.softmax, torch.softmax, torch.nn.functional.softmax, "softmax",
             torch.special.softmax,
             # SDPA's math decomposition (Inductor's _sfdp_pattern_29/30): 0 for rows masked out
             *SAFE_SOFTMAXES)
DROPOUTS = (F.dropout, torch.dropout, "dropout")
CASTS = ("to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous")

# One canonical name per operation, whatever spelling Dynamo recorded (a function, an operator,
# a method name, an ATen overload): matchers ask ``op(node) == "mul"`` the way Inductor's
# pattern matcher sees one aten op. Add a spelling here, never in a matcher.
_SPELLINGS: dict[str, tuple[Any, ...]] = {
    "matmul": MATMULS,
    "einsum": (torch.einsum,),
    "baddbmm": (torch.baddbmm, "baddbmm"),
    "softmax": SOFTMAXES,
    "dropout": DROPOUTS,
    "cast": CASTS,
    "mul": (operator.mul, torch.mul, "mul", "__mul__", "__rmul__", torch.ops.aten.mul.Scalar,
            torch.ops.aten.mul.Tensor, operator.imul, "mul_"),
    "div": (operator.truediv, torch.div, torch.true_divide, "div", "__truediv__", "true_divide",
            torch.ops.aten.div.Scalar, torch.ops.aten.div.Tensor, operator.itruediv, "div_"),
    "add": (operator.add, torch.add, "add", "__add__", "__radd__", torch.ops.aten.add.Tensor,
            operator.iadd, "add_"),
    "masked_fill": (torch.masked_fill, "masked_fill", "masked_fill_"),
    "where": (torch.where, "where"),
    "tanh": (torch.tanh, "tanh", F.tanh),
    "view": ("view", "reshape", torch.reshape),
    "transpose": ("transpose", torch.transpose, "swapaxes", torch.swapaxes),
    "permute": ("permute", torch.permute),
}
_CANONICAL = {spelling: name for name, spellings in _SPELLINGS.items() for spelling in spellings}


def op(node: Any) -> str | None:
    """The canonical name of the operation ``node`` calls (see ``_SPELLINGS``), else None."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    try:
        return _CANONICAL.get(node.target)
    except TypeError:  # an unhashable target
        return None


def emit(graph: fx.Graph, meta: dict, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    """A new call node (a function, or a method name) whose example value is the call run on
    the arguments' example values (Dynamo's fake tensors), so later matchers can read it."""
    values = fx.node.map_arg(args, example_value), fx.node.map_arg(kwargs, example_value)
    if isinstance(target, str):
        node = graph.call_method(target, args, kwargs)
        value = getattr(values[0][0], target)(*values[0][1:], **values[1])
    else:
        node = graph.call_function(target, args, kwargs)
        value = target(*values[0], **values[1])
    node.meta.update(meta)
    node.meta["example_value"] = value
    return node
