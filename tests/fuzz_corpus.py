"""A fuzz corpus of attention spellings: what a hostile but fair user writes.

Every entry (:class:`Case`) is a small module, a factory for its inputs (fixed seeds), and what
is true of the module whatever the pass decides: ``causal`` (no query ever sees a later token),
and, for single-site standard spellings, a ``reference`` that computes the module's output with
each query restricted to the keys a rewritten site selected. ``kind`` is informational only
(``standard``, ``near_miss``, ``not_attention``): nothing here says whether a site *should* be
rewritten; ``tests/test_fuzz_corpus.py`` checks semantics only (exactness with every key,
causality and the selected-keys reference with fewer).

Add an entry by appending one :func:`qkv_case` / :func:`x_case` / :class:`Case` below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("standard", "near_miss", "not_attention")

B, H, D = 2, 4, 16  # batch, heads, head dim of the q/k/v spellings
E = 32  # model width of the x -> projections spellings (4 heads of 8)
NEG_INF = float("-inf")
FMIN = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class Case:
    """One spelling.

    - ``make_module()`` / ``make_inputs()``: fresh, deterministic module and inputs (a tuple).
    - ``seq_len``: the longest sequence in the case; ``topk = seq_len`` selects every key.
    - ``causal``: the module never lets a query see a later token (checked by perturbing the
      inputs at positions >= p along ``seq_dims``, one dim or None per input).
    - ``out_seq_dims``: the query-position dim of each output (one int per output).
    - ``reference(module, inputs, indices)``: the output when query t attends only to the keys
      in ``indices[b, t]`` (``[batch, Lq, topk]``, -1 = empty; batch as the site sees it).
    """

    name: str
    kind: str
    make_module: Callable[[], nn.Module]
    make_inputs: Callable[[], tuple]
    seq_len: int
    causal: bool = False
    seq_dims: tuple[int | None, ...] = ()
    out_seq_dims: tuple[int, ...] = (2,)
    reference: Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor] | None = None
    note: str = ""

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        assert 24 <= self.seq_len <= 300, (self.name, self.seq_len)

    def perturb(self, inputs: tuple, p: int, seed: int = 1234) -> tuple:
        """``inputs`` with every position >= p along each input's sequence dim replaced."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for x, dim in zip(inputs, self.seq_dims, strict=True):
            if dim is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
                out.append(x)
                continue
            x = x.clone()
            tail = x.narrow(dim, p, x.shape[dim] - p)
            tail.copy_(3.0 * torch.randn(tail.shape, generator=gen).to(x.dtype) + 1.0)
            out.append(x)
        return tuple(out)


# ------------------------------------------------------------------------------------------
# Modules.


class Spelling(nn.Module):
    """``fn(self, *inputs)``: attention written out by a user over given q, k, v (+ extras).
    ``tensors`` become parameters (``nn.Parameter``) or buffers of the module."""

    def __init__(self, fn: Callable, tensors: dict[str, torch.Tensor] | None = None,
                 children: dict[str, nn.Module] | None = None):
        super().__init__()
        self.fn = fn
        for name, value in (tensors or {}).items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)
        for name, child in (children or {}).items():
            self.add_module(name, child)

    def forward(self, *inputs):
        return self.fn(self, *inputs)


