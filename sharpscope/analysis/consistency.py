r"""Super-consistency, edge-of-stability and learning-rate-transfer analysis (numpy/scipy only).

This module knows nothing of torch or plotting: it takes recorded numbers (trajectories of a
quantity per width, losses per (width, lr)) and returns frozen result objects that carry every
number behind their verdicts, for :mod:`sharpscope.analysis.plots` / the report to consume.

Conventions used throughout
---------------------------
* A *size* (the mapping key) is a positive finite number: the width n, or equally the depth L,
  or any other scale knob. "Widest" means the largest key.
* A *trajectory* is a pair ``(steps, values)`` of equal-length 1-D sequences. Steps may be
  optimizer steps, tokens or samples seen; they must be finite and distinct. Values may be NaN
  (a missing measurement or a diverged run); NaN is never silently replaced.
* A *window* selects the steps a summary is taken over, after warm-up:
  a float ``f`` in [0, 1) keeps steps t with ``t >= t_min + f * (t_max - t_min)`` (a fraction of
  the *step range*, not of the number of records, so log-spaced capture schedules are not
  dominated by early steps); a pair ``(start, stop)`` keeps ``start <= t <= stop``
  (either may be None for open). Default: ``0.25`` (the first quarter of training is warm-up).
* Summaries over a window are medians over steps (``nanmedian``): robust to the EoS
  oscillations of sharpness and to a few missing points.

Definitions (sources)
---------------------
Super consistency (Noci et al., NeurIPS 2024, arXiv 2402.17457): the trajectory
:math:`\lambda_n(t)` of the (preconditioned) sharpness is the same for all widths n.
For widths :math:`n_1 < \dots < n_W = N` at a step t:

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

Edge of stability (Cohen et al. 2021; Cohen et al. 2022 for adaptive methods): see
:func:`eos_threshold` and :func:`edge_of_stability`.

Learning-rate transfer (Yang et al. 2022 "Tensor Programs V"; Everett et al. 2024,
arXiv 2407.05872): see :func:`lr_transfer`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np
from scipy import optimize, stats

__all__ = [
    "Aligned", "align",
    "ConsistencyThresholds", "AlphaFit", "ConsistencyResult", "super_consistency", "fit_alpha",
    "eos_threshold", "EoSResult", "edge_of_stability",
    "LrOptimum", "TransferResult", "lr_optimum", "lr_transfer",
    "to_long_table",
]

Trajectory = tuple[Sequence[float], Sequence[float]]
Window = Union[float, tuple[Union[float, None], Union[float, None]]]


# ----------------------------------------------------------------------------------------------
# alignment
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Aligned:
    """Trajectories on common steps: ``values[i, j]`` is size ``sizes[i]`` at ``steps[j]``.

    ``sizes`` are sorted ascending (the last one is the widest); NaN marks a missing value.
    """

    sizes: tuple[float, ...]
    steps: np.ndarray
    values: np.ndarray

    def __iter__(self):  # allows ``sizes, steps, values = align(...)``
        return iter((self.sizes, self.steps, self.values))


def _positive(value: Any, name: str) -> float:
    """``value`` as a positive finite float, or a ValueError naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v


def _check_size(key: Any) -> float:
    """A value of the compared axis: any finite number (width, depth, batch size, a weight decay of 0...)."""
    try:
        v = float(key)
    except (TypeError, ValueError):
        raise ValueError(f"a size (a value of the compared axis) must be a number, got {key!r}") from None
    if isinstance(key, bool) or not math.isfinite(v):
        raise ValueError(f"a size (a value of the compared axis) must be a finite number, got {key!r}")
    return v


def _check_trajectory(key: Any, traj: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        steps, values = traj
    except (TypeError, ValueError):
        raise ValueError(f"trajectory for size {key!r} must be a pair (steps, values)") from None
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.ndim != 1 or v.ndim != 1:
        raise ValueError(f"trajectory for size {key!r}: steps and values must be 1-D")
    if s.shape != v.shape:
        raise ValueError(f"trajectory for size {key!r}: mismatched lengths, "
                         f"{s.size} steps vs {v.size} values")
    if s.size == 0:
        raise ValueError(f"trajectory for size {key!r} is empty")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"trajectory for size {key!r}: steps must be finite")
    order = np.argsort(s, kind="stable")
    s, v = s[order], v[order]
    if np.any(np.diff(s) == 0):
        raise ValueError(f"trajectory for size {key!r}: duplicate steps {np.unique(s[1:][np.diff(s) == 0])}")
    return s, v


