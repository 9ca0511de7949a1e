"""Memory-bounded implementation of sparse attention (forward and backward; any device).

For a chunk of index rows, the union of the keys they list (``cols``, sorted) is gathered once
per kv head; every query of the chunk attends over that union, masked to its own row and to
causality. With tile-shared rows (``query_block > 1``) the union is the tile's own selection,
so the work is dense attention over a gathered tile (PyTorch's fused CPU flash kernel, see
:mod:`.torch_compat`); with per-query rows, neighbouring queries usually select overlapping
keys, which keeps the union small. Extra memory is O(H * chunk * S + Hkv * S * D), bounded by
the chunk size, never O(Lq * Lk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunking import Chunk, iter_chunks, row_columns, rows_per_chunk, rows_to_queries
from .torch_compat import attention_with_lse

NEG_INF = float("-inf")


@dataclass
class _ChunkPlan:
    """What a chunk attends to. Columns ``cols[:split]`` are allowed for every query of the
    chunk; ``tail`` (bool ``[Cq, S - split]``, None = all) says which queries may attend the
    rest. Causality alone only restricts the columns past the chunk's first query, at most a
    tile's worth, so most of the work needs no mask at all."""

    cols: torch.Tensor  # int64 [S]
    split: int
    tail: torch.Tensor | None


def _plan(indices: torch.Tensor, b: int, ch: Chunk, causal: bool, q_offset: int,
          query_block: int) -> _ChunkPlan | None:
    cols, member = row_columns(indices[b, ch.r0 : ch.r1])
    if cols.numel() == 0:
        return None
    allowed = None
    if member.shape[0] > 1 and not bool(member.all()):  # rows of the chunk differ
        allowed = rows_to_queries(member, query_block, ch.queries)
    split = 0 if allowed is not None else cols.numel()
    if causal:
        if allowed is None:
            split = int(torch.searchsorted(cols, q_offset + ch.t0, right=True))
        last = torch.arange(ch.t0, ch.t1, device=cols.device)[:, None] + q_offset
        visible = cols[None, split:] <= last
        allowed = visible if allowed is None else allowed & visible
    return _ChunkPlan(cols, split, allowed)


