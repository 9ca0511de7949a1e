"""``calibrate``: train each site's indexer on the model's own dense attention.

The model runs dense and frozen, in eager mode under the pass; every rewritten site hands its
q, k (and mask) to the calibration objective (:mod:`..kernels.calibration`) and returns its
dense output, so a site's activations are consumed as soon as it is reached (memory: the model
plus one site's activations) and every site learns from the dense model upstream of it. Only
the indexers' parameters train (Adam). With ``torch.distributed`` initialised (``torchrun``;
gloo on CPU, nccl on GPU) each rank runs its share of a step's batches and the indexer
gradients are averaged over all of them: the adapter equals a one-rank run on the same data.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import make_backend
from .config import DSAConfig
from .dynamo_compat import compile_isolated
from .kernels.attention import SiteCall, intercept_sites
from .kernels.calibration import OBJECTIVES, selection_recall, site_loss
from .ownership import attach, indexers_of


@dataclass
class CalibrationResult:
    """Per step: the mean loss, indexer recall and best recall over the step's site calls
    (at the calibration granularity, exact top-k of tile scores); the time taken."""

    steps: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1


def _args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _runner(model: torch.nn.Module, config: DSAConfig):
    """The model in eager mode under the pass, every site through ``dsa_attention`` (so the
    interception sees it at any length), using the model's own indexers."""
    backend = make_backend(config.replace(mode="eager", min_seq_len=0, adapter=None), root=model)
    return compile_isolated(model, backend=backend, dynamic=False)


def _site_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(indexer.q_proj): name for name, indexer in indexers_of(model).items()}


