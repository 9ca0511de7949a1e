"""Triton kernels of sparse attention: forward (prefill and split-key decode) and backward.

Reference: :mod:`.sparse_attention` (and the dense :func:`.reference.sparse_attention_reference`);
the semantics are those of ``dsa::sparse_attention``.

Work decomposition (as in FlashMLA's sparse kernels, written independently for Triton):

- One program owns ``M = QB * GB`` rows of the output: ``QB`` queries that share an index row
  (``query_block``) times ``GB`` query heads of one kv head. All rows read the same gathered K/V
  rows, so one gathered key serves ``M`` dot products (GQA/MQA: ``GB`` up to 64 heads; with
  MLA's 128 heads two programs split the group).
- The loop runs over the row's ``K`` indices in blocks of ``BK``: gather ``K[idx]`` (heads up to
  256 wide with Q loaded once; wider ones, as MLA's 576, in chunks of ``BD`` channels),
  ``S = Q K^T``, mask (-1 slots, causality, index bounds), online softmax in base 2,
  ``acc += P V[idx]``.
- Decode (few programs, long index rows): ``splits`` programs share one row's indices; each
  writes a partial (out, lse) and :func:`merge_splits` combines them by log-sum-exp.
- Backward recomputes ``P`` from the saved lse, and scatters ``dK``, ``dV`` (and ``dbias``)
  with fp32 atomics, because the same key is gathered by many rows.

Index rows must not list a key twice (the op's set semantics): :func:`unique_rows` enforces it
for indices the indexer did not produce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _program_rows(pid_row, pid_head, LQ, GROUP, QUERY_BLOCK: tl.constexpr, QB: tl.constexpr,
                  GB: tl.constexpr):
    """What a program owns: index row ``row`` (one ``QB``-query sub-tile of it), kv head
    ``kv_head``, and ``QB * GB`` output rows: query ``t`` and head ``head`` of each, and which
    exist (``row_ok``). Row m is query ``m // GB`` of the sub-tile, head ``m % GB`` of the block."""
    sub_tiles = tl.cdiv(QUERY_BLOCK, QB)
    row = pid_row // sub_tiles
    sub = pid_row % sub_tiles
    head_blocks = tl.cdiv(GROUP, GB)
    kv_head = (pid_head // head_blocks).to(tl.int64)
    head_block = pid_head % head_blocks
    m = tl.arange(0, QB * GB)
    in_tile = sub * QB + m // GB
    t = row.to(tl.int64) * QUERY_BLOCK + in_tile
    head_in_group = head_block * GB + m % GB
    head = kv_head * GROUP + head_in_group
    row_ok = (in_tile < QUERY_BLOCK) & (t < LQ) & (head_in_group < GROUP)
    return row, kv_head, t, head, row_ok


@triton.jit
def _scores_chunked(q_rows, row_ok, k_base, idx, key_ok, sq_d: tl.constexpr, sk_s,
                    sk_d: tl.constexpr, M: tl.constexpr, BK: tl.constexpr, D: tl.constexpr,
                    BD: tl.constexpr):
    """``Q K[idx]^T`` ``[M, BK]`` (fp32), ``BD`` channels at a time (Q reloaded per chunk)."""
    dd = tl.arange(0, BD)
    s = tl.zeros([M, BK], tl.float32)
    for d0 in tl.static_range(0, D, BD):
        d = d0 + dd
        qc = tl.load(q_rows[:, None] + d[None, :] * sq_d,
                     mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        kc = tl.load(k_base + idx[:, None] * sk_s + d[None, :] * sk_d,
                     mask=key_ok[:, None] & (d[None, :] < D), other=0.0)
        s += tl.dot(qc, tl.trans(kc))
    return s


@triton.jit
def _visible_with_bias(s, ok, idx, t, head, b, q_offset, BIAS, sb_b, sb_h, sb_t, sb_s,
                       CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Base-2 logits ``s`` plus the gathered bias, and which entries are visible (causality)."""
    if CAUSAL:
        ok = ok & (idx[None, :] <= q_offset + t[:, None])
    if HAS_BIAS:
        bias = tl.load(BIAS + b * sb_b + head[:, None] * sb_h + t[:, None] * sb_t
                       + idx[None, :] * sb_s, mask=ok, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return s, ok


@triton.jit
def _load_rows(ptr, b, head, t, row_ok, s_b, s_h, s_t, s_d: tl.constexpr, N: tl.constexpr,
               BN: tl.constexpr):
    """``[M, BN]`` channels of a program's output rows (query ``t``, head ``head``) of a
    ``[B, H, L, N]`` tensor, zero past ``N`` and on rows that do not exist."""
    c = tl.arange(0, BN)
    return tl.load(ptr + b * s_b + head[:, None] * s_h + t[:, None] * s_t + c[None, :] * s_d,
                   mask=row_ok[:, None] & (c[None, :] < N), other=0.0)


@triton.jit
def _gather_keys(base, idx, key_ok, s_s, s_d: tl.constexpr, N: tl.constexpr, BN: tl.constexpr):
    """``[BK, BN]`` channels of the rows ``idx`` of one kv head (zero on empty slots)."""
    c = tl.arange(0, BN)
    return tl.load(base + idx[:, None] * s_s + c[None, :] * s_d,
                   mask=key_ok[:, None] & (c[None, :] < N), other=0.0)


@triton.jit
def _row_stats(LSE, DELTA, b, head, t, row_ok, sl_b, sl_h, sl_t):
    """A backward program's rows: the base-2 lse (0 where a row saw no key), whether the row
    saw any key, and ``delta = rowsum(dO * O) - dlse``."""
    rows = b * sl_b + head * sl_h + t * sl_t
    lse = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    lse_ok = lse > float("-inf")
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    return tl.where(lse_ok, lse * 1.4426950408889634, 0.0), lse_ok, delta


@triton.jit
def _probs_and_dscores(s, do, vc, idx, key_ok, t, head, row_ok, lse2, lse_ok, delta, b,
                       q_offset, scale, BIAS, sb_b, sb_h, sb_t, sb_s, CAUSAL: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
    """From raw scores ``s = Q K^T`` ``[M, BK]``: ``P`` recomputed from the saved lse,
    ``dS = P * (dO V^T - delta)`` (fp32), and which entries are visible."""
    s, ok = _visible_with_bias(s * (scale * 1.4426950408889634),
                               row_ok[:, None] & key_ok[None, :] & lse_ok[:, None], idx, t, head,
                               b, q_offset, BIAS, sb_b, sb_h, sb_t, sb_s, CAUSAL, HAS_BIAS)
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    return p, p * (tl.dot(do, tl.trans(vc)) - delta[:, None]), ok


@triton.jit
def _slot_keys(IDX, b, row, slots, si_b, si_r, si_k: tl.constexpr, TOPK, LK):
    """The keys in ``slots`` of index row ``row`` (int64, 0 on empty slots) and which exist."""
    idx = tl.load(IDX + b * si_b + row * si_r + slots * si_k, mask=slots < TOPK,
                  other=-1).to(tl.int64)
    key_ok = (idx >= 0) & (idx < LK)
    return tl.where(key_ok, idx, 0), key_ok


@triton.jit
def _sparse_attention_fwd(
    Q, K, V, IDX, BIAS, OUT, LSE,
    sq_b, sq_h, sq_t, sq_d: tl.constexpr,
    sk_b, sk_h, sk_s, sk_d: tl.constexpr,
    sv_b, sv_h, sv_s, sv_d: tl.constexpr,
    si_b, si_r, si_k: tl.constexpr,
    sb_b, sb_h, sb_t, sb_s,
    so_b, so_h, so_t, so_x, so_d: tl.constexpr,
    sl_b, sl_h, sl_t, sl_x,
    LQ, LK, TOPK, GROUP, q_offset, qk_scale, split_len,
    QUERY_BLOCK: tl.constexpr, QB: tl.constexpr, GB: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRELOAD_Q: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SHARED_KV: tl.constexpr = False,
):
    """Grid: (rows * sub-tiles, Hkv * head blocks, B * splits). ``qk_scale`` includes log2(e).
    Innermost strides are compile-time constants (1 in practice), so the channel loads are
    known contiguous also when Inductor launches the kernel (it passes other ints at run time).

    ``PRELOAD_Q``: the program's queries are loaded once as ``D_MAIN`` (a power of two) plus
    ``D_TAIL`` (padded rest) channels; otherwise chunks of ``BD`` channels are reloaded per
    step (less register/shared memory for large D).

    ``SHARED_KV`` (with ``PRELOAD_Q`` and ``DV == D_MAIN``): ``V`` is the first ``DV`` channels of
    ``K`` (MLA's latent cache), so the gathered ``K`` tile serves as the ``V`` tile and ``V`` is
    never read; the launcher sets it only when the two tensors are that view."""
    pid_row = tl.program_id(0)
    pid_head = tl.program_id(1)
    pid_batch = tl.program_id(2)
    splits = tl.cdiv(TOPK, split_len)
    b = (pid_batch // splits).to(tl.int64)  # 64-bit offsets: B * Hkv * Lk * D passes 2^31
    split = pid_batch % splits
    k_begin = split * split_len
    k_end = k_begin + split_len

    row, kv_head, t, head, row_ok = _program_rows(pid_row, pid_head, LQ, GROUP, QUERY_BLOCK, QB,
                                                  GB)
    q_rows = Q + b * sq_b + head * sq_h + t * sq_t
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h
    idx_row = IDX + b * si_b + row * si_r
    dv = tl.arange(0, BDV)

    if PRELOAD_Q:
        dm = tl.arange(0, D_MAIN)
        q_main = tl.load(q_rows[:, None] + dm[None, :] * sq_d,
                         mask=row_ok[:, None] & (dm[None, :] < D), other=0.0)
        if D_TAIL > 0:
            dt = D_MAIN + tl.arange(0, D_TAIL)
            q_tail = tl.load(q_rows[:, None] + dt[None, :] * sq_d,
                             mask=row_ok[:, None] & (dt[None, :] < D), other=0.0)
    m_i = tl.full([QB * GB], float("-inf"), tl.float32)
    l_i = tl.zeros([QB * GB], tl.float32)
    acc = tl.zeros([QB * GB, BDV], tl.float32)
    for k0 in range(0, split_len, BK):  # bounds independent of program ids (interpreter)
        slots = k_begin + k0 + tl.arange(0, BK)
        idx = tl.load(idx_row + slots * si_k, mask=(slots < k_end) & (slots < TOPK), other=-1).to(tl.int64)
        key_ok = (idx >= 0) & (idx < LK)
        idx = tl.where(key_ok, idx, 0)
        if PRELOAD_Q:
            k_main = tl.load(k_base + idx[:, None] * sk_s + dm[None, :] * sk_d,
                             mask=key_ok[:, None] & (dm[None, :] < D), other=0.0)
            s = tl.dot(q_main, tl.trans(k_main))
            if D_TAIL > 0:
                k_tail = tl.load(k_base + idx[:, None] * sk_s + dt[None, :] * sk_d,
                                 mask=key_ok[:, None] & (dt[None, :] < D), other=0.0)
                s += tl.dot(q_tail, tl.trans(k_tail))
        else:
            s = _scores_chunked(q_rows, row_ok, k_base, idx, key_ok, sq_d, sk_s, sk_d, QB * GB, BK,
                                D, BD)
        s, ok = _visible_with_bias(s * tl.cast(qk_scale, tl.float32), row_ok[:, None] & key_ok[None, :],
                                   idx, t, head, b, q_offset, BIAS, sb_b, sb_h, sb_t, sb_s, CAUSAL,
                                   HAS_BIAS)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vc = k_main if SHARED_KV else _gather_keys(v_base, idx, key_ok, sv_s, sv_d, DV, BDV)
        acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
        m_i = m_new
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_rows = OUT + b * so_b + head * so_h + t * so_t + split * so_x
    tl.store(o_rows[:, None] + dv[None, :] * so_d, out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + b * sl_b + head * sl_h + t * sl_t + split * sl_x, lse, mask=row_ok)


@triton.jit
def sparse_attention_fwd_plugin(
    Q, K, V, IDX, BIAS,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, si_b, si_r,
    sb_b, sb_h, sb_t, sb_s, so_b, so_h, so_t, sl_b, sl_h, sl_t,
    LQ, LK, TOPK, GROUP, q_offset,
    OUT, LSE,
    QK_SCALE: tl.constexpr,
    QUERY_BLOCK: tl.constexpr, QB: tl.constexpr, GB: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRELOAD_Q: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    SHARED_KV: tl.constexpr,
):
    """:func:`_sparse_attention_fwd` in TensorRT's plugin calling convention: the input
    pointers, then the int32 scalars, then the output pointers; one split (``split_len =
    TOPK``), innermost strides 1, the scale (with log2(e)) a compile-time constant (a plugin
    attribute). Grid as :func:`sparse_attention_fwd` launches it with one split."""
    _sparse_attention_fwd(
        Q, K, V, IDX, BIAS, OUT, LSE,
        sq_b, sq_h, sq_t, 1, sk_b, sk_h, sk_s, 1, sv_b, sv_h, sv_s, 1, si_b, si_r, 1,
        sb_b, sb_h, sb_t, sb_s, so_b, so_h, so_t, 0, 1, sl_b, sl_h, sl_t, 0,
        LQ, LK, TOPK, GROUP, q_offset, QK_SCALE, TOPK,
        QUERY_BLOCK, QB, GB, D, BD, DV, BDV, BK, CAUSAL, HAS_BIAS, PRELOAD_Q, D_MAIN, D_TAIL,
        SHARED_KV,
    )


@triton.jit
def _sparse_attention_bwd(
    Q, K, V, IDX, BIAS, DO, LSE, DELTA, DQ, DK, DV, DBIAS,
    sq_b, sq_h, sq_t, sq_d: tl.constexpr,
    sk_b, sk_h, sk_s, sk_d: tl.constexpr,
    sv_b, sv_h, sv_s, sv_d: tl.constexpr,
    si_b, si_r, si_k: tl.constexpr,
    sb_b, sb_h, sb_t, sb_s,
    sdo_b, sdo_h, sdo_t, sdo_d: tl.constexpr,
    sl_b, sl_h, sl_t,
    sdq_b, sdq_h, sdq_t, sdq_d: tl.constexpr,
    sdk_b, sdk_h, sdk_s, sdk_d: tl.constexpr,
    sdv_b, sdv_h, sdv_s, sdv_d: tl.constexpr,
    sdb_b, sdb_h, sdb_t, sdb_s,
    LQ, LK, TOPK, GROUP, q_offset, scale,
    QUERY_BLOCK: tl.constexpr, QB: tl.constexpr, GB: tl.constexpr,
    D: tl.constexpr, BD: tl.constexpr, DV_: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Query-major backward. Same grid as the forward (no splits). Accumulates into fp32
    ``DQ``, ``DK``, ``DV``, ``DBIAS`` with atomics every ``BK``-key step, ``BD`` channels at a
    time (any head width). ``DELTA = rowsum(dO * O) - dlse``."""
    b = tl.program_id(2).to(tl.int64)
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    row, kv_head, t, head, row_ok = _program_rows(tl.program_id(0), tl.program_id(1), LQ, GROUP,
                                                  QUERY_BLOCK, QB, GB)
    q_rows = Q + b * sq_b + head * sq_h + t * sq_t
    dq_rows = DQ + b * sdq_b + head * sdq_h + t * sdq_t
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    lse2, lse_ok, delta = _row_stats(LSE, DELTA, b, head, t, row_ok, sl_b, sl_h, sl_t)
    do = _load_rows(DO, b, head, t, row_ok, sdo_b, sdo_h, sdo_t, sdo_d, DV_, BDV)
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h
    dk_base = DK + b * sdk_b + kv_head * sdk_h
    dv_base = DV + b * sdv_b + kv_head * sdv_h
    for k0 in range(0, TOPK, BK):
        slots = k0 + tl.arange(0, BK)
        idx, key_ok = _slot_keys(IDX, b, row, slots, si_b, si_r, si_k, TOPK, LK)
        s = _scores_chunked(q_rows, row_ok, k_base, idx, key_ok, sq_d, sk_s, sk_d, QB * GB, BK, D,
                            BD)
        vc = _gather_keys(v_base, idx, key_ok, sv_s, sv_d, DV_, BDV)
        p, ds, ok = _probs_and_dscores(s, do, vc, idx, key_ok, t, head, row_ok, lse2, lse_ok,
                                       delta, b, q_offset, scale, BIAS, sb_b, sb_h, sb_t, sb_s,
                                       CAUSAL, HAS_BIAS)
        # dV[idx] += P^T dO
        tl.atomic_add(dv_base + idx[:, None] * sdv_s + dv[None, :] * sdv_d,
                      tl.dot(tl.trans(p.to(do.dtype)), do),
                      mask=key_ok[:, None] & (dv[None, :] < DV_))
        if HAS_BIAS:
            tl.atomic_add(DBIAS + b * sdb_b + head[:, None] * sdb_h + t[:, None] * sdb_t
                          + idx[None, :] * sdb_s, ds, mask=ok)
        ds_lo = ds.to(do.dtype)
        for d0 in tl.static_range(0, D, BD):
            d = d0 + dd
            dmask = d[None, :] < D
            qc = tl.load(q_rows[:, None] + d[None, :] * sq_d, mask=row_ok[:, None] & dmask,
                         other=0.0)
            kc = tl.load(k_base + idx[:, None] * sk_s + d[None, :] * sk_d,
                         mask=key_ok[:, None] & dmask, other=0.0)
            tl.atomic_add(dq_rows[:, None] + d[None, :] * sdq_d, tl.dot(ds_lo, kc) * scale,
                          mask=row_ok[:, None] & dmask)
            tl.atomic_add(dk_base + idx[:, None] * sdk_s + d[None, :] * sdk_d,
                          tl.dot(tl.trans(ds_lo), qc) * scale, mask=key_ok[:, None] & dmask)


@triton.jit
def _sparse_attention_bwd_kv(
    Q, K, V, IDX, BIAS, DO, LSE, DELTA, DQ, DK, DV, DBIAS,
    sq_b, sq_h, sq_t, sq_d: tl.constexpr,
    sk_b, sk_h, sk_s, sk_d: tl.constexpr,
    sv_b, sv_h, sv_s, sv_d: tl.constexpr,
    si_b, si_r, si_k: tl.constexpr,
    sb_b, sb_h, sb_t, sb_s,
    sdo_b, sdo_h, sdo_t, sdo_d: tl.constexpr,
    sl_b, sl_h, sl_t,
    sdq_b, sdq_h, sdq_t, sdq_d: tl.constexpr,
    sdk_b, sdk_h, sdk_s, sdk_d: tl.constexpr,
    sdv_b, sdv_h, sdv_s, sdv_d: tl.constexpr,
    sdb_b, sdb_h, sdb_t, sdb_s,
    LQ, LK, TOPK, GROUP, q_offset, scale,
    QUERY_BLOCK: tl.constexpr, QB: tl.constexpr, GB: tl.constexpr,
    D: tl.constexpr, BDK: tl.constexpr, DV_: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_DQ: tl.constexpr,
):
    """Key-major backward. Grid: (index rows, Hkv * slot blocks, B).

    A program owns ``BN`` slots of one index row (their keys gathered once) and walks all the
    row's ``QUERY_BLOCK x GROUP`` query rows in chunks of ``QB * GB``, summing the keys' dK / dV
    in registers: one fp32 atomic add per key and index row, where the query-major kernel makes
    one per key and ``QB * GB`` rows. ``WITH_DQ``: dQ by atomics here (otherwise
    :func:`_sparse_attention_bwd_q` computes it). ``DELTA`` as in :func:`_sparse_attention_bwd`."""
    row = tl.program_id(0)
    pid_head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    slot_blocks = tl.cdiv(TOPK, BN)
    kv_head = (pid_head // slot_blocks).to(tl.int64)
    slots = (pid_head % slot_blocks) * BN + tl.arange(0, BN)
    idx, key_ok = _slot_keys(IDX, b, row, slots, si_b, si_r, si_k, TOPK, LK)
    dd = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kc = _gather_keys(K + b * sk_b + kv_head * sk_h, idx, key_ok, sk_s, sk_d, D, BDK)
    vc = _gather_keys(V + b * sv_b + kv_head * sv_h, idx, key_ok, sv_s, sv_d, DV_, BDV)
    dk_acc = tl.zeros([BN, BDK], tl.float32)
    dv_acc = tl.zeros([BN, BDV], tl.float32)
    sub_tiles = tl.cdiv(QUERY_BLOCK, QB)
    head_blocks = tl.cdiv(GROUP, GB)
    for chunk in range(0, sub_tiles * head_blocks):
        _, _, t, head, row_ok = _program_rows(row * sub_tiles + chunk // head_blocks,
                                              kv_head * head_blocks + chunk % head_blocks, LQ,
                                              GROUP, QUERY_BLOCK, QB, GB)
        qc = _load_rows(Q, b, head, t, row_ok, sq_b, sq_h, sq_t, sq_d, D, BDK)
        do = _load_rows(DO, b, head, t, row_ok, sdo_b, sdo_h, sdo_t, sdo_d, DV_, BDV)
        lse2, lse_ok, delta = _row_stats(LSE, DELTA, b, head, t, row_ok, sl_b, sl_h, sl_t)
        p, ds, ok = _probs_and_dscores(tl.dot(qc, tl.trans(kc)), do, vc, idx, key_ok, t, head,
                                       row_ok, lse2, lse_ok, delta, b, q_offset, scale, BIAS,
                                       sb_b, sb_h, sb_t, sb_s, CAUSAL, HAS_BIAS)
        dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do)
        if HAS_BIAS:
            tl.atomic_add(DBIAS + b * sdb_b + head[:, None] * sdb_h + t[:, None] * sdb_t
                          + idx[None, :] * sdb_s, ds, mask=ok)
        ds_lo = ds.to(do.dtype)
        dk_acc += tl.dot(tl.trans(ds_lo), qc)
        if WITH_DQ:
            tl.atomic_add(DQ + b * sdq_b + head[:, None] * sdq_h + t[:, None] * sdq_t
                          + dd[None, :] * sdq_d, tl.dot(ds_lo, kc) * scale,
                          mask=row_ok[:, None] & (dd[None, :] < D))
    tl.atomic_add(DK + b * sdk_b + kv_head * sdk_h + idx[:, None] * sdk_s + dd[None, :] * sdk_d,
                  dk_acc * scale, mask=key_ok[:, None] & (dd[None, :] < D))
    tl.atomic_add(DV + b * sdv_b + kv_head * sdv_h + idx[:, None] * sdv_s + dv[None, :] * sdv_d,
                  dv_acc, mask=key_ok[:, None] & (dv[None, :] < DV_))


@triton.jit
def _sparse_attention_bwd_q(
    Q, K, V, IDX, BIAS, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_t, sq_d: tl.constexpr,
    sk_b, sk_h, sk_s, sk_d: tl.constexpr,
    sv_b, sv_h, sv_s, sv_d: tl.constexpr,
    si_b, si_r, si_k: tl.constexpr,
    sb_b, sb_h, sb_t, sb_s,
    sdo_b, sdo_h, sdo_t, sdo_d: tl.constexpr,
    sl_b, sl_h, sl_t,
    sdq_b, sdq_h, sdq_t, sdq_d: tl.constexpr,
    LQ, LK, TOPK, GROUP, q_offset, scale,
    QUERY_BLOCK: tl.constexpr, QB: tl.constexpr, GB: tl.constexpr,
    D: tl.constexpr, BDK: tl.constexpr, DV_: tl.constexpr, BDV: tl.constexpr, BK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """dQ alone, query-major, in registers (no atomics): the forward's grid and rows; each
    program walks its index row in ``BK``-key steps and stores its rows' dQ once (``DQ``'s
    dtype). ``DELTA`` as in :func:`_sparse_attention_bwd`."""
    b = tl.program_id(2).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    row, kv_head, t, head, row_ok = _program_rows(tl.program_id(0), tl.program_id(1), LQ, GROUP,
                                                  QUERY_BLOCK, QB, GB)
    dd = tl.arange(0, BDK)
    qc = _load_rows(Q, b, head, t, row_ok, sq_b, sq_h, sq_t, sq_d, D, BDK)
    do = _load_rows(DO, b, head, t, row_ok, sdo_b, sdo_h, sdo_t, sdo_d, DV_, BDV)
    lse2, lse_ok, delta = _row_stats(LSE, DELTA, b, head, t, row_ok, sl_b, sl_h, sl_t)
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h
    dq = tl.zeros([QB * GB, BDK], tl.float32)
    for k0 in range(0, TOPK, BK):
        idx, key_ok = _slot_keys(IDX, b, row, tl.arange(0, BK) + k0, si_b, si_r, si_k, TOPK, LK)
        kc = _gather_keys(k_base, idx, key_ok, sk_s, sk_d, D, BDK)
        vc = _gather_keys(v_base, idx, key_ok, sv_s, sv_d, DV_, BDV)
        _, ds, _ = _probs_and_dscores(tl.dot(qc, tl.trans(kc)), do, vc, idx, key_ok, t, head,
                                      row_ok, lse2, lse_ok, delta, b, q_offset, scale, BIAS,
                                      sb_b, sb_h, sb_t, sb_s, CAUSAL, HAS_BIAS)
        dq += tl.dot(ds.to(kc.dtype), kc)
    tl.store(DQ + b * sdq_b + head[:, None] * sdq_h + t[:, None] * sdq_t + dd[None, :] * sdq_d,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (dd[None, :] < D))


# ---------------------------------------------------------------------------------------------
# Launch helpers


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


class Tiling:
    """Block sizes of one call: ``QB`` queries x ``GB`` heads per program, ``BK`` keys per step,
    ``BD``/``BDV`` channels per chunk."""

    def __init__(self, group: int, query_block: int, dim: int, dim_v: int, rows_target: int = 64,
                 block_k: int | None = None) -> None:
        self.GB = min(triton.next_power_of_2(group), rows_target)
        qb = max(1, rows_target // self.GB)
        self.QB = min(triton.next_power_of_2(query_block), qb)
        if self.QB * self.GB < 16:  # tl.dot needs at least 16 rows
            self.GB = 16 // self.QB
        self.BD = min(64, _pow2(dim))
        self.BDV = _pow2(dim_v)
        # Large heads (MLA: 576/512) need short key steps to fit shared memory (measured on
        # H200: BK=64 asks for 352 KB; BK=32 fits and runs at 171 TFLOP/s).
        self.BK = block_k or (32 if self.BDV >= 256 or dim > 256 else 64)
        self.head_blocks = triton.cdiv(group, self.GB)
        self.sub_tiles = triton.cdiv(query_block, self.QB)


def split_channels(dim: int) -> tuple[int, int]:
    """``dim`` as a power of two plus a padded rest (576 -> 512 + 64, 80 -> 64 + 16)."""
    main = 1 << (int(dim).bit_length() - 1)
    main = max(main, 16)
    rest = dim - main
    return main, (_pow2(rest) if rest > 0 else 0)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    if t is None:
        return (0, 0, 0, 0)
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride(), t.shape, strict=True))


# Read V from the gathered K tile when ``v`` is ``k[..., :Dv]`` with ``Dv`` the power-of-two
# part of ``D`` (MLA's latent cache: 576 = 512 + 64). Compiled for sm_90 it keeps Q in shared
# memory and gathers one 576-wide tile a key step (148 KB, no spills) where the default
# reloads Q's 64-channel chunks every step and gathers K and V apart (213 KB). Off until timed
# on a GPU (``benchmarks/gpu_check.py --only mla``, variant ``{'shared_kv': True}``).
SHARED_KV_VIEWS = False


def is_channel_prefix(v: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``v`` is ``k[..., :Dv]``: the same storage, start and strides, fewer channels
    (MLA's value is the first 512 channels of its 576-channel latent key)."""
    return (v.device == k.device and v.dtype == k.dtype and v.data_ptr() == k.data_ptr()
            and v.shape[:-1] == k.shape[:-1] and v.stride() == k.stride()
            and v.shape[-1] <= k.shape[-1])


def choose_splits(programs: int, topk: int, block_k: int, device: torch.device) -> int:
    """How many programs share one index row: enough programs to fill the GPU (decode)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms // 4:
        return 1
    splits = min(triton.cdiv(sms, programs), triton.cdiv(topk, 4 * block_k))
    return max(1, splits)


@triton.jit
def _merge_splits_kernel(PART, PLSE, OUT, LSE, SPLITS, DV, SP: tl.constexpr, BDV: tl.constexpr):
    """One program per output row: ``out = sum_s exp(lse_s - lse) * part_s`` with
    ``lse = logsumexp_s(lse_s)``; rows without keys get 0 and -inf."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    d = tl.arange(0, BDV)
    lse_s = tl.load(PLSE + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(lse_s, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse_s - top_safe)
    total = tl.sum(w, axis=0)
    part = tl.load(PART + (row * SPLITS + s[:, None]) * DV + d[None, :],
                   mask=(s[:, None] < SPLITS) & (d[None, :] < DV), other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + row * DV + d, out.to(OUT.dtype.element_ty), mask=d < DV)
    lse = tl.where(total > 0, top_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(LSE + row, lse)


def merge_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype,
                 launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial results ``out [B, H, Lq, S, Dv]`` (fp32, contiguous), ``lse [B, H, Lq,
    S]`` by log-sum-exp into ``([B, H, Lq, Dv] dtype, [B, H, Lq] fp32)`` in one launch."""
    batch, heads, lq, splits, dim_v = out.shape
    merged = out.new_empty((batch, heads, lq, dim_v), dtype=dtype)
    total = lse.new_empty((batch, heads, lq))
    kernel = launch(_merge_splits_kernel) if launch is not None else _merge_splits_kernel
    kernel[(batch * heads * lq,)](out, lse, merged, total, splits, dim_v,
                                  SP=_pow2(splits, 2), BDV=_pow2(dim_v))
    return merged, total


def forward_config(group: int, query_block: int, dim: int, dim_v: int, causal: bool,
                   has_bias: bool, tuning: dict | None = None) -> tuple[Tiling, dict]:
    """The tiling and the compile-time arguments (constexprs, warps, stages) of the forward
    kernel for one call; shared by the launch and by ahead-of-time compilation."""
    tuning = tuning or {}
    tiling = Tiling(group, query_block, dim, dim_v, tuning.get("rows_target", 64),
                    tuning.get("block_k"))
    big = tiling.BDV >= 256 or dim > 256
    d_main, d_tail = split_channels(dim)
    shared_kv = bool(tuning.get("shared_kv", False))
    if shared_kv and dim_v != d_main:
        raise ValueError(f"shared_kv reads V as the first {d_main} channels of K (dim {dim}); "
                         f"dim_v is {dim_v}")
    meta = dict(
        QUERY_BLOCK=query_block, QB=tiling.QB, GB=tiling.GB, D=dim, BD=tiling.BD, DV=dim_v,
        BDV=tiling.BDV, BK=tiling.BK, CAUSAL=causal, HAS_BIAS=has_bias,
        PRELOAD_Q=shared_kv or tuning.get("preload_q", dim <= 256), D_MAIN=d_main, D_TAIL=d_tail,
        SHARED_KV=shared_kv,
        num_warps=tuning.get("num_warps", 8 if big else 4), num_stages=tuning.get("num_stages", 2),
    )
    return tiling, meta


def sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    causal: bool,
    q_offset: int,
    query_block: int,
    launch=None,
    splits: int | None = None,
    tuning: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Lq, Dv], lse fp32 [B, H, Lq])`` with the Triton kernel (see module docs).

    ``launch`` wraps the kernel (``torch.library.wrap_triton`` under torch.compile); ``splits``
    overrides the split-key count (decode); ``tuning`` overrides ``rows_target``, ``block_k``,
    ``num_warps``, ``num_stages``, ``preload_q``, ``shared_kv`` (benchmarks; without it, V is
    read from the K tile when :data:`SHARED_KV_VIEWS` and ``v`` is ``k[..., :Dv]``). Indices must
    be unique per row.
    """
    batch, heads, lq, dim = q.shape
    kv_heads, lk, dim_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads // kv_heads
    rows, topk = indices.shape[1], indices.shape[2]
    tuning = dict(tuning or {})
    # Aliasing is a fact of real tensors only: traced launches (``launch``) read V apart.
    if "shared_kv" not in tuning:
        tuning["shared_kv"] = (SHARED_KV_VIEWS and launch is None
                               and dim_v == split_channels(dim)[0] and is_channel_prefix(v, k))
    elif tuning["shared_kv"] and (launch is not None or not is_channel_prefix(v, k)):
        raise ValueError("shared_kv needs v to be k[..., :dim_v] (the same storage and strides) "
                         "in a direct launch")
    tiling, meta = forward_config(group, query_block, dim, dim_v, causal, bias is not None, tuning)
    grid0 = rows * tiling.sub_tiles
    grid1 = kv_heads * tiling.head_blocks
    if splits is None:
        programs = grid0 * grid1 * batch
        static = all(isinstance(n, int) for n in (programs, topk))  # SymInts: no guard on them
        splits = choose_splits(programs, topk, tiling.BK, q.device) if static else 1
    split_len = max(tiling.BK, triton.cdiv(triton.cdiv(max(topk, 1), splits), tiling.BK) * tiling.BK)
    splits = triton.cdiv(max(topk, 1), split_len)
    if splits > 1:
        out = q.new_empty((batch, heads, lq, splits, dim_v), dtype=torch.float32)
        lse = q.new_empty((batch, heads, lq, splits), dtype=torch.float32)
        so, sl = out.stride(), lse.stride()
        so_args = (so[0], so[1], so[2], so[3], so[4])
        sl_args = (sl[0], sl[1], sl[2], sl[3])
    else:
        split_len = max(topk, 1)
        out = q.new_empty((batch, heads, lq, dim_v))
        lse = q.new_empty((batch, heads, lq), dtype=torch.float32)
        so, sl = out.stride(), lse.stride()
        so_args = (so[0], so[1], so[2], 0, so[3])
        sl_args = (sl[0], sl[1], sl[2], 0)
    kernel = launch(_sparse_attention_fwd) if launch is not None else _sparse_attention_fwd
    kernel[(grid0, grid1, batch * splits)](
        q, k, v, indices, bias if bias is not None else q, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *_strides4(bias),
        *so_args, *sl_args,
        lq, lk, topk, group, q_offset, scale * LOG2E, split_len, **meta,
    )
    if splits > 1:
        return merge_splits(out, lse, q.dtype, launch)
    return out, lse


BACKWARD_MODES = ("query_major", "key_major", "key_major_split")
# The work decomposition of the backward on CUDA. Timed on an H200 (BENCHMARKS.md, run 6: Llama-8B
# shapes, 32K, top-2048, tiles of 64): query_major 121 ms, key_major 70 ms, key_major_split
# 42 ms, SDPA flash's backward 69 ms (``benchmarks/gpu_check.py --only backward``).
BACKWARD_MODE = "key_major_split"
KEY_MAJOR_MAX_DIM = 256  # dK / dV of a slot block live in registers: heads up to 256 wide


def backward_mode(dim: int, dim_v: int, tuning: dict | None = None) -> str:
    """Which backward runs: ``tuning["mode"]``, else :data:`BACKWARD_MODE`.

    - ``query_major``: a program owns query rows and adds dQ, dK, dV with fp32 atomics per
      ``BK``-key step (:func:`_sparse_attention_bwd`; any head width, MLA included);
    - ``key_major``: a program owns a block of an index row's slots and sums their dK / dV over
      the row's queries in registers (:func:`_sparse_attention_bwd_kv`); dQ by atomics;
    - ``key_major_split``: as ``key_major`` for dK / dV, and dQ from its own query-major kernel
      without atomics (:func:`_sparse_attention_bwd_q`), at the price of recomputing P and dP.

    Key-major modes need ``max(dim, dim_v) <= 256``: asked for explicitly with wider heads they
    are an error; as the module default such calls fall back to ``query_major``."""
    explicit = (tuning or {}).get("mode")
    mode = explicit or BACKWARD_MODE
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode {mode!r}: expected one of {BACKWARD_MODES}")
    if mode != "query_major" and max(dim, dim_v) > KEY_MAJOR_MAX_DIM:
        if explicit:
            raise ValueError(f"backward mode {mode!r} keeps a key block's dK / dV in registers: "
                             f"heads up to {KEY_MAJOR_MAX_DIM} wide, got {dim} / {dim_v}")
        return "query_major"
    return mode


def backward_config(group: int, query_block: int, dim: int, dim_v: int, causal: bool,
                    has_bias: bool, tuning: dict | None = None) -> tuple[Tiling, dict]:
    """The query-major backward kernel's tiling and launch constants (what
    :func:`sparse_attention_bwd` launches; the ahead-of-time check compiles the same).
    ``tuning``: ``rows_target`` (query x head rows a program owns; more rows sum more of a key's
    dK / dV before its one atomic add per program), ``block_k``, ``num_warps``."""
    tuning = tuning or {}
    tiling = Tiling(group, query_block, dim, dim_v, tuning.get("rows_target", 32),
                    tuning.get("block_k"))
    meta = dict(QUERY_BLOCK=query_block, QB=tiling.QB, GB=tiling.GB, D=dim, BD=tiling.BD,
                DV_=dim_v, BDV=tiling.BDV, BK=tiling.BK, CAUSAL=causal, HAS_BIAS=has_bias,
                num_warps=tuning.get("num_warps", 4), num_stages=1)
    return tiling, meta


def backward_kv_config(group: int, query_block: int, dim: int, dim_v: int, causal: bool,
                       has_bias: bool, with_dq: bool, tuning: dict | None = None
                       ) -> tuple[Tiling, dict]:
    """The key-major kernel's constants: ``rows_target`` query x head rows a step (default
    64), ``block_n`` slots a program (default 64), ``num_warps`` (default 4), ``num_stages``.
    The defaults are the fastest timed on an H200 (BENCHMARKS.md, run 7: Llama-8B shapes, 32K,
    tiles of 64: 28.9 ms with the dQ kernel's defaults; 41.2 ms at 32 rows and 8 warps)."""
    tuning = tuning or {}
    tiling = Tiling(group, query_block, dim, dim_v, tuning.get("rows_target", 64))
    meta = dict(QUERY_BLOCK=query_block, QB=tiling.QB, GB=tiling.GB, D=dim, BDK=_pow2(dim),
                DV_=dim_v, BDV=tiling.BDV, BN=tuning.get("block_n", 64), CAUSAL=causal,
                HAS_BIAS=has_bias, WITH_DQ=with_dq, num_warps=tuning.get("num_warps", 4),
                num_stages=tuning.get("num_stages", 1))
    return tiling, meta


def backward_q_config(group: int, query_block: int, dim: int, dim_v: int, causal: bool,
                      has_bias: bool, tuning: dict | None = None) -> tuple[Tiling, dict]:
    """The dQ kernel's constants (``key_major_split``): ``dq_rows_target`` (default 64),
    ``dq_block_k`` (default 64: 30.3 vs 31.8 ms for 32 on an H200, run 7), ``dq_num_warps``,
    ``dq_num_stages``."""
    tuning = tuning or {}
    tiling = Tiling(group, query_block, dim, dim_v, tuning.get("dq_rows_target", 64),
                    tuning.get("dq_block_k", 64))
    meta = dict(QUERY_BLOCK=query_block, QB=tiling.QB, GB=tiling.GB, D=dim, BDK=_pow2(dim),
                DV_=dim_v, BDV=tiling.BDV, BK=tiling.BK, CAUSAL=causal, HAS_BIAS=has_bias,
                num_warps=tuning.get("dq_num_warps", 4),
                num_stages=tuning.get("dq_num_stages", 2))
    return tiling, meta


def sparse_attention_bwd(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    causal: bool,
    q_offset: int,
    query_block: int,
    launch=None,
    tuning: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, dbias)`` of :func:`sparse_attention_fwd` (dbias None without bias);
    ``tuning``: ``mode`` (:func:`backward_mode`) and that mode's constants (benchmarks)."""
    dim, dim_v = q.shape[3], v.shape[3]
    mode = backward_mode(dim, dim_v, tuning)
    tuning = {key: value for key, value in (tuning or {}).items() if key != "mode"}
    delta = (grad_out.float() * out.float()).sum(-1)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if bias is not None \
        else None
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    args = (q, k, v, indices, lse.contiguous(), scale, bias, causal, q_offset, query_block,
            launch, tuning)
    if mode == "query_major":
        dq = _backward_query_major(grad_out, delta.contiguous(), dk, dv, dbias, *args)
    else:
        dq = _backward_key_major(grad_out, delta.contiguous(), dk, dv, dbias,
                                 mode == "key_major_split", *args)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            dbias.to(bias.dtype) if dbias is not None else None)


def _backward_query_major(grad_out, delta, dk, dv, dbias, q, k, v, indices, lse, scale, bias,
                          causal, q_offset, query_block, launch, tuning) -> torch.Tensor:
    """Launches :func:`_sparse_attention_bwd` (``delta`` includes the lse gradient); returns dQ
    (fp32), fills ``dk``, ``dv``, ``dbias``."""
    batch, heads, lq, dim = q.shape
    kv_heads, lk, dim_v = k.shape[1], k.shape[2], v.shape[3]
    rows, topk = indices.shape[1], indices.shape[2]
    tiling, meta = backward_config(heads // kv_heads, query_block, dim, dim_v, causal,
                                   bias is not None, tuning)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kernel = launch(_sparse_attention_bwd) if launch is not None else _sparse_attention_bwd
    kernel[(rows * tiling.sub_tiles, kv_heads * tiling.head_blocks, batch)](
        q, k, v, indices, bias if bias is not None else q, grad_out, lse, delta,
        dq, dk, dv, dbias if dbias is not None else dq,
        *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *_strides4(bias),
        *grad_out.stride(), *lse.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        *_strides4(dbias),
        lq, lk, topk, heads // kv_heads, q_offset, scale, **meta,
    )
    return dq


def _backward_key_major(grad_out, delta, dk, dv, dbias, split_dq, q, k, v, indices, lse, scale,
                        bias, causal, q_offset, query_block, launch, tuning) -> torch.Tensor:
    """Launches :func:`_sparse_attention_bwd_kv` (and :func:`_sparse_attention_bwd_q` when
    ``split_dq``); ``delta`` already includes the lse gradient. Returns dQ."""
    batch, heads, lq, dim = q.shape
    kv_heads, lk, dim_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads // kv_heads
    rows, topk = indices.shape[1], indices.shape[2]
    dq = q.new_empty(q.shape) if split_dq else torch.zeros(q.shape, dtype=torch.float32,
                                                           device=q.device)
    common = (*q.stride(), *k.stride(), *v.stride(), *indices.stride(), *_strides4(bias),
              *grad_out.stride(), *lse.stride(), *dq.stride())
    bias_arg = bias if bias is not None else q
    _, meta = backward_kv_config(group, query_block, dim, dim_v, causal, bias is not None,
                                 not split_dq, tuning)
    slot_blocks = triton.cdiv(topk, meta["BN"])
    if slot_blocks > 0:
        kernel = launch(_sparse_attention_bwd_kv) if launch is not None \
            else _sparse_attention_bwd_kv
        kernel[(rows, kv_heads * slot_blocks, batch)](
            q, k, v, indices, bias_arg, grad_out, lse, delta, dq, dk, dv,
            dbias if dbias is not None else dk,
            *common, *dk.stride(), *dv.stride(), *_strides4(dbias),
            lq, lk, topk, group, q_offset, scale, **meta,
        )
    if split_dq:
        tiling, meta = backward_q_config(group, query_block, dim, dim_v, causal, bias is not None,
                                         tuning)
        kernel = launch(_sparse_attention_bwd_q) if launch is not None else _sparse_attention_bwd_q
        kernel[(rows * tiling.sub_tiles, kv_heads * tiling.head_blocks, batch)](
            q, k, v, indices, bias_arg, grad_out, lse, delta, dq, *common,
            lq, lk, topk, group, q_offset, scale, **meta,
        )
    return dq


def unique_rows(indices: torch.Tensor) -> torch.Tensor:
    """Index rows with repeated keys reduced to one entry each (later copies become -1).

    ``[B, rows, K]`` -> same shape and dtype; the order of the row changes (sorted)."""
    ordered, _ = torch.sort(indices, dim=-1)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return ordered.masked_fill(repeat, -1)


def attention_flops(batch: int, heads: int, lq: int, selected: int, dim: int, dim_v: int) -> float:
    """Useful FLOPs of attention over ``selected`` keys per query (QK^T and PV)."""
    return 2.0 * batch * heads * lq * selected * (dim + dim_v)

