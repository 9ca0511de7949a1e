"""Indexers owned by the model: ``attach``, ``detach``, and the store the backend uses.

``attach(model, *inputs)`` captures the model once, initialises each rewritable site's indexer
(training-free) and registers it as an ``nn.Module`` at ``<attention module>.dsa_indexer``;
the model then carries the options it was attached with as ``model.dsa_config``. A compiled
model finds its indexers through the module objects Dynamo traced (see
:func:`.dynamo_compat.traced_locals`): no re-initialisation on a recompile, and the compiled
graph reads the indexer's own parameters at every call (in-place updates take effect at once).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import DSAConfig, resolve_config
from .dynamo_compat import traced_locals
from .passes.indexers import (
    INDEXER_NAME,
    MODEL_INDEXER_INIT,
    PARAMETERS,
    DSAIndexer,
    GraphIndexers,
    IndexerMismatch,
    SiteRequest,
)
from .passes.sites import module_root_of

log = logging.getLogger("dsa_compile")

# Models with attached indexers (their options are ``model.dsa_config``).
_ATTACHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


class DSAAdapterError(ValueError):
    """Indexers cannot be attached, saved or loaded as asked (the message says which site and
    what to do)."""


def attached_model(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """The model with attached indexers that ``module`` is (part of), or None."""
    if module is None:
        return None
    for model in list(_ATTACHED):
        if model is module or any(m is module for m in model.modules()):
            return model
    return None


def indexers_of(model: torch.nn.Module) -> dict[str, DSAIndexer]:
    """Every indexer registered in ``model``, by qualified name (``<module>.dsa_indexer``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DSAIndexer)}


def register(model: torch.nn.Module, config: DSAConfig) -> None:
    """Marks ``model`` as owning indexers made with ``config``."""
    model.dsa_config = config
    _ATTACHED.add(model)


def detach(model: torch.nn.Module) -> dict[str, DSAIndexer]:
    """Removes every indexer from ``model`` (and ``model.dsa_config``): the dense model as it was
    before ``attach``. Returns the removed indexers by name.

    Compiled models that read them run their dense graph from then on (with a warning; compile
    again, or ``torch.compiler.reset``, for compiled dense code).
    """
    removed = indexers_of(model)
    for name, indexer in removed.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        del owner._modules[attr]
        indexer.detached = True
    originals = model.__dict__.pop("_dsa_original_weights", {})
    with torch.no_grad():  # the model's own indexer weights an adapter overwrote
        for name, value in originals.items():
            model.get_parameter(name).copy_(value)
    for attr in ("dsa_config", "dsa_model_indexers"):
        model.__dict__.pop(attr, None)
    _ATTACHED.discard(model)
    return removed


def frame_owner(gm: torch.fx.GraphModule) -> torch.nn.Module | None:
    """The module the module paths of Dynamo's graph ``gm`` are relative to: the local of the
    traced frame their ``nn_module_stack`` starts at (``L['self']``, or ``L['fn']`` when
    ``torch.compile`` wraps a module), else the frame's only module."""
    values = traced_locals()
    roots = dict.fromkeys(module_root_of(n) for n in gm.graph.nodes
                          if n.meta.get("nn_module_stack"))
    for root in (*roots, ("self",)):
        module = resolve_root(values, root)
        if module is not None:
            return module
    modules = [v for v in values.values() if isinstance(v, torch.nn.Module)]
    return modules[0] if len(modules) == 1 else None


def resolve_root(values: dict[str, Any], root: tuple | None) -> torch.nn.Module | None:
    """The module at ``root`` (see :func:`..passes.sites.module_root_of`) in ``values``."""
    if not root:
        return None
    value: Any = values.get(root[0])
    for key in root[1:]:
        try:
            value = value[key]
        except (IndexError, KeyError, TypeError):
            return None
    return value if isinstance(value, torch.nn.Module) else None


