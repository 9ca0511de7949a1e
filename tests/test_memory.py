"""The CPU path is memory-bounded: peak resident memory grows by O(chunk), not O(L^2).

Each case runs in a fresh interpreter so that ``ru_maxrss`` (the peak) belongs to it alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys, torch
from dsa_compile import indexer_topk, sparse_attention

lq, lk, heads, kv_heads, dim, topk, query_block, key_block = map(int, sys.argv[1:9])
torch.manual_seed(0)
q = torch.randn(1, heads, lq, dim); k = torch.randn(1, kv_heads, lk, dim)
v = torch.randn(1, kv_heads, lk, dim)
q_idx = torch.randn(1, lq, 4, 64); k_idx = torch.randn(1, lk, 64); w = torch.randn(1, lq, 4)
# warm the allocator and the op registration on a tiny problem, then take the baseline
sparse_attention(q[:, :, :4], k[:, :, :8], v[:, :, :8], torch.zeros(1, 4, 1, dtype=torch.int32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
idx = indexer_topk(q_idx, k_idx, w, topk, causal=True, q_offset=lk - lq,
                   query_block=query_block, key_block=key_block)
out, lse = sparse_attention(q, k, v, idx, causal=True, q_offset=lk - lq, query_block=query_block)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(out).all()
print(json.dumps({"growth_mib": (after - before) / 1024, "selected": int((idx >= 0).sum())}))
"""


def peak_growth_mib(*args: int) -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_32k_causal_prefill_stays_under_2_gib():
    """Acceptance: Lq = Lk = 32768, H = 8, D = 64, topk = 2048, fp32, causal (fast granularity).

    Dense scores alone would be 32768^2 * 8 heads * 4 B = 32 GiB.
    """
    result = peak_growth_mib(32768, 32768, 8, 8, 64, 2048, 128, 64)
    assert result["growth_mib"] < 2048, result
    assert result["selected"] > 0


def test_exact_per_query_mode_is_chunked():
    """Exact per-query selection over a 32K cache: growth bounded by the chunks and the output."""
    result = peak_growth_mib(512, 32768, 8, 8, 64, 2048, 1, 0)
    # index output 512 * 2048 * 4 B = 4 MiB; the dense [Lq, HI, Lk] logits would be 256 MiB.
    assert result["growth_mib"] < 400, result
