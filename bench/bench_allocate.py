"""Bit allocation speed: the fast solver on 10^7 groups (2^(-2B) model and measured curves)
against the 1 s target, and the plain reference solver on 10^5 groups for comparison.

Groups are 256 weights with side bits of 8 (depth 0) or 40 (depth > 0), sensitivities
log-normal, at a budget of 3 bits/weight. Run:

    CVXQ_DEV_CORE_DIR=build/NAME/cvxq_tui python bench/bench_allocate.py [--groups 10000000]
"""

import argparse
import os
import sys
import time

import numpy as np

_dev = os.environ.get("CVXQ_DEV_CORE_DIR")
if _dev:  # a hand-made build (cmake -B build/NAME) of this checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import cvxq_tui

    cvxq_tui.__path__.insert(0, os.path.abspath(_dev))
from cvxq_tui import _core  # noqa: E402

TARGET_S = 1.0


def make_problem(n, seed=0):
    rng = np.random.default_rng(seed)
    count = np.full(n, 256, np.int64)
    log2_var = rng.normal(-8, 2, n).astype(np.float32)
    log2_sens = rng.normal(-10, 3, n).astype(np.float32)
    side = np.array([8.0] + [40.0] * 8)
    # Measured curves: the model's shape with +-50% noise per depth, so some are not convex.
    curve = np.exp2((log2_var + log2_sens)[:, None] - 2.0 * np.arange(9)[None, :])
    curve *= rng.uniform(0.5, 1.5, (n, 9))
    curve *= 256
    return count, dict(log2_var=log2_var, log2_sens=log2_sens, side_bits=side), curve.astype(np.float32)


def best_time(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=10_000_000)
    ap.add_argument("--ref-groups", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"threads: {_core.max_threads()}")

    count, model, curve = make_problem(args.groups)
    budget = 3.0 * count.sum()
    modes = {
        "model": model,
        "curve": dict(curve=curve, side_bits=model["side_bits"]),
    }
    per_group = {}
    for name, kw in modes.items():
        t, r = best_time(lambda: _core.allocate_bits(count, budget, **kw), args.repeat)
        per_group[name] = t / args.groups
        print(
            f"fast {name:5s} {args.groups:>10,d} groups: {t:.3f} s  ({t / TARGET_S:.2f} x the {TARGET_S:.0f} s target)"
            f"  {r['total_bits'] / count.sum():.4f} bits/weight, log2 lambda {r['log2_lambda']:.3f}"
        )

    n = args.ref_groups
    small = count[:n]
    budget = 3.0 * small.sum()
    for name, kw in modes.items():
        kw = {k: (v[:n] if k != "side_bits" else v) for k, v in kw.items()}
        t_ref, ref = best_time(lambda: _core.allocate_bits(small, budget, **kw, reference=True), 1)
        t_fast, fast = best_time(lambda: _core.allocate_bits(small, budget, **kw), args.repeat)
        same = np.array_equal(ref["depth"], fast["depth"])
        print(
            f"reference {name:5s} {n:>8,d} groups: {t_ref:.3f} s; fast on the same: {t_fast:.4f} s"
            f" ({t_ref / t_fast:.0f} x); per group: reference {t_ref / n * 1e9:.0f} ns vs fast at"
            f" {args.groups:,d} groups {per_group[name] * 1e9:.0f} ns ({t_ref / n / per_group[name]:.0f} x); same depths: {same}"
        )


if __name__ == "__main__":
    main()
