r"""Confidence intervals from seeds, and the three-way comparison of an interval with a threshold.

The method and its sources are in docs/science.md, section 6. In short, for ``n`` seeds at level ``1 - a``
(default 90%):

* :func:`mean_interval` -- **Student t on per-seed estimates** (the optimum in log2 lr of each seed's
  curve, an EoS tail ratio per seed): :math:`\bar x \pm t_{1-a/2,\,n-1}\, s/\sqrt n` (Student 1908).
  A per-seed value known only to a bracket ``[lo, hi]`` (a censored optimum) widens the interval to
  :math:`[\overline{lo} - t s/\sqrt n,\ \overline{hi} + t s/\sqrt n]`; an infinite end stays infinite.
* :func:`jackknife_interval` -- for a statistic that is a nonlinear function of the seed means (the
  spread across sizes, the convergence exponent alpha, the transfer cost): the leave-one-seed-out
  pseudo-values :math:`p_i = n T - (n-1) T_{(i)}` with the same t interval (Quenouille 1956; Tukey 1958).
  Their mean removes the :math:`O(1/n)` bias of :math:`T` (exactly, for a quadratic function of the means).
* :func:`range_interval` -- for the range over sizes of per-size means (the lr shift): paired t intervals
  of every pairwise difference at level :math:`1 - a/K` (``K`` pairs, Bonferroni; Dunn 1961); the range
  lies in :math:`[\max(0, \max_{ij} \max(L_{ij}, -U_{ij})),\ \max_{ij} \max(|L_{ij}|, |U_{ij}|)]` with
  probability :math:`\ge 1 - a`.

Not a percentile bootstrap: with 2-5 seeds it undercovers (too narrow by :math:`\sqrt{(n-1)/n}` and with
normal instead of t quantiles; tests/test_uncertainty.py measures it), and it has only
:math:`\binom{2n-1}{n}` distinct resamples.

:func:`side` compares an interval with a threshold: ``"below"`` (high <= threshold), ``"above"`` (low >
threshold) or ``"straddles"``; :func:`seeds_needed` projects, from the half-width's :math:`1/\sqrt n`
scaling (and the t quantile's fall with n), how many seeds would take a straddling interval clear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

__all__ = ["LEVEL", "CODES", "Interval", "mean_interval", "jackknife_interval", "range_interval", "side",
           "projected", "seeds_needed", "seeds_note", "check_level", "pair_seeds"]

LEVEL = 0.9  # the default confidence level of every interval

CODES = {
    "interval": "decided by a confidence interval over seeds that lies clear of the threshold",
    "no-interval": "one seed: a point verdict, no interval",
    "straddles": "interval straddles threshold: needs more seeds or a finer grid",
    "censored": "an optimum at a divergence edge is a bound, not a point, and the bound straddles the "
                "threshold: needs a finer lr grid near the edge",
    "grid-end": "an optimum at an end of the lr grid is a one-sided bound that does not decide: extend the grid",
    "all-diverged": "every run of a size diverged: no optimum",
    "cost-outside-grid": "the transferred lr falls outside the largest size's grid: no cost to compare",
    "transfer-diverges": "the smallest size's optimal lr diverges on the largest size (in at least one seed): an "
                         "infinite cost, no interval needed",
    "no-data": "no step of the window has >= 2 finite values",
    "not-analysed": "the check cannot apply to these runs (too few sizes or lrs, runs that cannot be compared)",
}
"""The reason codes of a verdict (``code`` in results and metrics.json) and what each means."""

_MAX_SEEDS = 10_000


def check_level(level: float) -> float:
    """A confidence level in (0, 1), or a ValueError naming the fix."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < float(level) < 1:
        raise ValueError(f"the confidence level must be a number in (0, 1), e.g. 0.9; got {level!r}")
    return float(level)


