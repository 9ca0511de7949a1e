"""Triton kernel of the lightning indexer scores, and the GPU top-k selection built on it.

Reference: :mod:`.indexer` (and :func:`.reference.indexer_scores_reference`); the semantics are
those of ``dsa::indexer_scores`` and ``dsa::indexer_topk``.

``I[t, s] = sum_j w[t, j] * relu(scale[s] * q[t, j] . k[s])`` (``scale`` = per-token scale of
FP8 keys, 1 otherwise), fp32 accumulation, ``-inf`` where key s is not visible to query t.

One program scores ``BQ`` queries against ``BN`` keys: the ``BQ * HI`` query rows (all indexer
heads of the block's queries) form one matrix, so ``Q K^T`` is one tensor-core product
``[BQ*HI, DI] x [DI, BN]``; ReLU, the head weights and the sum over heads follow in registers
(as DeepGEMM's ``fp8_mqa_logits``). Blocks entirely past the causal horizon only write -inf.

Selection (:func:`indexer_topk_cuda`) scores a chunk of queries at a time into a bounded
buffer (``chunk x Lk`` fp32, at most :data:`CHUNK_BYTES`) and selects with ``torch.topk``: the
full ``[Lq, Lk]`` matrix never exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import DSAInputError
from .topk import topk_lowest_ties
from .triton_topk import radix_topk
from .triton_topk_cooperative import cooperative_topk_into
from .triton_topk_threshold import threshold_topk_into

# How a chunk's score rows are ranked: "torch" (torch.topk of k + 1, then the tie rule), "radix"
# (:mod:`.triton_topk`: one launch, ties by the same rule in the same pass, no host sync),
# "cooperative" (:mod:`.triton_topk_cooperative`: many programs a row, six launches; for
# decode's few long rows), "threshold" (:mod:`.triton_topk_threshold`: one pass a row over a
# sampled floor; for prefill chunks) -- these two write the int32 indices themselves and are
# not yet timed -- or "auto": radix for fewer than RADIX_MAX_ROWS rows, torch.topk otherwise.
# Timed on an H200 (BENCHMARKS.md, run 7, decode at 128K): one row 0.45 ms radix vs 0.72 torch,
# 8 rows 0.48 vs 0.42; prefill chunks of 2048 rows lose with radix beyond 32K keys (run 6). The
# cut between 1 and 8 rows is not measured.
SELECTORS = ("torch", "radix", "cooperative", "threshold", "auto")
SELECTOR = "auto"
RADIX_MAX_ROWS = 4

CHUNK_BYTES = 1 << 30
DECODE_QUERIES = 8  # at most this many queries: the decode kernel (heads as rows)


@triton.jit
def _score_tile(
    Q, K, W, KSCALE, MASK, b, t, t_ok, keys, key_ok,
    sq_b, sq_t, sq_h, sq_d: tl.constexpr, sk_b, sk_s, sk_d: tl.constexpr, sw_b, sw_t, sw_h,
    ss_b, ss_s, sm_b, sm_t, sm_s, q_offset,
    HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Scores ``[BQ, BN]`` of queries ``t`` against ``keys``: one ``[BQ, DI] x [DI, BN]``
    product per indexer head, ReLU and head weight in registers; -inf where not visible."""
    d = tl.arange(0, DIP)
    k = tl.load(K + b * sk_b + keys[:, None] * sk_s + d[None, :] * sk_d,
                mask=key_ok[:, None] & (d[None, :] < DI), other=0.0)
    if HAS_SCALE:
        key_scale = tl.load(KSCALE + b * ss_b + keys * ss_s, mask=key_ok, other=0.0)
    scores = tl.zeros([BQ, BN], tl.float32)
    for j in tl.static_range(HI):
        q = tl.load(Q + b * sq_b + t[:, None] * sq_t + j * sq_h + d[None, :] * sq_d,
                    mask=t_ok[:, None] & (d[None, :] < DI), other=0.0)
        logits = tl.dot(q, tl.trans(k))
        if HAS_SCALE:
            logits = logits * key_scale[None, :]
        w = tl.load(W + b * sw_b + t * sw_t + j * sw_h, mask=t_ok, other=0.0).to(tl.float32)
        scores += tl.maximum(logits, 0.0) * w[:, None]
    visible = t_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= q_offset + t[:, None])
    if HAS_MASK:
        allowed = tl.load(MASK + b * sm_b + t[:, None] * sm_t + keys[None, :] * sm_s,
                          mask=visible, other=0)
        visible = visible & (allowed != 0)
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def _indexer_scores_decode_kernel(
    Q, K, W, KSCALE, MASK, OUT,
    sq_b, sq_t, sq_h, sq_d: tl.constexpr,
    sk_b, sk_s, sk_d: tl.constexpr,
    sw_b, sw_t, sw_h,
    ss_b, ss_s,
    sm_b, sm_t, sm_s,
    so_b, so_t, so_s: tl.constexpr,
    LK, t_begin, q_offset,
    HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Few queries (decode). Grid: (queries, cdiv(LK, BN), B): the query's indexer heads are
    the rows of one ``[HIP, DI] x [DI, BN]`` product, so no tensor-core rows are wasted on
    absent queries."""
    row = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit offsets for large caches
    t = t_begin + row
    keys = pid_k * BN + tl.arange(0, BN)
    key_ok = keys < LK
    j = tl.arange(0, HIP)
    d = tl.arange(0, DIP)
    q = tl.load(Q + b * sq_b + t * sq_t + j[:, None] * sq_h + d[None, :] * sq_d,
                mask=(j[:, None] < HI) & (d[None, :] < DI), other=0.0)
    k = tl.load(K + b * sk_b + keys[:, None] * sk_s + d[None, :] * sk_d,
                mask=key_ok[:, None] & (d[None, :] < DI), other=0.0)
    logits = tl.dot(q, tl.trans(k))  # [HIP, BN]
    if HAS_SCALE:
        logits = logits * tl.load(KSCALE + b * ss_b + keys * ss_s, mask=key_ok, other=0.0)[None, :]
    w = tl.load(W + b * sw_b + t * sw_t + j * sw_h, mask=j < HI, other=0.0).to(tl.float32)
    scores = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
    visible = key_ok
    if CAUSAL:
        visible = visible & (keys <= q_offset + t)
    if HAS_MASK:
        allowed = tl.load(MASK + b * sm_b + t * sm_t + keys * sm_s, mask=visible, other=0)
        visible = visible & (allowed != 0)
    tl.store(OUT + b * so_b + row * so_t + keys * so_s, tl.where(visible, scores, float("-inf")),
             mask=key_ok)


@triton.jit
def _indexer_scores_kernel(
    Q, K, W, KSCALE, MASK, OUT,
    sq_b, sq_t, sq_h, sq_d: tl.constexpr,
    sk_b, sk_s, sk_d: tl.constexpr,
    sw_b, sw_t, sw_h,
    ss_b, ss_s,
    sm_b, sm_t, sm_s,
    so_b, so_t, so_s: tl.constexpr,
    LQ, LK, t_begin, q_offset,
    HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr, QUERY_BLOCK: tl.constexpr,
    BQ: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Grid: (cdiv(out rows, BQ or 1), cdiv(LK, BN), B). Queries ``t_begin + [0, LQ)``.

    ``QUERY_BLOCK == 1``: ``BQ`` queries per program, each an output row. ``QUERY_BLOCK > 1``:
    one output row per program, the max over the tile's visible queries (looped ``BQ`` at a
    time), so tile-shared selection writes ``Lq / QUERY_BLOCK`` rows instead of ``Lq``.
    """
    pid_q = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit offsets for large caches
    keys = pid_k * BN + tl.arange(0, BN)
    key_ok = keys < LK
    first_key = pid_k * BN
    if QUERY_BLOCK == 1:
        rows = pid_q * BQ + tl.arange(0, BQ)
        out_ptr = OUT + b * so_b + rows[:, None] * so_t + keys[None, :] * so_s
        out_mask = (rows < LQ)[:, None] & key_ok[None, :]
        last_query = q_offset + t_begin + tl.minimum(pid_q * BQ + BQ, LQ) - 1
        if CAUSAL and first_key > last_query:
            tl.store(out_ptr, tl.full([BQ, BN], float("-inf"), tl.float32), mask=out_mask)
        else:
            scores = _score_tile(
                Q, K, W, KSCALE, MASK, b, t_begin + rows, rows < LQ, keys, key_ok,
                sq_b, sq_t, sq_h, sq_d, sk_b, sk_s, sk_d, sw_b, sw_t, sw_h, ss_b, ss_s,
                sm_b, sm_t, sm_s, q_offset, HI, DI, DIP, BQ, BN, CAUSAL, HAS_SCALE, HAS_MASK)
            tl.store(out_ptr, scores, mask=out_mask)
    else:
        out_ptr = OUT + b * so_b + pid_q * so_t + keys * so_s
        tile_start = pid_q * QUERY_BLOCK  # relative to t_begin
        last_query = q_offset + t_begin + tl.minimum(tile_start + QUERY_BLOCK, LQ) - 1
        best = tl.full([BN], float("-inf"), tl.float32)
        if not (CAUSAL and first_key > last_query):
            for q0 in range(0, QUERY_BLOCK, BQ):
                in_tile = q0 + tl.arange(0, BQ)
                rows = tile_start + in_tile
                t_ok = (in_tile < QUERY_BLOCK) & (rows < LQ)
                scores = _score_tile(
                    Q, K, W, KSCALE, MASK, b, t_begin + rows, t_ok, keys, key_ok,
                    sq_b, sq_t, sq_h, sq_d, sk_b, sk_s, sk_d, sw_b, sw_t, sw_h, ss_b, ss_s,
                    sm_b, sm_t, sm_s, q_offset, HI, DI, DIP, BQ, BN, CAUSAL, HAS_SCALE, HAS_MASK)
                best = tl.maximum(best, tl.max(scores, axis=0))
        tl.store(out_ptr, best, mask=key_ok)


def _mask_strides(key_mask: torch.Tensor | None) -> tuple[int, int, int]:
    if key_mask is None:
        return (0, 0, 0)
    if key_mask.dim() == 2:
        return (key_mask.stride(0), 0, key_mask.stride(1))
    return key_mask.stride()


def score_block(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    t_begin: int,
    queries: int,
    keys: int,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
    query_block: int = 1,
    k_scale: torch.Tensor | None = None,
    launch=None,
) -> torch.Tensor:
    """Scores of queries ``t_begin .. t_begin + queries`` against keys ``[0, keys)`` into
    ``out [B, rows, >= keys]`` (fp32, any strides): one row per query, or with
    ``query_block > 1`` one row per tile (max over the tile's queries; ``t_begin`` must start
    a tile). ``k_scale [B, Lk]`` scales the logits of FP8 keys."""
    batch, lq, heads, dim = q_idx.shape
    rows = queries if query_block == 1 else -(-queries // query_block)
    if t_begin < 0 or t_begin + queries > lq or keys > k_idx.shape[1] or out.shape[-1] < keys \
            or out.shape[-2] < rows:  # the kernels index without bounds on these
        raise DSAInputError(
            f"score_block: queries [{t_begin}, {t_begin + queries}) of {lq}, keys [0, {keys}) of "
            f"{k_idx.shape[1]}, out {tuple(out.shape)} (needs >= {rows} rows x {keys} keys)")
    mask = key_mask.view(torch.uint8) if key_mask is not None else None
    strides = (*q_idx.stride(), *k_idx.stride(), *weights.stride(),
               *(k_scale.stride() if k_scale is not None else (0, 0)),
               *_mask_strides(mask), *out.stride())
    pointers = (q_idx, k_idx, weights, k_scale if k_scale is not None else weights,
                mask if mask is not None else out, out)
    meta = scores_config(heads, dim, query_block, causal, k_scale is not None, mask is not None,
                         fp8=q_idx.dtype == torch.float8_e4m3fn)
    if query_block == 1 and isinstance(queries, int) and queries <= DECODE_QUERIES:
        kernel = launch(_indexer_scores_decode_kernel) if launch is not None \
            else _indexer_scores_decode_kernel
        shared = {k: meta[k] for k in ("HI", "DI", "DIP", "CAUSAL", "HAS_SCALE", "HAS_MASK")}
        kernel[(queries, triton.cdiv(keys, 128), batch)](
            *pointers, *strides, keys, t_begin, q_offset,
            HIP=max(16, triton.next_power_of_2(heads)), BN=128, **shared, num_warps=4)
        return out
    programs = triton.cdiv(queries, meta["BQ"]) if query_block == 1 else rows
    kernel = launch(_indexer_scores_kernel) if launch is not None else _indexer_scores_kernel
    kernel[(programs, triton.cdiv(keys, meta["BN"]), batch)](
        *pointers, *strides, queries, keys, t_begin, q_offset, **meta)
    return out


def scores_config(heads: int, dim: int, query_block: int, causal: bool, has_scale: bool,
                  has_mask: bool, fp8: bool = False) -> dict:
    """Compile-time arguments of the prefill scores kernel (shared with AOT compilation); FP8
    products need a reduction of at least 32 (head dims below are zero-padded)."""
    block_q = 64 if query_block == 1 else max(16, min(64, triton.next_power_of_2(query_block)))
    return dict(HI=heads, DI=dim, DIP=max(32 if fp8 else 16, triton.next_power_of_2(dim)),
                QUERY_BLOCK=query_block, BQ=block_q, BN=128 if dim <= 64 else 64, CAUSAL=causal,
                HAS_SCALE=has_scale, HAS_MASK=has_mask, num_warps=4 if block_q <= 32 else 8)


def indexer_scores_cuda(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
    k_scale: torch.Tensor | None = None,
    launch=None,
) -> torch.Tensor:
    """Dense scores fp32 ``[B, Lq, Lk]`` (the ``dsa::indexer_scores`` op) in one launch."""
    batch, lq = q_idx.shape[:2]
    lk = k_idx.shape[1]
    out = q_idx.new_empty((batch, lq, lk), dtype=torch.float32)
    if lq and lk:
        score_block(q_idx, k_idx, weights, out, 0, lq, lk, causal, q_offset, key_mask,
                    k_scale=k_scale, launch=launch)
    return out


def selector(scores: torch.Tensor) -> str:
    """The selector :data:`SELECTOR` names for a chunk of score rows ``[B, rows, n]``."""
    if SELECTOR not in SELECTORS:
        raise ValueError(f"triton_indexer.SELECTOR {SELECTOR!r}: expected one of {SELECTORS}")
    if SELECTOR != "auto":
        return SELECTOR
    return "radix" if scores.shape[0] * scores.shape[1] < RADIX_MAX_ROWS else "torch"


def indexer_topk_cuda(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    weights: torch.Tensor,
    topk: int,
    causal: bool,
    q_offset: int,
    key_mask: torch.Tensor | None,
    query_block: int = 1,
    k_scale: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Top-k visible keys per index row, int32 ``[B, ceil(Lq / query_block), topk]`` sorted by
    descending score, -1 padded (``dsa::indexer_topk`` with ``key_block = 0``)."""
    batch, lq = q_idx.shape[:2]
    lk = k_idx.shape[1]
    rows = -(-lq // query_block)
    out = torch.full((batch, rows, topk), -1, dtype=torch.int32, device=q_idx.device)
    if lq == 0 or lk == 0:
        return out
    per_chunk = max(1, chunk_bytes // (4 * lk * max(batch, 1))) * query_block  # queries
    buffer = torch.empty((batch, -(-min(per_chunk, lq) // query_block), lk), dtype=torch.float32,
                         device=q_idx.device)
    for t0 in range(0, lq, per_chunk):
        t1 = min(lq, t0 + per_chunk)
        end = min(lk, q_offset + t1) if causal else lk
        if end <= 0:
            continue
        r0, r1 = t0 // query_block, -(-t1 // query_block)
        scores = buffer[:, : r1 - r0, :end]
        score_block(q_idx, k_idx, weights, scores, t0, t1 - t0, end, causal, q_offset, key_mask,
                    query_block, k_scale)
        found = min(topk, end)
        choice = selector(scores)
        if choice in ("cooperative", "threshold"):  # int32 indices, -1 for -inf, in place
            into = cooperative_topk_into if choice == "cooperative" else threshold_topk_into
            into(scores, found, out[:, r0:r1, :found])
            continue
        values, picked = (radix_topk(scores, found) if choice == "radix"
                          else topk_lowest_ties(scores, found))
        picked = picked.masked_fill_(torch.isneginf(values), -1)
        out[:, r0:r1, :found] = picked.to(torch.int32)
    return out

