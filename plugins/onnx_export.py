"""Translation of the dsa ops for ``torch.onnx.export`` and the ONNX export of a model.

The exporter calls the functions of :data:`TRANSLATIONS` for each ``dsa::indexer_topk`` /
``dsa::sparse_attention`` call of the exported program; each emits one node of the ``dsa``
domain (:mod:`.onnx_ops`), whose local function is appended to the saved model. Everything
else exports as torch exports it (``torch.cond`` of a site's dense and sparse paths becomes an
ONNX ``If``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx
import torch
from onnxscript import BOOL, FLOAT, INT32
from onnxscript import opset18 as op

from .onnx_ops import DOMAIN, PLUGIN_NAMESPACE, VERSION, dsa, function_protos, register_schemas


class OnnxExportError(ValueError):
    """A rewritten model holds something the ONNX translation cannot express."""


def _indexer_topk(q_idx, k_idx, weights, topk, causal=False, q_offset=0, key_mask=None,
                  query_block=1, key_block=0, candidate_blocks=0, k_scale=None):
    if k_scale is not None:
        raise OnnxExportError("dsa::indexer_topk with FP8 keys (k_scale) has no ONNX form yet: "
                              "export with indexer_fp8=False")
    if key_block:
        raise OnnxExportError(
            f"dsa::indexer_topk with key_block={key_block} (two-stage selection) has no ONNX "
            "form: export with key_block=0 (every key scored, the GPU default)")
    if key_mask is None:
        key_mask = op.Cast(op.Constant(value_ints=[1, 1, 1]), to=BOOL.dtype)
        key_mask = op.Reshape(key_mask, op.Constant(value_ints=[1, 1, 3]))
        key_mask = op.Slice(key_mask, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]),
                            op.Constant(value_ints=[2]))
    elif len(key_mask.shape) == 2:  # [B, Lk]: the same keys for every query
        key_mask = op.Unsqueeze(key_mask, op.Constant(value_ints=[1]))
    return dsa.IndexerTopK(q_idx, k_idx, weights, key_mask, topk=int(topk), causal=int(causal),
                           q_offset=int(q_offset), query_block=int(query_block),
                           plugin_namespace=PLUGIN_NAMESPACE)


def _sparse_attention(q, k, v, indices, scale=None, bias=None, causal=False, q_offset=0,
                      query_block=1, unique_indices=False):
    if indices.dtype != INT32.dtype:  # a model's own indexer (DeepseekV32) gives int64
        indices = op.Cast(indices, to=INT32.dtype)
    if scale is None:
        dim = q.shape[-1]
        if not isinstance(dim, int):
            raise OnnxExportError("sparse_attention with the default scale needs a static head "
                                  "dim")
        scale = dim ** -0.5
    if bias is None:
        bias = op.Cast(op.Constant(value_floats=[0.0]), to=FLOAT.dtype)
        bias = op.Reshape(bias, op.Constant(value_ints=[1, 1, 1, 1]))
    return dsa.SparseAttention(q, k, v, indices, bias, scale=float(scale), causal=int(causal),
                               q_offset=int(q_offset), query_block=int(query_block),
                               plugin_namespace=PLUGIN_NAMESPACE)


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` (the dsa op schemas registered)."""
    register_schemas()
    return {torch.ops.dsa.indexer_topk.default: _indexer_topk,
            torch.ops.dsa.sparse_attention.default: _sparse_attention}


def with_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the dsa ops' local functions and the domain's opset import. The functions
    are written against opset 18 and import the model's own standard opset (a function must;
    their ops mean the same from 18 to 23)."""
    present = {(f.domain, f.name) for f in model.functions}
    standard = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for proto in function_protos():
        for entry in proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = standard
        if (proto.domain, proto.name) not in present:
            model.functions.append(proto)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    return model


def program_to_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike,
                    input_names: Sequence[str] | None = None,
                    output_names: Sequence[str] | None = None) -> onnx.ModelProto:
    """Writes ``program`` (holding dsa ops) as an ONNX file that any runtime runs; returns it."""
    # optimize=False: the optimizer merges equal initializers (two sites' training-free
    # head_weights), and each site's indexer must keep its own name; ONNX Runtime optimizes
    # the graph at load anyway.
    exported = torch.onnx.export(program, dynamo=True, custom_translation_table=translations(),
                                 input_names=list(input_names) if input_names else None,
                                 output_names=list(output_names) if output_names else None,
                                 optimize=False)
    model = with_functions(exported.model_proto)
    onnx.save(model, os.fspath(path))
    onnx.checker.check_model(os.fspath(path), full_check=True)
    return model


def dsa_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The dsa-domain nodes of ``model``, in subgraphs (``If`` branches) too."""
    found: list[onnx.NodeProto] = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.domain == DOMAIN:
                found.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    return found


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``path`` (no custom-op library: the functions run)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(os.fspath(path), options,
                                        providers=["CPUExecutionProvider"])
