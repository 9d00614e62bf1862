"""Where a packed GEMV's time goes on the GPU: CUDA-graph timings (medians) of the zeroing of
y alone, the product kernel(s) alone (accumulating into y), both as bench/kernels.py times
them, and an empty graph node for the launch floor, on rotated copies of one random layer.

    python bench/gpu_breakdown.py [--shapes 4096x4096 ...] [--bits 3] [--batch 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels  # noqa: E402  (sets up CVXQ_DEV_CORE_DIR like the other benches)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "12288x49152"])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    import torch

    from cvxq_tui import _core

    rng = np.random.default_rng(0)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    print(f"{'shape':>12} {'zero us':>8} {'kernel us':>9} {'both us':>8} {'tiny us':>8}")
    for sh in a.shapes:
        out_f, in_f = (int(v) for v in sh.split("x"))
        gpu, nbytes, _, _ = kernels._gpu_layer(out_f, in_f, a.bits, 128, rng, torch, _core)
        layers = kernels._rotated_copies(gpu.args, nbytes, l2)
        n_q = len(layers)
        xs = [torch.randn(a.batch, in_f, device="cuda") for _ in range(4)]
        ys = [torch.zeros(a.batch, out_f, device="cuda") for _ in range(4)]
        tiny = torch.zeros(1, device="cuda")
        n = max(n_q, 8)

        def kern(i):
            _core.cuda_tiled_matmul(**layers[i % n_q], x=xs[i % 4], y=ys[i % 4],
                                    stream=torch.cuda.current_stream().cuda_stream)

        t_zero = kernels._time_cuda(torch, [lambda i=i: ys[i % 4].zero_() for i in range(n)])
        t_kern = kernels._time_cuda(torch, [lambda i=i: kern(i) for i in range(n)])
        t_both = kernels._time_cuda(torch, [lambda i=i: (ys[i % 4].zero_(), kern(i)) for i in range(n)])
        t_tiny = kernels._time_cuda(torch, [lambda: tiny.add_(1.0) for _ in range(n)])
        print(f"{sh:>12} {t_zero:8.2f} {t_kern:9.2f} {t_both:8.2f} {t_tiny:8.2f}")


if __name__ == "__main__":
    main()