class Projected(nn.Module):
    """A model layer: ``x [B, L, E]`` -> q/k/v projections -> ``fn(self, q, k, v, *rest)`` ->
    output projection. ``qkv`` and ``finish`` let a reference recompute the site's operands."""

    def __init__(self, fn: Callable, heads: int = 4, kv_heads: int | None = None,
                 tensors: dict[str, torch.Tensor] | None = None, dtype=torch.float32):
        super().__init__()
        self.fn, self.heads, self.kv_heads = fn, heads, kv_heads or heads
        self.head_dim = E // heads
        self.q_proj = nn.Linear(E, heads * self.head_dim)
        self.k_proj = nn.Linear(E, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(E, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, E)
        for name, value in (tensors or {}).items():
            self.register_buffer(name, value)
        self.to(dtype)

    def qkv(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def finish(self, out):
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x, *rest):
        return self.finish(self.fn(self, *self.qkv(x), *rest))


def built(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """A module factory with fixed weights (the global RNG is left as it was), in eval mode
    unless the factory set training itself."""

    def make():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return factory()

    return make


# ------------------------------------------------------------------------------------------
# Small helpers a user would write.


def tril(n: int, m: int | None = None, device=None) -> torch.Tensor:
    """bool [n, m]: query t may see key s <= t."""
    return torch.ones(n, n if m is None else m, dtype=torch.bool, device=device).tril()


def additive(keep: torch.Tensor, fill: float = NEG_INF, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, fill)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF's repeat_kv: [B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]."""
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def rel_bias(n: int, heads: int = H, seed: int = 5) -> torch.Tensor:
    """A real-valued relative-position bias [heads, n, n] (a T5-like bucket table lookup)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(33, heads, generator=gen)
    pos = torch.arange(n)
    return table[(pos[None, :] - pos[:, None]).clamp(-16, 16) + 16].permute(2, 0, 1).contiguous()


def alibi(n: int, heads: int = H, causal: bool = True) -> torch.Tensor:
    """ALiBi [heads, n, n]: -slope_h * distance (-inf above the diagonal when causal)."""
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)])
    pos = torch.arange(n)
    distance = (pos[:, None] - pos[None, :]).abs().float()
    bias = -slopes[:, None, None] * distance
    return bias.masked_fill(~tril(n), NEG_INF) if causal else bias


# ------------------------------------------------------------------------------------------
# References: dense attention restricted to the selected keys.


def restricted_attention(q, k, v, indices, *, scale=None, mask=None, causal=False):
    """``softmax(scale * q k^T + mask) v`` where query t only sees ``indices[b, t]`` (and what
    ``mask`` / ``causal`` allow). q ``[B, H, Lq, D]`` or ``[N, Lq, D]``; k, v may have fewer
    heads (GQA); ``indices [batch, Lq, topk]`` with batch B (or N; B when the site regrouped
    ``[B*H]`` scores as ``[B, H]``). A query whose selection holds none of the keys the mask
    lets it see gets zeros."""
    flat = None
    if q.dim() == 3 and indices.shape[0] != q.shape[0]:  # a [B*H] site seen as [B, H]
        flat = q.shape[0]
        q, k, v = (x.unflatten(0, (indices.shape[0], -1)) for x in (q, k, v))
        if isinstance(mask, torch.Tensor) and mask.dim() == 3:
            mask = mask.unflatten(0, (indices.shape[0], -1))
    if q.dim() == 4 and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    if q.dim() == 4 and v.shape[1] != q.shape[1]:
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    lq, lk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool \
            else logits + mask.float()
    if causal:
        logits = logits.masked_fill(~tril(lq, lk), NEG_INF)
    idx = indices.long().clone()
    idx[idx < 0] = lk
    keep = torch.zeros(indices.shape[0], lq, lk + 1, dtype=torch.bool)
    keep.scatter_(2, idx, True)
    keep = keep[..., :lk]
    if logits.dim() == 4:
        keep = keep[:, None]
    restricted = logits.masked_fill(~keep, NEG_INF)
    probs = torch.softmax(restricted, -1)
    # A query that the mask lets see some key, but whose selection holds none of them, attends
    # to nothing: zeros (dsa::sparse_attention's contract for an empty row, SDPA's for a fully
    # masked one). A query the mask itself removes every key from keeps eager's NaN.
    nothing_selected = torch.isneginf(restricted).all(-1) & ~torch.isneginf(logits).all(-1)
    probs = probs.masked_fill(nothing_selected[..., None], 0.0)
    out = (probs @ v.float()).to(q.dtype)
    return out.flatten(0, 1) if flat is not None else out


def ref_qkv(scale=None, causal=False, mask: Callable | None = None, q_of=None, v_of=None):
    """A reference for ``module(q, k, v, ...)`` spellings; ``mask(module, inputs)`` gives the
    effective additive / boolean mask, ``q_of`` / ``v_of`` the effective q / v."""

    def reference(module, inputs, indices):
        q, k, v = inputs[:3]
        q = q if q_of is None else q_of(module, inputs)
        v = v if v_of is None else v_of(module, inputs)
        m = None if mask is None else mask(module, inputs)
        return restricted_attention(q, k, v, indices, scale=scale, mask=m, causal=causal)

    return reference


def ref_projected(scale=None, causal=False, mask: Callable | None = None):
    """A reference for :class:`Projected` layers (operands recomputed from x)."""

    def reference(module, inputs, indices):
        q, k, v = module.qkv(inputs[0])
        m = None if mask is None else mask(module, inputs)
        out = restricted_attention(q, k, v, indices, scale=scale, mask=m, causal=causal)
        return module.finish(out)

    return reference


# ------------------------------------------------------------------------------------------
# Case builders.


def qkv_inputs(n: int, *, batch: int = B, heads: int = H, kv_heads: int | None = None,
               dim: int = D, lq: int | None = None, dtype=torch.float32, seed: int = 0,
               extra: Callable[[torch.Generator, int], tuple] | None = None):
    def make():
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, heads, lq or n, dim, generator=gen).to(dtype)
        k = torch.randn(batch, kv_heads or heads, n, dim, generator=gen).to(dtype)
        v = torch.randn(batch, kv_heads or heads, n, dim, generator=gen).to(dtype)
        return (q, k, v, *(extra(gen, n) if extra else ()))

    return make


CORPUS: list[Case] = []


def add(case: Case) -> Case:
    assert all(c.name != case.name for c in CORPUS), case.name
    CORPUS.append(case)
    return case


def qkv_case(name: str, kind: str, fn: Callable, n: int, *, causal: bool = False,
             reference=None, tensors: Callable[[], dict] | None = None,
             extra: Callable[[torch.Generator, int], tuple] | None = None, n_extra: int = 0,
             extra_seq_dims: tuple | None = None, out_seq_dims: tuple = (2,), note: str = "",
             **input_kw) -> Case:
    """A :class:`Spelling` over q, k, v ``[B, H, L, D]`` inputs (+ ``extra`` inputs, whose
    sequence dims are ``extra_seq_dims``, default: not perturbed)."""
    lq = input_kw.get("lq") or n
    return add(Case(
        name=name, kind=kind,
        make_module=built(lambda: Spelling(fn, tensors() if tensors else None).eval()),
        make_inputs=qkv_inputs(n, extra=extra, **input_kw),
        seq_len=max(n, lq), causal=causal,
        seq_dims=(2, 2, 2, *(extra_seq_dims or (None,) * n_extra)),
        out_seq_dims=out_seq_dims, reference=reference, note=note,
    ))


def x_case(name: str, kind: str, factory: Callable[[], nn.Module], n: int, *, causal=False,
           batch: int = B, width: int = E, reference=None, seq_dim: int = 1,
           extra: Callable[[torch.Generator, int], tuple] | None = None, n_extra: int = 0,
           out_seq_dims: tuple = (1,), dtype=torch.float32, seed: int = 0, note: str = "") -> Case:
    """A module over one ``x [B, L, width]`` input (``[L, B, width]`` when ``seq_dim`` is 0)."""

    def make_inputs():
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, n, width) if seq_dim == 1 else (n, batch, width)
        x = torch.randn(shape, generator=gen).to(dtype)
        return (x, *(extra(gen, n) if extra else ()))

    return add(Case(
        name=name, kind=kind, make_module=built(factory), make_inputs=make_inputs, seq_len=n,
        causal=causal, seq_dims=(seq_dim, *(None,) * n_extra), out_seq_dims=out_seq_dims,
        reference=reference, note=note,
    ))


def padding(pad_last: Sequence[int]) -> Callable[[torch.Generator, int], tuple]:
    """A bool [B, L] key mask, True = a real token; row b has its last pad_last[b] padded."""

    def make(gen, n):
        keep = torch.ones(len(pad_last), n, dtype=torch.bool)
        for b, p in enumerate(pad_last):
            if p:
                keep[b, n - p:] = False
        return (keep,)

    return make


def sqrt_d(q: torch.Tensor) -> float:
    return math.sqrt(q.shape[-1])


# ==========================================================================================
# Standard spellings.
# ==========================================================================================

qkv_case("sdpa_plain", "standard", lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v), 32)

qkv_case("sdpa_is_causal", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 64,
         causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_is_causal_positional", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, None, 0.0, True), 24,
         causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_bool_tril_mask", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()),
         48, causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_additive_neg_inf_scale", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=additive(tril(q.shape[2])), scale=0.2),
         40, causal=True, reference=ref_qkv(scale=0.2, causal=True))

qkv_case("sdpa_additive_finfo_min_triu", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=torch.full((q.shape[2], q.shape[2]), FMIN).triu(1)[None, None]),
         56, causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_scale_only", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.05), 24)

qkv_case("sdpa_enable_gqa_causal", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True),
         64, kv_heads=2, causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_mqa_enable_gqa", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True),
         40, kv_heads=1, causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_repeat_kv_bool_mask", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=tril(q.shape[2])),
         32, kv_heads=2, causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_bool_padding_mask", "standard",
         lambda m, q, k, v, keep: F.scaled_dot_product_attention(
             q, k, v, attn_mask=keep[:, None, None, :]),
         40, extra=padding([0, 7]), n_extra=1)

qkv_case("sdpa_padding_and_causal", "standard",
         lambda m, q, k, v, keep: F.scaled_dot_product_attention(
             q, k, v, attn_mask=keep[:, None, None, :] & tril(q.shape[2])),
         48, extra=padding([0, 9]), n_extra=1, causal=True,
         reference=ref_qkv(mask=lambda m, i: i[3][:, None, None, :] & tril(i[0].shape[2])))

qkv_case("sdpa_cross_attention", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v), 48, lq=24)

qkv_case("sdpa_alibi_causal_bias", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m.alibi), 48,
         tensors=lambda: {"alibi": alibi(48)}, causal=True,
         reference=ref_qkv(mask=lambda m, i: m.alibi))

qkv_case("sdpa_rank2_relative_bias", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m.bias), 32,
         tensors=lambda: {"bias": rel_bias(32)[0]})

qkv_case("sdpa_rank3_head_bias_causal", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=m.bias.masked_fill(~tril(q.shape[2]), NEG_INF)),
         40, tensors=lambda: {"bias": rel_bias(40)}, causal=True,
         reference=ref_qkv(mask=lambda m, i: m.bias.masked_fill(~tril(40), NEG_INF)))

qkv_case("sdpa_additive_1e9_causal", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=additive(tril(q.shape[2]), -1e9)),
         48, causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_bottom_right_causal_mask", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
             .tril(k.shape[2] - q.shape[2])),
         40, lq=24, note="decode-style: the queries are the last 24 of 40 positions")

qkv_case("sdpa_dropout_if_training", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, dropout_p=0.1 if m.training else 0.0, is_causal=True),
         32, causal=True, reference=ref_qkv(causal=True))

qkv_case("sdpa_fp16_causal", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 32,
         dtype=torch.float16, causal=True, reference=ref_qkv(causal=True))


def _hf_arange_causal(m, q, k, v):
    n = q.shape[2]
    cache_position = torch.arange(n, device=q.device)
    mask = torch.arange(n, device=q.device)[None, :] <= cache_position[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])


x_case("sdpa_hf_arange_mask_projected", "standard", lambda: Projected(_hf_arange_causal).eval(),
       64, causal=True, reference=ref_projected(causal=True))

x_case("sdpa_gqa_projected", "standard",
       lambda: Projected(lambda m, q, k, v: F.scaled_dot_product_attention(
           q, k, v, is_causal=True, enable_gqa=True), kv_heads=2).eval(),
       128, causal=True, reference=ref_projected(causal=True))


def _cross_attention_module():
    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.kv_proj = nn.Linear(E, E), nn.Linear(E, 2 * E)

        def forward(self, x, context):
            b, n, _ = x.shape
            q = self.q_proj(x).view(b, n, 4, 8).transpose(1, 2)
            k, v = self.kv_proj(context).view(b, -1, 2, 4, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, E)

    return CrossAttention().eval()


x_case("sdpa_cross_attention_projected", "standard", _cross_attention_module, 64,
       extra=lambda gen, n: (torch.randn(B, 24, E, generator=gen),), n_extra=1)


def _hf_eager_attention(m, q, k, v, attention_mask):
    """transformers' eager_attention_forward (Llama), GQA through repeat_kv."""
    key_states = repeat_kv(k, m.heads // m.kv_heads)
    value_states = repeat_kv(v, m.heads // m.kv_heads)
    scaling = m.head_dim ** -0.5
    attn_weights = torch.matmul(q, key_states.transpose(2, 3)) * scaling
    causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = attn_weights + causal_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=0.1, training=m.training)
    return torch.matmul(attn_weights, value_states)


def hf_causal_mask(dtype=torch.float32):
    def make(gen, n):
        mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
        return (mask[None, None].expand(B, 1, n, n).contiguous(),)

    return make


x_case("hf_eager_llama_gqa", "standard",
       lambda: Projected(_hf_eager_attention, kv_heads=2).eval(), 96,
       extra=hf_causal_mask(), n_extra=1, causal=True,
       reference=ref_projected(causal=True))

x_case("hf_eager_llama_L300", "standard",
       lambda: Projected(_hf_eager_attention, kv_heads=4).eval(), 300,
       extra=hf_causal_mask(), n_extra=1, causal=True,
       reference=ref_projected(causal=True))

x_case("hf_eager_llama_bf16", "standard",
       lambda: Projected(_hf_eager_attention, kv_heads=2, dtype=torch.bfloat16).eval(), 64,
       extra=hf_causal_mask(torch.bfloat16), n_extra=1, causal=True, dtype=torch.bfloat16,
       reference=ref_projected(causal=True))


def _gpt2_old_where(m, q, k, v):
    """GPT-2 (transformers < 4.50): a registered tril buffer and torch.where(finfo.min)."""
    w = torch.matmul(q, k.transpose(-1, -2))
    w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
    nq, nk = q.size(-2), k.size(-2)
    causal_mask = m.bias[:, :, nk - nq: nk, :nk]
    mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
    w = torch.where(causal_mask, w.to(w.dtype), mask_value)
    w = nn.functional.softmax(w, dim=-1)
    return torch.matmul(w, v)


x_case("gpt2_old_where_finfo_min", "standard",
       lambda: Projected(_gpt2_old_where, tensors={"bias": tril(64)[None, None]}).eval(), 64,
       causal=True, reference=ref_projected(causal=True))


def _gpt2_oldest_split_heads(m, q, k, v):
    """GPT-2 (transformers 2.x): keys split as [B, H, D, L] (permute(0, 2, 3, 1)), and the mask
    as w * b - 1e4 * (1 - b)."""
    k_t = k.transpose(1, 2).permute(0, 2, 3, 1)  # what split_heads(k=True) returned
    w = torch.matmul(q, k_t)
    w = w / math.sqrt(v.size(-1))
    nd, ns = w.size(-2), w.size(-1)
    b = m.bias[:, :, ns - nd: ns, :ns]
    w = w * b - 1e4 * (1 - b)
    w = nn.Softmax(dim=-1)(w)
    return torch.matmul(w, v)


x_case("gpt2_oldest_permuted_key_1e4", "standard",
       lambda: Projected(_gpt2_oldest_split_heads,
                         tensors={"bias": tril(40).float()[None, None]}).eval(), 40,
       causal=True, reference=ref_projected(causal=True))


def _bert_old(m, q, k, v, attention_mask):
    """BERT (transformers 3.x): extended mask (1.0 - mask) * -10000.0 added after the scale."""
    extended = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * -10000.0
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(m.head_dim)
    scores = scores + extended
    probs = m.dropout(nn.Softmax(dim=-1)(scores))
    return torch.matmul(probs, v)


def _bert_module(fn):
    def make():
        module = Projected(fn)
        module.dropout = nn.Dropout(0.1)
        return module.eval()

    return make


x_case("bert_old_padding_1e4", "standard", _bert_module(_bert_old), 48,
       extra=lambda gen, n: (padding([0, 11])(gen, n)[0].float(),), n_extra=1)


def _bert_old_causal(m, q, k, v):
    n = q.shape[2]
    extended = (1.0 - torch.ones(n, n).tril()) * -10000.0
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(m.head_dim) + extended
    return torch.matmul(m.dropout(scores.softmax(dim=-1)), v)


x_case("bert_old_causal_1e4", "standard", _bert_module(_bert_old_causal), 64, causal=True,
       reference=ref_projected(causal=True))

qkv_case("einsum_bhqd_masked_fill", "standard",
         lambda m, q, k, v: torch.einsum("bhqk,bhkd->bhqd", torch.einsum(
             "bhqd,bhkd->bhqk", q, k).mul(0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
             .softmax(-1), v),
         48, causal=True, reference=ref_qkv(scale=0.25, causal=True))


def _einsum_blhd(m, q, k, v):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~tril(q.shape[1]), NEG_INF)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def _ref_blhd(module, inputs, indices):
    q, k, v = (x.transpose(1, 2) for x in inputs[:3])
    return restricted_attention(q, k, v, indices, causal=True).transpose(1, 2)


add(Case("einsum_blhd_layout", "standard", built(lambda: Spelling(_einsum_blhd).eval()),
         lambda: tuple(x.transpose(1, 2).contiguous() for x in qkv_inputs(40)()), 40,
         causal=True, seq_dims=(1, 1, 1), out_seq_dims=(1,), reference=_ref_blhd))


def flat_inputs(n, seed=0, extra=None):
    def make():
        q, k, v = (x.flatten(0, 1) for x in qkv_inputs(n, seed=seed)())
        return (q, k, v) if extra is None else (q, k, v, *extra(n))

    return make


add(Case("bmm_flat_heads_additive", "standard",
         built(lambda: Spelling(lambda m, q, k, v: torch.bmm(F.softmax(
             torch.bmm(q, k.transpose(1, 2)) * 0.25 + additive(tril(q.shape[1])), dim=-1), v))
             .eval()),
         flat_inputs(40), 40, causal=True, seq_dims=(1, 1, 1), out_seq_dims=(1,),
         reference=ref_qkv(scale=0.25, causal=True)))

add(Case("baddbmm_mask_alpha", "standard",
         built(lambda: Spelling(lambda m, q, k, v: torch.bmm(torch.softmax(torch.baddbmm(
             additive(tril(q.shape[1])).expand(q.shape[0], -1, -1), q, k.transpose(1, 2),
             alpha=0.3), -1), v)).eval()),
         flat_inputs(32), 32, causal=True, seq_dims=(1, 1, 1), out_seq_dims=(1,),
         reference=ref_qkv(scale=0.3, causal=True)))


add(Case("baddbmm_beta0_nan_input", "near_miss",
         built(lambda: Spelling(lambda m, q, k, v: torch.bmm(torch.softmax(torch.baddbmm(
             torch.full((q.shape[0], q.shape[1], k.shape[1]), float("nan")), q,
             k.transpose(1, 2), beta=0.0, alpha=0.25).masked_fill(~tril(q.shape[1]), NEG_INF),
             -1), v)).eval()),
         flat_inputs(32), 32, causal=True, seq_dims=(1, 1, 1), out_seq_dims=(1,),
         reference=ref_qkv(scale=0.25, causal=True),
         note="beta=0: baddbmm ignores its input, NaN included"))


def _bloom(m, q, k, v):
    """BLOOM: baddbmm(alibi [B*H, 1, L]), a [B, H] view masked with finfo.min, fp32 softmax."""
    bh, n, d = q.shape
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    alibi_ = (slopes[:, None] * torch.arange(n)[None, :].float()).repeat(bh // H, 1)[:, None, :]
    scores = alibi_.baddbmm(batch1=q, batch2=k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(d))
    scores = scores.view(bh // H, H, n, n)
    scores = torch.masked_fill(scores, ~tril(n), torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(bh, n, n), v)


def _ref_bloom(module, inputs, indices):
    q, k, v = inputs
    n = q.shape[1]
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    bias = (slopes[:, None] * torch.arange(n)[None, :].float()).repeat(B, 1)[:, None, :]
    return restricted_attention(q, k, v, indices, mask=bias, causal=True)


add(Case("bloom_alibi_baddbmm_bh_view", "standard", built(lambda: Spelling(_bloom).eval()),
         flat_inputs(48), 48, causal=True, seq_dims=(1, 1, 1), out_seq_dims=(1,),
         reference=_ref_bloom))

qkv_case("prescaled_q_tril_eq_0", "standard",
         lambda m, q, k, v: torch.softmax(((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1))
                                          .masked_fill(torch.tril(torch.ones(q.shape[2], q.shape[2]))
                                                       == 0, NEG_INF), -1) @ v,
         32, causal=True, reference=ref_qkv(causal=True))

qkv_case("split_scale_q_and_k_where", "standard",
         lambda m, q, k, v: torch.softmax(torch.where(
             tril(q.shape[2]), (q * q.shape[-1] ** -0.25) @ (k * k.shape[-1] ** -0.25)
             .transpose(-1, -2), NEG_INF), -1) @ v,
         40, causal=True, reference=ref_qkv(causal=True))

qkv_case("key_mT_finfo_min", "standard",
         lambda m, q, k, v: (q @ k.mT * 0.2).masked_fill(~tril(q.shape[2]), FMIN)
         .softmax(-1) @ v,
         24, causal=True, reference=ref_qkv(scale=0.2, causal=True))

qkv_case("key_permute_div_sqrt", "standard",
         lambda m, q, k, v: torch.matmul(torch.softmax(
             (torch.matmul(q, k.permute(0, 1, 3, 2)) / sqrt_d(q)).masked_fill(
                 ~tril(q.shape[2]), NEG_INF), dim=-1), v),
         56, causal=True, reference=ref_qkv(causal=True))

qkv_case("repeat_kv_matmul_gqa", "standard",
         lambda m, q, k, v: torch.matmul(torch.softmax(
             torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) * 0.25
             + additive(tril(q.shape[2]), FMIN), -1), repeat_kv(v, 2)),
         48, kv_heads=2, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("repeat_interleave_gqa", "standard",
         lambda m, q, k, v: torch.softmax(
             (q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) * 0.25)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v.repeat_interleave(2, dim=1),
         32, kv_heads=2, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("expand_mqa", "standard",
         lambda m, q, k, v: torch.softmax(
             (q @ k.expand(-1, q.shape[1], -1, -1).transpose(-2, -1) * 0.25)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v.expand(-1, q.shape[1], -1, -1),
         40, kv_heads=1, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("upcast_qk_bf16_model", "standard",
         lambda m, q, k, v: torch.softmax(
             (q.float() @ k.float().transpose(-2, -1) * 0.25).masked_fill(
                 ~tril(q.shape[2]), NEG_INF), -1).to(v.dtype) @ v,
         32, dtype=torch.bfloat16, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("prescaled_k_by_0d_parameter", "standard",
         lambda m, q, k, v: torch.softmax(
             (q @ (k * m.scale).transpose(-2, -1)).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
         @ v,
         24, tensors=lambda: {"scale": nn.Parameter(torch.tensor(0.3))}, causal=True,
         reference=ref_qkv(scale=0.3, causal=True))

qkv_case("masked_fill_finfo_min_causal", "standard",
         lambda m, q, k, v: torch.matmul(torch.softmax(
             torch.matmul(q, k.transpose(-1, -2)).mul(0.25).masked_fill(
                 ~tril(q.shape[2]), torch.finfo(q.dtype).min), -1), v),
         64, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("masked_fill_neg_inf_padding", "standard",
         lambda m, q, k, v, keep: torch.softmax((q @ k.transpose(-2, -1) / sqrt_d(q))
                                                .masked_fill(~keep[:, None, None, :], NEG_INF),
                                                -1) @ v,
         32, extra=padding([3, 10]), n_extra=1)

qkv_case("relpos_bias_before_scale", "standard",
         lambda m, q, k, v: torch.softmax(
             ((q @ k.transpose(-2, -1) + m.rel) / 4.0).masked_fill(~tril(q.shape[2]), NEG_INF),
             -1) @ v,
         48, tensors=lambda: {"rel": rel_bias(48)}, causal=True,
         reference=ref_qkv(scale=0.25, causal=True, mask=lambda m, i: m.rel / 4.0))

qkv_case("relpos_bias_after_scale", "standard",
         lambda m, q, k, v: torch.softmax(
             q @ k.transpose(-2, -1) * 0.25 + m.rel + additive(tril(q.shape[2])), -1) @ v,
         40, tensors=lambda: {"rel": rel_bias(40)}, causal=True,
         reference=ref_qkv(scale=0.25, causal=True, mask=lambda m, i: m.rel))

qkv_case("alibi_bidirectional_matmul", "standard",
         lambda m, q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25 + m.alibi, -1) @ v,
         64, tensors=lambda: {"alibi": alibi(64, causal=False)})


def _mbart(m, q, k, v, mask):
    bh, n, _ = q.shape
    w = torch.bmm(q * 0.25, k.transpose(1, 2))
    w = w.view(bh // H, H, n, n) + mask
    w = w.view(bh, n, n)
    return torch.bmm(nn.functional.softmax(w, dim=-1), v)


def _mbart_mask(n):
    return (hf_causal_mask()(None, n)[0],)


add(Case("mbart_bh_view_additive", "standard", built(lambda: Spelling(_mbart).eval()),
         flat_inputs(32, extra=_mbart_mask), 32, causal=True, seq_dims=(1, 1, 1, None),
         out_seq_dims=(1,), reference=ref_qkv(scale=0.25, causal=True)))

add(Case("eval_dropout_module", "standard",
         built(lambda: Spelling(lambda m, q, k, v: m.drop(torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)) @ v,
             children={"drop": nn.Dropout(0.1)}).eval()),
         qkv_inputs(48), 48, causal=True, seq_dims=(2, 2, 2),
         reference=ref_qkv(scale=0.25, causal=True)))

qkv_case("softmax_positive_dim_kw", "standard",
         lambda m, q, k, v: torch.matmul(F.softmax(
             torch.matmul(q, k.transpose(2, 3)).div(4.0).masked_fill(~tril(q.shape[2]), NEG_INF),
             dim=3), v),
         24, causal=True, reference=ref_qkv(scale=0.25, causal=True))


# --- torch.nn modules ---------------------------------------------------------------------


class MHA(nn.Module):
    def __init__(self, batch_first: bool, **call):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, 4, batch_first=batch_first)
        self.call = call
        self.batch_first = batch_first

    def forward(self, x, *extra):
        kw = dict(self.call)
        n = x.shape[1] if self.batch_first else x.shape[0]
        if kw.pop("causal_float", False):
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(n)
        if kw.pop("causal_bool", False):
            kw["attn_mask"] = ~tril(n)  # True = not allowed
            kw["is_causal"] = True
        if extra:
            kw["key_padding_mask"] = ~extra[0]  # True = ignore
        out, weights = self.mha(x, x, x, **kw)
        return out if not kw.get("need_weights", True) else (out, weights)


x_case("mha_batch_first_no_weights", "standard",
       lambda: MHA(True, need_weights=False).eval(), 40)

x_case("mha_seq_first_avg_weights", "standard",
       lambda: MHA(False, need_weights=True).eval(), 32, seq_dim=0, out_seq_dims=(0, 1))

x_case("mha_causal_float_mask_no_weights", "standard",
       lambda: MHA(True, need_weights=False, causal_float=True).eval(), 64, causal=True)

x_case("mha_key_padding_no_weights", "standard",
       lambda: MHA(True, need_weights=False).eval(), 48, extra=padding([0, 13]), n_extra=1)

x_case("mha_causal_per_head_weights", "standard",
       lambda: MHA(False, need_weights=True, average_attn_weights=False, causal_bool=True)
       .eval(), 32, seq_dim=0, causal=True, out_seq_dims=(0, 2))


class Encoder(nn.Module):
    def __init__(self, causal: bool, train: bool, dropout: float = 0.1, **kw):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, 4, 64, dropout=dropout, **kw)
        self.causal = causal
        self.train(train)

    def forward(self, x):
        if not self.causal:
            return self.layer(x)
        n = x.shape[1] if self.layer.self_attn.batch_first else x.shape[0]
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        return self.layer(x, src_mask=mask, is_causal=True)


x_case("encoder_layer_eval", "standard", lambda: Encoder(False, False, batch_first=True), 48)

x_case("encoder_layer_eval_causal", "standard", lambda: Encoder(True, False, batch_first=True),
       64, causal=True)

x_case("encoder_layer_train_dropout0_causal", "standard",
       lambda: Encoder(True, True, dropout=0.0, batch_first=True), 40, causal=True)

x_case("encoder_layer_train_dropout", "standard",
       lambda: Encoder(False, True, dropout=0.1, batch_first=True), 32,
       note="train-mode dropout: both runs reseed the global RNG")

x_case("encoder_layer_norm_first_seq_first", "standard",
       lambda: Encoder(False, False, norm_first=True), 24, seq_dim=0, out_seq_dims=(0,))


# ==========================================================================================
# Near misses: in-place ops, casts, finite masks, broadcasting, reuse.
# ==========================================================================================


def _inplace_masked_fill(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s.masked_fill_(~tril(q.shape[2]), NEG_INF)
    return torch.softmax(s, -1) @ v


qkv_case("inplace_masked_fill_", "near_miss", _inplace_masked_fill, 48, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))


def _inplace_mul(m, q, k, v):
    s = q @ k.transpose(-2, -1)
    s.mul_(0.3)
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("inplace_mul_scale", "near_miss", _inplace_mul, 40, causal=True,
         reference=ref_qkv(scale=0.3, causal=True))


def _inplace_add(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s.add_(m.rel)
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("inplace_add_bias", "near_miss", _inplace_add, 32, causal=True,
         tensors=lambda: {"rel": rel_bias(32)},
         reference=ref_qkv(scale=0.25, causal=True, mask=lambda m, i: m.rel))


def _setitem_first_keys(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s[..., :4] = NEG_INF
    return torch.softmax(s, -1) @ v


qkv_case("setitem_slice_neg_inf", "near_miss", _setitem_first_keys, 24)


def _setitem_bool_index(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s[~tril(q.shape[2]).expand_as(s)] = NEG_INF
    return torch.softmax(s, -1) @ v


qkv_case("setitem_bool_index_causal", "near_miss", _setitem_bool_index, 32, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))


def _iadd_before_scale(m, q, k, v):
    s = q @ k.transpose(-2, -1)
    s += m.rel
    s = s * 0.25
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("iadd_bias_before_scale", "near_miss", _iadd_before_scale, 40, causal=True,
         tensors=lambda: {"rel": rel_bias(40)},
         reference=ref_qkv(scale=0.25, causal=True, mask=lambda m, i: m.rel * 0.25))


def _iadd_aliased_qk(m, q, k, v):
    qk = q @ k.transpose(-2, -1)
    raw = qk  # another name for the same tensor
    qk += m.rel
    s = raw * 0.25  # sees the bias: raw is qk
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("iadd_on_aliased_qk", "near_miss", _iadd_aliased_qk, 32, causal=True,
         tensors=lambda: {"rel": rel_bias(32)},
         reference=ref_qkv(scale=0.25, causal=True, mask=lambda m, i: m.rel * 0.25))


def _iadd_after_read(m, q, k, v):
    qk = q @ k.transpose(-2, -1)
    s = qk * 0.25  # read before the mutation: no bias
    qk += 5.0 * m.rel
    out = torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v
    return out, qk.masked_fill(~tril(q.shape[2]), NEG_INF).amax(-1)


qkv_case("iadd_qk_after_read_also_returned", "near_miss", _iadd_after_read, 32, causal=True,
         tensors=lambda: {"rel": rel_bias(32)}, out_seq_dims=(2, 2))


def _masked_fill_alias(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    t = s
    t.masked_fill_(~tril(q.shape[2]), NEG_INF)
    return torch.softmax(s, -1) @ v


qkv_case("masked_fill_inplace_via_alias", "near_miss", _masked_fill_alias, 48, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))


def _mask_mutated_after_use(m, q, k, v):
    mask = m.mask.clone()
    s = q @ k.transpose(-2, -1) * 0.25 + mask
    mask.zero_()  # the scores already hold the mask
    return torch.softmax(s, -1) @ v


qkv_case("mask_mutated_after_use", "near_miss", _mask_mutated_after_use, 40, causal=True,
         tensors=lambda: {"mask": additive(tril(40))}, reference=ref_qkv(scale=0.25, causal=True))


def _mask_input_mutated_after_use(m, q, k, v, mask):
    s = q @ k.transpose(-2, -1) * 0.25 + mask
    mask.mul_(0.0)
    return torch.softmax(s, -1) @ v


qkv_case("mask_input_mutated_after_use", "near_miss", _mask_input_mutated_after_use, 24,
         causal=True, extra=lambda gen, n: (additive(tril(n), FMIN),), n_extra=1,
         reference=ref_qkv(scale=0.25, causal=True))


def _q_mutated_between(m, q, k, v):
    q = q.clone()
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    q.mul_(3.0)  # after q @ k^T, before p @ v
    return torch.softmax(s, -1) @ v


qkv_case("q_mutated_between_qk_and_pv", "near_miss", _q_mutated_between, 32, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))


def _k_mutated_after_scores(m, q, k, v):
    k = k.clone()
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    k.mul_(-1.0)
    return torch.softmax(s, -1) @ v


qkv_case("k_mutated_after_scores", "near_miss", _k_mutated_after_scores, 32, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))


def _v_mutated_before_pv(m, q, k, v):
    v = v.clone()
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    v.add_(1.0)  # p @ v reads the new v
    return torch.softmax(s, -1) @ v


qkv_case("v_mutated_before_pv", "near_miss", _v_mutated_before_pv, 24, causal=True,
         reference=ref_qkv(scale=0.25, causal=True, v_of=lambda m, i: i[2] + 1.0))

qkv_case("cast_int32_roundtrip", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1)).to(torch.int32).to(torch.float32).mul(0.25)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v,
         40, causal=True)

qkv_case("cast_bf16_roundtrip", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).to(torch.bfloat16).float()
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v,
         48, causal=True)

qkv_case("cast_half_roundtrip", "near_miss",
         lambda m, q, k, v: torch.softmax((q @ k.transpose(-2, -1)).half().float(), -1) @ v, 32)

qkv_case("cast_double_lossless", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).double().masked_fill(~tril(q.shape[2]), NEG_INF),
             -1).float() @ v,
         40, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("cast_float_noop", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1)).float().mul(0.25).masked_fill(~tril(q.shape[2]), NEG_INF),
             -1).float() @ v,
         24, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("finite_mask_1e4_before_scale", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) + additive(tril(q.shape[2]), -1e4)) / sqrt_d(q), -1) @ v,
         64, causal=True, reference=ref_qkv(causal=True))