def align(trajectories: Mapping[Any, Trajectory], on: Union[str, Sequence[float]] = "common",
          *, interpolate: bool = False) -> Aligned:
    """Put trajectories of one quantity, given per size, on common steps.

    ``on``: ``"common"`` — steps present in every trajectory (with ``interpolate=True``: every
    recorded step inside the overlap of all step ranges, the others' values linearly
    interpolated in step); ``"union"`` — every recorded step, NaN where a size has no value
    (with ``interpolate=True``: interpolated inside each trajectory's range, NaN outside);
    a sequence of steps — that grid, exact matches only unless ``interpolate=True``.
    Interpolation is linear in the step variable; a NaN neighbour gives NaN.
    Raises ValueError on an empty mapping, malformed trajectories or an empty result.
    """
    if not isinstance(trajectories, Mapping) or len(trajectories) == 0:
        raise ValueError("need a non-empty mapping size -> (steps, values)")
    items = sorted(((_check_size(k), k, traj) for k, traj in trajectories.items()), key=lambda x: x[0])
    sizes = tuple(x[0] for x in items)
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"duplicate sizes in {[x[1] for x in items]}")
    data = [_check_trajectory(k, traj) for _, k, traj in items]
    if isinstance(on, str):
        if on == "common":
            if interpolate:
                lo = max(s[0] for s, _ in data)
                hi = min(s[-1] for s, _ in data)
                allsteps = np.unique(np.concatenate([s for s, _ in data]))
                grid = allsteps[(allsteps >= lo) & (allsteps <= hi)]
            else:
                grid = data[0][0]
                for s, _ in data[1:]:
                    grid = np.intersect1d(grid, s)
            if grid.size == 0:
                raise ValueError("the trajectories have no common steps"
                                 + ("" if interpolate else " (try interpolate=True or on='union')"))
        elif on == "union":
            grid = np.unique(np.concatenate([s for s, _ in data]))
        else:
            raise ValueError(f"on must be 'common', 'union' or a sequence of steps, got {on!r}")
    else:
        grid = np.asarray(on, dtype=float)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
            raise ValueError("a step grid must be a non-empty 1-D sequence of finite steps")
        grid = np.unique(grid)
    values = np.full((len(sizes), grid.size), np.nan)
    for i, (s, v) in enumerate(data):
        if interpolate:
            inside = (grid >= s[0]) & (grid <= s[-1])
            values[i, inside] = np.interp(grid[inside], s, v)
            exact = np.isin(grid, s)  # keep recorded values bit-exact
            values[i, exact] = v[np.searchsorted(s, grid[exact])]
        else:
            idx = np.searchsorted(s, grid)
            idx_c = np.clip(idx, 0, s.size - 1)
            hit = s[idx_c] == grid
            values[i, hit] = v[idx_c[hit]]
    return Aligned(sizes, grid, values)


def _window_mask(steps: np.ndarray, window: Window, name: str = "window") -> np.ndarray:
    if isinstance(window, (int, float)) and not isinstance(window, bool):
        f = float(window)
        if not (0.0 <= f < 1.0):
            raise ValueError(f"{name} as a fraction must be in [0, 1), got {window}")
        lo = steps[0] + f * (steps[-1] - steps[0])
        mask = steps >= lo
    else:
        try:
            start, stop = window  # type: ignore[misc]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a fraction in [0, 1) or a (start, stop) step range, "
                             f"got {window!r}") from None
        mask = np.ones(steps.size, dtype=bool)
        if start is not None:
            mask &= steps >= float(start)
        if stop is not None:
            mask &= steps <= float(stop)
        if start is not None and stop is not None and float(start) > float(stop):
            raise ValueError(f"{name} start {start} is after its stop {stop}")
    if not mask.any():
        raise ValueError(f"{name} {window!r} contains no steps (steps span {steps[0]:g}..{steps[-1]:g})")
    return mask


def _nanmedian(x: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


# ----------------------------------------------------------------------------------------------
# super consistency
# ----------------------------------------------------------------------------------------------

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
            "spread_kind": self.spread_kind, "spread_summary": _f(self.spread_summary),
            "distance_summary": {_k(s): _f(d) for s, d in zip(self.sizes, self.distance_summary)},
            "trend_summary": _f(self.trend_summary),
            "trend_positive_fraction": _f(self.trend_positive_fraction),
            "alpha": None if a is None else _f(a.alpha), "alpha_stderr": None if a is None else _f(a.stderr),
            "alpha_rmse": None if a is None else _f(a.rmse),
            "limit_ratio": None if a is None or a.limit_ratio is None else _f(a.limit_ratio),
            "alpha_note": self.alpha_note,
            "thresholds": {"spread_max": self.thresholds.spread_max, "alpha_min": self.thresholds.alpha_min,
                           "limit_min": self.thresholds.limit_min, "trend_min": self.thresholds.trend_min},
        }


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _k(size: float):
    return int(size) if float(size).is_integer() else float(size)


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


