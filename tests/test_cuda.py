"""The CUDA kernels (core/cuda) against the CPU reference: products straight from the packed
data for batches 1..40, dense dequantization, on random layers of many shapes and depths and
on real layers of the default model. Skipped where no GPU or no CUDA build exists; the part
that says so clearly runs everywhere."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cvxq_tui import _core
from cvxq_tui.errors import InputError
from cvxq_tui.packed import PackedLinear
from cvxq_tui.runtime import CudaPacked, resolve_device

from test_packed import random_layer

HAVE_GPU = bool(_core.cuda_available()) and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU and a build with CVXQ_CUDA=ON")

# Real layers of the default model, packed by the pipeline (a default job's quantized
# tensors); used where present.
REAL_LAYERS = Path(os.environ.get("CVXQ_REAL_LAYERS",
                                  Path(__file__).resolve().parents[1] / ".devdata" / "real_layers.safetensors"))


def test_cuda_device_refused_clearly_without_a_gpu():
    if HAVE_GPU:
        assert resolve_device("cuda") == "cuda"
        assert resolve_device("auto") == "cuda"
        return
    with pytest.raises(InputError, match="cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(InputError, match="cpu, cuda"):
        resolve_device("tpu")


def packed_from(layer, transposed):
    rows, cols = layer["rows"], layer["cols"]
    out_f, in_f = (cols, rows) if transposed else (rows, cols)
    return PackedLinear(out_f, in_f, transposed, layer["group_rows"], "lloyd", layer["depth"],
                        layer["payload"], layer["loc"], layer["scale"], layer["table"], layer["perm"])


def reference(p: PackedLinear, x: np.ndarray) -> np.ndarray:
    """x @ W^T in float64 from the CPU's dense reconstruction."""
    w = p.dequantize().astype(np.float64)
    return x.astype(np.float64) @ w.T


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def fp16_bound(p: PackedLinear, x: np.ndarray) -> np.ndarray:
    """What the tensor-core kernel may differ from the exact product by, element by element:
    it rounds x * scale and each codebook value to float16 (relative error 2^-11 each, so
    2^-10 on the product scale * T * x = (w - loc) x) and sums in float32; loc * x is exact
    up to float32 sums. Plus float16's absolute underflow step on tiny x * scale."""
    w = p.dequantize().astype(np.float64)
    cluster = np.arange(p.rows) // p.group_rows
    loc = np.empty_like(w)
    loc[p.perm if p.perm is not None else np.arange(p.rows)] = p.loc.view(np.float16).astype(np.float64)[cluster]
    ax = np.abs(x.astype(np.float64))
    tmax = float(np.abs(p.table).max())
    return (2.0 ** -10 * 1.01 * ax @ np.abs(w - loc).T + 1e-5 * ax @ np.abs(w).T
            + 2.0 ** -24 * tmax * ax.sum(1, keepdims=True) + 1e-30)


def check_product(p: PackedLinear, x: np.ndarray, got: np.ndarray, what) -> None:
    ref = reference(p, x)
    assert np.isfinite(got).all(), what
    if p.transposed:  # the float32 kernels of the packed layout
        assert rel_err(got, ref) < 2e-5, what
    else:  # the tensor-core kernel of the GPU tiling
        excess = np.abs(got - ref) / fp16_bound(p, x)
        assert excess.max() <= 1.0, (what, float(excess.max()))


CASES = [  # rows, cols, group_rows, max depth
    (1, 1, 32, 0), (33, 5, 32, 8), (300, 80, 96, 8), (64, 1000, 64, 3), (1000, 33, 256, 8),
    (576, 1536, 64, 8), (1536, 576, 128, 4), (4096, 256, 64, 2),
    (16384, 16, 128, 8),  # few columns: blocks span more rows than the fast kernel's y windows
    (2048, 2048, 128, 4),  # some blocks (and warps) straddle two row chunks
]