@lru_cache(maxsize=4096)
def _t(level: float, df: int) -> float:
    """The two-sided Student t quantile at ``level`` with ``df`` degrees of freedom."""
    return float(stats.t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    """A confidence interval over ``n`` seeds.

    estimate (its centre: a mean of per-seed values, or the jackknife's bias-corrected estimate), low,
    high (infinite for a one-sided bound), level, n, method (``"student-t"``, ``"jackknife-t"`` or
    ``"bonferroni-t"``), se (standard error; the per-seed spread is ``se * sqrt(n)``), quantile (the t
    quantile used), bracket (the centre as a range, (lo, hi), where censored per-seed values widen it;
    (estimate, estimate) otherwise), parts (the pairwise-difference intervals of a ``"bonferroni-t"``
    range; the interval a ``"mapped"`` one was mapped from), floor (the value the ends are clipped at, e.g.
    0 for a spread).
    """

    estimate: float
    low: float
    high: float
    level: float
    n: int
    method: str
    se: float
    quantile: float
    bracket: tuple[float, float]
    parts: tuple["Interval", ...] = ()
    floor: float = -math.inf

    @property
    def half_width(self) -> float:
        """The t part of the half-width, ``quantile * se`` (the bracket's width comes on top)."""
        return self.quantile * self.se

    def pair(self, transform: Callable[[float], float] | None = None) -> list:
        """``[low, high]`` for JSON (through ``transform``; an infinite end as "inf" / "-inf")."""
        ev = self.evidence(transform)
        return [ev["low"], ev["high"]]

    def evidence(self, transform: Callable[[float], float] | None = None) -> dict[str, Any]:
        """JSON-friendly: low, high, estimate (through ``transform``, e.g. 2**x for an lr), level, n,
        method; an infinite end is the string "inf" / "-inf"."""
        def num(x: float):
            y = transform(x) if transform is not None and math.isfinite(x) else x
            return y if math.isfinite(y) else ("inf" if y > 0 else "-inf" if y < 0 else None)
        return {"low": num(self.low), "high": num(self.high), "estimate": num(self.estimate),
                "level": self.level, "n": self.n, "method": self.method}


def _bracketed(lo: Sequence[float], hi: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-seed brackets as arrays (lo, hi) and each seed's representative value (its midpoint, or its
    finite end where the other is infinite) for the spread."""
    lo = np.asarray(lo, dtype=float)
    hi = lo.copy() if hi is None else np.asarray(hi, dtype=float)
    if lo.ndim != 1 or lo.shape != hi.shape:
        raise ValueError(f"per-seed values must be 1-D and match their brackets, got {lo.shape} and {hi.shape}")
    if np.any(np.isnan(lo)) or np.any(np.isnan(hi)) or np.any(lo > hi):
        raise ValueError("per-seed values must be numbers with lo <= hi (a missing seed is left out, not NaN)")
    both = np.isfinite(lo) & np.isfinite(hi)
    rep = np.where(both, 0.5 * (lo + hi), np.where(np.isfinite(lo), lo, hi))
    return lo, hi, rep


def mean_interval(values: Sequence[float], level: float = LEVEL, *, upper: Sequence[float] | None = None,
                  method: str = "student-t") -> Interval | None:
    """Student t interval of the mean of per-seed ``values`` (None with fewer than 2 seeds).

    ``upper``: where given, each seed's value is the bracket ``[values[i], upper[i]]`` (a censored
    estimate; -inf / inf for a one-sided bound); the interval runs from the mean of the lower ends minus
    ``t * s / sqrt(n)`` to the mean of the upper ends plus it, ``s`` the sample std of each seed's
    bracket midpoint (its finite end for a one-sided bound)."""
    level = check_level(level)
    lo, hi, rep = _bracketed(values, upper)
    n = lo.size
    if n < 2:
        return None
    finite = rep[np.isfinite(rep)]
    s = float(np.std(finite, ddof=1)) if finite.size >= 2 else float("inf")
    q = _t(level, n - 1)
    se = s / math.sqrt(n)
    c_lo, c_hi = float(np.mean(lo)), float(np.mean(hi))
    low = c_lo - q * se if math.isfinite(c_lo) else -math.inf
    high = c_hi + q * se if math.isfinite(c_hi) else math.inf
    estimate = float(np.mean(rep)) if np.all(np.isfinite(rep)) else float("nan")
    return Interval(estimate, float(low), float(high), level, n, method, se, q, (c_lo, c_hi))


def jackknife_interval(stat: Callable[[np.ndarray], float], n: int, level: float = LEVEL, *,
                       low_limit: float = -math.inf) -> Interval | None:
    """Jackknife t interval of ``stat`` over ``n`` seeds (None with fewer than 2, or when ``stat`` is not
    finite on all seeds or on every leave-one-out set).

    ``stat(keep)`` takes the indices of the seeds kept (an int array) and returns the statistic on them.
    Pseudo-values :math:`p_i = n T - (n-1) T_{(i)}`; interval ``mean(p) +- t_{n-1} sd(p) / sqrt(n)``,
    its ends clipped at ``low_limit`` (e.g. 0 for a spread)."""
    level = check_level(level)
    if n < 2:
        return None
    every = np.arange(n)
    whole = float(stat(every))
    loo = np.array([float(stat(np.delete(every, i))) for i in range(n)])
    if not (math.isfinite(whole) and np.all(np.isfinite(loo))):
        return None
    pseudo = n * whole - (n - 1) * loo
    q = _t(level, n - 1)
    est = float(np.mean(pseudo))
    se = float(np.std(pseudo, ddof=1)) / math.sqrt(n)
    low, high = max(est - q * se, low_limit), max(est + q * se, low_limit)
    return Interval(est, float(low), float(high), level, n, "jackknife-t", se, q, (est, est), floor=low_limit)


def range_interval(lows: np.ndarray, highs: np.ndarray | None = None, level: float = LEVEL) -> Interval | None:
    """Interval of the range ``max_i mu_i - min_i mu_i`` of the per-size means ``mu_i`` of paired per-seed
    values ``lows[i, s]`` (sizes x seeds; ``highs`` the upper ends of censored values) -- Bonferroni-adjusted
    paired t intervals of the ``K`` pairwise differences (module docstring); None with < 2 seeds or sizes."""
    level = check_level(level)
    lo = np.asarray(lows, dtype=float)
    hi = lo if highs is None else np.asarray(highs, dtype=float)
    if lo.ndim != 2 or lo.shape != hi.shape:
        raise ValueError(f"need per-size per-seed values as a 2-D array (sizes x seeds), got shape {lo.shape}")
    sizes, n = lo.shape
    if sizes < 2 or n < 2:
        return None
    pairs = [(i, j) for i in range(sizes) for j in range(i + 1, sizes)]
    adjusted = 1 - (1 - level) / len(pairs)
    parts = []
    for i, j in pairs:  # the difference mu_j - mu_i as a bracket per seed
        part = mean_interval(lo[j] - hi[i], adjusted, upper=hi[j] - lo[i])
        assert part is not None
        parts.append(part)
    low, high = _range_ends(parts)
    means = np.array([_bracketed(lo[i], hi[i])[2].mean() for i in range(sizes)])
    estimate = float(means.max() - means.min()) if np.all(np.isfinite(means)) else float("nan")
    return Interval(estimate, low, high, level, n, "bonferroni-t", float("nan"), float("nan"),
                    (estimate, estimate), tuple(parts))


def _range_ends(parts: Sequence[Interval]) -> tuple[float, float]:
    """The range's interval from the pairwise differences' intervals [L, U]: (max(0, max(L, -U)), max(|L|, |U|))."""
    return (float(max(max(p.low, -p.high, 0.0) for p in parts)),
            float(max(max(abs(p.low), abs(p.high)) for p in parts)))


def side(interval: Interval, threshold: float) -> str:
    """``"below"`` (high <= threshold), ``"above"`` (low > threshold) or ``"straddles"``."""
    if interval.high <= threshold:
        return "below"
    if interval.low > threshold:
        return "above"
    return "straddles"


def projected(interval: Interval, m: int) -> Interval:
    """The interval the same centre and per-seed spread would give with ``m`` seeds (the t quantile at m - 1
    degrees of freedom, the standard error times sqrt(n / m)); a range's parts each projected."""
    if interval.method == "bonferroni-t":
        parts = tuple(projected(p, m) for p in interval.parts)
        low, high = _range_ends(parts)
        return Interval(interval.estimate, low, high, interval.level, m, interval.method, interval.se,
                        interval.quantile, interval.bracket, parts)
    q = _t(interval.level, m - 1)
    se = interval.se * math.sqrt(interval.n / m)
    lo, hi = interval.bracket
    low, high = (lo - q * se if math.isfinite(lo) else -math.inf), (hi + q * se if math.isfinite(hi) else math.inf)
    return Interval(interval.estimate, float(max(low, interval.floor)), float(max(high, interval.floor)),
                    interval.level, m, interval.method, se, q, interval.bracket, interval.parts, interval.floor)


