"""Radix top-k in Triton: the k best entries of each score row, by histograms of its bytes.

One program per row. Scores are mapped to order-preserving 32-bit keys (a float's bits, the
negative ones flipped); four passes over the row find the k-th best key one byte at a time
(a 256-bin histogram of the candidates' next byte, then the byte where the count of better
entries reaches k). A last pass writes every entry above that key and, in index order, the
entries equal to it until k are taken: ties at the k-th place go to the lower indices, the rule
of :func:`.topk.topk_lowest_ties` (the plain reference beside it). The k winners are then
sorted by score (a sort of k, not of the row). ``torch.topk`` on CUDA is a radix select too;
what this kernel may save is its generic multi-kernel path for k = 2048 and the separate tie
pass (:func:`.topk.topk_lowest_ties` asks for k + 1 and redoes tied rows): five reads of the
row, one launch. Whether that wins is for ``benchmarks/gpu_check.py`` to say; SGLang's and
TileLang's radix selectors (several times ``torch.topk`` at k = 2048) are the anchors.

Few long rows (a decode step) would occupy a few SMs with one program each: such rows are cut
into slices, k selected in each, then k among the survivors (exact, see :func:`_two_level`).

Rows are fp32 ``[B, R, n]`` with any batch and row strides (a slice of the indexer's score
buffer, read in place) or any ``[..., n]``; ``-inf``
entries (keys nobody sees) rank last, and the caller turns selected ``-inf`` into -1 as it does
for ``torch.topk``. NaN is not expected (indexer scores are ReLU sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # entries of the row per step (a guess until measured on a GPU)
BINS = 256  # one byte of the key per pass
NUM_WARPS = 8


@triton.jit
def _ordered_key(x):
    """fp32 -> int64 in [0, 2^32) with the order of the floats (-0.0 first made +0.0, so the
    two zeros tie as they compare)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits < 0, -1 - bits, bits + 2147483648)


@triton.jit
def _row_pointer(scores, row, rows_per_batch, stride_batch, stride_row):
    """Start of row ``row`` of ``[B, rows_per_batch, n]`` scores with any batch and row strides."""
    batch = row // rows_per_batch
    return scores + batch.to(tl.int64) * stride_batch \
        + (row - batch * rows_per_batch).to(tl.int64) * stride_row


