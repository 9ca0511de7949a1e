"""Explain which attention sites of a model are rewritten, and why others stay dense.

    python examples/explain_sites.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dsa_compile


class TwoAttentions(nn.Module):
    """One attention that can be rewritten, and one with logit soft-capping that cannot."""

    def forward(self, q, k, v):
        plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = torch.tanh(q @ k.transpose(-2, -1) / 30.0) * 30.0  # Gemma-2 style soft-capping
        capped = torch.softmax(scores, dim=-1) @ v
        return plain + capped


def main() -> dsa_compile.ExplainReport:
    q = torch.randn(1, 4, 64, 16)
    report = dsa_compile.explain(TwoAttentions(), q, q, q, topk=16)
    print(report.table())
    return report


if __name__ == "__main__":
    main()
