"""Threshold top-k in Triton: the k best entries of each row from one pass over it, for many rows
(a prefill chunk: thousands of rows of up to 128K keys).

The radix kernels read a row four or five times and histogram it each time; on an H200 that
costs more than ``torch.topk`` on prefill chunks (3.9 vs 1.8 ms for 2048 rows of 64K, run 6).
Here one program a row:

1. samples the row (``SAMPLE_RUNS`` runs of ``RUN`` neighbours, spread evenly) and takes as
   ``floor`` the sample's value of the rank that about ``(k + CAP) / 2`` entries of the row reach;
2. reads the row once, appending every entry ``>= floor`` (as an int64 pair ``(key, -index)``,
   :mod:`.triton_topk_cooperative`'s order) to the row's ``CAP`` candidate slots;
3. if between ``k`` and ``CAP`` entries got there, the row's k best are among them, ties at the
   k-th place included (each is ``>= floor``): it sorts the candidates and writes the first k.

Rows where the guess missed (fewer than k or more than ``CAP`` entries reach the floor: a row of
mostly tied or ``-inf`` entries, values ordered along the row unlike the sample) are flagged and
selected by the cooperative radix kernels in the same call, which skip the rows already done: the
result is exact whatever the data, only slower on such rows. Rows of at most ``CAP`` entries take
all of them (no guess). Tie rule, order and ``-1`` for ``-inf`` as
:func:`.triton_topk_cooperative.cooperative_topk_into`; no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_topk import _ordered_key, _row_pointer, as_rows
from .triton_topk_cooperative import ROW_WORDS, _pair, _sorted_pairs, check_out, select_into

BLOCK = 1024  # entries a step of the pass over the row
SAMPLE_RUNS = 512  # runs of RUN neighbours (one 32-byte sector each): 4096 sampled entries
RUN = 8
NUM_WARPS = 8
_MISSING_KEY = tl.constexpr(8388607)  # _ordered_key(-inf)


def capacity(k: int) -> int:
    """Candidate slots a row: a power of two at least ``2 k`` and at least the sample, so a row
    longer than it is sampled with runs that do not overlap."""
    return max(SAMPLE_RUNS * RUN, triton.next_power_of_2(2 * max(k, 1)))


@triton.jit
def threshold_topk_kernel(scores, pairs, out_index, done, workspace, n, k, rows_per_batch,
                          stride_batch, stride_row, out_batch, out_row, CAP: tl.constexpr,
                          SAMPLE_RUNS: tl.constexpr, RUN: tl.constexpr, BLOCK: tl.constexpr,
                          ROW_WORDS: tl.constexpr):
    """Grid ``(rows,)``: the row's k best as indices into ``out_index`` (descending, ties toward
    lower indices, -1 for -inf) when its guessed floor let between k and ``CAP`` entries through;
    ``done [rows]`` (int8) says whether it did; a row that missed zeroes its ``ROW_WORDS`` of the
    cooperative kernels' ``workspace`` instead. ``pairs [rows, CAP]`` int64: scratch."""
    row = tl.program_id(0)
    base = _row_pointer(scores, row, rows_per_batch, stride_batch, stride_row)
    floor = float("-inf")
    if n > CAP:  # else every entry is a candidate
        SAMPLE: tl.constexpr = SAMPLE_RUNS * RUN
        step = n // SAMPLE_RUNS  # >= CAP / SAMPLE_RUNS >= RUN: runs inside the row, disjoint
        where = tl.arange(0, SAMPLE_RUNS)[:, None].to(tl.int64) * step + tl.arange(0, RUN)[None, :]
        sample = tl.sort(tl.reshape(tl.load(base + where), [SAMPLE]), descending=True)
        # about (k + CAP) / 2 entries of the row reach the sample's value of this rank
        rank = tl.maximum(((k + CAP) // 2).to(tl.int64) * SAMPLE // n, 1)
        floor = tl.max(tl.where(tl.arange(0, SAMPLE) == rank - 1, sample, float("-inf")))
    offs = tl.arange(0, BLOCK)
    slots = pairs + row.to(tl.int64) * CAP
    count = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        inside = start + offs < n
        value = tl.load(base + start + offs, mask=inside, other=float("-inf"))
        taken = (inside & (value >= floor)).to(tl.int32)
        slot = count + tl.cumsum(taken, axis=0) - taken
        tl.store(slots + slot, _pair(_ordered_key(value), start + offs),
                 mask=(taken != 0) & (slot < CAP))
        count += tl.sum(taken)
    hit = (count >= k) & (count <= CAP)
    tl.store(done + row, hit.to(tl.int8))
    if not hit:  # the cooperative kernels take this row: its histograms start at zero
        for start in range(0, ROW_WORDS, BLOCK):
            tl.store(workspace + row.to(tl.int64) * ROW_WORDS + start + offs,
                     tl.zeros((BLOCK,), dtype=tl.int32), mask=start + offs < ROW_WORDS)
        return
    tl.debug_barrier()  # the candidates other threads of this program stored, visible
    i = tl.arange(0, CAP)
    pair = tl.load(slots + i, mask=i < count, other=-9223372036854775807)
    _, key, index = _sorted_pairs(pair)
    index = tl.where(key == _MISSING_KEY, -1, index)
    tl.store(_row_pointer(out_index, row, rows_per_batch, out_batch, out_row) + i, index,
             mask=i < k)


def threshold_topk_into(scores: torch.Tensor, k: int, out: torch.Tensor,
                        done: torch.Tensor | None = None) -> torch.Tensor:
    """The indices of the ``k`` best entries of each row of fp32 ``scores [B, R, n]`` written
    into ``out [B, R, k]`` (int32 or int64, unit last stride; a slice of a larger buffer is
    fine): descending, ties at the k-th place toward lower indices (the selection of
    :func:`.topk.topk_lowest_ties`), equal values in index order, ``-1`` where the entry is
    ``-inf``. ``done [B * R]`` (int8), if given, receives which rows the threshold pass settled
    (the others went to the cooperative radix kernels)."""
    rows = as_rows(scores, k, "threshold_topk_into")
    check_out(out, rows, k, "threshold_topk_into")
    batch, per_batch, n = rows.shape
    count = batch * per_batch
    if k == 0 or count == 0:
        return out
    cap = capacity(k)
    if done is None:
        done = torch.empty(count, dtype=torch.int8, device=rows.device)
    pairs = torch.empty((count, cap), dtype=torch.int64, device=rows.device)
    workspace = torch.empty((count, ROW_WORDS), dtype=torch.int32, device=rows.device)
    threshold_topk_kernel[(count,)](rows, pairs, out, done, workspace, n, k, per_batch,
                                    rows.stride(0), rows.stride(1), out.stride(0), out.stride(1),
                                    CAP=cap, SAMPLE_RUNS=SAMPLE_RUNS, RUN=RUN, BLOCK=BLOCK,
                                    ROW_WORDS=ROW_WORDS, num_warps=NUM_WARPS)
    select_into(rows, k, 1, out, None, missing_as_minus_one=True, skip=done, workspace=workspace)
    return out


def threshold_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices int64)`` of the ``k`` best entries of each row of fp32
    ``scores [..., n]``, as :func:`threshold_topk_into` selects them (index ``-1``, value
    ``-inf`` for ``-inf`` entries)."""
    rows = as_rows(scores, k, "threshold_topk")
    index = torch.empty((*rows.shape[:2], k), dtype=torch.int64, device=rows.device)
    threshold_topk_into(rows, k, index)
    values = rows.gather(-1, index.clamp_min(0)).masked_fill(index < 0, float("-inf"))
    lead = scores.shape[:-1]
    return values.reshape(*lead, k), index.reshape(*lead, k)
