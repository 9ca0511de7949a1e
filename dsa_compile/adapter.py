"""Adapters: a model's indexers saved apart from its dense checkpoint (peft-style).

A directory holds ``dsa_config.json`` (format version, every :class:`DSAConfig` field, and per
site: indexer name, module path, pattern, heads / kv heads / head dim, indexer shapes, how it
was made, and the name and a fingerprint of the base model's q / k projection weights) and
``dsa_indexer.safetensors`` (``<module path>.dsa_indexer.{q_proj,k_proj,head_weights}``).
Loading is strict: every check runs before the model is touched.
"""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .config import DSAConfig
from .ownership import DSAAdapterError, indexers_of, register, remember_module
from .passes.indexers import MODEL_INDEXER_INIT, PARAMETERS, DSAIndexer, SiteInfo

CONFIG_FILE = "dsa_config.json"
DSA_SITE = "dsa_indexer"  # a site's indexer attached by dsa-compile
MODEL_SITE = "model_indexer"  # the model's own indexer module (HF DeepseekV32): its weights
WEIGHTS_FILE = "dsa_indexer.safetensors"
FORMAT = "dsa-compile-adapter"
FORMAT_VERSION = 1
_SAMPLES = 16
_TOLERANCE = 2e-2  # fingerprints of one weight in fp32 / bf16 / fp16 agree far within this


def fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """A few numbers that tell one weight matrix from another: shape, mean, RMS and
    ``_SAMPLES`` values at evenly spaced flat positions (float64; robust to dtype casts)."""
    flat = weight.detach().to("cpu", torch.float64).flatten()
    where = torch.linspace(0, flat.numel() - 1, _SAMPLES).round().long()
    return {"shape": list(weight.shape), "mean": flat.mean().item(),
            "rms": flat.square().mean().sqrt().item(), "samples": flat[where].tolist()}


def same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprints are of the same weights (up to a dtype cast)."""
    if list(a["shape"]) != list(b["shape"]):
        return False
    scale = max(a["rms"], b["rms"], 1e-12)
    numbers = [(a["mean"], b["mean"]), (a["rms"], b["rms"]),
               *zip(a["samples"], b["samples"], strict=True)]
    return all(abs(x - y) <= _TOLERANCE * (scale + abs(x)) for x, y in numbers)


def _parameter_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def save_adapter(model: torch.nn.Module, directory: str | Path) -> Path:
    """Writes the model's indexers and options to ``directory`` (created if needed)."""
    indexers = indexers_of(model)
    if not indexers and not getattr(model, "dsa_model_indexers", ()):
        raise DSAAdapterError("the model has no dsa indexers to save: attach them first "
                              "(dsa_compile.attach(model, *example_inputs)) or load an adapter")
    config = getattr(model, "dsa_config", None) or DSAConfig()
    names = _parameter_names(model)
    sites, tensors = [], {}
    for name, indexer in indexers.items():
        base = {}
        for key, ref in indexer.base_weights.items():
            weight = ref()
            if weight is not None:
                base[key] = {"name": names.get(id(weight)), "fingerprint": fingerprint(weight)}
        sites.append({"name": name, "kind": DSA_SITE, **indexer.info.to_dict(),
                      "index_heads": indexer.index_heads, "index_dim": indexer.index_dim,
                      "shapes": indexer.shapes(), "base_weights": base})
        for param in PARAMETERS:
            tensors[f"{name}.{param}"] = getattr(indexer, param).detach().to("cpu").contiguous()
    for path in getattr(model, "dsa_model_indexers", ()):
        params = dict(model.get_submodule(path).named_parameters())
        sites.append({"name": path, "kind": MODEL_SITE, "module_path": path,
                      "shapes": {n: list(p.shape) for n, p in params.items()}})
        for n, p in params.items():
            tensors[f"{path}.{n}"] = p.detach().to("cpu").contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    document = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "dsa_compile_version": __version__,
                "base_model": type(model).__name__,
                "config": config.replace(adapter=None).to_dict(), "sites": sites}
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    from safetensors.torch import save_file

    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The json document and the tensors of an adapter directory (checked for format)."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise DSAAdapterError(f"{directory} is not a dsa adapter: {file.name} is missing "
                                  "(dsa_compile.save_adapter writes both files)")
    document = json.loads(config_file.read_text())
    if document.get("format") != FORMAT or document.get("format_version") != FORMAT_VERSION:
        raise DSAAdapterError(f"{config_file}: format {document.get('format')!r} version "
                              f"{document.get('format_version')!r}; this dsa-compile reads "
                              f"{FORMAT!r} version {FORMAT_VERSION}")
    from safetensors.torch import load_file

    tensors = load_file(str(weights_file))
    expected = {f"{s['name']}.{p}" for s in document["sites"] for p in s["shapes"]}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise DSAAdapterError(f"{weights_file}: tensors do not match {CONFIG_FILE} (first "
                              f"difference: {odd[0]})")
    return document, tensors


