r"""Learning-rate transfer (Yang et al. 2022, "Tensor Programs V"; Everett et al. 2024, arXiv 2407.05872):
does the optimal learning rate of the smallest size serve the largest?

Per size the optimum of the loss-vs-lr grid (:func:`lr_optimum`, a parabola in log2 lr); across sizes
its shift in octaves and the loss the largest size pays at the smallest size's optimum
(:func:`lr_transfer`). Diverged runs (NaN/inf losses) are counted and listed, never dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..stability import check_lr
from .trajectories import check_size, finite_or_none, float_pair, size_key

__all__ = ["LrOptimum", "TransferResult", "lr_optimum", "lr_transfer"]


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
            "lr_opt": {size_key(o.size): o.lr_opt for o in self.optima},
            "at_grid_edge": {size_key(o.size): o.at_grid_edge for o in self.optima},
            "shift_octaves": {size_key(s): v for s, v in self.shifts.items()},
            "shift_range_octaves": finite_or_none(self.shift_range), "transfer_lr": self.transfer_lr,
            "cost": finite_or_none(self.cost) if not math.isinf(self.cost) else "inf",
            "cost_relative": finite_or_none(self.cost_relative) if not math.isinf(self.cost_relative) else "inf",
            "cost_note": self.cost_note, "n_diverged": {size_key(s): n for s, n in self.n_diverged.items()},
            "shift_max": self.shift_max, "cost_max": self.cost_max,
        }

    def rows(self) -> list[dict[str, Any]]:
        """Long table of the grids: one dict (size, lr, loss, diverged) per run."""
        return [{"size": size_key(o.size), "lr": float(lr), "loss": float(loss), "diverged": not math.isfinite(loss)}
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
    dead = [size_key(o.size) for o in optima if o.method == "all-diverged"]
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
    div_note = ", ".join(f"{size_key(o.size)}: {o.n_diverged}/{o.lrs.size}" for o in optima if o.n_diverged)
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
    items = sorted(((check_size(k), v) for k, v in losses.items()), key=lambda t: t[0])
    if len({s for s, _ in items}) != len(items):
        raise ValueError("duplicate sizes")
    return items


def _transfer_verdict(optima: Sequence[Any], shift_range: float, cost: float, cost_rel: float, cnote: str,
                      shift_max: float, cost_max: float) -> tuple[str, str]:
    """:func:`lr_transfer`'s verdict and reason (without the diverged-runs note) once >= 2 sizes have an
    optimum and none has only diverged runs."""
    edges = [f"{size_key(o.size)} ({o.edge}, {o.edge_cause})" for o in optima if o.at_grid_edge]
    grid_end = [size_key(o.size) for o in optima if o.edge_cause == "grid-end"]
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
