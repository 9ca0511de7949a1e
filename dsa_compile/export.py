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

from .backend import SiteLogger, rewrite_settings, with_extra_inputs
from .config import DSAConfig, resolve_config
from .dynamo_compat import compile_isolated
from .passes.rewrite import RewriteResult, rewrite_sites


class RewrittenModule(torch.nn.Module):
    """The rewritten Dynamo graph, with every non-user input held as state."""

    def __init__(self, model: torch.nn.Module, result: RewriteResult,
                 example_inputs: Sequence[Any], user_args: Sequence[torch.Tensor]):
        super().__init__()
        self.graph_module = result.graph_module
        params = {id(p): p for p in model.parameters()}
        users = {id(a): i for i, a in enumerate(user_args)}
        self._slots: list[tuple[str, Any]] = []
        for i, value in enumerate([*example_inputs, *result.extra_inputs]):
            if id(value) in users:
                self._slots.append(("user", users[id(value)]))
            elif not isinstance(value, torch.Tensor):
                raise ValueError(f"graph input {i} is not a tensor ({type(value).__name__}); "
                                 "export with static shapes")
            else:
                name = f"input_{i}"
                if id(value) in params:
                    self.register_parameter(name, params[id(value)])
                else:
                    self.register_buffer(name, value)
                self._slots.append(("state", name))

    def forward(self, *args: torch.Tensor):
        inputs = [args[ref] if kind == "user" else getattr(self, ref) for kind, ref in self._slots]
        return self.graph_module(*inputs)


def export(model: torch.nn.Module, args: tuple, config: DSAConfig | None = None,
           dynamic_shapes: Any = None, **options: Any) -> torch.export.ExportedProgram:
    """Exports ``model(*args)`` with its attention rewritten to the dsa ops."""
    config = resolve_config(config, options).replace(mode="eager")
    settings = rewrite_settings(config)
    report = SiteLogger()
    captured: dict[str, Any] = {}

    def backend(gm: fx.GraphModule, example_inputs):
        result = rewrite_sites(gm, example_inputs, settings)
        report(result)
        captured["result"], captured["inputs"] = result, list(example_inputs)
        return with_extra_inputs(result.graph_module.forward, result.extra_inputs)

    compiled = compile_isolated(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(*args)
    module = RewrittenModule(model, captured["result"], captured["inputs"], args)
    return torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes)
