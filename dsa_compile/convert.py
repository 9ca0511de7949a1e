"""``dsa convert``: a third-party checkpoint -> a calibrated indexer adapter and a report.

The model (local safetensors, no custom code) gets training-free indexers, is calibrated on
text (default: Python's pydoc topics, real English that ships with Python, minus the topics held
out for evaluation), and the adapter is written with ``report.md`` / ``report.png`` /
``report.json``: selection recall per layer before and after, recall against budget, and
pooled-embedding cosine sparse vs dense, all on held-out text calibration never saw. The
adapter holds the calibrated indexers unless calibration lowered that cosine (then the
training-free ones, said in the report: on MiniLM, raising attention-mass recall can lower it),
and the saved adapter is measured again through ``torch.compile(fresh_model, backend="dsa",
options={"adapter": DIR})``, which also checks it as written. (Choosing by the held-out
cosine makes the saved column's cosine slightly optimistic; both columns are reported.)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .adapter import save_adapter
from .backend import make_backend
from .calibrate import calibrate, measure_recall
from .config import DSAConfig
from .demo import HELD_OUT_TOPICS, embedding_cosine
from .dynamo_compat import compile_isolated
from .ownership import attach, indexers_of

BUDGETS = (16, 32, 64, 128, 256)


def calibration_text(files: Sequence[str | Path] = ()) -> str:
    """The text of ``files``, or by default every pydoc topic not held out for evaluation."""
    if files:
        return "\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    from pydoc_data.topics import topics

    return "\n".join(text for name, text in sorted(topics.items()) if name not in HELD_OUT_TOPICS)


def token_batches(tokenizer, text: str, length: int, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` consecutive windows ``[1, length]`` of the text's tokens."""
    # cut into windows below, so the model's maximum length is no concern here (verbose=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False,
                    verbose=False)["input_ids"][0]
    windows = [ids[i:i + length][None] for i in range(0, len(ids) - length + 1, length)]
    if not windows:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of "
                         f"{length}")
    return windows[:limit]


def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def held_out_windows(tokenizer, length: int, count: int) -> list[torch.Tensor]:
    """Up to ``count`` windows of the held-out pydoc topics (never used for calibration)."""
    from pydoc_data.topics import topics

    return token_batches(tokenizer, "\n".join(topics[name] for name in HELD_OUT_TOPICS),
                         length, count)


def _recall(model, windows, config: DSAConfig, **options) -> dict[str, Any]:
    sites = measure_recall(model, windows, config=config, **options)
    recall = [r for r, _ in sites.values()]
    best = [b for _, b in sites.values()]
    return {"per_layer": recall, "best_per_layer": best, "recall": sum(recall) / len(recall),
            "best": sum(best) / len(best)}


def _quality(model, windows: list[torch.Tensor], config: DSAConfig,
             dense: list[torch.Tensor]) -> dict[str, Any]:
    """Recall at the config's granularity and exact per query, recall against budget, cosine:
    means over the held-out windows."""
    result = {"default": _recall(model, windows, config),
              "tiles_all_keys": _recall(model, windows, config, key_block=0),
              "exact": _recall(model, windows, config, query_block=1, key_block=0),
              "budget": {k: _recall(model, windows, config, topk=k)["recall"] for k in BUDGETS}}
    sparse = compile_isolated(model, backend=make_backend(config.replace(mode="eager"),
                                                          root=model), dynamic=False)
    result["cosine"] = _mean_cosine(sparse, windows, dense)
    double = config.replace(mode="eager", topk=2 * config.topk)  # the next budget up
    sparse = compile_isolated(model, backend=make_backend(double, root=model), dynamic=False)
    result["cosine_double_topk"] = _mean_cosine(sparse, windows, dense)
    return result


