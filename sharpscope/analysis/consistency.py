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
  ``"undetermined"`` when no step of the window has >= 2 finite values.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np
from scipy import optimize, stats

from .trajectories import CommonSteps, Trajectory, Window, finite_or_none, nanmedian, on_common_steps, size_key, window_mask

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


@dataclass(frozen=True)
class AlphaFit:
    """Least-squares fit of ``log D_n = log C + log|n^-alpha - N^-alpha|`` (module docstring).

    alpha, stderr (NaN with < 1 residual dof), rmse (of the log residuals), amplitude C,
    sign (+1: the smaller sizes sit above the widest, -1: below), limit_ratio
    (lambda_inf / lambda_N, None unless alpha > 0), sizes used, at_bound (alpha hit the search
    interval [-8, 8]: the power law does not describe the data).
    """

    alpha: float
    stderr: float
    rmse: float
    amplitude: float
    sign: int
    limit_ratio: float | None
    sizes: tuple[float, ...]
    widest: float
    at_bound: bool


_ALPHA_BOUNDS = (-8.0, 8.0)


def _log_shape(alpha: float, n: np.ndarray, N: float) -> np.ndarray:
    """log|n^-a - N^-a| up to an n-independent constant (smooth through a = 0)."""
    delta = math.log(N) - np.log(n)  # > 0
    if abs(alpha) < 1e-12:
        return np.log(delta)
    return -alpha * math.log(N) + np.log(np.expm1(alpha * delta) / alpha)


