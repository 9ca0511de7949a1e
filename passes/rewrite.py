"""The pass: find attention sites in a Dynamo FX graph and rewrite them to the dsa ops.

Each rewritten site gets its own indexer (parameters named ``<module path>.dsa_indexer.*``, so
an adapter can supply trained weights) and its SDPA-equivalent call is
replaced by :func:`dsa_compile.kernels.attention.dsa_attention`.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import fx

from ..kernels.attention import dsa_attention, granularity, indexed_attention
from .einsum import canonical_einsums
from .guards import mutated_inputs
from .indexer_init import find_projection_weight, initial_indexer
from .lower import emit_operands, emit_output
from .multihead import expand_multihead_attention
from .patterns import CATALOG, REFINEMENTS
from .rotary import applies_rotary
from .sites import AttentionSite, Layout, example_value

logger = logging.getLogger("dsa_compile")


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
    """Every node that some catalog pattern recognises, in graph order.

    A matcher or refinement that raises is a bug in this package: the node is left dense, with
    a warning, and the user's compile goes on.
    """
    sites = []
    for node in graph.nodes:
        for pattern in CATALOG:
            try:
                site = pattern(node)
                if site is not None:
                    for refine in REFINEMENTS:
                        refine(site)
            except Exception:
                logger.warning("dsa: %s failed on node %s; it stays dense (please report it)",
                               pattern.__name__, node.name, exc_info=True)
                site = None
            if site is not None:
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
    expand_multihead_attention(gm.graph)
    canonical_einsums(gm.graph)
    sites = find_sites(gm.graph)
    result = RewriteResult(gm, sites, [], {})
    replaced: dict[fx.Node, fx.Node] = {}  # site outputs rewritten so far -> their new node
    for site in sites:
        if not site.rewritable:
            continue
        why_not = settings.selects(site.module_path)
        if why_not:
            site.keep_dense(why_not)
            continue
        site.remap(replaced)
        old = site.node
        _rewrite(gm, site, inputs, settings, result)
        if site.node is not old:
            replaced[old] = site.output
    gm.graph.lint()
    gm.recompile()
    return result


def _new_input(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    """A placeholder after the last existing one."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    node.meta["example_value"] = value
    return node


def _lower(graph: fx.Graph, site: AttentionSite, attention, *extra_args, **kwargs) -> None:
    """Replaces the site by ``attention(q, k, v, attn_mask, *extra_args, scale=..., **kwargs)``
    on its SDPA-equivalent operands, then drops what only fed the site."""
    with graph.inserting_before(site.node):
        operands = emit_operands(graph, site)
        out = graph.call_function(attention, args=(operands.q, operands.k, operands.v,
                                                   operands.attn_mask, *extra_args),
                                  kwargs=dict(is_causal=site.is_causal, scale=operands.scale,
                                              enable_gqa=site.enable_gqa, **kwargs))
        result = emit_output(graph, site, out, operands)
    # The node users read stands for the site's value (a later site may read its shape); the
    # attention call keeps the module path only when the layout differs.
    result.meta.update(site.node.meta)
    if out is not result:
        out.meta.update({k: v for k, v in site.node.meta.items()
                         if k not in ("example_value", "val", "tensor_meta")})
    site.node.replace_all_uses_with(result)
    graph.erase_node(site.node)
    site.node, site.output = out, result
    _erase_unused(graph, site.owned)


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node], depth: int = 8) -> None:
    """Erases out-of-place computations that nothing uses any more, walking up their inputs."""
    erased: set[fx.Node] = set()
    for _ in range(depth):
        next_nodes = []
        for node in nodes:
            if node in erased or node.users or node.op not in ("call_function", "call_method"):
                continue
            if mutated_inputs(node):
                continue  # never drop a mutation
            next_nodes.extend(node.all_input_nodes)
            graph.erase_node(node)
            erased.add(node)
        nodes = next_nodes


def _rewrite(gm: fx.GraphModule, site: AttentionSite, inputs, settings: RewriteSettings,
             result: RewriteResult) -> None:
    if site.model_indices is not None:
        _lower(gm.graph, site, indexed_attention, site.model_indices)
        site.index_init = "the model's own indexer"
        site.granularity = "the model's own top-k per query"
        site.reason = "rewritten: sparse attention on the model's top-k indices (no dense mask)"
        return
    q, k = example_value(site.q), example_value(site.k)
    if site.layout is Layout.BHLD:
        heads, kv_heads, dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    else:  # batched matmuls over [B*H, L, D]: one head per batch entry, unless viewed as [B, H]
        heads = kv_heads = int(example_value(site.view_shape[1])) \
            if site.layout is Layout.BATCH_VIEW else 1
        dim = int(q.shape[2])
    try:  # nothing is changed in the graph until the indexer exists
        wq = find_projection_weight(site.q, heads * dim, inputs)
        wk = find_projection_weight(site.k, kv_heads * dim, inputs)
        rotary = applies_rotary(site.q, dim) and applies_rotary(site.k, dim)
        init = initial_indexer(heads, kv_heads, dim, settings.index_heads, settings.index_dim,
                               wq, wk, rotary=rotary)
    except Exception as err:  # a bug here must cost speed, never the user's compile
        logger.warning("dsa: indexer initialisation failed at %s", site.module_path,
                       exc_info=True)
        site.keep_dense(f"indexer initialisation failed ({type(err).__name__}: {err}); please "
                        "report it")
        return
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
    _lower(gm.graph, site, dsa_attention, *params, topk=settings.topk,
           dense_up_to=settings.dense_up_to, query_block=settings.query_block,
           key_block=settings.key_block, candidate_blocks=settings.candidate_blocks)
    site.index_init = init.source
    site.granularity = describe_granularity(device, settings)
    site.reason = f"rewritten: top-{settings.topk} above {settings.dense_up_to} keys"


def describe_granularity(device: torch.device, settings: RewriteSettings) -> str:
    """How the site selects keys (see ``DSAConfig``): per query, or per tile of queries."""
    query_block, key_block = granularity(device, settings.query_block, settings.key_block)
    select = "per query" if query_block == 1 else \
        f"shared by each tile of {query_block} queries (a query's keys depend on later queries " \
        "of its tile)"
    scan = "every key scored" if key_block == 0 else \
        f"two-stage over {key_block}-key blocks"
    return f"{device.type}: top-{settings.topk} {select}; {scan}"
