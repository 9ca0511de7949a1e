"""The one typed form every matcher returns: an attention site, normalised to SDPA's terms.

A site is ``softmax(scale * q @ k^T + mask) @ v`` over ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``,
``v [B, Hkv, Lk, Dv]`` (or a batched ``[B*H, L, D]`` layout), whatever spelling the model used.
Matchers (:mod:`.patterns`) fill it in; guards (:mod:`.guards`) keep it dense when something
cannot be proved; refinements add typed :class:`Refinement` tags; :mod:`.lower` is the one
path that turns it back into graph nodes.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

_ROOT = re.compile(r"^L\[[^\]]*\](\[[^\]]*\])*\.?")
_ROOT_LOCAL = re.compile(r"^L\['([A-Za-z_][A-Za-z0-9_]*)'\]((?:\[(?:\d+|'[^']*')\])*)(\.|$)")
_ROOT_INDEX = re.compile(r"\[(\d+|'[^']*')\]")


def _qualified_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else None


def module_root_of(node: fx.Node) -> tuple[str | int, ...] | None:
    """Where in the traced frame's locals :func:`module_path_of` starts: ``("self",)`` for
    ``L['self'].layers[0]``, ``("args", 0)`` for ``L['args'][0].model`` (a decorated
    ``forward``); None when the path starts elsewhere."""
    qualified = _qualified_module(node)
    match = _ROOT_LOCAL.match(qualified) if qualified else None
    if not match:
        return None
    keys = [int(k) if k.isdigit() else k.strip("'") for k in _ROOT_INDEX.findall(match.group(2))]
    return (match.group(1), *keys)


def module_path_of(node: fx.Node) -> str:
    """The module path of a node from its ``nn_module_stack`` (e.g. ``model.layers.0.self_attn``)."""
    qualified = _qualified_module(node)
    if qualified is None:
        return "<top>"
    path = _ROOT.sub("", qualified)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".") or "<top>"


def example_value(node: Any) -> Any:
    """The example (fake) value Dynamo recorded for a node, or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def shape_of(node: Any) -> tuple | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


@dataclass(frozen=True)
class Factor:
    """One factor of the score scale: a number, a node holding a Python number (``x.item()``),
    or a node holding a 0-d tensor computed at run time (``tensor=True``; folded into q, since
    SDPA's ``scale`` must be a number). ``reciprocal``: the scores are divided by it."""

    value: Any
    reciprocal: bool = False
    tensor: bool = False


class KeepDense(Exception):
    """A site that cannot be proved equivalent to sparse attention (the message says why)."""


class TermKind(enum.Enum):
    ADD = "add"  # scores + node (a float bias)
    KEEP = "keep"  # scores where node is True, else ``fill``
    DROP = "drop"  # scores where node is False, else ``fill``


@dataclass(frozen=True)
class MaskTerm:
    """One mask applied to the scores, in final-score units.

    ``factors``: for ADD, the scale factors applied after the term (so ``bias * prod(factors)``
    lands in the softmax input). ``fill``: for KEEP/DROP, ``-inf`` (removed keys), or a very
    negative finite fill that the lowering reproduces exactly (see :mod:`.lower`).
    """

    kind: TermKind
    node: fx.Node
    factors: tuple[Factor, ...] = ()
    fill: float = float("-inf")
    flat: bool = False  # applied to [B*H, Lq, Lk] scores before their [B, H, Lq, Lk] view


class EmptyRows(enum.Enum):
    """What the original computes for a query whose every key is masked out."""

    ZERO = "zero"  # SDPA, aten._safe_softmax: zeros (what the sparse ops give)
    NAN = "nan"  # softmax over a row of -inf: NaN
    UNIFORM = "uniform"  # every score equals the same finite fill: the mean of v over the keys


@dataclass
class SiteMask:
    """The typed mask of a site: the terms to combine into one SDPA ``attn_mask``."""

    terms: list[MaskTerm] = field(default_factory=list)
    empty_rows: EmptyRows = EmptyRows.ZERO

    def describe(self) -> str:
        kinds = sorted({"bool mask" if t.kind is not TermKind.ADD else "additive mask"
                        for t in self.terms})
        return " + ".join(kinds) or "none"


