"""The calibration objective of one site's indexer: DeepSeek's dense warm-up, made to serve
selection at the granularity the runtime selects at.

DeepSeek's warm-up minimises ``KL(p_t || softmax(I_t))`` with ``p_t`` the head-summed,
L1-normalised attention of query t. Selection needs only the top of ``I`` in the right order
where the boundary falls; measured on MiniLM, the full-distribution KL lowered top-64 recall,
and a KL restricted to candidate keys traded its temperature against the order. So here:

- a row is what shares one selection: a tile of ``query_block`` queries; its score is the max
  of its queries' indexer scores (what ``dsa::indexer_topk`` ranks by);
- the selection is made soft: :func:`soft_selection` standardises a row's scores (a shift or a
  scale of them changes nothing, as it changes no selection) and passes them through a
  sigmoid centred between the k-th and the (k+1)-th best, so gradients reach the keys at the
  boundary, the ones whose order decides what is selected;
- objective ``"recall"``: maximise the attention mass the soft selection keeps (the mean of the
  tile's queries' head-averaged attention, what attention-mass recall counts); ``"output"``:
  minimise the error of each head's output when its attention is renormalised on the soft
  selection (what the sparse op computes).

Everything is computed a chunk of rows at a time (memory ``chunk * H * Lk``).

Tried and dropped: an end-to-end objective (the model's output error with every site sparse,
the hard runtime selection in the forward and the soft selection's gradient in the backward).
On MiniLM its training loss barely moved and held-out pooled-embedding cosine fell (top-64 at
16-query tiles 0.905 -> 0.903; top-128 at (32, 16) two-stage 0.946 -> 0.871 at lr 3e-4,
0.911 at 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .attention import SiteCall, fold_kv_heads, indexer_inputs, mask_to_bias_and_visibility
from .fp8 import quantize_indexer
from .ops import indexer_topk
from .reference import selection_mask
from .topk import topk_lowest_ties

_CHUNK_QUERIES = 256
OBJECTIVES = ("recall", "output")
_SOFTNESS = 0.25  # width of the soft selection boundary, in standard deviations of the scores


@dataclass
class SiteLoss:
    """The loss of one site call (differentiable in the indexer parameters) and, measured on
    the same rows without gradients, the attention-mass recall of the indexer's top-k and of
    the best possible selection at this granularity (means over rows)."""

    loss: torch.Tensor
    recall: float
    best_recall: float


def _prepared(call: SiteCall, select_all: bool):
    """``(call, q_idx, k_idx, weights, bias, visible)`` with q / k detached; a per-kv-head
    indexer's call folded to one single-kv-head problem per (batch, kv head), as
    ``dsa_attention`` runs it."""
    batch, _, lq, _ = call.q.shape
    lk = call.k.shape[2]
    q, k = call.q.detach(), call.k.detach()
    q_idx, k_idx, weights = indexer_inputs(q, k, call.q_proj, call.k_proj, call.head_weights,
                                           call.per_kv_head)
    bias, visible = mask_to_bias_and_visibility(call.attn_mask, batch, lq, lk, select_all)
    v = call.v
    if call.per_kv_head:
        q, k, v, bias, visible = fold_kv_heads(q, k, v, bias, visible)
    return replace(call, q=q, k=k, v=v), q_idx, k_idx, weights, bias, visible


def _chunk(query_block: int) -> int:
    """Queries per chunk: whole tiles, about ``_CHUNK_QUERIES``."""
    return max(query_block, _CHUNK_QUERIES // query_block * query_block)


def _dense_probs(call: SiteCall, rows: slice, bias: torch.Tensor | None,
                 per_head: bool = False) -> torch.Tensor:
    """Head-averaged attention ``[B, C, Lk]`` (fp32) of the queries ``rows`` (``per_head``:
    ``[B, H, C, Lk]``)."""
    q = call.q[:, :, rows].float()
    k, heads = call.k.float(), call.q.shape[1]
    if k.shape[1] != heads:  # GQA / MQA: each kv head serves a group of query heads
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    logits = torch.einsum("bhtd,bhsd->bhts", q, k) * scale
    if bias is not None:  # [B|1, H|1, Lq|1, Lk]
        logits = logits + (bias if bias.shape[2] == 1 else bias[:, :, rows]).float()
    if call.is_causal:
        t = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
        logits = logits.masked_fill(torch.arange(k.shape[2], device=q.device) > t, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs if per_head else probs.mean(dim=1)


def _visible_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, weights: torch.Tensor, rows: slice,
                    visible: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Indexer scores ``[B, C, Lk]`` (fp32, differentiable in the indexer parameters) of the
    queries ``rows``, ``-inf`` where a key is invisible (mask ``visible [B, Lk] | [B, Lq, Lk]``,
    causality)."""
    logits = torch.einsum("btjd,bsd->btjs", q_idx[:, rows].float(), k_idx.float()).relu()
    scores = torch.einsum("btjs,btj->bts", logits, weights[:, rows].float())
    if visible is None:
        see = torch.ones_like(scores, dtype=torch.bool)
    else:
        see = visible[:, None].expand_as(scores) if visible.dim() == 2 else visible[:, rows]
    if is_causal:
        t = torch.arange(rows.start, rows.stop, device=scores.device)[:, None]
        see = see & (torch.arange(k_idx.shape[1], device=scores.device) <= t)
    return scores.masked_fill(~see, float("-inf"))


