"""Attention written as einsums in any operand layout, brought to the layout the matchers read.

``einsum("bqhd,bkhd->bhqk", q, k)`` and ``einsum("bhqk,bkhd->bqhd", p, v)`` (q, k, v as
``[B, L, H, D]``) are batched matrix products whose operands are laid out differently from
``[batch..., rows, inner]``. :func:`canonical_einsums` rewrites each such einsum next to a
softmax into ``permute`` views of its operands, one einsum in the canonical layout
(``...ac,...bc->...ab`` for the scores, ``...ac,...cb->...ab`` for the output), and a
``permute`` of the result back to the equation's output order: the same values, so the matchers
of :mod:`.handwritten` then find the site. Einsums elsewhere in the graph are left alone.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from .graph_utils import emit, op


def _roles(equation: str) -> tuple[str, str, str, str, str, str, str] | None:
    """``(A, B, O, batch letters in O's order, row letter, col letter, contracted letter)`` of a
    two-operand batched matrix product, without the ellipsis; None for any other equation."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation or equation.count(",") != 1:
        return None
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    if any(len(set(x)) != len(x) for x in (a, b, out)) or not len(a) == len(b) == len(out) >= 3:
        return None
    contracted = (set(a) & set(b)) - set(out)
    rows, cols = (set(a) & set(out)) - set(b), (set(b) & set(out)) - set(a)
    batch = [ch for ch in out if ch in a and ch in b]
    if len(contracted) != 1 or len(rows) != 1 or len(cols) != 1 or \
            len(batch) != len(out) - 2 or set(a) | set(b) != set(out) | contracted:
        return None
    return a, b, out, "".join(batch), rows.pop(), cols.pop(), contracted.pop()


def _feeds_softmax(node: fx.Node, hops: int = 12) -> bool:
    while hops and len(node.users) == 1:
        node = next(iter(node.users))
        if op(node) == "softmax":
            return True
        hops -= 1
    return False


def _after_softmax(node: Any, hops: int = 6) -> bool:
    while hops and isinstance(node, fx.Node):
        if op(node) == "softmax":
            return True
        if op(node) not in ("cast", "dropout", "view") or not node.args:
            return False
        node, hops = node.args[0], hops - 1
    return False


def _permuted(graph: fx.Graph, meta: dict, node: Any, order: list[int]) -> Any:
    return node if order == sorted(order) else emit(graph, meta, "permute", node, order)


def canonical_einsums(graph: fx.Graph) -> None:
    """Rewrites the attention einsums of ``graph`` into the canonical layout (see the module)."""
    for node in list(graph.nodes):
        if op(node) != "einsum" or len(node.args) != 3 or not isinstance(node.args[0], str):
            continue
        roles = _roles(node.args[0])
        if roles is None:
            continue
        a, b, out, batch, row, col, contracted = roles
        scores = _feeds_softmax(node)
        if not scores and not _after_softmax(node.args[1]):
            continue
        left = batch + row + contracted
        right = batch + col + contracted if scores else batch + contracted + col
        result = batch + row + col
        equation = f"{left},{right}->{result}"
        if (a, b, out) == (left, right, result):
            continue  # already canonical
        meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        with graph.inserting_before(node):
            x = _permuted(graph, meta, node.args[1], [a.index(ch) for ch in left])
            y = _permuted(graph, meta, node.args[2], [b.index(ch) for ch in right])
            product = emit(graph, meta, node.target, equation, x, y)
            product = _permuted(graph, meta, product, [result.index(ch) for ch in out])
        node.replace_all_uses_with(product)
        graph.erase_node(node)