qkv_case("finite_mask_1e9_before_scale", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) + additive(tril(q.shape[2]), -1e9)) * 0.25, -1) @ v,
         48, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("finfo_min_before_scale_div", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) + additive(tril(q.shape[2]), FMIN)).div(4.0), -1) @ v,
         40, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("finfo_min_before_scale_overflow", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) + additive(tril(q.shape[2]), FMIN)) * 2.0, -1) @ v,
         32, causal=True, reference=ref_qkv(scale=2.0, causal=True))


def _latent_inputs(n):
    def make():
        _, k, v = qkv_inputs(n)()
        return (k, v)

    return make


add(Case("perceiver_latent_matmul", "near_miss",
         built(lambda: Spelling(
             lambda m, k, v: torch.softmax(m.latents @ k.transpose(-2, -1) * 0.25, -1) @ v,
             {"latents": nn.Parameter(torch.randn(1, H, 16, D))}).eval()),
         _latent_inputs(64), 64, seq_dims=(2, 2)))

add(Case("perceiver_latent_sdpa", "near_miss",
         built(lambda: Spelling(
             lambda m, k, v: F.scaled_dot_product_attention(m.latents, k, v),
             {"latents": nn.Parameter(torch.randn(1, H, 16, D))}).eval()),
         _latent_inputs(48), 48, seq_dims=(2, 2)))