def super_consistency(trajectories: Mapping[Any, Trajectory] | Aligned, *, window: Window = 0.25,
                      thresholds: ConsistencyThresholds | None = None, spread: str = "std",
                      on: Union[str, Sequence[float]] = "common", interpolate: bool = False) -> ConsistencyResult:
    """Is a quantity's trajectory the same across sizes at fixed lr? (Noci et al. 2024.)

    ``trajectories``: size -> (steps, values), or an :class:`Aligned`; aligned with
    :func:`align` (``on``, ``interpolate``). ``window``: steps summarized (module docstring;
    default 0.25 = skip the first quarter of the step range). ``spread``: ``"std"`` (default:
    std/mean across sizes; robust to the few-step oscillations at the edge of stability, where one
    width's spike would dominate a range) or ``"range"`` ((max - min)/mean). Needs >= 2 sizes;
    alpha needs >= 3. Returns a :class:`ConsistencyResult` whose verdict is one of "consistent", "converging",
    "diverging-up", "diverging-down", "inconsistent" (or "undetermined" without data in the window), with the
    numbers that led to it.
    """
    th = thresholds if thresholds is not None else ConsistencyThresholds()
    if spread not in ("range", "std"):
        raise ValueError(f"spread must be 'range' or 'std', got {spread!r}")
    al = trajectories if isinstance(trajectories, Aligned) else align(trajectories, on, interpolate=interpolate)
    if len(al.sizes) < 2:
        raise ValueError(f"super consistency needs >= 2 sizes (widths/depths), got {len(al.sizes)}: "
                         f"{[_k(s) for s in al.sizes]}")
    sizes = np.asarray(al.sizes)
    vals = al.values
    mask = _window_mask(al.steps, window)
    spread_t = np.array([_spread(vals[:, j], spread) for j in range(vals.shape[1])])
    ref = vals[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        signed = (vals - ref) / np.abs(ref)
    signed[:, ref == 0] = np.where(vals[:, ref == 0] == 0, 0.0, np.nan)
    dist = np.abs(signed)
    trend_t = np.array([_trend(sizes, vals[:, j]) for j in range(vals.shape[1])])
    spread_sum = float(_nanmedian(spread_t[mask]))
    dist_sum = _nanmedian(dist[:, mask], axis=1)
    signed_sum = _nanmedian(signed[:, mask], axis=1)
    trend_w = trend_t[mask]
    trend_sum = float(_nanmedian(trend_w))
    finite_tr = trend_w[np.isfinite(trend_w)]
    pos_frac = float(np.mean(finite_tr > 0)) if finite_tr.size else float("nan")

    alpha: AlphaFit | None = None
    if sizes.size < 3:
        note = f"alpha needs >= 3 sizes, got {sizes.size}"
    elif sizes[0] <= 0:
        note = "alpha needs positive sizes (n^-alpha); this axis holds 0 or less: a linear axis, no power law"
    elif not np.all(np.isfinite(dist_sum[:-1])) or np.any(dist_sum[:-1] <= 0):
        bad = [_k(s) for s, d in zip(sizes[:-1], dist_sum[:-1]) if not (np.isfinite(d) and d > 0)]
        note = f"alpha not fitted: distance to the widest is zero or missing for sizes {bad}"
    else:
        widest_val = float(_nanmedian(ref[mask]))
        alpha = fit_alpha(sizes[:-1], dist_sum[:-1], float(sizes[-1]), signed=signed_sum[:-1],
                          widest_value=widest_val if math.isfinite(widest_val) else None)
        note = "" if not alpha.at_bound else "alpha hit the search bound: no power law in width"

    if not math.isfinite(spread_sum):
        verdict, reason = "undetermined", "no step in the window has >= 2 finite values"
    elif spread_sum <= th.spread_max:
        verdict = "consistent"
        reason = f"median relative spread ({spread}) {spread_sum:.3g} <= {th.spread_max:g}"
    else:
        clear = (alpha is not None and not alpha.at_bound and alpha.alpha >= th.alpha_min
                 and (not math.isfinite(alpha.stderr) or alpha.alpha - 2 * alpha.stderr > 0)
                 and alpha.limit_ratio is not None and alpha.limit_ratio >= th.limit_min)
        if clear:
            assert alpha is not None
            verdict = "converging"
            error = (f" +- {alpha.stderr:.2g}" if math.isfinite(alpha.stderr)
                     else " (exact fit through 2 distances, no error estimate)")
            direction = ""
            if math.isfinite(trend_sum) and abs(trend_sum) >= th.trend_min:
                direction = f"; it {'grows' if trend_sum > 0 else 'falls'} with size (Spearman {trend_sum:.3g})"
            reason = (f"spread {spread_sum:.3g} > {th.spread_max:g} but the distance to the widest falls as "
                      f"n^-alpha, alpha = {alpha.alpha:.3g}{error} >= {th.alpha_min:g}, "
                      f"towards a limit {alpha.limit_ratio:.3g} x the widest's value{direction}")
        elif math.isfinite(trend_sum) and trend_sum >= th.trend_min:
            verdict = "diverging-up"
            reason = f"spread {spread_sum:.3g} > {th.spread_max:g} and grows with size (Spearman {trend_sum:.3g})"
        elif math.isfinite(trend_sum) and trend_sum <= -th.trend_min:
            verdict = "diverging-down"
            reason = f"spread {spread_sum:.3g} > {th.spread_max:g} and shrinks with size (Spearman {trend_sum:.3g})"
        else:
            verdict = "inconsistent"
            reason = (f"spread {spread_sum:.3g} > {th.spread_max:g} with no clear convergence or monotone "
                      f"trend (Spearman {trend_sum:.3g})")
    return ConsistencyResult(
        sizes=al.sizes, steps=al.steps, values=vals, in_window=mask, spread_kind=spread, spread=spread_t,
        spread_summary=spread_sum, distance=dist, distance_summary=dist_sum, signed_summary=signed_sum,
        trend=trend_t, trend_summary=trend_sum, trend_positive_fraction=pos_frac, alpha=alpha,
        alpha_note=note, thresholds=th, verdict=verdict, reason=reason)


# ----------------------------------------------------------------------------------------------
# edge of stability
# ----------------------------------------------------------------------------------------------

def _check_lr(lr: Any, name: str = "lr") -> float:
    return _positive(lr, name)


def eos_threshold(optimizer: str, lr: float, momentum: float = 0.0, beta1: float = 0.9, *,
                  dampening: float = 0.0, nesterov: bool = False) -> float:
    r"""Edge-of-stability value of the (preconditioned) sharpness from recorded hyper-parameters.

    * ``"sgd"``/``"gd"`` (Cohen et al. 2021): :math:`2/\eta`; heavy-ball momentum :math:`\mu`:
      :math:`(2+2\mu)/\eta` (with dampening d: :math:`(2+2\mu)/((1-d)\eta)`); Nesterov:
      :math:`(2+2\mu)/((1+2\mu)\eta)`.
    * ``"adam"``/``"adamw"`` (Cohen et al. 2022): :math:`(2+2\beta_1)/((1-\beta_1)\eta)`
      (38/eta for beta1 = 0.9), for the Adam-preconditioned sharpness; ``"adam-atan2"`` the same for
      its linearized preconditioner (see :mod:`sharpscope.preconditioning`).
    * ``"adafactor"`` (no momentum): :math:`2/\eta`.

    Same formulas as the torch-side :func:`sharpscope.stability_threshold` (which reads an
    optimizer object). With per-layer lrs, ``lr`` is the reference lr the lr-weighted Hessian was
    scaled to.
    """
    eta = _check_lr(lr)
    name = str(optimizer).lower()
    for nm, val, hi in (("momentum", momentum, 1.0), ("beta1", beta1, 1.0), ("dampening", dampening, 1.0)):
        if not (0.0 <= float(val) < hi):
            raise ValueError(f"{nm} must be in [0, 1), got {val}")
    if name in ("sgd", "gd"):
        mu = float(momentum)
        if mu == 0.0:
            return 2.0 / eta
        if nesterov:
            return (2.0 + 2.0 * mu) / ((1.0 + 2.0 * mu) * eta)
        return (2.0 + 2.0 * mu) / ((1.0 - float(dampening)) * eta)
    if name in ("adam", "adamw", "adam-atan2", "adam_atan2", "adamatan2"):
        b = float(beta1)
        return (2.0 + 2.0 * b) / ((1.0 - b) * eta)
    if name == "adafactor":
        return 2.0 / eta
    raise ValueError(f"unknown optimizer {optimizer!r}: expected 'sgd', 'gd', 'adam', 'adamw', 'adam-atan2' or "
                     "'adafactor'")


@dataclass(frozen=True, eq=False)
class EoSResult:
    """Result of :func:`edge_of_stability`.

    steps, ratio (sharpness / threshold per step), threshold (per step), fraction, first_step
    (first step with ratio >= fraction, None if never), tail_steps (first, last step of the tail),
    tail_mean (mean ratio over the tail, NaN ignored), tail_fraction_above (share of tail steps
    with ratio >= fraction).
    """

    steps: np.ndarray
    ratio: np.ndarray
    threshold: np.ndarray
    fraction: float
    first_step: float | None
    tail_steps: tuple[float, float]
    tail_mean: float
    tail_fraction_above: float


def edge_of_stability(steps: Sequence[float], sharpness: Sequence[float],
                      threshold: float | Sequence[float], *, fraction: float = 0.9,
                      tail: Window = 0.8) -> EoSResult:
    """Ratio of sharpness to its edge-of-stability threshold along training (Cohen et al. 2021/2022).

    ``threshold``: a positive number (e.g. from :func:`eos_threshold`) or one per step (lr
    schedules). ``fraction``: the ratio counted as "at the edge" (default 0.9). ``tail``: the
    steps averaged, same convention as a window (default 0.8: the last 20% of the step range).
    """
    s, v = _check_trajectory("sharpness", (steps, sharpness))
    order = np.argsort(np.asarray(steps, dtype=float), kind="stable")
    th = np.asarray(threshold, dtype=float)
    if th.ndim == 0:
        th = np.full(s.size, float(th))
    elif th.shape != (s.size,):
        raise ValueError(f"mismatched lengths: {s.size} steps vs {th.size} thresholds")
    else:
        th = th[order]
    if not np.all(np.isfinite(th)) or np.any(th <= 0):
        raise ValueError("the EoS threshold must be positive and finite (is the lr > 0?)")
    if not (math.isfinite(fraction) and fraction > 0):
        raise ValueError(f"fraction must be positive, got {fraction}")
    ratio = v / th
    hit = np.nonzero(ratio >= fraction)[0]
    first = float(s[hit[0]]) if hit.size else None
    mask = _window_mask(s, tail, "tail")
    tr = ratio[mask]
    fin = tr[np.isfinite(tr)]
    tail_mean = float(fin.mean()) if fin.size else float("nan")
    above = float(np.mean(fin >= fraction)) if fin.size else float("nan")
    return EoSResult(steps=s, ratio=ratio, threshold=th, fraction=float(fraction), first_step=first,
                     tail_steps=(float(s[mask][0]), float(s[mask][-1])), tail_mean=tail_mean,
                     tail_fraction_above=above)


# ----------------------------------------------------------------------------------------------
# learning-rate transfer
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class LrOptimum:
    """Optimal lr of one size (see :func:`lr_optimum`).

    size, lrs (ascending grid), losses (NaN/inf kept), diverged_lrs, n_diverged, best_lr (the
    best finite grid point), lr_opt, log2_lr_opt, loss_opt, method ("quadratic", "grid-edge",
    "flat" or "all-diverged"), at_grid_edge, edge (None, "low" or "high"), edge_cause (None,
    "grid-end": the true optimum may lie outside the grid, or "diverged": the best point is bounded
    by a diverged neighbour, a genuine optimum at the divergence edge, known to one grid step), note.
    """

    size: float
    lrs: np.ndarray
    losses: np.ndarray
    diverged_lrs: tuple[float, ...]
    n_diverged: int
    best_lr: float | None
    lr_opt: float | None
    log2_lr_opt: float | None
    loss_opt: float | None
    method: str
    at_grid_edge: bool
    edge: str | None
    note: str
    edge_cause: str | None = None


def _vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Parabola through 3 points: (curvature a, vertex x*, value at x*) by divided differences."""
    f01 = (y[1] - y[0]) / (x[1] - x[0])
    f12 = (y[2] - y[1]) / (x[2] - x[1])
    a = (f12 - f01) / (x[2] - x[0])
    if a <= 0:
        return float(a), float("nan"), float("nan")
    xs = 0.5 * (x[0] + x[1]) - f01 / (2 * a)
    ys = y[0] + f01 * (xs - x[0]) + a * (xs - x[0]) * (xs - x[1])
    return float(a), float(xs), float(ys)


def _check_curve(size: Any, curve: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(size, (int, float)) and math.isfinite(float(size)):
        size = _k(size)
    if isinstance(curve, Mapping):
        if len(curve) == 0:
            raise ValueError(f"size {size!r}: empty lr grid")
        pairs = [(_check_lr(k, f"lr of size {size!r}"), float(v)) for k, v in curve.items()]
        lrs = np.array([p[0] for p in pairs])
        losses = np.array([p[1] for p in pairs])
    else:
        try:
            a, b = curve
        except (TypeError, ValueError):
            raise ValueError(f"size {size!r}: give a mapping lr -> loss or a pair (lrs, losses)") from None
        lrs = np.asarray(a, dtype=float)
        losses = np.asarray(b, dtype=float)
        if lrs.ndim != 1 or losses.ndim != 1 or lrs.size != losses.size:
            raise ValueError(f"size {size!r}: mismatched lengths, {np.size(lrs)} lrs vs {np.size(losses)} losses")
        if lrs.size == 0:
            raise ValueError(f"size {size!r}: empty lr grid")
        for x in lrs:
            _check_lr(x, f"lr of size {size!r}")
    order = np.argsort(lrs)
    lrs, losses = lrs[order], losses[order]
    if np.any(np.diff(lrs) == 0):
        raise ValueError(f"size {size!r}: duplicate lrs in the grid")
    return lrs, losses


def lr_optimum(lrs_losses: Mapping[float, float] | tuple[Sequence[float], Sequence[float]],
               size: float = float("nan")) -> LrOptimum:
    """Optimal lr of one size from its loss-vs-lr grid.

    Non-finite losses (NaN, +-inf) are diverged runs: counted and listed, never dropped silently.
    The optimum is the vertex of the parabola through the best finite grid point and its two grid
    neighbours in x = log2(lr) (exact for a loss quadratic in log2 lr; the grid need not be
    uniform). When the best point is at the grid's end, or next to a diverged run, no bracket
    exists: the grid point is reported with ``at_grid_edge=True`` and ``edge`` "low"/"high".
    """
    lrs, losses = _check_curve(size, lrs_losses)
    fin = np.isfinite(losses)
    div = tuple(float(x) for x in lrs[~fin])
    base = dict(size=float(size), lrs=lrs, losses=losses, diverged_lrs=div, n_diverged=len(div))
    if not fin.any():
        return LrOptimum(**base, best_lr=None, lr_opt=None, log2_lr_opt=None, loss_opt=None,
                         method="all-diverged", at_grid_edge=False, edge=None,
                         note=f"all {lrs.size} runs diverged")
    masked = np.where(fin, losses, np.inf)
    i = int(np.argmin(masked))
    x = np.log2(lrs)
    best = float(lrs[i])
    low_edge = i == 0 or not fin[i - 1]
    high_edge = i == lrs.size - 1 or not fin[i + 1]
    if low_edge or high_edge:
        edge = "low" if low_edge else "high"
        why = []
        if i == 0 or i == lrs.size - 1:
            why.append("the grid's end")
        if (i > 0 and not fin[i - 1]) or (i < lrs.size - 1 and not fin[i + 1]):
            why.append("a diverged neighbour")
        if low_edge and high_edge:
            edge = "low" if i == 0 or not fin[i - 1] else "high"
        cause = "grid-end" if (i == 0 or i == lrs.size - 1) else "diverged"
        return LrOptimum(**base, best_lr=best, lr_opt=best, log2_lr_opt=float(x[i]), loss_opt=float(losses[i]),
                         method="grid-edge", at_grid_edge=True, edge=edge, edge_cause=cause,
                         note=f"best lr {best:g} is at {' and '.join(why)}: extend the grid ({edge} side)")
    a, xs, ys = _vertex(x[i - 1:i + 2], losses[i - 1:i + 2])
    if not math.isfinite(xs):
        return LrOptimum(**base, best_lr=best, lr_opt=best, log2_lr_opt=float(x[i]), loss_opt=float(losses[i]),
                         method="flat", at_grid_edge=False, edge=None,
                         note="loss is flat around the best grid point: grid value reported")
    return LrOptimum(**base, best_lr=best, lr_opt=float(2.0 ** xs), log2_lr_opt=xs, loss_opt=ys,
                     method="quadratic", at_grid_edge=False, edge=None, note="")


def _interp_loss(opt: LrOptimum, x: float) -> tuple[float, str]:
    """Loss of a size's curve at log2 lr = x: local quadratic through 3 finite grid points
    bracketing x (linear with only 2); inf if x is next to a diverged run; NaN outside the grid."""
    lx = np.log2(opt.lrs)
    y = opt.losses
    if x < lx[0] - 1e-12 or x > lx[-1] + 1e-12:
        return float("nan"), "outside the grid"
    near = int(np.argmin(np.abs(lx - x)))
    if abs(lx[near] - x) < 1e-12:  # on a grid point: its own value
        if not np.isfinite(y[near]):
            return float("inf"), "diverged at that lr"
        return float(y[near]), "grid point"
    j = int(np.clip(np.searchsorted(lx, x, side="right") - 1, 0, lx.size - 2))
    k = j + 1
    if not (np.isfinite(y[j]) and np.isfinite(y[k])):
        return float("inf"), "next to a diverged run"
    cands = [t for t in ((j - 1, j, k), (j, k, k + 1))
             if t[0] >= 0 and t[2] < lx.size and np.all(np.isfinite(y[list(t)]))]
    if cands:
        t = min(cands, key=lambda t: abs(0.5 * (lx[t[0]] + lx[t[2]]) - x))
        xx, yy = lx[list(t)], y[list(t)]
        f01 = (yy[1] - yy[0]) / (xx[1] - xx[0])
        f12 = (yy[2] - yy[1]) / (xx[2] - xx[1])
        a = (f12 - f01) / (xx[2] - xx[0])
        return float(yy[0] + f01 * (x - xx[0]) + a * (x - xx[0]) * (x - xx[1])), "quadratic"
    w = (x - lx[j]) / (lx[k] - lx[j])
    return float((1 - w) * y[j] + w * y[k]), "linear"


@dataclass(frozen=True, eq=False)
class TransferResult:
    """Result of :func:`lr_transfer`.

    optima (LrOptimum per size, ascending), shifts (log2(lr_opt(n)/lr_opt(smallest)) per size,
    octaves; None where undetermined), shift_range (max - min of shifts), transfer_lr (the
    smallest size's optimum), cost (loss of the largest size at transfer_lr minus its optimal
    loss), cost_relative (cost / |largest optimal loss|), cost_note, n_diverged (per size),
    shift_max, cost_max, verdict ("transfers", "shifts" or "undetermined"), reason.
    """

    optima: tuple[LrOptimum, ...]
    shifts: dict[float, float | None]
    shift_range: float
    transfer_lr: float | None
    cost: float
    cost_relative: float
    cost_note: str
    n_diverged: dict[float, int]
    shift_max: float
    cost_max: float
    verdict: str
    reason: str

    @property
    def evidence(self) -> dict[str, Any]:
        """The numbers behind the verdict, JSON-friendly."""
        return {
            "verdict": self.verdict, "reason": self.reason,
            "lr_opt": {_k(o.size): o.lr_opt for o in self.optima},
            "at_grid_edge": {_k(o.size): o.at_grid_edge for o in self.optima},
            "shift_octaves": {_k(s): v for s, v in self.shifts.items()},
            "shift_range_octaves": _f(self.shift_range), "transfer_lr": self.transfer_lr,
            "cost": _f(self.cost) if not math.isinf(self.cost) else "inf",
            "cost_relative": _f(self.cost_relative) if not math.isinf(self.cost_relative) else "inf",
            "cost_note": self.cost_note, "n_diverged": {_k(s): n for s, n in self.n_diverged.items()},
            "shift_max": self.shift_max, "cost_max": self.cost_max,
        }

    def rows(self) -> list[dict[str, Any]]:
        """Long table of the grids: one dict (size, lr, loss, diverged) per run."""
        return [{"size": _k(o.size), "lr": float(lr), "loss": float(loss), "diverged": not math.isfinite(loss)}
                for o in self.optima for lr, loss in zip(o.lrs, o.losses)]


def lr_transfer(losses: Mapping[Any, Mapping[float, float] | tuple[Sequence[float], Sequence[float]]], *,
                shift_max: float = 0.5, cost_max: float = 0.05) -> TransferResult:
    """Does the optimal learning rate transfer across sizes? (muP: Yang et al. 2022.)

    ``losses``: size -> (mapping lr -> final or tail-averaged training loss, or a pair
    (lrs, losses)); NaN/inf = diverged. Per size the optimum comes from :func:`lr_optimum`.

    * shift of size n (octaves): ``log2(lr_opt(n) / lr_opt(n_smallest))``; ``shift_range`` =
      max - min over sizes.
    * cost of transferring: the largest size's loss at the smallest size's optimal lr
      (interpolated on the largest size's curve in log2 lr: local quadratic through 3 finite grid
      points, linear with 2; +inf if that lr sits next to a diverged run; NaN outside the grid)
      minus the largest size's optimal loss, clipped at 0 (an interpolation that dips below the
      fitted optimum measures no cost); ``cost_relative`` divides by |that optimal loss|.
    * verdict: "transfers" if shift_range <= ``shift_max`` (default 0.5 octave) and
      cost_relative <= ``cost_max`` (default 0.05); "shifts" otherwise; "undetermined" when a
      size's runs all diverged, when a size's best lr is at an end of its grid (the optimum may
      lie outside: extend the grid; the numbers are reported anyway), or when the transferred lr
      falls outside the largest size's grid. A best lr bounded by a diverged neighbour is a
      genuine optimum at the divergence edge (flagged, known to one grid step) and does not
      block the verdict.
    Needs >= 2 sizes.
    """
    items = _transfer_items(losses, shift_max, cost_max)
    optima = tuple(lr_optimum(curve, size=s) for s, curve in items)
    ndiv = {o.size: o.n_diverged for o in optima}
    dead = [_k(o.size) for o in optima if o.method == "all-diverged"]
    small, large = optima[0], optima[-1]
    shifts: dict[float, float | None] = {}
    for o in optima:
        shifts[o.size] = (None if o.log2_lr_opt is None or small.log2_lr_opt is None
                          else o.log2_lr_opt - small.log2_lr_opt)
    known = [v for v in shifts.values() if v is not None]
    known_opt = [o.log2_lr_opt for o in optima if o.log2_lr_opt is not None]
    shift_range = float(max(known_opt) - min(known_opt)) if len(known_opt) >= 2 else float("nan")
    cost, cost_rel, cnote = float("nan"), float("nan"), ""
    if small.log2_lr_opt is not None and large.loss_opt is not None:
        at, cnote = _interp_loss(large, small.log2_lr_opt)
        cost = at - large.loss_opt
        if cost < 0:  # the interpolating parabola dips below the fitted optimum: no measurable cost
            cost, cnote = 0.0, f"{cnote}; below the fitted optimum by {-cost:.3g}, clipped to 0"
        cost_rel = cost / abs(large.loss_opt) if large.loss_opt != 0 else (0.0 if cost == 0 else float("inf"))
    div_note = ", ".join(f"{_k(o.size)}: {o.n_diverged}/{o.lrs.size}" for o in optima if o.n_diverged)
    div_note = f"; diverged runs per size {div_note}" if div_note else ""
    if dead:
        verdict = "undetermined"
        reason = f"all runs diverged for sizes {dead}: no optimum to compare" + div_note
    elif not known or not math.isfinite(shift_range):
        verdict, reason = "undetermined", "fewer than 2 sizes have an optimum" + div_note
    else:
        verdict, reason = _transfer_verdict(optima, shift_range, cost, cost_rel, cnote, shift_max, cost_max)
        reason += div_note
    return TransferResult(optima=optima, shifts=shifts, shift_range=shift_range,
                          transfer_lr=small.lr_opt, cost=float(cost), cost_relative=float(cost_rel),
                          cost_note=cnote, n_diverged=ndiv, shift_max=float(shift_max),
                          cost_max=float(cost_max), verdict=verdict, reason=reason)


def _transfer_items(losses: Any, shift_max: float, cost_max: float) -> list[tuple[float, Any]]:
    """:func:`lr_transfer`'s checked input: (size, curve) sorted by size."""
    if not isinstance(losses, Mapping):
        raise ValueError("need a mapping size -> {lr: loss}")
    if len(losses) < 2:
        raise ValueError(f"lr transfer needs >= 2 sizes, got {len(losses)}")
    if not (math.isfinite(shift_max) and shift_max >= 0 and math.isfinite(cost_max) and cost_max >= 0):
        raise ValueError(f"shift_max and cost_max must be finite and >= 0, got {shift_max}, {cost_max}")
    items = sorted(((_check_size(k), v) for k, v in losses.items()), key=lambda t: t[0])
    if len({s for s, _ in items}) != len(items):
        raise ValueError("duplicate sizes")
    return items