def _mean_cosine(model, windows: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(embedding_cosine(_hidden(model, ids), d) for ids, d in zip(windows, dense,
                                                                     strict=True)) / len(windows)


def convert(load: Callable[[], tuple[torch.nn.Module, Any]], out: str | Path, *,
            files: Sequence[str | Path] = (), steps: int = 150, lr: float = 1e-3,
            objective: str = "recall",
            length: int = 512, batches: int = 64, eval_windows: int = 4, progress: bool = True,
            **options: Any) -> dict[str, Any]:
    """Calibrates the indexers of the model ``load()`` returns (with its tokenizer) and writes
    the adapter and the report to ``out``. ``options``: :class:`DSAConfig` fields."""
    out = Path(out)
    model, tokenizer = load()
    config = DSAConfig(**{"min_seq_len": 0, **options})
    train = token_batches(tokenizer, calibration_text(files), length, batches)
    held_out = held_out_windows(tokenizer, length, eval_windows)
    with torch.no_grad():
        dense = [_hidden(model, ids) for ids in held_out]
    say = _announcer(progress)
    say(f"attaching training-free indexers; measuring them on {len(held_out)} held-out windows")
    attach(model, train[0], config=config)
    before = _quality(model, held_out, config, dense)
    training_free = _snapshot(model)
    say(f"calibrating on {len(train)} windows of {length} tokens, {steps} steps")
    start = time.perf_counter()
    log = calibrate(model, train, steps=steps, lr=lr, objective=objective, progress=progress)
    seconds = time.perf_counter() - start
    say("measuring the calibrated indexers")
    after = _quality(model, held_out, config, dense)
    saved = "calibrated"
    if after["cosine"] < before["cosine"]:  # never write an adapter worse than no calibration
        say(f"calibration lowered held-out cosine ({before['cosine']:.4f} -> "
            f"{after['cosine']:.4f}): the adapter keeps the training-free indexers")
        _restore(model, training_free)
        saved = "training-free"
    save_adapter(model, out)
    say(f"adapter written to {out}; checking it through torch.compile(options={{'adapter': ...}})")
    fresh, _ = load()  # the adapter as written, through torch.compile's option
    compiled = torch.compile(fresh, backend="dsa",
                             options={"adapter": str(out), "mode": "eager"})
    via_adapter = _mean_cosine(compiled, held_out, dense)
    device = next(model.parameters()).device.type
    result = {"config": config.to_dict(), "device": device,
              "granularity": list(config.granularity(device)), "steps": steps, "lr": lr,
              "objective": objective, "calibration_batches": len(train),
              "tokens_per_batch": length, "calibration_seconds": seconds,
              "held_out_tokens": int(sum(ids.shape[1] for ids in held_out)),
              "held_out_windows": len(held_out), "before": before, "after": after,
              "saved": saved, "cosine_via_adapter": via_adapter,
              "loss": [row["loss"] for row in log.steps],
              "train_recall": [row["recall"] for row in log.steps]}
    write_report(result, out)
    return result


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[list[torch.Tensor], str]]:
    """Every indexer's parameters (copies) and its ``info.init``."""
    return {name: ([t.detach().clone() for t in ix.tensors()], ix.info.init)
            for name, ix in indexers_of(model).items()}


def _restore(model: torch.nn.Module, snapshot: dict[str, tuple[list[torch.Tensor], str]]) -> None:
    for name, ix in indexers_of(model).items():
        tensors, ix.info.init = snapshot[name]
        with torch.no_grad():
            for param, value in zip(ix.tensors(), tensors, strict=True):
                param.copy_(value)


def _announcer(progress: bool) -> Callable[[str], None]:
    """Prints ``dsa convert: <phase>`` lines to stderr (nothing when ``progress`` is off)."""
    def say(message: str) -> None:
        if progress:
            print(f"dsa convert: {message}", file=sys.stderr, flush=True)

    return say


