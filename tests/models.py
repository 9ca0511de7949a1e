"""Tiny configs of real HF architectures with random weights (made here, nothing downloaded)."""

from __future__ import annotations

import torch
import transformers

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "bert"]
LAYERS = 2


def tiny_model(arch: str, impl: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """``overrides``: config fields changed (deepseek_v32 only)."""
    torch.manual_seed(seed)
    if arch in ("llama", "qwen2", "mistral"):
        config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                      "mistral": transformers.MistralConfig}[arch]
        config = config_cls(vocab_size=100, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, attn_implementation=impl)
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif arch == "phi3":  # fused qkv_proj (added as the untested family of the ONNX export)
        config = transformers.Phi3Config(vocab_size=100, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=LAYERS, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=512,
                                         pad_token_id=0, eos_token_id=0, bos_token_id=0,
                                         attn_implementation=impl)
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=LAYERS, n_head=4,
                                         n_positions=512, bos_token_id=0, eos_token_id=0,
                                         attn_implementation=impl)
        model = transformers.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, intermediate_size=128,
                                         max_position_embeddings=512, attn_implementation=impl)
        model = transformers.BertModel(config)
    elif arch == "bloom":  # ALiBi through baddbmm on [B*H] scores, masks in a [B, H] view
        config = transformers.BloomConfig(vocab_size=100, hidden_size=64, n_layer=LAYERS,
                                          n_head=4, attn_implementation=impl)
        model = transformers.BloomForCausalLM(config)
    elif arch == "falcon":  # eager: ALiBi, scores scaled in place; sdpa: one kv head (MQA)
        config = transformers.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=LAYERS,
                                           num_attention_heads=4, alibi=impl == "eager",
                                           multi_query=impl == "sdpa",
                                           new_decoder_architecture=False,
                                           attn_implementation=impl)
        model = transformers.FalconForCausalLM(config)
    elif arch == "deepseek_v32":
        # Dense MLPs in every layer (first_k_dense_replace): MoE routing would amplify 1e-7
        # differences into different experts.
        fields = dict(
            vocab_size=100, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=LAYERS, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, index_n_heads=2, index_head_dim=16, index_topk=8,
            max_position_embeddings=512, attn_implementation=impl)
        config = transformers.DeepseekV32Config(**{**fields, **overrides})
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        raise ValueError(arch)
    return model.eval()


class OpCounter:
    """Counts the dsa ops that run, through the profiler (dispatch modes would make Dynamo
    skip compilation)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._profile = None

    def __enter__(self):
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        for event in self._profile.events():
            if event.name.startswith("dsa::"):
                name = event.name.replace("::", ".")
                self.counts[name] = self.counts.get(name, 0) + 1
        return False


class DispatchLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op call below autograd as ``(func, args, kwargs)`` (eager only: Dynamo
    skips code run under a dispatch mode; ``OpCounter`` counts compiled runs)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)

    def names(self) -> list[str]:
        """The called ops' base names (``"_local_scalar_dense"``, ``"nonzero"``, ...)."""
        return [func.overloadpacket.__name__ for func, _, _ in self.calls]
