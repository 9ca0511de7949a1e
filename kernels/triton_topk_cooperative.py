"""Cooperative radix top-k in Triton: many programs select the k best entries of one row together,
through the row's histograms in global memory.

For few long rows (a decode step: B rows of up to 128K keys). One program a row
(:func:`.triton_topk.radix_topk`) leaves all but B SMs idle, and its sliced variant ends in one
program over ``slices x k`` survivors (0.3 ms for one 128K row on an H200, twice ``torch.topk``).
Here each row is cut into slices, one program a slice, and every launch is one step over all of
them:

1. three radix rounds (11, 11 and 10 bits of the order-preserving 32-bit key of
   :func:`.triton_topk._ordered_key`): each program histograms the next digit of its slice's
   candidates (entries whose higher digits are the k-th best key's, as resolved so far) and adds
   it to the row's histogram (atomics). Each program of the next launch re-derives the resolved
   digits from those histograms (a 2048-bin cumulative sum; no host round trip).
2. write: with the k-th best key known, and ``wanted`` of the entries equal to it to take, each
   program writes its entries above that key to slots taken from a per-row atomic counter, and
   its equal entries of rank < ``wanted`` (in index order: the rank counts the equal entries of
   the earlier slices, read from the last round's per-slice histograms) to the last slots.
3. finish: one program a row sorts its k ``(key, -index)`` pairs and writes indices and values.

Exact, with the tie rule of :func:`.topk.topk_lowest_ties` (ties at the k-th place go to the
lower indices); equal values within the selection come in index order. Six launches (one of them
a zero fill) whatever the row length, fixed shapes, no host synchronisation: a CUDA graph can
hold a decode step's selection. Rows: fp32 ``[B, R, n]`` with any batch and row strides (the
indexer's score buffer, sliced) or any ``[..., n]``; ``-inf`` ranks last.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_topk import _ordered_key, _row_pointer, as_rows

BLOCK = 1024  # entries of a slice per step
BINS = 2048  # 11-bit digits (the last round uses 1024 of them)
LAST_BINS = 1024
NUM_WARPS = 8
MAX_SLICES = 1024
# per row in the workspace: three histograms, then the counter of slots given to entries above
# the k-th best key
ROW_WORDS = 3 * BINS + 1


@triton.jit
def _pair(key, index):
    """An entry as one int64, ``(key - 2^31) * 2^32 + (2^32 - 1 - index)``: pairs in descending
    order are the entries by descending key, then lower index (the tie rule's order)."""
    return ((key - 2147483648) << 32) | (4294967295 - index.to(tl.int64))


@triton.jit
def _sorted_pairs(pair):
    """``pair`` sorted descending, with the keys and indices of the sorted entries."""
    pair = tl.sort(pair, descending=True)
    return pair, (pair >> 32) + 2147483648, 4294967295 - (pair & 4294967295)


@triton.jit
def _resolve(hist_row, k, ROUNDS: tl.constexpr, BINS: tl.constexpr):
    """The k-th best key's digits of rounds ``[0, ROUNDS)`` from the row's histograms:
    ``(prefix, wanted)``, the digits in place (lower bits 0) and how many entries equal to the
    prefix the selection still takes."""
    bins = tl.arange(0, BINS)
    prefix = tl.zeros((1,), dtype=tl.int64)
    wanted = tl.zeros((1,), dtype=tl.int32) + k
    for r in tl.static_range(ROUNDS):
        high = 32 - 11 * r  # digit r: key bits [shift, high)
        shift = (high - 11) * (high > 11)
        counts = tl.load(hist_row + r * BINS + bins)
        at_least = tl.sum(counts) - tl.cumsum(counts, axis=0) + counts  # candidates with digit >= d
        chosen = tl.max(tl.where(at_least >= wanted, bins, 0))
        wanted = wanted - tl.sum(tl.where(bins > chosen, counts, 0))
        prefix = prefix | (chosen.to(tl.int64) << shift)
    return prefix, wanted


@triton.jit
def _row_state(scores, workspace, row, k, rows_per_batch, stride_batch, stride_row,
               ROUNDS: tl.constexpr, BINS: tl.constexpr):
    """A program's view of its row: the row's scores, its workspace (three histograms, then the
    slot counter) and the k-th best key's digits resolved by rounds ``[0, ROUNDS)``."""
    hist_row = workspace + row.to(tl.int64) * (3 * BINS + 1)
    prefix, wanted = _resolve(hist_row, k, ROUNDS, BINS)
    return (_row_pointer(scores, row, rows_per_batch, stride_batch, stride_row), hist_row,
            prefix, wanted)


@triton.jit
def cooperative_round_kernel(scores, workspace, own, skip, n, k, slice_len, slices,
                             rows_per_batch, stride_batch, stride_row, ROUND: tl.constexpr,
                             BLOCK: tl.constexpr, BINS: tl.constexpr, LAST_BINS: tl.constexpr,
                             HAS_SKIP: tl.constexpr):
    """Grid ``(slices, rows)``: adds the histogram of digit ``ROUND`` of the slice's candidates
    to the row's; the last round also keeps the slice's own (``own [rows, slices, LAST_BINS]``).
    ``HAS_SKIP``: rows whose ``skip [rows]`` byte is set are left alone (as if empty)."""
    part = tl.program_id(0)
    row = tl.program_id(1)
    if HAS_SKIP:  # noqa: SIM102  (compile-time: no load at all without a skip list)
        if tl.load(skip + row) != 0:
            return
    base, hist_row, prefix, wanted = _row_state(scores, workspace, row, k, rows_per_batch,
                                                stride_batch, stride_row, ROUND, BINS)
    high = 32 - 11 * ROUND
    shift = (high - 11) * (high > 11)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, BINS)
    counts = tl.zeros((BINS,), dtype=tl.int32)
    begin = part * slice_len
    for start in range(begin, tl.minimum(begin + slice_len, n), BLOCK):
        inside = start + offs < n
        key = _ordered_key(tl.load(base + start + offs, mask=inside, other=float("-inf")))
        candidate = inside & ((key >> high) == (prefix >> high))
        digit = tl.where(candidate, (key >> shift) & ((1 << (high - shift)) - 1), 0).to(tl.int32)
        others = tl.sum((~candidate).to(tl.int32))  # counted in bin 0 by histogram, taken out
        counts += tl.histogram(digit, BINS) - tl.where(bins == 0, others, 0)
    tl.atomic_add(hist_row + ROUND * BINS + bins, counts, mask=counts > 0)
    if ROUND == 2:
        tl.store(own + (row.to(tl.int64) * slices + part) * LAST_BINS + bins, counts,
                 mask=bins < LAST_BINS)


