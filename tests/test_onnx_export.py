"""ONNX export: the dsa nodes' local functions pinned to the torch ops, and whole models (tiny
configs of real HF families and the real MiniLM) run in ONNX Runtime with parity at several
lengths from one file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from models import tiny_model
from onnx import TensorProto, helper

import dsa_compile
from dsa_compile.cli import main as cli_main
from dsa_compile.demo import load_minilm, real_text_ids
from dsa_compile.kernels.topk import topk_lowest_ties
from dsa_compile.onnx_export import FirstOutput
from dsa_compile.plugins.onnx_export import dsa_nodes, ort_session
from dsa_compile.plugins.onnx_ops import DOMAIN, PLUGIN_NAMESPACE, function_protos


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()  # many instances of one HF class: stay under the recompile limit
    yield


def _run_node(op_type: str, feeds: dict[str, np.ndarray], attrs: dict, outputs: list[str],
              out_types: list[int]) -> list[np.ndarray]:
    """One dsa node in a model holding only its local function, run by ORT."""
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype),
                                            list(a.shape)) for n, a in feeds.items()]
    ranks = {"indices": 3, "out": 4, "lse": 3}
    outs = [helper.make_tensor_value_info(n, t, [None] * ranks[n])
            for n, t in zip(outputs, out_types, strict=True)]
    node = helper.make_node(op_type, list(feeds), outputs, domain=DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE, **attrs)
    model = helper.make_model(helper.make_graph([node], "one_node", inputs, outs),
                              opset_imports=[helper.make_opsetid("", 18),
                                             helper.make_opsetid(DOMAIN, 1)],
                              functions=function_protos())
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _as_sets(indices) -> np.ndarray:
    return np.sort(np.asarray(indices), axis=-1)


def test_topk_lowest_ties_breaks_ties_toward_lower_indices():
    scores = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0, 0.0],
                           [2.0, 2.0, 2.0, 5.0, 2.0, -1.0]])
    values, picked = topk_lowest_ties(scores, 4)
    np.testing.assert_array_equal(_as_sets(picked), [[0, 1, 2, 4], [0, 1, 2, 3]])
    assert values.tolist() == [[3.0, 1.0, 0.0, 0.0], [5.0, 2.0, 2.0, 2.0]]
    assert torch.equal(scores.gather(-1, picked), values)
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 4, (64, 50), generator=gen).float()  # ties everywhere
    values, picked = topk_lowest_ties(noisy, 10)
    order = torch.sort(-noisy, dim=-1, stable=True).indices[:, :10]  # reference: stable sort
    np.testing.assert_array_equal(_as_sets(picked), _as_sets(order))
    assert (values[:, :-1] >= values[:, 1:]).all()
    noisy[:5, 7] = float("nan")  # NaN ranks first, as in torch.topk
    noisy[5:9, 3] = float("inf")
    values, picked = topk_lowest_ties(noisy, 10)
    assert (picked[:5, 0] == 7).all() and (picked[5:9, 0] == 3).all()
    reference = torch.sort(-noisy[9:], dim=-1, stable=True).indices[:, :10]
    np.testing.assert_array_equal(_as_sets(picked[9:]), _as_sets(reference))


@pytest.mark.parametrize("query_block", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "keys", "queries"])
def test_indexer_topk_function_equals_the_torch_op(query_block, causal, mask):
    gen = torch.Generator().manual_seed(query_block * 7 + causal)
    batch, lq, lk, heads, dim, topk = 2, 13, 17, 3, 5, 6
    q = torch.randn(batch, lq, heads, dim, generator=gen)
    k = torch.randn(batch, lk, dim, generator=gen)
    w = torch.randn(batch, lq, heads, generator=gen)
    q[:, :, :, 0] -= 3.0  # many keys score exactly 0 (every ReLU off): ties at the k-th place
    key_mask = None
    if mask == "keys":
        key_mask = torch.rand(batch, lk, generator=gen) > 0.3
    elif mask == "queries":
        key_mask = torch.rand(batch, lq, lk, generator=gen) > 0.3
    offset = lk - lq if causal else 0
    expected = torch.ops.dsa.indexer_topk(q, k, w, topk, causal, offset, key_mask, query_block,
                                          0, 0)
    onnx_mask = np.ones((1, 1, 1), bool) if key_mask is None else (
        key_mask[:, None].numpy() if key_mask.dim() == 2 else key_mask.numpy())
    (got,) = _run_node("IndexerTopK", {"q_idx": q.numpy(), "k_idx": k.numpy(),
                                       "weights": w.numpy(), "key_mask": onnx_mask},
                       dict(topk=topk, causal=int(causal), q_offset=offset,
                            query_block=query_block), ["indices"], [TensorProto.INT32])
    assert got.dtype == np.int32 and got.shape == tuple(expected.shape)
    np.testing.assert_array_equal(_as_sets(got), _as_sets(expected))  # the same keys per row
    full = torch.ops.dsa.indexer_topk(q, k, w, 40, causal, offset, key_mask, query_block, 0, 0)
    (got,) = _run_node("IndexerTopK", {"q_idx": q.numpy(), "k_idx": k.numpy(),
                                       "weights": w.numpy(), "key_mask": onnx_mask},
                       dict(topk=40, causal=int(causal), q_offset=offset,
                            query_block=query_block), ["indices"], [TensorProto.INT32])
    np.testing.assert_array_equal(_as_sets(got), _as_sets(full))
    assert ((got == -1) == (full.numpy() == -1)).all()  # more slots than keys: -1 at the end


@pytest.mark.parametrize("query_block", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [None, "pairs", "heads_keys", "queries"])
def test_sparse_attention_function_equals_the_torch_op(query_block, causal, bias):
    gen = torch.Generator().manual_seed(query_block + 2 * causal)
    batch, heads, kv_heads, lq, lk, dim, dim_v, slots = 2, 4, 2, 10, 14, 8, 6, 7
    q = torch.randn(batch, heads, lq, dim, generator=gen)
    k = torch.randn(batch, kv_heads, lk, dim, generator=gen)
    v = torch.randn(batch, kv_heads, lk, dim_v, generator=gen)
    rows = -(-lq // query_block)
    indices = torch.randint(-1, lk, (batch, rows, slots), generator=gen, dtype=torch.int32)
    indices[0, 0, :3] = 5  # repeats count once
    indices[1, -1] = -1  # a row with no key: zeros, lse -inf
    shapes = {None: None, "pairs": (batch, 1, lq, lk), "heads_keys": (1, heads, 1, lk),
              "queries": (batch, heads, lq, 1)}
    b = None if bias is None else torch.randn(shapes[bias], generator=gen)
    if bias == "pairs":
        b[0, 0, 2, :4] = float("-inf")
    offset = 4 if causal else 0
    out, lse = torch.ops.dsa.sparse_attention(q, k, v, indices, 0.3, b, causal, offset,
                                              query_block)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "indices": indices.numpy(),
             "bias": np.zeros((1, 1, 1, 1), np.float32) if b is None else b.numpy()}
    got_out, got_lse = _run_node("SparseAttention", feeds,
                                 dict(scale=0.3, causal=int(causal), q_offset=offset,
                                      query_block=query_block), ["out", "lse"],
                                 [TensorProto.FLOAT, TensorProto.FLOAT])
    np.testing.assert_allclose(got_out, out.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_lse, lse.numpy(), rtol=1e-5, atol=1e-5)
    assert np.isneginf(got_lse[1, :, -1]).all()


def _hf_inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0  # the last row is padded
    return ids, mask


def _check_parity(model: torch.nn.Module, path, lengths, vocab: int = 100, **options) -> None:
    session = ort_session(path)
    for length in lengths:
        ids, mask = _hf_inputs(3, length, length)
        ids = ids % vocab
        with torch.no_grad():
            expected = dsa_compile.compile(model, mode="eager", **options)(ids, mask)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4,
                                   err_msg=f"length {length}")


OPTIONS = dict(topk=8, query_block=4, key_block=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "bert", "deepseek_v32",
                                  "phi3"])
def test_hf_family_runs_in_onnx_runtime_with_parity(arch, tmp_path):
    """One file per model, batch and length dynamic: at 6 keys every site runs dense (the If's
    dense branch), at 33 and 77 the dsa nodes select 8 keys per 4-query tile."""
    # deepseek_v32 selects with its own indexer (HF code, torch.topk): 8 index heads make its
    # ReLU scores tie-free (with 2, every head off gives exact zeros and torch.topk breaks
    # such ties in no fixed order, so torch itself picks arbitrarily among them).
    model = tiny_model(arch, "sdpa", **({"index_n_heads": 8} if arch == "deepseek_v32" else {}))
    wrapped = FirstOutput(model)
    result = dsa_compile.export_onnx(wrapped, _hf_inputs(2, 40, 0), tmp_path / "model.onnx",
                                     input_names=["input_ids", "attention_mask"],
                                     output_names=["output"], **OPTIONS)
    assert result.dynamic == {"input_ids": [0, 1], "attention_mask": [0, 1]}
    proto = onnx.load(result.path)
    nodes = dsa_nodes(proto)
    kinds = {n.op_type for n in nodes}
    assert kinds == ({"SparseAttention"} if arch == "deepseek_v32" else
                     {"IndexerTopK", "SparseAttention"})
    assert all(a.s.decode() == PLUGIN_NAMESPACE for n in nodes for a in n.attribute
               if a.name == "plugin_namespace")
    assert {f.name for f in proto.functions} >= {"IndexerTopK", "SparseAttention"}
    names = {i.name for i in proto.graph.initializer}
    if arch != "deepseek_v32":
        indexers = {n for n in names if ".dsa_indexer." in n}
        assert len(indexers) == 3 * 2, indexers  # q_proj, k_proj, head_weights per layer
        assert all(n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "head_weights") for n in indexers)
    _check_parity(wrapped, result.path, (6, 33, 77), **OPTIONS)


@pytest.mark.slow
def test_a_float16_model_exports_with_its_16_bit_indexer(tmp_path):
    """An fp16 model's indexer scores in fp16 beside fp32 head weights (its parameters): the
    node's schema takes both, the file passes the full ONNX check and runs in ONNX Runtime,
    equal to torch where every site is dense; past topk both select in fp16, where a rounding
    difference between runtimes may flip a near-tie (so the sparse length is held to a looser
    bound than the fp32 families above)."""
    model = FirstOutput(tiny_model("llama", "sdpa").to(torch.float16))
    result = dsa_compile.export_onnx(model, _hf_inputs(2, 40, 0), tmp_path / "model.onnx",
                                     input_names=["input_ids", "attention_mask"],
                                     output_names=["output"], **OPTIONS)
    session = ort_session(result.path)
    for length, tolerance in ((6, 2e-3), (33, 0.1), (77, 0.1)):
        ids, mask = _hf_inputs(3, length, length)
        with torch.no_grad():
            expected = dsa_compile.compile(model, mode="eager", **OPTIONS)(ids, mask).float()
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert got.dtype == np.float16 and np.isfinite(got).all()
        error = np.linalg.norm(got.astype(np.float32) - expected.numpy()) / expected.norm().item()
        assert error < tolerance, (length, error)


@pytest.mark.slow
def test_minilm_exports_with_parity_on_real_text(tmp_path):
    model, tokenizer = load_minilm()
    wrapped = FirstOutput(model)
    ids = real_text_ids(tokenizer, 256)
    example = (ids[:, :96].repeat(2, 1), torch.ones(2, 96, dtype=torch.long))
    options = dict(topk=64, query_block=32)
    result = dsa_compile.export_onnx(wrapped, example, tmp_path / "minilm.onnx",
                                     input_names=["input_ids", "attention_mask"], **options)
    assert result.dsa_nodes == 2 * 6
    session = ort_session(result.path)
    for length in (48, 150, 256):
        window = ids[:, :length].repeat(2, 1)
        mask = torch.ones_like(window)
        mask[1, length - 20:] = 0
        with torch.no_grad():
            expected = dsa_compile.compile(wrapped, mode="eager", key_block=0, **options)(window,
                                                                                            mask)
        (got,) = session.run(None, {"input_ids": window.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)


def test_sites_kept_dense_export_as_standard_attention(tmp_path):
    wrapped = FirstOutput(tiny_model("llama", "sdpa"))
    result = dsa_compile.export_onnx(wrapped, _hf_inputs(2, 40, 1), tmp_path / "m.onnx",
                                     input_names=["input_ids", "attention_mask"],
                                     exclude=["*layers.1.*"], **OPTIONS)
    assert result.dsa_nodes == 2  # layer 0 only
    names = {i.name for i in onnx.load(result.path).graph.initializer}
    assert not any(n.startswith("model.layers.1.") and "dsa_indexer" in n for n in names)
    _check_parity(wrapped, result.path, (33,), exclude=["*layers.1.*"], **OPTIONS)


def test_export_takes_the_adapter_and_names_its_weights(tmp_path):
    model = tiny_model("qwen2", "sdpa")
    ids, mask = _hf_inputs(2, 40, 2)
    dsa_compile.attach(model, ids, topk=8)
    indexer = model.model.layers[1].self_attn.dsa_indexer
    with torch.no_grad():
        indexer.q_proj.mul_(-1.5)
    dsa_compile.save_adapter(model, tmp_path / "adapter")
    fresh = FirstOutput(tiny_model("qwen2", "sdpa"))
    result = dsa_compile.export_onnx(fresh, (ids, mask), tmp_path / "m.onnx",
                                     input_names=["input_ids", "attention_mask"],
                                     adapter=str(tmp_path / "adapter"), **OPTIONS)
    weights = {i.name: onnx.numpy_helper.to_array(i)
               for i in onnx.load(result.path).graph.initializer}
    np.testing.assert_array_equal(weights["model.layers.1.self_attn.dsa_indexer.q_proj"],
                                  indexer.q_proj.detach().numpy())


def test_two_stage_selection_is_refused_with_a_reason(tmp_path):
    wrapped = FirstOutput(tiny_model("llama", "sdpa"))
    with pytest.raises(dsa_compile.DSAConfigError, match="key_block=16"):
        dsa_compile.export_onnx(wrapped, _hf_inputs(2, 40, 3), tmp_path / "m.onnx", topk=8,
                                key_block=16)


@pytest.mark.slow
def test_dsa_export_cli_on_minilm(tmp_path, capsys):
    out = tmp_path / "minilm.onnx"
    assert cli_main(["export", "minilm", "--onnx", str(out), "--topk", "32"]) == 0
    text = capsys.readouterr().out
    assert "12 dsa nodes" in text and "max |ORT - torch|" in text
    assert out.is_file()
