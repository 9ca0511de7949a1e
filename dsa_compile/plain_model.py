"""A Llama-shaped decoder in plain PyTorch (no transformers): the dense baseline whose attention
is one ``F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)`` call a layer.

Inductor compiles that call to flash attention with causal block skipping, the best dense
attention there is. HF's Llama under ``torch.compile`` with torch < 2.14 feeds SDPA a
materialised ``[1, 1, L, L]`` mask instead (about twice the attention work on an H200,
BENCHMARKS.md), so comparing ``backend="dsa"`` against Inductor on this model measures the
sparse attention against the best dense one rather than against that mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE layout (what the pass recognises as rotary)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Block(nn.Module):
    """Pre-norm attention (GQA, RoPE, causal SDPA) and SwiGLU MLP; ``[B, L, hidden]`` in and out."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, intermediate: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, hidden // heads
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, heads * self.dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.o_proj = nn.Linear(heads * self.dim, hidden, bias=False)
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, self.heads, self.dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class PlainDecoder(nn.Module):
    """Token ids ``[B, L]`` -> final hidden states ``[B, L, hidden]`` (random weights)."""

    def __init__(self, layers: int, hidden_size: int, num_attention_heads: int,
                 num_key_value_heads: int, intermediate_size: int, vocab_size: int = 1000,
                 rope_theta: float = 500000.0, **_unused: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(Block(hidden_size, num_attention_heads, num_key_value_heads,
                                          intermediate_size) for _ in range(layers))
        self.norm = RMSNorm(hidden_size)
        dim = hidden_size // num_attention_heads
        self.register_buffer("inv_freq", rope_theta ** -(torch.arange(0, dim, 2).float() / dim),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        angles = torch.arange(ids.shape[1], device=ids.device).float()[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def plain_decoder(layers: int, shape: dict, seed: int = 0) -> PlainDecoder:
    """A :class:`PlainDecoder` with ``layers`` layers of ``shape`` (``dsa_compile.bench``'s
    ``MODEL_SHAPE`` / ``LLAMA_8B_SHAPE`` keys), in eval mode."""
    torch.manual_seed(seed)
    return PlainDecoder(layers, **{k: v for k, v in shape.items() if k != "num_hidden_layers"}).eval()