@needs_gpu
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_cuda_products_match_reference(case, transposed):
    rows, cols, group_rows, max_depth = case
    for seed in range(2):  # fresh inputs each time: the kernel must compute the function
        layer, _ = random_layer(rows, cols, group_rows, seed=100 + seed, max_depth=max_depth)
        p = packed_from(layer, transposed)
        gpu = CudaPacked(p, "cuda")
        rng = np.random.default_rng(seed)
        for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 40):
            x = rng.standard_normal((n, p.in_features)).astype(np.float32)
            y0 = rng.standard_normal((n, p.out_features)).astype(np.float32)  # kernels add into y
            y = torch.from_numpy(y0).cuda()
            gpu.matmul_(torch.from_numpy(x).cuda(), y)
            got = y.cpu().numpy().astype(np.float64) - y0
            check_product(p, x, got, (case, transposed, n))


@needs_gpu
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_cuda_dequantize_is_bit_exact(case, transposed):
    rows, cols, group_rows, max_depth = case
    layer, _ = random_layer(rows, cols, group_rows, seed=7, max_depth=max_depth)
    p = packed_from(layer, transposed)
    gpu = CudaPacked(p, "cuda")
    cpu = p.dequantize()
    for dtype, want in ((torch.float32, cpu), (torch.float16, cpu.astype(np.float16))):
        out = torch.full(gpu.shape, float("nan"), dtype=dtype, device="cuda")  # every element must be written
        (_core.cuda_tiled_dequantize if gpu.tiled else _core.cuda_dequantize)(**gpu.args, out=out)
        got = out.cpu().numpy()
        assert np.array_equal(got, want), (case, transposed, dtype)


def real_layers():
    from safetensors.numpy import load_file

    t = load_file(str(REAL_LAYERS))
    prefixes = sorted({k.split(".cvxq.")[0] for k in t if ".cvxq." in k})
    return [(name, PackedLinear.from_tensors(name, t)) for name in prefixes]


@needs_gpu
@pytest.mark.skipif(not REAL_LAYERS.is_file(), reason="no packed layers of the default model at CVXQ_REAL_LAYERS")
def test_cuda_on_real_default_model_layers():
    layers = real_layers()
    assert len(layers) >= 7
    rng = np.random.default_rng(0)
    for name, p in layers:
        gpu = CudaPacked(p, "cuda")
        assert np.array_equal(gpu.dequantize().cpu().numpy(), p.dequantize()), name
        for n in (1, 8, 16):
            x = rng.standard_normal((n, p.in_features)).astype(np.float32)
            y = torch.zeros(n, p.out_features, device="cuda")
            gpu.matmul_(torch.from_numpy(x).cuda(), y)
            check_product(p, x, y.cpu().numpy().astype(np.float64), (name, n))
            assert rel_err(y.cpu().numpy(), reference(p, x)) < 2e-3, (name, n)
            # the CPU kernels agree too
            assert rel_err(p.matmul(x), reference(p, x)) < 2e-5, (name, n)


@needs_gpu
def test_quant_linear_runs_on_the_gpu_for_small_and_large_batches():
    from cvxq_tui.runtime import QuantLinear

    layer, _ = random_layer(640, 384, 64, seed=3, max_depth=5)
    p = packed_from(layer, False)
    p.bias = np.random.default_rng(1).standard_normal(p.out_features).astype(np.float16).astype(np.float32)
    q = QuantLinear(p).to_device("cuda")
    for n in (1, 7, 16, 100):  # above 16 rows the layer is decoded transiently
        x = torch.randn(2, n, p.in_features)
        want = reference(p, x.reshape(-1, p.in_features).numpy()) + p.bias
        got = q(x.cuda()).reshape(-1, p.out_features).cpu().numpy()
        assert rel_err(got, want) < (2e-3 if n <= 16 else 2e-5), n  # float16 products up to 16 rows
        cpu = q(x).reshape(-1, p.out_features).numpy()
        assert rel_err(cpu, want) < 2e-5, n


