"""The Triton kernels against the references, in Triton's interpreter on CPU tensors (called
directly: ``wrap_triton`` refuses interpreted kernels), and compiled ahead of time for Hopper.

Shapes are small (the interpreter is slow) but off the block sizes, with -1 padding, empty rows,
causal offsets, GQA ratios 1/4/8/128, tiles, biases, rows of several key blocks and split-key
decode that really splits (``scripts/mutation_check.py`` checks that these tests catch bugs).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)", allow_module_level=True)

from models import DispatchLog  # noqa: E402
from test_indexer import assert_rows_descending, row_scores  # noqa: E402

from dsa_compile.kernels import DSAInputError, cuda_ops  # noqa: E402
from dsa_compile.kernels import indexer as ref_indexer  # noqa: E402
from dsa_compile.kernels import triton_indexer as tix  # noqa: E402
from dsa_compile.kernels import triton_sparse_attention as tsa  # noqa: E402
from dsa_compile.kernels.reference import (  # noqa: E402
    indexer_scores_reference,
    sparse_attention_reference,
)

from conftest import make_attention_inputs, make_indexer_inputs, random_indices  # noqa: E402

# In the interpreter (CPU) the kernels compute in exact fp32; on a GPU fp32 dots run as tf32.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
ATOL = 2e-5 if DEVICE == "cpu" else 2e-2
GRAD_TOL = 1e-4 if DEVICE == "cpu" else 2e-2


def _on_device(*tensors):
    return tuple(t.to(DEVICE) if t is not None else None for t in tensors)

SPARSE_CASES = {
    # name: B, H, Hkv, Lq, Lk, D, Dv, topk, causal, q_offset, query_block, bias shape, splits
    "mha causal": (1, 2, 2, 7, 37, 16, 16, 20, True, 30, 1, None, None),
    "gqa4 bias": (2, 8, 2, 9, 50, 24, 40, 33, False, 0, 1, (2, 1, 9, 50), None),
    "gqa8 tile4": (1, 8, 1, 10, 45, 16, 16, 16, True, 35, 4, None, None),
    # a tile of 16 queries x 4 heads: 64 rows, two programs at the default 32 rows a program
    "gqa4 tile16": (1, 8, 2, 20, 60, 16, 16, 24, True, 40, 16, None, None),
    "gqa128 mqa (MLA-like)": (1, 128, 1, 2, 30, 32, 16, 12, True, 28, 1, None, None),
    "d80 tile3 head-bias": (1, 4, 2, 6, 40, 80, 24, 10, False, 0, 3, (1, 4, 1, 40), None),
    "tiny head dim": (1, 4, 2, 6, 40, 8, 8, 10, True, 34, 1, None, None),
    # Rows of 150+ slots span several 64-key blocks: the online-softmax rescale and (with
    # splits) the split-key decode and its log-sum-exp merge only run on such rows.
    "long rows": (1, 4, 2, 3, 230, 16, 16, 200, True, 227, 1, None, None),
    "long rows tile2 bias": (1, 2, 1, 4, 180, 16, 8, 160, False, 0, 2, (1, 2, 4, 180), None),
    "decode splits": (2, 4, 2, 1, 230, 16, 16, 200, True, 229, 1, None, 4),
    "decode splits bias": (1, 4, 2, 5, 200, 16, 16, 160, True, 195, 1, (1, 4, 1, 200), 3),
}
# How many partials the split cases above really merge (each split covers whole 64-key blocks).
SPLITS_USED = {"decode splits": 4, "decode splits bias": 3}


def _inputs(case, seed=0):
    b, h, hkv, lq, lk, d, dv, topk, causal, off, qb, bias_shape, splits = case
    torch.manual_seed(seed)
    q, k, v = _on_device(*make_attention_inputs(b, h, hkv, lq, lk, d, dv))
    idx, = _on_device(random_indices(b, -(-lq // qb), lk, topk))
    bias, = _on_device(torch.randn(bias_shape) if bias_shape else None)
    return q, k, v, idx, bias, d ** -0.5, causal, off, qb, splits


def _record_merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wraps :func:`tsa.merge_splits`; the returned list gets the split count of each merge."""
    merges: list[int] = []
    real = tsa.merge_splits

    def spy(out, lse, dtype, launch=None):
        merges.append(out.shape[3])
        return real(out, lse, dtype, launch)

    monkeypatch.setattr(tsa, "merge_splits", spy)
    return merges


@pytest.mark.parametrize("name", list(SPARSE_CASES))
def test_sparse_attention_forward_matches_reference(name, monkeypatch):
    q, k, v, idx, bias, scale, causal, off, qb, splits = _inputs(SPARSE_CASES[name])
    merges = _record_merges(monkeypatch)
    out, lse = tsa.sparse_attention_fwd(q, k, v, idx, scale, bias, causal, off, qb, splits=splits)
    assert merges == ([SPLITS_USED[name]] if name in SPLITS_USED else [])
    ref_out, ref_lse = sparse_attention_reference(q, k, v, idx, scale, bias, causal, off, qb)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-4)


# MLA's form: V is the first Dv channels of K, Dv the power-of-two part of D (576 = 512 + 64).
SHARED_KV_CASES = {
    # name: as SPARSE_CASES (Dv = D's power-of-two part; V is then made a view of K)
    "latent 80 = 64 + 16, causal": (1, 16, 1, 3, 70, 80, 64, 50, True, 67, 1, None, None),
    "latent 48 = 32 + 16, tile2 bias": (1, 16, 1, 4, 90, 48, 32, 60, False, 0, 2, (1, 1, 4, 90),
                                       None),
    "latent decode splits": (2, 16, 1, 1, 120, 80, 64, 100, True, 119, 1, None, 3),
}


