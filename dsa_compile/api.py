"""The user API: ``compile``, ``explain``."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import make_backend
from .config import DSAConfig, resolve_config
from .dynamo_compat import compile_isolated
from .passes.rewrite import RewriteResult


def compile(model: torch.nn.Module, config: DSAConfig | None = None, **options: Any):
    """``torch.compile(model, backend="dsa", options=options)``, or with a whole
    :class:`DSAConfig` (then the model's attached options are not consulted).

    For a model with ``generate`` (transformers), the result's ``generate`` runs the model's
    own ``generate`` with its forward compiled the same way (``torch.compile(model).generate``
    would call the uncompiled forward, i.e. run dense); the model itself is not changed."""
    backend = make_backend(resolve_config(config, options) if config is not None else options,
                           attach=True, root=model)
    compiled = torch.compile(model, backend=backend)
    if callable(getattr(model, "generate", None)):
        forward = torch.compile(model.forward, backend=backend)
        # on the wrapper itself (its setattr would set the model's generate)
        object.__setattr__(compiled, "generate", functools.partial(_generate_with, model, forward))
    return compiled


def _generate_with(model: torch.nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.generate`` with ``forward`` in place of the model's forward for the call."""
    model.forward = forward  # an instance attribute shadows the class's method
    try:
        return model.generate(*args, **kwargs)
    finally:
        del model.forward


@dataclass
class ExplainReport:
    """Every attention site found, and whether it was rewritten or kept dense (and why)."""

    sites: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rewritten(self) -> list[dict[str, Any]]:
        return [s for s in self.sites if s["rewritten"]]

    @property
    def dense(self) -> list[dict[str, Any]]:
        return [s for s in self.sites if not s["rewritten"]]

    def table(self) -> str:
        head = ("module", "pattern", "q", "k", "mask", "rewritten", "reason / indexer")
        rows = [head]
        for s in self.sites:
            detail = s["reason"] if not s["rewritten"] else \
                f"{s['indexer_init']}; selects {s['granularity']}"
            rows.append((s["module"], s["pattern"], _shape(s["q"]), _shape(s["k"]), s["mask"],
                         "yes" if s["rewritten"] else "no (dense)", detail))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head) - 1)]
        lines = []
        for r in rows:
            cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
            lines.append("  ".join([*cells, str(r[-1])]))
        lines.insert(1, "-" * min(120, len(lines[0])))
        found = len(self.sites)
        lines.append(f"{found} attention site(s): {len(self.rewritten)} rewritten, "
                     f"{len(self.dense)} kept dense")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "?"


def explain(model: torch.nn.Module, *example_inputs: Any, config: DSAConfig | None = None,
            **options: Any) -> ExplainReport:
    """Runs ``model(*example_inputs)`` once under the dsa pass (eager) and reports its sites.

    The model is not changed: its attached indexers are used, sites without one get a
    training-free indexer that lives only for the report. Options apply over the model's
    attached options (``model.dsa_config``) when it has them.
    """
    base = getattr(model, "dsa_config", None) if config is None else config
    return capture(model, example_inputs, resolve_config(base, options), attach=False)


def capture(model: torch.nn.Module, example_inputs: tuple, config: DSAConfig, attach: bool
            ) -> ExplainReport:
    """One eager run of ``model(*example_inputs)`` under the pass, compiled through a fresh
    entry function with static shapes (the caller's compiled models keep their compiled code);
    ``attach``: new indexers are registered in the model."""
    config = config.replace(mode="eager")
    report = ExplainReport()
    graphs = 0

    def record(result: RewriteResult) -> None:
        nonlocal graphs
        graphs += 1
        report.sites.extend(site.summary() for site in result.sites)

    backend = make_backend(config, record, attach=attach, root=model)
    compiled = compile_isolated(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(*example_inputs)
    if not graphs:
        raise RuntimeError("torch.compile did not capture any graph of the model, so no attention "
                           "site could be inspected (the Dynamo log says why: a recompile limit, "
                           "or code that Dynamo skips)")
    return report
