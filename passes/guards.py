"""What the pass proves before it rewrites a site; each guard raises :class:`KeepDense` with the
reason a user reads in ``explain()``.

- :func:`check_exclusive`: every node between ``q @ k^T`` and ``p @ v`` (the scores node
  included) is read by the next step only: nothing else sees, or mutates, the scores.
- :func:`check_no_mutation`: no in-place op runs between the first node the site reads and the
  site itself (the rewrite reads q, k, v and the masks at the site), except in-place steps on
  the site's own exclusive scores.
- :func:`check_lossless_casts`: a cast on the score path is transparent only float -> float
  and when it keeps every value of the softmax's dtype (``fp32 -> bf16 -> fp32`` is not).
- :func:`check_operands`: q, k, v pair up without broadcasting (batch, heads, lengths, dims).
- :func:`check_mask_shape`: each mask broadcasts to the scores without enlarging them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_utils import is_call
from .sites import AttentionSite, KeepDense, Layout, example_value

SPARSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what dsa::sparse_attention takes
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}


def mutated_inputs(node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` writes to in place: ``x.add_(...)``, ``x[i] = v``, ``x += y``,
    ``torch.relu_(x)``, ``out=`` arguments, mutable ATen overloads."""
    if node.op not in ("call_function", "call_method"):
        return []
    written: list[Any] = []
    target = node.target
    first = node.args[0] if node.args else None
    if node.op == "call_method":
        if isinstance(target, str) and target.endswith("_") and not target.startswith("__"):
            written.append(first)
    elif target in _INPLACE_OPERATORS:
        written.append(first)
    elif isinstance(target, torch._ops.OpOverload):
        for i, argument in enumerate(target._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                written.append(node.args[i] if i < len(node.args)
                               else node.kwargs.get(argument.name))
    elif getattr(target, "__module__", "") != "_operator":
        name = str(getattr(target, "__name__", ""))
        if name.endswith("_") and not name.startswith("__"):
            written.append(first)
    written.append(node.kwargs.get("out"))
    return [w for w in written if isinstance(w, fx.Node)]


def _op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def shape_only_use(user: fx.Node, node: fx.Node) -> bool:
    """``x.expand_as(node)``, ``node.size()``, ``node.dim()``: uses of the shape, not the values
    (Inductor's DistilBert pattern expands its mask to the scores' shape)."""
    if is_call(user, "expand_as", "type_as", "new_zeros", "new_empty"):
        return user.args[0] is not node
    return is_call(user, "size", "dim")


def check_exclusive(chain: list[fx.Node]) -> None:
    """Each node of ``chain`` (``q @ k^T`` ... ``p @ v``, in order) is read by the next only."""
    for node, following in zip(chain, chain[1:], strict=False):
        others = [u for u in node.users if u is not following and not shape_only_use(u, node)]
        if not others:
            continue
        writers = [u for u in others if node in mutated_inputs(u)]
        if writers:
            raise KeepDense(f"the attention scores ({node.name}) are changed in place by "
                            f"{_op_name(writers[0])} outside the matched chain (assign the "
                            "out-of-place result instead, e.g. s = s.masked_fill(...))")
        raise KeepDense(f"the attention scores or probabilities ({node.name}) are used elsewhere "
                        f"({others[0].name}: e.g. output_attentions, a shared q @ k^T)")


def check_no_mutation(graph: fx.Graph, start: fx.Node, site_node: fx.Node,
                      own: Iterable[fx.Node]) -> None:
    """No in-place op between ``start`` and ``site_node`` writes to anything but ``own``."""
    own = set(own)
    node = start
    while node is not site_node and node.op != "output":
        for written in mutated_inputs(node):
            if written not in own:
                raise KeepDense(f"{_op_name(node)} changes {written.name} in place between "
                                "q @ k^T and p @ v (the rewrite reads its operands at the site)")
        node = node.next


# Floating dtypes and the dtypes each represents exactly (every value of the latter fits).
_HOLDS = {
    torch.float64: {torch.float64, torch.float32, torch.float16, torch.bfloat16},
    torch.float32: {torch.float32, torch.float16, torch.bfloat16},
    torch.float16: {torch.float16},
    torch.bfloat16: {torch.bfloat16},
}


def holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """True if every value of ``narrow`` is exactly a value of ``wide``."""
    return narrow in _HOLDS.get(wide, set())


def check_lossless_casts(casts: list[fx.Node], softmax_dtype: torch.dtype,
                         what: str = "scores") -> None:
    """Each cast goes float -> float into a dtype that holds every value of ``softmax_dtype``
    (the softmax's dtype for the scores, v's for the probabilities), so dropping it changes
    nothing the next op would see."""
    for cast in casts:
        value, source = example_value(cast), example_value(cast.args[0])
        if not isinstance(value, torch.Tensor) or not isinstance(source, torch.Tensor):
            raise KeepDense(f"cast {cast.name} on the scores has no recorded dtype")
        if not (value.dtype.is_floating_point and source.dtype.is_floating_point):
            raise KeepDense(f"the {what} are cast {source.dtype} -> {value.dtype} (not float -> "
                            "float)")
        if not holds(value.dtype, softmax_dtype):
            raise KeepDense(f"the {what} are cast to {value.dtype}, which loses precision of "
                            f"{softmax_dtype}")


def check_no_autocast(pairs: list[tuple[fx.Node, Any]]) -> None:
    """Each ``(matmul, operand)``: the matmul (``q @ k^T``, ``p @ v``, SDPA) comes out in its
    operand's dtype. Under ``torch.autocast`` it comes out narrower, and the sparse ops (which
    do not autocast) would compute a different, wider result."""
    for node, operand in pairs:
        value, source = example_value(node), example_value(operand)
        if isinstance(value, torch.Tensor) and isinstance(source, torch.Tensor) and \
                value.dtype != source.dtype:
            raise KeepDense(f"{node.name} is {value.dtype} while its operand {operand.name} is "
                            f"{source.dtype} (torch.autocast?)")


def same_size(a: Any, b: Any) -> bool:
    """Sizes equal for every shape the graph may see (SymInts included), without new guards."""
    return statically_known_true(a == b)


def known_different(a: Any, b: Any) -> bool:
    """Sizes that differ for every shape the graph may see."""
    return statically_known_true(a != b)


def check_operands(site: AttentionSite) -> None:
    """q, k, v have one rank, one dtype, equal batch dims (no broadcasting of a latent q over
    the batch), GQA-compatible heads, and k/v lengths and q/k head dims that pair up."""
    q, k, v = (example_value(x) for x in (site.q, site.k, site.v))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise KeepDense("q, k or v has no recorded shape")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise KeepDense(f"q, k, v dtypes differ or are not float ({q.dtype}, {k.dtype}, "
                        f"{v.dtype}): the probabilities are cast before p @ v")
    if q.dtype not in SPARSE_DTYPES:
        raise KeepDense(f"q, k, v are {q.dtype}: the sparse ops take float32, float16 and "
                        "bfloat16")
    rank = 4 if site.layout is Layout.BHLD else 3
    if not (q.dim() == k.dim() == v.dim() == rank):
        raise KeepDense(f"q, k, v ranks {q.dim()}, {k.dim()}, {v.dim()} (expected {rank})")
    if not (same_size(q.shape[0], k.shape[0]) and same_size(k.shape[0], v.shape[0])):
        raise KeepDense(f"q, k, v batch sizes {q.shape[0]}, {k.shape[0]}, {v.shape[0]} differ "
                        "(broadcast over the batch)")
    if rank == 4:
        # Head counts are architecture, not data: specialising them (a guard under
        # dynamic=True) costs nothing, and the indexer needs them as numbers.
        heads, kv_heads = int(q.shape[1]), int(k.shape[1])
        if not same_size(kv_heads, v.shape[1]) or kv_heads == 0 or heads % kv_heads:
            raise KeepDense(f"head counts q={heads}, k={kv_heads}, v={v.shape[1]} do not form "
                            "GQA")
        if heads != kv_heads and not site.enable_gqa:
            raise KeepDense(f"q has {heads} heads and k {kv_heads} without enable_gqa "
                            "(broadcast over heads)")
    # Contraction sizes: they must be equal for the original to mean anything (matmul raises;
    # SDPA's CPU kernel silently reads only Lk rows of v), and the dsa ops' input checks raise
    # on a mismatch. Sizes only unproven equal (a KV cache's keys and values as separate
    # symbols under dynamic shapes) are rewritten; provably different ones stay dense.
    if known_different(k.shape[-2], v.shape[-2]) or known_different(q.shape[-1], k.shape[-1]):
        raise KeepDense(f"q @ k^T and p @ v do not pair up: q {tuple(q.shape)}, k "
                        f"{tuple(k.shape)}, v {tuple(v.shape)}")


def check_mask_shape(mask: fx.Node, scores_shape: tuple[Any, ...]) -> None:
    """``mask`` broadcasts to ``scores_shape`` (right-aligned; each dim 1 or equal) without
    enlarging it, and has a recorded real dtype (bool/int biases add 1/n, see combine_masks)."""
    value = example_value(mask)
    if not isinstance(value, torch.Tensor):
        raise KeepDense(f"mask {getattr(mask, 'name', mask)} is not a tensor")
    if value.dtype.is_complex:
        raise KeepDense(f"mask {mask.name} has dtype {value.dtype}")
    if value.dim() > len(scores_shape):
        raise KeepDense(f"mask {mask.name} {tuple(value.shape)} has more dims than the scores "
                        f"{tuple(scores_shape)}")
    for size, full in zip(reversed(value.shape), reversed(scores_shape), strict=False):
        if not (same_size(size, 1) or same_size(size, full)):
            raise KeepDense(f"mask {mask.name} {tuple(value.shape)} does not broadcast to the "
                            f"scores {tuple(scores_shape)}")
