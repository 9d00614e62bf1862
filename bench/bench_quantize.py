"""Per-group Laplace search: the core vs a vectorised torch CVXQ reference search.

A 4096 x 4096 layer at 3 bits in groups of 128 rows: a group is (row cluster of 128 rows,
column), so 32 * 4096 = 131072 groups of 128 weights, built as the transposed cluster
blocks. Both sides get the same 2 cores. The torch side is the CVXQ reference search
(mult over the grid at shift 0, then shift at the best mult, CDF-bin indices), processed
in chunks of groups so memory stays bounded. Run:

    CVXQ_DEV_CORE_DIR=build/dev/cvxq_tui python bench/bench_quantize.py
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

_dev = os.environ.get("CVXQ_DEV_CORE_DIR")
if _dev:  # a hand-made build (cmake -B build/NAME) of this checkout, with its sources
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import cvxq_tui

    cvxq_tui.__path__.insert(0, os.path.abspath(_dev))
from cvxq_tui import _core  # noqa: E402


def make_groups(rows: int, cols: int, group_rows: int, seed: int) -> np.ndarray:
    """A heavy-tailed layer (Student-t, 4 dof, per-row scales) cut into groups."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(rows, cols)).astype(np.float32)
    w *= rng.lognormal(0.0, 0.5, size=(rows, 1)).astype(np.float32) * 0.02
    # group (c, j) = W[c * group_rows:(c + 1) * group_rows, j]
    blocks = w.reshape(rows // group_rows, group_rows, cols).transpose(0, 2, 1)
    return np.ascontiguousarray(blocks.reshape(-1, group_rows))


def laplace_quantiles(ps) -> torch.Tensor:
    """Standard Laplace inverse CDF (unit scale b) at probabilities ps."""
    return torch.tensor([-math.copysign(1.0, p - 0.5) * math.log(1.0 - 2.0 * abs(p - 0.5))
                         for p in ps], dtype=torch.float32)


def torch_cvxq_search(x: torch.Tensor, bits: int, grid: torch.Tensor, chunk: int = 2048):
    """The CVXQ reference search per group, vectorised over groups and grid points.

    Index k = min(floor(LaplaceCDF(w; loc, b) * 2^B), 2^B - 1) and level
    LaplaceICDF((k + 0.5) / 2^B; loc, b). The CDF bin is found by bucketize against the
    bin edges (the Laplace quantiles j / 2^B) and the level by a table lookup, which gives
    the same bins as evaluating exp/log per weight and was the fastest torch variant tried
    (about 1.4x faster than the literal exp/floor/log1p form). Returns the total error.
    """
    n = 1 << bits
    levels = laplace_quantiles([(k + 0.5) / n for k in range(n)])
    edges = laplace_quantiles([j / n for j in range(1, n)])

    def sq_err(w, loc, b):  # w [g, 1, L]; loc, b [g, C, 1] -> [g, C]
        z = (w - loc) / b
        k = torch.bucketize(z, edges, right=True)
        return (((z - levels[k]) * b) ** 2).sum(-1)

    total = 0.0
    for g0 in range(0, x.shape[0], chunk):
        w = x[g0:g0 + chunk]
        s = torch.sort(w, dim=1).values
        half = w.shape[1] // 2
        mu = (0.5 * (s[:, half - 1] + s[:, half]) if w.shape[1] % 2 == 0 else s[:, half])[:, None]
        sigma = ((w - mu) ** 2).mean(1, keepdim=True).sqrt().clamp_min(1e-30)
        u = sigma * torch.exp2(grid)[None, :]                     # mult line at shift 0
        err = sq_err(w[:, None, :], mu[:, :, None], ((3.0 / math.sqrt(2.0)) * u)[:, :, None])
        u = u.gather(1, err.argmin(1, keepdim=True))              # shift line at that mult
        loc = mu + grid[None, :] * u
        b = ((3.0 / math.sqrt(2.0)) * u).expand_as(loc)
        err = sq_err(w[:, None, :], loc[:, :, None], b[:, :, None])
        total += float(err.min(1).values.double().sum())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--group-rows", type=int, default=128)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    threads = 2
    torch.set_num_threads(threads)
    x = make_groups(args.rows, args.cols, args.group_rows, args.seed)
    depth = np.full(x.shape[0], args.bits, np.uint8)
    print(f"layer {args.rows}x{args.cols}, {x.shape[0]} groups of {x.shape[1]}, {args.bits} bits, "
          f"{threads} threads (core: {_core.max_threads()} OpenMP threads)")

    grid = torch.arange(-16, 17, dtype=torch.float32) / 8.0
    xt = torch.from_numpy(x)
    t0 = time.perf_counter()
    torch_err = torch_cvxq_search(xt, args.bits, grid)
    t_torch = time.perf_counter() - t0
    print(f"torch CVXQ reference search: {t_torch:8.3f} s   total sq. error {torch_err:.6f}")

    times = {}
    for isa in ("scalar", "avx2"):
        if isa == "avx2" and not _core.cpu_has_avx2():
            continue
        _core.set_isa(isa)
        _core.quantize_groups(x[:256], depth[:256])  # warm the thread pool
        t0 = time.perf_counter()
        res = _core.quantize_groups(x, depth)
        times[isa] = time.perf_counter() - t0
        core_err = float(res["err"].astype(np.float64).sum())
        print(f"core laplace search [{isa:6s}]: {times[isa]:8.3f} s   total sq. error {core_err:.6f}"
              f"   ({core_err / torch_err:.4f} x torch)   speed-up {t_torch / times[isa]:6.1f}x")
    if len(times) == 2:
        print(f"avx2 vs scalar: {times['scalar'] / times['avx2']:.2f}x")


if __name__ == "__main__":
    main()
