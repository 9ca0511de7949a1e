"""The ``dsa`` backend of ``torch.compile``.

``torch.compile(model, backend="dsa", options={...})`` finds it through the
``torch_dynamo_backends`` entry point (no import needed). It rewrites the attention sites of
each Dynamo graph, then hands the graph to Inductor (or, with ``mode="eager"``, runs it as is).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from .config import DSAConfig
from .inductor import compile_with_inductor
from .passes.rewrite import RewriteResult, RewriteSettings, rewrite_sites


def rewrite_settings(config: DSAConfig) -> RewriteSettings:
    return RewriteSettings(
        topk=config.topk, dense_up_to=config.dense_up_to, index_heads=config.index_heads,
        index_dim=config.index_dim, query_block=config.query_block, key_block=config.key_block,
        candidate_blocks=config.candidate_blocks, include=config.include, exclude=config.exclude,
    )


def make_backend(
    config: DSAConfig, on_sites: Callable[[RewriteResult], None] | None = None
) -> Callable:
    """A Dynamo backend bound to ``config``; ``on_sites`` sees each graph's rewrite result."""
    settings = rewrite_settings(config)

    def backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        result = rewrite_sites(gm, example_inputs, settings)
        if on_sites is not None:
            on_sites(result)
        rewritten, extra = result.graph_module, result.extra_inputs
        if config.mode == "eager":
            return with_extra_inputs(rewritten.forward, extra)
        compiled = compile_with_inductor(rewritten, example_inputs, extra)
        return with_extra_inputs(compiled, extra)

    return backend


def with_extra_inputs(compiled: Callable, extra: list[torch.Tensor]) -> Callable:
    """A callable for Dynamo that appends ``extra`` to every call of ``compiled``."""
    if not extra:
        return compiled

    def run(*args: Any) -> Any:
        return compiled(*args, *extra)

    return run


def dsa_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    options: Mapping[str, Any] | None = None,
) -> Callable:
    """Entry point of ``backend="dsa"``; ``options`` are :class:`DSAConfig` fields."""
    return make_backend(DSAConfig.from_options(options))(gm, example_inputs)
