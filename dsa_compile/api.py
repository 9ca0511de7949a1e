"""The user API: ``compile``, ``explain``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import make_backend
from .config import DSAConfig
from .passes.rewrite import RewriteResult


def compile(model: torch.nn.Module, config: DSAConfig | None = None, **options: Any):
    """``torch.compile(model, backend="dsa")`` with a :class:`DSAConfig` (or its fields)."""
    if config is None:
        config = DSAConfig.from_options(options)
    elif options:
        config = config.replace(**options)
    return torch.compile(model, backend=make_backend(config))


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
            detail = s["reason"] if not s["rewritten"] else s["indexer_init"]
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
    """Runs ``model(*example_inputs)`` once under the dsa pass (eager) and reports its sites."""
    config = (config or DSAConfig.from_options(options)).replace(mode="eager")
    report = ExplainReport()

    def record(result: RewriteResult) -> None:
        report.sites.extend(site.summary() for site in result.sites)

    graphs = []

    def record_graph(result: RewriteResult) -> None:
        graphs.append(result)
        record(result)

    for attempt in range(2):
        compiled = torch.compile(model, backend=make_backend(config, record_graph))
        with torch.no_grad():
            compiled(*example_inputs)
        if graphs:
            break
        # Dynamo ran the model without compiling it: its code objects hit the recompile
        # limit (models that share forward code, e.g. HF families). Start afresh once.
        if attempt == 0:
            torch.compiler.reset()
    if not graphs:
        raise RuntimeError("torch.compile did not capture any graph of the model, so no "
                           "attention site could be inspected")
    return report
