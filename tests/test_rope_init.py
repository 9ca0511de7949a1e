"""The RoPE-aware training-free indexer init: it commutes with RoPE, the rewrite picks it when a
site applies RoPE (and only then), and it selects better than the plain init under RoPE."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from models import tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import dsa_compile
from dsa_compile import indexer_scores
from dsa_compile.backend import make_backend
from dsa_compile.config import DSAConfig
from dsa_compile.passes.indexer_init import initial_indexer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "rope_init_recall.py"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()


def _llama_qk(length: int, shift: int = 0):
    """Pre-RoPE q [1, H, L, D], k [1, Hkv, L, D] of the tiny Llama's layer 0, cos/sin at
    positions ``7 t + shift`` (spread out: every plane turns visibly), the inverse frequencies
    and the q/k weights."""
    model = tiny_model("llama", "sdpa")
    attn = model.model.layers[0].self_attn
    heads, kv_heads, dim = 4, 2, attn.head_dim
    x = torch.randn(1, length, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    q = attn.q_proj(x).view(1, length, heads, dim).transpose(1, 2).detach()
    k = attn.k_proj(x).view(1, length, kv_heads, dim).transpose(1, 2).detach()
    cos, sin = model.model.rotary_emb(x, torch.arange(length)[None] * 7 + shift)
    return q, k, cos, sin, model.model.rotary_emb.inv_freq, attn.q_proj.weight, attn.k_proj.weight


def _index(init, q: torch.Tensor, k: torch.Tensor):
    batch, heads, length, dim = q.shape
    index_heads = init.head_weights.shape[0]
    q_idx = (q.transpose(1, 2).reshape(batch, length, -1) @ init.q_proj)
    k_idx = k.transpose(1, 2).reshape(batch, length, -1) @ init.k_proj
    return q_idx.view(batch, length, index_heads, -1), k_idx


def _rotate_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates indexer dims (2p, 2p + 1) by ``angles [L, P]`` (x: [B, L, (HI,) DI])."""
    if x.dim() == 4:
        angles = angles[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def test_rope_aware_projection_commutes_with_rope():
    length = 40
    q, k, cos, sin, inv_freq, wq, wk = _llama_qk(length)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    positions = torch.arange(length)[:, None].double() * 7
    for rotary in (True, False):
        init = initial_indexer(4, 2, 16, 2, 12, wq.detach(), wk.detach(), rotary=rotary)
        weights = init.head_weights.expand(1, length, -1)
        after = indexer_scores(*_index(init, q_rot, k_rot), weights)  # RoPE, then projection
        if rotary:
            assert len(init.rotary_planes) == 6 and init.k_proj.shape == (32, 12)
            torch.testing.assert_close(init.k_proj.T @ init.k_proj, torch.eye(12),
                                       atol=1e-5, rtol=0)
            angles = (positions * inv_freq[list(init.rotary_planes)].double()).float()
            q_idx, k_idx = _index(init, q, k)  # projection, then RoPE on the indexer pairs
            before = indexer_scores(_rotate_pairs(q_idx, angles), _rotate_pairs(k_idx, angles),
                                    weights)
            torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
        else:  # the plain eigenbasis does not commute: RoPE changes what it keeps
            plain_before = indexer_scores(*_index(init, q, k), weights)
            assert (after - plain_before).abs().max() > 0.1 * after.abs().max()


def test_rope_aware_scores_depend_on_relative_position_only():
    q, k, cos, sin, _, wq, wk = _llama_qk(24)
    _, _, cos_shifted, sin_shifted, *_ = _llama_qk(24, shift=13)
    for rotary in (True, False):
        init = initial_indexer(4, 2, 16, 2, 8, wq.detach(), wk.detach(), rotary=rotary)
        weights = init.head_weights.expand(1, 24, -1)
        at, shifted = (indexer_scores(*_index(init, *apply_rotary_pos_emb(q, k, c, s)), weights)
                       for c, s in ((cos, sin), (cos_shifted, sin_shifted)))
        if rotary:  # every token 13 positions later: the same scores
            torch.testing.assert_close(at, shifted, atol=1e-4, rtol=1e-4)
        else:
            assert (at - shifted).abs().max() > 0.1 * at.abs().max()


def _indexers(model: torch.nn.Module, *inputs: torch.Tensor, **options) -> list:
    results = []
    config = DSAConfig.from_options({"mode": "eager", "topk": 4, **options})
    with torch.no_grad():
        torch.compile(model, backend=make_backend(config, results.append))(*inputs)
    return [(site, dict(zip(result.names, result.indexers, strict=True)))
            for result in results for site in result.sites]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_rewrite_picks_the_rope_aware_init_on_llama(impl):
    model = tiny_model("llama", impl)
    sites = _indexers(model, torch.randint(0, 100, (1, 12)), index_heads=2, index_dim=8)
    assert len(sites) == 2
    for site, _ in sites:
        assert site.index_init.startswith("weights, RoPE-aware"), site.index_init
    indexers = sites[0][1]
    (name, indexer), *_ = indexers.items()
    attn = model.model.layers[0].self_attn
    want = initial_indexer(4, 2, 16, 2, 8, attn.q_proj.weight.detach(),
                           attn.k_proj.weight.detach(), rotary=True)
    assert name == "model.layers.0.self_attn.dsa_indexer"
    torch.testing.assert_close(indexer.k_proj, want.k_proj)
    torch.testing.assert_close(indexer.q_proj, want.q_proj)
    report = dsa_compile.explain(model, torch.randint(0, 100, (1, 12)), topk=4)
    assert "RoPE-aware" in report.table()


def test_rewrite_keeps_the_plain_init_without_rope():
    sites = _indexers(tiny_model("bert", "sdpa"), torch.randint(0, 100, (1, 12)))
    assert sites and all(s.index_init.startswith("weights (top-") for s, _ in sites)


class _RopeAttention(torch.nn.Module):
    """One attention layer whose positional rotation is spelled in several ways."""

    def __init__(self, spelling: str, heads: int = 2, dim: int = 8):
        super().__init__()
        self.spelling, self.heads, self.dim = spelling, heads, dim
        self.q = torch.nn.Linear(heads * dim, heads * dim, bias=False)
        self.k = torch.nn.Linear(heads * dim, heads * dim, bias=False)
        self.v = torch.nn.Linear(heads * dim, heads * dim, bias=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        if self.spelling == "interleaved":  # GPT-J: planes (2i, 2i + 1)
            rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
            return x * cos + rotated * sin
        if self.spelling == "partial":  # only the first half of the head dims rotates
            part = x[..., :half]
            rotated = torch.cat([-part[..., half // 2 :], part[..., : half // 2]], dim=-1)
            return torch.cat([part * cos[..., :half] + rotated * sin[..., :half], x[..., half:]], -1)
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        if self.spelling == "swapped":
            return sin * rotated + cos * x
        return x * cos + rotated * sin

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        angles = torch.arange(length)[:, None] * 0.5 ** torch.arange(self.dim // 2)
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q, k, v = (p(x).view(batch, length, self.heads, self.dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        if self.spelling != "none":
            q = self._rope(q, cos, sin).contiguous()
            if self.spelling != "q_only":
                k = self._rope(k, cos, sin).float()
        if past is not None:  # a KV cache given as an input: past keys and values first
            k, v = torch.cat([past, k], dim=2), torch.cat([past, v], dim=2)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize(("spelling", "rope_aware"), [
    ("rotate_half", True), ("swapped", True), ("cache", True),
    ("interleaved", False), ("partial", False), ("q_only", False), ("none", False),
])
def test_rope_detection_by_spelling(spelling, rope_aware):
    inputs = (torch.randn(1, 10, 16),) + ((torch.randn(1, 2, 6, 8),) if spelling == "cache" else ())
    sites = _indexers(_RopeAttention(spelling).eval(), *inputs)
    assert len(sites) == 1
    init = sites[0][0].index_init
    assert init.startswith("weights, RoPE-aware" if rope_aware else "weights (top-"), init


def test_rope_aware_init_selects_better_under_rope_on_minilm():
    """MiniLM with synthetic RoPE (8K-context angles), two layers: the RoPE-aware init keeps
    clearly more attention mass than the plain eigenbasis (0.30 / 0.26 vs 0.27 / 0.21 when
    measured)."""
    spec = importlib.util.spec_from_file_location("rope_init_recall", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(layers=[1, 2], settings={"rope_8k": 16}, rows=("plain", "rope"))
    plain, rope = result["rope_8k"]["plain"], result["rope_8k"]["rope"]
    for p, r in zip(plain, rope, strict=True):
        assert r > p + 0.02, (plain, rope)