def _shared_kv_flags(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Wraps :func:`tsa.forward_config`; the returned list gets each launch's ``SHARED_KV``."""
    flags: list[bool] = []
    real = tsa.forward_config

    def spy(*args, **kwargs):
        tiling, meta = real(*args, **kwargs)
        flags.append(meta["SHARED_KV"])
        return tiling, meta

    monkeypatch.setattr(tsa, "forward_config", spy)
    return flags


@pytest.mark.parametrize("name", list(SHARED_KV_CASES))
@pytest.mark.parametrize("how", ["asked", "auto"])
def test_shared_kv_reads_v_from_the_k_tile(name, how, monkeypatch):
    """With ``v = k[..., :Dv]`` the kernel reads V from the gathered K tile (asked for by the
    tuning, or found by the launcher when :data:`tsa.SHARED_KV_VIEWS`), in 16-key steps so
    that rows span several steps: the result is the reference's."""
    q, k, _, idx, bias, scale, causal, off, qb, splits = _inputs(SHARED_KV_CASES[name])
    v = k[..., :SHARED_KV_CASES[name][6]]
    tuning = {"block_k": 16, **({"shared_kv": True} if how == "asked" else {})}
    monkeypatch.setattr(tsa, "SHARED_KV_VIEWS", how == "auto")
    flags = _shared_kv_flags(monkeypatch)
    out, lse = tsa.sparse_attention_fwd(q, k, v, idx, scale, bias, causal, off, qb, splits=splits,
                                        tuning=tuning)
    assert flags == [True]
    ref_out, ref_lse = sparse_attention_reference(q, k, v, idx, scale, bias, causal, off, qb)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-4)


