"""Bit allocation through the binding: exhaustive optimality on small problems, agreement with
the plain reference solver, the continuous closed form, bounds, errors, progress and cancel."""

import itertools
import math
import re

import numpy as np
import pytest

from cvxq_tui import _core

NUM_DEPTHS = 9


def make_problem(rng, n, *, general, curve=False):
    """Equal steps (64 weights, 16 side bits constant in B) unless `general`: then unequal
    counts, per-group side bits that depend on B, per-group bounds and pins."""
    kw = {}
    if general:
        count = rng.integers(1, 200, n).astype(np.int64)
        side = np.where(np.arange(NUM_DEPTHS) == 0, 0, rng.integers(0, 40, (n, NUM_DEPTHS)))
        kw["side_bits"] = side.astype(np.float64)
        kw["min_depth"] = rng.integers(0, 3, n).astype(np.int8)
        kw["max_depth"] = (kw["min_depth"] + rng.integers(3, 7, n)).astype(np.int8)
        kw["pinned"] = np.where(rng.uniform(size=n) < 0.12, rng.integers(0, 9, n), -1).astype(np.int8)
    else:
        count = np.full(n, 64, np.int64)
        kw["side_bits"] = np.full(NUM_DEPTHS, 16.0)
    if curve:  # measured-looking curves: decreasing on average, not convex
        noise = rng.uniform(0.3, 1.3, (n, NUM_DEPTHS))
        kw["curve"] = (count[:, None] * 2.0 ** (-1.5 * np.arange(NUM_DEPTHS)) * noise).astype(np.float32)
    else:
        kw["log2_var"] = rng.normal(0, 2, n).astype(np.float32)
        kw["log2_sens"] = rng.normal(0, 2, n).astype(np.float32)
    return count, kw


def allowed(kw, g):
    lo, hi = kw.get("global_min_depth", 0), kw.get("global_max_depth", 8)
    if "pinned" in kw and kw["pinned"][g] >= 0:
        return [int(kw["pinned"][g])]
    if "min_depth" in kw:
        lo = max(lo, int(kw["min_depth"][g]))
    if "max_depth" in kw:
        hi = min(hi, int(kw["max_depth"][g]))
    return list(range(lo, hi + 1))


def tables(count, kw):
    """bits[g, B] and dist[g, B] as the solver defines them (float64)."""
    depths = np.arange(NUM_DEPTHS)
    side = np.broadcast_to(kw.get("side_bits", np.zeros(NUM_DEPTHS)), (len(count), NUM_DEPTHS))
    bits = count[:, None] * depths[None, :] + side
    if "curve" in kw:
        dist = kw["curve"].astype(np.float64)
    else:
        log2_s = kw["log2_var"].astype(np.float64) + kw["log2_sens"].astype(np.float64)
        dist = count[:, None] * kw.get("kappa", 1.0) * np.exp2(log2_s)[:, None] * 4.0 ** -depths[None, :]
    return bits, dist


def exhaustive(count, kw):
    """(bits, distortion) of every combination of allowed depths."""
    bits, dist = tables(count, kw)
    combos = np.array(list(itertools.product(*[allowed(kw, g) for g in range(len(count))])))
    rows = np.arange(len(count))[None, :]
    return bits[rows, combos].sum(1), dist[rows, combos].sum(1)


def optimum(all_bits, all_dist, budget):
    return all_dist[all_bits <= budget].min()


def bit_range(count, kw):
    bits, dist = tables(count, kw)
    lo = hi = 0.0
    for g in range(len(count)):
        a = allowed(kw, g)
        lo += bits[g, a].min()
        best = min(a, key=lambda b: (dist[g, b], bits[g, b]))
        hi += bits[g, best]
    return lo, hi


def check_result(count, kw, r, budget):
    bits, dist = tables(count, kw)
    depth = r["depth"].astype(np.int64)
    assert r["depth"].dtype == np.int8 and r["depth"].shape == count.shape
    for g in range(len(count)):
        assert depth[g] in allowed(kw, g)
    rows = np.arange(len(count))
    assert math.isclose(bits[rows, depth].sum(), r["total_bits"], rel_tol=1e-9)
    assert math.isclose(dist[rows, depth].sum(), r["distortion"], rel_tol=1e-9)
    assert r["total_bits"] <= budget
    assert r["distortion"] <= r["lagrangian_distortion"] * (1 + 1e-12)


