"""nn.MultiheadAttention and nn.TransformerEncoderLayer (passes/multihead.py): the opaque
``F.multi_head_attention_forward`` call is expanded to SDPA when PyTorch's own path is SDPA, and
the rewrite is exact with every key forced through the sparse ops; otherwise it stays dense and
says why."""

from __future__ import annotations

import pytest
import torch
from models import OpCounter
from torch import nn

import dsa_compile

L, E, HEADS = 24, 16, 2
FORCED = {"mode": "eager", "min_seq_len": 0, "topk": L, "query_block": 1, "key_block": 0}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool, **call):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.call = call

    def forward(self, x, *masks):
        extra = dict(zip(("attn_mask", "key_padding_mask"), masks, strict=False))
        return self.attn(x, x, x, **extra, **self.call)[0]


def causal_bool() -> torch.Tensor:
    return torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)  # True = masked out


def padding(dtype=torch.bool) -> torch.Tensor:
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, -5:] = True
    return pad if dtype == torch.bool else torch.zeros(2, L).masked_fill(pad, float("-inf"))


CASES = {
    "batch_first": (True, {}, ()),
    "seq_first": (False, {}, ()),
    "causal_bool_mask": (True, {}, (causal_bool(),)),
    "is_causal_hint": (True, {"is_causal": True}, (causal_bool(),)),
    "causal_and_padding": (True, {"is_causal": True}, (causal_bool(), padding())),
    "float_padding_only": (True, {}, (None, padding(torch.float32))),
    "per_head_mask": (True, {}, (torch.randn(2 * HEADS, L, L),)),
}


@pytest.mark.parametrize("name", CASES)
def test_mha_without_weights_is_rewritten_exactly(name):
    batch_first, call, masks = CASES[name]
    model = SelfAttention(batch_first, need_weights=False, **call).eval()
    x = torch.randn(2, L, E) if batch_first else torch.randn(L, 2, E)
    expected = model(x, *masks)
    compiled = torch.compile(model, backend="dsa", options=FORCED)
    with OpCounter() as counter:
        out = compiled(x, *masks)
    assert counter.counts.get("dsa.sparse_attention") == 1
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5, equal_nan=True)


def test_mha_site_is_named_by_the_module():
    model = SelfAttention(True, need_weights=False).eval()
    report = dsa_compile.explain(model, torch.randn(2, L, E), topk=8, min_seq_len=0)
    assert [s["module"] for s in report.sites] == ["attn"]
    assert report.sites[0]["rewritten"] and report.sites[0]["pattern"] == "sdpa"


@pytest.mark.parametrize("model, inputs, reason", [
    (SelfAttention(True).eval(), (torch.randn(2, L, E),), "need_weights=True"),
    (SelfAttention(True, need_weights=False).eval(), (torch.randn(L, E),), "unbatched"),
    (nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True).train(),
     (torch.randn(2, L, E),), "dropout in training mode"),
    (nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True).eval(),
     (torch.randn(2, L, E),), "fast path"),
], ids=["weights", "unbatched", "train_dropout", "encoder_fast_path"])
def test_mha_kept_dense_says_why(model, inputs, reason):
    report = dsa_compile.explain(model, *inputs, topk=8, min_seq_len=0)
    assert len(report.sites) == 1 and not report.sites[0]["rewritten"]
    assert reason in report.sites[0]["reason"], report.sites[0]


def test_encoder_layer_without_fast_path_is_rewritten():
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, L, E)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        expected = layer(x, src_mask=mask, is_causal=True)
        out = torch.compile(layer, backend="dsa", options=FORCED)(x, src_mask=mask,
                                                                    is_causal=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
