"""torch.library.opcheck for every op (schema, fake kernel, autograd registration, AOT)."""

from __future__ import annotations

import pytest
import torch

import dsa_compile  # noqa: F401  (registers torch.ops.dsa)
from dsa_compile.kernels.fp8 import quantize_indexer

from conftest import make_attention_inputs, make_indexer_inputs, random_indices


def _indexer_cases():
    q_idx, k_idx, w = make_indexer_inputs(2, 9, 12)
    mask = torch.rand(2, 12) > 0.3
    yield "topk_exact", torch.ops.dsa.indexer_topk.default, (q_idx, k_idx, w, 5, True, 2, mask)
    yield "topk_tiles", torch.ops.dsa.indexer_topk.default, (q_idx, k_idx, w, 5, True, 0, None, 4, 3, 2)
    q8, k8, w8, k_scale = quantize_indexer(q_idx, k_idx, w)  # the FP8 indexer's call
    yield "topk_fp8", torch.ops.dsa.indexer_topk.default, (q8, k8, w8, 5, True, 2, mask, 1, 0, 0,
                                                           k_scale)
    yield "scores", torch.ops.dsa.indexer_scores.default, (
        q_idx.requires_grad_(), k_idx.requires_grad_(), w.requires_grad_(), True, 1, mask)


def _attention_cases():
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = make_attention_inputs(2, 4, 2, 9, 11, dim=8, dtype=dtype)
        indices = random_indices(2, 9, 11, 4)
        bias = torch.randn(2, 1, 9, 11, dtype=dtype, requires_grad=True)
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), indices, 0.3, bias,
                True, 2, 1)
        yield f"sparse_{dtype}", torch.ops.dsa.sparse_attention.default, args
    q, k, v = make_attention_inputs(1, 2, 1, 8, 10, dim=4)
    args = (q.requires_grad_(), k, v, random_indices(1, 2, 10, 5), None, None, False, 0, 4)
    yield "sparse_tiles", torch.ops.dsa.sparse_attention.default, args


CASES = list(_indexer_cases()) + list(_attention_cases())


@pytest.mark.parametrize(("name", "op", "args"), CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, args):
    # opcheck's schema test compares inputs before / after with ops the CPU lacks for FP8
    # (mul of e4m3): the other three checks run on the FP8 call
    if name.endswith("fp8"):
        torch.library.opcheck(op, args, test_utils=(
            "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    else:
        torch.library.opcheck(op, args)