def _transfer_verdict(optima: Sequence[Any], shift_range: float, cost: float, cost_rel: float, cnote: str,
                      shift_max: float, cost_max: float) -> tuple[str, str]:
    """:func:`lr_transfer`'s verdict and reason (without the diverged-runs note) once >= 2 sizes have an
    optimum and none has only diverged runs."""
    edges = [f"{_k(o.size)} ({o.edge}, {o.edge_cause})" for o in optima if o.at_grid_edge]
    grid_end = [_k(o.size) for o in optima if o.edge_cause == "grid-end"]
    ok_shift = shift_range <= shift_max
    ok_cost = math.isfinite(cost_rel) and cost_rel <= cost_max
    edge_txt = f"; optimum at the grid edge for {edges}" if edges else ""
    if grid_end:
        verdict = "undetermined"
    elif ok_shift and ok_cost:
        verdict = "transfers"
    elif math.isnan(cost_rel) and ok_shift:
        verdict = "undetermined"
    else:
        verdict = "shifts"
    reason = (f"optimum moves {shift_range:.3g} octaves across sizes (threshold {shift_max:g}); "
              f"transferring the smallest size's lr costs {cost:.3g} ({cost_rel:.3g} relative, threshold "
              f"{cost_max:g}{', ' + cnote if cnote else ''})" + edge_txt)
    return verdict, reason


