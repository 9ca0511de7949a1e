"""The pass: find attention sites in a Dynamo FX graph and rewrite them to the dsa ops.

Each rewritten site gets its own indexer (parameters named ``<module path>.dsa_indexer.*``, so
an adapter can supply trained weights) and its SDPA-equivalent call is
replaced by :func:`dsa_compile.kernels.attention.dsa_attention`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import DSAConfig
from ..kernels.attention import dsa_attention, indexed_attention
from .einsum import canonical_einsums
from .guards import mutated_inputs
from .indexer_init import find_projection_weight, initial_indexer, per_kv_head_indexer
from .indexers import (
    MODEL_INDEXER_INIT,
    PARAMETERS,
    DSAIndexer,
    GraphIndexers,
    IndexerStore,
    SiteInfo,
    SiteRequest,
)
from .lower import emit_operands, emit_output
from .multihead import expand_multihead_attention
from .patterns import CATALOG, REFINEMENTS
from .rotary import applies_rotary
from .sites import AttentionSite, Layout, example_value, module_path_of

logger = logging.getLogger("dsa_compile")


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


@dataclass
class RewriteResult:
    """The sites of a graph, and the indexers whose parameters the rewritten graph takes as
    extra inputs (appended after the original ones: each indexer's ``tensors()`` in order)."""

    graph_module: fx.GraphModule
    sites: list[AttentionSite]
    indexers: list[DSAIndexer] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the name of each indexer

    @property
    def extra_inputs(self) -> list[torch.Tensor]:
        """The indexer parameters as they are now (read them again for every call)."""
        return [t for indexer in self.indexers for t in indexer.tensors()]


def rewrite_sites(
    gm: fx.GraphModule, example_inputs, config: DSAConfig, store: IndexerStore | None = None
) -> RewriteResult:
    """Finds the sites of ``gm`` and rewrites the eligible ones in a copy of it.

    Dynamo keeps reading its own graph after the backend returns, so ``gm`` is left as it is.
    Each rewritten site's indexer comes from ``store`` (initialised training-free when the store
    has none; default: :class:`GraphIndexers`). Its parameters become new trailing placeholders
    of the copy (Dynamo lifts every tensor a graph reads to an input, and Inductor expects it
    so); the caller appends ``result.extra_inputs`` to every call of ``result.graph_module``.
    """
    store = GraphIndexers() if store is None else store
    inputs_by_name = {n.name: v for n, v in _placeholder_values(gm, example_inputs).items()}
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    inputs = {n: inputs_by_name[n.name] for n in gm.graph.nodes
              if n.op == "placeholder" and n.name in inputs_by_name}
    expand_multihead_attention(gm.graph)
    canonical_einsums(gm.graph)
    sites = find_sites(gm.graph)
    result = RewriteResult(gm, sites)
    replaced: dict[fx.Node, fx.Node] = {}  # site outputs rewritten so far -> their new node
    for site in sites:
        if not site.rewritable:
            continue
        why_not = config.selects(site.module_path)
        if why_not:
            site.keep_dense(why_not)
            continue
        site.remap(replaced)
        old = site.node
        _rewrite(gm, site, inputs, config, store, result)
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


def _rewrite(gm: fx.GraphModule, site: AttentionSite, inputs, config: DSAConfig,
             store: IndexerStore, result: RewriteResult) -> None:
    if site.model_indices is not None:
        site.indexer = module_path_of(site.model_indices)
        _lower(gm.graph, site, indexed_attention, site.model_indices)
        site.index_init = MODEL_INDEXER_INIT
        site.granularity = "the model's own top-k per query"
        site.reason = "rewritten: sparse attention on the model's top-k indices (no dense mask)"
        return
    request = site_request(site, inputs)
    found = store.lookup(request)  # a stored indexer that does not fit raises: the user's error
    if found is None:
        indexer = initial_site_indexer(request, config)
        if indexer is None:
            return
        name = store.adopt(request, indexer)
    else:
        name, indexer = found
    result.indexers.append(indexer)
    result.names.append(name)
    params = [_new_input(gm, f"dsa_{len(result.indexers) - 1}_{n}", value)
              for n, value in zip(PARAMETERS, indexer.tensors(), strict=True)]
    _lower(gm.graph, site, dsa_attention, *params, topk=config.topk,
           dense_up_to=config.dense_up_to, query_block=config.query_block,
           key_block=config.key_block, candidate_blocks=config.candidate_blocks,
           per_kv_head=indexer.info.per_kv_head, indexer_fp8=config.indexer_fp8)
    site.indexer = name
    site.index_init = indexer.info.init
    site.granularity = describe_granularity(request.device, config, indexer.groups)
    site.reason = f"rewritten: top-{config.topk} above {config.dense_up_to} keys" \
        + (", FP8 indexer" if config.indexer_fp8 else "")


def site_request(site: AttentionSite, inputs: dict[fx.Node, torch.Tensor]) -> SiteRequest:
    """What the pass knows of a site when it asks for its indexer: head counts, head dim, the q/k
    projection weights upstream (``inputs``: the graph's placeholders and their values)."""
    q, k = example_value(site.q), example_value(site.k)
    if site.layout is Layout.BHLD:
        heads, kv_heads, dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[3])
    else:  # batched matmuls over [B*H, L, D]: one head per batch entry, unless viewed as [B, H]
        heads = kv_heads = int(example_value(site.view_shape[1])) \
            if site.layout is Layout.BATCH_VIEW else 1
        dim = int(q.shape[2])
    request = SiteRequest(site, heads, kv_heads, dim, q.device)
    try:
        request.q_weight = find_projection_weight(site.q, heads * dim, inputs)
        request.k_weight = find_projection_weight(site.k, kv_heads * dim, inputs)
        request.rotary = applies_rotary(site.q, dim) and applies_rotary(site.k, dim)
    except Exception:  # a bug here costs the weight-based init, never the user's compile
        logger.warning("dsa: projection search failed at %s", site.module_path, exc_info=True)
    return request


