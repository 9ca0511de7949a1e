"""indexer_scores and indexer_topk against brute force over the dense reference scores."""

from __future__ import annotations

import pytest
import torch

from dsa_compile import indexer_scores, indexer_topk
from dsa_compile.kernels.indexer import block_bounds, block_score_bound
from dsa_compile.kernels.reference import indexer_scores_reference

from conftest import make_indexer_inputs

NEG_INF = float("-inf")


def row_scores(scores: torch.Tensor, query_block: int) -> torch.Tensor:
    """Reference tile scores: max over the tile's queries (invisible = -inf)."""
    batch, lq, lk = scores.shape
    rows = -(-lq // query_block)
    padded = torch.full((batch, rows * query_block, lk), NEG_INF)
    padded[:, :lq] = scores
    return padded.view(batch, rows, query_block, lk).amax(dim=2)


def assert_rows_descending(indices: torch.Tensor, scores: torch.Tensor, tol: float = 0.0) -> None:
    """The documented order, as returned: each row lists keys by descending score (ties within
    ``tol``), then only -1 padding."""
    valid = indices >= 0
    assert not (valid[..., 1:] & ~valid[..., :-1]).any(), "a key after -1 padding"
    picked = torch.gather(scores, -1, indices.long().clamp(min=0))
    rising = (picked[..., 1:] > picked[..., :-1] + tol) & valid[..., 1:]
    assert not rising.any(), f"keys out of descending score order at {rising.nonzero()[:4].tolist()}"


def assert_topk_matches(indices: torch.Tensor, scores: torch.Tensor, topk: int) -> None:
    """Same score multiset as brute-force top-k, all picks visible, -1 exactly where needed,
    rows in descending score order."""
    visible_count = torch.isfinite(scores).sum(-1)
    expected_valid = visible_count.clamp(max=topk)
    valid = indices >= 0
    assert torch.equal(valid.sum(-1), expected_valid)
    # valid entries first, then -1 padding
    assert torch.equal(valid, torch.arange(topk) < expected_valid[..., None])
    picked = torch.gather(scores, -1, indices.long().clamp(min=0)).masked_fill(~valid, NEG_INF)
    assert torch.isfinite(picked[valid]).all(), "a pick is not visible"
    best = scores.topk(min(topk, scores.shape[-1]), dim=-1).values
    best = torch.nn.functional.pad(best, (0, topk - best.shape[-1]), value=NEG_INF)
    torch.testing.assert_close(picked.sort(-1, descending=True).values, best)
    assert_rows_descending(indices, scores, 1e-5)
    for row in indices.flatten(0, -2):
        ids = row[row >= 0]
        assert ids.unique().numel() == ids.numel(), "duplicate index in a row"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "keys", "per_query"])
def test_indexer_scores_matches_reference(causal, mask_kind):
    q_idx, k_idx, w = make_indexer_inputs(2, 23, 40)
    key_mask = None
    if mask_kind == "keys":
        key_mask = torch.rand(2, 40) > 0.3
    elif mask_kind == "per_query":
        key_mask = torch.rand(2, 23, 40) > 0.3
    got = indexer_scores(q_idx, k_idx, w, causal, 17, key_mask)
    want = indexer_scores_reference(q_idx, k_idx, w, causal, 17, key_mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_indexer_scores_formula_by_hand():
    q_idx = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]]])  # one query, two heads
    k_idx = torch.tensor([[[2.0, 3.0], [-1.0, -4.0]]])  # two keys
    w = torch.tensor([[[0.5, 2.0]]])
    # key 0: 0.5 * relu(2) + 2 * relu(-3) = 1; key 1: 0.5 * relu(-1) + 2 * relu(4) = 8
    torch.testing.assert_close(indexer_scores(q_idx, k_idx, w), torch.tensor([[[1.0, 8.0]]]))


