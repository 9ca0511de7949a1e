"""Semantic checks of ``backend="dsa"`` over the fuzz corpus (``tests/fuzz_corpus.py``).

Nothing here knows which sites the pass rewrites; every check holds for any correct pass:

1. ``exact_dense``: topk = L with the default ``min_seq_len``: the compiled module equals eager.
2. ``exact_sparse``: every key forced through the sparse ops (``min_seq_len=0``, ``topk=L``,
   exact per-query selection): equals eager.
3. ``causal_prefix`` (causal entries): with ``topk = L // 4``, perturbing the inputs at
   positions >= p leaves the outputs at positions < p unchanged.
   ``selected_reference`` (causal entries with a reference): the compiled output equals dense
   attention restricted to the keys the site selected (``capture_selections``), or eager when
   the site ran dense.
4. ``explain``: ``dsa_compile.explain`` never crashes, and every site kept dense says why.

A compile or run that raises fails a check, unless the eager module raises too. The two causal
checks share one compile per case (``sparse_run``); every other check compiles a fresh module
after ``torch.compiler.reset()`` (the corpus shares ``forward`` code between its modules, and
past Dynamo's recompile limit a module would silently run eagerly).
``python -P tests/test_fuzz_corpus.py`` prints a table of every case and check, with totals
(``--failures PATH`` also writes the failing (case, check, error) lines).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

if __name__ == "__main__":  # python -P tests/test_fuzz_corpus.py: the corpus lives beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzz_corpus import CORPUS, Case, case_named, summary_counts  # noqa: E402

import dsa_compile  # noqa: E402
from dsa_compile.kernels.attention import capture_selections  # noqa: E402

# softmax_implicit_dim calls F.softmax without dim on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")

PREFIX_ATOL = 1e-5
TOLERANCES = {  # (atol, rtol) by the output's dtype
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


class EagerRaised(Exception):
    """The eager module itself raises: a compiled module may raise too."""


def outputs_of(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in outputs_of(v)]
    raise TypeError(f"unexpected output {type(value).__name__}")


def call(module, inputs) -> list[torch.Tensor]:
    torch.manual_seed(0)  # train-mode dropout draws the same masks in every run
    with torch.no_grad():
        return outputs_of(module(*inputs))


def eager(case: Case, inputs=None) -> list[torch.Tensor]:
    try:
        return call(case.make_module(), case.make_inputs() if inputs is None else inputs)
    except Exception as err:  # the compiled module may then raise too
        raise EagerRaised(f"{type(err).__name__}: {err}") from err


def compiled(case: Case, **options):
    torch.compiler.reset()
    return torch.compile(case.make_module(), backend="dsa", options={"mode": "eager", **options})


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        atol, rtol = TOLERANCES.get(e.dtype, (0.0, 0.0))
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m, i=i: f"{what}, output {i}: {m}")


def guarded(check: Callable[[Case], Any]) -> Callable[[Case], Any]:
    """A check where the eager module raising excuses the compiled one raising as well."""

    def run(case: Case) -> Any:
        try:
            eager(case)
        except EagerRaised:  # nothing to compare with; a compiled error is then fine too
            return None
        return check(case)

    run.__name__ = check.__name__
    return run


# ------------------------------------------------------------------------------------------
# The checks (plain functions: the tests and the summary both call them).


@guarded
def check_exact_dense(case: Case) -> None:
    inputs = case.make_inputs()
    expected = eager(case, inputs)
    actual = call(compiled(case, topk=case.seq_len), case.make_inputs())
    assert_same(actual, expected, f"topk={case.seq_len}, default min_seq_len")


@guarded
def check_exact_sparse(case: Case) -> None:
    expected = eager(case)
    module = compiled(case, topk=case.seq_len, min_seq_len=0, query_block=1, key_block=0)
    actual = call(module, case.make_inputs())
    assert_same(actual, expected, f"every key through the sparse ops (topk={case.seq_len})")


def sparse_topk(case: Case) -> int:
    return max(1, case.seq_len // 4)


def sparse_options(case: Case) -> dict:
    return {"topk": sparse_topk(case), "min_seq_len": 0, "query_block": 1, "key_block": 0}


def boundary(case: Case) -> int:
    """p: check 3 perturbs positions >= p."""
    return case.seq_len // 2 + 1


@dataclass
class SparseRun:
    """One compile with topk = L // 4 (exact selection), run on the inputs (selections
    captured) and on the inputs perturbed at positions >= p."""

    outputs: list[torch.Tensor]
    selections: list[torch.Tensor]
    perturbed: list[torch.Tensor]


_SPARSE_RUNS: dict[str, SparseRun | Exception] = {}


def sparse_run(case: Case) -> SparseRun:
    """The causal checks share one compile per case (memoised, errors included)."""
    if case.name not in _SPARSE_RUNS:
        try:
            module = compiled(case, **sparse_options(case))
            with capture_selections() as selections:
                outputs = call(module, case.make_inputs())
            perturbed = call(module, case.perturb(case.make_inputs(), boundary(case)))
            _SPARSE_RUNS[case.name] = SparseRun(outputs, list(selections), perturbed)
        except Exception as err:  # re-raised by every check that needs the run
            _SPARSE_RUNS[case.name] = err
    run = _SPARSE_RUNS[case.name]
    if isinstance(run, Exception):
        raise run
    return run


def prefix(outputs: list[torch.Tensor], dims: tuple[int, ...], p: int) -> list[torch.Tensor]:
    assert len(outputs) == len(dims), f"{len(outputs)} outputs but {len(dims)} out_seq_dims"
    return [t.narrow(d, 0, p) for t, d in zip(outputs, dims, strict=True)]


def assert_prefix(actual, expected, case: Case, p: int, what: str) -> None:
    for i, (a, e) in enumerate(zip(prefix(actual, case.out_seq_dims, p),
                                   prefix(expected, case.out_seq_dims, p), strict=True)):
        torch.testing.assert_close(
            a, e, atol=PREFIX_ATOL, rtol=0.0, equal_nan=True,
            msg=lambda m, i=i: f"{what}: output {i} at positions < {p} changed when later "
                               f"tokens did: {m}")


@guarded
def check_causal_prefix(case: Case) -> None:
    p = boundary(case)
    # The corpus says the module is causal: eager must agree, or the entry is wrong.
    assert_prefix(eager(case, case.perturb(case.make_inputs(), p)), eager(case), case, p,
                  "corpus error: eager")
    run = sparse_run(case)
    assert_prefix(run.perturbed, run.outputs, case, p, f"compiled, topk={sparse_topk(case)}")


def future_selections(indices: torch.Tensor) -> str:
    """How many rows selected keys after their query (a causal module's rows must not need
    them), with an example: a hint for the failure message."""
    rows = torch.arange(indices.shape[1])[None, :, None]
    future = (indices.long() > rows).any(-1)
    if not future.any():
        return "no row selected a later key"
    b, t = (int(x) for x in future.nonzero()[0])
    chosen = sorted(int(i) for i in indices[b, t] if i >= 0)
    return (f"{int(future.sum())} of {future.numel()} rows selected later keys, e.g. batch {b} "
            f"query {t}: {chosen}")


@guarded
def check_selected_reference(case: Case) -> None:
    assert case.reference is not None
    module = case.make_module()
    inputs = case.make_inputs()
    expected_dense = eager(case, inputs)
    batch, queries = inputs[0].shape[0], inputs[0].shape[case.seq_dims[0]]
    every = torch.arange(case.seq_len, dtype=torch.int32).expand(batch, queries, -1)
    with torch.no_grad():  # the reference with every key selected is the module itself
        full = outputs_of(case.reference(module, inputs, every))
    assert_same(full[:1], expected_dense[:1], "corpus error: reference with every key")
    run = sparse_run(case)
    assert len(run.selections) <= 1, f"{len(run.selections)} sites selected keys in a " \
                                     "one-site module"
    if not run.selections:  # kept dense: the module's own output
        assert_same(run.outputs, expected_dense, "site kept dense")
        return
    indices = run.selections[0]
    with torch.no_grad():
        expected = outputs_of(case.reference(module, case.make_inputs(), indices))
    empty = int((expected[0].isnan() & ~run.outputs[0].isnan()).sum())
    hint = f"; {empty} output values are NaN in the reference (no key the module lets the " \
           "query see was selected) but not in the compiled output" if empty else ""
    assert_same(run.outputs[:1], expected,
                f"restricted to the selected keys (topk={sparse_topk(case)}, indices "
                f"{tuple(indices.shape)}; {future_selections(indices)}{hint})")


def explain_case(case: Case):
    """``dsa_compile.explain`` of the case (fresh module and Dynamo state)."""
    torch.compiler.reset()
    return dsa_compile.explain(case.make_module(), *case.make_inputs(), **sparse_options(case))


@guarded
def check_explain(case: Case):
    report = explain_case(case)
    for site in report.sites:
        if not site["rewritten"]:
            assert site["reason"].strip(), f"site kept dense without a reason: {site}"
    return report


CHECKS: dict[str, tuple[Callable[[Case], None], Callable[[Case], bool]]] = {
    "exact_dense": (check_exact_dense, lambda c: True),
    "exact_sparse": (check_exact_sparse, lambda c: True),
    "causal_prefix": (check_causal_prefix, lambda c: c.causal),
    "selected_reference": (check_selected_reference,
                           lambda c: c.causal and c.reference is not None),
    "explain": (check_explain, lambda c: True),
}


def names(check: str) -> list[str]:
    applies = CHECKS[check][1]
    return [case.name for case in CORPUS if applies(case)]


# ------------------------------------------------------------------------------------------
# Tests.


def test_corpus_shape():
    counts = summary_counts()
    assert len(CORPUS) >= 70 and all(counts.values()), counts
    for case in CORPUS:
        inputs = case.make_inputs()
        assert len(case.seq_dims) == len(inputs), case.name
        assert len(case.out_seq_dims) == len(eager(case, inputs)), case.name


@pytest.mark.parametrize("check, name", [(check, name) for check in CHECKS
                                          for name in names(check)])
def test_corpus(check, name):
    CHECKS[check][0](case_named(name))


# ------------------------------------------------------------------------------------------
# The summary table.


def one_line(err: BaseException) -> str:
    """The error in one line; for a crash, where it was raised (the innermost frame of the
    package, else the innermost frame)."""
    text = f"{type(err).__name__}: {err}"
    if "raised:" in text:  # Dynamo wraps the backend's error: keep the backend's own line
        text = text.split("raised:", 1)[-1]
    text = text.split("Set TORCHDYNAMO_VERBOSE")[0]
    text = " ".join(text.split())[:300]
    if not isinstance(err, AssertionError):
        frames = traceback.extract_tb(err.__traceback__)
        ours = [f for f in frames if "/passes/" in f.filename or "/kernels/" in f.filename
                or "/dsa_compile/" in f.filename]
        if frames:
            f = (ours or frames)[-1]
            text += f" [at {'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} in {f.name}]"
    return text


def corpus_summary(cases: list[Case] | None = None, out=sys.stdout) -> list[tuple[str, str, str]]:
    """Runs every check on every case; prints case, kind, rewritten / kept dense (+ reason),
    each check's pass/fail, and totals. Returns the failures as (case, check, error)."""
    cases = CORPUS if cases is None else cases
    failures: list[tuple[str, str, str]] = []
    rows = []
    totals = {check: [0, 0] for check in CHECKS}
    started = time.perf_counter()
    for case in cases:
        decision = "explain raised"
        marks = []
        for check, (fn, applies) in CHECKS.items():
            if not applies(case):
                marks.append("-")
                continue
            try:
                result = fn(case)
                marks.append("ok")
                totals[check][0] += 1
            except Exception as err:  # a check fails however it fails
                result = None
                marks.append("FAIL")
                totals[check][1] += 1
                failures.append((case.name, check, one_line(err)))
            if check == "explain" and result is not None:
                decision = "; ".join(
                    "rewritten" if s["rewritten"] else f"dense ({s['reason']})"
                    for s in result.sites) or "no site"
        rows.append((case.name, case.kind, *marks, decision))
    head = ("case", "kind", *CHECKS, "sites (explain, topk = L // 4)")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head) - 1)]
    for row in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)),
              row[-1], file=out)
    counts = summary_counts(cases)
    print(f"\n{len(cases)} cases ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
          f"{time.perf_counter() - started:.0f} s", file=out)
    for check, (ok, bad) in totals.items():
        print(f"  {check:20s} {ok:3d} pass  {bad:3d} fail", file=out)
    print(f"  {'all checks':20s} {sum(t[0] for t in totals.values()):3d} pass  "
          f"{len(failures):3d} fail", file=out)
    if failures:
        print("\nfailures:", file=out)
        for name, check, error in failures:
            print(f"  {name} | {check} | {error}", file=out)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", type=Path, help="also write the failures to this file")
    parser.add_argument("cases", nargs="*", help="case names (default: the whole corpus)")
    args = parser.parse_args(argv)
    cases = [case_named(n) for n in args.cases] if args.cases else None
    failures = corpus_summary(cases)
    if args.failures:
        args.failures.write_text("".join(f"{n} | {c} | {e}\n" for n, c, e in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