@triton.jit
def radix_topk_kernel(scores, out_values, out_index, n, k, rows_per_batch, stride_batch,
                      stride_row, stride_out, BLOCK: tl.constexpr, BINS: tl.constexpr):
    row = tl.program_id(0)
    base = _row_pointer(scores, row, rows_per_batch, stride_batch, stride_row)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, BINS)
    prefix = tl.zeros((1,), dtype=tl.int64)  # the k-th best key, one byte more each pass
    wanted = tl.zeros((1,), dtype=tl.int32) + k  # entries equal to the prefix still to take
    for byte in tl.static_range(4):
        shift = 24 - 8 * byte
        counts = tl.zeros((BINS,), dtype=tl.int32)
        for start in range(0, n, BLOCK):
            inside = start + offs < n
            key = _ordered_key(tl.load(base + start + offs, mask=inside, other=float("-inf")))
            candidate = inside & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            # others count in bin 0 and are taken out again (histogram has no mask)
            digit = tl.where(candidate, (key >> shift) & 0xFF, 0).to(tl.int32)
            others = tl.sum((~candidate).to(tl.int32))
            counts += tl.histogram(digit, BINS) - tl.where(bins == 0, others, 0)
        # at least d: candidates whose byte is >= d (non-increasing in d)
        at_least = tl.sum(counts) - tl.cumsum(counts, axis=0) + counts
        chosen = tl.max(tl.where(at_least >= wanted, bins, 0))
        above = tl.sum(tl.where(bins > chosen, counts, 0))
        wanted = wanted - above
        prefix = prefix | (chosen.to(tl.int64) << shift)
    # write: every key above the k-th, then the lowest-index keys equal to it (wanted of them)
    taken = tl.zeros((1,), dtype=tl.int32)
    ties = tl.zeros((1,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        inside = start + offs < n
        value = tl.load(base + start + offs, mask=inside, other=float("-inf"))
        key = _ordered_key(value)
        equal = inside & (key == prefix)
        tie_rank = ties + tl.cumsum(equal.to(tl.int32), axis=0) - equal.to(tl.int32)
        keep = inside & ((key > prefix) | (equal & (tie_rank < wanted)))
        slot = taken + tl.cumsum(keep.to(tl.int32), axis=0) - keep.to(tl.int32)
        keep = keep & (slot < k)  # never past the row's k slots, whatever the passes found
        tl.store(out_values + row.to(tl.int64) * stride_out + slot, value, mask=keep)
        tl.store(out_index + row.to(tl.int64) * stride_out + slot, (start + offs).to(tl.int64),
                 mask=keep)
        taken += tl.sum(keep.to(tl.int32))
        ties += tl.sum(equal.to(tl.int32))


def as_rows(scores: torch.Tensor, k: int, who: str) -> torch.Tensor:
    """The selectors' input: fp32 ``scores [..., n]`` (``0 <= k <= n``) as ``[B, R, n]`` with
    unit last stride, a view where it can be (a 3-d buffer keeps any batch and row strides:
    the indexer's score buffer, sliced, is not copied)."""
    if scores.dtype != torch.float32:
        raise TypeError(f"{who} takes fp32 scores, got {scores.dtype}")
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"{who} needs 0 <= k <= n, got k={k}, n={n}")
    rows = scores if scores.dim() == 3 else scores.reshape(1, -1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def radix_topk(scores: torch.Tensor, k: int, segments: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices int64)`` of the ``k`` best entries of each row of fp32
    ``scores [..., n]`` (``k <= n``), descending, ties at the k-th place toward lower indices:
    the selection of :func:`.topk.topk_lowest_ties`.

    ``segments``: split each row into that many slices, select k in each, then k among the
    survivors (:func:`_two_level`): for few long rows (a decode step: B rows of 128K keys),
    which one program a row would leave on a few SMs. ``None``: as many as fill the GPU's SMs,
    each slice at least ``4 k`` long (1 off CUDA); at most ``n // k``."""
    rows = as_rows(scores, k, "radix_topk")
    lead, n = scores.shape[:-1], rows.shape[-1]
    count = rows.shape[0] * rows.shape[1]
    if segments is None:
        sms = torch.cuda.get_device_properties(scores.device).multi_processor_count \
            if scores.device.type == "cuda" else 0
        segments = auto_segments(count, n, k, sms)
    if not 1 <= segments <= max(1, n // max(k, 1)):
        raise ValueError(f"radix_topk: segments must be in [1, n // k] (each slice holds k), "
                         f"got {segments} for n={n}, k={k}")
    if segments > 1 and k and count:
        values, index = _two_level(rows, k, segments)
    else:
        values, index = _select(rows, k)
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return (values.gather(-1, order).reshape(*lead, k),
            index.gather(-1, order).reshape(*lead, k))


def _select(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel over ``rows [B, R, n]`` (unit last stride): ``[B * R, k]`` values and indices
    in ascending index order (the order the kernel writes them)."""
    count, n = rows.shape[0] * rows.shape[1], rows.shape[2]
    values = torch.empty((count, k), dtype=torch.float32, device=rows.device)
    index = torch.empty((count, k), dtype=torch.int64, device=rows.device)
    if k and count:
        radix_topk_kernel[(count,)](rows, values, index, n, k, rows.shape[1], rows.stride(0),
                                    rows.stride(1), k, BLOCK=BLOCK, BINS=BINS,
                                    num_warps=NUM_WARPS)
    return values, index


def _two_level(rows: torch.Tensor, k: int, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k of each of ``segments`` slices of every row, then k of their survivors.

    Exact, tie rule included: an entry among a row's k best (by value, then lower index) is
    among its slice's k best; the survivors, slice after slice, each slice's in index order,
    stand in index order, so the second selection's ties still go to lower indices. The last
    slice is padded with -inf, which never outranks a real entry (they have lower indices)."""
    count, n = rows.shape[0] * rows.shape[1], rows.shape[2]
    length = triton.cdiv(n, segments)
    flat = torch.nn.functional.pad(rows.reshape(count, n), (0, length * segments - n),
                                   value=float("-inf"))
    values, index = _select(flat.view(1, count * segments, length), k)
    starts = torch.arange(segments, device=rows.device).repeat(count) * length
    index = (index + starts[:, None]).view(count, segments * k)
    values, picked = _select(values.view(1, count, segments * k), k)
    return values, index.gather(-1, picked)


def auto_segments(count: int, n: int, k: int, sms: int) -> int:
    """Slices a row so that ``count`` rows of ``n`` fill ``sms`` SMs (0: not a GPU); 1 when
    they already half fill them, or when a slice would hold under ``4 k`` entries (the second
    selection would then read about as much as the first)."""
    if k == 0 or 2 * count > sms:
        return 1
    return max(1, min(sms // count, n // (4 * k)))
