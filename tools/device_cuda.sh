#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the core with the CUDA kernels, run the CUDA tests,
# then the kernel benchmark. Logs go to $OUT (or /tmp/cvxq-cuda).
#   bash tools/device_cuda.sh [bench/kernels.py gpu options]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cvxq-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm --format=csv
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
t0=$(date +%s)
if ! { cmake -S . -B build/gpu -G Ninja -DCVXQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DPython_EXECUTABLE="$(command -v python3)" && ninja -C build/gpu; } > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
export CVXQ_DEV_CORE_DIR=build/gpu/cvxq_tui
python3 -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$OUT/test.log" | tail -25
python3 bench/kernels.py gpu "$@" 2>&1 | tee "$OUT/bench.log"