def _additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """0 where allowed, -inf elsewhere (one add pass is much cheaper than a broadcast masked_fill)."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, NEG_INF)


def _chunk_mask(plan: _ChunkPlan, bias: torch.Tensor | None, b: int, ch: Chunk,
                heads: int) -> torch.Tensor:
    """The full additive mask of a chunk, ``[H or 1, Cq, S]``: bias plus -inf where not allowed."""
    width = plan.cols.numel()
    mask = torch.zeros(heads if bias is not None else 1, ch.queries, width, device=plan.cols.device)
    if plan.tail is not None:
        mask[..., plan.split :] += _additive_mask(plan.tail)
    if bias is not None:
        mask += _bias_chunk(bias, b, ch, plan.cols)
    return mask


def _bias_chunk(bias: torch.Tensor, b: int, ch: Chunk, cols: torch.Tensor) -> torch.Tensor:
    """The bias values of a chunk at its selected columns: ``[Hb, Cq or 1, S]`` (fp32)."""
    bb = bias[b if bias.shape[0] > 1 else 0]
    rows = bb[:, ch.t0 : ch.t1] if bias.shape[2] > 1 else bb
    return (rows.index_select(-1, cols) if bias.shape[3] > 1 else rows).float()


def _gather(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, ch: Chunk, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``q [Hkv, G * Cq, D]`` (rows ordered (g, t): head h = hkv * G + g), ``k [Hkv, S, D]``,
    ``v [Hkv, S, Dv]``."""
    heads, kv_heads = q.shape[1], k.shape[1]
    qc = q[b, :, ch.t0 : ch.t1].float().reshape(kv_heads, heads // kv_heads * ch.queries, -1)
    rows = (torch.arange(kv_heads, device=cols.device) * k.shape[2])[:, None] + cols
    return qc, _gather_rows(k[b], rows).float(), _gather_rows(v[b], rows).float()


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x [Hkv, L, D]`` (contiguous) at ``rows [Hkv, S]`` (flat row numbers ``h * L + s``)
    -> ``[Hkv, S, D]``: one gather of whole rows, several times faster than
    ``index_select`` along the middle dim."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows.flatten()).view(*rows.shape, -1)


def _per_group(mask: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """``[H or 1, Cq, S]`` -> ``[Hkv or 1, G * Cq, S]``, matching :func:`_gather`'s row order."""
    if mask.shape[0] == 1:
        return mask.repeat(1, group, 1)
    return mask.reshape(kv_heads, group * mask.shape[1], mask.shape[2])


def _merge(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combines attention over two disjoint key sets from their outputs and log-sum-exps."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    safe = _safe(lse)
    weight_a = torch.exp(lse_a - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse


def _safe(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf (rows without keys) replaced by 0, so ``exp(s - lse)`` is 0, not NaN."""
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def _per_chunk(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, query_block: int) -> int:
    """Rows per chunk: one tile for tile-shared rows, else ~32 queries within the budget."""
    heads, lk = q.shape[1], k.shape[2]
    rows = max(1, 32 // query_block)
    width = min(lk, indices.shape[-1] * rows)
    return min(rows, rows_per_chunk(query_block, 2 * heads * max(width, 1)))


def _forward_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan, scale: float,
    bias: torch.Tensor | None, b: int, ch: Chunk,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [Hkv, G * Cq, Dv], lse [Hkv, G * Cq])`` of one chunk.

    Without bias, the columns every query may see run unmasked and the causal tail with its
    small mask, merged by log-sum-exp; with bias, one call takes the full additive mask.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    qc, kc, vc = _gather(q, k, v, b, ch, plan.cols)
    qc, kc, vc = qc[None], kc[None], vc[None]  # the fused kernel wants [B, h, M, D]
    if bias is not None:
        mask = _per_group(_chunk_mask(plan, bias, b, ch, heads), kv_heads, group)
        out, lse = attention_with_lse(qc, kc, vc, mask, scale)
        return out[0], lse[0]
    head = tail = None
    if plan.split > 0:
        head = attention_with_lse(qc, kc[:, :, : plan.split], vc[:, :, : plan.split], None, scale)
    if plan.tail is not None:
        tail_mask = _per_group(_additive_mask(plan.tail)[None], kv_heads, group)
        tail = attention_with_lse(
            qc, kc[:, :, plan.split :], vc[:, :, plan.split :], tail_mask, scale
        )
    out, lse = _merge(head, tail) if head is not None and tail is not None else (head or tail)
    return out[0], lse[0]


def sparse_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    causal: bool,
    q_offset: int,
    query_block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Lq, Dv] in q's dtype, lse fp32 [B, H, Lq])``; see ``dsa::sparse_attention``."""
    # Models hand over transposed views ([B, L, H, D] memory); gathering key rows from those is
    # a strided copy several times slower than from contiguous memory: copy k, v once instead
    # (q is copied chunk by chunk anyway).
    k, v = k.contiguous(), v.contiguous()
    batch, heads, lq, _ = q.shape
    dv = v.shape[3]
    out = torch.zeros(batch, heads, lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, heads, lq), NEG_INF, dtype=torch.float32, device=q.device)
    per_chunk = _per_chunk(q, k, indices, query_block)
    for b in range(batch):
        for ch in iter_chunks(lq, query_block, per_chunk):
            plan = _plan(indices, b, ch, causal, q_offset, query_block)
            if plan is None:
                continue
            o, row_lse = _forward_chunk(q, k, v, plan, scale, bias, b, ch)
            out[b, :, ch.t0 : ch.t1] = o.reshape(heads, ch.queries, dv)
            lse[b, :, ch.t0 : ch.t1] = row_lse.reshape(heads, ch.queries)
    return out, lse


class _Scratch:
    """A reusable fp32 buffer for the chunk scores: reallocating ~16 MiB per chunk costs as
    much as a third of the GEMM that fills it (page faults), so chunks share one."""

    def __init__(self, device: torch.device) -> None:
        self.buffer = torch.empty(0, dtype=torch.float32, device=device)

    def take(self, *shape: int) -> torch.Tensor:
        size = math.prod(shape)
        if self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=torch.float32, device=self.buffer.device)
        return self.buffer[:size].view(shape)


def sparse_attention_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. ``q, k, v`` (and ``bias``, in bias's broadcast shape), recomputing ``p``.

    With ``ds = p * (dp - delta + grad_lse)`` (``delta = rowsum(dO * O)``):
    ``dv = p^T dO``, ``dq = scale * ds K``, ``dk = scale * ds^T Q``, ``dbias = ds``.
    """
    k, v = k.contiguous(), v.contiguous()  # see sparse_attention_forward
    batch, heads, lq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if bias is not None else None
    delta = (grad_out.float() * out.float()).sum(dim=-1)  # [B, H, Lq]
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    per_chunk = _per_chunk(q, k, indices, query_block)
    scratch = _Scratch(q.device)
    for b in range(batch):
        for ch in iter_chunks(lq, query_block, per_chunk):
            plan = _plan(indices, b, ch, causal, q_offset, query_block)
            if plan is None:
                continue
            qc, kc, vc = _gather(q, k, v, b, ch, plan.cols)
            qc = qc * scale  # a copy: qc may be a view of the caller's q
            scores = scratch.take(kv_heads, group * ch.queries, plan.cols.numel())
            torch.bmm(qc, kc.transpose(1, 2), out=scores)
            scores = scores.view(heads, ch.queries, -1)
            if plan.tail is not None or bias is not None:
                scores += _chunk_mask(plan, bias, b, ch, heads)
            rows = slice(ch.t0, ch.t1)
            probs = scores.sub_(_safe(lse[b, :, rows]).unsqueeze(-1)).exp_()  # [H, Cq, S]
            p3 = probs.view(kv_heads, group * ch.queries, -1)
            do = grad_out[b, :, rows].float().reshape(kv_heads, group * ch.queries, -1)
            dv[b].index_add_(1, plan.cols, torch.bmm(p3.transpose(1, 2), do))
            dp = torch.bmm(do, vc.transpose(1, 2)).view(heads, ch.queries, -1)
            ds = probs.mul_(dp.sub_(delta[b, :, rows].unsqueeze(-1)))  # reuses probs' memory
            if dbias is not None:
                _accumulate_bias_grad(dbias, ds, b, ch, plan.cols)
            ds3 = ds.view(kv_heads, group * ch.queries, -1)
            dq[b, :, rows] = torch.bmm(ds3, kc).mul_(scale).view(heads, ch.queries, dim)
            dk[b].index_add_(1, plan.cols, torch.bmm(ds3.transpose(1, 2), qc))
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
    return (*grads, dbias.to(bias.dtype) if dbias is not None else None)


def _accumulate_bias_grad(
    dbias: torch.Tensor, ds: torch.Tensor, b: int, ch: Chunk, cols: torch.Tensor
) -> None:
    """Adds ``ds [H, Cq, S]`` into ``dbias`` (bias's broadcast shape) at the chunk's columns."""
    if dbias.shape[1] == 1:
        ds = ds.sum(dim=0, keepdim=True)
    if dbias.shape[2] == 1:
        ds = ds.sum(dim=1, keepdim=True)
    target = dbias[b if dbias.shape[0] > 1 else 0]  # a view: [Hb, Lq or 1, Lk]
    rows = target[:, ch.t0 : ch.t1] if dbias.shape[2] > 1 else target
    if dbias.shape[3] == 1:
        rows += ds.sum(dim=2, keepdim=True)
    else:
        rows.index_add_(2, cols, ds)