@functools.lru_cache(maxsize=8)
def read_adapter_cached(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter (read once per directory and process)."""
    return read_adapter(directory)[1]


def _check_model_indexer(model: torch.nn.Module, site: dict[str, Any]) -> torch.nn.Module:
    """The model's own indexer module an adapter site holds weights of (checked)."""
    path = site["module_path"]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise DSAAdapterError(f"adapter site {path!r}: the model has no indexer module {path!r}; "
                              "the adapter was made for another model") from None
    shapes = {n: list(p.shape) for n, p in module.named_parameters()}
    if shapes != site["shapes"]:
        first = next(n for n in sorted(set(shapes) | set(site["shapes"]))
                     if shapes.get(n) != site["shapes"].get(n))
        raise DSAAdapterError(f"adapter site {path!r}: parameter {first!r} is "
                              f"{shapes.get(first)} in the model, {site['shapes'].get(first)} in "
                              "the adapter; the adapter was made for another model")
    return module


def _check_site(model: torch.nn.Module, site: dict[str, Any], tensors: dict[str, torch.Tensor],
                verify_base: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The module a site's indexer goes into and the base weights it reads; raises naming the
    site when the model does not fit."""
    name, path = site["name"], site["module_path"]
    where = f"adapter site {path!r} ({name})"
    parent = name.rpartition(".")[0]
    try:
        module = model.get_submodule(parent) if parent else model
    except AttributeError:
        raise DSAAdapterError(f"{where}: the model has no module {parent!r}; the adapter was made "
                              "for another model. Load it into the model it was saved from, or "
                              "attach new indexers (dsa_compile.attach)") from None
    info = SiteInfo.from_dict(site)
    probe = DSAIndexer(*(tensors[f"{name}.{p}"] for p in PARAMETERS), info)
    why = probe.mismatch(info.heads, info.kv_heads, info.head_dim)
    if why:
        raise DSAAdapterError(f"{where}: {why} (the adapter file is inconsistent)")
    base = {}
    for key, entry in site.get("base_weights", {}).items():  # sizes first, then the values
        if not entry.get("name"):
            continue
        try:
            weight = model.get_parameter(entry["name"])
        except AttributeError:
            raise DSAAdapterError(f"{where}: the model has no parameter {entry['name']!r} (the "
                                  f"{key} projection the indexer was made for); the adapter "
                                  "belongs to another model") from None
        rows = (info.heads if key == "q" else info.kv_heads) * info.head_dim
        if weight.shape[0] != rows:
            raise DSAAdapterError(f"{where}: {entry['name']} has {weight.shape[0]} rows, the "
                                  f"indexer was made for {rows} (H={info.heads}, "
                                  f"Hkv={info.kv_heads}, D={info.head_dim}); another model")
        base[key] = weight
    for key, weight in base.items():
        entry = site["base_weights"][key]
        if verify_base and not same_fingerprint(fingerprint(weight), entry["fingerprint"]):
            raise DSAAdapterError(f"{where}: the model's {entry['name']} differs from the "
                                  f"weights the adapter was made for (another checkpoint of "
                                  "this architecture?). Load it into the model it was saved "
                                  "from, or pass strict=False to skip this check")
    return module, base


def load_adapter(model: torch.nn.Module, directory: str | Path, *example_inputs: Any,
                 strict: bool = True, **options: Any) -> list[str]:
    """Attaches the indexers saved in ``directory`` to ``model``; returns their names.

    Strict: a site whose module is missing, whose shapes do not fit, or whose base q / k
    projection weights differ from those the adapter was made for is an error naming the site;
    so is an indexer already attached to the model that the adapter lacks, and, when
    ``example_inputs`` are given, a site the pass rewrites for them that the adapter lacks.
    ``strict=False`` skips the base-weight fingerprints and the missing-site checks. ``options``
    change how the indexers run (``topk``, ``min_seq_len``, granularity, ``mode``); their sizes
    come from the adapter. Indexers already attached with the same shapes are updated in place,
    so compiled models see the new weights without a recompile.
    """
    fixed = sorted({"index_heads", "index_dim"} & set(options))
    if fixed:
        raise DSAAdapterError(f"{fixed} are fixed by the adapter's indexers; drop these options")
    document, tensors = read_adapter(directory)
    config = DSAConfig.from_dict(document["config"]).replace(adapter=str(directory), **options)
    sites = [s for s in document["sites"] if s.get("kind", DSA_SITE) == DSA_SITE]
    own = [(s, _check_model_indexer(model, s)) for s in document["sites"]
           if s.get("kind") == MODEL_SITE]
    checked = [(site, *_check_site(model, site, tensors, strict)) for site in sites]
    names = [site["name"] for site in sites]
    existing = indexers_of(model)
    if strict:
        extra = [n for n in existing if n not in names]
        if extra:
            raise DSAAdapterError(f"the model has an indexer at {extra[0]!r} that the adapter "
                                  f"{directory} lacks: detach the model first "
                                  "(dsa_compile.detach) or pass strict=False")
        if example_inputs:
            _check_covers(model, example_inputs, config, names, directory)
    for site, module, base in checked:
        name = site["name"]
        values = [tensors[f"{name}.{p}"] for p in PARAMETERS]
        attr = name.rpartition(".")[2]
        current = existing.get(name)
        if current is not None and current.shapes() == {p: list(v.shape) for p, v in
                                                        zip(PARAMETERS, values, strict=True)}:
            with torch.no_grad():
                for param, value in zip(current.tensors(), values, strict=True):
                    param.copy_(value)
            indexer = current
            indexer.info = SiteInfo.from_dict(site)
        else:
            device = _device_of(module, model)
            indexer = DSAIndexer(*(v.to(device) for v in values), SiteInfo.from_dict(site))
            if current is not None:
                current.detached = True
            module.add_module(attr, indexer)
        remember_module(module)
        indexer.base_weights = {key: weakref.ref(w) for key, w in base.items()}
    originals = model.__dict__.setdefault("_dsa_original_weights", {}) if own else {}
    with torch.no_grad():
        for site, module in own:
            for n, param in module.named_parameters():
                full = f"{site['name']}.{n}"
                originals.setdefault(full, param.detach().clone())  # detach() restores them
                param.copy_(tensors[full])
    if own:
        model.dsa_model_indexers = tuple(site["name"] for site, _ in own)
    register(model, config)
    return [*names, *(site["name"] for site, _ in own)]


def _device_of(module: torch.nn.Module, model: torch.nn.Module) -> torch.device:
    """Where a new indexer goes: beside the attention module's weights (else the model's)."""
    for source in (module, model):
        for param in source.parameters():
            return param.device
    return torch.device("cpu")


def _check_covers(model: torch.nn.Module, example_inputs: tuple, config: DSAConfig,
                  names: list[str], directory: str | Path) -> None:
    from .api import capture

    report = capture(model, example_inputs, config.replace(adapter=None), attach=False)
    for site in report.rewritten:
        if site["indexer_init"] != MODEL_INDEXER_INIT and site["indexer"] not in names:
            raise DSAAdapterError(f"site {site['module']!r} of the model has no indexer in the "
                                  f"adapter {directory} (expected {site['indexer']!r}): the "
                                  "adapter was made for another model or other options "
                                  "(include / exclude); pass strict=False to leave it to a "
                                  "training-free indexer")
