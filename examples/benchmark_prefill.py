"""End-to-end prefill benchmark, dsa against dense Inductor (the library's ``dsa bench``).

    python examples/benchmark_prefill.py            # 4K and 8K tokens, 2 layers
    dsa bench --lengths 4096 8192 16384             # the full benchmark
"""

from __future__ import annotations

import argparse

from dsa_compile.bench import render_table, run_bench


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_bench(args.lengths, layers=args.layers, repeats=1)
    print(render_table(result))
    return result


if __name__ == "__main__":
    main()
