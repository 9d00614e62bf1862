"""Packed-format throughput: pack/unpack, dequantize and matvec (AVX2 vs scalar), and the
packed matvec against torch's float32 matmul of the dequantized matrix. Every ratio printed
is measured in this run.

    CVXQ_DEV_CORE_DIR=build/NAME/cvxq_tui python bench/bench_packed.py [--rows 4096 --cols 4096]
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


def best_time(fn, repeat):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_layer(rows, cols, group_rows, seed=0):
    rng = np.random.default_rng(seed)
    g = _core.geometry(rows, cols, group_rows)
    # Mixed depths 0..8 with mean ~3 bits, as an allocation at 3 bits/weight produces.
    p = np.array([0.03, 0.07, 0.2, 0.35, 0.2, 0.1, 0.03, 0.01, 0.01])
    depth = rng.choice(9, size=(g["n_clusters"], cols), p=p / p.sum()).astype(np.uint8)
    row_depth = depth[np.arange(g["rows_pad"]) // group_rows].astype(np.int64)
    idx = rng.integers(0, 1 << row_depth).astype(np.uint8)
    shape = depth.shape
    layer = dict(
        rows=rows, cols=cols, group_rows=group_rows, depth=depth,
        loc=(0.01 * rng.standard_normal(shape)).astype(np.float16).view(np.uint16),
        scale=np.abs(0.02 * rng.standard_normal(shape)).astype(np.float16).view(np.uint16),
        table=rng.standard_normal(_core.TABLE_SIZE).astype(np.float32),
        perm=rng.permutation(rows).astype(np.int32),
    )
    return layer, idx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--group-rows", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    rows, cols, gr = a.rows, a.cols, a.group_rows
    layer, idx = make_layer(rows, cols, gr)
    mean_bits = layer["depth"].mean()
    gb = 4 * rows * cols / 1e9  # float32 equivalent
    print(f"layer {rows}x{cols}, group_rows {gr}, mean depth {mean_bits:.2f} bits, "
          f"threads {_core.max_threads()}, cpu avx2 {_core.cpu_has_avx2()}")

    offsets, payload = _core.pack(rows, cols, gr, depth=layer["depth"], idx=idx)
    layer.update(offsets=offsets, payload=payload)
    packed = _core.PackedLayer(**layer)
    t_pack = best_time(lambda: _core.pack(rows, cols, gr, layer["depth"], idx), a.repeat)
    t_unpack = best_time(packed.unpack, a.repeat)
    assert np.array_equal(packed.unpack(), idx)
    print(f"pack    {t_pack * 1e3:7.2f} ms  {gb / t_pack:6.2f} GB/s (float32 equivalent)")
    print(f"unpack  {t_unpack * 1e3:7.2f} ms  {gb / t_unpack:6.2f} GB/s")
    print(f"pack+unpack {gb / (t_pack + t_unpack):6.2f} GB/s (target >= 1)")

    x1 = np.random.default_rng(1).standard_normal((1, cols)).astype(np.float32)
    x8 = np.random.default_rng(2).standard_normal((8, cols)).astype(np.float32)
    times = {}
    previous = _core.active_isa()
    isas = ["scalar", "avx2"] if _core.cpu_has_avx2() else ["scalar"]
    for isa in isas:
        _core.set_isa(isa)
        out = packed.dequantize()  # 64-byte aligned: rows take streaming stores
        times[isa, "dequantize"] = best_time(lambda: packed.dequantize(out=out), a.repeat)
        times[isa, "matvec"] = best_time(lambda: packed.matmul(x1), a.repeat)
        times[isa, "matmul8"] = best_time(lambda: packed.matmul(x8), a.repeat)
    _core.set_isa(previous)
    # dequantize writes into a reused array; a fresh one adds its page faults
    # (see "dequantize new" below).
    for op in ["dequantize", "matvec", "matmul8"]:
        line = "  ".join(f"{isa} {times[isa, op] * 1e3:7.2f} ms" for isa in isas)
        ratio = (f"  avx2 speed-up x{times['scalar', op] / times['avx2', op]:.2f}"
                 if len(isas) == 2 else "")
        print(f"{op:10s} {line}{ratio}")

    print(f"dequantize new array: {best_time(packed.dequantize, a.repeat) * 1e3:7.2f} ms "
          f"({_core.active_isa()})")

    try:
        import torch
    except ImportError:
        print("torch not installed: skipping the comparison")
        return 0
    torch.set_num_threads(_core.max_threads())  # the same thread count as the core (2 here)
    w = torch.from_numpy(packed.dequantize())
    t1, t8 = torch.from_numpy(x1), torch.from_numpy(x8)
    t_torch1 = best_time(lambda: t1 @ w.T, a.repeat * 4)
    t_torch8 = best_time(lambda: t8 @ w.T, a.repeat * 4)
    ours1 = best_time(lambda: packed.matmul(x1), a.repeat * 4)
    ours8 = best_time(lambda: packed.matmul(x8), a.repeat * 4)
    err = np.abs(packed.matmul(x8) - (t8 @ w.T).numpy()).max()
    print(f"torch threads {torch.get_num_threads()}")
    print(f"batch 1: packed {ours1 * 1e3:6.2f} ms  torch fp32 {t_torch1 * 1e3:6.2f} ms  "
          f"packed/torch time x{ours1 / t_torch1:.2f}")
    print(f"batch 8: packed {ours8 * 1e3:6.2f} ms  torch fp32 {t_torch8 * 1e3:6.2f} ms  "
          f"packed/torch time x{ours8 / t_torch8:.2f}  (max |diff| {err:.2e})")
    print(f"memory: packed payload {payload.nbytes / 1e6:.1f} MB vs fp32 {gb * 1e3:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