def _tile_max(scores: torch.Tensor, query_block: int) -> torch.Tensor:
    """``[B, C, Lk] -> [B, ceil(C / query_block), Lk]``: a tile's score of a key is the max over
    its queries (what ``dsa::indexer_topk`` ranks a tile by)."""
    batch, size, lk = scores.shape
    tiles = -(-size // query_block)
    scores = F.pad(scores, (0, 0, 0, tiles * query_block - size), value=float("-inf"))
    return scores.view(batch, tiles, query_block, lk).amax(2)


def _tile_mass(target: torch.Tensor, query_block: int) -> torch.Tensor:
    """``[B, C, Lk] -> [B, ceil(C / query_block), Lk]``: a tile's attention on a key, summed over
    its queries (the best selection of a tile is the top-k of this)."""
    batch, size, lk = target.shape
    tiles = -(-size // query_block)
    return F.pad(target, (0, 0, 0, tiles * query_block - size)).view(batch, tiles, query_block,
                                                                     lk).sum(2)


def soft_selection(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """How much each key is selected, smoothly: ``sigmoid((z - boundary) / _SOFTNESS)`` with
    ``z`` the row's scores standardised over its visible keys (so neither a shift nor a scale
    of the scores changes it, as neither changes the selection) and the boundary halfway
    between the k-th and the (k+1)-th best ``z``. ``scores [..., Lk]``, ``-inf`` = invisible
    (selected 0)."""
    finite = torch.isfinite(scores)
    count = finite.sum(-1, keepdim=True).clamp_min(1)
    plain = scores.masked_fill(~finite, 0.0)  # no inf in the arithmetic: clean gradients
    mean = plain.sum(-1, keepdim=True) / count
    centred = (plain - mean).masked_fill(~finite, 0.0)
    # clamp before the square root: a row with one visible key has variance 0, and sqrt's
    # gradient there is infinite (times the clamp's 0: NaN)
    spread = (centred.square().sum(-1, keepdim=True) / count).clamp_min(1e-12).sqrt()
    z = centred / spread
    with torch.no_grad():
        ranked = z.masked_fill(~finite, float("-inf")).topk(min(topk + 1, z.shape[-1]), -1).values
        if z.shape[-1] > topk:
            boundary = (ranked[..., topk - 1:topk] + ranked[..., topk:topk + 1]) / 2
        else:
            boundary = ranked[..., -1:] - 1.0
        boundary = boundary.nan_to_num(0.0, neginf=0.0)
    return torch.sigmoid((z - boundary) / _SOFTNESS).masked_fill(~finite, 0.0)


def _output_error(call: SiteCall, probs: torch.Tensor, kept: torch.Tensor, query_block: int,
                  size: int) -> torch.Tensor:
    """Mean over heads and queries of ``|out_sparse - out_dense|^2 / mean |v|^2``, where the
    sparse output renormalises each head's attention ``probs [B, H, C, Lk]`` over the softly
    selected keys ``kept [B, tiles, Lk]``."""
    v = call.v.float()
    if v.shape[1] != probs.shape[1]:
        v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
    weighted = probs * kept.repeat_interleave(query_block, dim=1)[:, None, :size]
    sparse = torch.einsum("bhts,bhsd->bhtd", weighted, v) / \
        weighted.sum(-1, keepdim=True).clamp_min(1e-9)
    with torch.no_grad():
        dense = torch.einsum("bhts,bhsd->bhtd", probs, v)
        norm = v.square().sum(-1).mean().clamp_min(1e-12)
    return ((sparse - dense).square().sum(-1) / norm).mean()


def site_loss(call: SiteCall, topk: int, query_block: int = 1,
              objective: str = "recall") -> SiteLoss:
    """The calibration loss of ``call``'s indexer (see the module docstring): ``"recall"``
    maximises the head-averaged attention mass the soft selection keeps; ``"output"``
    minimises the error of the site's output when attention is renormalised on it."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    call, q_idx, k_idx, weights, bias, visible = _prepared(call, select_all=True)
    batch, _, lq, _ = call.q.shape
    lk = call.k.shape[2]
    topk = max(1, min(topk, lk))
    chunk = _chunk(query_block)
    total = torch.zeros((), device=call.q.device)
    recall = best = 0.0
    rows_seen = 0
    for start in range(0, lq, chunk):
        rows = slice(start, min(lq, start + chunk))
        with torch.no_grad():
            heads = _dense_probs(call, rows, bias, per_head=True)  # [B, H, C, Lk]
        scores = _visible_scores(q_idx, k_idx, weights, rows, visible, call.is_causal)
        size = rows.stop - rows.start
        tiles = -(-size // query_block)
        pad = tiles * query_block - size
        per_query = heads
        if pad:
            heads = F.pad(heads, (0, 0, 0, pad))
        count = torch.full((tiles,), query_block, device=scores.device)
        count[-1] -= pad
        heads = heads.view(batch, -1, tiles, query_block, lk).sum(3) / count[:, None]
        target = heads.mean(1)  # [B, tiles, Lk]
        scores = _tile_max(scores, query_block)
        with torch.no_grad():
            mine = topk_lowest_ties(scores, topk)[1]  # as the runtime selects
            recall += float(target.gather(-1, mine).sum(-1).sum())
            best += float(target.topk(topk, dim=-1).values.sum(-1).sum())
        kept = soft_selection(scores, topk)
        if objective == "recall":
            total = total - (target * kept).sum()
        else:
            total = total + _output_error(call, per_query, kept, query_block, size) * batch * tiles
        rows_seen += batch * tiles
    return SiteLoss(total / rows_seen, recall / rows_seen, best / rows_seen)


def selection_recall(call: SiteCall, topk: int, query_block: int, key_block: int,
                     candidate_blocks: int = 0, indexer_fp8: bool = False) -> tuple[float, float]:
    """``(recall, best)`` of one site call: the attention mass (head-averaged, mean over
    queries) on the keys ``dsa::indexer_topk`` selects at this granularity (with the indexer in
    FP8 if asked, as the site would run it), and on the best selection at the same granularity
    and budget (the top-k of each tile's mean attention)."""
    lk = call.k.shape[2]
    topk = max(1, min(topk, lk))
    with torch.no_grad():
        call, q_idx, k_idx, weights, bias, visible = _prepared(call, select_all=topk >= lk)
        batch, _, lq, _ = call.q.shape
        k_scale = None
        if indexer_fp8:
            q_idx, k_idx, weights, k_scale = quantize_indexer(q_idx, k_idx, weights)
        indices = indexer_topk(q_idx, k_idx, weights, topk, call.is_causal, 0, visible,
                               query_block, key_block, candidate_blocks, k_scale)
        chosen = selection_mask(indices, lq, lk, query_block)  # [B, Lq, Lk]
        recall = best = 0.0
        chunk = _chunk(query_block)
        for start in range(0, lq, chunk):
            rows = slice(start, min(lq, start + chunk))
            target = _dense_probs(call, rows, bias)
            recall += float((target * chosen[:, rows]).sum())
            best += float(_tile_mass(target, query_block).topk(topk, dim=-1).values.sum())
    return recall / (batch * lq), best / (batch * lq)
