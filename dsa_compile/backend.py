"""The ``dsa`` backend of ``torch.compile``.

``torch.compile(model, backend="dsa", options={...})`` finds it through the
``torch_dynamo_backends`` entry point (no import needed). It rewrites the attention sites of
each Dynamo graph, then hands the graph to Inductor (or, with ``mode="eager"``, runs it as is).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from .config import DSAConfig
from .inductor import compile_with_inductor
from .passes.rewrite import RewriteResult, RewriteSettings, rewrite_sites

log = logging.getLogger("dsa_compile")


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
    report = SiteLogger()

    def backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        result = rewrite_sites(gm, example_inputs, settings)
        report(result)
        if on_sites is not None:
            on_sites(result)
        rewritten, extra = result.graph_module, result.extra_inputs
        if config.mode == "eager":
            return with_extra_inputs(rewritten.forward, extra)
        compiled = compile_with_inductor(rewritten, example_inputs, extra)
        return with_extra_inputs(compiled, extra)

    return backend


class SiteLogger:
    """Logs what the rewrite did to each graph of one backend (logger ``"dsa_compile"``).

    INFO: per graph, the sites found, rewritten and kept dense, and each dense site's module
    path and reason (DEBUG: the rewritten ones). WARNING, once per backend: a graph without any
    attention site.
    """

    def __init__(self) -> None:
        self.graphs = 0
        self.warned = False

    def __call__(self, result: RewriteResult) -> None:
        index, self.graphs = self.graphs, self.graphs + 1
        sites = result.sites
        if not sites:
            if not self.warned:
                self.warned = True
                log.warning("graph %d holds no attention site: the dsa backend leaves it as it is "
                            "(said once per backend; a graph break or an unrecognised pattern can "
                            "hide attention: dsa_compile.explain lists what is found)", index)
            return
        dense = [s for s in sites if not s.rewritable]
        log.info("graph %d: %d attention site(s) found, %d rewritten, %d kept dense",
                 index, len(sites), len(sites) - len(dense), len(dense))
        for site in sites:
            where = site.module_path or "<top level>"
            if site.rewritable:
                log.debug("  %s: %s", where, site.reason)
            else:
                log.info("  %s: kept dense: %s", where, site.reason)


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
    return _named_backend(DSAConfig.from_options(options))(gm, example_inputs)


@functools.lru_cache(maxsize=64)
def _named_backend(config: DSAConfig) -> Callable:
    """One backend per distinct options: Dynamo calls the entry point once per graph, and the
    no-attention warning is said once per backend."""
    return make_backend(config)
