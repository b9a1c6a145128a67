r"""The width-convergence exponent alpha of super consistency (:mod:`sharpscope.analysis.consistency`, whose
docstring gives the model): if :math:`\lambda_n = \lambda_\infty + B n^{-\alpha}`, the distances to the
widest N are :math:`d_n = C\,|n^{-\alpha} - N^{-\alpha}|`; alpha and C are fitted by least squares on
their logarithms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize

__all__ = ["AlphaFit", "fit_alpha"]


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


def _ssr_grid(alphas: np.ndarray, n: np.ndarray, N: float, y: np.ndarray) -> np.ndarray:
    """The residual sum of squares of ``y - log_shape(a)`` (its mean removed) for every alpha of a grid at once."""
    delta = math.log(N) - np.log(n)
    a = alphas[:, None]
    tiny = np.abs(a) < 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = np.where(tiny, np.log(delta)[None, :],
                         -a * math.log(N) + np.log(np.expm1(a * delta) / np.where(tiny, 1.0, a)))
    r = y[None, :] - shape
    r = r - r.mean(axis=1, keepdims=True)
    return np.einsum("ij,ij->i", r, r)


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
              signed: Sequence[float] | None = None, widest_value: float | None = None, *,
              polish: bool = True) -> AlphaFit:
    """Fit the width-convergence exponent alpha to distances ``D_n`` of sizes n to the ``widest``.

    ``distances`` are relative distances to the widest (> 0, finite); ``signed`` (optional) the
    signed relative differences, used for the sign and the limit ratio; ``widest_value`` the
    widest's value (its sign enters the limit ratio). Needs >= 2 sizes below the widest. ``polish``: refine
    (log C, alpha) jointly by least squares after the profiled search (it moves alpha by < 1e-6 and is
    most of the cost: the leave-one-seed-out fits of an interval skip it).
    """
    n, d = _alpha_input(sizes, distances, widest)
    y = np.log(d)

    def ssr(a: float) -> float:
        g = _log_shape(a, n, widest)
        r = y - g
        r = r - r.mean()
        return float(r @ r)

    grid = np.linspace(*_ALPHA_BOUNDS, 1601)
    vals = _ssr_grid(grid, n, widest, y)
    k = int(np.argmin(vals))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    res = optimize.minimize_scalar(ssr, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    a0 = float(res.x) if res.fun <= vals[k] else float(grid[k])

    def resid(p):
        return y - p[0] - _log_shape(p[1], n, widest)

    c0 = float(np.mean(y - _log_shape(a0, n, widest)))
    if polish:
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
