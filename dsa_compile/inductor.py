"""The hand-off to Inductor: the one place the backend uses private PyTorch entry points."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx


def _static_fakes(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as fake tensors of fixed shape in the current trace's fake mode.

    The rewrite appends the indexer weights as graph inputs; left to AOTAutograd, they would be
    fakified with fresh dynamic sizes that have no source in the user's code, and the guards
    Dynamo builds from them fail (``dynamic=True``). Their shapes never change, so say so.
    """
    from torch._guards import TracingContext  # private: wrapped here only

    context = TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return list(tensors)
    return [context.fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def compile_with_inductor(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                          static_inputs: Sequence[torch.Tensor] = ()) -> Callable:
    """Compiles a (rewritten) Dynamo graph with Inductor, as ``backend="inductor"`` would;
    ``static_inputs`` are trailing inputs of fixed shape (the indexer weights)."""
    from torch._inductor.compile_fx import compile_fx  # private: wrapped here only

    return compile_fx(gm, [*example_inputs, *_static_fakes(static_inputs)])
