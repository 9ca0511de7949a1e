"""The ops trace under torch.compile and torch.export with dynamic sequence lengths."""

from __future__ import annotations

import torch

from dsa_compile import indexer_topk, sparse_attention
from dsa_compile.kernels.reference import sparse_attention_reference

from conftest import make_attention_inputs, make_indexer_inputs


class DSALayer(torch.nn.Module):
    """Indexer + top-k + sparse attention on given projections (the shape of a rewritten site)."""

    def __init__(self, topk: int, query_block: int = 1, key_block: int = 0):
        super().__init__()
        self.topk, self.query_block, self.key_block = topk, query_block, key_block

    def forward(self, q, k, v, q_idx, k_idx, w):
        idx = indexer_topk(q_idx, k_idx, w, self.topk, True, 0, None, self.query_block,
                           self.key_block)
        return sparse_attention(q, k, v, idx, None, None, True, 0, self.query_block)[0]


def inputs(length: int):
    q, k, v = make_attention_inputs(1, 4, 2, length, length)
    q_idx, k_idx, w = make_indexer_inputs(1, length, length)
    return q, k, v, q_idx, k_idx, w


def test_compile_dynamic_lengths_without_recompiles():
    layer = DSALayer(topk=8, query_block=4, key_block=4)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=counting_backend, dynamic=True, fullgraph=True)
    for length in (19, 33, 50):
        args = inputs(length)
        torch.testing.assert_close(compiled(*args), layer(*args))
    assert len(graphs) == 1


def test_compile_with_aot_autograd_backward():
    layer = DSALayer(topk=6)
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    for length in (9, 14):
        q, k, v, *rest = inputs(length)
        q.requires_grad_()
        compiled(q, k, v, *rest).sum().backward()
        idx = indexer_topk(*rest, 6, True)
        q2 = q.detach().clone().requires_grad_()
        sparse_attention_reference(q2, k, v, idx, 16**-0.5, causal=True)[0].sum().backward()
        torch.testing.assert_close(q.grad, q2.grad, atol=1e-5, rtol=1e-5)


def test_export_with_dynamic_length_keeps_the_ops():
    layer = DSALayer(topk=8, query_block=4)
    length = torch.export.Dim("length", min=8, max=4096)
    dyn = {2: length}
    shapes = ({2: length}, dyn, dyn, {1: length}, {1: length}, {1: length})
    program = torch.export.export(layer, inputs(24), dynamic_shapes=shapes)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "dsa.indexer_topk.default" in targets and "dsa.sparse_attention.default" in targets
    args = inputs(41)
    torch.testing.assert_close(program.module()(*args), layer(*args))