def seeds_needed(interval: Interval, threshold: float,
                 image: Callable[..., tuple[float, float]] | None = None) -> int | None:
    """How many seeds would take a straddling ``interval`` clear of ``threshold``, on the side where its
    centre lies, if the centre and the per-seed spread stayed as measured (:func:`projected`: a projection,
    not a promise); ``interval.n`` when it is clear already. None when the centre sits on the threshold or is
    unknown, when its censoring bracket straddles (a finer grid, not seeds, would decide), or when no
    number up to 10 000 does. ``image``: for an interval mapped from others (its ``parts``), the function
    from those (projected) to this one's (low, high)."""
    if side(interval, threshold) != "straddles":
        return interval.n
    if not math.isfinite(interval.estimate) or interval.estimate == threshold:
        return None
    if interval.method != "bonferroni-t" and interval.bracket[0] <= threshold <= interval.bracket[1]:
        return None
    below = interval.estimate < threshold

    def clear(m: int) -> bool:
        if image is not None:
            low, high = image(*(projected(part, m) for part in interval.parts))
        else:
            p = projected(interval, m)
            low, high = p.low, p.high
        return (below and high <= threshold) or (not below and low > threshold)

    # the projected interval shrinks as m grows: double until it clears, then bisect
    lo, hi = interval.n, interval.n + 1
    while not clear(hi):
        if hi >= _MAX_SEEDS:
            return None
        lo, hi = hi, min(2 * hi, _MAX_SEEDS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if clear(mid) else (mid, hi)
    return hi


def seeds_note(need: int | None) -> str:
    """The reason's words for :func:`seeds_needed`'s answer on a straddling interval: the seeds it suggests, or
    why it suggests none (so an undetermined verdict never leaves the reader without what would decide it)."""
    if need is not None:
        return f" (about {need} seeds by the interval's 1/sqrt(n) scaling)"
    return (f" (no seed count: at the measured centre and per-seed spread no number of seeds up to {_MAX_SEEDS:,} "
            "takes the interval clear -- it closes on a value at or next to the threshold; a finer lr grid or "
            "more seeds to re-centre it would decide)")


def pair_seeds(seed_sets: Sequence[Sequence[Any]]) -> tuple[list[list[int]], str]:
    """Which seed of each size goes with which: the indices, per size, of the seeds every size has (by
    id), and a note. Where fewer than 2 ids are shared but every size has >= 2 seeds, seeds are paired by
    position (runs of different sizes are independent, so any pairing gives a valid paired interval)."""
    common = set(seed_sets[0]).intersection(*map(set, seed_sets[1:])) if seed_sets else set()
    if len(common) >= 2 or min(map(len, seed_sets), default=0) < 2:
        order = sorted(common, key=repr)
        dropped = sum(len(s) for s in seed_sets) - len(order) * len(seed_sets)
        note = f"; {dropped} run(s) of seeds not shared by every size left out of the intervals" if dropped else ""
        return [[list(s).index(k) for k in order] for s in seed_sets], note
    m = min(map(len, seed_sets))
    return [list(range(m)) for _ in seed_sets], f"; seeds differ across sizes: paired by position ({m} pairs)"