def test_equal_steps_match_exhaustive_optimum():
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = 3 + trial % 3
        count, kw = make_problem(rng, n, general=False)
        all_bits, all_dist = exhaustive(count, kw)
        lo, hi = bit_range(count, kw)
        for f in (0.0, 0.21, 0.5, 0.83, 1.0):
            budget = lo + f * (hi - lo) + (9.5 if 0 < f < 1 else 0)
            r = _core.allocate_bits(count, budget, **kw)
            check_result(count, kw, r, budget)
            assert math.isclose(r["distortion"], optimum(all_bits, all_dist, budget), rel_tol=1e-12)
            assert budget - r["total_bits"] < 64  # within one step


@pytest.mark.parametrize("curve", [False, True])
def test_general_problems_meet_lagrangian_guarantees(curve):
    rng = np.random.default_rng(2 + curve)
    for trial in range(30):
        count, kw = make_problem(rng, 3 + trial % 3, general=True, curve=curve)
        all_bits, all_dist = exhaustive(count, kw)
        lo, hi = bit_range(count, kw)
        bits, _ = tables(count, kw)
        max_span = max(np.ptp(bits[g, allowed(kw, g)]) for g in range(len(count)))
        for f in (0.0, 0.1, 0.45, 0.7, 1.0):
            budget = lo + f * (hi - lo)
            r = _core.allocate_bits(count, budget, **kw)
            check_result(count, kw, r, budget)
            assert (r["min_bits"], r["max_bits"]) == pytest.approx((lo, hi), rel=1e-12)
            # Optimal at its own size, improved by the fix-up, never better than possible.
            assert math.isclose(
                r["lagrangian_distortion"], optimum(all_bits, all_dist, r["lagrangian_bits"]), rel_tol=1e-12
            )
            assert r["distortion"] >= optimum(all_bits, all_dist, budget) * (1 - 1e-12)
            assert budget - r["total_bits"] < max(max_span, 1e-9)


