"""Top-k with a fixed tie rule: among equal scores the lower key index wins, and equal
values are listed by ascending index (ONNX ``TopK``'s rule). ``torch.topk`` leaves ties in any
order, and the indexer's ReLU scores tie often (every index head negative gives exactly 0), so
without the rule an exported file and the torch ops could select different keys."""

from __future__ import annotations

import torch


def topk_lowest_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` best entries of each row of ``scores [..., n]``,
    descending, ties broken toward lower indices. Costs one extra pass over the rows; rows with
    a tie across the k-th place are redone (a sort of their k winners)."""
    values, picked = scores.topk(k, dim=-1)
    if k == 0 or scores.numel() == 0:
        return values, picked
    kth = values[..., -1:]
    ties = (scores == kth).sum(-1) > (values == kth).sum(-1)  # an equal entry left out
    # Within the winners, equal values must also be in ascending index order.
    unordered = ((values[..., 1:] == values[..., :-1]) &
                 (picked[..., 1:] < picked[..., :-1])).any(-1)
    redo = (ties | unordered) & ~kth.squeeze(-1).isnan()  # a NaN k-th place: as torch ranks
    if not bool(redo.any()):
        return values, picked
    rows = scores[redo]
    row_kth = kth[redo]
    above = (rows > row_kth) | rows.isnan()  # torch.topk ranks NaN above every number
    equal = rows == row_kth
    slots = k - above.sum(-1, keepdim=True)
    chosen = above | (equal & (equal.cumsum(-1) <= slots))  # exactly k per row
    positions = chosen.nonzero()[:, -1].view(rows.shape[0], k)  # ascending
    chosen_values = rows.gather(-1, positions)
    order = chosen_values.sort(dim=-1, descending=True, stable=True).indices
    values, picked = values.clone(), picked.clone()
    values[redo] = chosen_values.gather(-1, order)
    picked[redo] = positions.gather(-1, order)
    return values, picked