class Layout(enum.Enum):
    BHLD = "bhld"  # q, k, v are [B, H, L, D]
    BATCHED = "batched"  # [B*H, L, D]: one head per batch entry
    BATCH_VIEW = "batch_view"  # [B*H, L, D] whose scores are viewed as [B, H, Lq, Lk] for masks


class Refinement(enum.Enum):
    """What a refinement changed about a site (shown after the pattern name)."""

    GQA_UNREPEATED = "gqa"  # attends to the kv heads before a repeat_kv / repeat_interleave
    CAUSAL_MASK = "causal_mask"  # a mask tensor proved causal became ``is_causal=True``
    MODEL_INDEXER = "model_indexer"  # sparse attention on the model's own top-k indices


@dataclass
class AttentionSite:
    """One attention computation found in a graph, in SDPA's terms.

    ``node`` is the node whose value is the attention output; ``q``, ``k``, ``v`` the operands
    (kv before any GQA repetition when ``enable_gqa``); ``scale`` the factors of the score scale
    (None: SDPA's default ``D ** -0.5``); ``owned`` the nodes the site's operands stand in for
    (erased after the rewrite once nothing reads them).
    """

    node: fx.Node
    pattern: str
    q: fx.Node | None = None
    k: fx.Node | None = None
    v: fx.Node | None = None
    mask: SiteMask = field(default_factory=SiteMask)
    scale: list[Factor] | None = None
    is_causal: bool = False
    enable_gqa: bool = False
    layout: Layout = Layout.BHLD
    view_shape: tuple[Any, Any] | None = None  # (B, H) of a BATCH_VIEW layout
    owned: list[fx.Node] = field(default_factory=list)
    model_indices: fx.Node | None = None
    tags: list[Refinement] = field(default_factory=list)
    rewritable: bool = True
    reason: str = ""
    index_init: str = ""
    indexer: str = ""  # the name of the site's indexer module (``<module path>.dsa_indexer``)
    granularity: str = ""
    output: fx.Node | None = None  # after the rewrite: the node the site's users read

    @property
    def module_path(self) -> str:
        return module_path_of(self.node)

    @property
    def module_root(self) -> tuple[str | int, ...] | None:
        return module_root_of(self.node)

    @property
    def full_pattern(self) -> str:
        return "+".join([self.pattern, *(t.value for t in self.tags)])

    @property
    def mask_kind(self) -> str:
        base = self.mask.describe()
        if Refinement.CAUSAL_MASK in self.tags:
            return "causal (boolean mask proved causal)"
        if self.is_causal:
            return "causal" if base == "none" else f"causal + {base}"
        return base

    def remap(self, replaced: dict[fx.Node, fx.Node]) -> None:
        """Points every node reference at its replacement (another site's rewrite replaced a
        node this site reads, e.g. one attention's output used as the next one's q)."""
        if not replaced:
            return

        def new(value: Any) -> Any:
            return replaced.get(value, value) if isinstance(value, fx.Node) else value

        def new_factor(factor: Factor) -> Factor:
            return dataclasses.replace(factor, value=new(factor.value))

        self.q, self.k, self.v = new(self.q), new(self.k), new(self.v)
        self.model_indices = new(self.model_indices)
        self.scale = None if self.scale is None else [new_factor(f) for f in self.scale]
        self.mask.terms = [dataclasses.replace(t, node=new(t.node),
                                               factors=tuple(new_factor(f) for f in t.factors))
                           for t in self.mask.terms]
        if self.view_shape is not None:
            self.view_shape = tuple(new(d) for d in self.view_shape)

    def keep_dense(self, reason: str) -> AttentionSite:
        self.rewritable = False
        self.reason = reason
        return self

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (for ``explain`` and ``dsa inspect --json``)."""
        return {
            "module": self.module_path,
            "pattern": self.full_pattern,
            "q": shape_of(self.q),
            "k": shape_of(self.k),
            "v": shape_of(self.v),
            "mask": self.mask_kind,
            "gqa": self.enable_gqa,
            "rewritten": self.rewritable,
            "reason": self.reason,
            "indexer_init": self.index_init,
            "indexer": self.indexer,
            "granularity": self.granularity,
        }
