"""The CPU tiling (core/include/cvxq/cpu_layout.hpp) that the AVX2 product reads: built from
the bit planes at load time, it must decode to exactly the packed layer's reference
reconstruction (every index bit in its place) and its products, on the scalar and the AVX2
path, must match the reference product to float32 rounding."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvxq_tui import _core

from test_packed import random_layer

CASES = [  # rows, cols, group_rows, max depth
    (1, 1, 32, 0), (33, 5, 32, 8), (300, 80, 96, 8), (64, 1000, 64, 3), (1000, 33, 256, 8),
    (576, 1536, 128, 8), (1536, 576, 128, 4), (200, 70, 160, 5), (4096, 64, 4096, 2),
    (100, 9, 4096, 8), (129, 1, 32, 8),
]


def tiled(layer):
    packed = _core.PackedLayer(**layer)
    return packed, packed.cpu_layout()


def magnitudes(layer, w):
    """|loc| + |scale * T[k]| per weight (original row order): the products add the loc and
    the scale * T parts separately, so their rounding is relative to these, not to |w|."""
    rows, group_rows = layer["rows"], layer["group_rows"]
    loc = layer["loc"].view(np.float16).astype(np.float64)[np.arange(rows) // group_rows]
    if layer["perm"] is not None:
        loc_orig = np.empty_like(loc)
        loc_orig[layer["perm"]] = loc
        loc = loc_orig
    return np.abs(loc) + np.abs(w - loc)


def bound(layer, w, x):
    """What float32 rounding of the product may move it by: a few ulps of the sum of the
    magnitudes of its terms."""
    return 2e-6 * np.abs(x.astype(np.float64)) @ magnitudes(layer, w).T + 1e-30


@pytest.mark.parametrize("rows,cols,group_rows,max_depth", CASES)
def test_tiling_dequantizes_to_the_reference(rows, cols, group_rows, max_depth):
    layer, _ = random_layer(rows, cols, group_rows, seed=rows + 7 * cols + max_depth, max_depth=max_depth)
    packed, cpu = tiled(layer)
    want = packed.dequantize(reference=True)
    np.testing.assert_array_equal(cpu.dequantize(reference=True), want)
    np.testing.assert_array_equal(cpu.dequantize(), want)


@pytest.mark.parametrize("depth", range(9))
@pytest.mark.parametrize("group_rows", [32, 128, 4096])
def test_every_depth(isa, depth, group_rows):
    layer, _ = random_layer(300, 77, group_rows, seed=depth, max_depth=depth, uniform_depth=True)
    packed, cpu = tiled(layer)
    w = packed.dequantize(reference=True)
    np.testing.assert_array_equal(cpu.dequantize(), w)
    x = np.random.default_rng(depth).standard_normal((3, 77)).astype(np.float32)
    y = cpu.matmul(x)
    assert (np.abs(y - packed.matmul(x, reference=True)) <= bound(layer, w, x)).all()


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 40])
@pytest.mark.parametrize("rows,cols,group_rows,max_depth", [(300, 80, 96, 8), (1000, 333, 128, 4), (64, 1000, 64, 8)])
def test_matmul_matches_reference(isa, batch, rows, cols, group_rows, max_depth):
    layer, _ = random_layer(rows, cols, group_rows, seed=batch, max_depth=max_depth)
    packed, cpu = tiled(layer)
    w = packed.dequantize(reference=True)
    x = np.random.default_rng(batch).standard_normal((batch, cols)).astype(np.float32)
    y = cpu.matmul(x)
    assert y.shape == (batch, rows) and y.dtype == np.float32
    err = np.abs(y - packed.matmul(x, reference=True))
    assert (err <= bound(layer, w, x)).all(), float((err / bound(layer, w, x)).max())
    np.testing.assert_array_equal(cpu.matmul(x[0]), y[0])  # a vector gives [rows]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 90), st.sampled_from([32, 64, 96, 160, 4096]), st.integers(0, 8),
       st.booleans(), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_random_layers(rows, cols, group_rows, max_depth, uniform, batch, seed):
    layer, _ = random_layer(rows, cols, group_rows, seed, max_depth, uniform)
    packed, cpu = tiled(layer)
    w = packed.dequantize(reference=True)
    np.testing.assert_array_equal(cpu.dequantize(), w)
    x = np.random.default_rng(seed).standard_normal((batch, cols)).astype(np.float32)
    for isa in ["scalar"] + (["avx2"] if _core.cpu_has_avx2() else []):
        previous = _core.active_isa()
        _core.set_isa(isa)
        try:
            err = np.abs(cpu.matmul(x) - packed.matmul(x, reference=True))
        finally:
            _core.set_isa(previous)
        assert (err <= bound(layer, w, x)).all()


def test_no_perm_and_depth_zero_clusters():
    layer, idx = random_layer(200, 50, 64, seed=3, max_depth=8)
    layer["perm"] = None
    layer["depth"][1] = 0  # a cluster with no payload at all
    idx[64:128] = 0
    layer["offsets"], layer["payload"] = _core.pack(200, 50, 64, layer["depth"], idx)
    packed, cpu = tiled(layer)
    w = packed.dequantize(reference=True)
    np.testing.assert_array_equal(cpu.dequantize(), w)
    x = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
    assert (np.abs(cpu.matmul(x) - packed.matmul(x, reference=True)) <= bound(layer, w, x)).all()


def test_every_payload_bit_lands_in_its_weight():
    """Flipping one bit of the packed payload changes exactly the one weight that bit
    belongs to, in the tiling as in the reference: a tiling that dropped, moved or
    duplicated any bit fails here."""
    rows, cols, group_rows = 96, 40, 64
    layer, _ = random_layer(rows, cols, group_rows, seed=11, max_depth=8)
    packed, cpu = tiled(layer)
    base = cpu.dequantize()
    rng = np.random.default_rng(0)
    words = layer["payload"].size
    picks = [(int(w), int(b)) for w, b in zip(rng.integers(0, words, 300), rng.integers(0, 32, 300))]
    picks += [(0, 0), (words - 1, 31)]
    x = rng.standard_normal(cols).astype(np.float32)
    y0 = cpu.matmul(x)
    for w, b in picks:
        flipped = dict(layer, payload=layer["payload"].copy())
        flipped["payload"][w] ^= np.uint32(1 << b)
        packed_f, cpu_f = tiled(flipped)
        want = packed_f.dequantize(reference=True)
        got = cpu_f.dequantize()
        np.testing.assert_array_equal(got, want)
        changed = np.argwhere(got != base)
        assert len(changed) <= 1  # (one weight; none when the two table entries are equal)
        if len(changed):
            r = changed[0][0]
            assert cpu_f.matmul(x)[r] != y0[r]


def test_sizes():
    layer, _ = random_layer(1024, 512, 128, seed=5, max_depth=4)
    packed, cpu = tiled(layer)
    assert (cpu.rows, cpu.cols, cpu.group_rows) == (1024, 512, 128)
    # The same bits, up to runs padded to whole words (3 bits: 10 indices in 32 bits).
    assert layer["payload"].size <= cpu.payload_words <= 1.2 * layer["payload"].size
    assert cpu.nbytes >= 4 * cpu.payload_words
    assert cpu.nbytes <= 4 * cpu.payload_words + 10 * 8 * 512 + 4 * 1024 + 4096


def test_bad_inputs_raise():
    layer, _ = random_layer(100, 30, 32, seed=1)
    _, cpu = tiled(layer)
    with pytest.raises(ValueError, match="last dimension"):
        cpu.matmul(np.zeros((2, 31), np.float32))
    with pytest.raises(ValueError, match="dimensions"):
        cpu.matmul(np.zeros((2, 3, 30), np.float32))
    with pytest.raises(TypeError):
        cpu.matmul(np.zeros((2, 30), np.float64))
    with pytest.raises(TypeError):
        cpu.matmul(np.zeros((30, 2), np.float32).T)  # not C-contiguous: never copied silently
    assert cpu.matmul(np.zeros((0, 30), np.float32)).shape == (0, 100)
    bad = dict(layer, payload=layer["payload"][:-1].copy())
    with pytest.raises(_core.FormatError):
        _core.PackedLayer(**bad)


def test_cancel_and_progress():
    layer, _ = random_layer(256, 64, 64, seed=2)
    _, cpu = tiled(layer)
    seen = []
    x = np.ones((20, 64), np.float32)
    cpu.matmul(x, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen[-1] == ("matmul", 20, 20)
    flag = _core.CancelFlag()
    flag.set()
    with pytest.raises(_core.Cancelled):
        cpu.matmul(x, cancel=flag)


def test_runtime_layer_keeps_only_the_tiling():
    """load_quantized on the CPU keeps the tiling instead of the packed payload: the same
    products and weights, the same bytes on disk, the payload re-packed bit for bit."""
    import torch

    from cvxq_tui.errors import FormatError
    from cvxq_tui.packed import PackedLinear
    from cvxq_tui.runtime import QuantLinear

    layer, idx = random_layer(200, 90, 64, seed=9, max_depth=8)
    p = PackedLinear.build(out_features=200, in_features=90, transposed=False, group_rows=64, kind="lloyd",
                           depth=layer["depth"], idx=idx, loc=layer["loc"].view(np.float16),
                           scale=layer["scale"].view(np.float16), table=layer["table"], perm=layer["perm"],
                           bias=np.linspace(-1, 1, 200).astype(np.float32))
    x = np.random.default_rng(1).standard_normal((70, 90)).astype(np.float32)
    w, y, tensors, nbytes = p.dequantize(), p.matmul(x[:5]), p.to_tensors("l"), p.nbytes()
    q = QuantLinear(p)
    dense = torch.from_numpy(x) @ torch.from_numpy(w).T + q.bias
    p.keep_only_cpu_layout()
    assert p.payload is None
    np.testing.assert_array_equal(p.dequantize(), w)
    np.testing.assert_array_equal(p.matmul(x[:5]), y)
    assert p.nbytes() == nbytes
    again = p.to_tensors("l")
    assert again.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(again[k], tensors[k])
    with pytest.raises(FormatError, match="released"):
        p.core()
    with torch.no_grad():
        for n in (1, 8, 64, 70):  # the kernel up to 64 rows, a transient dense weight above
            torch.testing.assert_close(q(torch.from_numpy(x[:n])), dense[:n], rtol=1e-5, atol=1e-5)
