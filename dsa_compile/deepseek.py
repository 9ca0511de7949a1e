"""DeepSeek-V3 (dense MLA) -> DeepseekV32 format: the V3.2 lightning indexer added to every
layer, initialised from the attention's own projections, calibrated on the model's own dense
attention, and written as a checkpoint transformers' ``DeepseekV32ForCausalLM`` loads.

HF's V3.2 indexer (``DeepseekV32Indexer``) scores key t for query s as
``sum_j w_j(s) relu(q_j(s) . k(t)) / sqrt(ID)`` with ``q_j = wq_b(q_resid)`` (the attention's
q latent), ``k = k_norm(wk(h))`` and ``w = weights_proj(h) / sqrt(IH)``, RoPE (half-split) on
the first ``qk_rope_head_dim`` dims. The init makes its pre-ReLU logit of head j follow the
attention logits of head group j: the RoPE part exactly (the attention's own shared rotary key
rows of ``kv_a_proj_with_mqa`` and the group's summed rotary query rows of ``q_b_proj``, moved
from DeepSeek's interleaved pairs to the half-split layout), the rest through a rank-``ID - R``
factorisation of ``sum_h Wq_nope_h^T Wk_nope_h W_kv`` (the no-RoPE logits, up to the latent's
RMSNorm); ``weights_proj`` starts along the mean hidden state of the calibration data (so the
head weights start positive). Calibration then trains the indexers only, against each layer's
head-averaged dense attention (the soft top-k recall objective of :mod:`.kernels.calibration`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from .kernels.calibration import soft_selection


def _interleaved_to_half(rows: torch.Tensor) -> torch.Tensor:
    """Rows laid out in interleaved rotary pairs (0, 1), (2, 3), ... -> half-split (i, i + R/2)."""
    return torch.cat([rows[0::2], rows[1::2]])


def to_deepseek_v32(model: torch.nn.Module, index_n_heads: int = 64, index_head_dim: int = 128,
                    index_topk: int = 2048) -> torch.nn.Module:
    """A ``DeepseekV32ForCausalLM`` with ``model``'s (a ``DeepseekV3ForCausalLM``) weights and a
    new indexer per layer (training-free init without data: see :func:`init_indexers`)."""
    import transformers

    config = model.config
    if getattr(config, "model_type", None) != "deepseek_v3":
        raise ValueError(f"expected a DeepseekV3 model, got model_type "
                         f"{getattr(config, 'model_type', None)!r}")
    if not getattr(config, "rope_interleave", True):
        raise ValueError("this DeepseekV3 checkpoint uses rope_interleave=False; DeepseekV32's "
                         "attention always applies interleaved RoPE, so it would not compute the "
                         "same attention")
    rope = config.qk_rope_head_dim
    if index_head_dim <= rope or rope % 2:
        raise ValueError(f"index_head_dim ({index_head_dim}) must exceed qk_rope_head_dim "
                         f"({rope}), which must be even")
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "architectures", "rope_interleave",
                           "num_nextn_predict_layers", "pretraining_tp", "transformers_version")}
    new_config = transformers.DeepseekV32Config(**fields, index_n_heads=index_n_heads,
                                                index_head_dim=index_head_dim,
                                                index_topk=index_topk)
    new_config.architectures = ["DeepseekV32ForCausalLM"]
    device = next(model.parameters()).device  # where the V3 model lives, the V32 one does
    converted = transformers.DeepseekV32ForCausalLM(new_config).to(device, model.dtype).eval()
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    stray = [k for k in missing if ".indexer." not in k]
    if stray or unexpected:
        raise ValueError(f"the V3 weights do not map onto DeepseekV32: missing {stray[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
    init_indexers(converted)
    return converted


@torch.no_grad()
def init_indexers(model: torch.nn.Module, mean_hidden: list[torch.Tensor] | None = None) -> None:
    """Training-free indexer weights from each layer's attention (module docstring);
    ``mean_hidden``: per layer, the mean attention input over some text (else the head weights
    start at zero and only calibration sets them)."""
    config = model.config
    heads, nope, rope = (config.num_attention_heads, config.qk_nope_head_dim,
                         config.qk_rope_head_dim)
    qk_dim = nope + rope
    for number, layer in enumerate(model.model.layers):
        attn, index = layer.self_attn, layer.self_attn.indexer
        ih, idim = index.n_heads, index.head_dim
        group = -(-heads // ih)
        wq = attn.q_b_proj.weight.float().view(heads, qk_dim, -1)  # [H, nope + rope, q_lora]
        wkv = attn.kv_a_proj_with_mqa.weight.float()  # [kv_lora + rope, hidden]
        lora = config.kv_lora_rank
        wkb = attn.kv_b_proj.weight.float().view(heads, nope + config.v_head_dim, lora)[:, :nope]
        # RoPE part: exact (shared rotary key, the group's summed rotary queries).
        device = wkv.device  # the layer's (a GPU's for a model loaded there)
        wk = torch.zeros(idim, wkv.shape[1], device=device)
        wk[:rope] = _interleaved_to_half(wkv[lora:lora + rope])
        wq_b = torch.zeros(ih, idim, wq.shape[2], device=device)
        # No-RoPE part: sum_h q_nope_h . k_nope_h = q_resid^T M h (the latent's RMSNorm aside).
        total = torch.zeros(wq.shape[2], wkv.shape[1], device=device)
        per_group = []
        for j in range(ih):
            members = range(j * group, min(heads, (j + 1) * group))
            m = sum(wq[h, :nope].T @ wkb[h] for h in members) @ wkv[:lora]  # [q_lora, hidden]
            per_group.append(m)
            total += m
            wq_b[j, :rope] = _interleaved_to_half(sum(wq[h, nope:] for h in members))
        rank = idim - rope
        _, _, vh = torch.linalg.svd(total, full_matrices=False)
        basis = vh[:rank]  # [rank, hidden]: the hidden directions the logits read
        wk[rope:rope + basis.shape[0]] = basis
        for j, m in enumerate(per_group):
            wq_b[j, rope:rope + basis.shape[0]] = (m @ basis.T).T
        index.wq_b.weight.copy_(wq_b.reshape(ih * idim, -1))
        index.wk.weight.copy_(wk)
        index.k_norm.reset_parameters()
        mean = None if mean_hidden is None else mean_hidden[number].float()
        direction = torch.zeros(wkv.shape[1], device=device) if mean is None else \
            mean / mean.square().sum().clamp_min(1e-12)
        index.weights_proj.weight.copy_(direction.expand(ih, -1))


def _indexer_scores(layer, hidden: torch.Tensor, position_embeddings, causal_mask: torch.Tensor
                    ) -> torch.Tensor:
    """HF's indexer scores ``[B, S, T]`` (its forward, differentiable; ``-inf`` where masked)."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

    attn, index = layer.self_attn, layer.self_attn.indexer
    batch, length, _ = hidden.shape
    with torch.no_grad():
        q_resid = attn.q_a_layernorm(attn.q_a_proj(hidden))
    q = index.wq_b(q_resid).view(batch, length, index.n_heads, index.head_dim)
    rope = index.qk_rope_head_dim
    k = index.k_norm(index.wk(hidden)).unsqueeze(2)
    cos, sin = position_embeddings
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :rope], k[..., :rope], cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q[..., rope:]], -1)
    k = torch.cat([k_rot, k[..., rope:]], -1).squeeze(2)
    scores = torch.relu(q.float() @ k.float().transpose(-1, -2).unsqueeze(1)) * index.softmax_scale
    weights = index.weights_proj(hidden).float() * index.n_heads ** -0.5
    scores = (weights.unsqueeze(-2) @ scores).squeeze(-2)  # [B, S, 1, IH] @ [B, S, IH, T]
    return scores.masked_fill(~causal_mask, float("-inf"))


