"""``export_onnx``: a model with its attention rewritten, as one ONNX file for every batch size
and sequence length, runnable by ONNX Runtime (or any runtime) without a custom-op library.

Each rewritten site becomes an ``If`` on its key count: at most ``dense_up_to`` keys run
standard attention (what the torch model computes there); above, the site's indexer
(initializers ``<module path>.dsa_indexer.*``) feeds ``dsa::IndexerTopK`` and
``dsa::SparseAttention`` nodes, each carrying a local function of standard ops
(:mod:`dsa_compile.plugins.onnx_ops`). Sites kept dense export as standard attention.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import DEVICE_GRANULARITY, DSAConfig, DSAConfigError, resolve_config
from .export import export

# The dims of each tensor input kept dynamic: batch and sequence.
_DYNAMIC_DIMS = (0, 1)


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its dsa nodes, and which input dims are
    dynamic (``{input name: [dim, ...]}``)."""

    path: Path
    dsa_nodes: int
    input_names: list[str]
    dynamic: dict[str, list[int]] = field(default_factory=dict)
    config: DSAConfig | None = None


def export_config(config: DSAConfig) -> DSAConfig:
    """``config`` as the ONNX ops express it: ``key_block = 0`` (every key scored; two-stage
    selection has no ONNX form yet), a 16-bit indexer and, when unset, the GPU's query tile
    (``DEVICE_GRANULARITY["cuda"]``), the runtime such a file is usually served on."""
    if config.key_block:
        raise DSAConfigError(f"key_block={config.key_block} (two-stage selection) cannot be "
                             "exported to ONNX yet: use key_block=0 (every key scored)")
    if config.indexer_fp8:
        raise DSAConfigError("indexer_fp8=True cannot be exported to ONNX yet (FP8 inputs of "
                             "the custom-domain op): export with indexer_fp8=False, which "
                             "selects the same keys up to FP8 rounding")
    query_block = config.query_block or DEVICE_GRANULARITY["cuda"][0]
    return config.replace(key_block=0, query_block=query_block, mode="eager")


def _dynamic_shapes(args: tuple, names: list[str]) -> tuple[tuple, dict[str, list[int]]]:
    """Batch and sequence dims (0 and 1) of every tensor argument, where larger than 1."""
    shapes, dynamic = [], {}
    for name, arg in zip(names, args, strict=True):
        if not isinstance(arg, torch.Tensor):
            shapes.append(None)
            continue
        dims = [d for d in _DYNAMIC_DIMS if d < arg.dim() and arg.shape[d] > 1]
        small = [d for d in _DYNAMIC_DIMS if d < arg.dim() and arg.shape[d] <= 1]
        if small:
            warnings.warn(f"input {name!r} has size {[arg.shape[d] for d in small]} in dims "
                          f"{small}: the file fixes them (give examples of at least 2 there to "
                          "keep them dynamic)", stacklevel=3)
        shapes.append({d: torch.export.Dim.DYNAMIC for d in dims} or None)
        dynamic[name] = dims
    return tuple(shapes), dynamic


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike, *,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                dynamic: bool = True, config: DSAConfig | None = None,
                **options: Any) -> OnnxExport:
    """Exports ``model(*example_inputs)`` with its attention rewritten to the dsa ops to an ONNX
    file at ``path`` (checked with ``onnx.checker``, full check).

    ``dynamic``: dims 0 and 1 of every tensor input (batch, sequence) stay dynamic where the
    example has more than 1 there. Options are :class:`DSAConfig` fields; ``adapter`` loads that
    adapter into the model first (as ``torch.compile``'s option does). Granularity: see
    :func:`export_config`. Needs ``pip install 'dsa-compile[onnx]'``.
    """
    try:
        from .plugins.onnx_export import dsa_nodes, program_to_onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs onnx and onnxscript: pip install "
                          "'dsa-compile[onnx]'") from err
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else \
        (example_inputs,)
    config = export_config(resolve_config(config or getattr(model, "dsa_config", None),
                                          options))
    if config.adapter:
        from .adapter import load_adapter

        load_adapter(model.model if isinstance(model, FirstOutput) else model, config.adapter)
    names = list(input_names) if input_names else [f"input_{i}" for i in range(len(args))]
    if len(names) != len(args):
        raise ValueError(f"{len(names)} input names for {len(args)} inputs")
    shapes, dims = _dynamic_shapes(args, names) if dynamic else (None, {})
    program = export(model, args, config, dynamic_shapes=shapes)
    proto = program_to_onnx(program, path, names, output_names)
    return OnnxExport(Path(path), len(dsa_nodes(proto)), names, dims, config)


class FirstOutput(torch.nn.Module):
    """An HF model as ``(input_ids, attention_mask) -> its first output tensor`` (logits or
    the last hidden state), without a KV cache: a graph ONNX export can take as is. Exported
    state keeps the HF model's own names."""

    dsa_state_prefix = "model."

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        config = getattr(model, "config", None)
        self._no_cache = {"use_cache": False} if hasattr(config, "use_cache") else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._no_cache)
        return out[0]
