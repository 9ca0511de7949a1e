"""The dsa ops as ONNX: custom-domain nodes (domain ``dsa``, version 1), each with a local
function that decomposes it into standard ONNX ops (opset 18), so any runtime runs a file that
holds them while a runtime with a fused kernel (a TensorRT plugin) can claim the node.

``dsa::IndexerTopK(q_idx, k_idx, weights, key_mask) -> indices`` (``dsa::indexer_topk`` with
``key_block = 0``: every visible key scored):

- ``q_idx [B, Lq, HI, DI]``, ``k_idx [B, Lk, DI]``, ``weights [B, Lq, HI]`` (float),
  ``key_mask`` bool ``[B|1, Lq|1, Lk|1]`` (True = may be selected);
- attributes ``topk``, ``causal`` (0/1), ``q_offset``, ``query_block``;
- ``indices`` int32 ``[B, ceil(Lq / query_block), topk]``: per row of ``query_block`` queries
  the keys with the best ``max over the row's queries of sum_j w[t, j] relu(q[t, j] . k[s])``
  in descending order, ``-1`` past the visible keys.

``dsa::SparseAttention(q, k, v, indices, bias) -> out, lse`` (``dsa::sparse_attention``):

- ``q [B, H, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]``, ``indices`` int32
  ``[B, ceil(Lq / query_block), K]`` (a set per row: ``-1`` and repeats ignored), ``bias``
  float ``[B|1, H|1, Lq|1, Lk|1]`` added to the scores;
- attributes ``scale``, ``causal`` (0/1), ``q_offset``, ``query_block``;
- ``out [B, H, Lq, Dv]`` (q's dtype): softmax attention of each query over its row's keys
  (zeros where it sees none), ``lse [B, H, Lq]`` float (``-inf`` there).

Every node also carries ``plugin_namespace = "dsa"``, which TensorRT's plugin lookup reads.
"""

from __future__ import annotations

import functools
import math

import onnx
import onnx.defs
from onnxscript import BOOL, FLOAT, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "dsa"
VERSION = 1
PLUGIN_NAMESPACE = DOMAIN
dsa = Opset(DOMAIN, VERSION)

NEG_INF = -math.inf
_INT = onnx.defs.OpSchema.AttrType.INT
_FLOAT = onnx.defs.OpSchema.AttrType.FLOAT
_STRING = onnx.defs.OpSchema.AttrType.STRING


@script(dsa, default_opset=op)
def IndexerTopK(q_idx, k_idx, weights, key_mask: BOOL, topk: int, causal: int, q_offset: int,  # noqa: N802
                query_block: int):
    q = op.Cast(q_idx, to=FLOAT.dtype)
    k = op.Cast(k_idx, to=FLOAT.dtype)
    w = op.Cast(weights, to=FLOAT.dtype)
    logits = op.Relu(op.MatMul(q, op.Unsqueeze(op.Transpose(k, perm=[0, 2, 1]), [1])))
    scores = op.Squeeze(op.MatMul(op.Unsqueeze(w, [2]), logits), [2])  # [B, Lq, Lk]
    batch = op.Shape(q, start=0, end=1)
    lq = op.Shape(q, start=1, end=2)
    lk = op.Shape(k, start=1, end=2)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    key_pos = op.Range(zero, op.Squeeze(lk), one)
    query_pos = op.Add(op.Range(zero, op.Squeeze(lq), one), op.Constant(value_int=q_offset))
    seen = op.LessOrEqual(op.Unsqueeze(key_pos, [0]), op.Unsqueeze(query_pos, [1]))
    seen = op.Or(seen, op.Equal(op.Constant(value_int=causal), zero))
    visible = op.And(seen, key_mask)
    scores = op.Where(visible, scores, op.CastLike(NEG_INF, scores))
    block = op.Unsqueeze(op.Constant(value_int=query_block), [0])
    rows = op.Div(op.Sub(op.Add(lq, block), one), block)
    pad_q = op.Sub(op.Mul(rows, block), lq)
    zeros = op.Constant(value_ints=[0, 0, 0, 0])
    padded = op.Pad(scores, op.Concat(zeros, pad_q, op.Constant(value_ints=[0]), axis=0),
                    op.CastLike(NEG_INF, scores))
    tiles = op.Reshape(padded, op.Concat(batch, rows, block, lk, axis=0))
    best = op.ReduceMax(tiles, [2], keepdims=0)  # [B, R, Lk]
    budget = op.Unsqueeze(op.Constant(value_int=topk), [0])
    found = op.Min(budget, lk)
    values, chosen = op.TopK(best, found, axis=-1, largest=1, sorted=1)
    chosen = op.Where(op.IsInf(values, detect_positive=0), op.Constant(value_int=-1), chosen)
    chosen = op.Pad(chosen, op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0]), budget - found,
                                      axis=0), op.Constant(value_int=-1))
    return op.Cast(chosen, to=6)  # INT32


