"""Tests of the numpy-only analysis (trajectories, super consistency, EoS, lr transfer, long tables) and of the
EoS thresholds (sharpscope.stability) on synthetic data with known answers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sharpscope import stability
from sharpscope.analysis import consistency, eos, tables, trajectories, transfer
from sharpscope.analysis.consistency import ConsistencyThresholds, fit_alpha, super_consistency
from sharpscope.analysis.eos import edge_of_stability
from sharpscope.analysis.tables import to_long_table
from sharpscope.analysis.trajectories import CommonSteps, on_common_steps
from sharpscope.analysis.transfer import lr_optimum, lr_transfer
from sharpscope.stability import eos_threshold

WIDTHS = [1, 2, 4, 8, 16]
STEPS = np.arange(0, 200, 2.0)
BASE = 3.0 + 0.5 * np.sin(STEPS / 15.0)  # c(t): an arbitrary positive trajectory


def family(f, widths=WIDTHS, steps=STEPS, base=BASE):
    return {n: (steps, base * f(n)) for n in widths}


# ----------------------------------------------------------------------------- trajectories on common steps

@pytest.mark.parametrize("C", [trajectories, consistency, eos, transfer, tables, stability], ids=lambda m: m.__name__)
def test_all_names_exported(C):
    for name in C.__all__:
        assert hasattr(C, name), name
    assert "torch" not in C.__dict__
    src = open(C.__file__).read()
    assert "import torch" not in src and "matplotlib" not in src


def test_common_steps_union_and_grid():
    tr = {4: ([0, 1, 2, 3], [1.0, 2, 3, 4]), 2: ([3, 1, 5], [30.0, 10, 50])}
    al = on_common_steps(tr)
    assert al.sizes == (2.0, 4.0)
    np.testing.assert_array_equal(al.steps, [1, 3])
    np.testing.assert_array_equal(al.values, [[10, 30], [2, 4]])
    sizes, steps, values = on_common_steps(tr, "union")
    np.testing.assert_array_equal(steps, [0, 1, 2, 3, 5])
    assert np.isnan(values[0, 0]) and np.isnan(values[1, 4]) and values[0, 4] == 50
    ali = on_common_steps(tr, "union", interpolate=True)
    assert ali.values[0, 2] == pytest.approx(20.0)  # midpoint of 10 @1 and 30 @3
    assert np.isnan(ali.values[0, 0])  # outside the size-2 range: not extrapolated
    alc = on_common_steps(tr, "common", interpolate=True)
    np.testing.assert_array_equal(alc.steps, [1, 2, 3])
    alg = on_common_steps(tr, [1, 2])
    assert np.isnan(alg.values[0, 1]) and alg.values[1, 1] == 3


def test_common_steps_bad_inputs():
    with pytest.raises(ValueError, match="mismatched lengths"):
        on_common_steps({1: ([0, 1, 2], [1.0, 2.0])})
    with pytest.raises(ValueError, match="no common steps"):
        on_common_steps({1: ([0, 1], [1, 1]), 2: ([2, 3], [1, 1])})
    with pytest.raises(ValueError, match="finite number"):
        on_common_steps({float("inf"): ([0], [1.0])})
    with pytest.raises(ValueError, match="must be a number"):
        on_common_steps({"wide": ([0], [1.0])})
    assert on_common_steps({0: ([0], [1.0]), -1: ([0], [2.0])}).sizes == (-1.0, 0.0)  # a linear axis (weight decay 0)
    with pytest.raises(ValueError, match="duplicate steps"):
        on_common_steps({1: ([0, 0], [1.0, 2.0])})
    with pytest.raises(ValueError, match="non-empty"):
        on_common_steps({})
    with pytest.raises(ValueError, match="on must be"):
        on_common_steps({1: ([0], [1.0])}, on="nearest")


# ----------------------------------------------------------------------------- super consistency
def test_a_linear_axis_with_zero_gets_verdicts_without_a_power_law():
    steps = list(range(20))
    traj = {0.0: (steps, [1.0] * 20), 0.01: (steps, [1.02] * 20), 0.1: (steps, [1.5] * 20)}
    res = super_consistency(traj)
    assert res.alpha is None and "linear axis" in res.alpha_note
    assert res.verdict == "diverging-up"



def test_identical_trajectories_are_consistent():
    r = super_consistency(family(lambda n: 1.0))
    assert r.verdict == "consistent"
    assert r.spread_summary == 0.0
    assert np.all(r.spread == 0) and np.all(r.distance == 0)
    assert r.alpha is None and "zero" in r.alpha_note
    assert r.evidence["spread_summary"] == 0.0
    json.dumps(r.evidence)


def test_converging_as_one_over_n_recovers_alpha_exactly():
    r = super_consistency(family(lambda n: 1.0 + 1.0 / n))
    assert r.verdict == "converging", r.reason
    assert r.alpha is not None
    assert abs(r.alpha.alpha - 1.0) < 1e-6
    assert r.alpha.stderr < 1e-6 and r.alpha.rmse < 1e-9
    # lambda_inf = c, lambda_N = c (1 + 1/16): ratio 16/17
    assert r.alpha.limit_ratio == pytest.approx(16 / 17, rel=1e-9)
    assert r.trend_summary == pytest.approx(-1.0)
    assert r.spread_summary > r.thresholds.spread_max


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_alpha_other_exponents_and_large_widths_consistent(alpha):
    r = super_consistency(family(lambda n: 1.0 + 2.0 * n ** -alpha))
    assert abs(r.alpha.alpha - alpha) < 1e-6
    big = super_consistency(family(lambda n: 1.0 + n ** -1.0, widths=[256, 512, 1024, 2048]))
    assert big.verdict == "consistent"  # spread ~ 1/256 < 0.1
    assert abs(big.alpha.alpha - 1.0) < 1e-6


def test_fit_alpha_below_widest_value():
    # lambda_n = c (1 - n^-1): smaller widths below the widest, still converging
    r = super_consistency(family(lambda n: 1.0 - 0.5 / n))
    assert r.verdict == "converging", r.reason
    assert r.alpha.sign == -1 and abs(r.alpha.alpha - 1) < 1e-6
    assert r.alpha.limit_ratio == pytest.approx(1 / (1 - 0.5 / 16), rel=1e-9)


def test_proportional_to_width_is_diverging_up():
    r = super_consistency(family(lambda n: float(n)))
    assert r.verdict == "diverging-up", r.reason
    assert r.trend_summary == pytest.approx(1.0) and r.trend_positive_fraction == 1.0
    assert r.alpha.alpha < 0  # distance to the widest does not decay towards a finite limit


def test_inverse_width_is_diverging_down():
    r = super_consistency(family(lambda n: 1.0 / n))
    assert r.verdict == "diverging-down", r.reason
    assert r.trend_summary == pytest.approx(-1.0)
    assert r.alpha.limit_ratio == pytest.approx(0.0, abs=1e-9)  # the quantity vanishes with width


def test_spread_formulas_and_relative_distance():
    tr = {1: ([0, 1], [1.0, 2.0]), 2: ([0, 1], [3.0, 2.0])}
    r = super_consistency(tr, window=0.0, thresholds=ConsistencyThresholds(spread_max=0.01), spread="range")
    np.testing.assert_allclose(r.spread, [2 / 2, 0.0])
    np.testing.assert_allclose(r.distance[0], [2 / 3, 0.0])
    np.testing.assert_allclose(r.distance[1], [0.0, 0.0])
    r2 = super_consistency(tr, window=0.0)  # default: std / mean
    np.testing.assert_allclose(r2.spread, [1 / 2, 0.0])
    assert r.alpha is None and ">= 3" in r.alpha_note


def test_window_fraction_and_explicit_range():
    # sizes differ only during warm-up (steps < 50): consistent after it
    steps = np.arange(100.0)
    tr = {n: (steps, np.where(steps < 50, float(n), 1.0)) for n in WIDTHS}
    assert super_consistency(tr, window=0.6).verdict == "consistent"
    assert super_consistency(tr, window=(50, None)).verdict == "consistent"
    assert super_consistency(tr, window=(0, 40)).verdict == "diverging-up"
    r = super_consistency(tr, window=0.6)
    assert r.steps[r.in_window][0] == pytest.approx(60.0)
    with pytest.raises(ValueError, match="contains no steps"):
        super_consistency(tr, window=(500, 600))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        super_consistency(tr, window=1.5)


def test_non_monotone_spread_is_inconsistent_and_nan_tolerated():
    vals = {1: 1.0, 2: 3.0, 4: 0.5, 8: 2.5, 16: 1.2}
    tr = {n: (STEPS, BASE * v) for n, v in vals.items()}
    r = super_consistency(tr)
    assert r.verdict == "inconsistent", r.reason
    tr2 = family(lambda n: 1.0)
    s, v = tr2[4]
    v = v.copy()
    v[::3] = np.nan
    tr2[4] = (s, v)
    assert super_consistency(tr2).verdict == "consistent"


def test_thresholds_change_verdict():
    tr = family(lambda n: 1.0 + 1.0 / n)
    assert super_consistency(tr, thresholds=ConsistencyThresholds(spread_max=1.0)).verdict == "consistent"
    assert super_consistency(tr, thresholds=ConsistencyThresholds(alpha_min=2.0)).verdict == "diverging-down"
    with pytest.raises(ValueError, match="trend_min"):
        ConsistencyThresholds(trend_min=0)


def test_super_consistency_bad_inputs():
    with pytest.raises(ValueError, match=">= 2 sizes"):
        super_consistency({8: (STEPS, BASE)})
    with pytest.raises(ValueError, match="spread must be"):
        super_consistency(family(lambda n: 1.0), spread="iqr")
    with pytest.raises(ValueError, match="mismatched lengths"):
        fit_alpha([1, 2], [0.1], widest=4)
    with pytest.raises(ValueError, match=">= 2 sizes besides"):
        fit_alpha([1], [0.1], widest=4)


# ----------------------------------------------------------------------------- edge of stability

def test_eos_thresholds():
    assert eos_threshold("sgd", 0.1) == pytest.approx(20.0)
    assert eos_threshold("SGD", 0.1, momentum=0.9) == pytest.approx(38.0)
    assert eos_threshold("adam", 0.01) == pytest.approx(3800.0)
    assert eos_threshold("adamw", 0.01, beta1=0.0) == pytest.approx(200.0)
    assert eos_threshold("sgd", 0.1, momentum=0.5, nesterov=True) == pytest.approx(3.0 / (2.0 * 0.1))
    with pytest.raises(ValueError, match="lr must be positive"):
        eos_threshold("sgd", 0.0)
    with pytest.raises(ValueError, match="lr must be positive"):
        eos_threshold("sgd", -1e-3)
    with pytest.raises(ValueError, match="unknown optimizer"):
        eos_threshold("lion", 0.1)
    with pytest.raises(ValueError, match="beta1"):
        eos_threshold("adam", 0.1, beta1=1.0)


def test_edge_of_stability_crossing_step():
    steps = np.arange(0, 100.0)
    thr = eos_threshold("sgd", 0.1)  # 20
    sharp = np.minimum(0.5 * steps, 20.0)  # ratio 0.025 t, 0.9 reached at t = 36
    r = edge_of_stability(steps, sharp, thr)
    assert r.first_step == 36.0
    assert r.tail_mean == pytest.approx(1.0)
    assert r.tail_fraction_above == 1.0
    np.testing.assert_allclose(r.ratio, sharp / 20.0)
    r2 = edge_of_stability(steps, sharp, thr, fraction=0.5)
    assert r2.first_step == 20.0
    never = edge_of_stability(steps, 0.1 * np.ones(100), thr)
    assert never.first_step is None and never.tail_mean == pytest.approx(0.005)
    # per-step threshold (lr schedule), unsorted input
    perm = np.random.default_rng(0).permutation(100)
    r3 = edge_of_stability(steps[perm], sharp[perm], np.full(100, thr)[perm])
    assert r3.first_step == 36.0


def test_edge_of_stability_bad_inputs():
    with pytest.raises(ValueError, match="mismatched lengths"):
        edge_of_stability([0, 1, 2], [1.0, 2.0], 2.0)
    with pytest.raises(ValueError, match="mismatched lengths"):
        edge_of_stability([0, 1], [1.0, 2.0], [2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        edge_of_stability([0, 1], [1.0, 2.0], 0.0)


# ----------------------------------------------------------------------------- lr transfer

GRID = np.arange(-10, 1)  # log2 lr from 2^-10 to 1


def parabola(m, curvature=1.0, floor=1.0, grid=GRID):
    return {float(2.0 ** x): curvature * (x - m) ** 2 + floor for x in grid}


@pytest.mark.parametrize("m", [-4.0, -4.3, -6.71])
def test_lr_optimum_exact_on_quadratic(m):
    o = lr_optimum(parabola(m, curvature=0.7, floor=2.5), size=8)
    assert o.method == "quadratic" and not o.at_grid_edge
    assert abs(o.log2_lr_opt - m) < 1e-9
    assert abs(o.loss_opt - 2.5) < 1e-9
    assert o.lr_opt == pytest.approx(2.0 ** m, rel=1e-9)


def test_lr_optimum_nonuniform_grid_and_pair_input():
    xs = np.array([-7.0, -5.5, -5.0, -3.0, -2.2])
    o = lr_optimum((2.0 ** xs, (xs + 4.6) ** 2), size=1)
    assert abs(o.log2_lr_opt + 4.6) < 1e-9


def test_identical_parabolas_transfer():
    res = lr_transfer({n: parabola(-4.3) for n in WIDTHS})
    assert res.verdict == "transfers", res.reason
    assert res.shift_range < 1e-9 and abs(res.cost) < 1e-9
    assert all(abs(v) < 1e-9 for v in res.shifts.values())


def test_shifted_minima_shift_by_known_octaves():
    # optimum moves by -0.5 octave per doubling of width: 2 octaves from 1 to 16
    res = lr_transfer({n: parabola(-3.0 - 0.5 * math.log2(n)) for n in WIDTHS})
    assert res.verdict == "shifts", res.reason
    assert res.shift_range == pytest.approx(2.0, abs=1e-9)
    assert res.shifts[16.0] == pytest.approx(-2.0, abs=1e-9)
    assert res.shifts[2.0] == pytest.approx(-0.5, abs=1e-9)
    # cost: width 16's parabola (x + 5)^2 + 1 at x = -3 minus its optimum 1 -> 4
    assert res.cost == pytest.approx(4.0, abs=1e-9)
    assert res.cost_relative == pytest.approx(4.0, abs=1e-9)
    assert res.evidence["shift_range_octaves"] == pytest.approx(2.0)


def test_small_shift_but_costly_is_shifts():
    res = lr_transfer({1: parabola(-4.0, curvature=4.0, floor=1.0), 2: parabola(-4.4, curvature=4.0, floor=1.0)})
    assert res.shift_range == pytest.approx(0.4, abs=1e-9)  # within 0.5 octave
    assert res.cost == pytest.approx(4 * 0.16, abs=1e-9)  # but 64% worse loss
    assert res.verdict == "shifts"
    assert lr_transfer({1: parabola(-4.0), 2: parabola(-4.1)}).verdict == "transfers"
    # transferred lr between grid points: interpolated on the large width's curve (exact here)
    off = lr_transfer({1: parabola(-4.3), 2: parabola(-4.0)})
    assert off.cost == pytest.approx(0.09, abs=1e-9) and off.cost_note == "quadratic"
    assert off.verdict == "shifts"  # 9% worse than the large width's optimum
    json.dumps(off.evidence)


def test_diverged_runs_are_counted_and_reported():
    curves = {n: parabola(-4.0) for n in WIDTHS}
    for lr in list(curves[16])[-3:]:
        curves[16][lr] = float("nan")
    curves[8][1.0] = float("inf")
    res = lr_transfer(curves)
    assert res.n_diverged == {1.0: 0, 2.0: 0, 4.0: 0, 8.0: 1, 16.0: 3}
    assert res.optima[-1].diverged_lrs == (0.25, 0.5, 1.0)
    assert "16: 3/11" in res.reason
    assert res.verdict == "transfers"
    rows = res.rows()
    assert sum(r["diverged"] for r in rows) == 4 and len(rows) == 55


def test_grid_edge_flagged():
    o = lr_optimum(parabola(-12.0), size=4)  # true optimum below the grid
    assert o.at_grid_edge and o.edge == "low" and o.method == "grid-edge"
    assert o.lr_opt == 2.0 ** -10
    hi = lr_optimum(parabola(3.0), size=4)
    assert hi.at_grid_edge and hi.edge == "high"
    assert o.edge_cause == hi.edge_cause == "grid-end"
    # next to a diverged run: the best finite point (log2 lr = -2) is an edge on that side
    c = parabola(-2.0)
    c[0.5] = float("nan")  # log2 lr = -1, the optimum's right neighbour
    e = lr_optimum(c, size=4)
    assert e.at_grid_edge and e.edge == "high" and e.edge_cause == "diverged" and "diverged" in e.note
    assert e.lr_opt == 0.25
    # a grid-end optimum makes the transfer verdict undetermined, even when identical
    res = lr_transfer({1: parabola(-12.0), 2: parabola(-12.0)})
    assert res.verdict == "undetermined" and "grid" in res.reason
    # a divergence-bounded optimum does not
    assert lr_transfer({1: c, 2: c}).verdict == "transfers"


def test_all_diverged_width_is_undetermined():
    curves = {1: parabola(-4.0), 4: {lr: float("nan") for lr in parabola(-4.0)}}
    res = lr_transfer(curves)
    assert res.verdict == "undetermined"
    assert "all runs diverged" in res.reason and "[4]" in res.reason
    assert res.optima[1].method == "all-diverged" and res.optima[1].n_diverged == 11


def test_cost_next_to_divergence_is_infinite():
    big = parabola(-4.0)
    for lr in [2.0 ** -2, 2.0 ** -1, 1.0]:
        big[lr] = float("nan")
    res = lr_transfer({1: parabola(-2.5), 16: big})
    assert math.isinf(res.cost) and res.verdict == "shifts"


def test_lr_transfer_bad_inputs():
    with pytest.raises(ValueError, match=">= 2 sizes"):
        lr_transfer({1: parabola(-4.0)})
    with pytest.raises(ValueError, match="lr of size 2 must be positive"):
        lr_transfer({1: parabola(-4.0), 2: {0.0: 1.0, 0.1: 0.5}})
    with pytest.raises(ValueError, match="mismatched lengths"):
        lr_optimum(([0.1, 0.2, 0.3], [1.0, 2.0]), size=3)
    with pytest.raises(ValueError, match="empty lr grid"):
        lr_transfer({1: parabola(-4.0), 2: {}})


# ----------------------------------------------------------------------------- long table

def test_long_table():
    tr = {2: ([0, 10], [1.0, 2.0]), 1: ([0, 10], [3.0, float("nan")])}
    rows = to_long_table(tr, "sharpness", parameterization="mup")
    assert len(rows) == 4
    assert rows[0] == {"width": 1, "step": 0, "quantity": "sharpness", "value": 3.0, "parameterization": "mup"}
    assert len(to_long_table(tr, "sharpness", drop_nan=True)) == 3
    rows_al = to_long_table(on_common_steps(tr), "sharpness", size_name="depth")
    assert {r["depth"] for r in rows_al} == {1, 2}
    r = super_consistency(tr, window=0.0, spread="range")
    rows_r = to_long_table(r, "sharpness")
    spread_rows = [x["value"] for x in rows_r if x["quantity"] == "sharpness/spread"]
    assert spread_rows[0] == 1.0 and math.isnan(spread_rows[1])  # one finite value at step 10
    with pytest.raises(ValueError, match="reuse"):
        to_long_table(tr, "sharpness", value=1)
    assert isinstance(on_common_steps(tr), CommonSteps)


def test_transfer_cost_is_clipped_when_the_interpolation_dips_below_the_optimum():
    small = {1: 1.0, 2: 0.6, 4: 0.55, 8: 3.0}
    large = {1: 1.0, 2: 0.5, 4: 0.52, 8: 3.0}
    res = lr_transfer({1: small, 2: large})
    assert res.cost == 0.0 and res.cost_relative == 0.0 and "clipped to 0" in res.cost_note
