"""Top-k with a fixed tie rule: when equal scores straddle the k-th place, the lower key indices
are selected (ONNX ``TopK``'s rule). ``torch.topk`` picks among them in any order, and the
indexer's ReLU scores tie often (every index head negative gives exactly 0), so without the
rule an exported file and the torch ops could select different keys. The order of equal
values within the selection is left as ``torch.topk`` gives it (a selection is a set)."""

from __future__ import annotations

import torch


def topk_lowest_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` best entries of each row of ``scores [..., n]``,
    descending, ties across the k-th place broken toward lower indices. One ``torch.topk`` of
    ``k + 1``; only rows with such a tie are redone (a sort of their k winners)."""
    n = scores.shape[-1]
    if k == 0 or scores.numel() == 0:
        return scores.topk(k, dim=-1)
    # One more than asked: the (k+1)-th best equals the k-th exactly when an entry equal to the
    # k-th was left out (no extra pass over the rows).
    values, picked = scores.topk(min(k + 1, n), dim=-1)
    if n > k:
        ties = values[..., k] == values[..., k - 1]
        values, picked = values[..., :k], picked[..., :k]
    else:
        ties = torch.zeros(values.shape[:-1], dtype=torch.bool, device=values.device)
    kth = values[..., -1:]
    # Ties at -inf (keys nobody sees) become -1 whichever are taken; a NaN k-th place is ranked
    # as torch ranks it.
    redo = ties & torch.isfinite(kth.squeeze(-1))
    if torch.compiler.is_compiling():  # no data-dependent branch: fix every row, keep the tied
        fixed_values, fixed_picked = _apply_tie_rule(scores, kth, k)
        return (torch.where(redo[..., None], fixed_values, values),
                torch.where(redo[..., None], fixed_picked, picked))
    if not bool(redo.any()):
        return values, picked
    fixed_values, fixed_picked = _apply_tie_rule(scores[redo], kth[redo], k)
    values, picked = values.clone(), picked.clone()
    values[redo], picked[redo] = fixed_values, fixed_picked
    return values, picked


def _apply_tie_rule(scores: torch.Tensor, kth: torch.Tensor, k: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tie rule applied to every row of ``scores`` (``kth``: each row's k-th best value),
    without data-dependent shapes, so compiled graphs take it too: the entries above the k-th
    value, then the lowest-index entries equal to it, exactly k per row, picked by a top-k of
    the 0/1 choice (any order among ones), then sorted by score."""
    above = (scores > kth) | scores.isnan()  # torch.topk ranks NaN above every number
    equal = scores == kth
    slots = k - above.sum(-1, keepdim=True)
    chosen = above | (equal & (equal.cumsum(-1) <= slots))
    positions = chosen.to(torch.float32).topk(k, dim=-1).indices
    chosen_values = scores.gather(-1, positions)
    order = chosen_values.sort(dim=-1, descending=True, stable=True).indices
    return chosen_values.gather(-1, order), positions.gather(-1, order)
