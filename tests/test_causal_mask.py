"""Causal masks built from position aranges are proved causal and run as ``is_causal=True``;
look-alikes that are not exactly causal keep their mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import tiny_model
from torch import nn

import dsa_compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _hf_style(lq: int, lk: int, q_shift: int = 0) -> torch.Tensor:
    kv = torch.arange(lk) + 0
    q = torch.arange(lq) + q_shift
    return (kv[None, None, None, :] <= q[None, None, :, None]).expand(1, 1, lq, lk)


MASKS = {
    # name: (mask(lq, lk), proved causal)
    "hf_le": (lambda lq, lk: _hf_style(lq, lk), True),
    "ge_swapped": (lambda lq, lk: torch.arange(lq)[:, None] >= torch.arange(lk)[None, :], True),
    "unsqueeze": (lambda lq, lk: torch.arange(lk).unsqueeze(0) <= torch.arange(lq).unsqueeze(1),
                  True),
    "shifted_by_one": (lambda lq, lk: _hf_style(lq, lk, q_shift=1), False),
    "strict_lt": (lambda lq, lk: torch.arange(lk)[None, :] < torch.arange(lq)[:, None], False),
    "with_padding": (lambda lq, lk: _hf_style(lq, lk) & (torch.arange(lk) < lk - 2), False),
}


class MaskedSDPA(nn.Module):
    def __init__(self, make_mask):
        super().__init__()
        self.make_mask = make_mask

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.make_mask(q.shape[2],
                                                                                k.shape[2]))


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("lengths", [(20, 20), (12, 20)])
def test_arange_masks(name, lengths):
    make_mask, causal = MASKS[name]
    lq, lk = lengths
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, lq, 8), torch.randn(2, 4, lk, 8), torch.randn(2, 4, lk, 8)
    module = MaskedSDPA(make_mask)
    site = dsa_compile.explain(module, q, k, v, topk=4).sites[0]
    assert site["rewritten"]
    assert ("causal_mask" in site["pattern"]) is causal, site
    assert (site["mask"] == "causal (boolean mask proved causal)") is causal, site
    torch.compiler.reset()
    exact = torch.compile(module, backend="dsa", options={"topk": lk, "mode": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(exact(q, k, v), module(q, k, v), atol=1e-5, rtol=1e-5)


def test_hf_llama_compiled_mask_runs_as_is_causal(monkeypatch):
    """With torch < 2.14 HF always materialises the causal mask under torch.compile (simulated
    here): the site must still be recognised as causal, and stay exact."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, 100, (1, 40))
    report = dsa_compile.explain(model, ids, topk=16)
    assert {s["mask"] for s in report.sites} == {"causal (boolean mask proved causal)"}
    torch.compiler.reset()
    with torch.no_grad():
        reference = model(ids).logits
        exact = torch.compile(model, backend="dsa", options={"topk": 64, "mode": "eager"})
        torch.testing.assert_close(exact(ids).logits, reference, atol=2e-5, rtol=1e-4)