class ModelIndexers:
    """The indexer store of one graph of a model (see :class:`..passes.indexers.IndexerStore`).

    A site's attention module is resolved from the local its ``nn_module_stack`` path starts
    at (``self`` of the traced frame; ``root`` when that local is not available); its indexer is
    the module's ``dsa_indexer`` (``dsa_indexer_2``, ... for further sites of one module, in
    graph order). ``attach``: new indexers are registered in their module; otherwise they stay
    in the compiled graph (``explain``, ``export``, benchmarks: the model is not changed).
    """

    def __init__(self, attach: bool, root: torch.nn.Module | None = None,
                 config: DSAConfig | None = None, graph_inputs: Sequence[Any] = ()):
        self.attach = attach
        self.root = root
        self.config = config or DSAConfig()
        self.graph = GraphIndexers()
        self.added: list[str] = []
        self.bindings: dict[str, Binding] = {}
        self._inputs = {id(v): i for i, v in enumerate(graph_inputs) if isinstance(v, torch.Tensor)}
        self._locals = traced_locals()
        self._count: dict[int, int] = {}
        self._slots: dict[int, tuple[torch.nn.Module | None, str]] = {}

    def _module(self, request: SiteRequest) -> torch.nn.Module | None:
        site = request.site
        owner = resolve_root(self._locals, site.module_root) or self.root
        if owner is None:
            return None
        if site.module_path == "<top>":
            return owner
        try:
            return owner.get_submodule(site.module_path)
        except AttributeError:
            return None

    def _slot(self, request: SiteRequest) -> tuple[torch.nn.Module | None, str]:
        if id(request.site) not in self._slots:
            module = self._module(request)
            if module is not None:
                remember_module(module)
            n = self._count[id(module)] = self._count.get(id(module), 0) + 1
            attr = INDEXER_NAME if n == 1 else f"{INDEXER_NAME}_{n}"
            self._slots[id(request.site)] = (module, attr)
        return self._slots[id(request.site)]

    def _name(self, request: SiteRequest, attr: str) -> str:
        path = request.site.module_path
        return attr if path == "<top>" else f"{path}.{attr}"

    def lookup(self, request: SiteRequest) -> tuple[str, DSAIndexer] | None:
        module, attr = self._slot(request)
        indexer = None if module is None else module._modules.get(attr)
        if not isinstance(indexer, DSAIndexer):
            return None
        name = self._name(request, attr)
        why = indexer.mismatch(request.heads, request.kv_heads, request.head_dim)
        if why:
            raise IndexerMismatch(f"the indexer {name} does not fit its attention site: {why}. "
                                  "Detach it (dsa_compile.detach(model)) and attach again, or "
                                  "load an adapter made for this model")
        self._bind(name, request, indexer, module, attr)
        return name, indexer

    def adopt(self, request: SiteRequest, indexer: DSAIndexer) -> str:
        module, attr = self._slot(request)
        indexer.base_weights = {key: weakref.ref(w) for key, w in
                                (("q", request.q_weight), ("k", request.k_weight)) if w is not None}
        if module is None or not self.attach:
            name = self.graph.adopt(request, indexer)
            self.bindings[name] = Binding(indexer)
            return name
        module.add_module(attr, indexer)
        name = self._name(request, attr)
        self.added.append(name)
        self._bind(name, request, indexer, module, attr)
        return name

    def _bind(self, name: str, request: SiteRequest, indexer: DSAIndexer,
              module: torch.nn.Module, attr: str) -> None:
        """Binds a model-owned indexer through a parameter of its attention module that the
        graph takes as input: compiled code, which Dynamo shares between instances of one
        class, then reads the indexer of the instance it is called with."""
        anchor = next((self._inputs[id(p)] for n, p in module.named_parameters()
                       if INDEXER_NAME not in n and id(p) in self._inputs), None)
        weights = [None if w is None else self._inputs.get(id(w))
                   for w in (request.q_weight, request.k_weight)]
        self.bindings[name] = Binding(indexer, attr, anchor, request, self.config, *weights,
                                      name=name)

    def binding(self, name: str) -> Binding:
        return self.bindings.get(name) or Binding(self.graph.indexers[name])