def write_report(result: dict[str, Any], out: Path) -> None:
    """``report.json``, ``report.md`` and (with matplotlib) ``report.png`` in ``out``."""
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(result))
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is in the test and bench extras
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = result["before"], result["after"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = range(len(before["default"]["per_layer"]))
    width = 0.27
    for shift, label, values in ((-width, "training-free", before["default"]["per_layer"]),
                                 (0, "calibrated", after["default"]["per_layer"]),
                                 (width, "best selection", after["default"]["best_per_layer"])):
        left.bar([i + shift for i in layers], values, width, label=label)
    left.set(xlabel="site (layer)", ylabel="attention-mass recall",
             title=f"recall per layer, top-{result['config']['topk']}, runtime granularity")
    left.legend()
    budgets = [int(k) for k in before["budget"]]
    right.plot(budgets, list(before["budget"].values()), "o-", label="training-free")
    right.plot(budgets, list(after["budget"].values()), "o-", label="calibrated")
    right.set(xscale="log", xlabel="top-k (budget)", ylabel="attention-mass recall",
              title="recall against budget (held-out text)")
    right.set_xticks(budgets, [str(k) for k in budgets])
    right.minorticks_off()
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


def report_markdown(result: dict[str, Any]) -> str:
    before, after = result["before"], result["after"]
    config, blocks = result["config"], result["granularity"]
    rows = [("recall, runtime granularity", before["default"]["recall"],
             after["default"]["recall"], after["default"]["best"]),
            ("recall, same tiles, every key scored (key_block=0)",
             before["tiles_all_keys"]["recall"], after["tiles_all_keys"]["recall"],
             after["tiles_all_keys"]["best"]),
            ("recall, exact per-query top-k", before["exact"]["recall"],
             after["exact"]["recall"], after["exact"]["best"])]
    lines = [
        "# dsa convert report", "",
        f"Calibration: {result['steps']} steps (objective {result['objective']!r}, lr "
        f"{result['lr']}) over "
        f"{result['calibration_batches']} windows of {result['tokens_per_batch']} tokens, "
        f"{result['calibration_seconds']:.0f} s. Evaluation: {result['held_out_tokens']} "
        f"held-out tokens in {result['held_out_windows']} windows (not used in calibration; "
        "means over the windows).",
        f"Indexer: HI={config['index_heads']}, DI={config['index_dim']}; top-{config['topk']}; "
        f"query_block={blocks[0]}, key_block={blocks[1]} on {result['device']}"
        + (" (the device's default for this budget)." if config["query_block"] is None
           or config["key_block"] is None else "."), "",
        "| measure | training-free | calibrated | best selection | calibrated / best |",
        "|---|---|---|---|---|"]
    for name, b, a, best in rows:
        lines.append(f"| {name} | {b:.3f} | {a:.3f} | {best:.3f} | {a / best:.3f} |")
    lines.append(f"| pooled-embedding cosine, sparse vs dense | {before['cosine']:.4f} | "
                 f"{after['cosine']:.4f} | | |")
    lines.append(f"| same, at top-{2 * config['topk']} | {before['cosine_double_topk']:.4f} | "
                 f"{after['cosine_double_topk']:.4f} | | |")
    lines += ["", f"Saved in the adapter: the {result['saved']} indexers"
              + (" (calibration lowered the held-out cosine, so the adapter keeps what it was "
                 "calibrated from)" if result["saved"] == "training-free" else "")
              + f"; cosine through `torch.compile(..., options={{'adapter': DIR}})`: "
              f"{result['cosine_via_adapter']:.4f}."]
    lines += ["", "Recall against budget (runtime granularity):", "",
              "| top-k | " + " | ".join(str(k) for k in before["budget"]) + " |",
              "|---|" + "---|" * len(before["budget"]),
              "| training-free | " + " | ".join(f"{v:.3f}" for v in before["budget"].values())
              + " |",
              "| calibrated | " + " | ".join(f"{v:.3f}" for v in after["budget"].values()) + " |",
              "", "Per layer (runtime granularity): "
              + ", ".join(f"{b:.3f} -> {a:.3f} (best {o:.3f})" for b, a, o in zip(
                  before["default"]["per_layer"], after["default"]["per_layer"],
                  after["default"]["best_per_layer"], strict=True)), "",
              "![report](report.png)", ""]
    return "\n".join(lines)
