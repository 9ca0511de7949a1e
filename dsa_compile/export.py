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
from .dynamo_compat import compile_isolated
from .ownership import ModelIndexers
from .passes.indexers import PARAMETERS
from .passes.rewrite import RewriteResult, rewrite_sites


class RewrittenModule(torch.nn.Module):
    """The rewritten Dynamo graph, with every non-user input held as state under the model's
    own names: parameters and buffers as ``model.state_dict()`` names them, indexers as
    ``<module path>.dsa_indexer.*``."""

    def __init__(self, model: torch.nn.Module, result: RewriteResult,
                 example_inputs: Sequence[Any], user_args: Sequence[torch.Tensor]):
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
            elif not isinstance(value, torch.Tensor):
                raise ValueError(f"graph input {i} is not a tensor ({type(value).__name__}); "
                                 "export with static shapes")
            else:
                name = names.get(id(value), f"graph_input_{i}")
                kind = "parameter" if isinstance(value, torch.nn.Parameter) else "buffer"
                self._slots.append((kind, name))
                _install(self, name, value)

    def forward(self, *args: torch.Tensor):
        inputs = [args[ref] if kind == "user" else self.get_parameter(ref)
                  if kind == "parameter" else self.get_buffer(ref) for kind, ref in self._slots]
        return self.graph_module(*inputs)


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
    attached indexers, or training-free ones for sites without; the model is not changed)."""
    base = getattr(model, "dsa_config", None) if config is None else config
    config = resolve_config(base, options).replace(mode="eager")
    report = SiteLogger()
    captured: dict[str, Any] = {}

    def backend(gm: fx.GraphModule, example_inputs):
        store = ModelIndexers(False, model, config, example_inputs)
        result = rewrite_sites(gm, example_inputs, config, store)
        report(result)
        captured["result"], captured["inputs"] = result, list(example_inputs)
        bindings = [store.binding(name) for name in result.names]
        return bind_indexers(result.graph_module.forward, gm.forward, bindings)

    compiled = compile_isolated(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(*args)
    module = RewrittenModule(model, captured["result"], captured["inputs"], args)
    return torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes)
