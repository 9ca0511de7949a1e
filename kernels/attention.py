"""``dsa_attention``: what a rewritten attention site runs (indexer + top-k + sparse attention).

It takes the site's own q, k, v (post-RoPE, as the model's attention saw them), its mask, and
the site's indexer parameters, and computes

    q_idx = (q as [B, Lq, H * D]) @ q_proj            -> [B, Lq, HI, DI]
    k_idx = (k as [B, Lk, Hkv * D]) @ k_proj          -> [B, Lk, DI]
    I[t, s] = sum_j w[j] * relu(q_idx[t, j] . k_idx[s])
    out = softmax attention of each query over the top-k keys of I (masked like the original)

With at most ``dense_up_to`` keys it runs dense SDPA instead: with L <= topk every visible key
is selected, so that is exactly what the sparse path would compute, only faster.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import DECODE_QUERIES, device_granularity
from . import decode
from .fp8 import quantize_indexer
from .ops import indexer_topk, sparse_attention

# Set by capture_selections(): a list that receives each site's selection (for measurements).
_capture: list[torch.Tensor] | None = None


@contextlib.contextmanager
def capture_selections() -> Iterator[list[torch.Tensor]]:
    """Collects the indices (``[B, rows, topk]``) each rewritten site selects, in call order,
    also when a site runs dense (short sequences), so selection quality can be measured on the
    dense model's own q and k. For eager-mode graphs (compiled code does not call back)."""
    global _capture
    previous, _capture = _capture, []
    try:
        yield _capture
    finally:
        _capture = previous


# A key whose bias lies more than this below the best bias of its query row (in every head) is
# masked out for selection: at most e^-100 of that row's mass unless its logits exceed the best
# visible key's by 100. Such keys (-1e4, -1e9, finfo.min masks, before or after the scale) are
# only selected when every key is (topk >= Lk), so selection never ranks them ahead of a
# visible key, and a full selection stays exact.
MASKED_BIAS_MARGIN = 100.0


