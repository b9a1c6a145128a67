r"""The optimal learning rate of one size: from its loss-vs-lr grid (:func:`lr_optimum`, a parabola in
log2 lr where it applies, a bound where the best point sits at a grid end or next to a diverged run) and
over seeds (:func:`lr_optimum_over_seeds`, with a confidence interval). Used by
:mod:`sharpscope.analysis.transfer`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..stability import check_lr
from .trajectories import float_pair, size_key, split_seeds
from .uncertainty import LEVEL, Interval, check_level, mean_interval

__all__ = ["LrOptimum", "SeedOptima", "lr_optimum", "lr_optimum_over_seeds", "interp_loss", "seed_curves"]


@dataclass(frozen=True, eq=False)
class LrOptimum:
    """Optimal lr of one size (see :func:`lr_optimum`).

    size, lrs (ascending grid), losses (NaN/inf kept), diverged_lrs, n_diverged, best_lr (the
    best finite grid point), lr_opt, log2_lr_opt, loss_opt, method ("quadratic", "grid-edge",
    "flat" or "all-diverged"), at_grid_edge, edge (None, "low" or "high"), edge_cause (None,
    "grid-end": the true optimum may lie outside the grid, or "diverged": the best point is bounded
    by a diverged neighbour, an optimum at the divergence edge), note, bound_log2 (where the parabola
    fit does not apply -- "grid-edge" and "flat" -- the bound (lo, hi) in log2 lr that the optimum lies
    in: the best point's grid neighbours, -inf / inf past a grid end; None for a fitted point).
    ``lr_opt`` of a bound is the best grid point.
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
    bound_log2: tuple[float, float] | None = None

    @property
    def bracket_log2(self) -> tuple[float, float] | None:
        """Where the optimum lies, in log2 lr: ``(x, x)`` for a fitted point, :attr:`bound_log2` for a bound,
        None when every run diverged."""
        if self.log2_lr_opt is None:
            return None
        return self.bound_log2 if self.bound_log2 is not None else (self.log2_lr_opt, self.log2_lr_opt)


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
        size = size_key(size)
    if isinstance(curve, Mapping):
        if len(curve) == 0:
            raise ValueError(f"size {size!r}: empty lr grid")
        pairs = [(check_lr(k, f"lr of size {size!r}"), float(v)) for k, v in curve.items()]
        lrs = np.array([p[0] for p in pairs])
        losses = np.array([p[1] for p in pairs])
    else:
        lrs, losses = float_pair(curve, f"size {size!r}: give a mapping lr -> loss or a pair (lrs, losses)")
        if lrs.ndim != 1 or losses.ndim != 1 or lrs.size != losses.size:
            raise ValueError(f"size {size!r}: mismatched lengths, {np.size(lrs)} lrs vs {np.size(losses)} losses")
        if lrs.size == 0:
            raise ValueError(f"size {size!r}: empty lr grid")
        for x in lrs:
            check_lr(x, f"lr of size {size!r}")
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
    uniform). When the best point is at the grid's end, or next to a diverged run (a censored point:
    its loss is above every finite one), the fit does not apply: the grid point is reported with
    ``at_grid_edge=True``, ``edge`` "low"/"high", and the bound it gives, ``bound_log2`` = the best
    point's neighbours (a loss convex in log2 lr that is lower at x_i than at x_(i-1) and x_(i+1) has its
    minimum between them), -inf / inf past a grid end. A flat bracket (three equal losses) gives the
    same bound.
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
    bound = (float(x[i - 1]) if i > 0 else -math.inf, float(x[i + 1]) if i < lrs.size - 1 else math.inf)
    span = (f"between lr {2.0 ** bound[0]:g} and {2.0 ** bound[1]:g}" if math.isfinite(bound[0] + bound[1])
            else f"below lr {2.0 ** bound[1]:g}" if math.isfinite(bound[1]) else f"above lr {2.0 ** bound[0]:g}")
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
                         method="grid-edge", at_grid_edge=True, edge=edge, edge_cause=cause, bound_log2=bound,
                         note=f"best lr {best:g} is at {' and '.join(why)}: the fit does not apply, the optimum "
                              f"lies {span} (a bound, not a point); " + ("extend the grid" if cause == "grid-end"
                              else "a finer lr grid") + f" ({edge} side)")
    a, xs, ys = _vertex(x[i - 1:i + 2], losses[i - 1:i + 2])
    if not math.isfinite(xs):
        return LrOptimum(**base, best_lr=best, lr_opt=best, log2_lr_opt=float(x[i]), loss_opt=float(losses[i]),
                         method="flat", at_grid_edge=False, edge=None, bound_log2=bound,
                         note=f"loss is flat around the best grid point: grid value reported, the optimum lies {span}")
    return LrOptimum(**base, best_lr=best, lr_opt=float(2.0 ** xs), log2_lr_opt=xs, loss_opt=ys,
                     method="quadratic", at_grid_edge=False, edge=None, note="")


def interp_loss(opt: LrOptimum, x: float) -> tuple[float, str]:
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
class SeedOptima:
    """The optimum of one size per seed (:func:`lr_optimum_over_seeds`): size, seeds (their ids), optima
    (an :class:`LrOptimum` per seed), interval (of the optimum in log2 lr over seeds, Student t; censored
    seeds enter with their bounds; None with one seed or when a seed has no optimum), note."""

    size: float
    seeds: tuple[Any, ...]
    optima: tuple[LrOptimum, ...]
    interval: Interval | None
    note: str


def seed_curves(size: float, value: Any) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """One size's per-seed lr curves, checked: ``{seed: (lrs, losses)}``."""
    return {seed: _check_curve(f"{size_key(size)} (seed {seed!r})", curve)
            for seed, curve in split_seeds(size_key(size), value).items()}


def lr_optimum_over_seeds(curves: Mapping[Any, Any] | tuple[Sequence[float], Any], size: float = float("nan"),
                          level: float = LEVEL) -> SeedOptima:
    """The optimal lr of one size for every seed, and its confidence interval over seeds.

    ``curves``: a mapping seed -> curve (as for :func:`lr_optimum`) or a pair ``(lrs, losses)`` with
    ``losses`` 2-D (seeds x lrs). The interval (``level``, default 90%) is Student t on the per-seed
    optima in log2 lr (:func:`~sharpscope.analysis.uncertainty.mean_interval`); a seed whose optimum is a
    bound enters as that bound, widening the interval."""
    level = check_level(level)
    per_seed = seed_curves(size, curves)
    optima = tuple(lr_optimum(c, size=size) for c in per_seed.values())
    brackets = [o.bracket_log2 for o in optima]
    if len(optima) < 2:
        return SeedOptima(float(size), tuple(per_seed), optima, None, "one seed: no interval")
    if any(b is None for b in brackets):
        dead = [k for k, b in zip(per_seed, brackets) if b is None]
        return SeedOptima(float(size), tuple(per_seed), optima, None, f"every run diverged for seed(s) {dead}: no interval")
    lo, hi = zip(*brackets)  # type: ignore[misc]
    bounded = sum(o.bound_log2 is not None for o in optima)
    note = f"{bounded} of {len(optima)} seed optima are bounds, not points" if bounded else ""
    return SeedOptima(float(size), tuple(per_seed), optima, mean_interval(lo, level, upper=hi), note)
