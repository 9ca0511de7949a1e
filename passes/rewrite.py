"""The pass: find attention sites in a Dynamo FX graph and rewrite them to the dsa ops.

Each rewritten site gets its own indexer (parameters named ``<module path>.dsa_indexer.*``, so
an adapter can supply trained weights) and its SDPA-equivalent call is
replaced by :func:`dsa_compile.kernels.attention.dsa_attention`.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import torch
from torch import fx

from ..kernels.attention import dsa_attention, indexed_attention
from .handwritten import emit_sdpa_operands
from .indexer_init import find_projection_weight, initial_indexer
from .patterns import CATALOG, REFINEMENTS
from .rotary import applies_rotary
from .sites import AttentionSite, example_value


@dataclass(frozen=True)
class RewriteSettings:
    """What the pass needs to know (the API layer builds it from the user's config)."""

    topk: int = 2048
    dense_up_to: int = 2048
    index_heads: int = 4
    index_dim: int = 32
    query_block: int | None = None  # None: per device (kernels.attention.granularity)
    key_block: int | None = None
    candidate_blocks: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def selects(self, module_path: str) -> str | None:
        """None when the site may be rewritten, else why not."""
        if self.include and not any(fnmatch.fnmatch(module_path, p) for p in self.include):
            return f"not matched by include={list(self.include)}"
        for pattern in self.exclude:
            if fnmatch.fnmatch(module_path, pattern):
                return f"excluded by {pattern!r}"
        return None


class IndexerParameters(torch.nn.Module):
    """The lightning indexer of one site: ``q_proj [H*D, HI*DI]``, ``k_proj [Hkv*D, DI]``,
    ``head_weights [HI]``. The compiled graph reads them as extra inputs (see
    :class:`RewriteResult`), so updating them in place updates the compiled model."""

    def __init__(self, q_proj: torch.Tensor, k_proj: torch.Tensor, head_weights: torch.Tensor):
        super().__init__()
        self.q_proj = torch.nn.Parameter(q_proj, requires_grad=False)
        self.k_proj = torch.nn.Parameter(k_proj, requires_grad=False)
        self.head_weights = torch.nn.Parameter(head_weights, requires_grad=False)


def find_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every node that some catalog pattern recognises, in graph order."""
    sites = []
    for node in graph.nodes:
        for pattern in CATALOG:
            site = pattern(node)
            if site is not None:
                for refine in REFINEMENTS:
                    refine(site)
                sites.append(site)
                break
    return sites


def _placeholder_values(gm: fx.GraphModule, example_inputs) -> dict[fx.Node, torch.Tensor]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {n: v for n, v in zip(placeholders, example_inputs, strict=False)
            if isinstance(v, torch.Tensor)}


def _unique_path(taken: dict, module_path: str) -> str:
    """The adapter name of a site's indexer: ``<module path>.dsa_indexer`` (numbered if reused)."""
    base = f"{module_path}.dsa_indexer"
    path, n = base, 1
    while path in taken:
        n += 1
        path = f"{base}_{n}"
    return path


@dataclass
class RewriteResult:
    """The sites of a graph, and the indexer tensors the rewritten graph takes as extra inputs
    (appended after the original ones, in this order)."""

    graph_module: fx.GraphModule
    sites: list[AttentionSite]
    extra_inputs: list[torch.Tensor]
    indexers: dict[str, IndexerParameters]


def rewrite_sites(
    gm: fx.GraphModule, example_inputs, settings: RewriteSettings
) -> RewriteResult:
    """Finds the sites of ``gm`` and rewrites the eligible ones in a copy of it.

    Dynamo keeps reading its own graph after the backend returns, so ``gm`` is left as it is.
    The indexer tensors become new trailing placeholders of the copy (Dynamo lifts every tensor
    a graph reads to an input, and Inductor expects it so); the caller appends
    ``extra_inputs`` to every call of ``result.graph_module``.
    """
    inputs_by_name = {n.name: v for n, v in _placeholder_values(gm, example_inputs).items()}
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    inputs = {n: inputs_by_name[n.name] for n in gm.graph.nodes
              if n.op == "placeholder" and n.name in inputs_by_name}
    sites = find_sites(gm.graph)
    result = RewriteResult(gm, sites, [], {})
    for site in sites:
        if not site.rewritable:
            continue
        why_not = settings.selects(site.module_path)
        if why_not:
            site.keep_dense(why_not)
            continue
        _rewrite(gm, site, inputs, settings, result)
    gm.graph.lint()
    gm.recompile()
    return result


def _sdpa_operands(graph: fx.Graph, site: AttentionSite) -> dict:
    if "steps" in site.extra:  # a hand-written site: rebuild scale and mask from its steps
        return emit_sdpa_operands(graph, site)
    return {"q": site.q, "k": site.k, "v": site.v, "attn_mask": site.attn_mask,
            "scale": site.scale, "squeeze": False, "flatten": False}


def _new_input(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A placeholder after the last existing one."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    node.meta["example_value"] = value
    return node


def _replace(graph: fx.Graph, site: AttentionSite, replacement: fx.Node, operands: dict) -> None:
    """Puts ``replacement`` in place of the site's output and drops what only fed the site.
    Rank-3 sites get their output back as ``[B*H, L, Dv]`` (``squeeze`` / ``flatten``)."""
    replacement.meta.update(site.node.meta)
    result_node = replacement
    if operands["squeeze"] or operands["flatten"]:
        with graph.inserting_after(replacement):
            result_node = graph.call_method("squeeze", (replacement, 1)) if operands["squeeze"] \
                else graph.call_method("flatten", (replacement, 0, 1))
    site.node.replace_all_uses_with(result_node)
    graph.erase_node(site.node)
    site.node = replacement
    dead = [*site.extra.get("chain_nodes", []), site.extra.get("index_mask")]
    _erase_unused(graph, [n for n in dead if n is not None])


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node], depth: int = 8) -> None:
    """Erases out-of-place computations that nothing uses any more, walking up their inputs."""
    erased: set[fx.Node] = set()
    for _ in range(depth):
        next_nodes = []
        for node in nodes:
            if node in erased or node.users or node.op not in ("call_function", "call_method"):
                continue
            if _mutates(node):
                continue  # never drop a mutation
            next_nodes.extend(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)
        nodes = next_nodes


