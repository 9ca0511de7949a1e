"""The hand-off to Inductor: the one private PyTorch entry point the backend uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
    """Compiles a (rewritten) Dynamo graph with Inductor, as ``backend="inductor"`` would."""
    from torch._inductor.compile_fx import compile_fx  # private: wrapped here only

    return compile_fx(gm, list(example_inputs))
