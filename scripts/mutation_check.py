"""Mutation check: do the tests fail when the code is broken on purpose?

Each entry of :data:`MUTATIONS` plants one bug (replaces one exact piece of text in one file) and
names the tests that must catch it. For every entry the script runs those tests with the bug in
place and reports KILLED (a test failed: good) or SURVIVED (every test passed: the suite cannot
see that bug). It exits 1 if any mutation survived or could not be applied, 2 if the tests
already fail without any mutation, 0 otherwise.

The bugs are planted in a throw-away copy of the working tree (uncommitted edits included,
``.git`` and ``.venv`` left out) whose packages are laid out as ``pyproject.toml``'s
``package-dir`` installs them, and imported from there through ``PYTHONPATH``: the checkout
itself is never written, so the check is safe while others edit and test it.

    .venv/bin/python -P scripts/mutation_check.py            # all of them
    .venv/bin/python -P scripts/mutation_check.py -k merge   # names containing "merge"
    .venv/bin/python -P scripts/mutation_check.py --list
    .venv/bin/python -P scripts/mutation_check.py --rev HEAD --with kernels --with tests

To add one, append a :class:`Mutation` to the list below; ``tests/test_mutation_check.py``
checks that every entry still applies to the current code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mutation:
    """One planted bug.

    - ``name``: short unique label, shown in the report and matched by ``-k``.
    - ``file``: the file to break, relative to the repository root (``kernels/indexer.py``).
    - ``old``: exact text in that file, whitespace included; it must occur exactly once.
    - ``new``: what replaces it (the bug).
    - ``tests``: pytest arguments that select the tests which must catch it (paths, node ids,
      ``-k`` expressions), run from the repository root with ``-x -q``.
    """

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


TRITON_TESTS = ("tests/test_triton_kernels.py", "-k", "not compile_for_hopper")
TRITON_BACKWARD_TESTS = ("tests/test_triton_kernels.py", "-k", "backward")
INDEXER_TESTS = ("tests/test_indexer.py",)
TSA = "kernels/triton_sparse_attention.py"
COOP = "kernels/triton_topk_cooperative.py"
COOP_TESTS = ("tests/test_triton_kernels.py", "-k", "cooperative")
THR = "kernels/triton_topk_threshold.py"
THR_TESTS = ("tests/test_triton_kernels.py", "-k", "threshold")
GUARD_TESTS = ("tests/test_guards.py",)
PATTERN_TESTS = ("tests/test_guards.py", "tests/test_patterns.py")

MUTATIONS: list[Mutation] = [
    # Triton sparse attention: online softmax over several key blocks, split-key decode, merge.
    Mutation("triton fwd: no online-softmax rescale of acc", TSA,
             "acc = acc * alpha[:, None] + tl.dot(", "acc = acc + tl.dot(", TRITON_TESTS),
    Mutation("triton fwd: no online-softmax rescale of l", TSA,
             "l_i = l_i * alpha + tl.sum(p, axis=1)", "l_i = l_i + tl.sum(p, axis=1)", TRITON_TESTS),
    Mutation("triton fwd: every split reads the first slice", TSA,
             "k_begin = split * split_len", "k_begin = split * 0", TRITON_TESTS),
    Mutation("triton fwd: shared K/V taken for a copy of K's channels", TSA,
             "v.data_ptr() == k.data_ptr()", "True", TRITON_TESTS),
    Mutation("triton fwd: shared K/V taken whatever V's strides", TSA,
             "and v.stride() == k.stride()", "", TRITON_TESTS),
    Mutation("triton fwd: shared K/V reads V past K's first channels", TSA,
             "vc = k_main if SHARED_KV",
             "vc = _gather_keys(k_base + D_TAIL * sk_d, idx, key_ok, sk_s, sk_d, DV, BDV) if SHARED_KV",
             TRITON_TESTS),
    Mutation("triton merge: second split's lse weight ignored", TSA,
             "w = tl.exp(lse_s - top_safe)", "w = tl.where(s == 1, 1.0, tl.exp(lse_s - top_safe))",
             TRITON_TESTS),
    Mutation("triton merge: lse = max of the partial lse", TSA,
             "top_safe + tl.log(tl.where(total > 0, total, 1.0))", "top_safe", TRITON_TESTS),
    Mutation("triton bwd: every key block re-reads the first", TSA,
             "slots = k0 + tl.arange(0, BK)", "slots = tl.arange(0, BK)", TRITON_TESTS),
    Mutation("triton bwd kv: dK of the last row chunk only", TSA,
             "dk_acc += tl.dot(tl.trans(ds_lo), qc)", "dk_acc = tl.dot(tl.trans(ds_lo), qc)",
             TRITON_BACKWARD_TESTS),
    Mutation("triton bwd kv: every slot block reads the first", TSA,
             "slots = (pid_head % slot_blocks) * BN + tl.arange(0, BN)",
             "slots = 0 * BN + tl.arange(0, BN)", TRITON_BACKWARD_TESTS),
    Mutation("triton bwd dq: every key block re-reads the first", TSA,
             "tl.arange(0, BK) + k0, si_b", "tl.arange(0, BK) + 0, si_b",
             TRITON_BACKWARD_TESTS),
    Mutation("triton bwd: the lse gradient ignored", TSA,
             "delta = delta - grad_lse.float()", "delta = delta - 0 * grad_lse.float()",
             TRITON_BACKWARD_TESTS),
    # Triton indexer: tile max and top-k order.
    Mutation("triton indexer: tile score = min over the tile", "kernels/triton_indexer.py",
             "best = tl.maximum(best, tl.max(scores, axis=0))",
             "best = tl.maximum(best, tl.min(scores, axis=0))", TRITON_TESTS),
    Mutation("triton top-k: ascending order", "kernels/triton_indexer.py",
             "                          else topk_lowest_ties(scores, found))",
             "                          else (t.flip(-1) for t in topk_lowest_ties(scores, found)))",
             TRITON_TESTS),
    Mutation("radix top-k: ties at the k-th place toward higher indices", "kernels/triton_topk.py",
             "        tie_rank = ties + tl.cumsum(equal.to(tl.int32), axis=0) - equal.to(tl.int32)",
             "        tie_rank = ties + tl.sum(equal.to(tl.int32)) - tl.cumsum(equal.to(tl.int32), "
             "axis=0)", ("tests/test_triton_kernels.py", "-k", "radix")),
    Mutation("radix top-k: the batch stride ignored", "kernels/triton_topk.py",
             "    return scores + batch.to(tl.int64) * stride_batch \\\n",
             "    return scores + 0 * stride_batch \\\n",
             ("tests/test_triton_kernels.py", "-k", "radix")),
    *(Mutation(f"{family} top-k: the batch stride ignored", "kernels/triton_topk.py",
               "    return scores + batch.to(tl.int64) * stride_batch \\\n",
               "    return scores + 0 * stride_batch \\\n",
               ("tests/test_triton_kernels.py", "-k", f"{family}_topk_selects"))
      for family in ("cooperative", "threshold")),
    Mutation("selectors: k > n accepted (kernels would write past the row)",
             "kernels/triton_topk.py", "    if not 0 <= k <= n:\n", "    if not 0 <= k:\n",
             ("tests/test_triton_kernels.py", "-k", "check_scores_and_k")),
    Mutation("radix top-k: the k-th byte chosen one too low", "kernels/triton_topk.py",
             "        chosen = tl.max(tl.where(at_least >= wanted, bins, 0))",
             "        chosen = tl.maximum(tl.max(tl.where(at_least >= wanted, bins, 0)) - 1, 0)",
             ("tests/test_triton_kernels.py", "-k", "radix")),
    Mutation("radix top-k in slices: the slice offsets ignored", "kernels/triton_topk.py",
             "index = (index + starts[:, None]).view(count, segments * k)",
             "index = (index + 0 * starts[:, None]).view(count, segments * k)",
             ("tests/test_triton_kernels.py", "-k", "slices")),
    Mutation("cooperative top-k: earlier slices' ties not counted", COOP,
             "mask=earlier < part, other=0))", "mask=earlier < 0, other=0))", COOP_TESTS),
    Mutation("cooperative top-k: ties at the k-th place toward higher indices", COOP,
             "rank = ties + tl.cumsum(equal, axis=0) - equal",
             "rank = ties + tl.sum(equal) - tl.cumsum(equal, axis=0)", COOP_TESTS),
    Mutation("cooperative top-k: equal values in the selection toward higher indices", COOP,
             "pair = tl.sort(pair, descending=True)",
             "pair = tl.sort(pair ^ 4294967295, descending=True) ^ 4294967295", COOP_TESTS),
    Mutation("cooperative top-k: the k-th digit chosen one too low", COOP,
             "chosen = tl.max(tl.where(at_least >= wanted, bins, 0))",
             "chosen = tl.maximum(tl.max(tl.where(at_least >= wanted, bins, 0)) - 1, 0)",
             COOP_TESTS),
    Mutation("cooperative top-k: the last round's digit one bit short", COOP,
             "shift = (high - 11) * (high > 11)\n    offs", "shift = (high - 10) * (high > 11)\n    offs",
             COOP_TESTS),
    Mutation("cooperative top-k: -inf entries kept as indices", COOP,
             "index = tl.where(value == float(\"-inf\"), -1, index)", "index = index", COOP_TESTS),
    Mutation("threshold top-k: a row with fewer than k candidates counted as settled", THR,
             "hit = (count >= k) & (count <= CAP)", "hit = count <= CAP", THR_TESTS),
    Mutation("threshold top-k: the floor not applied (every row falls back)", THR,
             "taken = (inside & (value >= floor)).to(tl.int32)",
             "taken = inside.to(tl.int32)", THR_TESTS),
    Mutation("threshold top-k: candidate slots off by one", THR,
             "slot = count + tl.cumsum(taken, axis=0) - taken",
             "slot = count + tl.cumsum(taken, axis=0)", THR_TESTS),
    Mutation("threshold top-k: -inf entries kept as indices", THR,
             "index = tl.where(key == _MISSING_KEY, -1, index)",
             "index = index", THR_TESTS),
    Mutation("threshold top-k: the fallback overwrites the rows the threshold settled", COOP,
             "        if tl.load(skip + row) != 0:\n            return\n    i = tl.arange(0, KP)",
             "        if tl.load(skip + row) < 0:\n            return\n    i = tl.arange(0, KP)",
             THR_TESTS),
    Mutation("fp8 indexer: the query scales not folded into the head weights", "kernels/fp8.py",
             "weights.float() * q_scale.squeeze(-1)", "weights.float()",
             ("tests/test_fp8_indexer.py",)),
    Mutation("fp8 indexer: the reference ignores the key scales", "kernels/indexer.py",
             "k32 = k_idx.float() if k_scale is None else k_idx.float() * k_scale.float()[..., None]",
             "k32 = k_idx.float()", ("tests/test_fp8_indexer.py",)),
    Mutation("fp8 indexer: the site drops the key scales", "kernels/attention.py",
             "                           key_block, blocks[2], k_scale)",
             "                           key_block, blocks[2], None)",
             ("tests/test_fp8_indexer.py",)),
    Mutation("fp8 indexer: the prefill kernel ignores the key scales", "kernels/triton_indexer.py",
             "            logits = logits * key_scale[None, :]",
             "            logits = logits * 1.0", ("tests/test_triton_kernels.py", "-k", "fp8")),
    Mutation("fp8 indexer: the decode kernel ignores the key scales", "kernels/triton_indexer.py",
             "        logits = logits * tl.load(KSCALE + b * ss_b + keys * ss_s, mask=key_ok, "
             "other=0.0)[None, :]",
             "        logits = logits * 1.0", ("tests/test_triton_kernels.py", "-k", "fp8")),
    Mutation("indexer in fp32 in a bf16 / fp16 model", "kernels/attention.py",
             "return activations if activations in (torch.bfloat16, torch.float16) else parameters",
             "return parameters", ("tests/test_hf_attention.py", "-k", "16_bit")),
    Mutation("ONNX IndexerTopK: weights typed like the 16-bit queries", "plugins/onnx_ops.py",
             '[("q_idx", "T"), ("k_idx", "T"), ("weights", "TW"),',
             '[("q_idx", "T"), ("k_idx", "T"), ("weights", "T"),',
             ("tests/test_onnx_export.py", "-k", "float16")),
    Mutation("sm_90 compile without the launcher's divisibility specialisation",
             "kernels/triton_aot.py", '            attrs[(i,)] = [["tt.divisibility", 16]]',
             "            pass", ("tests/test_triton_kernels.py", "-k", "shared_memory_the_gpu")),
    Mutation("auto selector: radix for many rows", "kernels/triton_indexer.py",
             'return "radix" if scores.shape[0] * scores.shape[1] < RADIX_MAX_ROWS else "torch"',
             'return "radix" if scores.shape[1] < RADIX_MAX_ROWS else "torch"',
             ("tests/test_triton_kernels.py", "-k", "auto_selector")),
    Mutation("score_block launches past its tensors", "kernels/triton_indexer.py",
             "    if t_begin < 0 or t_begin + queries > lq or keys > k_idx.shape[1]",
             "    if t_begin < 0 and t_begin + queries > lq and keys > k_idx.shape[1]",
             ("tests/test_triton_kernels.py", "-k", "score_block")),
    Mutation("CUDA op dedupes nothing for user rows", "kernels/cuda_ops.py",
             "    return indices if unique_indices else tsa.unique_rows(indices)",
             "    return indices", ("tests/test_triton_kernels.py", "-k", "sets or dedupe")),
    Mutation("rewritten graph re-sorts the indexer's rows", "kernels/attention.py",
             "                              unique_indices=True)  # top-k rows never repeat a key",
             "                              unique_indices=False)",
             ("tests/test_sparse_attention.py", "-k", "promise")),
    # CPU indexer (dsa::indexer_topk): top-k order, tile max, Quest bound, block selection.
    Mutation("cpu top-k: ascending order", "kernels/indexer.py",
             "values, picked = topk_lowest_ties(scores, found)",
             "values, picked = (t.flip(-1) for t in topk_lowest_ties(scores, found))",
             INDEXER_TESTS),
    Mutation("cpu top-k: key-position order", "kernels/indexer.py",
             "values, picked = topk_lowest_ties(scores, found)",
             "picked = scores.topk(found, dim=-1).indices.sort(-1).values\n"
             "            values = scores.gather(-1, picked)", INDEXER_TESTS),
    Mutation("cpu tile score = min over the tile", "kernels/chunking.py",
             "view(rows, query_block, width).amax(dim=1)", "view(rows, query_block, width).amin(dim=1)",
             INDEXER_TESTS),
    Mutation("cpu tile score = the tile's first query", "kernels/chunking.py",
             "view(rows, query_block, width).amax(dim=1)", "view(rows, query_block, width)[:, 0]",
             INDEXER_TESTS),
    Mutation("quest bound: ignores the sign of w", "kernels/indexer.py",
             "torch.where(wj >= 0, wj * both[:, :, 0], wj * both[:, :, 1])", "(wj * both[:, :, 0])",
             INDEXER_TESTS),
    Mutation("quest bound: k_max for negative q channels", "kernels/indexer.py",
             "torch.cat([k_min, k_max], dim=1)])", "torch.cat([k_max, k_max], dim=1)])",
             INDEXER_TESTS),
    Mutation("quest bound: block min taken as max", "kernels/indexer.py",
             "lo = lo.view(batch, blocks, key_block, dim).amin(dim=2)",
             "lo = lo.view(batch, blocks, key_block, dim).amax(dim=2)", INDEXER_TESTS),
    Mutation("two-stage: keeps the lowest-bound blocks", "kernels/indexer.py",
             "bound.topk(min(count, blocks), dim=-1)",
             "bound.topk(min(count, blocks), dim=-1, largest=False)", INDEXER_TESTS),
    # The pass (passes/): each guard of issue 9, and the mask semantics of the rewrite.
    Mutation("pass: the q @ k^T node may have other users", "passes/guards.py",
             "for node, following in zip(chain, chain[1:], strict=False):",
             "for node, following in zip(chain[1:], chain[2:], strict=False):", GUARD_TESTS),
    Mutation("pass: in-place ops in the span ignored", "passes/guards.py",
             "            if written not in own:", "            if False:", GUARD_TESTS),
    Mutation("pass: every cast transparent", "passes/guards.py",
             "    for cast in casts:\n", "    for cast in casts[:0]:\n", GUARD_TESTS),
    Mutation("pass: q broadcast over the batch accepted", "passes/guards.py",
             "if not (same_size(q.shape[0], k.shape[0])", "if not (True", GUARD_TESTS),
    Mutation("pass: masks may enlarge the scores", "passes/guards.py",
             "        if not (same_size(size, 1) or same_size(size, full)):",
             "        if False:", GUARD_TESTS),
    Mutation("pass: scale after an additive mask dropped", "passes/handwritten.py",
             "if t.kind is TermKind.ADD or math.isfinite(t.fill) else t for t in terms]",
             "if False else t for t in terms]", PATTERN_TESTS),
    Mutation("pass: float positions proved causal", "passes/causal_mask.py",
             "    return not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or",
             "    return not isinstance(value, torch.Tensor) or False or", GUARD_TESTS),
    Mutation("pass: finite masked biases selectable", "kernels/attention.py",
             "visible = visible & ((mask >= best - MASKED_BIAS_MARGIN) | mask.isnan())",
             "visible = visible",
             GUARD_TESTS),
    Mutation("pass: tiles attend to keys a finite mask removes", "kernels/attention.py",
             "if bias is not None and not select_all and query_block > 1 and visible.dim() == 3:",
             "if False:", GUARD_TESTS),
    Mutation("pass: fully masked rows left as zeros", "passes/lower.py",
             "site.mask.empty_rows is not EmptyRows.ZERO:", "False:", GUARD_TESTS),
    Mutation("multihead: key padding mask dropped", "passes/multihead.py",
             "        mask = padding if mask is None else mask + padding",
             "        mask = mask", ("tests/test_multihead.py",)),
    Mutation("multihead: heads split in the wrong order", "passes/multihead.py",
             "        return x.view(x.shape[0], batch * num_heads, head_dim).transpose(0, 1) \\\n"
             "            .view(batch, num_heads, x.shape[0], head_dim)",
             "        return x.view(x.shape[0], num_heads, batch, head_dim).permute(2, 1, 0, 3)",
             ("tests/test_multihead.py",)),
    Mutation("cpu attention: probabilities normalised by lse", "kernels/torch_compat.py",
             "out = torch.matmul(probs, v) / total.clamp(min=torch.finfo(total.dtype).tiny)",
             "out = torch.matmul(probs, v)", GUARD_TESTS),
    Mutation("binding: indexers bound once, not per instance", "dsa_compile/ownership.py",
             "        if self.attr is None or self.anchor is None:",
             "        if True:", ("tests/test_adapters.py", "-k", "sharing or detached")),
    Mutation("adapter: base weights not fingerprinted", "dsa_compile/adapter.py",
             "        if verify_base and not same_fingerprint(", "        if False and not same_fingerprint(",
             ("tests/test_adapters.py", "-k", "another_model")),
    Mutation("detach: indexers left registered", "dsa_compile/ownership.py",
             "        del owner._modules[attr]\n", "",
             ("tests/test_adapters.py", "-k", "detach")),
    Mutation("kv heads folded head-major", "kernels/attention.py",
             "    q = q.reshape(batch * kv_heads, group, lq, dim)",
             "    q = q.transpose(0, 1).reshape(batch * kv_heads, group, lq, dim)",
             ("tests/test_per_kv_head.py", "-k", "loop")),
    Mutation("soft selection boundary at the k-th key itself", "kernels/calibration.py",
             "            boundary = (ranked[..., topk - 1:topk] + ranked[..., topk:topk + 1]) / 2",
             "            boundary = ranked[..., topk - 1:topk]",
             ("tests/test_calibration.py", "-k", "soft_selection")),
    Mutation("dsa convert saves calibrated indexers that lowered the cosine",
             "dsa_compile/convert.py", "        _restore(model, training_free)\n",
             "", ("tests/test_calibration.py", "-k", "never_saves")),
    Mutation("two-stage default without the 32-candidate minimum", "kernels/indexer.py",
             "        count = candidate_blocks or max(-(-2 * topk // key_block), MIN_CANDIDATE_BLOCKS)",
             "        count = candidate_blocks or -(-2 * topk // key_block)",
             ("tests/test_indexer.py", "-k", "32_candidate")),
    Mutation("CPU default granularity ignores the budget", "dsa_compile/config.py",
             "        qb, kb = budget_granularity(topk, qb, kb)", "        pass",
             ("tests/test_config_backend.py", "-k", "granularity")),
    Mutation("calibration: gradients not all-reduced", "dsa_compile/calibrate.py",
             "        torch.distributed.all_reduce(p.grad)", "        pass",
             ("tests/test_calibration.py", "-k", "gloo")),
    Mutation("v3 -> v32: rotary rows left interleaved", "dsa_compile/deepseek.py",
             "    return torch.cat([rows[0::2], rows[1::2]])", "    return rows",
             ("tests/test_deepseek_convert.py", "-k", "dsa_convert")),
    Mutation("calibration trains the zero blocks of per-kv-head indexers",
             "dsa_compile/calibrate.py", "                    p.grad.mul_(mask)",
             "                    pass", ("tests/test_per_kv_head.py", "-k", "block_diagonal")),
    Mutation("top-k ties left in torch's order", "kernels/topk.py",
             "    redo = ties & torch.isfinite(kth.squeeze(-1))",
             "    redo = ties & torch.isfinite(kth.squeeze(-1)) & False",
             ("tests/test_onnx_export.py", "-k", "ties or function")),
    Mutation("ONNX IndexerTopK: causal attribute read backwards", "plugins/onnx_ops.py",
             "    seen = op.Or(seen, op.Equal(op.Constant(value_int=causal), zero))\n    visible",
             "    seen = op.Or(seen, op.Equal(op.Constant(value_int=causal), one))\n    visible",
             ("tests/test_onnx_export.py", "-k", "indexer_topk_function")),
    Mutation("ONNX SparseAttention: repeated indices counted twice", "plugins/onnx_ops.py",
             "    valid = op.And(op.GreaterOrEqual(ranked, zero_s), op.Not(op.Concat(first, repeat, "
             "axis=2)))",
             "    valid = op.GreaterOrEqual(ranked, zero_s)",
             ("tests/test_onnx_export.py", "-k", "sparse_attention_function")),
    Mutation("TensorRT plugin: LQ and LK swapped", "plugins/tensorrt.py",
             "*sl[:3], lq, lk, topk, group,", "*sl[:3], lk, lq, topk, group,",
             ("tests/test_tensorrt_plugin.py", "-k", "launch_equals")),
    Mutation("attn_implementation='dsa': decode steps treated as causal prefill",
             "dsa_compile/hf.py",
             "    causal = bool(q_length > 1 and attention_mask is None and causal)",
             "    causal = bool(attention_mask is None and causal)",
             ("tests/test_hf_attention.py", "-k", "each_step")),
    Mutation("k / v lengths must be provably equal again", "passes/guards.py",
             "    if known_different(k.shape[-2], v.shape[-2]) or",
             "    if not same_size(k.shape[-2], v.shape[-2]) or",
             ("tests/test_hf_attention.py", "-k", "compiled_generate")),
    Mutation("index cache: new keys prepended", "dsa_compile/key_cache.py",
             "            held = torch.cat([held, index_keys(new_keys, k_proj)], dim=1)",
             "            held = torch.cat([index_keys(new_keys, k_proj), held], dim=1)",
             ("tests/test_hf_attention.py", "-k", "index_cache")),
    Mutation("index cache: kept across a beam reorder", "dsa_compile/key_cache.py",
             "        store.clear()\n        return method", "        return method",
             ("tests/test_hf_attention.py", "-k", "index_cache")),
    Mutation("bias dropped for per-query boolean masks too", "kernels/attention.py",
             "    return all(n == 1 for n in attn_mask.shape[-3:-1]) and attn_mask.dim() >= 2",
             "    return attn_mask.dim() >= 2",
             ("tests/test_guards.py", "-k", "drop_the_bias")),
    Mutation("decode path: keys-only mask ignored", "kernels/decode.py",
             "            scores = scores.masked_fill_(~visible[b], NEG_INF)",
             "            pass",
             ("tests/test_decode_path.py",)),
    Mutation("decode path: taken for masks that vary per query", "kernels/decode.py",
             "    if not mask_over_keys_only:\n        return False\n", "",
             ("tests/test_decode_path.py",)),
    Mutation("decode path: empty slots attended", "kernels/decode.py",
             "        logits.masked_fill_(empty, NEG_INF)\n", "",
             ("tests/test_decode_path.py",)),
    Mutation("decode path: ties left in torch's order", "kernels/decode.py",
             "        values, picked = topk_lowest_ties(scores, count)",
             "        values, picked = scores.topk(count, dim=-1)",
             ("tests/test_decode_path.py", "-k", "ties")),
    Mutation("decode path: k / v lengths not checked", "kernels/decode.py",
             '    checks.check_attention_inputs("decode_attention", q, k, v)', "    pass",
             ("tests/test_guards.py", "-k", "unproven")),
    Mutation("compiled tie rule: tied rows not fixed", "kernels/topk.py",
             "        return (torch.where(redo[..., None], fixed_values, values),\n"
             "                torch.where(redo[..., None], fixed_picked, picked))",
             "        return values, picked",
             ("tests/test_decode_path.py", "-k", "tie_rule")),
    Mutation("static index cache: written at the wrong place", "dsa_compile/key_cache.py",
             "    return torch.arange(new, device=written.device) + (written - new)",
             "    return torch.arange(new, device=written.device) + (written - new - 1).clamp(min=0)",
             ("tests/test_hf_attention.py", "-k", "static")),
]

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache",
                              ".ruff_cache", "build", "dist")


@dataclass(frozen=True)
class Outcome:
    """One pytest run: its exit status, wall time and the first failing test (if any)."""

    status: int | None  # None: timed out
    seconds: float
    failure: str

    @property
    def verdict(self) -> str:
        """KILLED, SURVIVED, TIMEOUT (killed by a hang) or INVALID (pytest itself failed)."""
        return {0: "SURVIVED", 1: "KILLED", None: "TIMEOUT"}.get(self.status, "INVALID")


def stage(root: Path, dest: Path, rev: str | None = None,
          overlay: tuple[str, ...] = ()) -> tuple[Path, list[str]]:
    """Copies the working tree of ``root`` (or its commit ``rev``, with the working-tree
    versions of the ``overlay`` paths on top) to ``dest/repo``, and lays its packages out in
    ``dest/site`` as ``pyproject.toml``'s ``package-dir`` maps them (links into the copy).
    Returns the directory to put on ``PYTHONPATH`` and the packages laid out."""
    repo, site = dest / "repo", dest / "site"
    if rev is None:
        shutil.copytree(root, repo, ignore=SKIP, symlinks=True)
    else:
        repo.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(root), "archive", rev], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
        for path in overlay:
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            if (root / path).is_dir():
                shutil.copytree(root / path, repo / path, ignore=SKIP, dirs_exist_ok=True)
            else:
                shutil.copy2(root / path, repo / path)
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = sorted(config.get("package-dir", {}), key=lambda p: p.count("."))
    for package in packages:
        source = repo / config["package-dir"][package]
        target = site.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in source.iterdir():
            link = target / entry.name
            if not link.exists():
                link.symlink_to(entry)
    return site, packages


def apply(path: Path, old: str, new: str) -> str:
    """Replaces the one occurrence of ``old`` in ``path``; returns the original text."""
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise ValueError(f"{path.name}: the old text occurs {count} times (must be exactly once)")
    path.write_text(text.replace(old, new))
    return text


def run_tests(python: str, repo: Path, site: Path, tests: tuple[str, ...],
              timeout: float) -> Outcome:
    """Runs ``python -P -m pytest -x -q <tests>`` in ``repo`` with ``site`` imported first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                                    os.environ.get("PYTHONPATH")])),
               PYTHONDONTWRITEBYTECODE="1")  # no stale bytecode of a same-size edit
    command = [python, "-P", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(None, time.monotonic() - start, "")
    failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", done.stdout, re.MULTILINE)
    why = re.search(r"^E +(.+)$", done.stdout, re.MULTILINE)
    failure = failed.group(1).removeprefix("tests/") if failed else ""
    if why:
        failure += f" ({why.group(1).strip()[:70]})"
    if done.returncode not in (0, 1):  # collection error, no tests, internal error
        failure = ((done.stdout + done.stderr).strip().splitlines() or [""])[-1]
    return Outcome(done.returncode, time.monotonic() - start, failure)


def check_imports(python: str, repo: Path, site: Path, packages: list[str]) -> None:
    """Fails unless the copy's packages (not the checkout's editable install) get imported."""
    probe = "import importlib, sys; print('\\n'.join(importlib.import_module(p).__file__ " \
            "for p in sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([python, "-P", "-c", probe, *packages], cwd=repo, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the copy does not import: {done.stderr.strip().splitlines()[-1:]}")
    for line in done.stdout.split():
        if not Path(line).is_relative_to(site):
            raise RuntimeError(f"the copy is not the one imported: {line}")


