"""Hand-written attention: ``matmul(q, k^T) -> score ops -> softmax -> matmul(p, v)``.

The matcher starts at the final matmul and walks up. Every spelling it understands is one small
function in one of three catalogs:

- :data:`SCORE_STEPS`: ops allowed between ``q @ k^T`` and the softmax (scaling by mul/div,
  additive masks, ``masked_fill`` / ``where`` masks, casts). Each returns the op's input on the
  score path and what it does to the scores, or None when it does not apply.
- :data:`KEY_TRANSPOSES`: ways to write ``k^T`` (``transpose``, ``mT``, ``permute``).
- :data:`KV_REPEATS`: ways to repeat kv heads for GQA/MQA (``repeat_kv``'s expand + reshape,
  ``repeat_interleave``, a broadcast ``expand``).

Scores come out as ``a * (q . k) + sum of masks``, which is SDPA with ``scale = a`` and an
additive (or boolean) ``attn_mask``. Anything else (soft-capping, training-mode dropout, a
softmax over another dim, probabilities used elsewhere) keeps the site dense, and says why.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..kernels.attention import combine_masks, rank3_mask_to_rank4
from .graph_utils import (
    CASTS,
    DROPOUTS,
    MATMULS,
    SOFTMAXES,
    arg,
    is_call,
    is_scalar,
    normalized_dim,
    rank,
    tensor_value,
)
from .sites import AttentionSite

# Fill values at or below this count as "masked out" (HF uses finfo.min, older code -1e4/-1e9).
MASK_FILL_MAX = -1e4


@dataclass
class ScoreStep:
    """What one op does to the attention scores."""

    kind: str  # "scale", "add", "keep" (boolean mask: keep where True), "cast"
    value: Any = None  # the factor, the additive mask, or the keep mask
    invert: bool = False  # for "keep": the mask says where to drop, not where to keep


@dataclass
class ScoreChain:
    qk: fx.Node  # the node computing q @ k^T (matmul, bmm, einsum or baddbmm)
    steps: list[ScoreStep] = field(default_factory=list)  # in the order they apply to q @ k^T
    nodes: list[fx.Node] = field(default_factory=list)


class NoMatch(Exception):
    """The subgraph is attention-like but cannot be rewritten exactly (message says why)."""


# ------------------------------------------------------------------------------------------
# Ops between q @ k^T and the softmax.


def step_cast(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if is_call(node, *CASTS) and isinstance(node.args[0], fx.Node):
        return node.args[0], ScoreStep("cast")
    return None


def step_scale_mul(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if not is_call(node, operator.mul, torch.mul, "mul", torch.ops.aten.mul.Scalar):
        return None
    a, b = node.args[0], node.args[1]
    if is_scalar(b) and isinstance(a, fx.Node):
        return a, ScoreStep("scale", _scale_factor(b))
    if is_scalar(a) and isinstance(b, fx.Node):
        return b, ScoreStep("scale", _scale_factor(a))
    return None


def step_scale_div(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if is_call(node, operator.truediv, torch.div, "div") and is_scalar(node.args[1]) and \
            isinstance(node.args[0], fx.Node) and arg(node, 2, "rounding_mode") is None:
        return node.args[0], ScoreStep("scale", ("reciprocal", _scale_factor(node.args[1])))
    return None


def step_add_mask(node: fx.Node) -> list[tuple[fx.Node, ScoreStep]] | None:
    """``scores + mask`` (either operand order: both are tried)."""
    if not is_call(node, operator.add, torch.add, "add", operator.iadd) or \
            arg(node, 2, "alpha", 1) != 1:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return [(a, ScoreStep("add", b)), (b, ScoreStep("add", a))]


def literal(value: Any) -> Any:
    """A number written into the graph as a 0-d tensor (``torch.full((), v)``,
    ``torch.tensor(v)``, as in HF GPT2 / DistilBert) -> ``v``; anything else unchanged."""
    if is_call(value, torch.full) and tuple(value.args[0]) == () and \
            isinstance(value.args[1], (int, float)):
        return value.args[1]
    if is_call(value, torch.tensor) and isinstance(value.args[0], (int, float)):
        return value.args[0]
    return value


def _fill_is_mask(value: Any) -> bool:
    value = literal(value)
    return isinstance(value, (int, float)) and value <= MASK_FILL_MAX


def _scale_factor(value: Any) -> Any:
    """A scale factor: a number, a node computing a Python number (e.g. ``.item()``), or
    ``("tensor", node)`` for a 0-d tensor computed at run time (folded into q, see
    :func:`emit_sdpa_operands`: SDPA's ``scale`` must be a Python number)."""
    value = literal(value)
    if isinstance(value, fx.Node) and tensor_value(value) is not None:
        return ("tensor", value)
    return value


def _is_tensor_factor(factor: Any) -> bool:
    if isinstance(factor, tuple) and factor[0] == "reciprocal":
        factor = factor[1]
    return isinstance(factor, tuple) and factor[0] == "tensor"


def step_masked_fill(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if not is_call(node, torch.masked_fill, "masked_fill", "masked_fill_"):
        return None
    scores, mask, value = node.args[0], arg(node, 1, "mask"), arg(node, 2, "value")
    if not _fill_is_mask(value):
        raise NoMatch(f"masked_fill with value {value!r} (only fills <= {MASK_FILL_MAX:g} or "
                      "-inf are masks that sparse attention can reproduce)")
    return scores, ScoreStep("keep", mask, invert=True)


def step_where(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    if not is_call(node, torch.where, "where") or len(node.args) != 3:
        return None
    cond, scores, fill = node.args
    if not _fill_is_mask(fill):
        raise NoMatch(f"torch.where with fill {fill!r} is not a mask")
    return scores, ScoreStep("keep", cond)


def step_softcap(node: fx.Node) -> None:
    if is_call(node, torch.tanh, "tanh"):
        raise NoMatch("logit soft-capping (tanh) is not supported by sparse_attention")
    return None


def step_batch_view(node: fx.Node) -> tuple[fx.Node, ScoreStep] | None:
    """``scores.view(B, H, Lq, Lk)`` <-> ``.view(B * H, Lq, Lk)``: only the leading (batch, head)
    dims regroup (MBart, Inductor's pattern 24, adds its mask in the 4-d view)."""
    if not is_call(node, "view", "reshape", torch.reshape) or not isinstance(node.args[0], fx.Node):
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


def _batch_view_shape(steps: list[ScoreStep]) -> tuple[Any, Any] | None:
    """``(B, H)`` when the scores pass through a ``[B * H] -> [B, H]`` view and back, with every
    mask applied inside the 4-d view; None without views."""
    views = [i for i, step in enumerate(steps) if step.kind == "view"]
    if not views:
        return None
    if len(views) != 2 or steps[views[0]].value is None or steps[views[1]].value is not None:
        raise NoMatch("the scores are reshaped other than [B*H] -> [B, H] -> [B*H]")
    masks = [i for i, step in enumerate(steps) if step.kind in ("add", "keep")]
    if any(not views[0] < i < views[1] for i in masks):
        raise NoMatch("masks are applied on both sides of a [B*H] <-> [B, H] view of the scores")
    view = steps[views[0]].value
    shape = view.args[1] if len(view.args) == 2 else view.args[1:]
    if len(shape) != 4 or any(isinstance(d, int) and d < 0 for d in shape[:2]):
        raise NoMatch("the [B, H] view of the scores does not name B and H")
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
            arg(node, 2, "dim") == 1 and isinstance(node.args[1], int):
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


def _pre_scale(node: fx.Node, steps: list[ScoreStep]) -> fx.Node:
    """Strips scalar multiplications/divisions of q or k (pre-scaled operands)."""
    while True:
        found = step_scale_mul(node) or step_scale_div(node)
        if found is None:
            return node
        node, step = found
        steps.append(step)


def _walk_scores(node: fx.Node, depth: int = 0) -> ScoreChain:
    if depth > 12:
        raise NoMatch("too many ops between q @ k^T and the softmax")
    if is_call(node, *MATMULS) or is_call(node, torch.einsum):
        return ScoreChain(qk=node)
    if is_call(node, torch.baddbmm, "baddbmm"):  # beta * input + alpha * (q @ k^T)
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta != 1 or not is_scalar(alpha):
            raise NoMatch(f"baddbmm with beta={beta}, alpha={alpha}")
        return ScoreChain(qk=node, steps=[ScoreStep("scale", alpha), ScoreStep("add", node.args[0])])
    for step_fn in SCORE_STEPS:
        found = step_fn(node)
        if found is None:
            continue
        options = found if isinstance(found, list) else [found]
        last_error = None
        for source, step in options:
            try:
                chain = _walk_scores(source, depth + 1)
            except NoMatch as err:
                last_error = err
                continue
            chain.steps.append(step)
            chain.nodes.append(node)
            return chain
        raise last_error or NoMatch("no matmul found above the softmax")
    target = node.target if node.op != "placeholder" else "a graph input"
    raise NoMatch(f"unsupported op {getattr(target, '__name__', target)!r} between q @ k^T "
                  "and the softmax")


def _walk_probs(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """From the PV matmul's first operand up to the softmax, through casts and eval dropout."""
    passed = []
    while not is_call(node, *SOFTMAXES):
        if is_call(node, *DROPOUTS):
            p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
            if p != 0 and training is not False:
                raise NoMatch(f"dropout(p={p}) in training mode")
        elif not is_call(node, *CASTS):
            raise NoMatch("the PV matmul's first operand is not a softmax")
        passed.append(node)
        node = node.args[0]
        if not isinstance(node, fx.Node):
            raise NoMatch("the PV matmul's first operand is not a softmax")
    return node, passed


def _einsum_operands(node: fx.Node, kind: str) -> tuple[fx.Node, fx.Node] | None:
    """``einsum("...qd,...kd->...qk", q, k)`` (kind "qk") / ``("...qk,...kd->...qd", p, v)``."""
    if not is_call(node, torch.einsum) or len(node.args) != 3:
        return None
    equation = node.args[0].replace(" ", "")
    inputs, output = equation.split("->")
    left, right = inputs.split(",")
    if not (len(left) == len(right) == len(output) and left[:-2] == right[:-2] == output[:-2]):
        return None
    (a1, a2), (b1, b2), (o1, o2) = left[-2:], right[-2:], output[-2:]
    if kind == "qk" and a2 == b2 and (o1, o2) == (a1, b1) and a1 != b1:
        return node.args[1], node.args[2]
    if kind == "pv" and a2 == b1 and (o1, o2) == (a1, b2):
        return node.args[1], node.args[2]
    return None


def match_matmul_softmax_matmul(node: fx.Node) -> AttentionSite | None:
    """``softmax(scale * q @ k^T + mask) @ v`` in its hand-written spellings (matmul, ``@``,
    bmm, einsum; scaling by mul/div or pre-scaled q/k; additive, masked_fill and where masks;
    casts around the softmax; eval-mode dropout; GQA by repeat_kv/repeat_interleave/expand)."""
    pv = _einsum_operands(node, "pv")
    if pv is None and is_call(node, *MATMULS) and len(node.args) >= 2:
        pv = node.args[0], node.args[1]
    if pv is None or not isinstance(pv[0], fx.Node) or rank(node) not in (3, 4):
        return None
    try:
        softmax, prob_nodes = _walk_probs(pv[0])
    except NoMatch:
        return None  # not attention at all: an ordinary matmul
    site = AttentionSite(node=node, pattern="matmul_softmax_matmul")
    try:
        dim = normalized_dim(arg(softmax, 1, "dim"), rank(softmax))
        if dim != rank(softmax) - 1:
            raise NoMatch("softmax is not over the last (key) dim")
        chain = _walk_scores(softmax.args[0])
        qk = _einsum_operands(chain.qk, "qk")
        pre_steps: list[ScoreStep] = []
        if is_call(chain.qk, torch.einsum) and qk is None:
            raise NoMatch(f"einsum {chain.qk.args[0]!r} is not q @ k^T")
        if qk is not None:
            q, k = qk
        else:
            offset = 1 if is_call(chain.qk, torch.baddbmm, "baddbmm") else 0
            q, k_t = chain.qk.args[offset], chain.qk.args[offset + 1]
            k_t = _pre_scale(k_t, pre_steps)
            k = _first(KEY_TRANSPOSES, k_t)
            if k is None:
                raise NoMatch("the second operand of q @ k^T is not a transposed key")
        q = _pre_scale(q, pre_steps)
        k = _pre_scale(k, pre_steps)
        site.extra["steps"] = pre_steps + chain.steps
        site.extra["batch_view"] = _batch_view_shape(chain.steps)
        if site.extra["batch_view"] is not None:  # heads per batch entry, for the indexer
            site.extra["view_heads"] = int(tensor_value(
                next(s.value for s in chain.steps if s.kind == "view")).shape[1])
        kinds = sorted({"bool mask" if s.kind == "keep" else "additive mask"
                        for s in chain.steps if s.kind in ("add", "keep")})
        site.extra["mask_kind"] = " + ".join(kinds) or "none"
        chain_nodes = [*chain.nodes, softmax, *prob_nodes, chain.qk]
        for inner in [*chain.nodes, softmax, *prob_nodes]:
            if len([u for u in inner.users if not _shape_only_use(u, inner)]) != 1:
                raise NoMatch("the attention scores or probabilities are used elsewhere "
                              "(e.g. output_attentions)")
        site.extra["chain_nodes"] = chain_nodes
        v = pv[1]
        k_source, k_repeated = unrepeat(k)
        v_source, v_repeated = unrepeat(v)
        if k_repeated and v_repeated:
            k, v = k_source, v_source
        site.q, site.k, site.v = q, k, v
        site.enable_gqa = k_repeated and v_repeated
        site.scale = 1.0
        _check_shapes(site)
    except NoMatch as err:
        return site.keep_dense(str(err))
    return site


def _shape_only_use(user: fx.Node, node: fx.Node) -> bool:
    """``x.expand_as(node)``, ``node.size()``, ``node.dim()``: uses of the shape, not the values
    (Inductor's DistilBert pattern expands its mask to the scores' shape)."""
    if is_call(user, "expand_as", "type_as", "new_zeros", "new_empty"):
        return user.args[0] is not node
    return is_call(user, "size", "dim")


def _check_shapes(site: AttentionSite) -> None:
    q, k, v = (tensor_value(x) for x in (site.q, site.k, site.v))
    if q is None or k is None or v is None:
        raise NoMatch("q, k or v has no recorded shape")
    if not (q.dtype == k.dtype == v.dtype):
        raise NoMatch(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): the "
                      "probabilities are cast to another dtype before p @ v")
    if not (q.dim() == k.dim() == v.dim()) or q.dim() not in (3, 4):
        raise NoMatch(f"q, k, v ranks {q.dim()}, {k.dim()}, {v.dim()} (expected 3 or 4)")
    if q.dim() == 4 and (q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]):
        raise NoMatch(f"head counts q={q.shape[1]}, k={k.shape[1]}, v={v.shape[1]} do not form GQA")
    if k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        raise NoMatch(f"q @ k^T and p @ v do not pair up: k {tuple(k.shape)}, v {tuple(v.shape)}, "
                      f"q {tuple(q.shape)}")
    if q.dim() == 3 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise NoMatch("batched matmul operands have different batch sizes")


# ------------------------------------------------------------------------------------------
# Turning a matched chain into SDPA operands (nodes inserted before the site).


def _unwrap(factor: Any) -> Any:
    return factor[1] if isinstance(factor, tuple) and factor[0] == "tensor" else factor


def _product(graph: fx.Graph, factors: list[Any]) -> Any:
    """The product of numbers and scalar nodes; ("reciprocal", x) stands for 1 / x."""
    number, nodes = 1.0, []
    for factor in factors:
        if isinstance(factor, tuple) and factor[0] == "reciprocal":
            value = _unwrap(factor[1])
            if isinstance(value, fx.Node):
                nodes.append(graph.call_function(operator.truediv, (1.0, value)))
            else:
                number /= value
        elif isinstance(_unwrap(factor), fx.Node):
            nodes.append(_unwrap(factor))
        else:
            number *= factor
    result: Any = number
    for node in nodes:
        result = graph.call_function(operator.mul, (result, node))
    return result


def emit_sdpa_operands(graph: fx.Graph, site: AttentionSite) -> dict[str, Any]:
    """SDPA-equivalent operands of a hand-written site: q, k, v (rank 4), attn_mask, scale, and
    whether the output must be squeezed back to rank 3 (dim 1). Call inside
    ``graph.inserting_before``.
    """
    scale_factors: list[Any] = []
    terms: list[dict[str, Any]] = []
    for step in site.extra["steps"]:
        if step.kind == "scale":
            scale_factors.append(step.value)
            for term in terms:
                if term["kind"] == "add":
                    term["factors"].append(step.value)
        elif step.kind == "add":
            terms.append({"kind": "add", "node": step.value, "factors": []})
        elif step.kind == "keep":
            terms.append({"kind": "keep", "node": step.value, "invert": step.invert})
    mask = None
    if terms:
        adds = [t["node"] for t in terms if t["kind"] == "add"]
        add_scales = [_product(graph, t["factors"]) for t in terms if t["kind"] == "add"]
        keeps = [t["node"] for t in terms if t["kind"] == "keep" and not t["invert"]]
        drops = [t["node"] for t in terms if t["kind"] == "keep" and t["invert"]]
        mask = graph.call_function(combine_masks, (adds, add_scales, keeps, drops))
    q, k, v = site.q, site.k, site.v
    tensor_factors = [f for f in scale_factors if _is_tensor_factor(f)]
    if tensor_factors:  # (q . k) * t == (q * t) . k: run-time tensor scales go into q
        q = graph.call_function(operator.mul, (q, _product(graph, tensor_factors)))
        scale_factors = [f for f in scale_factors if not _is_tensor_factor(f)]
    batch_view = site.extra.get("batch_view")
    if batch_view is not None:  # [B*H, L, D] -> [B, H, L, D], where the masks live
        q, k, v = (graph.call_method("unflatten", (x, 0, tuple(batch_view))) for x in (q, k, v))
        return {"q": q, "k": k, "v": v, "attn_mask": mask, "scale": _product(graph, scale_factors),
                "squeeze": False, "flatten": True}
    squeeze = rank(q) == 3
    if squeeze:  # [B*H, L, D] batched matmuls: B*H batches of one head each
        q, k, v = (graph.call_method("unsqueeze", (x, 1)) for x in (q, k, v))
        if mask is not None:
            mask = graph.call_function(rank3_mask_to_rank4, (mask,))
    return {"q": q, "k": k, "v": v, "attn_mask": mask, "scale": _product(graph, scale_factors),
            "squeeze": squeeze, "flatten": False}
