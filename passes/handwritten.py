"""Hand-written attention: ``matmul(q, k^T) -> score ops -> softmax -> matmul(p, v)``.

The matcher starts at the final matmul and walks up. Every spelling it understands is one small
function in one of three catalogs:

- :data:`SCORE_STEPS`: ops allowed between ``q @ k^T`` and the softmax (scaling by mul/div,
  additive masks, ``masked_fill`` / ``where`` masks, casts, a ``[B*H] <-> [B, H]`` view). Each
  returns the op's input on the score path and what it does to the scores, or None.
- :data:`KEY_TRANSPOSES`: ways to write ``k^T`` (``transpose``, ``mT``, ``permute``).
- :data:`KV_REPEATS`: ways to repeat kv heads for GQA/MQA (``repeat_kv``'s expand + reshape,
  ``repeat_interleave``, a broadcast ``expand``).

:func:`normalise` turns the steps into the typed site form (scale factors, mask terms in
final-score units, what a fully masked row computes), and the guards of :mod:`.guards` prove
the rest (exclusive scores, no in-place ops, lossless casts, no broadcasting). Anything else
(soft-capping, training-mode dropout, a softmax over another dim, probabilities used elsewhere)
keeps the site dense, and says why.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import guards
from .graph_utils import SAFE_SOFTMAXES, arg, is_call, is_scalar, normalized_dim, op, rank, tensor_value
from .sites import (
    AttentionSite,
    EmptyRows,
    Factor,
    KeepDense,
    Layout,
    MaskTerm,
    SiteMask,
    TermKind,
)

# Fill values at or below this count as "masked out" (HF uses finfo.min, older code -1e4/-1e9),
# and stay masks while what scales them afterwards keeps them at or below SCALED_FILL_MAX
# (e^-1000 is 0 in every float dtype next to any score within 900 of it).
MASK_FILL_MAX = -1e4
SCALED_FILL_MAX = -1e3


@dataclass
class ScoreStep:
    """What one op does to the attention scores (before normalisation)."""

    kind: str  # "scale", "add", "fill", "cast", "view"
    value: Any = None  # a Factor, the additive mask, the fill's condition, the 4-d view node
    keep: bool = True  # for "fill": the condition says where to keep (where) or drop (masked_fill)
    fill: float = -math.inf  # for "fill": the value written where masked


@dataclass
class ScoreChain:
    qk: fx.Node  # the node computing q @ k^T (matmul, bmm, einsum or baddbmm)
    steps: list[ScoreStep] = field(default_factory=list)  # in the order they apply to q @ k^T
    nodes: list[fx.Node] = field(default_factory=list)  # the step nodes, from q @ k^T down


# ------------------------------------------------------------------------------------------
# Ops between q @ k^T and the softmax.


def literal(value: Any) -> Any:
    """A number written into the graph as a 0-d tensor (``torch.full((), v)``,
    ``torch.tensor(v)``, as in HF GPT2 / DistilBert) -> ``v``; anything else unchanged."""
    if is_call(value, torch.full) and tuple(value.args[0]) == () and \
            isinstance(value.args[1], (int, float)):
        return value.args[1]
    if is_call(value, torch.tensor) and isinstance(value.args[0], (int, float)):
        return value.args[0]
    return value


def scale_factor(value: Any, reciprocal: bool = False) -> Factor:
    """A factor of the score scale (see :class:`.sites.Factor`)."""
    value = literal(value)
    tensor = isinstance(value, fx.Node) and tensor_value(value) is not None
    return Factor(value, reciprocal=reciprocal, tensor=tensor)


def step_cast(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    """A cast (checked by guards.check_lossless_casts), or a view to the same shape (Falcon)."""
    if (op(node) == "cast" or _same_shape_view(node)) and isinstance(node.args[0], fx.Node):
        return node.args[0], ScoreStep("cast", node)
    return None


def _same_shape_view(node: fx.Node) -> bool:
    if op(node) != "view" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = tensor_value(node.args[0]), tensor_value(node)
    return before is not None and after is not None and before.dim() == after.dim() and \
        all(guards.same_size(a, b) for a, b in zip(before.shape, after.shape, strict=True))


def step_scale_mul(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if op(node) != "mul" or len(node.args) != 2:
        return None
    a, b = node.args
    if is_scalar(b) and isinstance(a, fx.Node):
        return a, ScoreStep("scale", scale_factor(b))
    if is_scalar(a) and isinstance(b, fx.Node):
        return b, ScoreStep("scale", scale_factor(a))
    return None


def step_scale_div(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if op(node) == "div" and len(node.args) == 2 and is_scalar(node.args[1]) and \
            isinstance(node.args[0], fx.Node) and node.kwargs.get("rounding_mode") is None:
        return node.args[0], ScoreStep("scale", scale_factor(node.args[1], reciprocal=True))
    return None


def step_add_mask(node: fx.Node) -> list[tuple[fx.Node, ScoreStep]] | None:
    """``scores + mask`` (either operand order: both are tried)."""
    if op(node) != "add" or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return [(a, ScoreStep("add", b)), (b, ScoreStep("add", a))]


def _fill_value(value: Any, what: str) -> float:
    value = literal(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= MASK_FILL_MAX:
        return float(value)
    raise KeepDense(f"{what} with value {value!r} (only fills <= {MASK_FILL_MAX:g} or -inf are "
                    "masks that sparse attention can reproduce)")


def step_masked_fill(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if op(node) != "masked_fill":
        return None
    scores, mask = node.args[0], arg(node, 1, "mask")
    fill = _fill_value(arg(node, 2, "value"), "masked_fill")
    return scores, ScoreStep("fill", mask, keep=False, fill=fill)


def step_where(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if op(node) != "where" or len(node.args) != 3:
        return None
    cond, scores, fill = node.args
    return scores, ScoreStep("fill", cond, keep=True, fill=_fill_value(fill, "torch.where"))


def step_softcap(node: fx.Node) -> None:
    if op(node) == "tanh":
        raise KeepDense("logit soft-capping (tanh) is not supported by sparse_attention")
    return None


def step_batch_view(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    """``scores.view(B, H, Lq, Lk)`` <-> ``.view(B * H, Lq, Lk)``: only the leading (batch, head)
    dims regroup (MBart, Inductor's pattern 24, adds its mask in the 4-d view)."""
    if op(node) != "view" or not isinstance(node.args[0], fx.Node):
        return None
    before, after = tensor_value(node.args[0]), tensor_value(node)
    if before is None or after is None or {before.dim(), after.dim()} != {3, 4} or \
            before.shape[-2:] != after.shape[-2:]:
        return None
    return node.args[0], ScoreStep("view", node if after.dim() == 4 else None)


SCORE_STEPS: list[Callable[[fx.Node], Any]] = [
    step_cast, step_scale_mul, step_scale_div, step_add_mask, step_masked_fill, step_where,
    step_softcap, step_batch_view,
]


def _is_batch_view(node: fx.Node, before: int, after: int) -> bool:
    """``node`` regroups only the leading dims of a rank-``before`` tensor into rank ``after``."""
    if op(node) != "view" or not isinstance(node.args[0], fx.Node):
        return False
    source, value = tensor_value(node.args[0]), tensor_value(node)
    return source is not None and value is not None and source.dim() == before and \
        value.dim() == after and source.shape[-2:] == value.shape[-2:]


def _batch_view_shape(steps: list[ScoreStep], probs_viewed_back: bool) -> tuple[Any, Any] | None:
    """``(B, H)`` when the ``[B*H, Lq, Lk]`` scores are viewed as ``[B, H, Lq, Lk]`` and back
    (on the scores, or on the probabilities after the softmax: BLOOM); None without views.
    Masks applied outside the ``[B, H]`` view are ``flat`` terms (split into it when lowered)."""
    views = [i for i, step in enumerate(steps) if step.kind == "view"]
    if not views and not probs_viewed_back:
        return None
    downs = [i for i in views if steps[i].value is not None]
    ups = [i for i in views if steps[i].value is None]
    if len(downs) != 1 or len(ups) != (0 if probs_viewed_back else 1) or \
            (ups and ups[0] < downs[0]):
        raise KeepDense("the scores are reshaped other than [B*H] -> [B, H] -> [B*H]")
    view = steps[downs[0]].value
    shape = view.args[1] if len(view.args) == 2 else view.args[1:]
    if len(shape) != 4 or any(isinstance(d, int) and d < 0 for d in shape[:2]):
        raise KeepDense("the [B, H] view of the scores does not name B and H")
    return shape[0], shape[1]


# ------------------------------------------------------------------------------------------
# k^T and GQA repeats.


def transpose_method(node: fx.Node) -> fx.Node | None:
    if is_call(node, "transpose", torch.transpose):
        ndim = rank(node)
        dims = {normalized_dim(node.args[1], ndim), normalized_dim(node.args[2], ndim)}
        if ndim and dims == {ndim - 2, ndim - 1}:
            return node.args[0]
    return None


def transpose_mT(node: fx.Node) -> fx.Node | None:  # noqa: N802 (the attribute's name)
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def transpose_permute(node: fx.Node) -> fx.Node | None:
    if is_call(node, "permute", torch.permute):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        ndim = rank(node)
        if ndim and [normalized_dim(d, ndim) for d in dims] == \
                [*range(ndim - 2), ndim - 1, ndim - 2]:
            return node.args[0]
    return None


KEY_TRANSPOSES: list[Callable[[fx.Node], fx.Node | None]] = [
    transpose_method, transpose_mT, transpose_permute,
]


def repeat_kv_expand_reshape(node: fx.Node) -> fx.Node | None:
    """HF ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)``."""
    if not is_call(node, "reshape", torch.reshape, "view"):
        return None
    expand = node.args[0]
    if not is_call(expand, "expand"):
        return None
    source = expand.args[0]
    if is_call(source, operator.getitem):
        index = source.args[1]
        if isinstance(index, tuple) and len(index) >= 3 and index[2] is None:
            return source.args[0]
    if is_call(source, "unsqueeze", torch.unsqueeze) and source.args[1] == 2:
        return source.args[0]
    return None


def repeat_kv_interleave(node: fx.Node) -> fx.Node | None:
    if is_call(node, "repeat_interleave", torch.repeat_interleave) and \
            arg(node, 2, "dim") == 1 and isinstance(arg(node, 1, "repeats"), int):
        return node.args[0]
    return None


def repeat_kv_broadcast(node: fx.Node) -> fx.Node | None:
    """MQA: ``x.expand(B, H, L, D)`` from a single kv head."""
    if is_call(node, "expand"):
        source = tensor_value(node.args[0])
        if source is not None and source.dim() == 4 and source.shape[1] == 1:
            return node.args[0]
    return None


KV_REPEATS: list[Callable[[fx.Node], fx.Node | None]] = [
    repeat_kv_expand_reshape, repeat_kv_interleave, repeat_kv_broadcast,
]


def _first(catalog, node):
    for fn in catalog:
        result = fn(node)
        if result is not None:
            return result
    return None


def unrepeat(node: fx.Node) -> tuple[fx.Node, bool]:
    """The kv tensor before a GQA repeat (``repeat_kv`` and friends), and whether there was one."""
    source = _first(KV_REPEATS, node)
    if source is None:
        return node, False
    heads, kv_heads = tensor_value(node).shape[1], tensor_value(source).shape[1]
    if kv_heads == 0 or heads % kv_heads:
        return node, False
    return source, heads != kv_heads


# ------------------------------------------------------------------------------------------
# The walk.


def _pre_scale(node: fx.Node, steps: list[ScoreStep], owned: list[fx.Node]) -> fx.Node:
    """Strips scalar multiplications/divisions of q or k (pre-scaled operands)."""
    while True:
        found = step_scale_mul(node) or step_scale_div(node)
        if found is None:
            return node
        owned.append(node)
        node, step = found
        steps.append(step)


def _strip_operand(node: fx.Node, steps: list[ScoreStep], owned: list[fx.Node]) -> fx.Node:
    """q or k before scalar scaling and widening casts (``q.float()`` of a bf16 q: the sparse
    ops multiply bf16 q and k with fp32 accumulation, which is the same product)."""
    while True:
        node = _pre_scale(node, steps, owned)
        source = node.args[0] if op(node) == "cast" and node.args else None
        if not isinstance(source, fx.Node) or tensor_value(source) is None or \
                tensor_value(node) is None or not tensor_value(source).dtype.is_floating_point \
                or not guards.holds(tensor_value(node).dtype, tensor_value(source).dtype):
            return node
        owned.append(node)
        node = source


def _matmul_operands(node: fx.Node) -> tuple[Any, Any]:
    """``(a, b)`` of ``a @ b`` / ``bmm(a, b)`` / ``baddbmm(input, batch1=a, batch2=b)``."""
    if op(node) == "baddbmm":
        return arg(node, 1, "batch1"), arg(node, 2, "batch2")
    second = node.args[1] if len(node.args) > 1 else \
        node.kwargs.get("other", node.kwargs.get("mat2"))
    return arg(node, 0, "input"), second


def _walk_scores(node: fx.Node, depth: int = 0) -> ScoreChain:
    if depth > 12:
        raise KeepDense("too many ops between q @ k^T and the softmax")
    if op(node) in ("matmul", "einsum"):
        return ScoreChain(qk=node)
    if op(node) == "baddbmm":  # beta * input + alpha * (q @ k^T)
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta != 1 or not is_scalar(alpha):
            raise KeepDense(f"baddbmm with beta={beta}, alpha={alpha}")
        return ScoreChain(qk=node, steps=[ScoreStep("scale", scale_factor(alpha)),
                                          ScoreStep("add", arg(node, 0, "input"))])
    for step_fn in SCORE_STEPS:
        found = step_fn(node)
        if found is None:
            continue
        options = found if isinstance(found, list) else [found]
        last_error = None
        for source, step in options:
            try:
                chain = _walk_scores(source, depth + 1)
            except KeepDense as err:
                last_error = err
                continue
            chain.steps.append(step)
            chain.nodes.append(node)
            return chain
        raise last_error or KeepDense("no matmul found above the softmax")
    if node.op in ("placeholder", "get_attr"):
        raise KeepDense(f"the softmax's scores come from {node.name}, not from a q @ k^T")
    raise KeepDense(f"unsupported op {getattr(node.target, '__name__', node.target)!r} between "
                    "q @ k^T and the softmax")


def _walk_probs(node: fx.Node) -> tuple[fx.Node, list[fx.Node], str | None]:
    """From the PV matmul's first operand up to the softmax, through casts, views and dropout:
    ``(softmax, the nodes passed from the softmax down, why it must stay dense or None)``.
    Raises :class:`NotAttention` when no softmax is there."""
    passed, why = [], None
    while op(node) != "softmax":
        if op(node) == "dropout":
            p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
            if p != 0 and training is not False:
                why = f"dropout(p={p}) in training mode on the probabilities"
        elif op(node) != "cast" and not _is_batch_view(node, 4, 3) and \
                not _same_shape_view(node):
            raise NotAttention
        passed.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            raise NotAttention
    return node, passed[::-1], why


class NotAttention(Exception):
    """The matmul's first operand does not come from a softmax: an ordinary matmul."""


def _einsum_operands(node: fx.Node, kind: str) -> tuple[fx.Node, fx.Node] | None:
    """``einsum("...qd,...kd->...qk", q, k)`` (kind "qk") / ``("...qk,...kd->...qd", p, v)``."""
    if op(node) != "einsum" or len(node.args) != 3 or not isinstance(node.args[0], str):
        return None
    equation = node.args[0].replace(" ", "")
    if "->" not in equation or equation.count(",") != 1:
        return None
    inputs, output = equation.split("->")
    left, right = inputs.split(",")
    if all(x.startswith("...") for x in (left, right, output)):  # shared leading batch dims
        left, right, output = left[3:], right[3:], output[3:]
    if "." in left + right + output:
        return None
    if not (len(left) == len(right) == len(output) and left[:-2] == right[:-2] == output[:-2]):
        return None
    if len(set(left)) != len(left) or len(set(right)) != len(right):
        return None  # a repeated index is a trace/diagonal, not a matrix product
    (a1, a2), (b1, b2), (o1, o2) = left[-2:], right[-2:], output[-2:]
    if kind == "qk" and a2 == b2 and (o1, o2) == (a1, b1) and a1 != b1:
        return node.args[1], node.args[2]
    if kind == "pv" and a2 == b1 and (o1, o2) == (a1, b2) and a1 != b2:
        return node.args[1], node.args[2]
    return None


def normalise(steps: list[ScoreStep], safe_softmax: bool, score_dtype: torch.dtype
              ) -> tuple[list[Factor], SiteMask]:
    """Steps in the order they apply to ``q @ k^T`` -> the scale factors and the typed mask.

    Masks land in final-score units (an additive mask carries the factors applied after it).
    Fills: ``-inf`` removes keys; a finite fill at or below half the dtype's most negative
    number absorbs any score added to it, so it is exactly the additive bias ``where(keep, 0,
    fill)``; another finite fill (-1e4, -1e9) removes keys too, provided the numbers it is
    scaled by afterwards keep it at or below ``SCALED_FILL_MAX``, and a row it masks entirely
    computes the mean of v (every score equal), which the lowering restores.
    """
    factors: list[Factor] = []
    terms: list[MaskTerm] = []
    removing_fills: list[list[Any]] = []  # [fill, factors after it] of the finite fills
    flat = any(step.kind == "view" and step.value is not None for step in steps)
    for step in steps:
        if step.kind == "view":  # into the [B, H] view (value: the view node) or back out
            flat = step.value is None
        elif step.kind == "scale":
            factors.append(step.value)
            terms = [dataclasses.replace(t, factors=(*t.factors, step.value))
                     if t.kind is TermKind.ADD or math.isfinite(t.fill) else t for t in terms]
            if not isinstance(step.value.value, (int, float)) and \
                    any(t.kind is not TermKind.ADD and not math.isfinite(t.fill) for t in terms):
                raise KeepDense("a mask fill is scaled afterwards by a value computed at run time "
                                "(its sign and size decide what the fill means)")
            for fill in removing_fills:
                fill[1].append(step.value)
        elif step.kind == "add":
            terms.append(MaskTerm(TermKind.ADD, step.value, flat=flat))
        elif step.kind == "fill":
            kind = TermKind.KEEP if step.keep else TermKind.DROP
            if math.isfinite(step.fill) and step.fill > torch.finfo(score_dtype).min / 2:
                removing_fills.append([step.fill, []])
                terms.append(MaskTerm(kind, step.value, flat=flat))  # removes keys, see above
            else:
                terms.append(MaskTerm(kind, step.value, fill=step.fill, flat=flat))
    for fill, after in removing_fills:
        scaled = fill
        for factor in after:
            scaled = scaled / factor.value if factor.reciprocal else scaled * factor.value
        if scaled > SCALED_FILL_MAX:
            raise KeepDense(f"the fill {fill:g} is scaled to {scaled:g} before the softmax: not "
                            "surely a mask")
    empty_rows = EmptyRows.ZERO if safe_softmax else EmptyRows.NAN
    finite_fills = {fill for fill, _ in removing_fills}
    if finite_fills:
        others = [t for t in terms if t.kind is TermKind.ADD or math.isfinite(t.fill)]
        if len(finite_fills) > 1 or others:
            raise KeepDense(f"a masked_fill/where with the finite fill {min(finite_fills):g} "
                            "combined with other masks: a row they mask entirely computes a "
                            "mix the sparse ops do not reproduce")
        empty_rows = EmptyRows.UNIFORM
    return factors, SiteMask(terms, empty_rows)


def match_matmul_softmax_matmul(node: fx.Node) -> AttentionSite | None:
    """``softmax(scale * q @ k^T + mask) @ v`` in its hand-written spellings (matmul, ``@``,
    bmm, einsum; scaling by mul/div or pre-scaled q/k; additive, masked_fill and where masks;
    casts around the softmax; eval-mode dropout; GQA by repeat_kv/repeat_interleave/expand)."""
    pv = _einsum_operands(node, "pv")
    if pv is None and op(node) == "matmul":
        pv = _matmul_operands(node)
    if pv is None or not isinstance(pv[0], fx.Node) or rank(node) not in (3, 4):
        return None
    try:
        softmax, prob_nodes, why_dense = _walk_probs(pv[0])
    except NotAttention:
        return None
    site = AttentionSite(node=node, pattern="matmul_softmax_matmul")
    try:
        if why_dense:
            raise KeepDense(why_dense)
        _match(site, softmax, prob_nodes, pv[1])
    except KeepDense as err:
        return site.keep_dense(str(err))
    return site


def _match(site: AttentionSite, softmax: fx.Node, prob_nodes: list[fx.Node], v: fx.Node) -> None:
    dim = normalized_dim(arg(softmax, 1, "dim"), rank(softmax))
    if dim != rank(softmax) - 1:
        raise KeepDense("softmax is not over the last (key) dim")
    chain = _walk_scores(softmax.args[0])
    owned: list[fx.Node] = []
    qk = _einsum_operands(chain.qk, "qk")
    pre_steps: list[ScoreStep] = []
    if op(chain.qk) == "einsum" and qk is None:
        raise KeepDense(f"einsum {chain.qk.args[0]!r} is not q @ k^T")
    if qk is not None:
        q, k = qk
    else:
        q, k_t = _matmul_operands(chain.qk)
        k_t = _strip_operand(k_t, pre_steps, owned)
        k = _first(KEY_TRANSPOSES, k_t)
        if k is None:
            raise KeepDense("the second operand of q @ k^T is not a transposed key")
        owned.append(k_t)
    q = _strip_operand(q, pre_steps, owned)
    k = _strip_operand(k, pre_steps, owned)
    scores_value = tensor_value(chain.qk)
    if scores_value is None or not scores_value.dtype.is_floating_point:
        raise KeepDense("q @ k^T has no recorded floating dtype")
    steps = pre_steps + chain.steps
    site.view_shape = _batch_view_shape(chain.steps,
                                        any(_is_batch_view(n, 4, 3) for n in prob_nodes))
    softmax_dtype = tensor_value(softmax).dtype
    guards.check_lossless_casts([softmax], tensor_value(softmax.args[0]).dtype,
                                what="scores (by the softmax's dtype)")
    guards.check_no_autocast([(chain.qk, qk[1] if qk else _matmul_operands(chain.qk)[1]),
                              (site.node, v)])
    guards.check_lossless_casts([s.value for s in chain.steps if s.kind == "cast"], softmax_dtype)
    # Probabilities may be narrowed to v's dtype (HF: softmax in fp32, then .to(q.dtype)), never
    # below it: p.bfloat16().float() @ v rounds what the sparse ops keep exact.
    guards.check_lossless_casts([n for n in prob_nodes if op(n) == "cast"],
                                tensor_value(v).dtype, what="probabilities")
    site.scale, site.mask = normalise(steps, softmax.target in SAFE_SOFTMAXES,
                                       _masked_dtype(chain, scores_value.dtype))
    numbers = [f.value for f in site.scale if isinstance(f.value, (int, float))]
    if any(n <= 0 for n in numbers):
        raise KeepDense("a scale <= 0 (the indexer ranks keys by q . k)")
    chain_nodes = [chain.qk, *chain.nodes, softmax, *prob_nodes, site.node]
    guards.check_exclusive(chain_nodes)
    views = [step.value for step in chain.steps if step.kind == "view" and step.value is not None]
    for term in site.mask.terms:
        shape = scores_value.shape if term.flat or not views else tensor_value(views[0]).shape
        guards.check_mask_shape(term.node, tuple(shape))
    k_source, k_repeated = unrepeat(k)
    v_source, v_repeated = unrepeat(v)
    if k_repeated and v_repeated:
        owned += [k, v]
        k, v = k_source, v_source
    site.q, site.k, site.v = q, k, v
    site.enable_gqa = (k_repeated and v_repeated) or broadcast_kv_head(q, k, v)
    site.layout = Layout.BHLD if rank(q) == 4 else \
        Layout.BATCH_VIEW if site.view_shape is not None else Layout.BATCHED
    guards.check_operands(site)
    site.owned = [*chain_nodes[:-1], *owned]
    first = min(site.owned, key=_position(site.node.graph))  # the site reads its operands here
    guards.check_no_mutation(site.node.graph, first, site.node, chain_nodes[:-1])


def broadcast_kv_head(q: fx.Node, k: fx.Node, v: fx.Node) -> bool:
    """``q [B, H, L, D] @ k [B, 1, L, D]^T``: matmul broadcasts the one kv head (MQA)."""
    shapes = [tensor_value(x).shape if tensor_value(x) is not None else () for x in (q, k, v)]
    if not all(len(s) == 4 for s in shapes):
        return False
    heads = [int(s[1]) for s in shapes]  # architecture: specialised (see guards.check_operands)
    return heads[1] == heads[2] == 1 and heads[0] != 1


def _masked_dtype(chain: ScoreChain, default: torch.dtype) -> torch.dtype:
    """The dtype of the scores where the first fill writes (fills are exact in that dtype)."""
    for step, node in _step_nodes(chain):
        if step.kind == "fill" and node is not None:
            return tensor_value(node).dtype
    return default


def _step_nodes(chain: ScoreChain) -> list[tuple[ScoreStep, fx.Node | None]]:
    """Each step with the node that applies it (None for the steps baddbmm applies itself)."""
    offset = len(chain.steps) - len(chain.nodes)
    return [(step, chain.nodes[i - offset] if i >= offset else None)
            for i, step in enumerate(chain.steps)]


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
