"""Training-free indexer init under RoPE: the plain eigenbasis against the RoPE-aware one.

No RoPE model ships offline, so this takes the real MiniLM (all-MiniLM-L6-v2, 12 heads x 32
dims, absolute positions) on 512 tokens of Python's pydoc topics and applies rotary embeddings
synthetically (HF Llama's rotate_half, base 10000) to each layer's per-head q and k, computed
from the unmodified model's hidden states entering that layer. On those rotated q and k (what
a rewritten site's indexer sees) it measures the attention-mass recall of top-k selections
(mean over heads and queries; attention = softmax of the rotated logits, no mask):

- best head-shared: top-k of the head-averaged attention (the best any shared choice can do);
- full-dim q.k: top-k of the head-summed logits ``sum_h q_h . k_h`` over all 384 dims;
- plain init: ``initial_indexer`` as for a site without RoPE (top eigenvectors of
  ``Wk Wk^T + Wq Wq^T``), applied post-RoPE;
- RoPE-aware init: ``initial_indexer(rotary=True)`` (per-plane eigenvector pairs; commutes);
- reference, not in the package: top eigenvectors of the same weight covariance averaged over
  the rotations of the measured positions (``mean_t R_t C R_t^T``; does not commute, and needs
  the frequencies and the range of positions in advance).

The inits are selected through :func:`dsa_attention` (exact per-query top-k, HI=4, DI=32), as a
rewritten site would. Three settings: RoPE at positions 0..511; RoPE at positions 0, 16, ...,
8176 (the same tokens, with the rotation angles of an 8K-token context: slow rotary planes turn
by 16x more); no RoPE (MiniLM as it is).

    python benchmarks/rope_init_recall.py --out benchmarks/results/rope_init_recall
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

from dsa_compile.demo import load_minilm, real_text_ids
from dsa_compile.kernels.attention import capture_selections, dsa_attention
from dsa_compile.passes.indexer_init import (
    IndexerInit,
    indexer_from_basis,
    initial_indexer,
    weight_covariance,
)
from dsa_compile.quality import attention_mass_recall, best_head_shared_recall

LENGTH, TOPK, BASE, INDEX_HEADS, INDEX_DIM = 512, 64, 10000.0, 4, 32
ROWS = {"best": "best head-shared (top-k of head-averaged attention)",
        "full": "full-dim head-summed q.k (384 dims)",
        "plain": "plain eigenbasis init (Wk Wk^T + Wq Wq^T), applied post-RoPE",
        "rope": "**RoPE-aware init** (rotary-plane eigenvector pairs)",
        "averaged": "reference: eigenbasis of the position-averaged covariance (not commuting)"}
# setting -> position stride of the synthetic RoPE (None: no RoPE)
SETTINGS = {"rope": 1, "rope_8k": 16, "none": None}
HEADERS = {"rope": "RoPE, positions 0..511", "rope_8k": "RoPE, positions 0,16,..,8176",
           "none": "no RoPE"}


def rotary_angles(length: int, dim: int, stride: int = 1, base: float = BASE) -> torch.Tensor:
    """``[length, dim / 2]`` float64 angles ``theta_f * position`` (positions ``stride * t``)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (torch.arange(length, dtype=torch.float64) * stride)[:, None] * inv_freq


def rotate(x: torch.Tensor, stride: int = 1, base: float = BASE) -> torch.Tensor:
    """HF Llama RoPE (rotate_half layout) of ``x [B, H, L, D]`` at positions ``stride * t``."""
    dim = x.shape[-1]
    angles = rotary_angles(x.shape[-2], dim, stride, base)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def layer_qk(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.nn.Module]]:
    """(q ``[1, H, L, D]``, k, the layer's self-attention) of every layer, before any RoPE."""
    heads = model.config.num_attention_heads
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        out = []
        for layer, x in zip(model.encoder.layer, hidden, strict=False):
            attn = layer.attention.self
            shape = (x.shape[0], x.shape[1], heads, -1)
            out.append((attn.query(x).view(shape).transpose(1, 2),
                        attn.key(x).view(shape).transpose(1, 2), attn))
    return out