@script(dsa, default_opset=op)
def SparseAttention(q, k, v, indices, bias, scale: float, causal: int, q_offset: int,  # noqa: N802
                    query_block: int):
    qf = op.Cast(q, to=FLOAT.dtype)
    kf = op.Cast(k, to=FLOAT.dtype)
    vf = op.Cast(v, to=FLOAT.dtype)
    bf = op.Cast(bias, to=FLOAT.dtype)
    batch = op.Shape(q, start=0, end=1)
    heads = op.Shape(q, start=1, end=2)
    lq = op.Shape(q, start=2, end=3)
    dim = op.Shape(q, start=3, end=4)
    kv_heads = op.Shape(k, start=1, end=2)
    dim_v = op.Shape(v, start=3, end=4)
    rows = op.Shape(indices, start=1, end=2)
    slots = op.Shape(indices, start=2, end=3)
    group = op.Div(heads, kv_heads)
    block = op.Unsqueeze(op.Constant(value_int=query_block), [0])
    padded_q = op.Mul(rows, block)
    one = op.Constant(value_ints=[1])
    zero_s = op.Constant(value_int=0)
    one_s = op.Constant(value_int=1)
    # A row is a set: sort it, drop -1 and repeats.
    ranked, _ = op.TopK(op.Cast(indices, to=INT64.dtype), slots, axis=-1, largest=1, sorted=1)
    repeat = op.Equal(op.Slice(ranked, one, op.Constant(value_ints=[2**62]), [2]),
                      op.Slice(ranked, [0], op.Constant(value_ints=[-1]), [2]))
    no = op.Cast(op.Constant(value_ints=[0]), to=BOOL.dtype)
    first = op.Expand(no, op.Concat(batch, rows, one, axis=0))
    valid = op.And(op.GreaterOrEqual(ranked, zero_s), op.Not(op.Concat(first, repeat, axis=2)))
    safe = op.Where(valid, ranked, zero_s)  # [B, R, K]
    flat = op.Unsqueeze(op.Reshape(safe, op.Concat(batch, op.Mul(rows, slots), axis=0)), [2])
    k_rows = op.GatherND(op.Transpose(kf, perm=[0, 2, 1, 3]), flat, batch_dims=1)
    v_rows = op.GatherND(op.Transpose(vf, perm=[0, 2, 1, 3]), flat, batch_dims=1)
    k_rows = op.Reshape(k_rows, op.Concat(batch, rows, slots, kv_heads, dim, axis=0))
    v_rows = op.Reshape(v_rows, op.Concat(batch, rows, slots, kv_heads, dim_v, axis=0))
    k_t = op.Unsqueeze(op.Transpose(k_rows, perm=[0, 3, 1, 4, 2]), [2])  # [B, Hkv, 1, R, D, K]
    v_g = op.Unsqueeze(op.Transpose(v_rows, perm=[0, 3, 1, 2, 4]), [2])  # [B, Hkv, 1, R, K, Dv]
    pad_q = op.Sub(padded_q, lq)
    q_tiles = op.Pad(qf, op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), pad_q,
                                   op.Constant(value_ints=[0]), axis=0))
    q_tiles = op.Reshape(q_tiles, op.Concat(batch, kv_heads, group, rows, block, dim, axis=0))
    scores = op.Mul(op.MatMul(q_tiles, k_t), op.Constant(value_float=scale))
    # scores [B, Hkv, G, R, Qb, K]; masks: the row's set, causality, the bias of each pair.
    query_pos = op.Add(op.Range(zero_s, op.Squeeze(padded_q), one_s),
                       op.Constant(value_int=q_offset))
    query_pos = op.Reshape(query_pos, op.Concat(one, rows, block, one, axis=0))
    seen = op.LessOrEqual(op.Unsqueeze(safe, [2]), query_pos)  # [B, R, Qb, K]
    seen = op.Or(seen, op.Equal(op.Constant(value_int=causal), zero_s))
    keep = op.And(op.Unsqueeze(seen, [1, 2]), op.Unsqueeze(valid, [1, 2, 4]))
    bias_heads = op.Shape(bf, start=1, end=2)
    bias_kv = op.Max(op.Div(bias_heads, group), one)
    bias_shape = op.Concat(batch, bias_kv, op.Div(bias_heads, bias_kv), rows, block, axis=0)
    bias_pad = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), pad_q,
                         op.Constant(value_ints=[0]), axis=0)
    if op.Equal(op.Shape(bf, start=3, end=4), one):  # the same bias for every key
        full = op.Expand(bf, op.Concat(batch, bias_heads, lq, one, axis=0))
        pair_bias = op.Reshape(op.Pad(full, bias_pad), op.Concat(bias_shape, one, axis=0))
    else:
        lk = op.Shape(bf, start=3, end=4)
        full = op.Expand(bf, op.Concat(batch, bias_heads, lq, lk, axis=0))
        per_query = op.Expand(op.Unsqueeze(safe, [2]), op.Concat(batch, rows, block, slots,
                                                                axis=0))
        per_query = op.Slice(op.Reshape(per_query, op.Concat(batch, padded_q, slots, axis=0)),
                             [0], lq, [1])
        per_query = op.Expand(op.Unsqueeze(per_query, [1]),
                              op.Concat(batch, bias_heads, lq, slots, axis=0))
        gathered = op.GatherElements(full, per_query, axis=3)
        pair_bias = op.Reshape(op.Pad(gathered, bias_pad), op.Concat(bias_shape, slots, axis=0))
    scores = op.Where(keep, op.Add(scores, pair_bias), op.CastLike(NEG_INF, scores))
    peak = op.ReduceMax(scores, [-1], keepdims=1)
    peak = op.Where(op.IsInf(peak, detect_positive=0), op.CastLike(0.0, peak), peak)
    weights = op.Exp(op.Sub(scores, peak))
    total = op.ReduceSum(weights, [-1], keepdims=1)
    out = op.MatMul(weights, v_g)
    out = op.Div(out, op.Where(op.Equal(total, op.CastLike(0.0, total)),
                               op.CastLike(1.0, total), total))
    out = op.Slice(op.Reshape(out, op.Concat(batch, heads, padded_q, dim_v, axis=0)), [0], lq,
                   [2])
    lse = op.Add(peak, op.Log(total))
    lse = op.Slice(op.Reshape(lse, op.Concat(batch, heads, padded_q, axis=0)), [0], lq, [2])
    return op.CastLike(out, q), lse