class TensorKeyedWeakMap:
    """A map keyed by tensor identity that holds its keys weakly (``WeakKeyDictionary`` compares
    keys with ``==``, which tensors answer elementwise)."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}

    def __setitem__(self, key: torch.Tensor, value: Any) -> None:
        ident = id(key)
        self._items[ident] = (weakref.ref(key, lambda _: self._items.pop(ident, None)), value)

    def get(self, key: Any) -> Any:
        item = self._items.get(id(key))
        return item[1] if item is not None and item[0]() is key else None

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None


# Parameters of attention modules whose sites were compiled -> the module (weakly, both ways).
_MODULE_OF = TensorKeyedWeakMap()


def remember_module(module: torch.nn.Module) -> None:
    """Lets compiled graphs find ``module`` (an attention module that holds, or may hold, an
    indexer) from any of its own parameters."""
    for name, param in module.named_parameters():
        if INDEXER_NAME not in name:
            _MODULE_OF[param] = weakref.ref(module)


@dataclass
class Binding:
    """How a compiled graph finds one site's indexer at each call.

    Graph-owned (``attr`` None): always ``indexer``. Model-owned: ``<module>.<attr>`` of the
    attention module owning the call's input ``anchor`` (so in-place updates, replacement by
    ``load_adapter`` and ``detach`` are seen); an instance the backend never saw (Dynamo reuses
    one class's compiled code for all its instances) gets the training-free indexer of its own
    q / k weights (inputs ``q_input`` / ``k_input``), cached, not registered.
    """

    indexer: DSAIndexer
    attr: str | None = None
    anchor: int | None = None
    request: SiteRequest | None = None
    config: DSAConfig | None = None
    q_input: int | None = None
    k_input: int | None = None
    name: str = ""
    _unseen: TensorKeyedWeakMap = field(default_factory=TensorKeyedWeakMap)

    def resolve(self, args: Sequence[Any]) -> DSAIndexer | None:
        """The indexer for a call with ``args`` (None: detached, the graph must run dense)."""
        if self.attr is None or self.anchor is None:
            return None if self.indexer.detached else self.indexer
        key = args[self.anchor]
        module_ref = _MODULE_OF.get(key)
        module = module_ref() if module_ref is not None else None
        if module is None:
            return self._for_unseen(args, key)
        indexer = module._modules.get(self.attr)
        return indexer if isinstance(indexer, DSAIndexer) else None

    def _for_unseen(self, args: Sequence[Any], key: torch.Tensor) -> DSAIndexer | None:
        if key not in self._unseen:
            from .passes.rewrite import initial_site_indexer

            weights = [None if i is None else args[i] for i in (self.q_input, self.k_input)]
            request = dataclasses.replace(self.request, q_weight=weights[0],
                                          k_weight=weights[1])
            indexer = initial_site_indexer(request, self.config)
            if indexer is None:
                return None
            source = "a training-free indexer"
            if self.config.adapter:  # what the adapter option would have loaded
                from .adapter import read_adapter_cached

                tensors = read_adapter_cached(self.config.adapter)
                saved = [tensors.get(f"{self.name}.{p}") for p in PARAMETERS]
                if all(t is not None for t in saved) and \
                        [list(t.shape) for t in saved] == list(indexer.shapes().values()):
                    with torch.no_grad():
                        for param, value in zip(indexer.tensors(), saved, strict=True):
                            param.copy_(value)
                    source = f"the indexer of adapter {self.config.adapter}"
            log.info("a compiled graph runs on a model instance it was not compiled for (Dynamo "
                     "shares compiled code between instances of a class): %s gets %s, not "
                     "part of the instance's state (dsa_compile.attach / load_adapter make it "
                     "the model's own)", self.request.site.module_path, source)
            self._unseen[key] = indexer
        return self._unseen.get(key)


def attach(model: torch.nn.Module, *example_inputs: Any, config: DSAConfig | None = None,
           **options: Any):
    """Gives each attention site of ``model`` its own indexer, registered in the model.

    ``model(*example_inputs)`` runs once under the dsa pass (eager, no compile); every site it
    rewrites gets a training-free indexer at ``<module path>.dsa_indexer`` (an ``nn.Module``
    with parameters ``q_proj``, ``k_proj``, ``head_weights``), so ``model.state_dict()``,
    ``save_adapter``, calibration and export see them. The options (:class:`DSAConfig` fields)
    are kept as ``model.dsa_config`` and are the defaults of ``torch.compile(model,
    backend="dsa")``. Returns the report of :func:`dsa_compile.explain` for these inputs.
    """
    from .api import capture  # the API layer's capture: one eager run under the pass

    if indexers_of(model):
        raise DSAAdapterError("the model already has dsa indexers attached "
                              f"({next(iter(indexers_of(model)))}, ...): call "
                              "dsa_compile.detach(model) first to attach new ones")
    config = resolve_config(config, options)
    register(model, config)
    try:
        report = capture(model, example_inputs, config, attach=True)
    except BaseException:
        detach(model)
        raise
    own = tuple(dict.fromkeys(s["indexer"] for s in report.rewritten
                              if s["indexer_init"] == MODEL_INDEXER_INIT))
    if own:  # e.g. DeepseekV32: its indexer modules are the model's own state already
        model.dsa_model_indexers = own
    if not indexers_of(model) and not own:
        log.warning("attach: no attention site of the model was rewritten, so no indexer was "
                    "attached (the report says why)")
    return report