@triton.jit
def cooperative_write_kernel(scores, workspace, own, skip, pairs, n, k, slice_len, slices,
                             rows_per_batch, stride_batch, stride_row, BLOCK: tl.constexpr,
                             BINS: tl.constexpr, LAST_BINS: tl.constexpr,
                             SLICES: tl.constexpr, HAS_SKIP: tl.constexpr):
    """Grid ``(slices, rows)``: writes the slice's selected entries as int64 pairs
    (:func:`_pair`) into ``pairs [rows, k]``."""
    part = tl.program_id(0)
    row = tl.program_id(1)
    if HAS_SKIP:  # noqa: SIM102  (compile-time: no load at all without a skip list)
        if tl.load(skip + row) != 0:
            return
    base, hist_row, prefix, wanted = _row_state(scores, workspace, row, k, rows_per_batch,
                                                stride_batch, stride_row, 3, BINS)
    # entries equal to the k-th best key in earlier slices (their last round's histograms)
    earlier = tl.arange(0, SLICES)
    ties = tl.sum(tl.load(own + (row.to(tl.int64) * slices + earlier) * LAST_BINS
                          + (prefix & (LAST_BINS - 1)), mask=earlier < part, other=0))
    above_slots = k - wanted
    offs = tl.arange(0, BLOCK)
    out = pairs + row.to(tl.int64) * k
    begin = part * slice_len
    for start in range(begin, tl.minimum(begin + slice_len, n), BLOCK):
        inside = start + offs < n
        key = _ordered_key(tl.load(base + start + offs, mask=inside, other=float("-inf")))
        above = (inside & (key > prefix)).to(tl.int32)
        equal = (inside & (key == prefix)).to(tl.int32)
        count = tl.sum(above)
        first = tl.atomic_add(hist_row + 3 * BINS, count, mask=count > 0)
        slot_above = first + tl.cumsum(above, axis=0) - above
        rank = ties + tl.cumsum(equal, axis=0) - equal
        slot = tl.where(above != 0, slot_above, above_slots + rank)
        keep = ((above != 0) & (slot_above < above_slots)) | ((equal != 0) & (rank < wanted))
        keep = keep & (slot >= 0) & (slot < k)  # never outside the row's k, whatever happened
        tl.store(out + slot, _pair(key, start + offs), mask=keep)
        ties += tl.sum(equal)