@pytest.mark.parametrize(("lq", "lk", "topk", "causal", "q_offset"), [
    (30, 30, 8, True, 0),  # early rows see fewer than topk keys -> -1 padding
    (30, 30, 8, False, 0),
    (7, 50, 16, True, 43),  # decode-style queries at the end of a cache
    (12, 9, 20, False, 0),  # topk > Lk
])
def test_exact_topk_matches_brute_force(lq, lk, topk, causal, q_offset):
    q_idx, k_idx, w = make_indexer_inputs(2, lq, lk)
    key_mask = torch.rand(2, lk) > 0.2
    indices = indexer_topk(q_idx, k_idx, w, topk, causal, q_offset, key_mask)
    assert indices.dtype == torch.int32 and indices.shape == (2, lq, topk)
    scores = indexer_scores_reference(q_idx, k_idx, w, causal, q_offset, key_mask)
    assert_topk_matches(indices, scores, topk)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("query_block", [2, 5, 16])
def test_tile_shared_topk_matches_brute_force(query_block, causal):
    """A tile scores a key by its best query: without causality every query of the tile sees
    every key, so only the max (not the first or the last query) gives these rows."""
    q_idx, k_idx, w = make_indexer_inputs(2, 37, 37)
    indices = indexer_topk(q_idx, k_idx, w, 10, causal, 0, None, query_block)
    assert indices.shape == (2, -(-37 // query_block), 10)
    scores = indexer_scores_reference(q_idx, k_idx, w, causal, 0, None)
    assert_topk_matches(indices, row_scores(scores, query_block), 10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("query_block", "key_block", "candidates"),
                         [(1, 0, 0), (4, 0, 0), (1, 4, 5), (4, 4, 5)],
                         ids=["exact", "tile", "two-stage", "two-stage tile"])
def test_topk_rows_are_sorted_by_descending_score(query_block, key_block, candidates, causal):
    """The order as returned (the other checks sort first): best key first, -1 padding last
    (causal rows near the start see fewer than topk keys)."""
    q_idx, k_idx, w = make_indexer_inputs(2, 24, 48)
    indices = indexer_topk(q_idx, k_idx, w, 10, causal, 0, None, query_block, key_block, candidates)
    scores = row_scores(indexer_scores_reference(q_idx, k_idx, w, causal), query_block)
    assert_rows_descending(indices, scores)
    assert (indices[..., 0] >= 0).all()
    if causal:
        assert (indices == -1).any()
    if not key_block:
        assert_topk_matches(indices, scores, 10)


def test_all_keys_masked_gives_all_padding():
    q_idx, k_idx, w = make_indexer_inputs(1, 4, 6)
    key_mask = torch.zeros(1, 6, dtype=torch.bool)
    assert (indexer_topk(q_idx, k_idx, w, 3, False, 0, key_mask) == -1).all()


def test_block_bound_is_an_upper_bound():
    q_idx, k_idx, w = make_indexer_inputs(1, 50, 64, heads=4, dim=8)
    k_max, k_min = block_bounds(k_idx, 8)
    bound = block_score_bound(q_idx[0], w[0], k_max[0], k_min[0])  # [50, 8]
    exact = indexer_scores_reference(q_idx, k_idx, w)[0].view(50, 8, 8).amax(-1)
    assert (bound >= exact - 1e-5).all()
    assert (bound < exact + 100).all()


@pytest.mark.parametrize("query_block", [1, 4])
def test_two_stage_with_every_block_a_candidate_is_exact(query_block):
    q_idx, k_idx, w = make_indexer_inputs(1, 33, 45)
    blocks = -(-45 // 4)
    got = indexer_topk(q_idx, k_idx, w, 9, True, 0, None, query_block, 4, blocks)
    scores = row_scores(indexer_scores_reference(q_idx, k_idx, w, True), query_block)
    assert_topk_matches(got, scores, 9)


def tight_bound_inputs(lq: int, lk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indexer inputs on which the block bound is exact: one head, one varying channel plus a
    constant one (``q . k = q0 k0 + 10 > 0``, so ReLU never clips and scores never tie), and
    head weights of both signs (for ``w < 0`` the best key has the smallest ``q . k``)."""
    q_idx, k_idx, w = make_indexer_inputs(1, lq, lk, heads=1, dim=2)
    q_idx = q_idx.clamp(-3, 3)
    k_idx = k_idx.clamp(-3, 3)
    q_idx[..., 1] = 10.0
    k_idx[..., 1] = 1.0
    assert (w > 0).any() and (w < 0).any()
    return q_idx, k_idx, w


@pytest.mark.parametrize("query_block", [1, 4])
def test_two_stage_with_an_exact_bound_equals_exact_topk(query_block):
    """When the bound is the block's true best score, keeping ``candidate_blocks >= topk``
    blocks loses nothing: a key of the exact top-k outside them would be beaten by the best
    keys of ``topk`` kept blocks. A bound that misranks blocks (not an upper bound, the wrong
    corner of the box for some sign of q or w, a wrong tile max) fails here."""
    q_idx, k_idx, w = tight_bound_inputs(40, 96)
    k_max, k_min = block_bounds(k_idx, 8)
    bound = block_score_bound(q_idx[0], w[0], k_max[0], k_min[0])
    exact = indexer_scores_reference(q_idx, k_idx, w)[0].view(40, 12, 8).amax(-1)
    torch.testing.assert_close(bound, exact, atol=1e-4, rtol=1e-5)
    got = indexer_topk(q_idx, k_idx, w, 4, False, 0, None, query_block, 8, 4)
    scores = row_scores(indexer_scores_reference(q_idx, k_idx, w), query_block)
    assert_topk_matches(got, scores, 4)
    assert torch.equal(got, indexer_topk(q_idx, k_idx, w, 4, False, 0, None, query_block))


@pytest.mark.parametrize("query_block", [1, 8])
def test_two_stage_picks_are_visible_and_within_candidates(query_block):
    lq, lk, topk, key_block = 40, 64, 6, 4
    q_idx, k_idx, w = make_indexer_inputs(1, lq, lk)
    key_mask = torch.rand(1, lk) > 0.25
    got = indexer_topk(q_idx, k_idx, w, topk, True, 0, key_mask, query_block, key_block, 3)
    scores = row_scores(indexer_scores_reference(q_idx, k_idx, w, True, 0, key_mask), query_block)
    valid = got >= 0
    picked = torch.gather(scores, -1, got.long().clamp(min=0))
    assert torch.isfinite(picked[valid]).all()
    # At most 3 candidate blocks per row -> picks come from at most 3 distinct blocks.
    for row in got[0]:
        assert (row[row >= 0] // key_block).unique().numel() <= 3


def test_two_stage_recovers_the_planted_best_keys():
    """Keys aligned with the queries, planted in two blocks, must be found by the bound."""
    q_idx, k_idx, w = make_indexer_inputs(1, 16, 256, heads=2, dim=16)
    w = w.abs()
    k_idx = 0.1 * k_idx
    target = q_idx[0].mean(dim=(0, 1))
    planted = torch.tensor([37, 38, 200, 201])
    k_idx[0, planted] = 5 * target / target.norm()
    got = indexer_topk(q_idx, k_idx, w, 4, False, 0, None, 16, 16, 2)
    assert set(got[0, 0].tolist()) == set(planted.tolist())


def test_two_stage_default_scores_at_least_32_candidate_blocks():
    """candidate_blocks=0 means max(ceil(2 * topk / key_block), 32): small budgets get 32
    candidates (their 2 * topk / key_block would prune away keys the best selection keeps),
    large ones keep the budget's own count."""
    from dsa_compile.kernels.indexer import MIN_CANDIDATE_BLOCKS

    assert MIN_CANDIDATE_BLOCKS == 32
    q_idx, k_idx, w = make_indexer_inputs(1, 24, 400)
    small = indexer_topk(q_idx, k_idx, w, 8, True, 0, None, 4, 2, 0)  # 2 * 8 / 2 = 8 < 32
    assert torch.equal(small, indexer_topk(q_idx, k_idx, w, 8, True, 0, None, 4, 2, 32))
    assert not torch.equal(small, indexer_topk(q_idx, k_idx, w, 8, True, 0, None, 4, 2, 8))
    large = indexer_topk(q_idx, k_idx, w, 40, True, 0, None, 4, 2, 0)  # 2 * 40 / 2 = 40 > 32
    assert torch.equal(large, indexer_topk(q_idx, k_idx, w, 40, True, 0, None, 4, 2, 40))
