"""The config, the backend's entry point, and what the backend logs."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

import dsa_compile
from dsa_compile import DSAConfig, DSAConfigError
from dsa_compile.backend import make_backend


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(DSAConfigError, match="unknown dsa option.*'topkk'.*valid options are: topk"):
        DSAConfig.from_options({"topkk": 8})


@pytest.mark.parametrize(("options", "message"), [
    ({"topk": 0}, "'topk' must be an integer >= 1"),
    ({"mode": "fast"}, "'mode' must be one of"),
    ({"key_block": -1}, "'key_block' must be an integer >= 0"),
    ({"include": [1]}, "'include' must be a string or a list of strings"),
    ({"include": 5}, "'include' must be a string or a list of strings, got 5"),
    ({"exclude": None}, "'exclude' must be a string or a list of strings"),
    ({"topk": True}, "'topk' must be an integer >= 1, got True"),
    ({"min_seq_len": True}, "'min_seq_len' must be an integer >= 0, got True"),
    ({"min_seq_len": -1}, "'min_seq_len' must be an integer >= 0"),
    ({"index_dim": 8.0}, "'index_dim' must be an integer >= 1"),
    ({"mode": ["eager"]}, "'mode' must be one of"),
])
def test_invalid_values_are_named(options, message):
    with pytest.raises(DSAConfigError, match=message):
        DSAConfig.from_options(options)


INT_FIELDS = [f.name for f in fields(DSAConfig) if "int" in str(f.type)]


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("flag", [True, False])
def test_every_integer_option_rejects_bools(name, flag):
    """bool is an int subclass: ``topk=True`` must not quietly mean 1."""
    with pytest.raises(DSAConfigError, match=f"'{name}' must be an integer"):
        DSAConfig(**{name: flag})


def test_integer_options_are_all_checked():
    assert {"topk", "min_seq_len", "index_heads", "query_block", "key_block"} <= set(INT_FIELDS)
    for name in INT_FIELDS:
        with pytest.raises(DSAConfigError, match=name):
            DSAConfig(**{name: "8"})


def test_replace_and_keyword_options_name_unknown_options():
    with pytest.raises(DSAConfigError, match=r"unknown dsa option\(s\) \['foo'\]; valid options are: topk"):
        DSAConfig().replace(foo=1)
    with pytest.raises(DSAConfigError, match="valid options are: topk"):
        dsa_compile.compile(torch.nn.Linear(2, 2), DSAConfig(), foo=1)
    with pytest.raises(DSAConfigError, match="'topk' must be an integer >= 1, got True"):
        dsa_compile.compile(torch.nn.Linear(2, 2), DSAConfig(), topk=True)
    with pytest.raises(DSAConfigError, match="must be a dict"):
        DSAConfig.from_options(8)


def test_include_patterns_from_any_iterable():
    assert DSAConfig(include=(p for p in ["a.*", "b.*"])).include == ("a.*", "b.*")
    assert DSAConfig(exclude=["x"]).exclude == ("x",)


def test_config_and_keyword_options_combine():
    """explain(config=..., topk=...) applies the keyword on top of the config (it was dropped)."""
    def f(q):
        return F.scaled_dot_product_attention(q, q, q)

    q = torch.randn(1, 2, 12, 4)
    config = DSAConfig(topk=64, include="nothing.*")
    assert dsa_compile.explain(f, q, config=config).rewritten == []
    assert len(dsa_compile.explain(f, q, config=config, include=()).rewritten) == 1


def test_defaults_and_strings():
    config = DSAConfig.from_options({"include": "*.layers.0.*"})
    assert config.include == ("*.layers.0.*",) and config.dense_up_to == config.topk == 2048
    assert DSAConfig(min_seq_len=0).dense_up_to == 0


def test_backend_name_resolves_through_the_entry_point_without_import():
    code = ("import sys, torch\n"
            "m = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()\n"
            "f = lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x)\n"
            "out = torch.compile(f, backend='dsa', options={'mode': 'eager'})(torch.randn(1, 2, 5, 4))\n"
            "print('dsa_compile' in sys.modules, tuple(out.shape))\n"
            "try:\n"
            "    torch.compile(f, backend='dsa', options={'nope': 1})(torch.randn(1, 2, 6, 4))\n"
            "except Exception as e:\n"
            "    print('valid options are' in str(e))\n")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["True", "(1,", "2,", "5,", "4)", "True"], done.stderr[-2000:]


def test_options_reach_the_rewrite():
    torch.compiler.reset()

    def f(q):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.randn(1, 2, 12, 4)
    out = torch.compile(f, backend="dsa", options={"topk": 12, "mode": "eager"})(q)
    torch.testing.assert_close(out, f(q))


def test_selection_granularity_defaults_per_device():
    from dsa_compile.kernels.attention import granularity

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert granularity(cpu, None, None, 2048) == (128, 64)
    assert granularity(cuda, None, None, 2048) == (64, 0)  # Triton scores every key
    assert granularity(cuda, None, None, 64) == (64, 0)
    assert granularity(cuda, 1, 16, 2048) == (1, 16)  # explicit options win
    # small budgets on CPU: tiles of topk / 4 queries, topk / 8-key blocks (powers of two)
    assert [granularity(cpu, None, None, k) for k in (512, 256, 128, 100, 64, 16, 1)] == \
        [(128, 64), (64, 32), (32, 16), (16, 8), (16, 8), (4, 4), (1, 4)]
    assert granularity(cpu, 64, None, 64) == (64, 8) and granularity(cpu, None, 0, 64) == (16, 0)
    # decode steps (few queries) score every cached indexer key unless told otherwise
    assert granularity(cpu, None, None, 2048, queries=1) == (1, 0)
    assert granularity(cpu, None, None, 2048, queries=9) == (128, 64)
    assert granularity(cpu, 16, 32, 2048, queries=1) == (16, 32)
    assert DSAConfig(topk=64).granularity("cpu") == (16, 8)
    assert DSAConfig().query_block is None and DSAConfig().key_block is None
    with pytest.raises(DSAConfigError, match="query_block"):
        DSAConfig(query_block=0)


class _Attention(torch.nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x, dropout_p=self.dropout)


class _TwoAttentions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.plain, self.dropped = _Attention(0.0), _Attention(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropped(self.plain(x))


def _messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dsa_compile" and r.levelno == level]


def test_backend_logs_sites_per_graph(caplog):
    caplog.set_level(logging.DEBUG, logger="dsa_compile")
    compiled = dsa_compile.compile(_TwoAttentions(), topk=4, mode="eager")
    compiled(torch.randn(1, 2, 8, 4))
    assert _messages(caplog, logging.INFO) == [
        "graph 0: 2 attention site(s) found, 1 rewritten, 1 kept dense",
        "  dropped: kept dense: dropout_p=0.5 (training-mode dropout is not reproduced by the "
        "sparse ops)",
    ]
    assert _messages(caplog, logging.DEBUG) == ["  plain: rewritten: top-4 above 4 keys"]
    assert _messages(caplog, logging.WARNING) == []


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_a_graph_without_attention_warns_once_per_backend(caplog):
    caplog.set_level(logging.INFO, logger="dsa_compile")
    graphs = []
    backend = make_backend(DSAConfig(mode="eager"), on_sites=graphs.append)
    compiled = torch.compile(_mlp(), backend=backend, dynamic=False)
    compiled(torch.randn(2, 4))
    compiled(torch.randn(3, 4))  # a second graph (static shapes), same backend
    assert len(graphs) == 2
    [warning] = _messages(caplog, logging.WARNING)
    assert warning.startswith("graph 0 holds no attention site")
    assert _messages(caplog, logging.INFO) == []


def test_the_named_backend_warns_once_per_options(caplog):
    """Dynamo calls the entry point per graph: the warning still comes once per options."""
    caplog.set_level(logging.INFO, logger="dsa_compile")
    options = {"mode": "eager", "index_dim": 17}  # options no other test uses
    compiled = torch.compile(_mlp(), backend="dsa", options=options, dynamic=False)
    compiled(torch.randn(2, 4))
    compiled(torch.randn(5, 4))
    assert len(_messages(caplog, logging.WARNING)) == 1