qkv_case("rank1_bias_ones", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25 + torch.ones(1)).masked_fill(
                 ~tril(q.shape[2]), NEG_INF), -1) @ v,
         32, causal=True, reference=ref_qkv(scale=0.25, causal=True))


def _two_sites_one_qk(m, q, k, v, v2):
    qk = q @ k.transpose(-2, -1)
    causal = tril(q.shape[2])
    o1 = torch.softmax((qk * 0.25).masked_fill(~causal, NEG_INF), -1) @ v
    o2 = torch.softmax((qk * 0.1).masked_fill(~causal, FMIN), -1) @ v2
    return o1 + o2


qkv_case("two_sites_share_qk", "near_miss", _two_sites_one_qk, 40, causal=True,
         extra=lambda gen, n: (torch.randn(B, H, n, D, generator=gen),), n_extra=1,
         extra_seq_dims=(2,))


def _padded_batch_row(fill):
    def make(gen, n):
        mask = torch.zeros(B, 1, 1, n)
        mask[1] = fill  # every key of batch row 1 is padding
        mask[0, ..., n - 5:] = fill
        return (mask,)

    return make


qkv_case("all_padding_row_finfo_min", "near_miss",
         lambda m, q, k, v, mask: torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, -1) @ v,
         24, extra=_padded_batch_row(FMIN), n_extra=1)

