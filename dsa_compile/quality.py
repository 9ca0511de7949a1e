"""Selection quality: how much of the dense attention mass the selected keys carry."""

from __future__ import annotations

import torch

from .kernels.reference import selection_mask


def attention_mass_recall(probs: torch.Tensor, indices: torch.Tensor, query_block: int = 1
                          ) -> float:
    """Mean over batch, heads and queries of the dense attention probability on selected keys.

    ``probs [B, H, Lq, Lk]`` (rows sum to 1), ``indices [B, rows, K]`` (-1 = empty).
    """
    selected = selection_mask(indices, probs.shape[2], probs.shape[3], query_block)
    return float((probs * selected[:, None]).sum(-1).mean())


def best_head_shared_recall(probs: torch.Tensor, topk: int) -> float:
    """The recall of the best selection shared by all heads: top-k of the head-averaged probs."""
    chosen = probs.mean(dim=1).topk(min(topk, probs.shape[-1]), dim=-1).indices
    return attention_mass_recall(probs, chosen)
