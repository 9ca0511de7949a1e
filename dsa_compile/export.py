"""``export``: a rewritten model as a ``torch.export.ExportedProgram`` holding the dsa ops.

Dynamo captures the model (one graph, ``fullgraph=True``), the pass rewrites it, and the
rewritten graph is exported with the model's parameters, its other tensors and the indexers
attached as module state. The program takes the model's positional tensor arguments and
returns its tensor outputs, flattened as Dynamo's graph returns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .backend import SiteLogger, bind_indexers
from .config import DSAConfig, resolve_config
from .dynamo_compat import compile_isolated, size_symbol, specialized_floats
from .ownership import ModelIndexers
from .passes.indexers import PARAMETERS
from .passes.rewrite import RewriteResult, rewrite_sites


class RewrittenModule(torch.nn.Module):
    """The rewritten Dynamo graph, with every non-user input held as state under the model's
    own names: parameters and buffers as ``model.state_dict()`` names them, indexers as
    ``<module path>.dsa_indexer.*`` (a wrapper module that sets ``dsa_state_prefix`` has it
    removed: the wrapped model's names)."""

    def __init__(self, model: torch.nn.Module, result: RewriteResult,
                 example_inputs: Sequence[Any], user_args: Sequence[torch.Tensor],
                 traced: Sequence[Any] = ()):
        super().__init__()
        self.graph_module = result.graph_module
        names = {id(t): n for n, t in (*model.named_parameters(remove_duplicate=False),
                                       *model.named_buffers(remove_duplicate=False))}
        for name, indexer in zip(result.names, result.indexers, strict=True):
            for param, value in zip(PARAMETERS, indexer.tensors(), strict=True):
                names[id(value)] = f"{name}.{param}"
        users = {id(a): i for i, a in enumerate(user_args)}
        self._slots: list[tuple[str, Any]] = []
        for i, value in enumerate([*example_inputs, *result.extra_inputs]):
            if id(value) in users:
                self._slots.append(("user", users[id(value)]))
            elif isinstance(value, torch.SymInt):
                self._slots.append(("size", _size_source(value, i, example_inputs, traced,
                                                         users)))
            elif not isinstance(value, torch.Tensor):
                raise ValueError(f"graph input {i} is a {type(value).__name__}, not a tensor or "
                                 "a size of one; export with static shapes")
            else:
                name = names.get(id(value), f"graph_input_{i}")
                name = name.removeprefix(getattr(model, "dsa_state_prefix", ""))
                kind = "parameter" if isinstance(value, torch.nn.Parameter) else "buffer"
                self._slots.append((kind, name))
                _install(self, name, value)

    def forward(self, *args: torch.Tensor):
        return self.graph_module(*[self._input(kind, ref, args) for kind, ref in self._slots])

    def _input(self, kind: str, ref: Any, args: Sequence[torch.Tensor]) -> Any:
        if kind == "user":
            return args[ref]
        if kind == "size":
            return args[ref[0]].shape[ref[1]]
        return self.get_parameter(ref) if kind == "parameter" else self.get_buffer(ref)


def _size_source(size: torch.SymInt, position: int, example_inputs: Sequence[Any],
                 traced: Sequence[Any], users: dict[int, int]) -> tuple[int, int]:
    """``(user argument, dim)`` whose size a dynamic-shape graph takes as input ``position``:
    the user tensor whose traced (fake) shape holds the same symbol."""
    symbol = size_symbol(size)
    for value, fake in zip(example_inputs, traced, strict=False):
        if id(value) not in users or not isinstance(fake, torch.Tensor):
            continue
        for dim, extent in enumerate(fake.shape):
            if isinstance(extent, torch.SymInt) and size_symbol(extent) == symbol:
                return users[id(value)], dim
    raise ValueError(f"graph input {position} is the size {symbol}, which is no dim of a "
                     "tensor argument; export with static shapes")


def _install(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Registers ``value`` at the dotted ``name`` under ``root``, creating empty modules on the
    way (so the state dict names it as the model does)."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, torch.nn.Module())
        module = module._modules[part]
    if leaf in module._parameters or leaf in module._buffers:
        return  # one tensor read twice
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(leaf, value)
    else:
        module.register_buffer(leaf, value)


def export(model: torch.nn.Module, args: tuple, config: DSAConfig | None = None,
           dynamic_shapes: Any = None, **options: Any) -> torch.export.ExportedProgram:
    """Exports ``model(*args)`` with its attention rewritten to the dsa ops (the model's
    attached indexers, or training-free ones for sites without; the model is not changed).

    ``dynamic_shapes``: one entry per positional argument, as ``torch.export.export`` takes
    them (e.g. ``({0: Dim("batch"), 1: Dim("seq")},)``); the model is captured with
    symbolic sizes, and each rewritten site holds both of its paths, chosen at run time
    (``torch.cond``): dense SDPA at ``<= dense_up_to`` keys, the dsa ops above. Dims of size 1
    in ``args`` are specialised by the capture: give examples of at least 2 (e.g. batch 2)."""
    base = getattr(model, "dsa_config", None) if config is None else config
    config = resolve_config(base, options).replace(mode="eager")
    report = SiteLogger()
    captured: dict[str, Any] = {}

    def backend(gm: fx.GraphModule, example_inputs):
        store = ModelIndexers(False, model, config, example_inputs)
        result = rewrite_sites(gm, example_inputs, config, store)
        report(result)
        captured["result"], captured["inputs"] = result, list(example_inputs)
        captured["traced"] = [n.meta.get("example_value") for n in gm.graph.find_nodes(
            op="placeholder")]
        bindings = [store.binding(name) for name in result.names]
        return bind_indexers(result.graph_module.forward, gm.forward, bindings)

    compiled = compile_isolated(model, backend=backend, fullgraph=True,
                                dynamic=dynamic_shapes is not None)
    with torch.no_grad(), specialized_floats():
        compiled(*args)
    module = RewrittenModule(model, captured["result"], captured["inputs"], args,
                             captured["traced"])
    if isinstance(dynamic_shapes, (tuple, list)):  # one entry per argument: the *args of forward
        dynamic_shapes = (tuple(dynamic_shapes),)
    return torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes)