qkv_case("all_padding_row_neg_inf_sdpa", "near_miss",
         lambda m, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
         24, extra=_padded_batch_row(NEG_INF), n_extra=1)


def _arange_bf16_positions(m, q, k, v):
    """Positions kept in bf16 (as a bf16 model's cache_position would be): above 256 they round,
    so this is *not* a causal mask (query 256 sees key 257)."""
    pos = torch.arange(q.shape[2]).to(torch.bfloat16)
    mask = pos[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])


qkv_case("arange_mask_bf16_positions_L300", "near_miss", _arange_bf16_positions, 300,
         dim=8, heads=2)


def _arange_mask_cast_bf16(m, q, k, v):
    n = q.shape[2]
    keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    mask = torch.zeros(n, n).masked_fill(~keep, FMIN).to(torch.bfloat16)  # finfo32.min -> -inf
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])


qkv_case("arange_mask_cast_bf16_L300", "near_miss", _arange_mask_cast_bf16, 300, dim=8,
         heads=2, dtype=torch.bfloat16, causal=True, reference=ref_qkv(causal=True))

qkv_case("softmax_dim_minus2", "near_miss",
         lambda m, q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-2) @ v, 32)

qkv_case("tensor_temperature_scalar", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) / m.temperature).masked_fill(~tril(q.shape[2]), NEG_INF),
             -1) @ v,
         40, tensors=lambda: {"temperature": nn.Parameter(torch.tensor(3.5))}, causal=True,
         reference=ref_qkv(scale=1 / 3.5, causal=True))

