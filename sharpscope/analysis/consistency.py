r"""Super consistency (Noci et al., NeurIPS 2024, arXiv 2402.17457): is a quantity's trajectory the same
across sizes, and if not, does it converge with width?

The trajectory :math:`\lambda_n(t)` of the (preconditioned) sharpness is the same for all widths n.
For widths :math:`n_1 < \dots < n_W = N` at a step t (sizes, trajectories and windows as in
:mod:`sharpscope.analysis.trajectories`):

* relative spread ``spread(t)``: ``"std"`` (default):
  :math:`\mathrm{std}_n \lambda_n / \mathrm{mean}_n|\lambda_n|` (population std, ddof=0);
  ``"range"``: :math:`(\max_n \lambda_n - \min_n \lambda_n)/\mathrm{mean}_n|\lambda_n|`.
  Taken over the widths with a finite value (NaN if fewer than 2); 0 when all are equal.
* relative difference to the widest :math:`\delta_n(t) = (\lambda_n(t)-\lambda_N(t))/|\lambda_N(t)|`
  and relative distance :math:`d_n(t) = |\delta_n(t)|` (zero for the widest itself).
* trend ``trend(t)``: Spearman rank correlation (``scipy.stats.spearmanr``) between n and
  :math:`\lambda_n(t)` over the widths at step t (+1: grows with width, -1: shrinks; 0 when all
  values are equal; NaN with fewer than 2 finite values).
* width-convergence exponent alpha: if :math:`\lambda_n = \lambda_\infty + B n^{-\alpha}`, then
  :math:`d_n = C\,|n^{-\alpha} - N^{-\alpha}|` exactly. alpha and C are fitted by least squares
  on :math:`\log D_n = \log C + \log|n^{-\alpha} - N^{-\alpha}|` over the non-widest widths,
  where :math:`D_n` is the window median of :math:`d_n(t)`. This is the paper's
  "distance(n) ~ n^-alpha" fit, corrected for the widest width being finite (a plain
  log-log slope against the widest is biased; this form recovers alpha exactly on an exact power
  law). Needs >= 3 widths (>= 2 fit points); the stderr needs >= 4 widths (>= 1 residual dof).
  From the fit the extrapolated limit :math:`\lambda_\infty` relative to the widest,
  ``limit_ratio`` = :math:`\lambda_\infty/\lambda_N`, is reported (alpha > 0 only): ~1 means the
  curves converge to an O(1) trajectory; ~0 means the quantity vanishes with width (lazy/NTK).
* verdict (first rule that applies; thresholds in :class:`ConsistencyThresholds`):

  1. ``"consistent"``: window median of spread <= ``spread_max``;
  2. ``"converging"``: alpha fitted, ``alpha >= alpha_min``, ``alpha - 2 * stderr > 0`` (when the
     stderr exists), and ``limit_ratio >= limit_min`` (the limit is not zero);
  3. ``"diverging-up"`` / ``"diverging-down"``: window median of trend >= ``trend_min`` /
     <= ``-trend_min``;
  4. ``"inconsistent"``: the spread is large and has no monotone direction in width;
  ``"undetermined"`` when no step of the window has >= 2 finite values (code ``"no-data"``).
* with seeds (``seeds=``): the numbers above come from the seed-mean trajectories, and the spread and
  alpha get jackknife t intervals over seeds (:mod:`sharpscope.analysis.uncertainty`; docs/science.md,
  section 6). Rule 1 then needs the spread's interval at or below ``spread_max``, rules 2-4 need it above;
  an interval that straddles makes the verdict ``"undetermined"`` (code ``"straddles"``, with the seeds the
  interval suggests), as does alpha's interval straddling ``alpha_min`` where alpha decides. With one seed
  the verdict is the point's (code ``"no-interval"``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np
from scipy import stats

from .alpha import AlphaFit, fit_alpha
from .trajectories import (
    CommonSteps,
    Trajectory,
    Window,
    check_size,
    check_trajectory,
    finite_or_none,
    nanmedian,
    on_common_steps,
    seed_mean,
    size_key,
    split_seeds,
    window_mask,
)
from .uncertainty import CODES, LEVEL, Interval, check_level, jackknife_interval, pair_seeds, seeds_needed, seeds_note, side

__all__ = ["ConsistencyThresholds", "AlphaFit", "ConsistencyResult", "super_consistency", "fit_alpha"]


@dataclass(frozen=True)
class ConsistencyThresholds:
    """Verdict thresholds for :func:`super_consistency` (see the module docstring for the rules).

    spread_max: window-median relative spread at or below which the sizes are "consistent".
      Calibrated (std spread) on probe (b) (probes/README.md): muP 0.033-0.061 at every lr below
      the edge, NTK 0.25-0.41, SP 1.2-1.7 at lr >= 0.5 (0.08-0.11 at small lrs, where SP's width
      dependence shows in the trend and the lr shift instead).
    alpha_min: smallest alpha counted as converging (with ``alpha - 2*stderr > 0`` when known).
    limit_min: smallest extrapolated ``lambda_inf / lambda_widest`` counted as converging (below
      it the quantity vanishes with width: not converging).
    trend_min: |window-median Spearman trend| at or above which a direction is declared.
    """

    spread_max: float = 0.1
    alpha_min: float = 0.2
    limit_min: float = 0.5
    trend_min: float = 0.8

    def __post_init__(self):
        for name in ("spread_max", "alpha_min", "limit_min"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"threshold {name} must be finite and >= 0, got {getattr(self, name)}")
        if not (0 < self.trend_min <= 1):
            raise ValueError(f"threshold trend_min must be in (0, 1], got {self.trend_min}")


@dataclass(frozen=True, eq=False)
class ConsistencyResult:
    """Result of :func:`super_consistency`; every array is on ``steps`` (see module docstring).

    sizes (ascending), steps, values (sizes x steps), in_window (bool per step), spread_kind,
    spread (per step), spread_summary (window median), distance (sizes x steps, relative to the
    widest), distance_summary (per size, window median), signed_summary (window median of the
    signed relative difference), trend (Spearman per step), trend_summary (window median),
    trend_positive_fraction (share of window steps with trend > 0), alpha (AlphaFit or None),
    alpha_note (why alpha is None), thresholds, verdict, reason (one sentence with the numbers), code (one
    of :data:`~sharpscope.analysis.uncertainty.CODES`), and, from seeds: n_seeds (per size), n_paired,
    spread_interval, alpha_interval (jackknife t over seeds; None with one seed), level, seeds_suggested
    (for an interval that straddles its threshold), interval_note. ``values`` are the seed means.
    """

    sizes: tuple[float, ...]
    steps: np.ndarray
    values: np.ndarray
    in_window: np.ndarray
    spread_kind: str
    spread: np.ndarray
    spread_summary: float
    distance: np.ndarray
    distance_summary: np.ndarray
    signed_summary: np.ndarray
    trend: np.ndarray
    trend_summary: float
    trend_positive_fraction: float
    alpha: AlphaFit | None
    alpha_note: str
    thresholds: ConsistencyThresholds
    verdict: str
    reason: str
    code: str = "no-interval"
    n_seeds: dict[float, int] = field(default_factory=dict)
    n_paired: int = 1
    spread_interval: Interval | None = None
    alpha_interval: Interval | None = None
    level: float = LEVEL
    seeds_suggested: int | None = None
    interval_note: str = ""

    @property
    def interval_method(self) -> str:
        """How the verdict's numbers were bounded: the interval method, or "no interval"."""
        used = [iv for iv in (self.spread_interval, self.alpha_interval) if iv is not None]
        return f"{self.level:.0%} {used[0].method}" if used else "no interval"

    @property
    def evidence(self) -> dict[str, Any]:
        """The numbers behind the verdict, JSON-friendly: intervals as ``<key>_interval`` = [low, high], their
        method, level, seeds and centre under ``intervals``; ``interval`` names the method, or is "no interval"
        where one seed gave a point verdict."""
        a = self.alpha
        return {
            "verdict": self.verdict, "reason": self.reason, "code": self.code, "sizes": list(self.sizes),
            "window_steps": [float(self.steps[self.in_window][0]), float(self.steps[self.in_window][-1])],
            "spread_kind": self.spread_kind, "spread_summary": finite_or_none(self.spread_summary),
            "distance_summary": {size_key(s): finite_or_none(d) for s, d in zip(self.sizes, self.distance_summary)},
            "trend_summary": finite_or_none(self.trend_summary),
            "trend_positive_fraction": finite_or_none(self.trend_positive_fraction),
            "alpha": None if a is None else finite_or_none(a.alpha), "alpha_stderr": None if a is None else finite_or_none(a.stderr),
            "alpha_rmse": None if a is None else finite_or_none(a.rmse),
            "limit_ratio": None if a is None or a.limit_ratio is None else finite_or_none(a.limit_ratio),
            "alpha_note": self.alpha_note,
            "thresholds": {"spread_max": self.thresholds.spread_max, "alpha_min": self.thresholds.alpha_min,
                           "limit_min": self.thresholds.limit_min, "trend_min": self.thresholds.trend_min},
            "n_seeds": {size_key(s): n for s, n in self.n_seeds.items()}, "seeds_paired": self.n_paired,
            "interval": self.interval_method,
            "spread_summary_interval": None if self.spread_interval is None else self.spread_interval.pair(),
            "alpha_interval": None if self.alpha_interval is None else self.alpha_interval.pair(),
            "intervals": {name: iv.evidence() for name, iv in (("spread_summary", self.spread_interval),
                                                               ("alpha", self.alpha_interval)) if iv is not None},
            "seeds_suggested": self.seeds_suggested,
        }



