#!/usr/bin/env bash
# On a GPU machine with Nsight Compute: profile one packed GEMV launch (bench/profile_cuda.py)
# with the full section set, clocks left alone, and export as text into $OUT: the details
# page (every section, stall reasons, throughput breakdowns), the source page per SASS
# instruction (executions, stall samples by reason, shared-memory wavefronts) and the raw
# metrics. Find the hot loop and its stalls in sass_<shape>.csv.
#   SHAPES="12288x49152 4096x4096" BITS=3 [BATCH=8] [FLAGS="-DX=1"] bash tools/device_profile.sh
#   (CORE_DIR=build/v1/cvxq_tui profiles that build instead of building one)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cvxq-cuda}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CORE_DIR=${CORE_DIR:-}
if [ -z "$CORE_DIR" ]; then
  CORE_DIR=build/prof/cvxq_tui
  { cmake -S . -B build/prof -G Ninja -DCVXQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "-DCMAKE_CUDA_FLAGS=${FLAGS:-}" \
      -DPython_EXECUTABLE="$(command -v python3)" && ninja -C build/prof; } > /tmp/build_prof.log 2>&1 \
    || { tail -30 /tmp/build_prof.log; exit 1; }
fi
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for sh in ${SHAPES:-12288x49152}; do
  SHAPE=$sh BITS=${BITS:-3} BATCH=${BATCH:-1} CVXQ_DEV_CORE_DIR=$CORE_DIR timeout ${STEP_TIMEOUT:-300} \
    $NCU --clock-control none --kernel-name regex:${KERNEL:-tiled_fast} --launch-skip 2 --launch-count 1 \
    --set full --import-source no -f -o "$OUT/p_$sh" python3 bench/profile_cuda.py \
    > /tmp/ncu_run_$sh.log 2>&1 || tail -20 /tmp/ncu_run_$sh.log
  $NCU -i "$OUT/p_$sh.ncu-rep" --print-details all --page details > "$OUT/details_$sh.txt" 2>&1
  $NCU -i "$OUT/p_$sh.ncu-rep" --page source --csv --print-source sass > "$OUT/sass_$sh.csv" 2>&1
  $NCU -i "$OUT/p_$sh.ncu-rep" --page raw --csv > "$OUT/raw_$sh.csv" 2>&1
  rm -f "$OUT/p_$sh.ncu-rep"
done
grep -E "Duration|Issued Warp Per Scheduler|Stall (Long|Wait|Short|MIO|Math)|Data Pipe Lsu Wavefronts" "$OUT"/details_*.txt | sort -u