@pytest.mark.parametrize("general,curve", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_reference_solver(general, curve):
    rng = np.random.default_rng(10 + 2 * general + curve)
    count, kw = make_problem(rng, 1500, general=general, curve=curve)
    lo, hi = bit_range(count, kw)
    for f in (0.03, 0.4, 0.95):
        budget = math.floor(lo + f * (hi - lo))
        r = _core.allocate_bits(count, budget, **kw)
        ref = _core.allocate_bits(count, budget, **kw, reference=True)
        check_result(count, kw, r, budget)
        assert math.isclose(r["distortion"], ref["distortion"], rel_tol=1e-9)
        assert r["total_bits"] == ref["total_bits"]
        np.testing.assert_array_equal(r["depth"], ref["depth"])
        assert r["log2_lambda"] == pytest.approx(ref["log2_lambda"], abs=1e-9)


def test_large_problem_follows_continuous_closed_form():
    rng = np.random.default_rng(4)
    n = 200_000
    count, kw = make_problem(rng, n, general=False)
    kw["kappa"] = 0.7
    for bpw in (0.5, 2.0, 4.4):
        budget = n * (16 + 64 * bpw)
        r = _core.allocate_bits(count, budget, **kw)
        assert 0 <= budget - r["total_bits"] < 64
        # argmin over real B of P*S*kappa*2^(-2B) + lambda*P*B
        log2_s = kw["log2_var"].astype(np.float64) + kw["log2_sens"]
        b_cont = np.clip(0.5 * (np.log2(2 * math.log(2) * kw["kappa"]) + log2_s - r["log2_lambda"]), 0, 8)
        gap = r["depth"] - b_cont
        assert np.abs(gap).max() <= 1.0
        assert (np.abs(gap) > 0.56).sum() <= 2  # only fix-up steps leave the half-step band


def test_bounds_and_pins_are_respected():
    rng = np.random.default_rng(5)
    count, kw = make_problem(rng, 3000, general=True)
    kw.update(global_min_depth=1, global_max_depth=6)
    lo, hi = bit_range(count, kw)
    for f in (0.0, 0.5, 1.0):
        r = _core.allocate_bits(count, lo + f * (hi - lo), **kw)
        check_result(count, kw, r, lo + f * (hi - lo))
        pinned = kw["pinned"] >= 0
        np.testing.assert_array_equal(r["depth"][pinned], kw["pinned"][pinned])


def test_infeasible_budget_states_the_range():
    count = np.full(100, 64, np.int64)
    kw = dict(log2_var=np.zeros(100, np.float32), log2_sens=np.zeros(100, np.float32), side_bits=np.full(9, 16.0))
    with pytest.raises(_core.InfeasibleError) as e:
        _core.allocate_bits(count, 1599.0, **kw)
    msg = str(e.value)
    assert "below the smallest reachable size 1600 bits (0.250 bits/weight" in msg
    assert "reachable: 0.250 .. 8.250 bits/weight" in msg
    with pytest.raises(_core.InfeasibleError, match=r"above the largest useful size 52800 bits \(8\.250"):
        _core.allocate_bits(count, 52801.0, **kw)
    with pytest.raises(_core.InfeasibleError, match="reachable"):
        _core.allocate_bits(count, 10.0, **kw, reference=True)
    assert _core.allocate_bits(count, 52800.0, **kw)["log2_lambda"] == -math.inf


def test_bad_inputs_raise_naming_the_field():
    n = 20
    count = np.full(n, 64, np.int64)
    lv, ls = np.zeros(n, np.float32), np.zeros(n, np.float32)
    ok = dict(log2_var=lv, log2_sens=ls)
    with pytest.raises(ValueError, match="exactly one"):
        _core.allocate_bits(count, 2000.0)
    with pytest.raises(ValueError, match="exactly one"):
        _core.allocate_bits(count, 2000.0, **ok, curve=np.ones((n, 9), np.float32))
    with pytest.raises(ValueError, match="log2_sens"):
        _core.allocate_bits(count, 2000.0, log2_var=lv)
    with pytest.raises(_core.ShapeError, match="log2_var"):
        _core.allocate_bits(count, 2000.0, log2_var=lv[:5], log2_sens=ls)
    with pytest.raises(_core.ShapeError, match="curve"):
        _core.allocate_bits(count, 2000.0, curve=np.ones((n, 8), np.float32))
    with pytest.raises(_core.ShapeError, match="side_bits"):
        _core.allocate_bits(count, 2000.0, **ok, side_bits=np.zeros(8))
    with pytest.raises(_core.ShapeError, match="side_bits"):
        _core.allocate_bits(count, 2000.0, **ok, side_bits=np.zeros((n, 9, 1)))
    with pytest.raises(TypeError):  # wrong dtype is refused, never silently converted
        _core.allocate_bits(count.astype(np.int32), 2000.0, **ok)
    with pytest.raises(TypeError):
        _core.allocate_bits(count, 2000.0, log2_var=lv.astype(np.float64), log2_sens=ls)
    with pytest.raises(TypeError):  # not contiguous
        _core.allocate_bits(np.full(2 * n, 64, np.int64)[::2], 2000.0, **ok)

    def bad(field, value, index):
        kw = dict(ok, pinned=np.full(n, -1, np.int8), min_depth=np.zeros(n, np.int8), max_depth=np.full(n, 8, np.int8))
        kw[field] = kw[field].copy()
        kw[field][index] = value
        with pytest.raises(ValueError, match=re.escape(f"{field}[{index}]")):
            _core.allocate_bits(count, 2000.0, **kw)

    bad("log2_var", np.nan, 3)
    bad("log2_sens", np.inf, 4)
    bad("pinned", 9, 5)
    bad("min_depth", -2, 6)
    bad("max_depth", 12, 7)
    c = count.copy()
    c[2] = -5
    with pytest.raises(ValueError, match=re.escape("count[2]")):
        _core.allocate_bits(c, 2000.0, **ok)
    with pytest.raises(ValueError, match="group 1"):
        _core.allocate_bits(
            count, 2000.0, **ok, min_depth=np.array([0, 5] + [0] * (n - 2), np.int8), max_depth=np.full(n, 4, np.int8)
        )
    curve = np.ones((n, 9), np.float32)
    curve[3, 2] = np.nan
    with pytest.raises(ValueError, match=re.escape("curve[3, 2]")):
        _core.allocate_bits(count, 2000.0, curve=curve)
    with pytest.raises(ValueError, match="n_groups"):
        _core.allocate_bits(np.zeros(0, np.int64), 0.0, log2_var=lv[:0], log2_sens=ls[:0])
    with pytest.raises(ValueError, match="budget_bits"):
        _core.allocate_bits(count, math.nan, **ok)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    count, kw = make_problem(rng, 500, general=False)
    budget = 500 * (16 + 64 * 3.0)
    a = _core.allocate_bits(count, budget, **kw)
    b = _core.allocate_bits(torch.from_numpy(count), budget, **{k: torch.from_numpy(v) for k, v in kw.items()})
    np.testing.assert_array_equal(a["depth"], b["depth"])


def test_progress_and_cancel():
    rng = np.random.default_rng(7)
    n = 300_000
    count, kw = make_problem(rng, n, general=False)
    budget = n * (16 + 64 * 2.5)
    seen = []
    _core.allocate_bits(count, budget, **kw, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert len(seen) >= 3 and {s for s, _, _ in seen} == {"allocate"}
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))
    assert seen[-1][1] == seen[-1][2]
    flag = _core.CancelFlag()
    with pytest.raises(_core.Cancelled):
        _core.allocate_bits(count, budget, **kw, cancel=flag, progress=lambda *a: flag.set())