qkv_case("tensor_temperature_per_head", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) / m.temperature).masked_fill(~tril(q.shape[2]), NEG_INF),
             -1) @ v,
         32, tensors=lambda: {"temperature": nn.Parameter(torch.tensor([1.0, 2.0, 4.0, 8.0])
                                                          .view(1, H, 1, 1))},
         causal=True,
         reference=ref_qkv(scale=1.0, causal=True, q_of=lambda m, i: i[0] / m.temperature))

qkv_case("softcap_tanh", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (torch.tanh(q @ k.transpose(-2, -1) / 50.0) * 50.0).masked_fill(
                 ~tril(q.shape[2]), NEG_INF), -1) @ v,
         48, causal=True)


def _returns_probs(m, q, k, v):
    p = torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
    return p @ v, p


qkv_case("output_attentions_probs", "near_miss", _returns_probs, 32, causal=True,
         out_seq_dims=(2, 2))


def _returns_scores(m, q, k, v):
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    return torch.softmax(s, -1) @ v, s


qkv_case("scores_also_returned", "near_miss", _returns_scores, 24, causal=True,
         out_seq_dims=(2, 2))


def _probs_reused(m, q, k, v, v2):
    p = torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
    return p @ v + p @ v2


qkv_case("probs_reused_two_pv", "near_miss", _probs_reused, 40, causal=True,
         extra=lambda gen, n: (torch.randn(B, H, n, D, generator=gen),), n_extra=1,
         extra_seq_dims=(2,))


def _gated_probs(m, q, k, v):
    p = torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
    return (p * torch.sigmoid(q.sum(-1, keepdim=True))) @ v


qkv_case("probs_gated_before_pv", "near_miss", _gated_probs, 32, causal=True)

qkv_case("exp_log_softmax", "near_miss",
         lambda m, q, k, v: torch.exp(F.log_softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)) @ v,
         24, causal=True)


def _renormalised(m, q, k, v):
    p = torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
    p = p / p.sum(-1, keepdim=True)
    return p @ v


qkv_case("probs_renormalised", "near_miss", _renormalised, 24, causal=True)


def _sink(m, q, k, v):
    """An attention sink (gpt-oss): one extra logit per head joins the softmax, then dropped."""
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    sink = m.sink.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)
    return p[..., :-1] @ v


qkv_case("attention_sink_logit", "near_miss", _sink, 32, causal=True,
         tensors=lambda: {"sink": nn.Parameter(torch.tensor([0.5, 1.0, 2.0, 3.0]))})

qkv_case("per_key_vector_scale", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * (0.1 + 0.01 * torch.arange(k.shape[2])))
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v,
         32, causal=True)

qkv_case("masked_fill_small_fill_100", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), -100.0), -1) @ v,
         24, note="-100 is not negligible to a finite-precision reader, and not a mask")


def _k_q_swapped(m, q, k, v):
    """Scores as k @ q^T: the keys are the q tensor (Lq = 24), the queries the k tensor."""
    return torch.softmax(k @ q.transpose(-2, -1) * 0.25, -1) @ v


add(Case("k_q_swapped", "near_miss", built(lambda: Spelling(_k_q_swapped).eval()),
         lambda: (lambda q, k, v: (q, k, v[:, :, :24]))(*qkv_inputs(40, lq=24)()), 40,
         seq_dims=(2, 2, 2)))


def _transposed_scores(m, q, k, v):
    s = (k @ q.transpose(-2, -1)).transpose(-2, -1) * 0.25
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("scores_computed_transposed", "near_miss", _transposed_scores, 32, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))

qkv_case("v_broadcast_over_heads", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
         @ v[:, :1],
         32, causal=True, reference=ref_qkv(scale=0.25, causal=True,
                                            v_of=lambda m, i: i[2][:, :1]))

qkv_case("v_rank2_value_table", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
         @ m.table,
         24, causal=True, tensors=lambda: {"table": nn.Parameter(torch.randn(24, D))},
         reference=ref_qkv(scale=0.25, causal=True,
                           v_of=lambda m, i: m.table.expand(B, H, -1, -1)))

qkv_case("v_flipped_along_seq", "near_miss",
         lambda m, q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v.flip(2), 24)

qkv_case("sdpa_is_causal_lq_shorter", "near_miss",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 40, lq=24,
         note="SDPA's is_causal is top-left aligned when Lq < Lk")


# --- second round: aliasing through views and bases, casts spelled otherwise, masks the
# causal proof could misread, argument spellings --------------------------------------------


def _q_base_mutated(m, q, k, v):
    base = q.clone()
    q = base[..., :]  # a view: mutating the base changes q
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    base.mul_(3.0)
    return torch.softmax(s, -1) @ v


qkv_case("q_base_mutated_via_view", "near_miss", _q_base_mutated, 32, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))