def mask_to_bias_and_visibility(
    attn_mask: torch.Tensor | None, batch: int, lq: int, lk: int, select_all: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An SDPA ``attn_mask`` -> (additive bias ``[B|1, H|1, Lq|1, Lk]``, key visibility
    ``[B, Lk]`` or ``[B, Lq, Lk]`` bool, True = may be selected).

    Boolean masks mean True = attend; float masks are added to the scores. With ``select_all``
    (every key will be selected) a key is visible when its bias is above ``-inf`` in some head;
    otherwise only when it is within :data:`MASKED_BIAS_MARGIN` of its row's best bias in some
    head (a row of equal biases, e.g. all ``finfo.min``, keeps all its keys).
    """
    if attn_mask is None:
        return None, None
    mask = attn_mask
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype == torch.bool:
        visible = mask
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )
    else:
        bias = mask
        visible = ~torch.isneginf(mask)  # NaN stays visible: it poisons the row, as in SDPA
        if not select_all:
            best = mask.amax(dim=-1, keepdim=True)
            visible = visible & ((mask >= best - MASKED_BIAS_MARGIN) | mask.isnan())
    # A key may be selected when some head of the query may attend it.
    visible = visible.any(dim=1)  # [B|1, Lq|1, Lk|1]
    if visible.shape[1] == 1:
        return bias, visible[:, 0].expand(batch, lk)
    return bias, visible.expand(batch, lq, lk)


def granularity(device: torch.device, query_block: int | None, key_block: int | None,
                topk: int, queries: int | None = None) -> tuple[int, int]:
    """``(query_block, key_block)`` with ``None`` replaced by the device's default for a budget
    of ``topk`` keys (:func:`dsa_compile.config.device_granularity`)."""
    return device_granularity(device.type, query_block, key_block, topk, queries)


def sdpa_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``attn_mask`` in a dtype SDPA takes with queries of ``dtype``: bool, fp32, or ``dtype``
    (a bias in another, narrower float dtype, e.g. fp16 added to fp32 scores, is widened)."""
    if attn_mask is None or attn_mask.dtype in (torch.bool, torch.float32, dtype):
        return attn_mask
    return attn_mask.float()


def indexer_dtype(activations: torch.dtype, parameters: torch.dtype) -> torch.dtype:
    """The dtype a site's indexer computes its projections in: the activations' when they are
    16-bit floats (a bf16 / fp16 model: DSA's low-precision scorer, on tensor cores on a GPU;
    the fp32 parameters are cast per call, as autocast does), else the parameters'. Scores
    accumulate in fp32 either way."""
    return activations if activations in (torch.bfloat16, torch.float16) else parameters


def index_keys(k: torch.Tensor, k_proj: torch.Tensor) -> torch.Tensor:
    """A site's keys ``k [B, Hkv, Lk, D]`` through its indexer's key projection: ``[B, Lk,
    groups * DI]`` in :func:`indexer_dtype` (what an indexer key cache holds per token)."""
    batch, kv_heads, lk, dim = k.shape
    dtype = indexer_dtype(k.dtype, k_proj.dtype)
    return k.transpose(1, 2).reshape(batch, lk, kv_heads * dim).to(dtype) @ k_proj.to(dtype)


def indexer_inputs(q: torch.Tensor, k: torch.Tensor, q_proj: torch.Tensor, k_proj: torch.Tensor,
                   head_weights: torch.Tensor, per_kv_head: bool = False,
                   cached_keys: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A site's ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]`` through its indexer:
    ``q_idx [B', Lq, HI, DI]``, ``k_idx [B', Lk, DI]`` (in :func:`indexer_dtype`),
    ``weights [B', Lq, HI]`` (the parameters' dtype); differentiable in the indexer parameters;
    ``B' = B``.

    ``per_kv_head``: the indexer holds one index head group per kv head (``q_proj [H * D,
    Hkv * HI * DI]``, ``k_proj [Hkv * D, Hkv * DI]``, ``head_weights [Hkv * HI]``, group g
    reading kv head g's keys); the result is folded to ``B' = B * Hkv`` (batch-major), one
    selection per (batch, kv head), as :func:`fold_kv_heads` folds the attention.
    ``cached_keys``: :func:`index_keys` of ``k``, kept from earlier steps (then ``k`` is not
    read)."""
    batch, heads, lq, dim = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    groups = kv_heads if per_kv_head else 1
    index_heads, index_dim = head_weights.shape[0], k_proj.shape[1] // groups
    dtype = indexer_dtype(q.dtype, q_proj.dtype)
    q_flat = q.transpose(1, 2).reshape(batch, lq, heads * dim).to(dtype)
    q_idx = (q_flat @ q_proj.to(dtype)).view(batch, lq, index_heads, index_dim)
    k_idx = index_keys(k, k_proj) if cached_keys is None else cached_keys.to(dtype)
    weights = head_weights.expand(batch, lq, index_heads)
    if groups == 1:
        return q_idx, k_idx, weights
    per = index_heads // groups
    q_idx = q_idx.view(batch, lq, groups, per, index_dim).transpose(1, 2)
    k_idx = k_idx.view(batch, lk, groups, index_dim).transpose(1, 2)
    weights = weights.reshape(batch, lq, groups, per).transpose(1, 2)
    return (q_idx.reshape(batch * groups, lq, per, index_dim),
            k_idx.reshape(batch * groups, lk, index_dim),
            weights.reshape(batch * groups, lq, per))


def fold_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                  visible: torch.Tensor | None):
    """Attention with one selection per kv head as a batch of single-kv-head problems:
    ``q [B, H, Lq, D] -> [B * Hkv, H / Hkv, Lq, D]``, ``k, v [B, Hkv, Lk, .] -> [B * Hkv, 1,
    Lk, .]``, ``bias [B|1, H|1, Lq|1, Lk] -> [B * Hkv|1, H / Hkv|1, ...]``, ``visible [B, Lk] |
    [B, Lq, Lk]`` repeated per kv head (batch-major, as :func:`indexer_inputs` folds)."""
    batch, heads, lq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = q.reshape(batch * kv_heads, group, lq, dim)
    k, v = (x.reshape(batch * kv_heads, 1, *x.shape[2:]) for x in (k, v))
    if bias is not None:
        if bias.shape[1] == heads:
            bias = bias.expand(batch, *bias.shape[1:]).reshape(batch * kv_heads, group,
                                                               *bias.shape[2:])
        elif bias.shape[0] != 1:
            bias = bias.repeat_interleave(kv_heads, dim=0)
    if visible is not None:
        visible = visible.repeat_interleave(kv_heads, dim=0)
    return q, k, v, bias, visible


@dataclass
class SiteCall:
    """One call of a rewritten site, as :func:`intercept_sites` sees it: the SDPA operands,
    the indexer parameters, and ``dense()`` (what the original computes)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    head_weights: torch.Tensor
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    dense: Callable[[], torch.Tensor]
    per_kv_head: bool = False


_intercept: Callable[[SiteCall], torch.Tensor] | None = None


@contextlib.contextmanager
def intercept_sites(handler: Callable[[SiteCall], torch.Tensor]) -> Iterator[None]:
    """Within the block, every rewritten site of an eager-mode graph calls ``handler`` and
    returns what it returns (calibration: train the site's indexer on its q and k, then return
    ``call.dense()``). Compiled (Inductor) code does not call back."""
    global _intercept
    previous, _intercept = _intercept, handler
    try:
        yield
    finally:
        _intercept = previous


def dsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    head_weights: torch.Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    topk: int,
    dense_up_to: int,
    query_block: int | None,
    key_block: int | None,
    candidate_blocks: int,
    per_kv_head: bool = False,
    cached_keys: torch.Tensor | None = None,
    indexer_fp8: bool = False,
) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale,
    enable_gqa=enable_gqa)`` over ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``.

    Indexer parameters: ``q_proj [H * D, HI * DI]``, ``k_proj [Hkv * D, DI]``,
    ``head_weights [HI]`` (one selection shared by all heads), or with ``per_kv_head`` one
    selection per kv head (shapes in :func:`indexer_inputs`). SDPA's ``is_causal`` is top-left
    aligned: query t sees keys s <= t. ``cached_keys``: :func:`index_keys` of ``k`` kept by an
    indexer key cache (generation), so only new tokens were projected. ``indexer_fp8``: the
    indexer scores in FP8 e4m3 (:func:`.fp8.quantize_indexer`).
    """
    lk = k.shape[2]
    if torch.compiler.is_exporting():
        return _exported_attention(q, k, v, attn_mask, (q_proj, k_proj, head_weights), is_causal,
                                   scale, enable_gqa, topk, dense_up_to,
                                   (query_block, key_block, candidate_blocks), per_kv_head,
                                   indexer_fp8)
    dense = lk <= dense_up_to
    select_all = topk >= lk

    def sdpa() -> torch.Tensor:
        return _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa)

    if _intercept is not None:
        return _intercept(SiteCall(q, k, v, attn_mask, q_proj, k_proj, head_weights, is_causal,
                                   scale, enable_gqa, sdpa, per_kv_head))
    if dense and _capture is None:
        return sdpa()
    # more slots than keys would only hold -1
    return _sparse(q, k, v, attn_mask, (q_proj, k_proj, head_weights), is_causal, scale,
                   max(1, min(topk, lk)), select_all, (query_block, key_block, candidate_blocks),
                   per_kv_head, sdpa if dense else None, cached_keys=cached_keys,
                   indexer_fp8=indexer_fp8)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
          is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(attn_mask, q.dtype),
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
            indexer: tuple[torch.Tensor, torch.Tensor, torch.Tensor], is_causal: bool,
            scale: float | None, topk: int, select_all: bool,
            blocks: tuple[int | None, int | None, int], per_kv_head: bool,
            dense: Callable[[], torch.Tensor] | None = None,
            indexer_q: torch.Tensor | None = None,
            cached_keys: torch.Tensor | None = None,
            indexer_fp8: bool = False) -> torch.Tensor:
    """The sparse path of :func:`dsa_attention` (``dense``: what to return after a capture
    probe recorded the selection of a site that runs dense; ``indexer_q``: the queries the
    indexer reads when they differ from those attention reads)."""
    batch, heads, lq = q.shape[:3]
    lk = k.shape[2]
    query_block, key_block = granularity(q.device, blocks[0], blocks[1], topk, lq)
    q_idx, k_idx, weights = indexer_inputs(q if indexer_q is None else indexer_q, k, *indexer,
                                           per_kv_head, cached_keys)
    k_scale = None
    if indexer_fp8:
        q_idx, k_idx, weights, k_scale = quantize_indexer(q_idx, k_idx, weights)
    keys_only = _keys_only_mask(attn_mask)
    if (_capture is None and not per_kv_head
            and decode.applies(q, is_causal, attn_mask is None or keys_only,
                               (query_block, key_block), DECODE_QUERIES, (q, k, v, *indexer))):
        visible = None if attn_mask is None else _key_visibility(attn_mask, batch, lk)
        if k_scale is not None:  # the CPU's lean path scores in fp32: the dequantised keys
            k_idx, k_scale = k_idx.float() * k_scale[..., None], None
        return decode.decode_attention(q, k, v, q_idx, k_idx, weights, visible, topk, scale)
    bias, visible = mask_to_bias_and_visibility(attn_mask, batch, lq, lk, select_all)
    if keys_only:
        # True = attend, the same for every head and query: the selection never picks a key it
        # hides, so over the selected keys the bias is all zeros.
        bias = None
    if bias is not None and not select_all and query_block > 1 and visible.dim() == 3:
        # A tile shares one selection: a key masked out for one query may be chosen for another
        # of its tile; it must not carry that query's (finite, tiny) weight.
        bias = bias.masked_fill(~visible[:, None], float("-inf"))
    if per_kv_head:
        q, k, v, bias, visible = fold_kv_heads(q, k, v, bias, visible)
    indices = indexer_topk(q_idx, k_idx, weights, topk, is_causal, 0, visible, query_block,
                           key_block, blocks[2], k_scale)
    if _capture is not None:
        _capture.append(indices)
        if dense is not None:  # measuring only: the site computes what it would without the probe
            return dense()
    out, _ = sparse_attention(q, k, v, indices, scale, bias, is_causal, 0, query_block,
                              unique_indices=True)  # top-k rows never repeat a key
    return out.reshape(batch, heads, lq, out.shape[-1]) if per_kv_head else out


def _keys_only_mask(attn_mask: torch.Tensor | None) -> bool:
    """A boolean mask that varies only over keys (and batch): ``[B|1, 1, 1, Lk]`` or fewer
    dims."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return False
    return all(n == 1 for n in attn_mask.shape[-3:-1]) and attn_mask.dim() >= 2


def _key_visibility(attn_mask: torch.Tensor, batch: int, lk: int) -> torch.Tensor:
    """A keys-only boolean mask (:func:`_keys_only_mask`) as ``[B, Lk]``."""
    return attn_mask.reshape(-1, attn_mask.shape[-1]).expand(batch, lk)


def _exported_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: torch.Tensor | None,
                        indexer: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        is_causal: bool, scale: float | None, enable_gqa: bool, topk: int,
                        dense_up_to: int, blocks: tuple[int | None, int | None, int],
                        per_kv_head: bool, indexer_fp8: bool = False) -> torch.Tensor:
    """:func:`dsa_attention` under ``torch.export``: one program for every sequence length.
    ``torch.cond`` picks dense SDPA at ``<= dense_up_to`` keys (an ONNX ``If``), else the
    sparse ops with ``topk`` slots per row (rows with fewer visible keys end in ``-1``, which is
    what clamping ``topk`` to the keys computes)."""
    q_attend = q
    if scale is not None and not isinstance(scale, (int, float)):
        # A traced scale (a model attribute Dynamo lifted as an input) cannot enter a branch
        # of torch.cond: it scales the queries attention reads instead (not the indexer's).
        q_attend, scale = q * scale, 1.0
    # torch.cond refuses operands that alias (q, k, v split from one projection; q twice):
    # copies of the activations, which export as Identity (the indexer weights stay as they
    # are: the file names them).
    activations = (q, q_attend, k, v, *(() if attn_mask is None else (attn_mask,)))
    q, q_attend, k, v, *mask = (x.clone() for x in activations)
    operands = (q, q_attend, k, v, *indexer, *mask)

    def dense_branch(q, q_attend, k, v, q_proj, k_proj, head_weights, *mask):
        return _sdpa(q_attend, k, v, mask[0] if mask else None, is_causal, scale,
                     enable_gqa).reshape(-1)

    def sparse_branch(q, q_attend, k, v, q_proj, k_proj, head_weights, *mask):
        # select_all=False: keys within MASKED_BIAS_MARGIN of a row's best bias stay visible, so
        # a full selection differs from the eager one by at most e^-100 of a row's mass.
        return _sparse(q_attend, k, v, mask[0] if mask else None,
                       (q_proj, k_proj, head_weights), is_causal, scale, topk, False, blocks,
                       per_kv_head, indexer_q=q, indexer_fp8=indexer_fp8).reshape(-1)

    short = k.shape[2] <= dense_up_to
    if isinstance(short, bool):  # a static length: no branch to keep
        flat = (dense_branch if short else sparse_branch)(*operands)
        return flat.view(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    # Both branches return the output flat: torch.cond compares the strides of its branches'
    # outputs, which it cannot do for the symbolic sizes of some models' views.
    flat = torch.cond(short, dense_branch, sparse_branch, operands)
    return flat.view(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


def indexed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    indices: torch.Tensor,
    *,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """SDPA restricted to the keys a model's own indexer chose (``indices [B, Lq, K]``), with
    ``attn_mask`` (the mask before the index mask was folded in) as bias."""
    batch, _, lq, _ = q.shape
    bias, _ = mask_to_bias_and_visibility(attn_mask, batch, lq, k.shape[2])
    out, _ = sparse_attention(q, k, v, indices, scale, bias, is_causal, 0, 1)
    return out


def combine_masks(terms: list[tuple[str, torch.Tensor, float, Any]], batched: bool
                  ) -> torch.Tensor:
    """One rank-4 SDPA ``attn_mask`` from the masks a hand-written attention applies to its
    scores, each ``(kind, tensor, fill, factor)`` in final-score units:

    - ``("add", bias, _, f)``: ``f * bias`` is added;
    - ``("keep", cond, fill, f)`` / ``("drop", cond, fill, f)``: where ``cond`` is False / True
      the key is removed (``fill = -inf``) or ``f * fill`` is added (a fill so negative that it
      absorbs any score added to it).

    Only removals give a boolean mask (True = attend). ``batched``: the scores are ``[B*H, Lq,
    Lk]`` (a rank-3 mask indexes B*H, so it becomes ``[B*H, 1, Lq, Lk]``).
    """
    total, allowed = None, None
    for kind, tensor, fill, factor in terms:
        if kind == "add" or math.isfinite(fill):
            if kind == "add" and not tensor.is_floating_point():  # bool/int biases add 1/n
                tensor = tensor.to(torch.float32)
            term = tensor if kind == "add" else \
                torch.zeros((), dtype=torch.float32, device=tensor.device).masked_fill(
                    tensor if kind == "drop" else ~tensor, fill).expand(tensor.shape)
            term = term if isinstance(factor, (int, float)) and factor == 1 else term * factor
            total = term if total is None else total + term
        else:
            keep = ~tensor if kind == "drop" else tensor
            allowed = keep if allowed is None else allowed & keep
    if total is None:
        mask = allowed
    else:
        mask = total if allowed is None else total.masked_fill(~allowed, float("-inf"))
    if batched and mask.dim() == 3:
        mask = mask.unsqueeze(1)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def flat_mask_in_view(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """A mask of ``[B*H, Lq, Lk]`` scores (``[B*H | 1, Lq | 1, Lk | 1]`` or fewer dims) for their
    ``[B, H, Lq, Lk]`` view: a leading ``B*H`` dim is split, anything else broadcasts as is."""
    if mask.dim() == 3 and mask.shape[0] != 1:
        return mask.unflatten(0, (-1, heads))
    return mask


def restore_empty_rows(out: torch.Tensor, attn_mask: torch.Tensor, v: torch.Tensor, policy: str
                       ) -> torch.Tensor:
    """``out [B, H, Lq, Dv]`` with the rows whose every key ``attn_mask`` removes set to what
    the original computed there: ``"nan"`` (softmax over a row of -inf) or ``"uniform"`` (every
    score the same finite fill: the mean of ``v [B, Hkv, Lk, Dv]`` over the keys). The sparse
    ops and SDPA give zeros there."""
    removed = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == float("-inf")
    empty = removed.all(dim=-1, keepdim=True)  # [B|1, H|1, Lq|1, 1]
    if policy == "nan":
        return out.masked_fill(empty, float("nan"))
    mean = v.float().mean(dim=-2, keepdim=True).to(out.dtype)  # [B, Hkv, 1, Dv]
    mean = mean.repeat_interleave(out.shape[1] // v.shape[1], dim=1)
    return torch.where(empty, mean, out)