@triton.jit
def cooperative_finish_kernel(scores, pairs, out_values, out_index, skip, n, k, rows_per_batch,
                              stride_batch, stride_row, out_batch, out_row, KP: tl.constexpr,
                              HAS_VALUES: tl.constexpr, MISSING_AS_MINUS_ONE: tl.constexpr,
                              HAS_SKIP: tl.constexpr):
    """Grid ``(rows,)``: sorts a row's ``k`` pairs, writes indices (``-1`` for ``-inf`` entries
    if asked) and values (read back from the row) in descending order; skipped rows untouched."""
    row = tl.program_id(0)
    if HAS_SKIP:  # noqa: SIM102  (compile-time: no load at all without a skip list)
        if tl.load(skip + row) != 0:
            return
    i = tl.arange(0, KP)
    pair = tl.load(pairs + row.to(tl.int64) * k + i, mask=i < k, other=-9223372036854775807)
    _, _, index = _sorted_pairs(pair)
    base = _row_pointer(scores, row, rows_per_batch, stride_batch, stride_row)
    value = tl.load(base + index, mask=(i < k) & (index >= 0) & (index < n), other=0.0)
    if MISSING_AS_MINUS_ONE:
        index = tl.where(value == float("-inf"), -1, index)
    tl.store(_row_pointer(out_index, row, rows_per_batch, out_batch, out_row) + i, index,
             mask=i < k)
    if HAS_VALUES:
        tl.store(out_values + row.to(tl.int64) * k + i, value, mask=i < k)


def auto_slices(count: int, n: int, sms: int) -> int:
    """Slices a row so that ``count`` rows fill ``2 sms`` programs (0: not a GPU, one slice),
    each slice at least one ``BLOCK``; at most :data:`MAX_SLICES`."""
    if sms <= 0 or count <= 0:
        return 1
    return max(1, min(MAX_SLICES, triton.cdiv(2 * sms, count), triton.cdiv(n, BLOCK)))


def check_out(out: torch.Tensor, rows: torch.Tensor, k: int, who: str) -> None:
    """``out`` must be int32 / int64 ``[B, R, k]`` for ``rows [B, R, n]``, unit last stride."""
    if out.shape != (*rows.shape[:2], k) or out.stride(-1) != 1 \
            or out.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: out must be int32/int64 {(*rows.shape[:2], k)} with unit last "
                         f"stride, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")