def averaged_init(cov: torch.Tensor, heads: int, dim: int, length: int, stride: int
                  ) -> IndexerInit:
    """The reference row: top eigenvectors of ``mean_t R_t cov R_t^T`` over the positions."""
    blocks = cov.view(heads, dim, heads, dim)
    angles = rotary_angles(length, dim, stride)
    half = torch.arange(dim // 2)
    total = torch.zeros_like(blocks)
    for cos, sin in zip(angles.cos(), angles.sin(), strict=True):
        rot = torch.zeros(dim, dim, dtype=torch.float64)
        rot[half, half] = rot[half + dim // 2, half + dim // 2] = cos
        rot[half + dim // 2, half], rot[half, half + dim // 2] = sin, -sin
        total += torch.einsum("ab,gbhc,dc->gahd", rot, blocks, rot)
    _, vectors = torch.linalg.eigh(total.view_as(cov) / length)
    return indexer_from_basis(vectors[:, -INDEX_DIM:].flip(-1), heads, heads, dim, INDEX_HEADS,
                              "position-averaged")


def _recall(init: IndexerInit, q, k, probs, topk: int) -> float:
    with capture_selections() as selections:
        dsa_attention(q, k, k, None, init.q_proj, init.k_proj, init.head_weights,
                      is_causal=False, scale=None, enable_gqa=False, topk=topk,
                      dense_up_to=1 << 30, query_block=1, key_block=0, candidate_blocks=0)
    return attention_mass_recall(probs, selections[0])


def layer_recalls(q: torch.Tensor, k: torch.Tensor, attn, stride: int | None,
                  topk: int = TOPK, rows: tuple[str, ...] = tuple(ROWS)) -> dict[str, float]:
    """The recall of each of ``rows`` on one layer (RoPE at positions ``stride * t``, or none)."""
    heads, dim = q.shape[1], q.shape[3]
    if stride is not None:
        q, k = rotate(q, stride), rotate(k, stride)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * dim**-0.5, dim=-1)
    wq, wk = attn.query.weight.detach(), attn.key.weight.detach()
    out = {}
    for row in rows:
        if row == "best":
            out[row] = best_head_shared_recall(probs, topk)
        elif row == "full":
            summed = torch.einsum("bhtd,bhsd->bts", q, k)
            out[row] = attention_mass_recall(probs, summed.topk(topk, dim=-1).indices)
        elif row == "averaged":
            cov = weight_covariance(wq, wk, heads, heads, dim)
            init = averaged_init(cov, heads, dim, q.shape[2], stride or 0)
            out[row] = _recall(init, q, k, probs, topk)
        else:
            init = initial_indexer(heads, heads, dim, INDEX_HEADS, INDEX_DIM, wq, wk,
                                   rotary=row == "rope")
            out[row] = _recall(init, q, k, probs, topk)
    return out


def measure(layers: list[int] | None = None, length: int = LENGTH, topk: int = TOPK,
            settings: dict[str, int | None] = SETTINGS, rows: tuple[str, ...] = tuple(ROWS)
            ) -> dict[str, dict[str, list[float]]]:
    """``{setting: {row: [recall per layer]}}`` on MiniLM (``layers``: all if None)."""
    model, tokenizer = load_minilm("eager")
    qk = layer_qk(model, real_text_ids(tokenizer, length))
    result: dict[str, dict[str, list[float]]] = {name: {} for name in settings}
    with torch.no_grad():
        for i in range(len(qk)) if layers is None else layers:
            q, k, attn = qk[i]
            for name, stride in settings.items():
                for row, value in layer_recalls(q, k, attn, stride, topk, rows).items():
                    result[name].setdefault(row, []).append(value)
    return result


def format_table(result: dict[str, dict[str, list[float]]], topk: int = TOPK,
                 length: int = LENGTH) -> str:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    names = list(result)
    layers = len(result[names[0]]["best"])
    lines = [f"Attention-mass recall of the top-{topk} of {length} tokens, MiniLM with synthetic "
             f"RoPE (mean of {layers} layers; indexer HI={INDEX_HEADS}, DI={INDEX_DIM}).", "",
             "| selection | " + " | ".join(HEADERS[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {ROWS[r]} | " + " | ".join(f"{mean(result[n][r]):.3f}" for n in names) + " |"
              for r in ROWS if r in result[names[0]]]
    for name in names:
        if name == "none":
            continue
        lines += ["", f"{HEADERS[name]}, per layer:", "",
                  "| selection | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
                  "|---|" + "---|" * layers]
        lines += [f"| {r} | " + " | ".join(f"{v:.3f}" for v in values) + " |"
                  for r, values in result[name].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/rope_init_recall",
                        help="writes <out>.md")
    parser.add_argument("--length", type=int, default=LENGTH)
    parser.add_argument("--topk", type=int, default=TOPK)
    args = parser.parse_args(argv)
    table = format_table(measure(length=args.length, topk=args.topk), args.topk, args.length)
    print(table)
    stamp = (f"\n\n`python benchmarks/rope_init_recall.py`, {datetime.date.today()}, "
             f"torch {torch.__version__}, {platform.machine()} CPU.\n")
    out = Path(args.out).with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# RoPE-aware training-free indexer init\n\n" + table + stamp)
    return table


if __name__ == "__main__":
    main()
