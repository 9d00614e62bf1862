"""Kernels that run packed models: time and bandwidth against the dense reference measured in
the same run.

    python bench/kernels.py gpu   # CUDA GEMV/GEMM vs torch fp16 (cuBLAS) on the same GPU
    python bench/kernels.py gpu --peers   # and torch's int4 tinygemm (4-bit) on the same layers
    python bench/kernels.py cpu   # AVX2 matvec (CPU tiling) vs torch fp32; decode tokens/s of the default model

GPU method: bytes each kernel must read (the layer as it sits on the GPU -- the GPU tiling's
payload, job list, column records and tables, and perm -- plus x, and y written) over the
device's measured copy bandwidth is the floor; times are medians of
CUDA-event timings after warm-up, rotating over enough copies of each layer that L2 (50 MB on
an H100) holds none of them between runs. Layers have mixed per-group depths (a quarter one
bit below the average, half at it, a quarter one above) in groups of 128 rows (the pipeline's
default); the payload words are random bits (every bit pattern is a valid index).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if os.environ.get("CVXQ_DEV_CORE_DIR"):  # a core built by hand (cmake -B build/...), as in tests/conftest.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # with this checkout's sources
    import cvxq_tui

    cvxq_tui.__path__.insert(0, os.path.abspath(os.environ["CVXQ_DEV_CORE_DIR"]))

SHAPES = [(12288, 49152), (8192, 28672), (4096, 4096), (4096, 11008), (11008, 4096)]  # (out, in)


def _gpu_layer(out_f, in_f, bits, group_rows, rng, torch, _core, zero_frac=0.0):
    """A random packed layer with mixed depths, put on the GPU as load_quantized puts it
    (CudaPacked: the GPU tiling); zero_frac of its groups at depth 0, as real layers have a
    few percent. Returns (CudaPacked, bytes it reads per product, mean depth, file bytes of
    the packed layer)."""
    from cvxq_tui.packed import PackedLinear
    from cvxq_tui.runtime import CudaPacked

    g = _core.geometry(out_f, in_f, group_rows)
    depth = (bits + rng.choice(np.array([-1, 0, 0, 1], dtype=np.int64), size=(g["n_clusters"], in_f))).astype(np.uint8)
    if zero_frac > 0:
        depth[rng.random(depth.shape) < zero_frac] = 0
    offsets = _core.tile_offsets(out_f, in_f, group_rows, depth)
    words = int(offsets[-1])
    payload = rng.integers(0, 2**32, size=words, dtype=np.uint32)
    p = PackedLinear(out_f, in_f, False, group_rows, "lloyd", depth, payload,
                     (0.01 * rng.standard_normal(depth.shape)).astype(np.float16).view(np.uint16),
                     np.abs(0.02 * rng.standard_normal(depth.shape)).astype(np.float16).view(np.uint16),
                     rng.standard_normal(_core.TABLE_SIZE).astype(np.float32), rng.permutation(out_f).astype(np.int32))
    gpu = CudaPacked(p, "cuda")
    return gpu, gpu.nbytes(), float(depth.mean()), p.nbytes()


def _rotated_copies(args, nbytes, l2):
    """The layer's GPU arguments plus clones, enough that the copies together pass 4x the L2
    cache: timing them in turn reads every product's weights from device memory."""
    import torch

    n_q = max(1, -(-4 * l2 // nbytes))
    return [args] + [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
                     for _ in range(n_q - 1)]


def _time_cuda(torch, fns, reps=30, warmup=3):
    """Median microseconds of one call, from CUDA-event timings of a captured CUDA graph that
    makes each call of fns once (so host overhead and launch gaps stay out of the numbers)."""
    for _ in range(warmup):
        for f in fns:
            f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up on the capture stream, as torch's graph docs ask
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    return statistics.median(times)


def _tinygemm(torch, out_f, in_f, batch, l2):
    """torch's own int4 GEMM on CUDA (tinygemm, as gpt-fast and torchao run 4-bit models):
    4-bit weights in groups of 128 inputs with a bf16 scale and zero each (4.25 bits per
    weight), bf16 activations. Returns (median us, relative error against the dense product of
    its dequantized weights) or None where this torch has no such kernel."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
    if op is None or in_f % 128 or out_f % 8:  # its tiling: groups of 128 inputs, 8 outputs
        return None
    try:
        q = torch.randint(0, 16, (out_f, in_f), device="cuda", dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.stack([0.02 * torch.rand(in_f // 128, out_f, device="cuda"),
                          0.01 * torch.randn(in_f // 128, out_f, device="cuda")], -1).to(torch.bfloat16).contiguous()
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
        y = op(x, packed, 128, sz)
        s = sz[..., 0].double().repeat_interleave(128, 0).T
        z = sz[..., 1].double().repeat_interleave(128, 0).T
        ref = x.double() @ ((q.double() - 8) * s + z).T
        err = float((y.double() - ref).norm() / ref.norm())
        del q, s, z, ref
        copies = [packed] + [packed.clone() for _ in range(max(1, -(-4 * l2 // (packed.numel() * 4))) - 1)]
        us = _time_cuda(torch, [lambda i=i: op(x, copies[i % len(copies)], 128, sz) for i in range(max(len(copies), 8))])
        return us, err
    except (RuntimeError, TypeError):  # a build, GPU or torch version without this kernel or signature
        return None


def gpu(args):
    import torch

    from cvxq_tui import _core

    if not (torch.cuda.is_available() and _core.cuda_available()):
        sys.exit("bench/kernels.py gpu: needs a GPU and a build with CVXQ_CUDA=ON")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.warp_windows_max_jobs is not None:
        _core.cuda_set_warp_windows_max_jobs(args.warp_windows_max_jobs)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    n = 1 << 28  # 1 GiB copy, counting read + write
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):  # 1 GiB per copy: launch overhead is negligible, no graph needed
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    copy_bw = 2 * src.numel() * 4 / (statistics.median(times[2:]) * 1e-3)
    del src, dst
    print(f"measured copy bandwidth: {copy_bw / 1e12:.3f} TB/s (read + write)")
    rng = np.random.default_rng(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    rows = []
    peers = {}
    shapes = SHAPES if not args.quick else SHAPES[2:3]
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes]
    for out_f, in_f in shapes:
        w16_bytes = out_f * in_f * 2
        n_w = max(1, -(-4 * l2 // w16_bytes))
        ws = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) for _ in range(n_w)]
        for batch in args.batches:
            xs16 = [torch.randn(batch, in_f, device="cuda", dtype=torch.float16) for _ in range(4)]
            us16 = _time_cuda(torch, [lambda i=i: torch.nn.functional.linear(xs16[i % 4], ws[i % n_w]) for i in range(max(n_w, 8))])
            bw16 = (w16_bytes + batch * (in_f + out_f) * 2) / (us16 * 1e-6)
            if args.peers:
                peers[(out_f, in_f, batch)] = (us16, _tinygemm(torch, out_f, in_f, batch, l2))
            for bits in args.bits:
                gpu, nbytes, mean_depth, file_bytes = _gpu_layer(out_f, in_f, bits, args.group_rows, rng, torch, _core,
                                                                 args.zero_frac)
                layers = _rotated_copies(gpu.args, nbytes, l2)
                n_q = len(layers)
                xs = [torch.randn(batch, in_f, device="cuda") for _ in range(4)]
                ys = [torch.zeros(batch, out_f, device="cuda") for _ in range(4)]

                def step(i):
                    y = ys[i % 4]
                    y.zero_()
                    _core.cuda_tiled_matmul(**layers[i % n_q], x=xs[i % 4], y=y,
                                            stream=torch.cuda.current_stream().cuda_stream)

                # correctness on this very layer, against a dense product of the GPU's exact decode
                ref_w = gpu.dequantize(torch.float32)
                step(0)
                ref = xs[0].double() @ ref_w.double().T
                err = float((ys[0].double() - ref).norm() / ref.norm())
                del ref_w, ref
                usq = _time_cuda(torch, [lambda i=i: step(i) for i in range(max(n_q, 8))])
                moved = nbytes + batch * (in_f + out_f) * 4
                bw = moved / (usq * 1e-6)
                floor = moved / copy_bw * 1e6
                rows.append((f"{out_f}x{in_f}", batch, bits, mean_depth, 8 * nbytes / (out_f * in_f),
                             us16, usq, us16 / usq, bw / copy_bw, floor, bw16 / copy_bw, err,
                             8 * file_bytes / (out_f * in_f)))
                del layers, xs, ys
                torch.cuda.empty_cache()
        del ws
        torch.cuda.empty_cache()
    print()
    print(f"{'shape (out x in)':>16} {'batch':>5} {'bits':>4} {'depth':>5} {'all-in':>6} {'fp16 us':>8} "
          f"{'cvxq us':>8} {'speed-up':>8} {'bw/copy':>7} {'floor us':>8} {'fp16 bw/copy':>12} {'rel.err':>8} {'file b/w':>8}")
    for r in rows:
        print(f"{r[0]:>16} {r[1]:>5} {r[2]:>4} {r[3]:>5.2f} {r[4]:>6.2f} {r[5]:>8.1f} {r[6]:>8.1f} "
              f"{r[7]:>7.2f}x {r[8]:>7.2f} {r[9]:>8.1f} {r[10]:>12.2f} {r[11]:>8.1e} {r[12]:>8.2f}")
    if peers:
        ours = {(r[0], r[1], r[2]): r[6] for r in rows}
        print()
        print("torch int4 tinygemm (4.25 bits per weight, bf16) vs fp16, same run; cvxq at 4 bits average (mixed depths):")
        print(f"{'shape (out x in)':>16} {'batch':>5} {'fp16 us':>8} {'int4 us':>8} {'speed-up':>8} {'rel.err':>8} "
              f"{'cvxq4 us':>8} {'speed-up':>8}")
        for (out_f, in_f, batch), (us16, tg) in peers.items():
            q4 = ours.get((f"{out_f}x{in_f}", batch, 4))
            tg_s = f"{tg[0]:>8.1f} {us16 / tg[0]:>7.2f}x {tg[1]:>8.1e}" if tg else f"{'-':>8} {'-':>8} {'-':>8}"
            q4_s = f"{q4:>8.1f} {us16 / q4:>7.2f}x" if q4 else f"{'-':>8} {'-':>8}"
            shape = f"{out_f}x{in_f}"
            print(f"{shape:>16} {batch:>5} {us16:>8.1f} {tg_s} {q4_s}")


def cpu(args):
    import os
    import resource

    import torch

    from cvxq_tui import _core
    from cvxq_tui.packed import PackedLinear

    torch.set_num_threads(args.threads)
    print(f"CPU: {args.threads} threads, core ISA {_core.active_isa()}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    gr = args.group_rows
    for out_f, in_f in [(4096, 4096), (1536, 576), (576, 1536)]:
        g = _core.geometry(out_f, in_f, gr)
        depth = (3 + rng.choice(np.array([-1, 0, 0, 1]), size=(g["n_clusters"], in_f))).astype(np.uint8)
        row_depth = depth[np.arange(g["rows_pad"]) // gr].astype(np.int64)
        idx = rng.integers(0, 1 << row_depth).astype(np.uint8)
        p = PackedLinear.build(out_features=out_f, in_features=in_f, transposed=False, group_rows=gr, kind="laplace",
                               depth=depth, idx=idx, loc=0.01 * rng.standard_normal(depth.shape),
                               scale=np.abs(0.02 * rng.standard_normal(depth.shape)),
                               table=rng.standard_normal(_core.TABLE_SIZE).astype(np.float32), perm=None, bias=None)
        w = torch.from_numpy(p.dequantize())
        t0 = time.perf_counter()
        tiling = p.cpu_layout()  # built once per layer at load time
        build_ms = (time.perf_counter() - t0) * 1e3
        print(f"  {out_f}x{in_f}: CPU tiling built in {build_ms:.1f} ms, {tiling.nbytes / 1e6:.2f} MB "
              f"(packed layer {p.nbytes() / 1e6:.2f} MB, fp32 {w.numel() * 4 / 1e6:.1f} MB)")
        for batch in args.batches:
            x = rng.standard_normal((batch, in_f)).astype(np.float32)
            xt = torch.from_numpy(x)

            def medians(fns, reps=30):
                """Median seconds of each function, timed in alternation so that a change in
                the machine's load hits all of them alike."""
                ts = [[] for _ in fns]
                for _ in range(reps):
                    for f, t in zip(fns, ts):
                        t0 = time.perf_counter()
                        f()
                        t.append(time.perf_counter() - t0)
                return [statistics.median(t) for t in ts]

            t_ref, t_avx = medians([lambda: xt @ w.T, lambda: p.matmul(x)])
            err = float(np.abs(p.matmul(x) - (xt @ w.T).numpy()).max())
            print(f"  {out_f}x{in_f} batch {batch}: torch fp32 {t_ref * 1e6:8.0f} us   packed {t_avx * 1e6:8.0f} us   "
                  f"{t_ref / t_avx:5.2f}x   ({8 * p.nbytes() / w.numel():.2f} bits/w, max diff {err:.1e})")
    if args.model_dir:
        _decode_bench(args, torch)


def _decode_bench(args, torch):
    """Tokens/s of greedy decoding, quantized (load_quantized) vs the fp32 model, and RSS."""
    import gc
    import resource

    from cvxq_tui.runtime import load_quantized, dequantized_model

    def rss_mb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def cache_of(out):  # transformers 5.x names the KV cache `cache` (warning on the old name), 4.x past_key_values
        return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}

    def decode(model, steps):
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        with torch.no_grad():
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(nxt, use_cache=True, **cache_of(out))
                nxt = out.logits[:, -1:].argmax(-1)
            return steps / (time.perf_counter() - t0)

    base = rss_mb()
    q = load_quantized(args.model_dir)
    q_rss = rss_mb() - base
    tq = decode(q, 8)
    tq = decode(q, args.steps)
    qlin = sum(m.packed.nbytes() for m in q.modules() if hasattr(m, "packed"))
    tiles = sum(m.packed._cpu.nbytes for m in q.modules()
                if hasattr(m, "packed") and getattr(m.packed, "_cpu", None) is not None)
    del q
    gc.collect()
    base = rss_mb()
    d = dequantized_model(args.model_dir)  # same weights, dense fp32 Linear layers
    d_rss = rss_mb() - base
    td = decode(d, 8)
    td = decode(d, args.steps)
    dlin = sum(m.weight.numel() * 4 for n, m in d.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    print(f"decode, {args.steps} tokens after an 8-token prompt, greedy, batch 1:")
    print(f"  fp32 dense   : {td:7.2f} tok/s   RSS +{d_rss:7.1f} MB   decoder Linear weights {dlin / 1e6:7.1f} MB")
    print(f"  cvxq packed  : {tq:7.2f} tok/s   RSS +{q_rss:7.1f} MB   decoder Linear weights {qlin / 1e6:7.1f} MB"
          + (f" (held as the CPU tiling: {tiles / 1e6:.1f} MB)" if tiles else ""))
    print(f"  speed ratio packed/dense: {tq / td:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpu")
    g.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    g.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    g.add_argument("--group-rows", type=int, default=128)
    g.add_argument("--quick", action="store_true", help="one shape only")
    g.add_argument("--shapes", nargs="+", help="OUTxIN shapes instead of the standard set")
    g.add_argument("--zero-frac", type=float, default=0.0,
                   help="fraction of groups at depth 0 (real layers: a few percent; default 0)")
    g.add_argument("--peers", action="store_true",
                   help="also time torch's int4 tinygemm (4-bit groups of 128, as gpt-fast/torchao) on each shape")
    g.add_argument("--warp-windows-max-jobs", type=int,
                   help="tuning: 5-8 vectors take per-warp y windows on layers of up to this many jobs "
                   "(the kernels' default 25000; 0: never)")
    c = sub.add_parser("cpu")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--model-dir", help="a cvxq-tui output folder for the decode benchmark")
    c.add_argument("--steps", type=int, default=64)
    c.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    c.add_argument("--group-rows", type=int, default=128, help="rows per group of the random layers (default "
                   "128, the pipeline's; bench/results/kernels_cpu.txt also has 64)")
    a = ap.parse_args()
    gpu(a) if a.what == "gpu" else cpu(a)


if __name__ == "__main__":
    main()
