"""The one place where the kernels use PyTorch APIs that are not public.

Each wrapper has a fallback built from public ops, and tests (tests/test_package.py) pin the
two against each other, so a PyTorch release that changes or drops the private API degrades
speed, never results.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _attention_math(q, k, v, mask, scale):
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        # -inf removes a key even where q . k is +-inf or NaN (an additive -inf would give NaN)
        scores = (scores + mask).masked_fill(torch.isneginf(mask), NEG_INF)
    # Normalise by the row max and sum, not by exp(scores - lse): with a huge bias (finfo.min
    # padding) lse absorbs log(sum) and the probabilities would not sum to one.
    if scores.shape[-1] == 0:  # no keys: zeros and lse = -inf
        lse = scores.new_full(scores.shape[:-1], NEG_INF)
        return scores.new_zeros(*scores.shape[:-1], v.shape[-1]), lse
    top = scores.amax(dim=-1, keepdim=True)
    top = top.masked_fill(torch.isneginf(top), 0.0)
    probs = torch.exp(scores - top)
    total = probs.sum(dim=-1, keepdim=True)
    out = torch.matmul(probs, v) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return out, (top + total.log()).squeeze(-1)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    use_flash: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention returning ``(out [B, h, M, Dv], lse fp32 [B, h, M])``.

    ``q [B, h, M, D]``, ``k [B, h, S, D]``, ``v [B, h, S, Dv]``; ``mask`` is additive (0 / -inf
    / bias), broadcastable to ``[B, h, M, S]``. Rows whose mask removes every key return
    zeros and ``lse = -inf``. On CPU with ``D == Dv`` this is PyTorch's fused flash kernel
    (``aten::_scaled_dot_product_flash_attention_for_cpu``, which SDPA itself dispatches to and
    which also returns the log-sum-exp); elsewhere a plain matmul-softmax-matmul.
    """
    # Rank-3 masks (every masked chunk of the sparse op) stay on the math path: the fused kernel
    # takes ranks 2 and 4 only, and broadcasting them to rank 4 crashed the process (SIGFPE,
    # torch 2.13, tests/test_sparse_attention.py::test_half_precision_inputs).
    flash = use_flash and q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and \
        (mask is None or mask.dim() in (2, 4))
    if flash and mask is not None and not bool(torch.isfinite(k).all()):
        flash = False  # a non-finite key: removals must not turn into NaN (see the math path)
    if flash:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, attn_mask=mask, scale=scale
            )
        except (AttributeError, RuntimeError):  # pragma: no cover - torch without the kernel
            out, lse = _attention_math(q, k, v, mask, scale)
    else:
        out, lse = _attention_math(q, k, v, mask, scale)
    if mask is not None:
        empty = torch.isneginf(mask).all(dim=-1).expand_as(lse)
        if bool(empty.any()):  # the flash kernel returns lse = 0 for them
            lse = lse.masked_fill(empty, NEG_INF)
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse.float()


def functional_tensor_mode() -> type:
    """The mode AOTAutograd functionalises graphs under (where ``torch.library.triton_op``
    decomposes into its kernels); private in PyTorch."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    return FunctionalTensorMode


def decompose_triton_ops() -> bool:
    """False while ``torch.export`` keeps custom Triton ops whole (its default)."""
    import torch._functorch.config as functorch_config  # not loaded by `import torch` alone

    return bool(getattr(functorch_config, "decompose_custom_triton_ops", True))