def report(rows: list[tuple[str, str, float, str]]) -> str:
    """A plain-text table: verdict, seconds, mutation name, first failing test (and why)."""
    width = max((len(name) for _, name, _, _ in rows), default=8)
    lines = [f"{'result':<8}  {'secs':>5}  {'mutation':<{width}}  first failing test (first error line)"]
    lines += [f"{verdict:<8}  {secs:5.1f}  {name:<{width}}  {detail}"
              for verdict, name, secs, detail in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="only", default="", help="run the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository to copy")
    parser.add_argument("--rev", help="copy this commit instead of the working tree (while the "
                        "working tree is mid-edit)")
    parser.add_argument("--with", dest="overlay", action="append", default=[], metavar="PATH",
                        help="with --rev: take this file or folder from the working tree")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.file}]  pytest {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        site, packages = stage(args.root, Path(tmp), args.rev, tuple(args.overlay))
        repo = Path(tmp) / "repo"
        try:
            check_imports(args.python, repo, site, packages)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 2
        for tests in dict.fromkeys(m.tests for m in chosen):  # unmutated, once per selection
            base = run_tests(args.python, repo, site, tests, args.timeout)
            if base.status != 0:
                print(f"the tests fail without any mutation (pytest {' '.join(tests)}): "
                      f"{base.failure}", file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            path = repo / m.file
            try:
                original = apply(path, m.old, m.new)
            except (OSError, ValueError) as error:
                rows.append(("STALE", m.name, 0.0, str(error)))
                continue
            try:
                outcome = run_tests(args.python, repo, site, m.tests, args.timeout)
            finally:
                path.write_text(original)
            rows.append((outcome.verdict, m.name, outcome.seconds, outcome.failure))
            print(f"{outcome.verdict:<8} {m.name}", file=sys.stderr, flush=True)
    print(report(rows))
    bad = [r for r in rows if r[0] not in ("KILLED", "TIMEOUT")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutations killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