def test_shared_kv_only_where_v_is_a_view_of_k(monkeypatch):
    """V is read from K only when it is K's storage: a copy of the same values, another
    channel count, or a traced launch reads V apart (auto) or is an error (asked)."""
    q, k, _, idx, bias, scale, causal, off, qb, _ = _inputs(SHARED_KV_CASES["latent 80 = 64 + 16, causal"])
    view, copy = k[..., :64], k[..., :64].clone()
    monkeypatch.setattr(tsa, "SHARED_KV_VIEWS", True)
    flags = _shared_kv_flags(monkeypatch)
    for v in (copy, k[..., :48]):  # not K's storage; not the power-of-two part
        out, _ = tsa.sparse_attention_fwd(q, k, v, idx, scale, bias, causal, off, qb)
        torch.testing.assert_close(out, sparse_attention_reference(q, k, v, idx, scale, bias,
                                                                   causal, off, qb)[0],
                                   atol=ATOL, rtol=1e-4)
    assert flags == [False, False]
    assert not tsa.is_channel_prefix(copy, k) and not tsa.is_channel_prefix(view, k.clone())
    half_rows = k.as_strided(view.shape, (*k.stride()[:2], k.stride(2) // 2, 1))  # same start
    assert not tsa.is_channel_prefix(half_rows, k) and tsa.is_channel_prefix(view, k)
    for v, launch in ((copy, None), (view, lambda kernel: kernel)):
        with pytest.raises(ValueError, match="shared_kv needs v to be k"):
            tsa.sparse_attention_fwd(q, k, v, idx, scale, bias, causal, off, qb, launch=launch,
                                     tuning={"shared_kv": True})
    with pytest.raises(ValueError, match="dim_v is 48"):
        tsa.forward_config(16, 1, 80, 48, True, False, {"shared_kv": True})


QUERY_MAJOR = {"mode": "query_major"}


@pytest.mark.parametrize("name,tuning", [
    # the default (key_major_split; MLA's wide heads fall back to query_major)
    ("gqa8 tile4", None), ("gqa128 mqa (MLA-like)", None),
    ("mha causal", QUERY_MAJOR), ("gqa4 bias", QUERY_MAJOR), ("gqa8 tile4", QUERY_MAJOR),
    ("d80 tile3 head-bias", QUERY_MAJOR), ("long rows", QUERY_MAJOR),
    ("long rows tile2 bias", QUERY_MAJOR),
    # more rows a program (the gpu_check sweep): several sub-tiles and head blocks merge
    ("gqa4 tile16", QUERY_MAJOR), ("gqa4 tile16", {**QUERY_MAJOR, "rows_target": 64}),
    ("gqa4 tile16", {**QUERY_MAJOR, "rows_target": 128, "num_warps": 8}),
    # key-major: a program's slot block summed over several row chunks (sub-tiles, head
    # blocks), several slot blocks a row, dQ by atomics or by its own kernel
    ("gqa4 tile16", {"mode": "key_major"}), ("gqa4 tile16", {"mode": "key_major", "rows_target": 16}),
    ("gqa128 mqa (MLA-like)", {"mode": "key_major"}), ("long rows", {"mode": "key_major", "block_n": 16}),
    ("mha causal", {"mode": "key_major_split"}), ("gqa4 bias", {"mode": "key_major_split"}),
    ("d80 tile3 head-bias", {"mode": "key_major_split"}),
    ("long rows tile2 bias", {"mode": "key_major_split", "block_n": 32, "dq_block_k": 16})])
def test_sparse_attention_backward_matches_reference_autograd(name, tuning):
    q, k, v, idx, bias, scale, causal, off, qb, _ = _inputs(SPARSE_CASES[name], seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias_leaf = bias.clone().requires_grad_() if bias is not None else None
    ref_out, ref_lse = sparse_attention_reference(*leaves, idx, scale, bias_leaf, causal, off, qb)
    g_out, g_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    ((ref_out * g_out).sum() + (ref_lse.masked_fill(torch.isinf(ref_lse), 0) * g_lse).sum()).backward()
    out, lse = tsa.sparse_attention_fwd(q, k, v, idx, scale, bias, causal, off, qb)
    grads = tsa.sparse_attention_bwd(g_out, g_lse, q, k, v, idx, out, lse, scale, bias, causal, off, qb,
                                     tuning=tuning)
    expected = [t.grad for t in leaves] + [bias_leaf.grad if bias_leaf is not None else None]
    for got, want in zip(grads, expected, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=GRAD_TOL, rtol=GRAD_TOL)


def test_key_major_backward_keeps_to_heads_it_can_hold(monkeypatch):
    """Key-major modes keep a slot block's dK / dV in registers: asked for with MLA's 576-wide
    heads they are an error; as the module default, such calls run the query-major kernel."""
    assert tsa.backward_mode(128, 128, {"mode": "key_major"}) == "key_major"
    with pytest.raises(ValueError, match="heads up to 256"):
        tsa.backward_mode(576, 512, {"mode": "key_major_split"})
    with pytest.raises(ValueError, match="expected one of"):
        tsa.backward_mode(64, 64, {"mode": "keys"})
    monkeypatch.setattr(tsa, "BACKWARD_MODE", "key_major_split")
    assert tsa.backward_mode(128, 128) == "key_major_split"
    assert tsa.backward_mode(576, 512) == "query_major"


def test_default_backward_mode_reaches_the_cuda_op_path(monkeypatch):
    """``BACKWARD_MODE`` is what the op's CUDA path runs (the switch a GPU run flips)."""
    launched = []
    for name in ("_sparse_attention_bwd", "_sparse_attention_bwd_kv", "_sparse_attention_bwd_q"):
        real = getattr(tsa, name)
        monkeypatch.setattr(tsa, name, _Recording(real, name, launched))
    q, k, v, idx, bias, scale, causal, off, qb, _ = _inputs(SPARSE_CASES["gqa4 tile16"], seed=3)
    out, lse = tsa.sparse_attention_fwd(q, k, v, idx, scale, bias, causal, off, qb)
    grad = torch.randn_like(out)
    results = {}
    for mode in tsa.BACKWARD_MODES:
        monkeypatch.setattr(tsa, "BACKWARD_MODE", mode)
        launched.clear()
        results[mode] = cuda_ops._sparse_attention_backward(grad, None, q, k, v, idx, out, lse,
                                                            scale, None, causal, off, qb, True)
        assert launched == {"query_major": ["_sparse_attention_bwd"],
                            "key_major": ["_sparse_attention_bwd_kv"],
                            "key_major_split": ["_sparse_attention_bwd_kv",
                                                "_sparse_attention_bwd_q"]}[mode]
    for mode in BACKWARD_KEY_MAJOR:
        for got, want in zip(results[mode][:3], results["query_major"][:3], strict=True):
            torch.testing.assert_close(got, want, atol=GRAD_TOL, rtol=GRAD_TOL)


BACKWARD_KEY_MAJOR = ("key_major", "key_major_split")


class _Recording:
    """A kernel stand-in that records its name at each launch and launches the real one."""

    def __init__(self, kernel, name: str, launched: list[str]) -> None:
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_empty_rows_give_zeros_and_minus_inf():
    q, k, v = _on_device(*make_attention_inputs(1, 4, 2, 5, 20, 16))
    idx, = _on_device(random_indices(1, 5, 20, 8))
    idx[0, 2] = -1  # no key at all
    idx[0, 3, :] = 19  # only a key past the causal horizon (query 3 sees keys <= 10)
    idx[0, 3, 1:] = -1
    out, lse = tsa.sparse_attention_fwd(q, k, v, idx, 0.25, None, True, 7, 1)
    assert torch.equal(out[0, :, 2:4], torch.zeros_like(out[0, :, 2:4]))
    assert torch.isneginf(lse[0, :, 2:4]).all()
    ref_out, _ = sparse_attention_reference(q, k, v, idx, 0.25, None, True, 7, 1)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize(("requested", "used"), [(2, 2), (5, 3)])  # 160 slots: 3 blocks of 64
def test_split_key_decode_equals_reference(requested, used, monkeypatch):
    """Split rows with a partly filled last split, a row whose later splits are empty and a row
    without keys, merged by log-sum-exp, against the reference."""
    q, k, v, idx, bias, scale, causal, off, qb, _ = _inputs(SPARSE_CASES["decode splits bias"])
    idx[0, 1, 64:] = -1  # only the first split of row 1 has keys
    idx[0, 2] = -1  # row 2 has none
    merges = _record_merges(monkeypatch)
    out, lse = tsa.sparse_attention_fwd(q, k, v, idx, scale, bias, causal, off, qb, splits=requested)
    assert merges == [used]
    ref_out, ref_lse = sparse_attention_reference(q, k, v, idx, scale, bias, causal, off, qb)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-4)


def test_merge_splits_combines_partials_by_lse():
    """The merge kernel alone: partials of disjoint slices of the rows (one slice empty in row 1,
    all of row 2 empty) combine into attention over the whole rows."""
    q, k, v = _on_device(*make_attention_inputs(1, 2, 1, 3, 60, 16))
    idx, = _on_device(random_indices(1, 3, 60, 36, pad_fraction=0.2))
    idx[0, 1, 12:24] = -1
    idx[0, 2] = -1
    parts = [sparse_attention_reference(q, k, v, part, 0.25, None, False, 0, 1)
             for part in idx.chunk(3, dim=-1)]
    out = torch.stack([o for o, _ in parts], dim=3).float().contiguous()
    lse = torch.stack([s for _, s in parts], dim=3).contiguous()
    merged, total = tsa.merge_splits(out, lse, q.dtype)
    ref_out, ref_lse = sparse_attention_reference(q, k, v, idx, 0.25, None, False, 0, 1)
    torch.testing.assert_close(merged, ref_out, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(total, ref_lse, atol=ATOL, rtol=1e-4)


def test_cuda_op_path_treats_index_rows_as_sets():
    """The op-level implementation dedupes rows (the kernel alone would count a repeat twice)
    and checks its arguments like the CPU op."""
    q, k, v = _on_device(*make_attention_inputs(1, 4, 2, 6, 30, 16))
    idx, = _on_device(random_indices(1, 6, 30, 10, pad_fraction=0.0))
    doubled = torch.cat([idx, idx[..., :5]], dim=-1)
    out, lse = cuda_ops._sparse_attention(q, k, v, doubled, None, None, True, 24, 1)
    ref_out, ref_lse = sparse_attention_reference(q, k, v, idx, 16 ** -0.5, None, True, 24, 1)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-4)
    with pytest.raises(DSAInputError, match="indices must lie in"):
        cuda_ops._sparse_attention(q, k, v, idx + 30, None, None, True, 24, 1)


def test_cuda_op_path_skips_the_dedupe_for_rows_known_unique(monkeypatch):
    """unique_indices=True (the indexer's own top-k rows) skips unique_rows' sort in forward
    and backward and gives the same result; without it, rows are still de-duplicated."""
    q, k, v = _on_device(*make_attention_inputs(1, 4, 2, 6, 30, 16))
    idx, = _on_device(random_indices(1, 6, 30, 10, pad_fraction=0.2))
    grad = torch.randn_like(q)
    ref_out, ref_lse = sparse_attention_reference(q, k, v, idx, 16 ** -0.5, None, True, 24, 1)
    calls = []
    real = tsa.unique_rows
    monkeypatch.setattr(tsa, "unique_rows", lambda rows: calls.append(1) or real(rows))
    for unique in (True, False):
        calls.clear()
        out, lse = cuda_ops._sparse_attention(q, k, v, idx, None, None, True, 24, 1, unique)
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=1e-4)
        grads = cuda_ops._sparse_attention_backward(grad, None, q, k, v, idx, out, lse, None,
                                                    None, True, 24, 1, unique)
        assert len(calls) == (0 if unique else 2)
        if unique:
            first = grads
    for a, b in zip(first[:3], grads[:3], strict=True):
        torch.testing.assert_close(a, b, atol=GRAD_TOL, rtol=1e-4)


def _radix_rows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    rows = torch.randn(6, 2100, generator=gen)
    rows[0, :300] = 0.0  # ReLU zeros tied across the k-th place
    rows[1, 7:2000] = float("-inf")  # fewer visible keys than k
    rows[2] = rows[2].relu()
    rows[3] = rows[3].relu() * -1.0  # -0.0 and +0.0 tie, as they compare
    rows[4] = rows[4].round(decimals=1)  # many ties everywhere
    rows[5, 1500:] = 1e30  # huge values at the end of the row
    return rows


@pytest.mark.parametrize("k", [1, 64, 600, 2048, 2100])
def test_radix_topk_selects_what_the_tie_rule_selects(k):
    """The radix selector picks the keys topk_lowest_ties picks (ties at the k-th place toward
    lower indices; selected -inf entries are ones the caller drops), in descending order."""
    from dsa_compile.kernels.topk import topk_lowest_ties
    from dsa_compile.kernels.triton_topk import radix_topk

    scores, = _on_device(_radix_rows())
    buffer = torch.full((2, 4, 2300), 7.0, device=scores.device)
    buffer[:, :3, :2100] = scores.view(2, 3, 2100)  # sliced like the indexer's score buffer
    values, index = radix_topk(buffer[:, :3, :2100], k)
    values, index = values.view(6, k), index.view(6, k)
    ref_values, ref_index = topk_lowest_ties(scores, k)
    torch.testing.assert_close(values, ref_values, atol=0, rtol=0)
    assert index.dtype == torch.int64 and (values[:, :-1] >= values[:, 1:]).all()

    def as_set(v, i):
        return i.masked_fill(torch.isneginf(v), -1).sort(-1).values

    assert torch.equal(as_set(values, index), as_set(ref_values, ref_index))
    assert torch.equal(scores.gather(-1, index), values)


@pytest.mark.parametrize("k,segments", [(1, 7), (64, 5), (600, 3), (30, 60)])
def test_radix_topk_in_slices_selects_the_same(k, segments):
    """Two-level selection (k of each slice, then k of the survivors), as decode's few long rows
    run it: the same values and key sets as one pass, ties and -inf included, with the last
    slice padded (n = 2113; 60 slices of 36 leave the last one all padding)."""
    from dsa_compile.kernels.triton_topk import radix_topk

    scores, = _on_device(_radix_rows())
    scores = torch.cat([scores, scores[:, :13]], dim=-1)  # n = 2113: the last slice padded
    one_values, one_index = radix_topk(scores, k, segments=1)
    values, index = radix_topk(scores, k, segments=segments)
    torch.testing.assert_close(values, one_values, atol=0, rtol=0)
    assert torch.equal(index.masked_fill(torch.isneginf(values), -1).sort(-1).values,
                       one_index.masked_fill(torch.isneginf(one_values), -1).sort(-1).values)
    assert (index < scores.shape[-1]).all() and torch.equal(scores.gather(-1, index), values)


def test_radix_slices_fill_the_gpu_for_few_rows_only():
    """Decode's rows (1-8 of 128K) are sliced to fill an H200's 132 SMs, 8K+ entries a slice;
    prefill's thousands of rows, short rows and CPU tensors are not."""
    from dsa_compile.kernels.triton_topk import auto_segments

    assert auto_segments(1, 131072, 2048, 132) == 16
    assert auto_segments(8, 131072, 2048, 132) == 16
    assert auto_segments(32, 131072, 2048, 132) == 4
    assert auto_segments(2048, 131072, 2048, 132) == 1
    assert auto_segments(1, 6000, 2048, 132) == 1
    assert auto_segments(1, 131072, 2048, 0) == 1


@pytest.mark.parametrize("name", ["radix_topk", "cooperative_topk", "threshold_topk"])
def test_selectors_check_scores_and_k(name):
    """The selectors' shared input check (``triton_topk.as_rows``), named by each entry point."""
    from dsa_compile.kernels import triton_topk, triton_topk_cooperative, triton_topk_threshold

    select = {"radix_topk": triton_topk.radix_topk,
              "cooperative_topk": triton_topk_cooperative.cooperative_topk,
              "threshold_topk": triton_topk_threshold.threshold_topk}[name]
    with pytest.raises(ValueError, match=f"{name} needs 0 <= k <= n, got k=9, n=8"):
        select(torch.zeros(2, 8), 9)
    with pytest.raises(TypeError, match=f"{name} takes fp32 scores, got torch.bfloat16"):
        select(torch.zeros(2, 8, dtype=torch.bfloat16), 2)


def test_radix_topk_checks_its_segments():
    from dsa_compile.kernels.triton_topk import radix_topk

    with pytest.raises(ValueError, match="segments"):
        radix_topk(torch.zeros(2, 8), 3, segments=3)  # slices of 3 would hold k = 3 but 8 // 3 = 2


def _by_value_then_index(scores: torch.Tensor, index: torch.Tensor):
    """The selection ``index`` of ``scores`` ordered by descending value, equal values by index."""
    index = index.sort(-1).values
    order = scores.gather(-1, index).sort(dim=-1, descending=True, stable=True).indices
    index = index.gather(-1, order)
    return scores.gather(-1, index), index


@pytest.mark.parametrize("k,slices", [(1, 3), (64, 1), (600, 2), (300, 5), (40, None)])
def test_cooperative_topk_selects_what_the_tie_rule_selects(k, slices):
    """Several programs a row through histograms in global memory: the values and key sets of
    topk_lowest_ties (ties at the k-th place toward lower indices, -inf last), equal values in
    index order, from a strided slice of a buffer; rows of 5000 make five slices really split."""
    from dsa_compile.kernels.topk import topk_lowest_ties
    from dsa_compile.kernels.triton_topk_cooperative import cooperative_topk

    scores, = _on_device(_radix_rows())
    if slices == 5:
        scores = torch.cat([scores, scores.flip(-1), scores[:, :800]], dim=-1)  # n = 5000
    elif slices is None:  # k = n, one slice
        scores = scores[:, 1990:2030]
    n = scores.shape[-1]
    buffer = torch.full((2, 4, n + 200), 7.0, device=scores.device)
    buffer[:, :3, :n] = scores.view(2, 3, n)
    values, index = cooperative_topk(buffer[:, :3, :n], k, slices=slices)
    values, index = values.view(6, k), index.view(6, k)
    ref_values, ref_index = topk_lowest_ties(scores, k)
    torch.testing.assert_close(values, ref_values, atol=0, rtol=0)
    assert index.dtype == torch.int64
    want_values, want_index = _by_value_then_index(scores, ref_index)
    unseen = torch.isneginf(values)  # the reference takes any of them; the caller drops them
    assert torch.equal(index.masked_fill(unseen, -1), want_index.masked_fill(unseen, -1))
    assert torch.equal(scores.gather(-1, index), values)


def test_cooperative_topk_into_writes_int32_with_minus_one_for_unseen_keys():
    """The indexer's form: int32 indices written into a slice of the output buffer, -1 where
    the selected entry is -inf, the rest of the buffer untouched."""
    from dsa_compile.kernels.topk import topk_lowest_ties
    from dsa_compile.kernels.triton_topk_cooperative import cooperative_topk_into

    scores, = _on_device(_radix_rows()[:2])  # row 1 has 107 visible keys
    out = torch.full((1, 3, 200), 5, dtype=torch.int32, device=scores.device)
    cooperative_topk_into(scores.view(1, 2, -1), 150, out[:, 1:, :150], slices=2)
    values, index = topk_lowest_ties(scores, 150)
    want = _by_value_then_index(scores, index)[1].masked_fill(torch.isneginf(values), -1)
    assert torch.equal(out[0, 1:, :150].long(), want)
    assert (out[0, 1, :107] >= 0).all() and (out[0, 2, 107:150] == -1).all()
    assert (out[:, 0] == 5).all() and (out[:, :, 150:] == 5).all()


def test_cooperative_slices_fill_the_gpu():
    """About two programs an SM for decode's few rows, a block of entries at least per slice,
    one slice a row off the GPU and for prefill's thousands of rows."""
    from dsa_compile.kernels.triton_topk_cooperative import auto_slices

    assert auto_slices(1, 131072, 132) == 128  # 128 blocks of 1024: one each
    assert auto_slices(1, 1 << 20, 132) == 264
    assert auto_slices(8, 131072, 132) == 33
    assert auto_slices(2048, 65536, 132) == 1
    assert auto_slices(1, 3000, 132) == 3
    assert auto_slices(1, 131072, 0) == 1


@pytest.fixture
def small_sample(monkeypatch):
    """The threshold kernel with a 32-entry sample (16 runs of 2) and so 32+ candidate slots: the
    same code paths as the 4096-entry default, at sizes the interpreter sorts quickly."""
    from dsa_compile.kernels import triton_topk_threshold as tt

    monkeypatch.setattr(tt, "SAMPLE_RUNS", 16)
    monkeypatch.setattr(tt, "RUN", 2)
    return tt


@pytest.mark.parametrize("k", [1, 60, 100])
def test_threshold_topk_selects_what_the_tie_rule_selects(k, small_sample):
    """One pass a row over a sampled floor, the cooperative kernels for rows it misses: the key
    sets of topk_lowest_ties in descending order, equal values in index order, -1 for -inf;
    both paths taken (rows of ties, of -inf, sorted along the row miss more often)."""
    from dsa_compile.kernels.topk import topk_lowest_ties

    scores = _radix_rows()
    scores[2] = torch.arange(2100.0)  # ordered along the row
    scores, = _on_device(scores)
    out = torch.full((2, 4, k + 3), 9, dtype=torch.int32, device=scores.device)
    done = torch.empty(6, dtype=torch.int8, device=scores.device)
    small_sample.threshold_topk_into(scores.view(2, 3, -1), k, out[:, 1:, 2:k + 2], done)
    got = out[:, 1:, 2:k + 2].reshape(6, k).long()
    values, index = topk_lowest_ties(scores, k)
    want = _by_value_then_index(scores, index)[1].masked_fill(torch.isneginf(values), -1)
    assert torch.equal(got, want)
    assert 0 < int(done.sum()) < 6, f"only one path taken: done = {done.tolist()}"
    assert (out[:, 0] == 9).all() and (out[..., :2] == 9).all() and (out[..., k + 2:] == 9).all()
    values, index = small_sample.threshold_topk(scores, k)
    assert torch.equal(index, want) and index.dtype == torch.int64
    assert torch.equal(values, scores.gather(-1, want.clamp_min(0)).masked_fill(want < 0,
                                                                               float("-inf")))


def test_threshold_topk_takes_short_rows_whole(small_sample):
    """Rows no longer than the candidate slots skip the sample and are all settled in one pass."""
    from dsa_compile.kernels.topk import topk_lowest_ties

    scores = _radix_rows()[:, 1990:2020].clone()  # 30 entries, 32 slots for k = 10
    scores[1] = float("-inf")
    scores[1, 4:7] = torch.tensor([0.5, 2.0, 0.5])  # 3 keys visible: 7 of the 10 are -1
    scores, = _on_device(scores)
    out = torch.empty((1, 6, 10), dtype=torch.int64, device=scores.device)
    done = torch.zeros(6, dtype=torch.int8, device=scores.device)
    small_sample.threshold_topk_into(scores[None], 10, out, done)
    values, index = topk_lowest_ties(scores, 10)
    assert torch.equal(out[0], _by_value_then_index(scores, index)[1].masked_fill(
        torch.isneginf(values), -1))
    assert (done == 1).all() and (out[0, 1, 3:] == -1).all() and (out[0, 1, :3] >= 0).all()


def test_threshold_floor_leaves_room_on_both_sides():
    """The candidate slots hold twice k at least, the sample fits in them without overlapping
    runs (a row longer than the slots has at least RUN entries a run)."""
    from dsa_compile.kernels import triton_topk_threshold as tt

    assert tt.capacity(2048) == 4096 and tt.capacity(1) == tt.SAMPLE_RUNS * tt.RUN
    assert tt.capacity(3000) == 8192
    assert tt.capacity(1) // tt.SAMPLE_RUNS >= tt.RUN


def test_cooperative_and_threshold_check_slices_and_out():
    from dsa_compile.kernels.triton_topk_cooperative import cooperative_topk, cooperative_topk_into

    with pytest.raises(ValueError, match="slices"):
        cooperative_topk(torch.zeros(2, 8), 3, slices=0)
    with pytest.raises(ValueError, match="out must be"):
        cooperative_topk_into(torch.zeros(1, 2, 8), 3, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="out must be"):
        cooperative_topk_into(torch.zeros(1, 2, 8), 3, torch.zeros(1, 2, 4, dtype=torch.int32))
    from dsa_compile.kernels.triton_topk_threshold import threshold_topk_into

    with pytest.raises(ValueError, match="threshold_topk_into: out must be"):
        threshold_topk_into(torch.zeros(1, 2, 8), 3, torch.zeros(1, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="k <= n"):
        threshold_topk_into(torch.zeros(1, 2, 8), 9, torch.zeros(1, 2, 9, dtype=torch.int32))


INDEXER_CASES = {
    # name: B, Lq, Lk, HI, DI, causal, q_offset, mask kind
    "causal": (2, 13, 40, 4, 16, True, 27, None),
    "row mask": (1, 9, 33, 3, 20, False, 0, "row"),
    "full mask": (2, 10, 50, 8, 32, True, 40, "full"),
    "decode": (2, 1, 70, 5, 16, True, 69, "row"),
}


def _indexer_inputs(case):
    b, lq, lk, hi, di, causal, off, mask_kind = case
    torch.manual_seed(2)
    q, k, w = _on_device(*make_indexer_inputs(b, lq, lk, hi, di))
    mask = None
    if mask_kind == "row":
        mask = torch.rand(b, lk) > 0.3
    elif mask_kind == "full":
        mask = torch.rand(b, lq, lk) > 0.3
    mask, = _on_device(mask)
    return q, k, w, causal, off, mask


def _assert_scores_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Indexer scores equal the fp32 reference where it is finite: to fp32 rounding in the
    interpreter, to tf32's (about 1e-3 of the largest score) on a GPU."""
    finite = torch.isfinite(want)
    tol = 1e-4 if DEVICE == "cpu" else 3e-3 * float(want[finite].abs().max())
    torch.testing.assert_close(got[finite], want[finite], atol=tol, rtol=1e-4 if DEVICE == "cpu" else 3e-3)


@pytest.mark.parametrize("name", list(INDEXER_CASES))
def test_indexer_scores_match_reference(name):
    q, k, w, causal, off, mask = _indexer_inputs(INDEXER_CASES[name])
    got = tix.indexer_scores_cuda(q, k, w, causal, off, mask)
    want = indexer_scores_reference(q, k, w, causal, off, mask)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    _assert_scores_close(got, want)


def test_indexer_key_scales_multiply_the_logits():
    """FP8 keys come with a per-token scale: relu(scale[s] * q . k[s])."""
    q, k, w, causal, off, _ = _indexer_inputs(INDEXER_CASES["causal"])
    scale = torch.rand(k.shape[:2], device=k.device) + 0.5
    got = tix.indexer_scores_cuda(q, k, w, causal, off, None, k_scale=scale)
    want = indexer_scores_reference(q, k * scale[..., None], w, causal, off, None)
    _assert_scores_close(got, want)


def test_score_block_rejects_ranges_outside_its_tensors():
    """The scores kernels index q / k / out without bounds: a block past them is an error
    before the launch (a decode benchmark once passed the query's position as its row)."""
    q, k, w, _, off, _ = _indexer_inputs(INDEXER_CASES["decode"])  # 1 query, 70 keys
    out = torch.empty(2, 1, 70, device=DEVICE)
    tix.score_block(q, k, w, out, 0, 1, 70, True, off, None)  # in range: runs
    for t_begin, queries, keys, buf in ((off, 1, 70, out), (0, 2, 70, out), (0, 1, 71, out),
                                        (0, 1, 70, out[..., :60]), (-1, 1, 70, out)):
        with pytest.raises(DSAInputError, match="score_block"):
            tix.score_block(q, k, w, buf, t_begin, queries, keys, True, off, None)


@pytest.mark.parametrize("name", list(INDEXER_CASES))
@pytest.mark.parametrize("query_block", [1, 3, 16])
def test_topk_matches_reference(name, query_block):
    q, k, w, causal, off, mask = _indexer_inputs(INDEXER_CASES[name])
    topk = 12
    got = tix.indexer_topk_cuda(q, k, w, topk, causal, off, mask, query_block)
    want = ref_indexer.indexer_topk(q, k, w, topk, causal, off, mask, query_block)
    if DEVICE == "cpu":
        assert torch.equal(got, want)
    else:  # tf32 scores may swap near-ties: the chosen keys must score like the best ones
        scores = indexer_scores_reference(q, k, w, causal, off, mask)
        tiles = torch.nn.functional.pad(scores, (0, 0, 0, -scores.shape[1] % query_block),
                                        value=float("-inf"))
        tiles = tiles.view(scores.shape[0], -1, query_block, scores.shape[2]).amax(2)
        pick = lambda idx: torch.gather(tiles, 2, idx.long().clamp_min(0)).masked_fill(idx < 0, 0)  # noqa: E731
        torch.testing.assert_close(pick(got).sum(-1), pick(want).sum(-1), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["causal", "full mask"])
@pytest.mark.parametrize("query_block", [1, 4])
def test_topk_rows_are_sorted_by_descending_score(name, query_block):
    """The documented order as returned, not only the same set as the reference: best key
    first, then -1 padding (the full mask leaves single queries fewer than topk visible keys)."""
    q, k, w, causal, off, mask = _indexer_inputs(INDEXER_CASES[name])
    got = tix.indexer_topk_cuda(q, k, w, 30, causal, off, mask, query_block)
    scores = row_scores(indexer_scores_reference(q, k, w, causal, off, mask).cpu(), query_block)
    assert_rows_descending(got.cpu(), scores, 1e-4 if DEVICE == "cpu" else 1e-2)
    assert (got[..., 0] >= 0).all()
    if name == "full mask" and query_block == 1:
        assert (got == -1).any()


@pytest.mark.parametrize("name", list(INDEXER_CASES))
@pytest.mark.parametrize("query_block", [1, 4])
@pytest.mark.parametrize("choice", ["radix", "cooperative", "threshold"])
def test_kernel_selectors_select_the_same_keys(name, query_block, choice, monkeypatch):
    """indexer_topk_cuda with the radix, cooperative or threshold selector: the same key set per
    row as with torch.topk, in descending order of score, -1 padded alike."""
    if choice == "threshold":  # a 32-entry sample: rows of up to 70 keys are sampled too
        from dsa_compile.kernels import triton_topk_threshold as tt

        monkeypatch.setattr(tt, "SAMPLE_RUNS", 8)
        monkeypatch.setattr(tt, "RUN", 2)
    q, k, w, causal, off, mask = _indexer_inputs(INDEXER_CASES[name])
    want = tix.indexer_topk_cuda(q, k, w, 12, causal, off, mask, query_block)
    monkeypatch.setattr(tix, "SELECTOR", choice)
    got = tix.indexer_topk_cuda(q, k, w, 12, causal, off, mask, query_block)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    scores = row_scores(indexer_scores_reference(q, k, w, causal, off, mask).cpu(), query_block)
    assert_rows_descending(got.cpu(), scores, 1e-4 if DEVICE == "cpu" else 1e-2)


def test_auto_selector_takes_radix_for_few_rows_only(monkeypatch):
    """``SELECTOR = "auto"`` (the default): the radix kernel for a decode step's few rows (no
    host sync), ``torch.topk`` for prefill chunks; an unknown name is an error."""
    assert tix.SELECTOR == "auto"
    assert tix.selector(torch.empty(1, 1, 5)) == "radix"
    assert tix.selector(torch.empty(1, tix.RADIX_MAX_ROWS - 1, 5)) == "radix"
    assert tix.selector(torch.empty(2, tix.RADIX_MAX_ROWS // 2, 5)) == "torch"
    assert tix.selector(torch.empty(1, 2048, 5)) == "torch"
    monkeypatch.setattr(tix, "SELECTOR", "torch")
    assert tix.selector(torch.empty(1, 1, 5)) == "torch"
    monkeypatch.setattr(tix, "SELECTOR", "fast")
    with pytest.raises(ValueError, match="SELECTOR"):
        tix.selector(torch.empty(1, 1, 5))


@pytest.mark.parametrize("name", ["causal", "full mask", "decode"])
@pytest.mark.parametrize("query_block", [1, 4])
def test_fp8_indexer_topk_on_the_kernel(name, query_block):
    """FP8 e4m3 queries and keys with per-key scales (config ``indexer_fp8``): the kernel picks
    the best keys by the scores of the dequantised inputs, in descending order."""
    from dsa_compile.kernels.fp8 import quantize_indexer

    q, k, w, causal, off, mask = _indexer_inputs(INDEXER_CASES[name])
    q8, k8, w8, k_scale = quantize_indexer(q, k, w)
    got = tix.indexer_topk_cuda(q8, k8, w8, 12, causal, off, mask, query_block, k_scale=k_scale)
    dequantised = indexer_scores_reference(q8.float(), k8.float() * k_scale[..., None], w8,
                                           causal, off, mask)
    assert_rows_descending(got.cpu(), row_scores(dequantised.cpu(), query_block),
                           1e-4 if DEVICE == "cpu" else 1e-2)
    assert (got[..., 0] >= 0).all()


def test_fp8_indexer_refuses_gpus_without_fp8_products(monkeypatch):
    """An A100 (sm_80) has no FP8 tensor cores: a clear error naming the option, not a Triton
    compile error deep in the kernel."""
    from dsa_compile.kernels.fp8 import quantize_indexer

    q8, k8, w8, k_scale = quantize_indexer(*make_indexer_inputs(1, 4, 40, 4, 32))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    on_gpu = torch.device("cuda")
    with pytest.raises(DSAInputError, match="sm_80: use indexer_fp8=False"):
        cuda_ops._check_fp8_products(on_gpu)
    cuda_ops._check_fp8_products(torch.device("cpu"))  # the interpreter: no GPU to ask
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda_ops._check_fp8_products(on_gpu)
    got = cuda_ops._indexer_topk(q8, k8, w8, 8, True, 36, k_scale=k_scale)
    assert got.shape == (1, 4, 8)


# aten calls that read device memory back to the host (``.item()``, ``bool()``, outputs shaped
# by data): each a sync on a GPU, and an error inside a CUDA graph capture
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive",
              "unique_dim"}


@pytest.mark.parametrize("choice", ["torch", "radix", "cooperative", "threshold"])
@pytest.mark.parametrize("queries", [1, 6])
def test_kernel_selectors_never_wait_for_the_device(choice, queries, monkeypatch):
    """indexer_topk on the GPU path (the op a compiled graph keeps opaque) and the sparse-attention
    kernel after it (what a compiled graph traces) read nothing back to the host with the radix,
    cooperative and threshold selectors: a decode step can sit in a CUDA graph. torch.topk's
    tie pass does read (one bool a chunk): the probe sees it."""
    from dsa_compile.kernels import triton_topk_threshold as tt

    monkeypatch.setattr(tt, "SAMPLE_RUNS", 16)  # rows of 3000 sampled (32 entries), not taken whole
    monkeypatch.setattr(tt, "RUN", 2)
    monkeypatch.setattr(tix, "SELECTOR", choice)
    torch.manual_seed(0)
    q_idx, k_idx, w = _on_device(*make_indexer_inputs(2, queries, 3000, 4, 16))
    q, k, v = _on_device(*make_attention_inputs(2, 4, 2, queries, 3000, 16, 16))
    with DispatchLog() as log:
        sel = cuda_ops._indexer_topk(q_idx, k_idx, w, 40, True, 3000 - queries)
        tsa.sparse_attention_fwd(q, k, v, sel, 0.25, None, True, 3000 - queries, 1)
    reads = [name for name in log.names() if name in HOST_READS]
    assert sel.shape == (2, queries, 40) and (sel >= 0).all()
    assert bool(reads) is (choice == "torch"), reads


def test_topk_in_bounded_chunks_equals_one_chunk():
    q, k, w, causal, off, mask = _indexer_inputs(INDEXER_CASES["full mask"])
    whole = tix.indexer_topk_cuda(q, k, w, 10, causal, off, mask, 4)
    chunked = tix.indexer_topk_cuda(q, k, w, 10, causal, off, mask, 4, chunk_bytes=4 * 50 * 2 * 4)
    assert torch.equal(whole, chunked)


def test_unique_rows_keeps_each_key_once():
    idx = torch.tensor([[[3, 1, 3, -1, 1, 7]]], dtype=torch.int32)
    out = tsa.unique_rows(idx)
    kept = sorted(int(x) for x in out.flatten() if x >= 0)
    assert kept == [1, 3, 7]


# ---------------------------------------------------------------------------------------------
# Compiled for Hopper (no GPU needed): the launch configurations fit sm_90 and use wgmma.
# In a subprocess: the interpreter patches triton.language while it is active.


SELECTOR_KERNELS = ("radix_topk", "threshold_topk", *(f"cooperative_topk/{part}" for part in (
    "round0", "round1", "round2", "write", "finish")))


def test_kernels_compile_for_hopper():
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-P", "-m", "dsa_compile.kernels.triton_aot"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    configs = ("llama8b_exact", "llama8b_tile64", "mla_mqa")
    assert set(report) == {*(f"sparse_attention{part}/{c}" for c in configs
                             for part in ("", "_backward")),
                           "sparse_attention/mla_mqa_128_rows",
                           "sparse_attention/mla_mqa_shared_kv", "indexer_scores/qb1",
                           "indexer_scores/qb64", "indexer_scores_fp8/qb1",
                           "indexer_scores_fp8/qb64", "indexer_scores_decode/bf16",
                           "indexer_scores_decode/fp8", *SELECTOR_KERNELS,
                           *(f"sparse_attention_backward_{part}/llama8b_tile64"
                             for part in ("key_major", "key_major_split", "dq"))}
    # Per-query selection with 4 heads a kv head has 16 rows a program: too few for a warpgroup
    # MMA (64 rows), so that forward config uses mma.sync; so does the MLA backward (its 512-wide
    # dV accumulators in 32-key steps), as does the decode indexer kernel (16 rows: the index
    # heads of one query), and the top-k selectors have no matrix product at all.
    no_wgmma = {"sparse_attention/llama8b_exact", "sparse_attention_backward/mla_mqa",
                "indexer_scores_decode/bf16", "indexer_scores_decode/fp8", *SELECTOR_KERNELS}
    for name, kernel in report.items():
        assert kernel["fits"], (name, kernel)
        assert kernel["wgmma"] is (name not in no_wgmma), (name, kernel)
        assert 0 < kernel["registers"] <= 255 and kernel["spill_bytes"] >= 0, (name, kernel)
    # ptxas -v read both ways: the selector (no tiles) fits its registers; MLA's 128-row
    # program (128 x 512 fp32 accumulators) spills kilobytes, a cost the GPU sweep must weigh.
    for name in SELECTOR_KERNELS:
        assert report[name]["registers"] < 255 and report[name]["spill_bytes"] == 0, name
    assert report["sparse_attention/mla_mqa_128_rows"]["spill_bytes"] > 4096
    # V read from the K tile: no V buffers and Q loaded once, so less shared memory than the
    # default's (which reloads Q's chunks every key step), and no spills
    shared_kv, default = report["sparse_attention/mla_mqa_shared_kv"], report["sparse_attention/mla_mqa"]
    assert shared_kv["spill_bytes"] == 0 and shared_kv["shared"] < 0.75 * default["shared"]


@pytest.mark.slow
def test_hopper_compile_asks_for_the_shared_memory_the_gpu_asked_for():
    """The ahead-of-time compile specialises pointers and integers as the launcher does for real
    tensors (divisible by 16): two MLA configs it once put at 180 / 140 KB were refused on an
    H200 asking for 286848 / 352512 bytes (run 6's OutOfResources); it now predicts exactly that."""
    import subprocess
    import sys

    script = ("import torch; from dsa_compile.kernels import triton_aot as aot\n"
              "for t in ({'rows_target': 128, 'num_warps': 8},\n"
              "          {'rows_target': 64, 'block_k': 64, 'num_warps': 8}):\n"
              "    print(aot.sparse_attention_forward(torch.bfloat16, 128, 1, 576, 512, tuning=t).shared)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(line) for line in result.stdout.split()] == [286848, 352512]


@pytest.mark.parametrize("causal,query_block,bias_shape", [(True, 4, (2, 1, 10, 14)),
                                                           (False, 1, (1, 4, 1, 14))])
def test_tensorrt_plugin_entry_computes_the_op(causal, query_block, bias_shape):
    """The plugin's entry kernel (TensorRT's calling convention), launched in the interpreter
    with exactly the grid, scalars and constants the plugin hands TensorRT, equals the op."""
    from dsa_compile.plugins.tensorrt import sparse_attention_launch

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h, n in ((4, 10), (2, 14), (2, 14)))
    rows = -(-10 // query_block)
    indices = torch.stack([torch.stack([torch.randperm(14, generator=gen)[:6]
                                        for _ in range(rows)]) for _ in range(2)]).int()
    bias = torch.randn(bias_shape, generator=gen)
    q, k, v, indices, bias = (t.to(DEVICE) for t in (q, k, v, indices, bias))
    launch = sparse_attention_launch(list(q.shape), list(k.shape), list(v.shape),
                                     list(indices.shape), list(bias.shape), 0.25, causal, 2,
                                     query_block)
    out = torch.empty(2, 4, 10, 16, device=DEVICE)
    lse = torch.empty(2, 4, 10, device=DEVICE)
    tsa.sparse_attention_fwd_plugin[launch.grid](q, k, v, indices, bias, *launch.extra_args,
                                                 out, lse, **launch.constants)
    expected, expected_lse = torch.ops.dsa.sparse_attention(q, k, v, indices, 0.25, bias, causal,
                                                            2, query_block)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-4, atol=1e-4)