def _scores_view_fill(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s.diagonal(dim1=-2, dim2=-1).fill_(NEG_INF)  # no attention to oneself (through a view)
    return torch.softmax(s, -1) @ v


qkv_case("scores_diagonal_view_fill_", "near_miss", _scores_view_fill, 24)


def _scores_narrow_fill(m, q, k, v):
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    s.narrow(-1, 0, 2).zero_()  # the first two keys get logit 0 (through a view)
    return torch.softmax(s, -1) @ v


qkv_case("scores_narrow_view_zero_", "near_miss", _scores_narrow_fill, 32, causal=True)


def _mul_out(m, q, k, v):
    s = q @ k.transpose(-2, -1)
    torch.mul(s, 0.25, out=s)
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("scores_scaled_with_out_kw", "near_miss", _mul_out, 24, causal=True,
         reference=ref_qkv(scale=0.25, causal=True))


def _clamp_inplace(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    s.clamp_(min=-1.0, max=1.0)
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("scores_clamp_", "near_miss", _clamp_inplace, 32, causal=True)


def _probs_inplace(m, q, k, v):
    p = torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
    p.masked_fill_(p < 0.05, 0.0)  # prune small weights in place
    return p @ v


qkv_case("probs_pruned_in_place", "near_miss", _probs_inplace, 32, causal=True)


def _probs_setitem(m, q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1)
    p[..., 0] = 0.0
    return p @ v


qkv_case("probs_setitem_first_key", "near_miss", _probs_setitem, 24)

qkv_case("softmax_dtype_float16_on_fp32", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1,
             dtype=torch.float16).float() @ v,
         32, causal=True)

qkv_case("probs_half_roundtrip", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1)
         .half().float() @ v,
         32, causal=True)

qkv_case("cast_type_bf16_roundtrip", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).type(torch.bfloat16).to(dtype=torch.float32)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v,
         24, causal=True)

qkv_case("cast_to_other_tensor_bf16", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).to(m.anchor).type_as(q)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v,
         24, causal=True, tensors=lambda: {"anchor": torch.zeros((), dtype=torch.bfloat16)})


def _autocast_scores(m, q, k, v):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = q @ k.transpose(-2, -1)  # a bf16 matmul
    s = (s.float() * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    return torch.softmax(s, -1) @ v


qkv_case("autocast_bf16_scores", "near_miss", _autocast_scores, 32, causal=True)

# (is_causal=True with scale <= 0 gives NaN in eager SDPA on CPU: a boolean mask instead)
qkv_case("sdpa_scale_zero", "near_miss",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=tril(q.shape[2]),
                                                           scale=0.0),
         24, causal=True, reference=ref_qkv(scale=0.0, causal=True))

qkv_case("sdpa_negative_scale", "near_miss",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=tril(q.shape[2]),
                                                           scale=-0.25),
         32, causal=True, reference=ref_qkv(scale=-0.25, causal=True))

qkv_case("matmul_scale_zero", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.transpose(-2, -1) * 0.0).masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v,
         24, causal=True, reference=ref_qkv(scale=0.0, causal=True))

qkv_case("repeat_interleave_kwargs", "standard",
         lambda m, q, k, v: torch.softmax(
             (q @ k.repeat_interleave(repeats=2, dim=1).transpose(-2, -1) * 0.25)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1)
         @ v.repeat_interleave(repeats=2, dim=1),
         32, kv_heads=2, causal=True, reference=ref_qkv(scale=0.25, causal=True))

qkv_case("repeat_interleave_uneven_tensor", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.repeat_interleave(torch.tensor([1, 3]), dim=1).transpose(-2, -1) * 0.25)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1)
         @ v.repeat_interleave(torch.tensor([1, 3]), dim=1),
         32, kv_heads=2, causal=True)

qkv_case("kv_tiled_with_repeat", "near_miss",
         lambda m, q, k, v: torch.softmax(
             (q @ k.repeat(1, 2, 1, 1).transpose(-2, -1) * 0.25)
             .masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v.repeat(1, 2, 1, 1),
         32, kv_heads=2, causal=True, note="tiling: head h reads kv head h % Hkv, not h // 2")


def _repeat_kv_tiled(x, n_rep):
    b, h, n, d = x.shape
    return x[:, None].expand(b, n_rep, h, n, d).reshape(b, h * n_rep, n, d)


qkv_case("repeat_kv_expand_tiled_order", "near_miss",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, _repeat_kv_tiled(k, 2), _repeat_kv_tiled(v, 2), is_causal=True),
         32, kv_heads=2, causal=True)

qkv_case("softmax_implicit_dim", "near_miss",
         lambda m, q, k, v: F.softmax(q @ k.transpose(-2, -1) * 0.25) @ v, 24,
         note="F.softmax without dim on 4-d input normalises over dim 1 (heads)")


def _sliding_window(m, q, k, v):
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=((j <= i) & (j > i - 8))[None, None])


def _window_mask(m, inputs):
    n = inputs[0].shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) & (j > i - 8)


qkv_case("sdpa_sliding_window_arange", "standard", _sliding_window, 48, causal=True,
         reference=ref_qkv(causal=True, mask=_window_mask))

qkv_case("sdpa_strict_causal_arange", "near_miss",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=(torch.arange(q.shape[2])[None, :]
                                 < torch.arange(q.shape[2])[:, None])[None, None]),
         24, causal=True, note="query 0 sees no key (NaN row)")

qkv_case("sdpa_anticausal_arange", "near_miss",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=(torch.arange(q.shape[2])[None, :]
                                 >= torch.arange(q.shape[2])[:, None])[None, None]),
         32)

qkv_case("sdpa_arange_offset_5", "near_miss",
         lambda m, q, k, v: F.scaled_dot_product_attention(
             q, k, v, attn_mask=(torch.arange(q.shape[2])[None, :]
                                 <= torch.arange(5, q.shape[2] + 5)[:, None])[None, None]),
         32)


def _hf_left_padding(gen, n):
    keep = torch.ones(B, n, dtype=torch.bool)
    keep[1, :6] = False  # left padding
    mask = tril(n)[None] & keep[:, None, :]
    return (additive(mask, FMIN)[:, None],)


qkv_case("hf_left_padding_fully_masked_rows", "standard",
         lambda m, q, k, v, mask: torch.matmul(F.softmax(
             torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask, dim=-1, dtype=torch.float32)
             .to(q.dtype), v),
         40, extra=_hf_left_padding, n_extra=1,
         note="rows 0..5 of batch 1 see no key: HF eager gives them the mean of v")

qkv_case("functional_dropout_default_training", "near_miss",
         lambda m, q, k, v: F.dropout(torch.softmax(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF), -1), 0.1)
         @ v,
         32, causal=True, note="F.dropout's training defaults to True, even in eval()")

qkv_case("data_dependent_mask_from_scores", "near_miss",
         lambda m, q, k, v: (lambda s: torch.softmax(
             s.masked_fill(s < s.amax(-1, keepdim=True) - 2.0, NEG_INF), -1) @ v)(
             (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)),
         32, causal=True)