# ----------------------------------------------------------------------------------------------
# long table
# ----------------------------------------------------------------------------------------------

def to_long_table(data: Mapping[Any, Trajectory] | Aligned | ConsistencyResult, quantity: str,
                  *, size_name: str = "width", drop_nan: bool = False, **extra: Any) -> list[dict[str, Any]]:
    """Long ("tidy") table, one dict per (size, step): ``{size_name, "step", "quantity", "value"}``
    plus the constant columns ``extra`` (e.g. ``parameterization="mup", lr=0.1``), in the style of
    microsoft/mup's coord-check data frames. ``data``: size -> (steps, values), an
    :class:`Aligned` or a :class:`ConsistencyResult` (its aligned values; for the latter, rows of
    quantity ``"<quantity>/spread"`` with size None are appended). NaN values are kept unless
    ``drop_nan``. Steps are given as int when integral.
    """
    if not isinstance(quantity, str) or not quantity:
        raise ValueError("quantity must be a non-empty string")
    reserved = {size_name, "step", "quantity", "value"} & set(extra)
    if reserved:
        raise ValueError(f"extra columns may not reuse the names {sorted(reserved)}")
    rows: list[dict[str, Any]] = []

    def add(size, step, q, value):
        value = float(value)
        if drop_nan and not math.isfinite(value):
            return
        st = float(step)
        rows.append({size_name: size, "step": int(st) if st.is_integer() else st, "quantity": q,
                     "value": value, **extra})

    if isinstance(data, (ConsistencyResult, Aligned)):
        _grid_rows(add, data, quantity)
        return rows
    if not isinstance(data, Mapping) or not data:
        raise ValueError("need a non-empty mapping size -> (steps, values), an Aligned or a ConsistencyResult")
    for key in sorted(data, key=_check_size):
        s, v = _check_trajectory(key, data[key])
        for t, x in zip(s, v):
            add(_k(_check_size(key)), t, quantity, x)
    return rows


def _grid_rows(add: Any, data: "Aligned | ConsistencyResult", quantity: str) -> None:
    """:func:`to_long_table`'s rows of aligned values (and, of a :class:`ConsistencyResult`, its spread)."""
    for i, s in enumerate(data.sizes):
        for j, t in enumerate(data.steps):
            add(_k(s), t, quantity, data.values[i, j])
    if isinstance(data, ConsistencyResult):
        for j, t in enumerate(data.steps):
            add(None, t, f"{quantity}/spread", data.spread[j])
