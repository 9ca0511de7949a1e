"""The lightning indexer in FP8 (e4m3), as DeepSeek V3.2 runs it: quantised queries and keys whose
scales leave the scores those of the dequantised values.

``I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])``. With ``q[t, j] = a[t, j] * q8[t, j]`` (one
scale per query token and index head) and ``k[s] = c[s] * k8[s]`` (one scale per key, as
DeepSeek's kernels keep), ``a, c > 0``, ``relu`` commutes with the positive factors:
``I[t, s] = sum_j (w[t, j] * a[t, j]) * relu(c[s] * q8[t, j] . k8[s])``. So the query scales fold
into the head weights and the key scales go to ``dsa::indexer_topk``'s ``k_scale``: the
selection (per query, per query tile, two-stage) is exactly that of the dequantised inputs, and
differs from the 16-bit one only where FP8 rounding reorders keys. Every scale depends on its own
token only, so a decode step selects what a full forward selects at that position.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
_TINY = 1e-30  # scale of an all-zero vector (any positive value keeps it zero)


def _scale(x: torch.Tensor) -> torch.Tensor:
    """Per-vector scale (over the last dim, kept) mapping its largest magnitude to FP8_MAX."""
    return x.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / FP8_MAX


def quantize_indexer(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q_idx [B, Lq, HI, DI]``, ``k_idx [B, Lk, DI]``, ``weights [B, Lq, HI]`` -> FP8
    ``q_idx``, FP8 ``k_idx``, fp32 ``weights`` (times the query scales) and fp32 ``k_scale
    [B, Lk]``: ``dsa::indexer_topk``'s inputs for the scores of the dequantised values."""
    q, k = q_idx.float(), k_idx.float()
    q_scale, k_scale = _scale(q), _scale(k)
    return ((q / q_scale).to(FP8), (k / k_scale).to(FP8), weights.float() * q_scale.squeeze(-1),
            k_scale.squeeze(-1))


def dequantize_indexer(q8: torch.Tensor, k8: torch.Tensor, q_idx: torch.Tensor,
                       k_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 values ``q8`` / ``k8`` stand for (with the scales :func:`quantize_indexer` took
    from ``q_idx`` / ``k_idx``): what the FP8 selection is exact for."""
    return q8.float() * _scale(q_idx.float()), k8.float() * _scale(k_idx.float())
