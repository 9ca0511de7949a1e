"""Packaging: the namespace layout, the CLI entry point, the private-API wrapper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsa_compile
from dsa_compile.kernels.torch_compat import (
    attention_with_lse,
    decompose_triton_ops,
    functional_tensor_mode,
)

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_subpackages_live_under_the_package_namespace(tmp_path):
    code = ("import dsa_compile.kernels, dsa_compile.passes, dsa_compile.plugins;"
            "print(dsa_compile.kernels.__name__, dsa_compile.passes.__name__)")
    assert run_python(code, tmp_path) == "dsa_compile.kernels dsa_compile.passes"


def test_top_level_kernels_is_not_this_project(tmp_path):
    """A top-level `kernels` would shadow the `kernels` package that transformers uses."""
    code = ("import importlib.util as u;"
            "print([(n, u.find_spec(n) and u.find_spec(n).origin) "
            "for n in ('kernels', 'passes', 'plugins')])")
    found = run_python(code, tmp_path)
    assert str(REPO) not in found, found


def test_cli_version_and_help():
    version = subprocess.run([sys.executable, "-m", "dsa_compile.cli", "--version"],
                             capture_output=True, text=True, check=True).stdout
    assert dsa_compile.__version__ in version
    help_text = subprocess.run([sys.executable, "-m", "dsa_compile.cli", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "sparse attention" in help_text


def test_cli_entry_point_lists_the_ops():
    exe = Path(sys.executable).with_name("dsa")
    out = subprocess.run([str(exe), "ops"], capture_output=True, text=True, check=True).stdout
    for op in ("dsa::indexer_scores", "dsa::indexer_topk", "dsa::sparse_attention"):
        assert op in out
    assert "CUDA: Triton" in out  # the test environment installs triton


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_with_lse_flash_matches_math(use_mask):
    """The private fused CPU kernel and the public-op fallback agree (empty rows included)."""
    q, k, v = torch.randn(1, 3, 6, 8), torch.randn(1, 3, 9, 8), torch.randn(1, 3, 9, 8)
    mask = None
    if use_mask:
        mask = torch.randn(6, 9).masked_fill(torch.rand(6, 9) > 0.6, float("-inf"))
        mask[2] = float("-inf")
    fast = attention_with_lse(q, k, v, mask, 0.3, use_flash=True)
    slow = attention_with_lse(q, k, v, mask, 0.3, use_flash=False)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-6, rtol=1e-5)
    if use_mask:
        assert torch.isneginf(fast[1][..., 2]).all() and (fast[0][..., 2, :] == 0).all()


def test_checkout_root_on_sys_path_does_not_register_the_ops_twice():
    """From the repository root, `import kernels` finds this folder: it must stay inert."""
    code = ("import kernels, dsa_compile, torch;"
            "q = torch.randn(1, 1, 3, 4); i = torch.zeros(1, 3, 1, dtype=torch.int32);"
            "print(kernels._SHADOW, bool(torch.isfinite(dsa_compile.sparse_attention(q, q, q, i)[0]).all()))")
    assert run_python(code, REPO) == "True True"


def test_private_hooks_of_the_cuda_registration():
    """The CUDA ops hook into AOTAutograd's functionalisation the way torch.library.triton_op
    does; if PyTorch moves these, this fails here instead of silently losing the decomposition."""
    mode = functional_tensor_mode()
    assert isinstance(mode, type) and issubclass(mode, torch.utils._python_dispatch.TorchDispatchMode)
    assert decompose_triton_ops() is True  # torch.compile decomposes
    import torch._functorch.config as functorch_config

    with functorch_config.patch(decompose_custom_triton_ops=False):  # as torch.export does
        assert decompose_triton_ops() is False