def _reformer_self_mask(m, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    self_mask = torch.eye(q.shape[2], dtype=torch.bool)
    s = torch.where(self_mask, torch.tensor(-1e5), s)  # the fill comes first
    return torch.softmax(s.masked_fill(~tril(q.shape[2]), NEG_INF), -1) @ v


qkv_case("where_fill_first_reformer_self_mask", "near_miss", _reformer_self_mask, 32,
         causal=True, note="query 0's only key is itself: its -1e5 logit still decides")

qkv_case("einsum_ellipsis", "standard",
         lambda m, q, k, v: torch.einsum("...qk,...kd->...qd", torch.einsum(
             "...qd,...kd->...qk", q, k).mul(0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
             .softmax(-1), v),
         32, causal=True, reference=ref_qkv(scale=0.25, causal=True))


class ImplicitEinsum(nn.Module):
    """2-d einsum without '->' (implicit output) over softmax'd scores."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, E))

    def forward(self, x):
        return torch.einsum("ij,jk", torch.softmax(x @ self.w, -1), self.w)


add(Case("einsum_implicit_output", "not_attention", built(lambda: ImplicitEinsum().eval()),
         lambda: (torch.randn(24, E, generator=torch.Generator().manual_seed(0)),), 24,
         causal=True, seq_dims=(0,), out_seq_dims=(0,)))


def _manual_softmax(m, q, k, v):
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~tril(q.shape[2]), NEG_INF)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


qkv_case("manual_softmax_exp_sum", "standard", _manual_softmax, 32, causal=True)


# --- third round: value dims, caches, packed documents, per-head masks ---------------------

qkv_case("sdpa_value_dim_differs", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v[..., :8], is_causal=True),
         40, causal=True, reference=ref_qkv(causal=True, v_of=lambda m, i: i[2][..., :8]))

qkv_case("matmul_value_dim_differs", "standard",
         lambda m, q, k, v: torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(
             ~tril(q.shape[2]), NEG_INF), -1) @ torch.cat([v, v[..., :4]], -1),
         32, causal=True, reference=ref_qkv(scale=0.25, causal=True,
                                            v_of=lambda m, i: torch.cat([i[2], i[2][..., :4]], -1)))

qkv_case("matmul_kv_cache_bottom_right", "standard",
         lambda m, q, k, v: torch.softmax((q @ k.transpose(-2, -1) * 0.25).masked_fill(
             ~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2]),
             NEG_INF), -1) @ v,
         48, lq=16, note="the 16 queries are the last of 48 positions")

qkv_case("square_subsequent_mask_added", "standard",
         lambda m, q, k, v: torch.softmax(
             q @ k.transpose(-2, -1) / 4.0
             + nn.Transformer.generate_square_subsequent_mask(q.shape[2]), -1) @ v,
         40, causal=True, reference=ref_qkv(scale=0.25, causal=True))


def _row_bias(gen, n):
    bias = additive(tril(n)).expand(B, 1, n, n).clone()
    bias[1] = bias[1] - 2e4  # batch row 1: every logit shifted by a finite -2e4
    return (bias,)


qkv_case("finite_bias_2e4_whole_row_causal", "near_miss",
         lambda m, q, k, v, bias: torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, -1) @ v,
         32, extra=_row_bias, n_extra=1, causal=True,
         reference=ref_qkv(scale=0.25, causal=True, mask=lambda m, i: i[3]),
         note="a constant shift is not a mask: softmax is shift-invariant")


def _documents(gen, n):
    """Packed sequences: document ids per token ([B, L]); row 1 has three documents."""
    doc = torch.zeros(B, n, dtype=torch.long)
    doc[1, n // 3:] = 1
    doc[1, 2 * n // 3:] = 2
    return (doc,)


def _doc_mask(doc):
    return (doc[:, None, :, None] == doc[:, None, None, :]) & tril(doc.shape[1])


qkv_case("sdpa_packed_documents", "standard",
         lambda m, q, k, v, doc: F.scaled_dot_product_attention(q, k, v, attn_mask=_doc_mask(doc)),
         48, extra=_documents, n_extra=1, causal=True,
         reference=ref_qkv(causal=True, mask=lambda m, i: _doc_mask(i[3])))

qkv_case("matmul_packed_documents_additive", "standard",
         lambda m, q, k, v, doc: torch.softmax(
             q @ k.transpose(-2, -1) * 0.25 + additive(_doc_mask(doc), FMIN), -1) @ v,
         40, extra=_documents, n_extra=1, causal=True,
         reference=ref_qkv(scale=0.25, causal=True, mask=lambda m, i: _doc_mask(i[3])))


def _head_windows(n):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return torch.stack([(j <= i) & (j > i - w) for w in (4, 8, 16, n)])[None]  # [1, H, L, L]


qkv_case("sdpa_per_head_windows", "standard",
         lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                           attn_mask=_head_windows(q.shape[2])),
         48, causal=True, reference=ref_qkv(causal=True, mask=lambda m, i: _head_windows(48)))


# ==========================================================================================
# Not attention (some look like it).
# ==========================================================================================

qkv_case("sigmoid_attention", "not_attention",
         lambda m, q, k, v: (torch.sigmoid(q @ k.transpose(-2, -1) * 0.25)
                             * tril(q.shape[2])) @ v,
         32, causal=True)

qkv_case("relu_attention", "not_attention",
         lambda m, q, k, v: (torch.relu(q @ k.transpose(-2, -1) * 0.25)
                             .masked_fill(~tril(q.shape[2]), 0.0) / q.shape[2]) @ v,
         24, causal=True)

qkv_case("softmax_over_heads", "not_attention",
         lambda m, q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=1) @ v, 24)


class MemoryClassifier(nn.Module):
    """softmax(x @ keys^T) @ values with learned keys/values: a matmul-softmax-matmul whose
    'keys' are weights."""

    def __init__(self):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(10, E))
        self.values = nn.Parameter(torch.randn(10, 16))

    def forward(self, x):
        return torch.softmax(x @ self.keys.t() / math.sqrt(E), dim=-1) @ self.values


x_case("memory_classifier_weights_as_keys", "not_attention", MemoryClassifier, 48, causal=True)


class MemoryClassifier4d(nn.Module):
    """The same over [B, H, L, D] 'queries' and a [1, 1, C, D] learned memory."""

    def __init__(self):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(1, 1, 24, D))
        self.values = nn.Parameter(torch.randn(1, 1, 24, D))

    def forward(self, q, k, v):
        return torch.softmax(q @ self.keys.transpose(-2, -1) * 0.25, -1) @ self.values + 0 * v


add(Case("memory_classifier_4d_params", "not_attention", built(lambda: MemoryClassifier4d().eval()),
         qkv_inputs(24), 24, causal=True, seq_dims=(2, 2, 2)))


def _linear_attention(m, q, k, v):
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    kv = phi_k.transpose(-2, -1) @ v
    z = 1.0 / (phi_q @ phi_k.sum(2, keepdim=True).transpose(-2, -1) + 1e-6)
    return (phi_q @ kv) * z


qkv_case("linear_attention_elu", "not_attention", _linear_attention, 64)


def _causal_linear_attention(m, q, k, v):
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.cumsum(phi_k[..., :, None] * v[..., None, :], dim=2)  # [B, H, L, D, D]
    num = (phi_q[..., None, :] @ kv).squeeze(-2)
    den = (phi_q * torch.cumsum(phi_k, dim=2)).sum(-1, keepdim=True)
    return num / den


qkv_case("causal_linear_attention_cumsum", "not_attention", _causal_linear_attention, 32,
         causal=True)


class SoftmaxThenWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, 24))

    def forward(self, x):
        return torch.softmax(x, -1) @ self.w


x_case("softmax_x_at_weight", "not_attention", SoftmaxThenWeights, 40, causal=True)

qkv_case("probs_transposed_before_pv", "not_attention",
         lambda m, q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1)
         .transpose(-2, -1) @ v,
         24)


class MixtureOfExperts(nn.Module):
    """Per-token softmax gates over a few expert outputs computed from the whole sequence."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(E, 6)
        self.experts = nn.Linear(E, 6 * E)

    def forward(self, x):
        gates = torch.softmax(self.gate(x), -1)  # [B, L, 6]
        experts = self.experts(x.mean(1)).view(x.shape[0], 6, E)  # [B, 6, E]
        return torch.bmm(gates, experts)


x_case("gated_mixture_bmm", "not_attention", MixtureOfExperts, 32)


class Synthesizer(nn.Module):
    """Learned static attention (Synthesizer, random): softmax(parameter [L, L]) @ v."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(24, 24))

    def forward(self, q, k, v):
        return torch.softmax(self.logits.masked_fill(~tril(24), NEG_INF), -1) @ v


add(Case("synthesizer_static_logits", "not_attention", built(lambda: Synthesizer().eval()),
         qkv_inputs(24), 24, causal=True, seq_dims=(2, 2, 2)))


def summary_counts(cases: Sequence[Case] | None = None) -> dict[str, int]:
    counts = {kind: 0 for kind in KINDS}
    for case in CORPUS if cases is None else cases:
        counts[case.kind] += 1
    return counts


def case_named(name: str) -> Case:
    for case in CORPUS:
        if case.name == name:
            return case
    raise KeyError(name)


__all__ = ["CORPUS", "Case", "KINDS", "case_named", "restricted_attention", "summary_counts"]
