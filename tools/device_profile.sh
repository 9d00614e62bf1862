#!/usr/bin/env bash
# On a GPU machine: build with CUDA and profile one packed GEMV launch with Nsight Compute.
#   SHAPE=4096x4096 BITS=3 bash tools/device_profile.sh   (default 12288x49152, 3 bits)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cvxq-cuda}; mkdir -p "$OUT"
{ cmake -S . -B build/gpu -G Ninja -DCVXQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPython_EXECUTABLE="$(command -v python3)" && ninja -C build/gpu; } > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
export CVXQ_DEV_CORE_DIR=build/gpu/cvxq_tui
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
$NCU --clock-control none --kernel-name regex:tiled_ --launch-skip 2 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
  --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats \
  --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
  python3 bench/profile_cuda.py 2>&1 | tee "$OUT/ncu.txt" | grep -v "^==PROF==" | tail -150