def _mutates(node: fx.Node) -> bool:
    """In-place ops (``x.add_(...)``, ``torch.relu_``); ``operator.and_`` and friends are not."""
    if node.op == "call_function" and getattr(node.target, "__module__", "") == "_operator":
        return False
    name = str(getattr(node.target, "__name__", node.target))
    return name.endswith("_") and not name.startswith("__")


def _rewrite_with_model_indices(gm: fx.GraphModule, site: AttentionSite) -> None:
    graph = gm.graph
    with graph.inserting_before(site.node):
        operands = _sdpa_operands(graph, site)
        replacement = graph.call_function(
            indexed_attention,
            args=(operands["q"], operands["k"], operands["v"], operands["attn_mask"],
                  site.extra["model_indices"]),
            kwargs=dict(is_causal=site.is_causal, scale=operands["scale"],
                        enable_gqa=site.enable_gqa),
        )
    _replace(graph, site, replacement, operands)
    site.index_init = "the model's own indexer"
    site.reason = "rewritten: sparse attention on the model's top-k indices (no dense mask)"


def _rewrite(gm: fx.GraphModule, site: AttentionSite, inputs, settings: RewriteSettings,
             result: RewriteResult) -> None:
    if "model_indices" in site.extra:
        _rewrite_with_model_indices(gm, site)
        return
    q, k = example_value(site.q), example_value(site.k)
    if q.dim() == 3:  # batched matmuls over [B*H, L, D]: one head per batch entry
        heads = kv_heads = site.extra.get("view_heads", 1)  # unless viewed as [B, H] (MBart)
        dim = int(q.shape[2])
    else:
        heads, kv_heads, dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    wq = find_projection_weight(site.q, heads * dim, inputs)
    wk = find_projection_weight(site.k, kv_heads * dim, inputs)
    rotary = applies_rotary(site.q, dim) and applies_rotary(site.k, dim)
    init = initial_indexer(heads, kv_heads, dim, settings.index_heads, settings.index_dim, wq, wk,
                           rotary=rotary)
    path = _unique_path(result.indexers, site.module_path)
    device = q.device  # the indexer lives where the site's activations live
    indexer = IndexerParameters(init.q_proj.to(device), init.k_proj.to(device),
                                init.head_weights.to(device))
    result.indexers[path] = indexer
    params = []
    for name in ("q_proj", "k_proj", "head_weights"):
        value = getattr(indexer, name)
        params.append(_new_input(gm, f"dsa_{len(result.extra_inputs)}_{name}", value))
        result.extra_inputs.append(value)
    graph = gm.graph
    with graph.inserting_before(site.node):
        operands = _sdpa_operands(graph, site)
        replacement = graph.call_function(
            dsa_attention,
            args=(operands["q"], operands["k"], operands["v"], operands["attn_mask"], *params),
            kwargs=dict(
                is_causal=site.is_causal, scale=operands["scale"], enable_gqa=site.enable_gqa,
                topk=settings.topk, dense_up_to=settings.dense_up_to,
                query_block=settings.query_block, key_block=settings.key_block,
                candidate_blocks=settings.candidate_blocks,
            ),
        )
    _replace(graph, site, replacement, operands)
    site.index_init = init.source
    site.reason = f"rewritten: top-{settings.topk} above {settings.dense_up_to} keys"
