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
SOFTMAXES = (F.softmax, torch.softmax, torch.nn.functional.softmax, "softmax",
             torch.special.softmax,
             # SDPA's math decomposition (Inductor's _sfdp_pattern_29/30): 0 for rows masked out
             torch.ops.aten._safe_softmax, torch.ops.aten._safe_softmax.default)
DROPOUTS = (F.dropout, torch.dropout, "dropout")
CASTS = ("to", "float", "half", "bfloat16", "type", "type_as", "contiguous")