FUNCTIONS = {"IndexerTopK": IndexerTopK, "SparseAttention": SparseAttention}


def _schema(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
            attributes: list[tuple[str, onnx.defs.OpSchema.AttrType]], doc: str
            ) -> onnx.defs.OpSchema:
    formal = onnx.defs.OpSchema.FormalParameter
    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return onnx.defs.OpSchema(
        name, DOMAIN, VERSION, doc,
        inputs=[formal(n, t) for n, t in inputs], outputs=[formal(n, t) for n, t in outputs],
        type_constraints=[("T", float_types, "floating inputs"),
                          ("TB", float_types, "the bias"),
                          ("TW", float_types, "the indexer's head weights (fp32 parameters "
                                              "beside 16-bit queries and keys)")],
        attributes=[onnx.defs.OpSchema.Attribute(n, t, required=n != "plugin_namespace")
                    for n, t in attributes] + [
            onnx.defs.OpSchema.Attribute("plugin_namespace", _STRING, "TensorRT plugin "
                                         "namespace", required=False)])


@functools.cache
def register_schemas() -> None:
    """Declares the two ops to ONNX in this process (the exporter looks nodes up by schema)."""
    schemas = [
        _schema("IndexerTopK",
                [("q_idx", "T"), ("k_idx", "T"), ("weights", "TW"),
                 ("key_mask", "tensor(bool)")],
                [("indices", "tensor(int32)")],
                [("topk", _INT), ("causal", _INT), ("q_offset", _INT), ("query_block", _INT)],
                "top-k keys per query row of the lightning indexer (see dsa_compile.plugins)"),
        _schema("SparseAttention",
                [("q", "T"), ("k", "T"), ("v", "T"), ("indices", "tensor(int32)"),
                 ("bias", "TB")],
                [("out", "T"), ("lse", "tensor(float)")],
                [("scale", _FLOAT), ("causal", _INT), ("q_offset", _INT), ("query_block", _INT)],
                "attention of each query over its row's indexed keys (see dsa_compile.plugins)"),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


def function_protos() -> list[onnx.FunctionProto]:
    """The local functions of both ops, each declaring ``plugin_namespace`` too (a node
    attribute the body does not read)."""
    protos = []
    for fn in FUNCTIONS.values():
        proto = fn.to_function_proto()
        if "plugin_namespace" not in proto.attribute and not any(
                a.name == "plugin_namespace" for a in proto.attribute_proto):
            proto.attribute_proto.append(onnx.helper.make_attribute("plugin_namespace",
                                                                    PLUGIN_NAMESPACE))
        protos.append(proto)
    return protos