def _alpha_input(sizes: Sequence[float], distances: Sequence[float], widest: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit_alpha`'s checked sizes and distances as arrays."""
    n = np.asarray(sizes, dtype=float)
    d = np.asarray(distances, dtype=float)
    if n.shape != d.shape or n.ndim != 1:
        raise ValueError(f"mismatched lengths: {n.size} sizes vs {d.size} distances")
    if n.size < 2:
        raise ValueError(f"alpha needs >= 2 sizes besides the widest (>= 3 in all), got {n.size}")
    if np.any(n >= widest) or np.any(n <= 0):
        raise ValueError("alpha: sizes must be positive and smaller than the widest")
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise ValueError("alpha: distances to the widest must be finite and > 0")
    return n, d


def _alpha_stderr(alpha: float, r: np.ndarray, n: np.ndarray, widest: float) -> float:
    """The standard error of the fitted alpha (linearised least squares; NaN with <= 2 sizes)."""
    m = n.size
    if m <= 2:
        return float("nan")
    h = 1e-6
    dg = (_log_shape(alpha + h, n, widest) - _log_shape(alpha - h, n, widest)) / (2 * h)
    J = np.column_stack([np.ones(m), dg])
    s2 = float(r @ r) / (m - 2)
    try:
        cov = s2 * np.linalg.inv(J.T @ J)
    except np.linalg.LinAlgError:
        return float("nan")
    return float(np.sqrt(max(cov[1, 1], 0.0)))


def fit_alpha(sizes: Sequence[float], distances: Sequence[float], widest: float,
              signed: Sequence[float] | None = None, widest_value: float | None = None) -> AlphaFit:
    """Fit the width-convergence exponent alpha to distances ``D_n`` of sizes n to the ``widest``.

    ``distances`` are relative distances to the widest (> 0, finite); ``signed`` (optional) the
    signed relative differences, used for the sign and the limit ratio; ``widest_value`` the
    widest's value (its sign enters the limit ratio). Needs >= 2 sizes below the widest.
    """
    n, d = _alpha_input(sizes, distances, widest)
    y = np.log(d)

    def ssr(a: float) -> float:
        g = _log_shape(a, n, widest)
        r = y - g
        r = r - r.mean()
        return float(r @ r)

    grid = np.linspace(*_ALPHA_BOUNDS, 1601)
    vals = np.array([ssr(a) for a in grid])
    k = int(np.argmin(vals))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    res = optimize.minimize_scalar(ssr, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    a0 = float(res.x) if res.fun <= vals[k] else float(grid[k])

    def resid(p):
        return y - p[0] - _log_shape(p[1], n, widest)

    c0 = float(np.mean(y - _log_shape(a0, n, widest)))
    if n.size >= 2:
        ls = optimize.least_squares(resid, x0=[c0, a0],
                                    bounds=([-np.inf, _ALPHA_BOUNDS[0]], [np.inf, _ALPHA_BOUNDS[1]]),
                                    xtol=1e-15, ftol=1e-15, gtol=1e-15)
        if float(ls.cost) * 2 <= ssr(a0) + 1e-300:
            c0, a0 = float(ls.x[0]), float(ls.x[1])
    alpha = a0
    r = resid([c0, alpha])
    rmse = float(np.sqrt(np.mean(r ** 2)))
    stderr = _alpha_stderr(alpha, r, n, widest)
    # amplitude C of d_n = C |n^-a - N^-a| (the fitted constant absorbs a factor 1/|a|)
    amplitude = float(math.exp(c0) * (abs(alpha) if abs(alpha) >= 1e-12 else 1.0))
    if abs(alpha) < 1e-12:
        amplitude = float("nan")
    sign = 1
    if signed is not None:
        sg = np.asarray(signed, dtype=float)
        if sg.shape != n.shape:
            raise ValueError(f"mismatched lengths: {n.size} sizes vs {sg.size} signed differences")
        sign = 1 if np.nansum(np.sign(sg)) >= 0 else -1
    limit = None
    if alpha > 0 and math.isfinite(amplitude):
        # delta_n = b (n^-a - N^-a), b = sign * C (for a > 0, n^-a - N^-a > 0);
        # lambda_inf / lambda_N = 1 - b N^-a * sign(lambda_N)
        sgn_N = 1.0 if widest_value is None or widest_value >= 0 else -1.0
        limit = float(1.0 - sign * amplitude * widest ** (-alpha) * sgn_N)
    at_bound = bool(min(abs(alpha - _ALPHA_BOUNDS[0]), abs(alpha - _ALPHA_BOUNDS[1])) < 1e-6)
    return AlphaFit(alpha=alpha, stderr=stderr, rmse=rmse, amplitude=amplitude, sign=sign,
                    limit_ratio=limit, sizes=tuple(float(x) for x in n), widest=float(widest),
                    at_bound=at_bound)


@dataclass(frozen=True, eq=False)
class ConsistencyResult:
    """Result of :func:`super_consistency`; every array is on ``steps`` (see module docstring).

    sizes (ascending), steps, values (sizes x steps), in_window (bool per step), spread_kind,
    spread (per step), spread_summary (window median), distance (sizes x steps, relative to the
    widest), distance_summary (per size, window median), signed_summary (window median of the
    signed relative difference), trend (Spearman per step), trend_summary (window median),
    trend_positive_fraction (share of window steps with trend > 0), alpha (AlphaFit or None),
    alpha_note (why alpha is None), thresholds, verdict, reason (one sentence with the numbers).
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

    @property
    def evidence(self) -> dict[str, Any]:
        """The numbers behind the verdict, JSON-friendly."""
        a = self.alpha
        return {
            "verdict": self.verdict, "reason": self.reason, "sizes": list(self.sizes),
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



def super_consistency(trajectories: Mapping[Any, Trajectory] | CommonSteps, *, window: Window = 0.25,
                      thresholds: ConsistencyThresholds | None = None, spread: str = "std",
                      on: Union[str, Sequence[float]] = "common", interpolate: bool = False) -> ConsistencyResult:
    """Is a quantity's trajectory the same across sizes at fixed lr? (Noci et al. 2024.)

    ``trajectories``: size -> (steps, values), or a :class:`~sharpscope.analysis.trajectories.CommonSteps`;
    put on common steps by :func:`~sharpscope.analysis.trajectories.on_common_steps` (``on``,
    ``interpolate``). ``window``: steps summarized (default 0.25 = skip the first quarter of the step
    range). ``spread``: ``"std"`` (default: std/mean across sizes; robust to the few-step oscillations at
    the edge of stability, where one width's spike would dominate a range) or ``"range"``
    ((max - min)/mean). Needs >= 2 sizes; alpha needs >= 3. Returns a :class:`ConsistencyResult` whose
    verdict is one of "consistent", "converging", "diverging-up", "diverging-down", "inconsistent" (or
    "undetermined" without data in the window), with the numbers that led to it.
    """
    th = thresholds if thresholds is not None else ConsistencyThresholds()
    if spread not in ("range", "std"):
        raise ValueError(f"spread must be 'range' or 'std', got {spread!r}")
    common = trajectories if isinstance(trajectories, CommonSteps) else \
        on_common_steps(trajectories, on, interpolate=interpolate)
    if len(common.sizes) < 2:
        raise ValueError(f"super consistency needs >= 2 sizes (widths/depths), got {len(common.sizes)}: "
                         f"{[size_key(s) for s in common.sizes]}")
    sizes = np.asarray(common.sizes)
    vals = common.values
    mask = window_mask(common.steps, window)
    spread_t = np.array([_spread(vals[:, j], spread) for j in range(vals.shape[1])])
    signed = _relative_to_widest(vals)
    dist = np.abs(signed)
    trend_t = np.array([_trend(sizes, vals[:, j]) for j in range(vals.shape[1])])
    spread_sum = float(nanmedian(spread_t[mask]))
    dist_sum = nanmedian(dist[:, mask], axis=1)
    signed_sum = nanmedian(signed[:, mask], axis=1)
    trend_w = trend_t[mask]
    trend_sum = float(nanmedian(trend_w))
    finite_tr = trend_w[np.isfinite(trend_w)]
    pos_frac = float(np.mean(finite_tr > 0)) if finite_tr.size else float("nan")
    alpha, note = _alpha_of(sizes, dist_sum, signed_sum, float(nanmedian(vals[-1][mask])))
    verdict, reason = _verdict(th, spread, spread_sum, alpha, trend_sum)
    return ConsistencyResult(
        sizes=common.sizes, steps=common.steps, values=vals, in_window=mask, spread_kind=spread, spread=spread_t,
        spread_summary=spread_sum, distance=dist, distance_summary=dist_sum, signed_summary=signed_sum,
        trend=trend_t, trend_summary=trend_sum, trend_positive_fraction=pos_frac, alpha=alpha,
        alpha_note=note, thresholds=th, verdict=verdict, reason=reason)


def _relative_to_widest(vals: np.ndarray) -> np.ndarray:
    r""":math:`\delta_n(t)` per size and step; 0 where the widest and the size are both 0, NaN where only it is."""
    ref = vals[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        signed = (vals - ref) / np.abs(ref)
    signed[:, ref == 0] = np.where(vals[:, ref == 0] == 0, 0.0, np.nan)
    return signed


def _alpha_of(sizes: np.ndarray, dist_sum: np.ndarray, signed_sum: np.ndarray,
              widest_val: float) -> tuple[AlphaFit | None, str]:
    """The alpha fit over the window medians, or None and why it was not fitted."""
    if sizes.size < 3:
        return None, f"alpha needs >= 3 sizes, got {sizes.size}"
    if sizes[0] <= 0:
        return None, "alpha needs positive sizes (n^-alpha); this axis holds 0 or less: a linear axis, no power law"
    if not np.all(np.isfinite(dist_sum[:-1])) or np.any(dist_sum[:-1] <= 0):
        bad = [size_key(s) for s, d in zip(sizes[:-1], dist_sum[:-1]) if not (np.isfinite(d) and d > 0)]
        return None, f"alpha not fitted: distance to the widest is zero or missing for sizes {bad}"
    alpha = fit_alpha(sizes[:-1], dist_sum[:-1], float(sizes[-1]), signed=signed_sum[:-1],
                      widest_value=widest_val if math.isfinite(widest_val) else None)
    return alpha, "" if not alpha.at_bound else "alpha hit the search bound: no power law in width"


def _verdict(th: ConsistencyThresholds, spread: str, spread_sum: float, alpha: AlphaFit | None,
             trend_sum: float) -> tuple[str, str]:
    """The verdict and its reason (the rules of the module docstring, in order)."""
    if not math.isfinite(spread_sum):
        return "undetermined", "no step in the window has >= 2 finite values"
    if spread_sum <= th.spread_max:
        return "consistent", f"median relative spread ({spread}) {spread_sum:.3g} <= {th.spread_max:g}"
    clear = (alpha is not None and not alpha.at_bound and alpha.alpha >= th.alpha_min
             and (not math.isfinite(alpha.stderr) or alpha.alpha - 2 * alpha.stderr > 0)
             and alpha.limit_ratio is not None and alpha.limit_ratio >= th.limit_min)
    if clear:
        assert alpha is not None
        error = (f" +- {alpha.stderr:.2g}" if math.isfinite(alpha.stderr)
                 else " (exact fit through 2 distances, no error estimate)")
        direction = ""
        if math.isfinite(trend_sum) and abs(trend_sum) >= th.trend_min:
            direction = f"; it {'grows' if trend_sum > 0 else 'falls'} with size (Spearman {trend_sum:.3g})"
        return "converging", (f"spread {spread_sum:.3g} > {th.spread_max:g} but the distance to the widest falls as "
                              f"n^-alpha, alpha = {alpha.alpha:.3g}{error} >= {th.alpha_min:g}, "
                              f"towards a limit {alpha.limit_ratio:.3g} x the widest's value{direction}")
    if math.isfinite(trend_sum) and trend_sum >= th.trend_min:
        return "diverging-up", f"spread {spread_sum:.3g} > {th.spread_max:g} and grows with size (Spearman {trend_sum:.3g})"
    if math.isfinite(trend_sum) and trend_sum <= -th.trend_min:
        return "diverging-down", (f"spread {spread_sum:.3g} > {th.spread_max:g} and shrinks with size "
                                  f"(Spearman {trend_sum:.3g})")
    return "inconsistent", (f"spread {spread_sum:.3g} > {th.spread_max:g} with no clear convergence or monotone "
                            f"trend (Spearman {trend_sum:.3g})")
