"""Where one launch of the fast kernel spends its time, from the stamps of a build with
-DCVXQ_PHASES (dev instrumentation): per warp, cycles from its start to each phase, and the
spread of warp start and end times across the launch (%globaltimer).
    CVXQ_DEV_CORE_DIR=build/v1/cvxq_tui python3 tools/phases.py 4096x4096 [bits] [batch]
Phases: 1 table filled (block barrier), 2 first batch's records and x in, 3 first batch
computed, 4 all runs done, 5 block barrier before the y adds, 6 adds issued."""
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernels  # noqa: E402  (sets up CVXQ_DEV_CORE_DIR)

from cvxq_tui import _core  # noqa: E402

def report(raw: np.ndarray) -> None:
    """Prints where the warps of one launch spent their time; raw: [8192, 16] stamps, row
    block * 8 + warp (all zero for warps that did not run)."""
    idx = np.flatnonzero(raw[:, 0] > 0)
    a = raw[idx]
    span = (a[:, 7] - a[:, 0]).astype(np.float64)  # ns, from %globaltimer
    clock_ghz = float(np.median(a[span > 2000, 6] / span[span > 2000]))  # cycles per ns over the warp's life
    t0 = a[:, 0].min()
    start = (a[:, 0] - t0) / 1e3
    end = (a[:, 7] - t0) / 1e3
    print(f"{len(a)} warps; SM clock {clock_ghz:.2f} GHz (cycles / globaltimer)")
    print(f"warp start (us after first): median {np.median(start):.2f}  max {start.max():.2f}")
    print(f"warp end   (us after first start): median {np.median(end):.2f}  p90 {np.percentile(end, 90):.2f}  "
          f"max {end.max():.2f}")
    names = ["", "table filled", "1st batch in", "1st batch done", "runs done", "block barrier", "adds issued"]
    prev = np.zeros(len(a))
    for k in range(1, 7):
        c = a[:, k].astype(np.float64)
        ok = c > 0
        d = (c - prev) / (clock_ghz * 1e3)
        print(f"  phase {k} {names[k]:>15}: at {np.median(c[ok]) / (clock_ghz * 1e3):6.2f} us (median; p90 "
              f"{np.percentile(c[ok], 90) / (clock_ghz * 1e3):6.2f}), step median {np.median(d[ok]):6.2f} us")
        prev = np.where(ok, c, prev)
    dep, sm, units, runs = a[:, 8].astype(int), a[:, 9].astype(int), a[:, 10].astype(int), a[:, 11].astype(int)
    for d in np.unique(dep):
        m = dep == d
        print(f"  depth {d}: {m.sum():5d} warps, units/warp median {np.median(units[m]):.0f} max {units[m].max()}, "
              f"runs/warp median {np.median(runs[m]):.0f}, end median {np.median(end[m]):.2f} p90 "
              f"{np.percentile(end[m], 90):.2f} max {end[m].max():.2f} us; us per unit (median) "
              f"{np.median(end[m] / np.maximum(units[m], 1)):.3f}")
    sm_end = np.array([end[sm == k].max() for k in np.unique(sm)])
    print(f"  per SM last warp end: min {sm_end.min():.2f} median {np.median(sm_end):.2f} max {sm_end.max():.2f} us")
    c = np.corrcoef(units, end)[0, 1] if units.std() > 0 else float("nan")
    print(f"  corr(units, end) {c:.2f}; units/warp min {units.min()} median {np.median(units):.0f} max {units.max()}")
    # Which blocks share an SM: the depths of each SM's blocks, and how far apart their indices are.
    block = idx // 8
    pairs, gaps = {}, []
    for k in np.unique(sm):
        bs = np.unique(block[sm == k])
        key = tuple(sorted(int(dep[np.flatnonzero(block == b)[0]]) for b in bs))
        pairs.setdefault(key, []).append(float(end[sm == k].max()))
        gaps += [int(g) for g in np.diff(bs)]
    n_blocks = int(block.max()) + 1
    print(f"  {n_blocks} blocks; index gap between blocks on one SM: "
          f"{', '.join(f'{g} x{n}' for g, n in zip(*np.unique(gaps, return_counts=True)))}")
    for key, ends in sorted(pairs.items()):
        print(f"  SMs running depths {key}: {len(ends):3d}, last warp end median {np.median(ends):.2f} "
              f"max {max(ends):.2f} us")


shape = sys.argv[1] if len(sys.argv) > 1 else "4096x4096"
bits = int(sys.argv[2]) if len(sys.argv) > 2 else 3
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
out_f, in_f = (int(v) for v in shape.split("x"))
rng = np.random.default_rng(0)
l2 = torch.cuda.get_device_properties(0).L2_cache_size
gpu, nbytes, _, _ = kernels._gpu_layer(out_f, in_f, bits, 128, rng, torch, _core)
layers = kernels._rotated_copies(gpu.args, nbytes, l2)
n_q = len(layers)
x = torch.randn(batch, in_f, device="cuda")
y = torch.zeros(batch, out_f, device="cuda")
reps = []
for r in range(12):
    _core.cuda_debug_phases(reset=True)
    torch.cuda.synchronize()
    _core.cuda_tiled_matmul(**layers[r % n_q], x=x, y=y)  # cold: rotated copies
    torch.cuda.synchronize()
    reps.append(np.array(_core.cuda_debug_phases(reset=False), dtype=np.uint64).reshape(8192, 16))
if os.environ.get("OUT"):  # the raw stamps, for a look later (row = block * 8 + warp)
    np.save(Path(os.environ["OUT"]) / f"phases_{shape}_{bits}b_{batch}x.npy", np.stack(reps))
print(f"{shape} {bits} bits batch {batch}:")
report(reps[-1])
dur = [((r[r[:, 0] > 0, 7].max() - r[r[:, 0] > 0, 0].min()) / 1e3) for r in reps[2:]]
print(f"first warp start to last warp end over launches: median {np.median(dur):.2f} us")
