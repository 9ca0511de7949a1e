"""Every attention pattern of Inductor's ``fuse_attention`` pass (its ``_sfdp_pattern_*``
functions, with the example inputs and scalar values Inductor registers them with), run as user
code through ``backend="dsa"``: found, rewritten exactly, or kept dense with the reason.

The pattern sources are recompiled here because Dynamo does not trace code inside torch.
Inference forms: dropout with p = 0 (training-mode dropout stays dense, tested elsewhere).
"""

from __future__ import annotations

import inspect
import math
import textwrap

import pytest
import torch
import torch._inductor.fx_passes.fuse_attention as fuse_attention

import dsa_compile

# Kept dense on purpose (pattern name -> reason fragment). With fp32 q/k, Inductor's patterns 7-10
# cast the probabilities and v to fp16 before p @ v: SDPA cannot take mixed dtypes (their fp16
# forms are rewritten, below).
DENSE = {
    ("_sfdp_pattern_7", "float32"): "dtypes differ",
    ("_sfdp_pattern_8", "float32"): "dtypes differ",
    ("_sfdp_pattern_9", "float32"): "dtypes differ",
    ("_sfdp_pattern_10", "float32"): "dtypes differ",
}
HALF_CASES = {"_sfdp_pattern_7", "_sfdp_pattern_8", "_sfdp_pattern_9", "_sfdp_pattern_10"}


def _user_code() -> dict:
    """The pattern functions, compiled from their source outside torch (so Dynamo traces them)."""
    namespace = {"torch": torch, "math": math}
    for name in dir(fuse_attention):
        if name.startswith("_sfdp_pattern_"):
            source = textwrap.dedent(inspect.getsource(getattr(fuse_attention, name)))
            exec(compile(source, f"<inductor {name}>", "exec"), namespace)  # noqa: S102
    return namespace


USER_CODE = _user_code()


def _cases() -> list[tuple[str, str, list, dict]]:
    cases, seen = [], set()
    for name, spec in fuse_attention._get_sfdp_patterns(torch.device("cpu")):
        function = getattr(spec["search_fn"], "func", spec["search_fn"])
        pattern = function.__name__ if function.__name__ in USER_CODE else name.split("_bs1")[0]
        pattern = pattern.removesuffix("_training").removesuffix("_inference").removesuffix("_half")
        args = spec["example_inputs"]
        dtype = str(args[0].dtype).removeprefix("torch.")
        if dtype != "float32" and pattern not in HALF_CASES:
            continue
        key = (pattern, tuple((tuple(a.shape), a.dtype) for a in args))
        if key in seen:
            continue
        seen.add(key)
        scalars = {k: v for k, v in spec["scalar_workaround"].items() if k != "dropout_p"}
        cases.append((pattern, dtype, [(tuple(a.shape), a.dtype) for a in args], scalars))
    return cases


CASES = _cases()


def _inputs(pattern: str, specs: list, scalars: dict) -> tuple[list, dict]:
    params = list(inspect.signature(USER_CODE[pattern]).parameters)
    generator = torch.Generator().manual_seed(0)
    values = []
    for shape, dtype in specs:
        if dtype == torch.bool:
            values.append(torch.rand(shape, generator=generator) > 0.3)
        elif shape == ():
            values.append(torch.tensor(2.0, dtype=dtype))
        else:
            values.append(torch.randn(shape, generator=generator).to(dtype))
    kwargs = dict(scalars)
    if "dropout_p" in params:
        kwargs["dropout_p"] = 0.0
    positional = [v for v, name in zip(values, params, strict=False) if name not in kwargs]
    return positional, kwargs


class Pattern(torch.nn.Module):
    def __init__(self, fn, kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, *inputs):
        out = self.fn(*inputs, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out  # pattern 18 also returns k and v


def test_all_inductor_patterns_are_covered():
    names = {case[0] for case in CASES}
    assert len(names) == 30, sorted(names)


@pytest.mark.parametrize(("pattern", "dtype", "specs", "scalars"), CASES,
                         ids=[f"{c[0][6:]}-{c[1]}-{'x'.join(map(str, c[2][0][0]))}" for c in CASES])
def test_inductor_pattern(pattern, dtype, specs, scalars):
    torch.compiler.reset()
    inputs, kwargs = _inputs(pattern, specs, scalars)
    module = Pattern(USER_CODE[pattern], kwargs).eval()
    report = dsa_compile.explain(module, *inputs, topk=4)
    assert len(report.sites) == 1, report.table()
    site = report.sites[0]
    reason = DENSE.get((pattern, dtype))
    if reason is not None:
        assert site["rewritten"] is False and reason in site["reason"], site
        return
    assert site["rewritten"], site
    torch.compiler.reset()
    keys = max(s[0][-2] for s in specs if len(s[0]) >= 3)
    exact = torch.compile(module, backend="dsa",  # every key selected, through the sparse ops
                          options={"topk": 4 * keys, "min_seq_len": 0, "mode": "eager"})
    with torch.no_grad():
        expected, got = module(*inputs), exact(*inputs)
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
