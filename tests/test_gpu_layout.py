"""The GPU tiling (core/include/cvxq/gpu_layout.hpp) that the CUDA product kernel reads: built
on the host, so it is checked here on every machine. Decoding the tiling back through its
job list must give exactly the CPU's dense reconstruction (with the codebook rounded to
float16, as the kernel's tables are), every weight written once, and nothing else."""

import numpy as np
import pytest

from cvxq_tui import _core

from test_packed import random_layer

CASES = [  # rows, cols, group_rows, max depth
    (1, 1, 32, 0), (33, 5, 32, 8), (300, 80, 96, 8), (64, 1000, 64, 3), (1000, 33, 256, 8),
    (576, 1536, 128, 8), (1536, 576, 128, 4), (200, 70, 160, 5), (4096, 64, 4096, 2),
]


def half_table(layer):
    return dict(layer, table=layer["table"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("rows,cols,group_rows,max_depth", CASES)
@pytest.mark.parametrize("units_per_job", [1, 3, 64])
def test_tiling_decodes_to_the_dense_reconstruction(rows, cols, group_rows, max_depth, units_per_job):
    layer, _ = random_layer(rows, cols, group_rows, seed=rows + cols + max_depth, max_depth=max_depth)
    lay = _core.PackedLayer(**layer).gpu_layout(units_per_job=units_per_job)
    dense = _core.gpu_layout_dense(lay, rows, cols, group_rows, perm=layer["perm"])
    want = _core.PackedLayer(**half_table(layer)).dequantize(reference=True)
    assert not np.isnan(dense).any(), "some weights are in no job"
    np.testing.assert_array_equal(dense, want)


def test_tiling_shape_and_sizes():
    rows, cols, group_rows = 1000, 300, 128
    layer, _ = random_layer(rows, cols, group_rows, seed=7, max_depth=8)
    lay = _core.PackedLayer(**layer).gpu_layout(units_per_job=4)
    jobs = lay["jobs"].reshape(-1, 4)
    begin = lay["job_begin"]
    assert begin[0] == 0 and begin[9] == len(jobs) and all(a <= b for a, b in zip(begin, begin[1:]))
    depth_of = jobs[:, 3] >> 24
    for d in range(9):  # sorted by depth, as the kernel's per-block tables need
        assert (depth_of[begin[d]:begin[d + 1]] == d).all()
    units, ns = jobs[:, 3] & 0xFFFF, (jobs[:, 3] >> 16) & 0xFF
    assert set(ns.tolist()) <= {1, 2, 4} and (units >= 1).all() and (units <= 4).all()
    # payload: every unit of depth B is 32 B words, packed back to back from offset 0, then
    # 2048 zero words that the kernel may read past a run's end (7 units of depth 8)
    assert (jobs[:, 0] % 32 == 0).all()
    assert lay["payload"].size == int((units * 32 * depth_of).sum()) + 2048
    assert not lay["payload"][-2048:].any()
    # runs of jobs with the same rows are contiguous in payload and records
    for a, b in zip(jobs[:-1], jobs[1:]):
        if a[2] == b[2]:
            assert b[0] == a[0] + 32 * (a[3] >> 24) * (a[3] & 0xFFFF)
            bpu = 1 if (a[3] >> 24) == 0 else 4 // ((a[3] >> 16) & 0xFF)
            assert b[1] == a[1] + 8 * bpu * (a[3] & 0xFFFF)
    # segments: by depth, then by NS 4, 2, 1
    seg = lay["seg_begin"]
    assert len(seg) == 28 and seg[0] == 0 and seg[27] == len(jobs)
    for s in range(27):
        d, ns = s // 3, 4 >> (s % 3)
        part = jobs[seg[s]:seg[s + 1]]
        assert ((part[:, 3] >> 24) == d).all() and (((part[:, 3] >> 16) & 0xFF) == ns).all()
    assert [seg[3 * d] for d in range(9)] + [seg[27]] == list(begin)
    # the same bits as the packed payload, up to columns padded to whole blocks
    assert layer["payload"].size <= lay["payload"].size <= 1.5 * layer["payload"].size
    assert lay["pairs"].size == 340 and lay["singles"].size == _core.TABLE_SIZE
    # pair tables hold (T[k0], T[k1]) as two float16 for k0 | k1 << B
    t16 = layer["table"].astype(np.float16)
    for B in (1, 3, 4):
        off = ((1 << (2 * B)) - 4) // 3
        e = np.arange(1 << (2 * B))
        pair = lay["pairs"][off + e]
        np.testing.assert_array_equal((pair & 0xFFFF).astype(np.uint16).view(np.float16), t16[(1 << B) - 1 + (e & ((1 << B) - 1))])
        np.testing.assert_array_equal((pair >> 16).astype(np.uint16).view(np.float16), t16[(1 << B) - 1 + (e >> B)])


def test_tiling_of_a_real_layer_shape_is_close_to_the_packed_size():
    rows, cols, group_rows = 1536, 576, 128
    rng = np.random.default_rng(1)
    layer, _ = random_layer(rows, cols, group_rows, seed=3, max_depth=4)
    lay = _core.PackedLayer(**layer).gpu_layout()
    # columns are padded to blocks of 8 per (cluster, depth): a few percent more words, plus
    # the fixed 2048-word tail
    assert lay["payload"].size - 2048 <= 1.06 * layer["payload"].size
