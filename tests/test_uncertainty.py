"""Verdicts that carry their uncertainty (issue 25): intervals over seeds cover a known truth at about their
level, censored optima are bounds, and verdicts are three-way at their thresholds."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sharpscope.analysis.consistency import super_consistency
from sharpscope.analysis.eos import edge_of_stability
from sharpscope.analysis.findings import Finding, verdict_cell
from sharpscope.analysis.optimum import lr_optimum, lr_optimum_over_seeds
from sharpscope.analysis.transfer import lr_transfer
from sharpscope.analysis.uncertainty import (
    CODES,
    jackknife_interval,
    mean_interval,
    pair_seeds,
    projected,
    range_interval,
    seeds_needed,
    seeds_note,
    side,
)

GRID = np.arange(-9.0, 1.0)  # log2 lr, one octave apart


def noisy_curves(rng, seeds, m, sigma=0.03, curvature=0.1, grid=GRID):
    """``seeds`` loss curves ``curvature * (log2 lr - m)^2 + 1`` plus N(0, sigma) per run: (lrs, seeds x lrs)."""
    return 2.0 ** grid, curvature * (grid - m) ** 2 + 1.0 + sigma * rng.standard_normal((seeds, grid.size))


def exact_curves(optima, curvature=0.1, grid=GRID):
    """One noiseless parabola per seed, with its optimum (log2 lr) at each of ``optima``."""
    return 2.0 ** grid, np.array([curvature * (grid - m) ** 2 + 1.0 for m in optima])


# ----------------------------------------------------------------------------- coverage

def test_optimum_interval_covers_the_true_optimum_at_its_level():
    """200 draws of 5 seeds each: the 90% interval of the optimal lr holds the true optimum in 85-95%."""
    rng = np.random.default_rng(2025)
    for seeds in (5, 3):
        hits = 0
        for _ in range(200):
            m = rng.uniform(-6.0, -3.0)
            found = lr_optimum_over_seeds(noisy_curves(rng, seeds, m), level=0.9)
            assert found.interval.method == "student-t" and found.interval.n == seeds
            hits += found.interval.low <= m <= found.interval.high
        assert 0.85 <= hits / 200 <= 0.95, (seeds, hits)


def test_percentile_bootstrap_undercovers_where_the_t_interval_does_not():
    """Why not a bootstrap: on the same per-seed optima, a 90% percentile bootstrap over 5 seeds covers far
    less than 90% (it is too narrow by sqrt((n-1)/n) and uses normal quantiles); the t interval does not."""
    rng = np.random.default_rng(7)
    t_hits = boot_hits = 0
    for _ in range(200):
        m = rng.uniform(-6.0, -3.0)
        found = lr_optimum_over_seeds(noisy_curves(rng, 5, m), level=0.9)
        x = np.array([o.log2_lr_opt for o in found.optima])
        means = rng.choice(x, size=(2000, x.size)).mean(axis=1)
        lo, hi = np.quantile(means, [0.05, 0.95])
        boot_hits += lo <= m <= hi
        t_hits += found.interval.low <= m <= found.interval.high
    assert boot_hits / 200 < 0.85 <= t_hits / 200


WIDTHS = [64, 128, 256, 512]
STEPS = np.arange(0.0, 51.0, 10.0)


def noisy_trajectories(rng, seeds, b, alpha, seed_sd=0.03, step_sd=0.02):
    """lambda_n(t) = f(t) (1 + b n^-alpha) per width, times (1 + a per-seed offset + per-step noise)."""
    f = 2.0 * (1.0 - np.exp(-(STEPS + 5.0) / 20.0))
    return {w: (STEPS, f * (1 + b * w ** -alpha) * (1 + seed_sd * rng.standard_normal((seeds, 1))
                                                    + step_sd * rng.standard_normal((seeds, STEPS.size))))
            for w in WIDTHS}


def test_spread_and_alpha_intervals_cover_the_truth():
    """200 draws of 5 seeds: the jackknife 90% intervals of the spread (true 0.108, next to the 0.1
    threshold) and of alpha (true 0.5: the form is exact) cover in 85-95%."""
    rng = np.random.default_rng(3)
    b, alpha = 5.0, 0.5
    v = 1 + b * np.array(WIDTHS, dtype=float) ** -alpha
    true_spread = float(np.std(v) / np.mean(v))
    spread_hits = alpha_hits = 0
    for _ in range(200):
        r = super_consistency(seeds=noisy_trajectories(rng, 5, b, alpha), window=0.0)
        assert r.spread_interval.method == "jackknife-t" and r.n_paired == 5
        spread_hits += r.spread_interval.low <= true_spread <= r.spread_interval.high
        alpha_hits += r.alpha_interval.low <= alpha <= r.alpha_interval.high
    assert 0.85 <= spread_hits / 200 <= 0.95 and 0.85 <= alpha_hits / 200 <= 0.95, (spread_hits, alpha_hits)


def test_shift_range_and_cost_intervals_cover_the_truth():
    """The shift range's Bonferroni interval and the relative cost's (mapped from a Bonferroni box of the
    transferred lr's offset and the curvature) cover at least their level: both are conservative."""
    rng = np.random.default_rng(11)
    range_hits = cost_hits = 0
    draws = 120
    for _ in range(draws):
        m = rng.uniform(-6.0, -4.0)
        optima = [m, m - 0.3, m - 0.6]
        r = lr_transfer(seeds={64 * 2 ** i: noisy_curves(rng, 5, x) for i, x in enumerate(optima)})
        range_hits += r.shift_range_interval.low <= 0.6 <= r.shift_range_interval.high
        cost_hits += r.cost_interval.low <= 0.1 * 0.6 ** 2 <= r.cost_interval.high  # relative to the floor 1
    assert range_hits / draws >= 0.88 and cost_hits / draws >= 0.88, (range_hits, cost_hits)


def test_eos_tail_interval_covers_the_true_ratio():
    rng = np.random.default_rng(5)
    steps = np.arange(0.0, 100.0)
    hits = 0
    for _ in range(200):
        sharp = 2.0 * (0.97 + 0.05 * rng.standard_normal((4, 1)) + 0.02 * rng.standard_normal((4, steps.size)))
        r = edge_of_stability(steps, sharp, 2.0)
        assert r.n_seeds == 4 and r.tail_interval.n == 4
        hits += r.tail_interval.low <= 0.97 <= r.tail_interval.high
    assert 0.85 <= hits / 200 <= 0.95
    single = edge_of_stability(steps, sharp[0], 2.0)
    assert single.tail_interval is None and single.n_seeds == 1
    assert edge_of_stability(steps, sharp, 2.0).tail_mean == pytest.approx(float(np.mean(sharp[:, 80:] / 2.0)))


# ----------------------------------------------------------------------------- censoring

def cliff(m_edge, grid, curvature=0.1):
    """A loss that falls towards the divergence edge at log2 lr = m_edge (diverged at and above it)."""
    return {float(2.0 ** x): (curvature * (x - m_edge) ** 2 + 1.0 if x < m_edge else float("nan")) for x in grid}


def test_an_optimum_at_the_divergence_edge_is_a_bound_not_a_point():
    o = lr_optimum(cliff(-2.5, GRID))  # finite up to -3, diverged from -2 on
    assert o.method == "grid-edge" and o.edge_cause == "diverged" and o.lr_opt == 2.0 ** -3
    assert o.bound_log2 == (-4.0, -2.0) and o.bracket_log2 == (-4.0, -2.0)
    assert "a bound, not a point" in o.note and "finer lr grid" in o.note
    fitted = lr_optimum({float(2.0 ** x): (x + 4.5) ** 2 for x in GRID})
    assert fitted.bound_log2 is None and fitted.bracket_log2 == (pytest.approx(-4.5), pytest.approx(-4.5))
    # the same edge at two sizes: the optima may differ by up to 2 grid steps: undetermined, a finer grid decides
    coarse = lr_transfer({64: cliff(-2.5, GRID), 256: cliff(-2.5, GRID)})
    assert coarse.verdict == "undetermined" and coarse.code == "censored", coarse.reason
    assert coarse.shift_range_bound == (0.0, 2.0) and coarse.seeds_suggested is None
    assert "finer lr grid" in coarse.reason
    fine_grid = np.arange(-4.0, -1.0, 0.125)
    fine = lr_transfer({64: cliff(-2.45, fine_grid), 256: cliff(-2.45, fine_grid)})
    assert fine.verdict == "transfers" and fine.code == "no-interval" and fine.shift_range_bound[1] <= 0.5, fine.reason
    # edges 3 octaves apart: the bounds alone decide
    apart = lr_transfer({64: cliff(-1.5, GRID), 256: cliff(-4.5, GRID)})
    assert apart.verdict == "shifts" and apart.shift_range_bound[0] > 0.5, apart.reason


def test_censored_seeds_widen_the_interval_and_a_grid_end_is_one_sided():
    curves = {0: cliff(-2.5, GRID), 1: cliff(-2.5, GRID), 2: {float(2.0 ** x): (x + 4.2) ** 2 for x in GRID}}
    found = lr_optimum_over_seeds(curves)
    assert found.interval.bracket == (pytest.approx((-4 - 4 - 4.2) / 3), pytest.approx((-2 - 2 - 4.2) / 3))
    assert "2 of 3 seed optima are bounds" in found.note
    low_end = {s: {float(2.0 ** x): (x + 12.0) ** 2 for x in GRID} for s in range(3)}
    one_sided = lr_optimum_over_seeds(low_end)
    assert one_sided.interval.low == -math.inf and math.isfinite(one_sided.interval.high)
    # a grid-end optimum far from the other size's: the one-sided bound decides 'shifts' (it read 'undetermined')
    res = lr_transfer({64: {float(2.0 ** x): (x + 3.0) ** 2 for x in GRID}, 256: low_end[0]})
    assert res.verdict == "shifts" and res.shift_range_bound == (5.0, math.inf), res.reason
    same = lr_transfer({64: low_end[0], 256: low_end[1]})
    assert same.verdict == "undetermined" and same.code == "grid-end", same.reason


# ----------------------------------------------------------------------------- three-way verdicts

def seeded(optima_by_size):
    return {size: exact_curves(optima) for size, optima in optima_by_size.items()}


def test_transfer_verdict_is_three_way_at_the_threshold():
    spread = np.array([-0.1, 0.0, 0.1])
    below = lr_transfer(seeds=seeded({64: -4 + spread, 256: -4.1 + spread}))
    assert below.verdict == "transfers" and below.code == "interval", below.reason
    assert below.shift_range_interval.high <= 0.5 and below.cost_interval.high <= 0.05
    above = lr_transfer(seeds=seeded({64: -3 + spread, 256: -4.5 + spread}))
    assert above.verdict == "shifts" and above.code == "interval" and above.shift_range_interval.low > 0.5
    wide = np.array([-0.4, 0.0, 0.4])
    straddling = lr_transfer(seeds=seeded({64: -4 + wide, 256: -4.3 + wide[::-1]}))
    assert straddling.verdict == "undetermined" and straddling.code == "straddles", straddling.reason
    assert straddling.shift_range_interval.low <= 0.5 < straddling.shift_range_interval.high
    assert "needs more seeds or a finer grid" in straddling.reason
    m = straddling.seeds_suggested
    assert isinstance(m, int) and m > 3 and f"about {m} seeds" in straddling.reason
    assert side(projected(straddling.shift_range_interval, m), 0.5) == "below"
    assert side(projected(straddling.shift_range_interval, m - 1), 0.5) != "below"
    # one seed: a point verdict marked 'no interval', never 'undetermined' for a point clear of the thresholds
    single = lr_transfer(seeds=seeded({64: [-4.0], 256: [-4.3]}))
    assert single.verdict == "transfers" and single.code == "no-interval" and "no interval" in single.reason
    assert single.shift_range_interval is None and single.evidence["interval"] == "no interval"
    old_style = lr_transfer({64: {float(2.0 ** x): 0.1 * (x + 4) ** 2 + 1 for x in GRID},
                             256: {float(2.0 ** x): 0.1 * (x + 4.3) ** 2 + 1 for x in GRID}})
    assert old_style.verdict == "transfers" and old_style.code == "no-interval"
    json.dumps(straddling.evidence, allow_nan=False)


def test_the_cost_alone_can_straddle_and_its_seeds_are_projected():
    jitter = np.array([-0.025, 0.0, 0.025])  # the per-seed shifts: 0.25 +- 0.05 octave
    r = lr_transfer(seeds={64: exact_curves(-4 + jitter, curvature=0.8), 256: exact_curves(-4.25 - jitter, curvature=0.8)})
    assert r.shift_range_interval.high <= 0.5  # the shift is clear; the cost (0.8 * 0.25^2 = 5%) is not
    assert r.cost_interval.method == "mapped" and r.cost_interval.low <= 0.05 < r.cost_interval.high
    assert r.verdict == "undetermined" and r.code == "straddles", r.reason


# per_layer_lr_adam, SP with per-layer lrs, 3 seeds (measured 2026-12-07): final loss per width, seed, lr
PER_LAYER_SP_LRS = [0.005, 0.01, 0.02, 0.04, 0.08]
PER_LAYER_SP = {
    64: [[0.045834, 0.010685, 0.004402, 0.011742, 0.035379], [0.050431, 0.01752, 0.009573, 0.007495, 1.488742],
         [0.050904, 0.014145, 0.007016, 0.007967, 0.357222]],
    128: [[0.043929, 0.011593, 0.005087, 0.008205, 0.029088], [0.042758, 0.01658, 0.010354, 0.014033, 0.057489],
          [0.044544, 0.01378, 0.010999, 0.017802, 0.089011]],
    256: [[0.038618, 0.015461, 0.008663, 0.01013, 0.118594], [0.042984, 0.02027, 0.013115, 0.029648, 0.094705],
          [0.037489, 0.01782, 0.014857, 0.020649, 0.03076]]}


def table_cell(r):
    """The verdict table's cell for a transfer result."""
    return verdict_cell(Finding("transfer", "", "lr transfer", r.verdict, r.reason, "sp", "adam", None, {}, "width",
                                entry=r.evidence))


def test_an_undetermined_verdict_says_why_it_suggests_no_seed_count():
    """The issue's per_layer_lr_adam case: the point cost (7.2%) lies above 5% but the cost interval closes, as
    seeds grow, on the cost at the mean per-seed offset (~4.8%): no number of seeds decides, and the reason and
    the table say so instead of ending at "needs more seeds"."""
    curves = {w: {s: (np.array(PER_LAYER_SP_LRS), np.array(v)) for s, v in enumerate(rows)}
              for w, rows in PER_LAYER_SP.items()}
    r = lr_transfer(seeds=curves)
    assert r.verdict == "undetermined" and r.code == "straddles" and r.seeds_suggested is None, r.reason
    assert "no seed count" in r.reason and "finer lr grid" in r.reason
    assert table_cell(r) == "undetermined (straddles, no seed count)"
    # a straddling interval that a seed count does decide keeps its number, in the reason and the table
    wide = np.array([-0.4, 0.0, 0.4])
    decidable = lr_transfer(seeds=seeded({64: -4 + wide, 256: -4.3 + wide[::-1]}))
    m = decidable.seeds_suggested
    assert isinstance(m, int) and "no seed count" not in decidable.reason
    assert table_cell(decidable) == f"undetermined (straddles, ~{m} seeds)"
    assert seeds_note(None) != seeds_note(5) and "about 5 seeds" in seeds_note(5)


def test_undetermined_meanings_have_distinct_codes():
    assert len(set(CODES)) == len(CODES) and {"straddles", "censored", "grid-end", "all-diverged", "cost-outside-grid",
                                               "no-data", "not-analysed", "no-interval", "interval"} <= set(CODES)
    dead = lr_transfer({1: {0.1: float("nan"), 0.2: float("nan"), 0.4: float("nan")}, 2: {0.1: 2.0, 0.2: 1.0, 0.4: 3.0}})
    assert dead.code == "all-diverged"
    outside = lr_transfer({1: {0.8: 2.0, 1.6: 1.0, 3.2: 3.0}, 2: {0.1: 2.0, 0.2: 1.0, 0.4: 3.0}})
    assert outside.verdict == "shifts"  # 3 octaves apart: decided, even though the cost cannot be measured
    near = lr_transfer({1: {0.1: 2.0, 0.2: 1.0, 0.4: 2.0}, 2: {0.141: 2.0, 0.2: 1.0, 0.283: 2.0}})
    assert near.verdict == "transfers"
    # the smallest size's optimum (log2 lr -2.1) lies 0.36 octave from the largest's, outside its grid
    off = lr_transfer({1: {0.125: 0.81, 0.25: 0.01, 0.5: 1.21}, 2: {0.25: 2.0, 0.3: 1.0, 0.36: 2.0}})
    assert off.verdict == "undetermined" and off.code == "cost-outside-grid", off.reason


def test_a_spread_interval_clipped_to_zero_says_so():
    """Sizes that differ by less than their seeds do: the jackknife's bias correction puts the whole spread
    interval below 0; clipped, it reads 0..0, which the reason explains instead of showing as a sharp zero."""
    rng = np.random.default_rng(21)
    f = 2.0 * (1.0 - np.exp(-(STEPS + 5.0) / 20.0))
    same = {w: (STEPS, f * (1 + 0.08 * rng.standard_normal((3, 1)) + 0.002 * rng.standard_normal((3, STEPS.size))))
            for w in WIDTHS}
    r = super_consistency(seeds=same, window=0.0)
    assert r.spread_interval.low == r.spread_interval.high == 0.0 and r.spread_interval.estimate < 0
    assert r.verdict == "consistent" and "0..0 only after clipping" in r.reason, r.reason
    clear = super_consistency(seeds=noisy_trajectories(np.random.default_rng(3), 5, 5.0, 0.5), window=0.0)
    assert clear.spread_interval.high > 0 and "after clipping" not in clear.reason


def test_consistency_verdict_is_three_way_at_the_threshold():
    steps = np.arange(0.0, 60.0, 10.0)

    def family(level_by_width, offsets):
        return {w: (steps, np.array([np.full(steps.size, lvl * (1 + o)) for o in offsets]))
                for w, lvl in level_by_width.items()}

    tight = np.array([-0.01, 0.0, 0.01])
    near = {64: 1.00, 128: 1.12, 256: 1.25}  # spread of the means 0.091: below 0.1, but only just
    clear = super_consistency(seeds=family({64: 1.0, 128: 1.02, 256: 1.04}, tight))
    assert clear.verdict == "consistent" and clear.code == "interval" and clear.spread_interval.high <= 0.1
    loose = np.array([-0.12, 0.0, 0.12])
    straddling = super_consistency(seeds={w: (steps, np.array([np.full(steps.size, lvl * (1 + o)) for o in
                                                               (loose if w == 128 else -loose)]))
                                          for w, lvl in near.items()})
    assert straddling.verdict == "undetermined" and straddling.code == "straddles", straddling.reason
    assert straddling.spread_interval.low <= 0.1 < straddling.spread_interval.high
    assert straddling.seeds_suggested is None or straddling.seeds_suggested > 3
    up = super_consistency(seeds=family({64: 1.0, 128: 2.0, 256: 4.0}, tight))
    assert up.verdict == "diverging-up" and up.code == "interval" and up.spread_interval.low > 0.1
    one = super_consistency(seeds={w: (steps, np.full((1, steps.size), lvl)) for w, lvl in near.items()})
    assert one.verdict == "consistent" and one.code == "no-interval" and "no interval" in one.reason
    assert one.evidence["interval"] == "no interval" and one.spread_interval is None
    json.dumps(straddling.evidence, allow_nan=False)


# ----------------------------------------------------------------------------- inputs and the seed-mean numbers

def test_seed_forms_agree_and_the_point_numbers_are_the_seed_means():
    rng = np.random.default_rng(0)
    data = {w: noisy_curves(rng, 3, -4.0 - 0.1 * i) for i, w in enumerate([64, 128, 256])}
    as_mapping = {w: {s: (lrs, y[s]) for s in range(3)} for w, (lrs, y) in data.items()}
    a, b = lr_transfer(seeds=data), lr_transfer(seeds=as_mapping)
    assert a.shift_range_interval.low == b.shift_range_interval.low and a.verdict == b.verdict
    mean = lr_transfer({w: (lrs, y.mean(axis=0)) for w, (lrs, y) in data.items()})
    assert a.shift_range == pytest.approx(mean.shift_range, abs=1e-12)
    assert a.cost_relative == pytest.approx(mean.cost_relative, abs=1e-12)
    assert [row["seed"] for row in a.rows()][:3] == [0, 0, 0] and len(a.rows()) == 3 * 3 * GRID.size
    traj = noisy_trajectories(rng, 3, 5.0, 0.5)
    seeded_result = super_consistency(seeds=traj)
    plain = super_consistency({w: (s, v.mean(axis=0)) for w, (s, v) in traj.items()})
    assert seeded_result.spread_summary == pytest.approx(plain.spread_summary, rel=1e-12)
    assert seeded_result.n_seeds == {64.0: 3, 128.0: 3, 256.0: 3, 512.0: 3}


def test_seed_input_errors_are_one_line():
    curve = {0.1: 1.0, 0.2: 0.5, 0.4: 1.0}
    with pytest.raises(ValueError, match="not both"):
        lr_transfer({1: curve, 2: curve}, seeds={1: {0: curve}, 2: {0: curve}})
    with pytest.raises(ValueError, match="seeds x points"):
        lr_transfer(seeds={1: ([0.1, 0.2], [1.0, 2.0]), 2: {0: curve}})
    with pytest.raises(ValueError, match="confidence level"):
        lr_transfer({1: curve, 2: curve}, level=90)
    with pytest.raises(ValueError, match="not both"):
        super_consistency({1: ([0, 1], [1, 1])}, seeds={1: {0: ([0, 1], [1, 1])}})
    with pytest.raises(ValueError, match="seeds x steps") as err:
        edge_of_stability([0, 1, 2], np.ones((2, 4)), 2.0)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the interval arithmetic

def test_intervals_their_projection_and_the_seeds_they_suggest():
    iv = mean_interval([0.30, 0.45, 0.60, 0.40], level=0.9)
    s = np.std([0.30, 0.45, 0.60, 0.40], ddof=1)
    assert iv.high - iv.estimate == pytest.approx(2.3533634 * s / 2, rel=1e-6)  # t_{0.95, 3} = 2.353
    assert mean_interval([1.0]) is None and side(iv, 0.5) == "straddles"
    m = seeds_needed(iv, 0.5)
    assert side(projected(iv, m), 0.5) == "below" and side(projected(iv, m - 1), 0.5) == "straddles"
    bracketed = mean_interval([0.2, 0.4], upper=[0.9, 0.6])
    assert bracketed.bracket == pytest.approx((0.3, 0.75)) and seeds_needed(bracketed, 0.5) is None  # a finer grid decides
    # the jackknife of a mean is the t interval; of a variance, its bias is removed
    x = np.array([1.0, 2.0, 4.0, 7.0])
    jk = jackknife_interval(lambda keep: float(np.mean(x[keep])), 4)
    assert (jk.low, jk.high) == pytest.approx((mean_interval(x).low, mean_interval(x).high))
    var = jackknife_interval(lambda keep: float(np.var(x[keep])), 4)
    assert var.estimate == pytest.approx(np.var(x, ddof=1))
    # a range over 3 sizes: Bonferroni over 3 pairs; 0 belongs to it when no pair differs clearly
    rng = range_interval(np.array([[0.0, 0.1, -0.1], [0.05, 0.0, 0.1], [0.0, 0.0, 0.02]]))
    assert rng.low == 0.0 and rng.method == "bonferroni-t" and len(rng.parts) == 3
    assert pair_seeds([[0, 1, 2], [2, 1, 0, 3]]) == ([[0, 1, 2], [2, 1, 0]], "; 1 run(s) of seeds not shared by "
                                                                         "every size left out of the intervals")
    assert pair_seeds([[0, 1], [5, 6, 7]])[0] == [[0, 1], [0, 1]]


def test_long_table_of_seed_resolved_trajectories():
    from sharpscope.analysis.tables import to_long_table

    steps = np.array([0.0, 10.0])
    rows = to_long_table({64: (steps, np.array([[1.0, 2.0], [1.5, 2.5]])), 128: {7: (steps, [3.0, 4.0])}}, "sharpness")
    assert rows[0] == {"width": 64, "seed": 0, "step": 0, "quantity": "sharpness", "value": 1.0}
    assert [r["seed"] for r in rows] == [0, 0, 1, 1, 7, 7] and rows[-1]["width"] == 128
    with pytest.raises(ValueError, match="reuse"):
        to_long_table({64: (steps, [1.0, 2.0])}, "sharpness", seed=1)


def test_evidence_gives_each_interval_as_a_pair_and_its_method():
    spread = np.array([-0.1, 0.0, 0.1])
    ev = lr_transfer(seeds=seeded({64: -4 + spread, 256: -4.1 + spread})).evidence
    low, high = ev["shift_range_octaves_interval"]
    assert low == pytest.approx(0.1) == high and ev["intervals"]["shift_range_octaves"]["method"] == "bonferroni-t"
    assert ev["intervals"]["cost_relative"]["n"] == 3 and ev["interval"] == "90% bonferroni-t / mapped"
    assert ev["lr_opt_interval"][64][0] < 2.0 ** -4 < ev["lr_opt_interval"][64][1]
    steps = np.arange(0.0, 60.0, 10.0)
    cev = super_consistency(seeds={w: (steps, np.array([np.full(steps.size, w * (1 + o)) for o in spread]))
                                   for w in (64, 128, 256)}).evidence
    assert len(cev["spread_summary_interval"]) == 2 and cev["intervals"]["spread_summary"]["method"] == "jackknife-t"
    json.dumps(ev, allow_nan=False), json.dumps(cev, allow_nan=False)


def test_a_transferred_lr_that_diverges_decides_shifts_with_its_own_code():
    lrs = 2.0 ** GRID
    small = {s: {float(lr): 0.1 * (x + 3) ** 2 + 1 for lr, x in zip(lrs, GRID)} for s in range(3)}
    large = {s: {float(lr): (0.1 * (x + 4) ** 2 + 1 if x < -3 + (s == 0) else float("nan")) for lr, x in zip(lrs, GRID)}
             for s in range(3)}  # seeds 1 and 2 diverge at log2 lr -3, the smallest size's optimum
    r = lr_transfer(seeds={64: small, 256: large})
    assert r.verdict == "shifts" and r.code == "transfer-diverges" and math.isinf(r.cost), r.reason
