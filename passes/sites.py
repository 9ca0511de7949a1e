"""What the detection pass found: one record per attention site, rewritten or kept dense."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

_ROOT = re.compile(r"^L\[[^\]]*\](\[[^\]]*\])*\.?")


def module_path_of(node: fx.Node) -> str:
    """The module path of a node from its ``nn_module_stack`` (e.g. ``model.layers.0.self_attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    qualified = list(stack.values())[-1][0]
    path = _ROOT.sub("", str(qualified))
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


@dataclass
class AttentionSite:
    """One attention computation found in a graph.

    ``node`` is the node whose value is the attention output ``[B, H, Lq, Dv]``; ``q``, ``k``,
    ``v`` are ``[B, H, Lq, D]``, ``[B, Hkv, Lk, D]``, ``[B, Hkv, Lk, Dv]`` (kv before any GQA
    repetition); ``scale`` is None for SDPA's default ``D ** -0.5``.
    """

    node: fx.Node
    pattern: str
    q: fx.Node | None = None
    k: fx.Node | None = None
    v: fx.Node | None = None
    attn_mask: fx.Node | None = None
    is_causal: bool = False
    scale: Any = None
    enable_gqa: bool = False
    rewritable: bool = True
    reason: str = ""
    index_init: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def module_path(self) -> str:
        return module_path_of(self.node)

    @property
    def mask_kind(self) -> str:
        if "mask_kind" in self.extra:
            return self.extra["mask_kind"]
        if self.attn_mask is None:
            return "causal" if self.is_causal else "none"
        value = example_value(self.attn_mask)
        kind = "bool mask" if getattr(value, "dtype", None) == torch.bool else "additive mask"
        return f"causal + {kind}" if self.is_causal else kind

    def keep_dense(self, reason: str) -> AttentionSite:
        self.rewritable = False
        self.reason = reason
        return self

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (for ``explain`` and ``dsa inspect --json``)."""
        return {
            "module": self.module_path,
            "pattern": self.pattern,
            "q": shape_of(self.q),
            "k": shape_of(self.k),
            "v": shape_of(self.v),
            "mask": self.mask_kind,
            "gqa": self.enable_gqa,
            "rewritten": self.rewritable,
            "reason": self.reason,
            "indexer_init": self.index_init,
        }