def calibrate(model: torch.nn.Module, batches: Iterable[Any], steps: int = 150,
              lr: float = 1e-3, *, objective: str = "recall", batches_per_step: int = 1,
              progress: bool = True,
              config: DSAConfig | None = None, **options: Any) -> CalibrationResult:
    """Trains the model's indexers (attached first, training-free, if it has none) so that each
    selects what its site's dense attention attends to.

    ``batches``: model inputs (a tensor, or a tuple of positional arguments), cycled through;
    each step runs ``batches_per_step`` of them. Options: :class:`DSAConfig` fields (``topk``
    and ``query_block`` set the budget and granularity trained at; sizes apply when
    attaching). ``objective``: ``"recall"`` (attention mass kept by the selection) or
    ``"output"`` (error of each site's sparse output); see :mod:`..kernels.calibration`.
    Prints a progress line per step to stderr unless ``progress=False``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one batch of model inputs")
    if steps < 1 or lr <= 0 or batches_per_step < 1:
        raise ValueError(f"steps ({steps}) and batches_per_step ({batches_per_step}) must be "
                         f">= 1 and lr ({lr}) > 0")
    if not indexers_of(model):
        attach(model, *_args(batches[0]), config=config, **options)
        options = {}
    base = config or getattr(model, "dsa_config", None) or DSAConfig()
    run_config = base.replace(**{k: v for k, v in options.items()
                                 if k not in ("index_heads", "index_dim")})
    indexers = indexers_of(model)
    if not indexers:
        raise ValueError("the model has no rewritable attention site, so nothing to calibrate "
                         "(dsa_compile.explain(model, ...) says why)")
    device = next(iter(indexers.values())).q_proj.device
    query_block = run_config.granularity(device.type)[0]
    params = [p for indexer in indexers.values() for p in indexer.tensors()]
    masks = [(getattr(indexer, name), mask) for indexer in indexers.values()
             for name, mask in indexer.structure_masks().items()]
    optimizer = torch.optim.Adam(params, lr=lr)
    names = _site_names(model)
    rank, world = _distributed()
    runner = _runner(model, run_config)
    result = CalibrationResult(world_size=world)
    stats: list = []
    share = 1.0 / (batches_per_step * world)

    def handler(call: SiteCall) -> torch.Tensor:
        with torch.enable_grad():
            measured = site_loss(call, run_config.topk, query_block, objective)
            loss = measured.loss
            if query_block > 1:  # tiles rank by the max of their queries' scores: rank those too
                loss = loss + site_loss(call, run_config.topk, 1, objective).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"calibration loss is {float(loss)} at site "
                                         f"{names.get(id(call.q_proj), '?')} (step "
                                         f"{len(result.steps) + 1}); lower lr ({lr})")
            (loss * share).backward()
        stats.append(measured)
        return call.dense()

    start = time.perf_counter()
    for p in params:
        p.requires_grad_(True)
    try:
        for step in range(steps):
            stats.clear()
            first = step * batches_per_step * world
            for i in range(rank, batches_per_step * world, world):
                with intercept_sites(handler), torch.no_grad():
                    runner(*_args(batches[(first + i) % len(batches)]))
            if not stats:
                raise RuntimeError("no rewritten site ran during calibration (graph breaks or "
                                   "sites kept dense: dsa_compile.explain says why)")
            _all_reduce_gradients(params, world)
            for p, mask in masks:  # Adam leaves an entry whose gradient is always 0 unchanged
                if p.grad is not None:
                    p.grad.mul_(mask)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1,
                   "loss": sum(float(s.loss.detach()) for s in stats) / len(stats),
                   "recall": sum(s.recall for s in stats) / len(stats),
                   "best_recall": sum(s.best_recall for s in stats) / len(stats)}
            result.steps.append(row)
            if progress and rank == 0:
                _progress(row, steps, time.perf_counter() - start)
    finally:
        for p in params:
            p.requires_grad_(False)
        if progress and rank == 0:
            print(file=sys.stderr)
    result.seconds = time.perf_counter() - start
    how = (f"calibrated ({objective}): {steps} steps x {batches_per_step * world} batch(es), "
           f"lr {lr}, "
           f"top-{run_config.topk}, {query_block}-query rows")
    for indexer in indexers.values():
        indexer.info.init = f"{how} (from: {indexer.info.init})"
    return result


def _progress(row: dict[str, float], steps: int, seconds: float) -> None:
    done = row["step"] / steps
    bar = "#" * int(30 * done)
    print(f"\rcalibrate [{bar:<30}] {row['step']}/{steps} loss {row['loss']:.4f} recall "
          f"{row['recall']:.3f} (best {row['best_recall']:.3f}) {seconds:.0f}s",
          end="", file=sys.stderr, flush=True)


def _distributed() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_gradients(params: Sequence[torch.Tensor], world: int) -> None:
    """Sums each indexer gradient over the ranks (each rank already scaled its share)."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


def measure_recall(model: torch.nn.Module, batches: Iterable[Any], config: DSAConfig | None = None,
                   **options: Any) -> dict[str, tuple[float, float]]:
    """Per site (indexer name): ``(recall, best)`` of the runtime selection (``dsa::indexer_topk``
    at the config's granularity and budget) on ``batches``, against the best selection at the
    same granularity and budget, averaged over batches."""
    names = _site_names(model)
    if not names:
        raise ValueError("measure_recall measures the model's own indexers and it has none: "
                         "dsa_compile.attach(model, *example_inputs) or load_adapter first")
    base = config or getattr(model, "dsa_config", None) or DSAConfig()
    run_config = base.replace(**options)
    totals: dict[str, list[float]] = {}
    runner = _runner(model, run_config)

    def handler(call: SiteCall) -> torch.Tensor:
        query_block, key_block = run_config.granularity(call.q.device.type)
        recall, best = selection_recall(call, run_config.topk, query_block, key_block,
                                        run_config.candidate_blocks, run_config.indexer_fp8)
        entry = totals.setdefault(names[id(call.q_proj)], [0, 0, 0])
        entry[0] += recall
        entry[1] += best
        entry[2] += 1
        return call.dense()

    for batch in batches:
        with intercept_sites(handler), torch.no_grad():
            runner(*_args(batch))
    return {name: (r / n, b / n) for name, (r, b, n) in totals.items()}
