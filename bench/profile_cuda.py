"""One launch of the packed GEMV on a big layer (SHAPE, BITS, BATCH), for a profiler (ncu) to look at.
    ncu --kernel-name regex:tiled_ --launch-skip 2 --launch-count 1 python bench/profile_cuda.py
(tools/device_profile.sh runs it and exports the report as text)"""
import os
import sys
from pathlib import Path

import numpy as np
import torch

if os.environ.get("CVXQ_DEV_CORE_DIR"):  # a core built by hand, with this checkout's sources
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cvxq_tui

    cvxq_tui.__path__.insert(0, os.path.abspath(os.environ["CVXQ_DEV_CORE_DIR"]))
from cvxq_tui import _core  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import _gpu_layer  # noqa: E402

out_f, in_f = (int(v) for v in os.environ.get("SHAPE", "12288x49152").split("x"))
gpu, _, _, _ = _gpu_layer(out_f, in_f, int(os.environ.get("BITS", "3")), 128, np.random.default_rng(0), torch, _core)
layer = gpu.args
batch = int(os.environ.get("BATCH", "1"))
x = torch.randn(batch, in_f, device="cuda")
y = torch.zeros(batch, out_f, device="cuda")
for _ in range(4):
    _core.cuda_tiled_matmul(**layer, x=x, y=y)
torch.cuda.synchronize()