def initial_site_indexer(request: SiteRequest, config: DSAConfig) -> DSAIndexer | None:
    """The training-free indexer of a site (None, with the site kept dense, if that fails)."""
    site = request.site
    wq, wk = (None if w is None else w.detach() for w in (request.q_weight, request.k_weight))
    per_kv_head = config.selection == "kv_head" and request.kv_heads > 1
    make = per_kv_head_indexer if per_kv_head else initial_indexer
    try:  # nothing is changed in the graph until the indexer exists
        init = make(request.heads, request.kv_heads, request.head_dim, config.index_heads,
                    config.index_dim, wq, wk, rotary=request.rotary)
    except Exception as err:  # a bug here must cost speed, never the user's compile
        logger.warning("dsa: indexer initialisation failed at %s", site.module_path,
                       exc_info=True)
        site.keep_dense(f"indexer initialisation failed ({type(err).__name__}: {err}); please "
                        "report it")
        return None
    device = request.device  # the indexer lives where the site's activations live
    info = SiteInfo(site.module_path, site.full_pattern, request.heads, request.kv_heads,
                    request.head_dim, init.source, per_kv_head)
    return DSAIndexer(init.q_proj.to(device), init.k_proj.to(device),
                      init.head_weights.to(device), info)


def describe_granularity(device: torch.device, config: DSAConfig, groups: int = 1) -> str:
    """How the site selects keys (see ``DSAConfig``): per query, or per tile of queries; for all
    heads, or per kv head (``groups`` selections)."""
    query_block, key_block = config.granularity(device.type)
    select = "per query" if query_block == 1 else \
        f"shared by each tile of {query_block} queries (a query's keys depend on later queries " \
        "of its tile)"
    scan = "every key scored" if key_block == 0 else \
        f"two-stage over {key_block}-key blocks"
    heads = f", one per kv head ({groups})" if groups > 1 else ""
    return f"{device.type}: top-{config.topk} {select}{heads}; {scan}"