def _dense_run(model, ids: torch.Tensor):
    """Each layer's attention input and the head-averaged dense attention ``[B, S, T]``: the
    model run with every key selected (``index_topk`` lifted), i.e. the dense V3 model."""
    captured: list[tuple] = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((kwargs.get("hidden_states", args[0] if args
                                                                 else None),
                                                  kwargs["position_embeddings"])),
        with_kwargs=True) for layer in model.model.layers]
    saved = [layer.self_attn.indexer.index_topk for layer in model.model.layers]
    implementation = model.config._attn_implementation
    try:
        for layer in model.model.layers:
            layer.self_attn.indexer.index_topk = ids.shape[1]
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(ids, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, topk in zip(model.model.layers, saved, strict=True):
            layer.self_attn.indexer.index_topk = topk
        model.set_attn_implementation(implementation)
    probs = [a.float().mean(1) for a in out.attentions]
    return captured, probs


def calibrate_v32(model, batches: list[torch.Tensor], steps: int = 100, lr: float = 1e-3,
                  progress: bool = True) -> list[dict[str, float]]:
    """Trains the indexers of a converted model (everything else frozen) so that each selects
    what its layer's dense attention attends to, at the model's ``index_topk``."""
    layers = list(model.model.layers)
    params = [p for layer in layers for p in layer.self_attn.indexer.parameters()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    log = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            ids = batches[step % len(batches)]
            captured, probs = _dense_run(model, ids)
            length = ids.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()[None]
            total, recall = 0.0, 0.0
            for layer, (hidden, pos), target in zip(layers, captured, probs, strict=True):
                topk = min(layer.self_attn.indexer.index_topk, length)
                scores = _indexer_scores(layer, hidden.detach(), pos, causal)
                loss = -(target * soft_selection(scores, topk)).sum(-1).mean()
                loss.backward()
                total += float(loss.detach())
                recall += float(target.gather(-1, scores.topk(topk, -1).indices).sum(-1).mean())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.append({"step": step + 1, "loss": total / len(layers),
                        "recall": recall / len(layers)})
            if progress:
                print(f"\rcalibrate indexers {step + 1}/{steps} recall "
                      f"{log[-1]['recall']:.3f} {time.perf_counter() - start:.0f}s", end="",
                      file=sys.stderr, flush=True)
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        if progress:
            print(file=sys.stderr)
    return log


def indexer_recall(model, ids: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: the dense attention mass (head-averaged, mean over queries) on the keys the
    model's own indexer selects, and on a random selection of as many visible keys."""
    captured, probs = _dense_run(model, ids)
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()[None]
    gen = torch.Generator().manual_seed(0)  # on the CPU: the same random baseline on any device
    chosen, random, best = [], [], []
    with torch.no_grad():
        for layer, (hidden, pos), target in zip(model.model.layers, captured, probs, strict=True):
            topk = min(layer.self_attn.indexer.index_topk, length)
            scores = _indexer_scores(layer, hidden, pos, causal)
            chosen.append(float(target.gather(-1, scores.topk(topk, -1).indices).sum(-1).mean()))
            noise = torch.rand(scores.shape, generator=gen).to(scores.device).masked_fill(~causal, -1.0)
            random.append(float(target.gather(-1, noise.topk(topk, -1).indices).sum(-1).mean()))
            best.append(float(target.topk(topk, -1).values.sum(-1).mean()))
    return {"indexer": chosen, "random": random, "best": best}


def convert_v3_checkpoint(model: torch.nn.Module, out: str | Path, batches: list[torch.Tensor],
                          steps: int = 100, lr: float = 1e-3, progress: bool = True,
                          **index: Any) -> dict[str, Any]:
    """V3 -> V32: convert, init from the attention (and the data's mean hidden state),
    calibrate, save (safetensors + config); returns recall before/after calibration on the
    first batch (use held-out text there)."""
    converted = to_deepseek_v32(model, **index)
    captured, _ = _dense_run(converted, batches[-1])
    init_indexers(converted, [hidden.float().mean((0, 1)) for hidden, _ in captured])
    held_out, train = batches[0], batches[1:] or batches
    before = indexer_recall(converted, held_out)
    log = calibrate_v32(converted, train, steps=steps, lr=lr, progress=progress)
    after = indexer_recall(converted, held_out)
    converted.save_pretrained(out, safe_serialization=True)
    return {"before": before, "after": after, "log": log}
