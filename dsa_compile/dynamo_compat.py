"""Compiling a model for one library job (``explain``, ``export``, the demo, the benchmark)
without touching what the caller compiled.

Dynamo keeps compiled code on Python code objects: every ``torch.compile`` of a model shares
the cache and the recompile limit of its ``forward`` (and of every instance of its class), and
a reset of Dynamo would throw away every compiled model of the process. Instead, the job
compiles a fresh entry function whose code object is its own.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch


def _calls(model: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    return call


def fresh_entry(model: Callable) -> Callable:
    """A function that calls ``model`` and owns a new code object.

    Dynamo starts tracing at this function and inlines ``model``: its cache starts empty, never
    counts against the recompile limit of the model's own code, leaves that code's entries (the
    caller's compiled models) alone, and is freed with the function.
    """
    call = _calls(model)
    # The globals of the frame Dynamo would start at for ``torch.compile(model)``: it reads
    # the model's globals from there, while for any other scope it imports the module by name
    # (which fails for a module not in sys.modules, e.g. one loaded from a file path).
    first = model.forward if isinstance(model, torch.nn.Module) else model
    scope = getattr(first, "__globals__", call.__globals__)
    return types.FunctionType(call.__code__.replace(), scope, call.__name__, call.__defaults__,
                              call.__closure__)


@functools.cache
def _has_isolate_recompiles() -> bool:
    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


def compile_isolated(model: Callable, **compile_kwargs: Any) -> Callable:
    """``torch.compile(fresh_entry(model), **compile_kwargs)``.

    Where torch has it (2.13+), ``isolate_recompiles=True`` also gives the frames that Dynamo
    starts inside the model after a graph break their own recompile count; on older torch those
    frames share the model's (``torch._dynamo.config.recompile_limit``, 8 by default).
    """
    if _has_isolate_recompiles():
        compile_kwargs.setdefault("isolate_recompiles", True)
    return torch.compile(fresh_entry(model), **compile_kwargs)


def traced_locals() -> dict[str, Any]:
    """The local variables of the frame Dynamo is compiling now (``self``: the module whose
    ``forward`` it traces), or ``{}`` outside a compile.

    Called by a backend: the module paths of ``nn_module_stack`` are relative to these locals
    (``L['self'].layers[0].self_attn``), and the backend needs the module objects to register
    indexers in them. Dynamo offers no public way to reach them: this is the one place the
    package reads Dynamo's current instruction translator, and it degrades to ``{}`` (indexers
    then stay inside the compiled graph) if a torch release moves it.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator  # private: wrapped here

        tx = InstructionTranslator.current_tx()
        return dict(tx.f_locals) if tx is not None else {}
    except Exception:  # noqa: BLE001 - any change of the private API means "not available"
        return {}


def specialized_floats() -> contextlib.AbstractContextManager:
    """Within the block, Dynamo bakes Python float attributes of a model (``self.scaling``,
    ``variance_epsilon``) into the graph as constants even when it traces with dynamic shapes,
    where torch's default lifts them to graph inputs read by ``.item()`` (unbacked floats, which
    ``torch.export`` keeps as data-dependent values and the ONNX exporter cannot carry into a
    ``torch.cond`` branch). Dynamo's config is private: this is the one place that sets it."""
    return torch._dynamo.config.patch(specialize_float=True)


def size_symbol(size: torch.SymInt) -> Any:
    """The sympy expression behind a symbolic size (``s0``; two sizes with one expression are
    the same size). SymInt's node is not public API: this is the one place that reads it."""
    return size.node.expr
