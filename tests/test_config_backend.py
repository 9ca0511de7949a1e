"""The config and the backend's entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dsa_compile import DSAConfig, DSAConfigError


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(DSAConfigError, match="unknown dsa option.*'topkk'.*valid options are: topk"):
        DSAConfig.from_options({"topkk": 8})


@pytest.mark.parametrize(("options", "message"), [
    ({"topk": 0}, "'topk' must be an integer >= 1"),
    ({"mode": "fast"}, "'mode' must be one of"),
    ({"key_block": -1}, "'key_block' must be an integer >= 0"),
    ({"include": [1]}, "'include' must be a string or a list of strings"),
])
def test_invalid_values_are_named(options, message):
    with pytest.raises(DSAConfigError, match=message):
        DSAConfig.from_options(options)


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

    assert granularity(torch.device("cpu"), None, None) == (128, 64)
    assert granularity(torch.device("cuda"), None, None) == (64, 0)  # Triton scores every key
    assert granularity(torch.device("cuda"), 1, 16) == (1, 16)  # explicit options win
    assert DSAConfig().query_block is None and DSAConfig().key_block is None
    with pytest.raises(DSAConfigError, match="query_block"):
        DSAConfig(query_block=0)