@pytest.mark.skipif(not HAVE_GPU or torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs")
@pytest.mark.parametrize("transposed", [False, True])
def test_layers_on_a_second_gpu_run_while_the_first_is_current(transposed):
    # Launch settings (the fast kernel's shared-memory opt-in) are per device, and the launch
    # must happen on the layer's GPU whichever GPU is current.
    layer, _ = random_layer(512, 384, 64, seed=5, max_depth=5)
    p = packed_from(layer, transposed)
    x = np.random.default_rng(2).standard_normal((3, p.in_features)).astype(np.float32)
    want = reference(p, x)
    for dev in (1, 0, 1):
        torch.cuda.set_device(0)
        g = CudaPacked(p, f"cuda:{dev}")
        y = g.matmul_(torch.from_numpy(x).to(f"cuda:{dev}"), torch.zeros(3, p.out_features, device=f"cuda:{dev}"))
        assert y.device.index == dev
        assert rel_err(y.cpu().numpy(), want) < 2e-3, dev
        assert np.array_equal(g.dequantize().cpu().numpy(), p.dequantize().reshape(g.shape))


@needs_gpu
@pytest.mark.parametrize("max_jobs", [0, 1 << 40])  # 5-8 vectors: the block's y window, per-warp windows
def test_both_y_window_schemes_of_eight_vectors(max_jobs):
    before = _core.cuda_set_warp_windows_max_jobs(max_jobs)
    try:
        for rows, cols, group_rows, max_depth in [(16384, 16, 128, 8), (2048, 2048, 128, 4), (2048, 2048, 64, 4)]:
            layer, _ = random_layer(rows, cols, group_rows, seed=11, max_depth=max_depth)
            p = packed_from(layer, False)
            gpu = CudaPacked(p, "cuda")
            rng = np.random.default_rng(3)
            for n in (5, 8, 13):
                x = rng.standard_normal((n, p.in_features)).astype(np.float32)
                y = torch.zeros(n, p.out_features, device="cuda")
                gpu.matmul_(torch.from_numpy(x).cuda(), y)
                check_product(p, x, y.cpu().numpy().astype(np.float64), (rows, cols, n, max_jobs))
    finally:
        _core.cuda_set_warp_windows_max_jobs(before)


@needs_gpu
@pytest.mark.parametrize("case", [(1536, 576, 128, 4), (576, 1536, 64, 8), (300, 80, 96, 8), (2048, 2048, 128, 4)])
def test_products_where_x_times_scale_passes_float16_range(case):
    # The tensor-core products take x * scale in float16 (largest value 65504). Inputs far
    # beyond it (all large: the fast kernel redoes every run in float32, and in the general
    # kernel later units raise a warp's exponent above what earlier ones needed) must give
    # the same relative accuracy as ordinary inputs: products
    # of x * 2^22 within the float16 bound scaled by 2^22, not inf. Fast kernel (128- and
    # 64-row groups), general kernel (32-row slices, 96-row groups), 1-16 vectors.
    rows, cols, group_rows, max_depth = case
    layer, _ = random_layer(rows, cols, group_rows, seed=21, max_depth=max_depth)
    p = packed_from(layer, False)
    gpu = CudaPacked(p, "cuda")
    max_scale = float(np.abs(p.scale.view(np.float16).astype(np.float32)).max())
    rng = np.random.default_rng(4)
    for n in (1, 3, 8, 16):
        x = (rng.standard_normal((n, p.in_features)) * 2.0 ** 22).astype(np.float32)
        assert float(np.abs(x).max()) * max_scale > 65504 * 8  # far past float16's range
        y = torch.zeros(n, p.out_features, device="cuda")
        gpu.matmul_(torch.from_numpy(x).cuda(), y)
        check_product(p, x, y.cpu().numpy().astype(np.float64), (case, n))


@needs_gpu
def test_products_with_a_few_massive_input_channels():
    # The pattern of real models' outliers: ordinary inputs with a few channels thousands of
    # times larger, at the start, middle and end of the columns (a warp's run meets them
    # after it has accumulated ordinary ones).
    layer, _ = random_layer(2048, 2048, 128, seed=22, max_depth=6)
    p = packed_from(layer, False)
    gpu = CudaPacked(p, "cuda")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, p.in_features)).astype(np.float32)
    x[:, [3, 1024, 2047]] = np.array([4e6, -3e6, 5e6], dtype=np.float32)
    y = torch.zeros(4, p.out_features, device="cuda")
    gpu.matmul_(torch.from_numpy(x).cuda(), y)
    got = y.cpu().numpy().astype(np.float64)
    w = p.dequantize().astype(np.float64)
    assert np.isfinite(got).all()
    # within float16 rounding of every term, measured against the sum of the terms' sizes
    assert (np.abs(got - reference(p, x)) <= 2e-3 * (np.abs(x.astype(np.float64)) @ np.abs(w).T)).all()