def _spread(col: np.ndarray, kind: str) -> float:
    v = col[np.isfinite(col)]
    if v.size < 2:
        return float("nan")
    if np.all(v == v[0]):
        return 0.0
    denom = float(np.mean(np.abs(v)))
    num = float(v.max() - v.min()) if kind == "range" else float(np.std(v))
    return num / denom if denom > 0 else float("inf")


def _trend(sizes: np.ndarray, col: np.ndarray) -> float:
    ok = np.isfinite(col)
    if ok.sum() < 2:
        return float("nan")
    v = col[ok]
    if np.all(v == v[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(sizes[ok], v).statistic
    return float(rho)



def super_consistency(trajectories: Mapping[Any, Trajectory] | CommonSteps | None = None, *,
                      seeds: Mapping[Any, Any] | None = None, window: Window = 0.25,
                      thresholds: ConsistencyThresholds | None = None, spread: str = "std",
                      on: Union[str, Sequence[float]] = "common", interpolate: bool = False,
                      level: float = LEVEL) -> ConsistencyResult:
    """Is a quantity's trajectory the same across sizes at fixed lr? (Noci et al. 2024.)

    ``trajectories``: size -> (steps, values), or a :class:`~sharpscope.analysis.trajectories.CommonSteps`;
    put on common steps by :func:`~sharpscope.analysis.trajectories.on_common_steps` (``on``,
    ``interpolate``). Or, instead, ``seeds``: size -> the seed-resolved trajectories (a mapping seed ->
    (steps, values), or a pair (steps, values) with values 2-D, seeds x steps): the numbers then come
    from the seed means (on the steps every seed of a size has), and the spread and alpha get ``level``
    (default 90%) jackknife t intervals over seeds (:mod:`sharpscope.analysis.uncertainty`). ``window``:
    steps summarized (default 0.25 = skip the first quarter of the step range). ``spread``: ``"std"``
    (default: std/mean across sizes; robust to the few-step oscillations at the edge of stability, where
    one width's spike would dominate a range) or ``"range"`` ((max - min)/mean). Needs >= 2 sizes; alpha
    needs >= 3. Returns a :class:`ConsistencyResult` whose verdict is one of "consistent", "converging",
    "diverging-up", "diverging-down", "inconsistent" (or "undetermined": code "no-data" without data in the
    window, "straddles" when the spread's interval straddles ``spread_max``, or alpha's straddles
    ``alpha_min`` where it decides), with the numbers that led to it. With seeds, "consistent" needs the
    spread's interval at or below the threshold, the other verdicts its interval above.
    """
    th = thresholds if thresholds is not None else ConsistencyThresholds()
    level = check_level(level)
    if spread not in ("range", "std"):
        raise ValueError(f"spread must be 'range' or 'std', got {spread!r}")
    per_seed = None
    if seeds is not None:
        if trajectories is not None:
            raise ValueError("give the seed-mean trajectories or the per-seed ones (seeds=), not both")
        if not isinstance(seeds, Mapping) or not seeds:
            raise ValueError("seeds= needs a non-empty mapping size -> per-seed trajectories")
        per_seed = {k: {seed: check_trajectory(f"{k!r} (seed {seed!r})", tr) for seed, tr in split_seeds(k, v).items()}
                    for k, v in seeds.items()}
        trajectories = {k: seed_mean(list(c.values())) for k, c in per_seed.items()}
    elif trajectories is None:
        raise ValueError("need trajectories: super_consistency(trajectories) or super_consistency(seeds=per_seed)")
    common = trajectories if isinstance(trajectories, CommonSteps) else \
        on_common_steps(trajectories, on, interpolate=interpolate)
    if len(common.sizes) < 2:
        raise ValueError(f"super consistency needs >= 2 sizes (widths/depths), got {len(common.sizes)}: "
                         f"{[size_key(s) for s in common.sizes]}")
    sm = _summaries(common, window, spread)
    ivs = _SeedIntervals.of(per_seed, window, spread, on, interpolate, level) if per_seed else _SeedIntervals.none(common)
    verdict, reason, code, suggested = _verdict(th, spread, sm.spread_sum, sm.alpha, sm.trend_sum, ivs)
    return ConsistencyResult(
        sizes=common.sizes, steps=common.steps, values=common.values, in_window=sm.mask, spread_kind=spread,
        spread=sm.spread_t, spread_summary=sm.spread_sum, distance=sm.dist, distance_summary=sm.dist_sum,
        signed_summary=sm.signed_sum, trend=sm.trend_t, trend_summary=sm.trend_sum,
        trend_positive_fraction=sm.pos_frac, alpha=sm.alpha, alpha_note=sm.alpha_note, thresholds=th,
        verdict=verdict, reason=reason + ivs.note, code=code, n_seeds=ivs.n_seeds, n_paired=ivs.n_paired,
        spread_interval=ivs.spread, alpha_interval=ivs.alpha, level=level, seeds_suggested=suggested,
        interval_note=ivs.note)


@dataclass(frozen=True, eq=False)
class _Summary:
    """:func:`super_consistency`'s numbers on one set of trajectories (the seed means, or a leave-one-out set)."""

    mask: np.ndarray
    spread_t: np.ndarray
    spread_sum: float
    dist: np.ndarray
    dist_sum: np.ndarray
    signed_sum: np.ndarray
    trend_t: np.ndarray
    trend_sum: float
    pos_frac: float
    alpha: AlphaFit | None
    alpha_note: str


def _summaries(common: CommonSteps, window: Window, spread: str, full: bool = True) -> _Summary:
    """The spread, distances, alpha and the trend; without ``full`` (leave-one-out sets) no trend (NaN) and
    alpha without its final polish (:func:`~sharpscope.analysis.alpha.fit_alpha`)."""
    sizes = np.asarray(common.sizes)
    vals = common.values
    mask = window_mask(common.steps, window)
    spread_t = np.array([_spread(vals[:, j], spread) for j in range(vals.shape[1])])
    signed = _relative_to_widest(vals)
    dist = np.abs(signed)
    trend_t = np.array([_trend(sizes, vals[:, j]) if full else np.nan for j in range(vals.shape[1])])
    dist_sum = nanmedian(dist[:, mask], axis=1)
    signed_sum = nanmedian(signed[:, mask], axis=1)
    trend_w = trend_t[mask]
    finite_tr = trend_w[np.isfinite(trend_w)]
    pos_frac = float(np.mean(finite_tr > 0)) if finite_tr.size else float("nan")
    alpha, note = _alpha_of(sizes, dist_sum, signed_sum, float(nanmedian(vals[-1][mask])), polish=full)
    return _Summary(mask, spread_t, float(nanmedian(spread_t[mask])), dist, dist_sum, signed_sum, trend_t,
                    float(nanmedian(trend_w)), pos_frac, alpha, note)


@dataclass(frozen=True)
class _SeedIntervals:
    """The spread's and alpha's jackknife intervals over the seeds paired across sizes (none with one seed)."""

    n_seeds: dict[float, int]
    n_paired: int
    spread: Interval | None
    alpha: Interval | None
    note: str

    @classmethod
    def none(cls, common: CommonSteps) -> "_SeedIntervals":
        return cls({s: 1 for s in common.sizes}, 1, None, None, "")

    @classmethod
    def of(cls, per_seed: Mapping[Any, dict[Any, tuple[np.ndarray, np.ndarray]]], window: Window, spread: str,
           on: Any, interpolate: bool, level: float) -> "_SeedIntervals":
        keys = sorted(per_seed, key=check_size)
        n_seeds = {check_size(k): len(per_seed[k]) for k in keys}
        index, note = pair_seeds([list(per_seed[k]) for k in keys])
        n = len(index[0])
        curves = [[list(per_seed[k].values())[i] for i in idx] for k, idx in zip(keys, index)]
        cache: dict[tuple[int, ...], _Summary | None] = {}

        def summary(keep: np.ndarray) -> _Summary | None:
            key = tuple(int(i) for i in keep)
            if key not in cache:
                try:
                    means = {k: seed_mean([c[i] for i in key]) for k, c in zip(keys, curves)}
                    cache[key] = _summaries(on_common_steps(means, on, interpolate=interpolate), window, spread, full=False)
                except ValueError:  # a leave-one-out set without common steps or window data
                    cache[key] = None
            return cache[key]

        def spread_of(keep: np.ndarray) -> float:
            sm = summary(keep)
            return float("nan") if sm is None else sm.spread_sum

        def alpha_of(keep: np.ndarray) -> float:
            sm = summary(keep)
            return float("nan") if sm is None or sm.alpha is None or sm.alpha.at_bound else sm.alpha.alpha

        if n < 2:
            return cls(n_seeds, n, None, None, "" if max(n_seeds.values()) < 2 else
                       "; fewer than 2 seeds shared by every size: no interval")
        spread_iv = jackknife_interval(spread_of, n, level, low_limit=0.0)
        alpha_iv = jackknife_interval(alpha_of, n, level) if len(keys) >= 3 else None
        if spread_iv is None:
            note += "; the spread is not finite for every leave-one-seed-out set: no interval"
        elif spread_iv.high <= spread_iv.floor:  # the whole t interval fell below 0 and was clipped to 0..0
            note += ("; the spread's interval is 0..0 only after clipping: the jackknife's correction for seed noise "
                     f"(estimate {spread_iv.estimate:.3g}) exceeds the spread of the seed means, so the sizes differ by "
                     "no more than the seeds do")
        if alpha_iv is None and len(keys) >= 3:
            note += "; alpha is not fitted for every leave-one-seed-out set: no alpha interval"
        return cls(n_seeds, n, spread_iv, alpha_iv, note)


def _relative_to_widest(vals: np.ndarray) -> np.ndarray:
    r""":math:`\delta_n(t)` per size and step; 0 where the widest and the size are both 0, NaN where only it is."""
    ref = vals[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        signed = (vals - ref) / np.abs(ref)
    signed[:, ref == 0] = np.where(vals[:, ref == 0] == 0, 0.0, np.nan)
    return signed


def _alpha_of(sizes: np.ndarray, dist_sum: np.ndarray, signed_sum: np.ndarray,
              widest_val: float, polish: bool = True) -> tuple[AlphaFit | None, str]:
    """The alpha fit over the window medians, or None and why it was not fitted."""
    if sizes.size < 3:
        return None, f"alpha needs >= 3 sizes, got {sizes.size}"
    if sizes[0] <= 0:
        return None, "alpha needs positive sizes (n^-alpha); this axis holds 0 or less: a linear axis, no power law"
    if not np.all(np.isfinite(dist_sum[:-1])) or np.any(dist_sum[:-1] <= 0):
        bad = [size_key(s) for s, d in zip(sizes[:-1], dist_sum[:-1]) if not (np.isfinite(d) and d > 0)]
        return None, f"alpha not fitted: distance to the widest is zero or missing for sizes {bad}"
    alpha = fit_alpha(sizes[:-1], dist_sum[:-1], float(sizes[-1]), signed=signed_sum[:-1],
                      widest_value=widest_val if math.isfinite(widest_val) else None, polish=polish)
    return alpha, "" if not alpha.at_bound else "alpha hit the search bound: no power law in width"


def _converging(th: ConsistencyThresholds, alpha: AlphaFit | None, alpha_iv: Interval | None) -> str:
    """Rule 2 of the module docstring: "yes", "no" or "straddles" (alpha's interval straddles ``alpha_min``
    while every other condition holds)."""
    if not (alpha is not None and not alpha.at_bound and (not math.isfinite(alpha.stderr) or alpha.alpha - 2 * alpha.stderr > 0)
            and alpha.limit_ratio is not None and alpha.limit_ratio >= th.limit_min):
        return "no"
    if alpha_iv is None:
        return "yes" if alpha.alpha >= th.alpha_min else "no"
    where = side(alpha_iv, th.alpha_min)
    return {"above": "yes", "below": "no"}.get(where, "straddles")


def _interval_text(ivs: _SeedIntervals) -> str:
    parts = ([f"spread {ivs.spread.low:.3g}..{ivs.spread.high:.3g}"] if ivs.spread is not None else []) + (
        [f"alpha {ivs.alpha.low:.3g}..{ivs.alpha.high:.3g}"] if ivs.alpha is not None else [])
    if not parts:
        return "; no interval (one seed)" if ivs.n_paired < 2 else ""
    level = (ivs.spread or ivs.alpha).level  # type: ignore[union-attr]
    return f"; {level:.0%} interval over {ivs.n_paired} seeds: " + ", ".join(parts)


def _verdict(th: ConsistencyThresholds, spread: str, spread_sum: float, alpha: AlphaFit | None,
             trend_sum: float, ivs: _SeedIntervals) -> tuple[str, str, str, int | None]:
    """The verdict, its reason, code and suggested seeds (the rules of the module docstring, in order; with
    seeds, each threshold is compared with the interval)."""
    if not math.isfinite(spread_sum):
        return "undetermined", "no step in the window has >= 2 finite values", "no-data", None
    tag = "interval" if ivs.spread is not None else "no-interval"
    where = side(ivs.spread, th.spread_max) if ivs.spread is not None else \
        ("below" if spread_sum <= th.spread_max else "above")
    ints = _interval_text(ivs)
    if where == "below":
        return "consistent", f"median relative spread ({spread}) {spread_sum:.3g} <= {th.spread_max:g}{ints}", tag, None
    if where == "straddles":
        need = seeds_needed(ivs.spread, th.spread_max)  # type: ignore[arg-type]
        return "undetermined", (f"median relative spread ({spread}) {spread_sum:.3g} against {th.spread_max:g}{ints}; "
                                f"undetermined: {CODES['straddles']}" + seeds_note(need)), "straddles", need
    conv = _converging(th, alpha, ivs.alpha)
    if conv == "straddles":
        need = seeds_needed(ivs.alpha, th.alpha_min)  # type: ignore[arg-type]
        return "undetermined", (f"spread {spread_sum:.3g} > {th.spread_max:g}; alpha {alpha.alpha:.3g} against "  # type: ignore[union-attr]
                                f"{th.alpha_min:g} decides between converging and not{ints}; undetermined: "
                                f"{CODES['straddles']}" + seeds_note(need)), "straddles", need
    if conv == "yes":
        assert alpha is not None
        error = (f" +- {alpha.stderr:.2g}" if math.isfinite(alpha.stderr)
                 else " (exact fit through 2 distances, no error estimate)")
        direction = ""
        if math.isfinite(trend_sum) and abs(trend_sum) >= th.trend_min:
            direction = f"; it {'grows' if trend_sum > 0 else 'falls'} with size (Spearman {trend_sum:.3g})"
        return "converging", (f"spread {spread_sum:.3g} > {th.spread_max:g} but the distance to the widest falls as "
                              f"n^-alpha, alpha = {alpha.alpha:.3g}{error} >= {th.alpha_min:g}, "
                              f"towards a limit {alpha.limit_ratio:.3g} x the widest's value{direction}{ints}"), tag, None
    if math.isfinite(trend_sum) and trend_sum >= th.trend_min:
        return "diverging-up", (f"spread {spread_sum:.3g} > {th.spread_max:g} and grows with size "
                                f"(Spearman {trend_sum:.3g}){ints}"), tag, None
    if math.isfinite(trend_sum) and trend_sum <= -th.trend_min:
        return "diverging-down", (f"spread {spread_sum:.3g} > {th.spread_max:g} and shrinks with size "
                                  f"(Spearman {trend_sum:.3g}){ints}"), tag, None
    return "inconsistent", (f"spread {spread_sum:.3g} > {th.spread_max:g} with no clear convergence or monotone "
                            f"trend (Spearman {trend_sum:.3g}){ints}"), tag, None


