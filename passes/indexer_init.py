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

**RoPE-aware basis.** With rotary embeddings the indexer sees ``R_t q`` and ``R_s k``, where
``R_t`` rotates plane f of every head (dims ``f`` and ``f + D/2`` in HF's rotate_half layout)
by the angle ``theta_f t``. A generic ``P`` does not commute with ``R_t``: ``P^T R_t`` mixes the
planes it keeps with planes it dropped, so post-RoPE the projection loses a position-dependent
part of the logits. Write plane f of all kv heads as a complex vector ``z_f = a_f + i b_f`` in
``C^Hkv`` (``a``, ``b`` = the two plane coordinates per head); RoPE multiplies it by the scalar
``e^{i theta_f t}``. A complex functional ``c = u^H z_f`` (``u`` in ``C^Hkv``) picks up the same
phase, so the two real coordinates ``(Re c, Im c)`` (two orthonormal columns of ``P``: ``(x, y)``
and ``(-y, x)`` on the ``(a, b)`` dims, ``u = x + i y``) rotate by the same 2x2 rotation:
``P^T R_t = R'_t P^T`` with ``R'_t`` rotating each indexer pair by its plane's angle. Then

    (P^T R_t q) . (P^T R_s k) = (P^T q) . R'_{s-t} (P^T k)

depends on ``s - t`` only, like the logits themselves, and projecting before or after RoPE
gives the same scores. Among such bases the best one keeps the most energy: the energy of the
pair ``u`` is ``u^H C_f u`` with the Hermitian ``C_f = A + B + i (C^T - C)``, where
``[[A, C], [C^T, B]]`` is the covariance above restricted to the ``(a, b)`` dims of plane f.
So each plane is eigendecomposed (``Hkv x Hkv``), and the DI/2 largest eigenvalues over all
planes give the pairs (an odd DI leaves one zero column). ``C_f`` is also the covariance of
the rotated vectors averaged over positions whose angles cover the circle evenly; a plane that
turns little over the context (low frequency, short context) is nearly static, and there a
real, non-commuting basis can keep more (benchmarks/rope_init_recall.py measures both).
:func:`..rotary.applies_rotary` tells the rewrite when a site applies RoPE;
``IndexerInit.rotary_planes`` records the plane of each pair.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

logger = logging.getLogger("dsa_compile.indexer")

# Ops that pass a projection's output on to attention (reshapes, RoPE arithmetic, casts).
_PASS_THROUGH_DEPTH = 16


@dataclass
class IndexerInit:
    q_proj: torch.Tensor  # [H * D, HI * DI]
    k_proj: torch.Tensor  # [Hkv * D, DI]
    head_weights: torch.Tensor  # [HI]
    source: str  # how it was initialised, for explain()
    # RoPE-aware init: the rotary plane f of indexer dims (2p, 2p + 1), one entry per pair p.
    rotary_planes: tuple[int, ...] = ()


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
                    return value  # the model's own tensor (callers detach what they compute)
                continue  # a linear of another size: not this site's projection
            next_frontier.extend(a for a in current.all_input_nodes if a.op != "placeholder"
                                 or a in inputs)
        frontier = next_frontier
        if not frontier:
            break
    return None


def weight_covariance(wq: torch.Tensor, wk: torch.Tensor, heads: int, kv_heads: int,
                dim: int) -> torch.Tensor:
    """``Wk Wk^T / tr + C_q / tr`` over the kv blocks, float64 ``[Hkv * D, Hkv * D]``."""
    wq, wk = wq.double(), wk.double()
    c_k = wk @ wk.T  # [Hkv * D, Hkv * D]
    c_q = torch.zeros_like(c_k)
    group = heads // kv_heads
    for h in range(heads):
        block = slice((h // group) * dim, (h // group + 1) * dim)
        wq_h = wq[h * dim : (h + 1) * dim]
        c_q[block, block] += wq_h @ wq_h.T
    return c_k / c_k.trace().clamp_min(1e-12) + c_q / c_q.trace().clamp_min(1e-12)


def top_eigenvectors(cov: torch.Tensor, index_dim: int) -> torch.Tensor:
    """The ``index_dim`` leading eigenvectors of ``cov`` as columns, largest first."""
    _, vectors = torch.linalg.eigh(cov)
    return vectors[:, -index_dim:].flip(-1)


def rotary_basis(cov: torch.Tensor, kv_heads: int, dim: int, index_dim: int
                 ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A RoPE-commuting orthonormal basis ``[Hkv * D, index_dim]`` (float64) keeping the most
    of ``cov`` (rotate_half layout), and the rotary plane of each column pair."""
    half = dim // 2
    planes = torch.arange(half)
    heads = torch.arange(kv_heads) * dim
    dims_a = heads[None, :] + planes[:, None]  # [D/2, Hkv]: coordinate a of plane f, head g
    dims_b = dims_a + half
    cov = cov.double()
    a = cov[dims_a[:, :, None], dims_a[:, None, :]]  # [D/2, Hkv, Hkv]
    b = cov[dims_b[:, :, None], dims_b[:, None, :]]
    c = cov[dims_a[:, :, None], dims_b[:, None, :]]
    values, vectors = torch.linalg.eigh(torch.complex(a + b, c.mT - c))  # Hermitian per plane
    # Largest first; ties (e.g. an identity covariance) in plane order.
    order = torch.sort(-values.flatten(), stable=True).indices[: index_dim // 2]
    basis = torch.zeros(kv_heads * dim, index_dim, dtype=torch.float64)
    chosen = []
    for p, flat in enumerate(order.tolist()):
        f, m = divmod(flat, kv_heads)
        u = vectors[f, :, m]
        basis[dims_a[f], 2 * p], basis[dims_b[f], 2 * p] = u.real, u.imag
        basis[dims_a[f], 2 * p + 1], basis[dims_b[f], 2 * p + 1] = -u.imag, u.real
        chosen.append(f)
    return basis, tuple(chosen)


def initial_indexer(
    heads: int,
    kv_heads: int,
    dim: int,
    index_heads: int,
    index_dim: int,
    wq: torch.Tensor | None,
    wk: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
    rotary: bool = False,
) -> IndexerInit:
    """Indexer parameters for a site with ``heads`` query heads, ``kv_heads`` kv heads of dim D.

    ``rotary``: the site's q and k carry RoPE (rotate_half layout); the basis then commutes
    with it (see the module docstring).
    """
    cut = [f"{name} {asked} > {limit} ({what}): uses {limit}" for name, asked, limit, what in (
        ("index_dim", index_dim, kv_heads * dim, "the site's Hkv * D"),
        ("index_heads", index_heads, heads, "the site's query heads")) if asked > limit]
    for note in cut:
        logger.debug("indexer of a %d-head site: %s", heads, note)
    index_dim = min(index_dim, kv_heads * dim)
    index_heads = min(index_heads, heads)
    weights = wq is not None and wk is not None
    planes: tuple[int, ...] = ()
    # The [Hkv*D, Hkv*D] covariance is formed where the weights live (a GPU's float64 GEMMs);
    # the basis is solved on the CPU whatever that device, so it does not depend on it.
    cov = weight_covariance(wq, wk, heads, kv_heads, dim).cpu() if weights else None
    if rotary and dim % 2 == 0:
        basis, planes = rotary_basis(
            cov if weights else torch.eye(kv_heads * dim, dtype=torch.float64), kv_heads, dim,
            index_dim)
        source = (f"weights, RoPE-aware (top-{len(planes)} rotary-plane eigenvector pairs of "
                  "Wk Wk^T + Wq Wq^T; commutes with RoPE)" if weights else
                  f"coordinates, RoPE-aware ({len(planes)} whole rotary planes; no q/k "
                  "projection found upstream)")
    elif weights:
        basis = top_eigenvectors(cov, index_dim)
        source = f"weights (top-{index_dim} eigenvectors of Wk Wk^T + Wq Wq^T)"
    else:
        basis = torch.eye(kv_heads * dim, dtype=torch.float64)[:, :index_dim]
        source = f"coordinates (first {index_dim} key dims; no q/k projection found upstream)"
    source = "; ".join([source, *cut])
    return indexer_from_basis(basis, heads, kv_heads, dim, index_heads, source, dtype, planes)


def indexer_from_basis(basis: torch.Tensor, heads: int, kv_heads: int, dim: int,
                       index_heads: int, source: str, dtype: torch.dtype = torch.float32,
                       rotary_planes: tuple[int, ...] = ()) -> IndexerInit:
    """The indexer of an orthonormal key basis ``[Hkv * D, DI]``: ``k_proj = basis``, each query
    head projected on its kv head's block, ``H / index_heads`` heads summed per indexer head."""
    index_dim = basis.shape[1]
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
        rotary_planes=rotary_planes,
    )


def per_kv_head_indexer(heads: int, kv_heads: int, dim: int, index_heads: int, index_dim: int,
                        wq: torch.Tensor | None, wk: torch.Tensor | None,
                        dtype: torch.dtype = torch.float32, rotary: bool = False) -> IndexerInit:
    """One indexer per kv head (one selection per kv head): group g's index heads read only the
    queries of g's attention heads and kv head g's keys, each initialised as
    :func:`initial_indexer` would for a one-kv-head site of those heads, then assembled
    block-diagonally: ``q_proj [H * D, Hkv * HI' * DI']``, ``k_proj [Hkv * D, Hkv * DI']``,
    ``head_weights [Hkv * HI']`` with ``HI' = min(HI, H / Hkv)`` and ``DI' = min(DI, D)``."""
    group = heads // kv_heads
    parts = []
    for g in range(kv_heads):
        rows_q = slice(g * group * dim, (g + 1) * group * dim)
        rows_k = slice(g * dim, (g + 1) * dim)
        parts.append(initial_indexer(group, 1, dim, index_heads, index_dim,
                                     None if wq is None else wq[rows_q],
                                     None if wk is None else wk[rows_k], dtype, rotary))
    per, width = parts[0].head_weights.shape[0], parts[0].k_proj.shape[1]
    q_proj = torch.zeros(heads * dim, kv_heads * per * width, dtype=dtype)
    k_proj = torch.zeros(kv_heads * dim, kv_heads * width, dtype=dtype)
    for g, part in enumerate(parts):
        q_proj[g * group * dim:(g + 1) * group * dim, g * per * width:(g + 1) * per * width] = \
            part.q_proj
        k_proj[g * dim:(g + 1) * dim, g * width:(g + 1) * width] = part.k_proj
    head_weights = torch.cat([part.head_weights for part in parts])
    return IndexerInit(q_proj, k_proj, head_weights,
                       f"per kv head ({kv_heads} selections): {parts[0].source}",
                       parts[0].rotary_planes)
