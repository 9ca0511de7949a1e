#!/usr/bin/env bash
# One GPU session's measurements for issue 14, cut into calls that fit the device tool
# (10 minutes a call; 15 minutes a session, the machine's start included: the first two parts
# take at most 8 + 5 minutes). Run from the checkout, in this order of priority:
#
#   bash benchmarks/gpu_session.sh kernels   # correctness at full size, the layer at 64K / 128K
#                                            # (selectors, FP8 scores), MLA variants, decode
#                                            # (CUDA graphs); then the kernel tests on the GPU
#   bash benchmarks/gpu_session.sh models    # compiled models vs Inductor and the plain-PyTorch
#                                            # baseline, FP8 indexer; backward if time is left
#   bash benchmarks/gpu_session.sh decode    # ~2 min: the real model's decode step, graphed
#
# Everything lands in $OUT (default ./gpu_out): gpu_check.{json,md} (kept after each section),
# log.txt, pytest.txt, decode/. Each step has its own timeout, so a slow step costs its own
# numbers only. Where the package is not installed (the device machine) it is laid out as
# pyproject.toml installs it, in a temporary folder on PYTHONPATH.
set -u
part=${1:-}
case "$part" in
    kernels | models | decode) ;;
    *)
        echo "usage: bash benchmarks/gpu_session.sh kernels|models|decode" >&2
        exit 2
        ;;
esac
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
repo=$PWD
pkg=$repo
if ! python3 -c "import dsa_compile.kernels" 2>/dev/null; then
    pkg=$(mktemp -d)
    cp -r dsa_compile "$pkg/" && cp -r kernels passes plugins "$pkg/dsa_compile/" || exit 1
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
check() {  # gpu_check.py with a wall-clock cap a little past its own --budget-s
    local cap=$1
    shift
    timeout "$cap" python3 benchmarks/gpu_check.py --out "$OUT" "$@" >> "$OUT/log.txt" 2>&1
    echo "gpu_check $* -> exit $?" >> "$OUT/steps.txt"
}
case "$part" in
    kernels)
        check 330 --only correct layer mla decode --lengths 65536 131072 --budget-s 260
        xdist=()
        python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)
        (cd "$pkg" && timeout 150 python3 -P -m pytest "$repo/tests/test_triton_kernels.py" \
            "$repo/tests/test_on_device.py" "${xdist[@]}" -q -p no:cacheprovider) \
            > "$OUT/pytest.txt" 2>&1
        echo "pytest -> exit $?" >> "$OUT/steps.txt"
        ;;
    models)
        check 300 --only e2e backward --e2e-shapes 8b-plain 8b --e2e-lengths 32768 131072 \
            --e2e-fp8 --budget-s 220
        ;;
    decode)
        timeout 150 python3 benchmarks/decode.py --device cuda --compile \
            --compile-mode reduce-overhead --selector cooperative --contexts 131072 \
            --out "$OUT/decode" >> "$OUT/log.txt" 2>&1
        echo "decode.py -> exit $?" >> "$OUT/steps.txt"
        ;;
esac
cat "$OUT/steps.txt"
