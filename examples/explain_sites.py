"""Explain which attention sites of a model are rewritten, and why others stay dense.

    python examples/explain_sites.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dsa_compile


class FourAttentions(nn.Module):
    """Two attentions that are rewritten (SDPA; a BERT-style -1e4 additive mask, which selection
    ranks after every visible key) and two that stay dense, each with the reason explain() gives
    (logit soft-capping; scores mutated in place outside the matched chain)."""

    def forward(self, q, k, v):
        n = q.shape[2]
        plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        tril = torch.tril(torch.ones(n, n))
        old_bert = torch.softmax(q @ k.transpose(-2, -1) / 4 + (1.0 - tril) * -10000.0, -1) @ v
        capped = torch.tanh(q @ k.transpose(-2, -1) / 30.0) * 30.0  # Gemma-2 soft-capping
        capped = torch.softmax(capped, dim=-1) @ v
        scores = q @ k.transpose(-2, -1)
        scores[..., :4] = float("-inf")  # an in-place write the rewrite could not keep
        mutated = torch.softmax(scores, dim=-1) @ v
        return plain + old_bert + capped + mutated


def main() -> dsa_compile.ExplainReport:
    q = torch.randn(1, 4, 64, 16)
    report = dsa_compile.explain(FourAttentions(), q, q, q, topk=16)
    print(report.table())
    return report


if __name__ == "__main__":
    main()
