#!/usr/bin/env bash
# On a GPU machine: build variants of the core side by side (build/v0, build/v1, ...), each
# with its own flags, in parallel; then bench each on the same shapes. The flags go to both
# nvcc and the C++ compiler (a macro may change the host-built layout too), so use -D macros.
#   VARIANTS="-DX=0;-DX=1" BENCH="--shapes 4096x4096 --bits 3 --batches 1" [TEST="1 2" (variants to test)] [BENCH_VARIANTS="0 2" (default: all)] [BREAKDOWN="gpu_breakdown.py options"] bash tools/device_variants.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cvxq-cuda}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
IFS=';' read -ra VS <<< "${VARIANTS:-}"
t0=$(date +%s)
for i in "${!VS[@]}"; do
  ( cmake -S . -B build/v$i -G Ninja -DCVXQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "-DCMAKE_CUDA_FLAGS=${VS[$i]}" "-DCMAKE_CXX_FLAGS=${VS[$i]}" \
      -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/build$i.log" 2>&1 && ninja -C build/v$i >> "$OUT/build$i.log" 2>&1 \
    || { echo "variant $i (${VS[$i]}) failed to build"; tail -30 "$OUT/build$i.log"; } ) &
done
wait
echo "builds: $(( $(date +%s) - t0 )) s"
if [ -n "${TEST:-}" ]; then
  for i in $TEST; do
    echo "== tests, variant $i (${VS[$i]})"
    CVXQ_DEV_CORE_DIR=build/v$i/cvxq_tui timeout ${STEP_TIMEOUT:-300} python3 -m pytest -q -x --tb=short tests/test_cuda.py 2>&1 | grep -E "Error|assert|passed|failed" | tail -8
  done
fi
for i in ${BENCH_VARIANTS:-${!VS[@]}}; do
  echo "== bench, variant $i (${VS[$i]})"
  CVXQ_DEV_CORE_DIR=build/v$i/cvxq_tui timeout ${STEP_TIMEOUT:-300} python3 bench/kernels.py gpu ${BENCH:-} 2>&1 | grep -v "^measured\|^device"
  [ -n "${BREAKDOWN:-}" ] && CVXQ_DEV_CORE_DIR=build/v$i/cvxq_tui timeout ${STEP_TIMEOUT:-300} python3 bench/gpu_breakdown.py $BREAKDOWN
done
