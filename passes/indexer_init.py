"""Training-free initialisation of a site's lightning indexer (no data needed).

Goal: ``I[t, s] = sum_j w_j relu(q_idx[t, j] . k_idx[s])`` should rank keys like the site's own
head-summed logits ``sum_h q_h . k_kv(h)``, which select nearly as well as the best possible
head-shared choice (see ../shared/notes/dsa-reference.md: 0.575 vs 0.607 attention-mass recall
on MiniLM). Writing ``K`` for a token's keys of all kv heads ``[Hkv * D]`` and ``Q'_h`` for
query head h placed in its kv head's block, ``q_h . k_kv(h) = Q'_h . K``. A rank-DI orthonormal
basis ``P`` of the subspace where keys and queries carry their energy keeps this product:
``Q'_h . K ~= (P^T Q'_h) . (P^T K)``. So

    k_proj = P                          [Hkv * D, DI]
    q_proj[h-th block, j-th block] = P[kv(h)-th block]   for the heads h of indexer head j

and each indexer head j sums the logits of its H / HI attention heads before the ReLU.

``P`` comes from the model's weights, found upstream of q and k in the graph: the top-DI
eigenvectors of ``Wk Wk^T / tr + C_q / tr`` with ``C_q = sum_h Wq_h Wq_h^T`` mapped to the kv
blocks. For isotropic inputs these are the key/query covariances, so the projection keeps the
directions the logits live in (no data needed). Without weights a plain coordinate
projection is used, and ``explain()`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

# Ops that pass a projection's output on to attention (reshapes, RoPE arithmetic, casts).
_PASS_THROUGH_DEPTH = 16


@dataclass
class IndexerInit:
    q_proj: torch.Tensor  # [H * D, HI * DI]
    k_proj: torch.Tensor  # [Hkv * D, DI]
    head_weights: torch.Tensor  # [HI]
    source: str  # how it was initialised, for explain()


def find_projection_weight(
    node: fx.Node, out_features: int, inputs: dict[fx.Node, torch.Tensor]
) -> torch.Tensor | None:
    """The weight of the nearest ``F.linear`` upstream of ``node`` with ``out_features`` rows.

    ``inputs`` maps the graph's placeholders to their real values (Dynamo lifts parameters to
    graph inputs).
    """
    seen: set[fx.Node] = set()
    frontier = [node]
    for _ in range(_PASS_THROUGH_DEPTH):
        next_frontier = []
        for current in frontier:
            if current in seen:
                continue
            seen.add(current)
            if current.op == "call_function" and current.target is F.linear:
                weight = current.args[1] if len(current.args) > 1 else current.kwargs.get("weight")
                value = inputs.get(weight) if isinstance(weight, fx.Node) else None
                if isinstance(value, torch.Tensor) and value.dim() == 2 and \
                        value.shape[0] == out_features:
                    return value.detach()
                continue  # a linear of another size: not this site's projection
            next_frontier.extend(a for a in current.all_input_nodes if a.op != "placeholder"
                                 or a in inputs)
        frontier = next_frontier
        if not frontier:
            break
    return None


def _basis_from_weights(wq: torch.Tensor, wk: torch.Tensor, heads: int, kv_heads: int,
                        dim: int, index_dim: int) -> torch.Tensor:
    wq, wk = wq.double(), wk.double()
    c_k = wk @ wk.T  # [Hkv * D, Hkv * D]
    c_q = torch.zeros_like(c_k)
    group = heads // kv_heads
    for h in range(heads):
        block = slice((h // group) * dim, (h // group + 1) * dim)
        wq_h = wq[h * dim : (h + 1) * dim]
        c_q[block, block] += wq_h @ wq_h.T
    cov = c_k / c_k.trace().clamp_min(1e-12) + c_q / c_q.trace().clamp_min(1e-12)
    _, vectors = torch.linalg.eigh(cov)
    return vectors[:, -index_dim:].flip(-1)


def initial_indexer(
    heads: int,
    kv_heads: int,
    dim: int,
    index_heads: int,
    index_dim: int,
    wq: torch.Tensor | None,
    wk: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> IndexerInit:
    """Indexer parameters for a site with ``heads`` query heads, ``kv_heads`` kv heads of dim D."""
    index_dim = min(index_dim, kv_heads * dim)
    index_heads = min(index_heads, heads)
    if wq is not None and wk is not None:
        basis = _basis_from_weights(wq, wk, heads, kv_heads, dim, index_dim)
        source = f"weights (top-{index_dim} eigenvectors of Wk Wk^T + Wq Wq^T)"
    else:
        basis = torch.eye(kv_heads * dim, dtype=torch.float64)[:, :index_dim]
        source = f"coordinates (first {index_dim} key dims; no q/k projection found upstream)"
    group = heads // kv_heads
    q_proj = torch.zeros(heads * dim, index_heads * index_dim, dtype=torch.float64)
    for h in range(heads):
        j = h * index_heads // heads
        kv = h // group
        q_proj[h * dim : (h + 1) * dim, j * index_dim : (j + 1) * index_dim] = \
            basis[kv * dim : (kv + 1) * dim]
    return IndexerInit(
        q_proj=(q_proj * dim**-0.5).to(dtype),
        k_proj=basis.to(dtype).contiguous(),
        head_weights=torch.ones(index_heads, dtype=dtype),
        source=source,
    )