def select_into(rows: torch.Tensor, k: int, slices: int | None, out_index: torch.Tensor,
                out_values: torch.Tensor | None, missing_as_minus_one: bool,
                skip: torch.Tensor | None = None, workspace: torch.Tensor | None = None) -> None:
    """The five kernels over ``rows [B, R, n]`` (unit last stride) into ``out_index [B, R, k]``
    (unit last stride) and ``out_values [B * R, k]``; rows whose ``skip [B * R]`` (int8) is
    nonzero are left as they are (their programs return at once). ``workspace [B * R,
    ROW_WORDS]`` int32: the rows' histograms and counter, zero for every row not skipped
    (default: a zero-filled one)."""
    batch, per_batch, n = rows.shape
    count = batch * per_batch
    if k == 0 or count == 0:
        return
    if slices is None:
        sms = torch.cuda.get_device_properties(rows.device).multi_processor_count \
            if rows.device.type == "cuda" else 0
        slices = auto_slices(count, n, sms)
    if not 1 <= slices <= MAX_SLICES:
        raise ValueError(f"cooperative_topk: slices must be in [1, {MAX_SLICES}], got {slices}")
    slice_len = triton.cdiv(triton.cdiv(n, slices), BLOCK) * BLOCK
    slices = triton.cdiv(n, slice_len)  # none empty
    if workspace is None:
        workspace = torch.zeros((count, ROW_WORDS), dtype=torch.int32, device=rows.device)
    own = torch.empty((count, slices, LAST_BINS), dtype=torch.int32, device=rows.device)
    pairs = torch.empty((count, k), dtype=torch.int64, device=rows.device)
    shared = (n, k, slice_len, slices, per_batch, rows.stride(0), rows.stride(1))
    skipping = dict(HAS_SKIP=skip is not None)
    skip = skip if skip is not None else workspace
    sizes = dict(BLOCK=BLOCK, BINS=BINS, LAST_BINS=LAST_BINS, num_warps=NUM_WARPS, **skipping)
    for step in range(3):
        cooperative_round_kernel[(slices, count)](rows, workspace, own, skip, *shared,
                                                  ROUND=step, **sizes)
    cooperative_write_kernel[(slices, count)](rows, workspace, own, skip, pairs, *shared,
                                              SLICES=triton.next_power_of_2(slices), **sizes)
    cooperative_finish_kernel[(count,)](
        rows, pairs, out_values if out_values is not None else rows, out_index, skip, n, k,
        per_batch, rows.stride(0), rows.stride(1), out_index.stride(0), out_index.stride(1),
        KP=triton.next_power_of_2(k), HAS_VALUES=out_values is not None,
        MISSING_AS_MINUS_ONE=missing_as_minus_one, num_warps=NUM_WARPS, **skipping)


def cooperative_topk(scores: torch.Tensor, k: int, slices: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices int64)`` of the ``k`` best entries of each row of fp32
    ``scores [..., n]`` (``k <= n``), descending, ties at the k-th place toward lower indices
    (the selection of :func:`.topk.topk_lowest_ties`), equal values in index order.

    ``slices``: programs a row (``None``: as many as make about two programs an SM, one off
    CUDA)."""
    rows = as_rows(scores, k, "cooperative_topk")
    batch, per_batch = rows.shape[:2]
    values = torch.empty((batch, per_batch, k), dtype=torch.float32, device=rows.device)
    index = torch.empty((batch, per_batch, k), dtype=torch.int64, device=rows.device)
    select_into(rows, k, slices, index, values, missing_as_minus_one=False)
    lead = scores.shape[:-1]
    return values.reshape(*lead, k), index.reshape(*lead, k)


def cooperative_topk_into(scores: torch.Tensor, k: int, out: torch.Tensor,
                          slices: int | None = None) -> torch.Tensor:
    """The indexer's form: the indices of the ``k`` best entries of ``scores [B, R, n]`` written
    into ``out [B, R, k]`` (int32 or int64, unit last stride; a slice of a larger buffer is
    fine), descending, ``-1`` where the entry is ``-inf`` (a key nobody sees)."""
    rows = as_rows(scores, k, "cooperative_topk_into")
    check_out(out, rows, k, "cooperative_topk_into")
    select_into(rows, k, slices, out, None, missing_as_minus_one=True)
    return out
