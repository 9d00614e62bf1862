"""The packed layer format through the Python bindings: round trips, kernels against numpy
recomputations of the layout's definition, validation and fp16 conversion."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvxq_tui import _core

GROUP_ROWS = [32, 64, 96, 128, 256]


def random_layer(rows, cols, group_rows, seed, max_depth=8, uniform_depth=False):
    """A packed layer as keyword arrays, plus its indices (storage order, padded)."""
    rng = np.random.default_rng(seed)
    g = _core.geometry(rows, cols, group_rows)
    shape = (g["n_clusters"], cols)
    if uniform_depth:
        depth = np.full(shape, max_depth, dtype=np.uint8)
    else:
        depth = rng.integers(0, max_depth + 1, shape, dtype=np.uint8)
    row_depth = depth[np.arange(g["rows_pad"]) // group_rows].astype(np.int64)
    idx = rng.integers(0, 1 << row_depth).astype(np.uint8)
    idx[rows:] = 0  # padding rows are never output
    offsets, payload = _core.pack(rows, cols, group_rows, depth, idx)
    layer = dict(
        rows=rows,
        cols=cols,
        group_rows=group_rows,
        depth=depth,
        offsets=offsets,
        payload=payload,
        loc=(0.1 * rng.standard_normal(shape)).astype(np.float16).view(np.uint16),
        scale=np.abs(0.05 * rng.standard_normal(shape)).astype(np.float16).view(np.uint16),
        table=rng.standard_normal(_core.TABLE_SIZE).astype(np.float32),
        perm=rng.permutation(rows).astype(np.int32),
    )
    return layer, idx


def numpy_dequantize(layer, idx):
    """w^ = loc + scale * table[2^B - 1 + k], storage row i written to row perm[i]."""
    rows, group_rows = layer["rows"], layer["group_rows"]
    cluster = np.arange(rows) // group_rows
    bits = layer["depth"][cluster].astype(np.int64)
    t = layer["table"][(1 << bits) - 1 + idx[:rows]]
    loc = layer["loc"].view(np.float16).astype(np.float32)[cluster]
    scale = layer["scale"].view(np.float16).astype(np.float32)[cluster]
    w = np.empty((rows, layer["cols"]), dtype=np.float32)
    w[layer["perm"]] = loc + scale * t
    return w


shapes = st.tuples(
    st.integers(1, 300),                # rows
    st.integers(1, 80),                 # cols
    st.sampled_from(GROUP_ROWS),
    st.integers(0, 8),                  # max depth
    st.booleans(),                      # every group at max depth
    st.integers(0, 2**32 - 1),          # seed
)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_pack_unpack_round_trip(shape):
    rows, cols, group_rows, max_depth, uniform, seed = shape
    layer, idx = random_layer(rows, cols, group_rows, seed, max_depth, uniform)
    assert layer["payload"].size == layer["offsets"][-1]
    np.testing.assert_array_equal(_core.unpack(**layer), idx)
    np.testing.assert_array_equal(_core.unpack(**layer, reference=True), idx)


@pytest.mark.parametrize("depth", range(9))
def test_round_trip_every_depth(depth):
    layer, idx = random_layer(100, 45, 64, depth, depth, uniform_depth=True)
    slices = 64 // 32
    assert layer["payload"].size == depth * 45 * slices * 2  # 2 clusters (64 + 64 padded rows)
    np.testing.assert_array_equal(_core.PackedLayer(**layer).unpack(), idx)


def test_bit_planes_follow_the_layout():
    # One 32-row group at depth 3: word p, bit i = bit p of row i's index.
    depth = np.full((1, 1), 3, dtype=np.uint8)
    idx = (np.arange(32, dtype=np.uint8) % 8).reshape(32, 1)
    offsets, payload = _core.pack(32, 1, 32, depth, idx)
    assert offsets.tolist() == [0, 3]
    bits = (idx[:, 0, None] >> np.arange(3)) & 1
    expect = (bits.astype(np.uint64) << np.arange(32, dtype=np.uint64)[:, None]).sum(0)
    assert payload.tolist() == expect.tolist()


def test_tile_offsets():
    depth = np.ones((2, 40), dtype=np.uint8)
    depth[0, 0] = 3
    depth[1, 39] = 8
    off = _core.tile_offsets(64, 40, 32, depth)
    assert off.dtype == np.uint32
    assert off.tolist() == [0, 34, 42, 74, 89]


# The isa fixture holds one ISA for all generated inputs, which is what this test wants.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes)
def test_dequantize_is_bitwise_numpy(isa, shape):
    rows, cols, group_rows, max_depth, uniform, seed = shape
    layer, idx = random_layer(rows, cols, group_rows, seed, max_depth, uniform)
    expect = numpy_dequantize(layer, idx).view(np.uint32)
    np.testing.assert_array_equal(_core.dequantize(**layer).view(np.uint32), expect)
    np.testing.assert_array_equal(_core.dequantize(**layer, reference=True).view(np.uint32), expect)


def test_dequantize_large_layer_parallel(isa):
    layer, idx = random_layer(1000, 600, 128, 1)
    expect = numpy_dequantize(layer, idx).view(np.uint32)
    np.testing.assert_array_equal(_core.dequantize(**layer).view(np.uint32), expect)


def test_dequantize_into_out():
    torch = pytest.importorskip("torch")
    layer, idx = random_layer(100, 40, 32, 6)
    expect = numpy_dequantize(layer, idx)
    p = _core.PackedLayer(**layer)
    out = np.zeros((100, 40), np.float32)
    assert p.dequantize(out=out) is out
    np.testing.assert_array_equal(out, expect)
    weight = torch.zeros(100, 40)  # a torch weight filled in place through DLPack
    _core.dequantize(**layer, out=weight)
    np.testing.assert_array_equal(weight.numpy(), expect)
    with pytest.raises(TypeError):
        p.dequantize(out=np.zeros((100, 40), np.float64))
    with pytest.raises(TypeError):  # a transposed view is not C-contiguous
        p.dequantize(out=np.zeros((40, 100), np.float32).T)
    with pytest.raises(_core.ShapeError):
        p.dequantize(out=np.zeros((100, 41), np.float32))


def assert_matmul_close(y, w, x):
    exact = w.astype(np.float64) @ x.astype(np.float64).T
    bound = np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64).T
    err = np.abs(y.astype(np.float64) - exact.T)
    assert np.all(err <= 2e-6 * bound.T + 1e-30), err.max()


@pytest.mark.parametrize("batch", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("rows,cols,group_rows", [(300, 77, 64), (64, 2100, 256), (700, 300, 32)])
def test_matmul_matches_numpy(isa, batch, rows, cols, group_rows):
    # (64, 2100, 256) has one cluster: the work is split across column tiles.
    layer, idx = random_layer(rows, cols, group_rows, batch)
    w = numpy_dequantize(layer, idx)
    x = np.random.default_rng(batch).standard_normal((batch, cols)).astype(np.float32)
    p = _core.PackedLayer(**layer)
    y = p.matmul(x)
    assert y.shape == (batch, rows) and y.dtype == np.float32
    assert_matmul_close(y, w, x)
    assert_matmul_close(p.matmul(x, reference=True), w, x)
    y1 = p.matmul(x[0])
    assert y1.shape == (rows,)
    np.testing.assert_allclose(y1, y[0], rtol=1e-5, atol=1e-5)


def test_layer_keeps_its_arrays_alive():
    layer, idx = random_layer(64, 40, 32, 8)
    expect = numpy_dequantize(layer, idx)
    p = _core.PackedLayer(**layer)
    del layer
    import gc

    gc.collect()
    np.testing.assert_array_equal(p.dequantize(), expect)
    assert (p.rows, p.cols, p.group_rows, p.rows_pad, p.n_clusters) == (64, 40, 32, 64, 2)


def test_matmul_accepts_torch():
    torch = pytest.importorskip("torch")
    layer, idx = random_layer(64, 50, 32, 3)
    x = torch.randn(3, 50)
    y = _core.matmul(x, **layer)
    assert_matmul_close(y, numpy_dequantize(layer, idx), x.numpy())


def test_pack_rejects_index_above_depth():
    layer, idx = random_layer(100, 40, 32, 4, max_depth=3)
    depth = layer["depth"].copy()
    depth[1, 7] = 2
    idx[32 + 5, 7] = 4  # cluster 1, column 7
    with pytest.raises(ValueError, match=r"\(cluster 1, column 7\)"):
        _core.pack(100, 40, 32, depth, idx)


def corrupted(layer, **changes):
    out = dict(layer)
    out.update(changes)
    return out


def test_validate_rejects_corruption():
    layer, _ = random_layer(200, 70, 64, 9, max_depth=4)
    _core.validate(**layer)
    FormatError = _core.FormatError

    off = layer["offsets"].copy()
    off[5] += 1  # cluster 1, tile 2
    with pytest.raises(FormatError, match="tile offset 2 of cluster 1"):
        _core.validate(**corrupted(layer, offsets=off))
    with pytest.raises(FormatError, match="truncated"):
        _core.PackedLayer(**corrupted(layer, payload=layer["payload"][:-1].copy()))

    depth = layer["depth"].copy()
    depth[2, 3] = 9
    with pytest.raises(FormatError, match="above 8"):
        _core.dequantize(**corrupted(layer, depth=depth))
    depth[2, 3] = layer["depth"][2, 3] ^ 1  # a valid depth the payload was not packed at
    with pytest.raises(FormatError, match="expected"):
        _core.matmul(np.ones(70, np.float32), **corrupted(layer, depth=depth))

    perm = layer["perm"].copy()
    perm[10] = perm[11]
    with pytest.raises(FormatError, match="repeats"):
        _core.unpack(**corrupted(layer, perm=perm))
    perm[10] = -1
    with pytest.raises(FormatError, match="outside"):
        _core.validate(**corrupted(layer, perm=perm))

    table = layer["table"].copy()
    table[100] = np.inf
    with pytest.raises(FormatError, match="table entry 100"):
        _core.validate(**corrupted(layer, table=table))


def test_shape_and_dtype_errors():
    layer, _ = random_layer(100, 40, 32, 2)
    with pytest.raises(_core.ShapeError, match="offsets"):
        _core.validate(**corrupted(layer, offsets=layer["offsets"][:-1].copy()))
    with pytest.raises(_core.ShapeError, match="loc"):
        _core.validate(**corrupted(layer, loc=layer["loc"][:, :-1].copy()))
    with pytest.raises(_core.ShapeError, match="perm"):
        _core.validate(**corrupted(layer, perm=layer["perm"][:-1].copy()))
    with pytest.raises(TypeError):
        _core.validate(**corrupted(layer, depth=layer["depth"].astype(np.int64)))
    with pytest.raises(TypeError):  # not contiguous: refused, never silently copied
        _core.validate(**corrupted(layer, loc=np.asfortranarray(layer["loc"])))
    p = _core.PackedLayer(**layer)
    with pytest.raises(_core.ShapeError, match="last dimension"):
        p.matmul(np.ones((2, 39), np.float32))
    with pytest.raises(TypeError):
        p.matmul(np.ones(40, np.float64))
    with pytest.raises(_core.ShapeError, match="group_rows"):
        _core.geometry(10, 10, 48)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["depth", "offsets", "payload"]))
def test_mutated_layers_fail_cleanly(seed, field):
    """Random corruption: either FormatError or a result, never a crash."""
    layer, _ = random_layer(90, 70, 64, seed % 1000, max_depth=5)
    rng = np.random.default_rng(seed)
    arr = layer[field].copy()
    if field == "payload" and rng.random() < 0.5:
        arr = arr[: rng.integers(0, arr.size + 1)].copy()
    elif arr.size:
        flat = arr.reshape(-1)
        flat[rng.integers(0, flat.size)] = rng.integers(0, np.iinfo(arr.dtype).max, dtype=np.int64)
    bad = corrupted(layer, **{field: arr})
    try:
        _core.dequantize(**bad)
        _core.matmul(np.ones(70, np.float32), **bad)
        _core.unpack(**bad)
    except _core.FormatError:
        pass


def test_cancel_and_progress():
    layer, _ = random_layer(512, 512, 64, 5)
    flag = _core.CancelFlag()
    flag.set()
    with pytest.raises(_core.Cancelled):
        _core.dequantize(**layer, cancel=flag)
    seen = []
    _core.dequantize(**layer, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen and seen[-1][0] == "dequantize" and seen[-1][1] == seen[-1][2]
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))
    seen.clear()
    x = np.ones((17, 512), np.float32)
    _core.matmul(x, **layer, progress=lambda *p: seen.append(p))
    assert seen == [("matmul", 16, 17), ("matmul", 17, 17)]
    with pytest.raises(_core.Cancelled):
        _core.matmul(x, **layer, cancel=flag)


def test_nibbles():
    depth = np.array([1, 8, 0, 15, 3], dtype=np.uint8)
    packed = _core.pack_nibbles(depth)
    assert packed.tolist() == [0x81, 0xF0, 0x03]
    np.testing.assert_array_equal(_core.unpack_nibbles(packed, 5), depth)
    with pytest.raises(ValueError):
        _core.pack_nibbles(np.array([16], dtype=np.uint8))
    with pytest.raises(_core.ShapeError):
        _core.unpack_nibbles(packed, 7)


def same_half_or_both_nan(ours, numpy_bits):
    ours_nan = np.isnan(ours.view(np.float16))
    np.testing.assert_array_equal(ours_nan, np.isnan(numpy_bits.view(np.float16)))
    np.testing.assert_array_equal(ours[~ours_nan], numpy_bits[~ours_nan])


def test_half_to_float_all_values():
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = _core.half_to_float(h)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_float_to_half_matches_numpy():
    rng = np.random.default_rng(0)
    any_bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # Concentrated on the half range, its subnormals and the overflow edge.
    near = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-27, 17, 200_000))).astype(np.float32)
    # Exact midpoints between neighbouring halves: round to even.
    h = np.arange(0, 0x7BFF, dtype=np.uint16)
    lo = h.view(np.float16).astype(np.float32)
    hi = (h + 1).view(np.float16).astype(np.float32)
    ties = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, -65520,
                        2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 6.1e-5], dtype=np.float32)
    for f in [any_bits, near, ties, -ties, special]:
        with np.errstate(over="ignore", invalid="ignore"):
            same_half_or_both_nan(_core.float_to_half(f), f.astype(np.float16).view(np.uint16))
