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

from .adapter import load_adapter
from .config import DSAConfig
from .inductor import compile_with_inductor
from .ownership import Binding, ModelIndexers, attached_model, frame_owner, register
from .passes.rewrite import RewriteResult, rewrite_sites

log = logging.getLogger("dsa_compile")


def make_backend(
    config: DSAConfig | Mapping[str, Any] | None = None,
    on_sites: Callable[[RewriteResult], None] | None = None,
    *,
    attach: bool = False,
    root: torch.nn.Module | None = None,
) -> Callable:
    """A Dynamo backend; ``on_sites`` sees each graph's rewrite result.

    ``config``: a :class:`DSAConfig` is used as it is; a mapping of options (what
    ``torch.compile(..., options=)`` passes) is applied over the options the model was attached
    with (``model.dsa_config``), or over the defaults. ``attach``: sites without an indexer get
    one registered in the model (``torch.compile(model, backend="dsa")``); otherwise new
    indexers live in the compiled graph only (library jobs that must not change the model).
    ``root``: the model, where Dynamo's frame does not name it.
    """
    root = root if isinstance(root, torch.nn.Module) else None  # explain() takes functions too
    fixed = config if isinstance(config, DSAConfig) else None
    overrides = dict(config or {}) if fixed is None else {}
    if fixed is None:
        DSAConfig.from_options(overrides)  # bad options fail here, before any capture
    report = SiteLogger()

    def backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        owner = frame_owner(gm) or root
        model = attached_model(owner)
        adapter = (fixed or DSAConfig.from_options(overrides)).adapter
        if adapter and owner is not None and (model is None or
                                              model.dsa_config.adapter != adapter):
            options = runtime_options(overrides if fixed is None else fixed.to_dict())
            load_adapter(owner, adapter, **options)
            model = owner
        graph_config = fixed or (model.dsa_config if model is not None else DSAConfig()
                                 ).replace(**overrides)
        store = ModelIndexers(attach, root, graph_config, example_inputs)
        result = rewrite_sites(gm, example_inputs, graph_config, store)
        if store.added and model is None and owner is not None:
            register(owner, graph_config)  # torch.compile attached them at the first capture
        report(result)
        if on_sites is not None:
            on_sites(result)
        rewritten = result.graph_module
        bindings = [store.binding(name) for name in result.names]
        if graph_config.mode == "eager":
            return bind_indexers(rewritten.forward, gm.forward, bindings)
        compiled = compile_with_inductor(rewritten, example_inputs, result.extra_inputs)
        return bind_indexers(compiled, gm.forward, bindings)

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


def bind_indexers(compiled: Callable, dense: Callable, bindings: list[Binding]) -> Callable:
    """A callable for Dynamo that appends the parameters of each site's indexer, found at every
    call (:class:`Binding`: in-place updates and adapters loaded later take effect without a
    recompile), to every call of ``compiled``. When a site has no indexer any more (detached)
    or one of other sizes, ``dense`` (Dynamo's own graph) runs instead, with a warning."""
    if not bindings:
        return compiled
    shapes = [b.indexer.shapes() for b in bindings]
    warned = False

    def run(*args: Any) -> Any:
        nonlocal warned
        indexers = [b.resolve(args) for b in bindings]
        usable = all(i is not None and (i is b.indexer or i.shapes() == shape)
                     for i, b, shape in zip(indexers, bindings, shapes, strict=True))
        if not usable:
            if not warned:
                warned = True
                log.warning("a compiled graph's dsa indexers were detached from the model (or "
                            "replaced by others of another size): the graph runs dense, "
                            "uncompiled (compile the model again, or torch.compiler.reset, for "
                            "compiled code)")
            return dense(*args)
        return compiled(*args, *[t for indexer in indexers for t in indexer.tensors()])

    return run


def dsa_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    options: Mapping[str, Any] | None = None,
) -> Callable:
    """Entry point of ``backend="dsa"``; ``options`` are :class:`DSAConfig` fields, applied
    over the options the model's indexers were attached with. Sites without an indexer get one,
    registered in the model (``<module path>.dsa_indexer``)."""
    if isinstance(options, DSAConfig):
        return _named_backend(options)(gm, example_inputs)
    if options is not None and not isinstance(options, Mapping):
        DSAConfig.from_options(options)  # raises the error that names the problem
    key = tuple(sorted((k, _hashable(v)) for k, v in (options or {}).items()))
    return _named_backend(key)(gm, example_inputs)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=64)
def _named_backend(options: tuple | DSAConfig) -> Callable:
    """One backend per distinct options: Dynamo calls the entry point once per graph, and the
    no-attention warning is said once per backend."""
    return make_backend(options if isinstance(options, DSAConfig) else dict(options), attach=True)


def runtime_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that do not size indexers (what a loaded adapter may be run with)."""
    return {k: v for k, v in options.items() if k not in ("index_heads", "index_dim", "adapter")}
