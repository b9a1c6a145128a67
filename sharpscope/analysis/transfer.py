r"""Learning-rate transfer (Yang et al. 2022, "Tensor Programs V"; Everett et al. 2024, arXiv 2407.05872):
does the optimal learning rate of the smallest size serve the largest?

Per size the optimum of the loss-vs-lr grid (:func:`~sharpscope.analysis.optimum.lr_optimum`, a parabola
in log2 lr where it applies; where the best point sits at a grid end or next to a diverged run, a bound,
not a point);
across sizes its shift in octaves and the loss the largest size pays at the smallest size's optimum
(:func:`lr_transfer`). Diverged runs (NaN/inf losses) are counted and listed, never dropped; next to
the optimum they are censored points. With several seeds per size (``seeds=``), every number gets a
confidence interval over seeds (:mod:`sharpscope.analysis.uncertainty`) and the verdict is three-way:
``transfers`` or ``shifts`` only when the intervals lie clear of the thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .optimum import LrOptimum, SeedOptima, interp_loss, lr_optimum, lr_optimum_over_seeds, seed_curves
from .trajectories import check_size, finite_or_none, seed_mean, size_key
from .uncertainty import CODES, LEVEL, Interval, check_level, mean_interval, pair_seeds, range_interval, seeds_needed, seeds_note, side

__all__ = ["LrOptimum", "SeedOptima", "TransferResult", "lr_optimum", "lr_optimum_over_seeds", "lr_transfer"]


@dataclass(frozen=True, eq=False)
class TransferResult:
    """Result of :func:`lr_transfer`.

    optima (LrOptimum per size, ascending, of the seed-mean curves), shifts (log2(lr_opt(n)/lr_opt(smallest))
    per size, octaves; None where undetermined), shift_range (max - min of shifts), transfer_lr (the
    smallest size's optimum), cost (loss of the largest size at transfer_lr minus its optimal
    loss), cost_relative (cost / |largest optimal loss|), cost_note, n_diverged (per size),
    shift_max, cost_max, verdict ("transfers", "shifts" or "undetermined"), reason, code (one of
    :data:`~sharpscope.analysis.uncertainty.CODES`), shift_range_bound ((lo, hi): the range the optima's
    bounds allow, = (shift_range, shift_range) when every optimum is a fitted point), and, from the seeds:
    seed_optima (a :class:`SeedOptima` per size; empty without ``seeds=``), n_seeds (per size),
    n_paired (seeds paired across sizes), shift_range_interval, cost_interval (of cost_relative), level,
    seeds_suggested (for an interval that straddles: the seeds it suggests), interval_note.
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
    code: str = "no-interval"
    shift_range_bound: tuple[float, float] = (float("nan"), float("nan"))
    seed_optima: tuple[SeedOptima, ...] = ()
    n_seeds: dict[float, int] = field(default_factory=dict)
    n_paired: int = 1
    shift_range_interval: Interval | None = None
    cost_interval: Interval | None = None
    level: float = LEVEL
    seeds_suggested: int | None = None
    interval_note: str = ""

    @property
    def evidence(self) -> dict[str, Any]:
        """The numbers behind the verdict, JSON-friendly: intervals as ``<key>_interval`` = [low, high] ("inf" for an
        open end), their method, level, seeds and centre under ``intervals``; ``interval`` names the method, or
        is "no interval" where one seed gave a point verdict."""
        def lr_bracket(o: LrOptimum):
            b = o.bracket_log2
            return None if b is None else [_num(2.0 ** b[0]), _num(2.0 ** b[1])]
        return {
            "verdict": self.verdict, "reason": self.reason, "code": self.code,
            "lr_opt": {size_key(o.size): o.lr_opt for o in self.optima},
            "lr_opt_bound": {size_key(o.size): lr_bracket(o) for o in self.optima if o.bound_log2 is not None},
            "at_grid_edge": {size_key(o.size): o.at_grid_edge for o in self.optima},
            "shift_octaves": {size_key(s): v for s, v in self.shifts.items()},
            "shift_range_octaves": finite_or_none(self.shift_range),
            "shift_range_bound": [_num(x) for x in self.shift_range_bound], "transfer_lr": self.transfer_lr,
            "cost": _num(self.cost), "cost_relative": _num(self.cost_relative),
            "cost_note": self.cost_note, "n_diverged": {size_key(s): n for s, n in self.n_diverged.items()},
            "shift_max": self.shift_max, "cost_max": self.cost_max,
            "n_seeds": {size_key(s): n for s, n in self.n_seeds.items()}, "seeds_paired": self.n_paired,
            "interval": self.interval_method,
            "lr_opt_interval": {size_key(so.size): so.interval.pair(lambda x: 2.0 ** x)
                                for so in self.seed_optima if so.interval is not None},
            "shift_range_octaves_interval": _pair(self.shift_range_interval),
            "cost_relative_interval": _pair(self.cost_interval),
            "intervals": {name: iv.evidence() for name, iv in (("shift_range_octaves", self.shift_range_interval),
                                                               ("cost_relative", self.cost_interval)) if iv is not None},
            "seeds_suggested": self.seeds_suggested,
        }

    @property
    def interval_method(self) -> str:
        """How the verdict's numbers were bounded: the interval methods used, or "no interval"."""
        used = [iv.method for iv in (self.shift_range_interval, self.cost_interval) if iv is not None]
        return f"{self.level:.0%} " + " / ".join(dict.fromkeys(used)) if used else "no interval"

    def rows(self) -> list[dict[str, Any]]:
        """Long table of the grids: one dict (size, lr, loss, diverged) per run (per seed, with a "seed"
        column, when the result has seeds)."""
        if self.seed_optima:
            return [{"size": size_key(so.size), "seed": seed, "lr": float(lr), "loss": float(loss),
                     "diverged": not math.isfinite(loss)}
                    for so in self.seed_optima for seed, o in zip(so.seeds, so.optima)
                    for lr, loss in zip(o.lrs, o.losses)]
        return [{"size": size_key(o.size), "lr": float(lr), "loss": float(loss), "diverged": not math.isfinite(loss)}
                for o in self.optima for lr, loss in zip(o.lrs, o.losses)]


def _pair(interval: Interval | None) -> list | None:
    return None if interval is None else interval.pair()


def _num(x: float) -> float | str | None:
    """A float for JSON: "inf" / "-inf" for infinities, None for NaN."""
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else None)


def lr_transfer(losses: Mapping[Any, Mapping[float, float] | tuple[Sequence[float], Sequence[float]]] | None = None,
                *, seeds: Mapping[Any, Any] | None = None, shift_max: float = 0.5, cost_max: float = 0.05,
                level: float = LEVEL) -> TransferResult:
    """Does the optimal learning rate transfer across sizes? (muP: Yang et al. 2022.)

    ``losses``: size -> (mapping lr -> final or tail-averaged training loss, or a pair
    (lrs, losses)); NaN/inf = diverged. Or, instead, ``seeds``: size -> the seed-resolved curves
    (a mapping seed -> curve, or a pair (lrs, losses) with losses 2-D, seeds x lrs): the point numbers
    then come from the seed-mean curves (a seed that diverged makes the mean's point diverged) and every
    number gets a ``level`` (default 90%) confidence interval over seeds. Per size the optimum comes
    from :func:`lr_optimum`.

    * shift of size n (octaves): ``log2(lr_opt(n) / lr_opt(n_smallest))``; ``shift_range`` =
      max - min over sizes; where an optimum is a bound, ``shift_range_bound`` the range's bound.
    * cost of transferring: the largest size's loss at the smallest size's optimal lr (its best grid
      point where the optimum is a bound) (interpolated on the largest size's curve in log2 lr: local
      quadratic through 3 finite grid points, linear with 2; +inf if that lr sits next to a diverged run;
      NaN outside the grid) minus the largest size's optimal loss, clipped at 0 (an interpolation that
      dips below the fitted optimum measures no cost); ``cost_relative`` divides by |that optimal loss|.
    * intervals (``seeds=``, >= 2 seeds paired across sizes): per-size optima, Student t on the per-seed
      optima; the shift range, Bonferroni-adjusted paired t intervals of the pairwise shifts; the relative
      cost, a jackknife t interval over seeds (:mod:`sharpscope.analysis.uncertainty`).
    * verdict (thresholds ``shift_max`` = 0.5 octave, ``cost_max`` = 0.05): "shifts" when the shift range
      or the cost lies above its threshold; "transfers" when both lie at or below; "undetermined" otherwise.
      "Lies" means the interval (several seeds; ``code`` "interval") or the point, or the bound of a censored
      optimum (one seed; ``code`` "no-interval"). ``code`` of an undetermined verdict: "straddles" (an
      interval straddles: ``seeds_suggested`` says how many seeds would decide), "censored" / "grid-end"
      (an optimum's bound straddles: a finer grid near the divergence edge / a wider grid), "all-diverged",
      "cost-outside-grid" (the transferred lr falls outside the largest size's grid).
    Needs >= 2 sizes.
    """
    level = check_level(level)
    items, per_seed = _inputs(losses, seeds, shift_max, cost_max)
    optima = tuple(lr_optimum(curve, size=s) for s, curve in items)
    ndiv = {o.size: o.n_diverged for o in optima}
    dead = [size_key(o.size) for o in optima if o.method == "all-diverged"]
    small, large = optima[0], optima[-1]
    shifts: dict[float, float | None] = {}
    for o in optima:
        shifts[o.size] = (None if o.log2_lr_opt is None or small.log2_lr_opt is None
                          else o.log2_lr_opt - small.log2_lr_opt)
    known_opt = [o.log2_lr_opt for o in optima if o.log2_lr_opt is not None]
    shift_range = float(max(known_opt) - min(known_opt)) if len(known_opt) >= 2 else float("nan")
    cost, cost_rel, cnote = _cost(small, large)
    seeded = (_SeedEvidence.of(per_seed, level, large, cost_rel) if per_seed is not None
              else _SeedEvidence.none(optima))
    div_note = ", ".join(f"{size_key(o.size)}: {o.n_diverged}/{o.lrs.size}" for o in optima if o.n_diverged)
    div_note = f"; diverged runs per size {div_note}" if div_note else ""
    bound = _range_bound([o.bracket_log2 for o in optima])
    suggested = None
    if dead:
        verdict, code = "undetermined", "all-diverged"
        reason = f"all runs diverged for sizes {dead}: no optimum to compare" + div_note
    elif len(known_opt) < 2 or not math.isfinite(shift_range):
        verdict, code, reason = "undetermined", "all-diverged", "fewer than 2 sizes have an optimum" + div_note
    else:
        verdict, code, reason, suggested = _transfer_verdict(optima, shift_range, bound, cost, cost_rel, cnote,
                                                             shift_max, cost_max, seeded)
        reason += div_note + seeded.note
    return TransferResult(optima=optima, shifts=shifts, shift_range=shift_range,
                          transfer_lr=small.lr_opt, cost=float(cost), cost_relative=float(cost_rel),
                          cost_note=cnote, n_diverged=ndiv, shift_max=float(shift_max),
                          cost_max=float(cost_max), verdict=verdict, reason=reason, code=code,
                          shift_range_bound=bound, seed_optima=seeded.optima, n_seeds=seeded.n_seeds,
                          n_paired=seeded.n_paired, shift_range_interval=seeded.range,
                          cost_interval=seeded.cost, level=level, seeds_suggested=suggested,
                          interval_note=seeded.note)


def _inputs(losses: Any, seeds: Any, shift_max: float, cost_max: float
            ) -> tuple[list[tuple[float, Any]], dict[float, dict[Any, tuple[np.ndarray, np.ndarray]]] | None]:
    """:func:`lr_transfer`'s (size, seed-mean curve) items, sorted, and the checked per-seed curves (or None)."""
    if seeds is None:
        if losses is None:
            raise ValueError("need the loss curves: lr_transfer(losses) or lr_transfer(seeds=per_seed_curves)")
        return _transfer_items(losses, shift_max, cost_max), None
    if losses is not None:
        raise ValueError("give the seed-mean curves (losses) or the per-seed curves (seeds=), not both")
    per_seed = {s: seed_curves(s, v) for s, v in _transfer_items(seeds, shift_max, cost_max)}
    return [(s, seed_mean(list(c.values()), on="union")) for s, c in per_seed.items()], per_seed


def _cost(small: LrOptimum, large: LrOptimum) -> tuple[float, float, str]:
    """(cost, relative cost, note) of using ``small``'s optimal lr on ``large``'s curve (:func:`lr_transfer`)."""
    if small.log2_lr_opt is None or large.loss_opt is None:
        return float("nan"), float("nan"), ""
    at, cnote = interp_loss(large, small.log2_lr_opt)
    cost = at - large.loss_opt
    if cost < 0:  # the interpolating parabola dips below the fitted optimum: no measurable cost
        cost, cnote = 0.0, f"{cnote}; below the fitted optimum by {-cost:.3g}, clipped to 0"
    cost_rel = cost / abs(large.loss_opt) if large.loss_opt != 0 else (0.0 if cost == 0 else float("inf"))
    return float(cost), float(cost_rel), cnote


def _range_bound(brackets: Sequence[tuple[float, float] | None]) -> tuple[float, float]:
    """The range max - min of values known to brackets: (its least, its greatest possible value)."""
    known = [b for b in brackets if b is not None]
    if len(known) < 2:
        return float("nan"), float("nan")
    los, his = [b[0] for b in known], [b[1] for b in known]
    high = max(his) - min(los)
    low = max(0.0, max(los) - min(his)) if math.isfinite(max(los)) and math.isfinite(min(his)) else 0.0
    return float(low), float(high)


@dataclass(frozen=True)
class _SeedEvidence:
    """:func:`lr_transfer`'s intervals over seeds (none without ``seeds=`` or with one seed)."""

    optima: tuple[SeedOptima, ...]
    n_seeds: dict[float, int]
    n_paired: int
    range: Interval | None
    cost: Interval | None
    censored: bool
    note: str

    @classmethod
    def none(cls, optima: Sequence[LrOptimum]) -> "_SeedEvidence":
        return cls((), {o.size: 1 for o in optima}, 1, None, None, False, "")

    @classmethod
    def of(cls, per_seed: dict[float, dict[Any, tuple[np.ndarray, np.ndarray]]], level: float, large: LrOptimum,
           cost_rel: float) -> "_SeedEvidence":
        """The per-seed optima, the shift range's interval and the relative cost's interval (mapped from the
        interval of the transferred lr's offset, :func:`cost_interval`) over the seeds paired across sizes."""
        sizes = list(per_seed)
        seed_optima = tuple(lr_optimum_over_seeds(per_seed[s], size=s, level=level) for s in sizes)
        n_seeds = {s: len(per_seed[s]) for s in sizes}
        index, note = pair_seeds([list(per_seed[s]) for s in sizes])
        n = len(index[0])
        if n < 2:
            return cls(seed_optima, n_seeds, n, None, None, False,
                       "" if max(n_seeds.values()) < 2 else "; fewer than 2 seeds shared by every size: no interval")
        brackets = [[so.optima[i].bracket_log2 for i in idx] for so, idx in zip(seed_optima, index)]
        censored = any(so.optima[i].bound_log2 is not None for so, idx in zip(seed_optima, index) for i in idx)
        if any(b is None for row in brackets for b in row):
            return cls(seed_optima, n_seeds, n, None, None, censored,
                       note + "; a seed's runs all diverged at some size: no interval")
        lo = np.array([[b[0] for b in row] for row in brackets])  # type: ignore[index]
        hi = np.array([[b[1] for b in row] for row in brackets])  # type: ignore[index]
        rng = range_interval(lo, hi, level)
        # the transferred lr's offset from the largest size's optimum, per seed: smallest's minus largest's (the
        # best grid points of bounded optima: the lrs a user transfers and the cost is measured at)
        large_seeds = [list(per_seed[sizes[-1]].values())[i] for i in index[-1]]
        offsets = np.array([seed_optima[0].optima[i].log2_lr_opt - seed_optima[-1].optima[j].log2_lr_opt
                            for i, j in zip(index[0], index[-1])])
        cost = cost_interval(large, large_seeds, (offsets, offsets), cost_rel, level)
        return cls(seed_optima, n_seeds, n, rng, cost, censored, note)


def cost_interval(large: LrOptimum, large_seeds: Sequence[tuple[np.ndarray, np.ndarray]],
                  offsets: tuple[np.ndarray, np.ndarray], cost_rel: float, level: float) -> Interval | None:
    """The relative cost's interval (method ``"mapped"``): the image (:func:`cost_bounds`) of a box of two
    intervals, each at level ``1 - (1 - level) / 2`` (Bonferroni): the transferred lr's offset from the largest
    size's optimum (Student t on the per-seed offsets; a bounded optimum at its best grid point, as for the point
    cost) and the largest size's
    curvature around its optimum relative to the seed mean's (Student t on the per-seed divided differences;
    left out, and the offset taken at ``level``, where a seed lacks a finite value there). None without a
    finite point cost or an optimum."""
    if large.log2_lr_opt is None or not math.isfinite(cost_rel):
        return None
    ratios = _curvature_ratios(large, large_seeds)
    half = 1 - (1 - level) / 2 if ratios is not None else level
    offset = mean_interval(offsets[0], half, upper=offsets[1])
    if offset is None:
        return None
    parts = (offset,) + ((mean_interval(ratios, half),) if ratios is not None else ())
    low, high = cost_bounds(large, *parts)  # type: ignore[arg-type]
    return Interval(cost_rel, low, high, level, offset.n, "mapped", float("nan"), float("nan"), (cost_rel, cost_rel),
                    parts, 0.0)  # type: ignore[arg-type]


def _curvature_ratios(large: LrOptimum, seeds: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """Each seed's second divided difference (in log2 lr) around the seed-mean curve's best point, over the mean
    curve's; None where a seed lacks a finite loss there or the mean's is not positive."""
    j = int(np.clip(np.searchsorted(large.lrs, large.best_lr), 1, large.lrs.size - 2)) if large.lrs.size >= 3 else -1
    if j < 0:
        return None
    lrs = large.lrs[j - 1:j + 2]

    def curvature(y: np.ndarray) -> float:
        x = np.log2(lrs)
        return float(((y[2] - y[1]) / (x[2] - x[1]) - (y[1] - y[0]) / (x[1] - x[0])) / (x[2] - x[0]))

    mean = curvature(large.losses[j - 1:j + 2])
    per_seed = []
    for seed_lrs, seed_losses in seeds:
        table = dict(zip(seed_lrs.tolist(), seed_losses.tolist()))
        y = np.array([table.get(float(v), np.nan) for v in lrs])
        if not np.all(np.isfinite(y)):
            return None
        per_seed.append(curvature(y) / mean if mean > 0 else np.nan)
    return np.array(per_seed) if mean > 0 else None


def cost_bounds(large: LrOptimum, offset: Interval, scale: Interval | None = None) -> tuple[float, float]:
    """The relative transfer cost over a box: the least and greatest of ``(L(x* + d) - L*) / |L*|`` for d in
    ``[offset.low, offset.high]``, L the largest size's seed-mean curve (interpolated as for the point cost,
    clipped at 0), times the curvature ratio's interval ``scale`` (the cost near the optimum is proportional to
    the curvature). 0 is the least where the offset interval holds 0; the greatest is inf where it reaches
    past the grid or next to a diverged run."""
    x0, y0 = float(large.log2_lr_opt), float(large.loss_opt)  # type: ignore[arg-type]
    lx = np.log2(large.lrs)
    a, b = max(offset.low, lx[0] - x0), min(offset.high, lx[-1] - x0)
    if a > b:
        return 0.0, math.inf
    inside = lx[(lx - x0 > a) & (lx - x0 < b)] - x0  # the interpolant's pieces meet at grid points
    deltas = np.concatenate([np.linspace(a, b, 17), inside, [0.0] if a <= 0 <= b else []])
    costs = np.array([max(interp_loss(large, x0 + d)[0] - y0, 0.0) for d in deltas])
    scale_lo, scale_hi = (max(scale.low, 0.0), scale.high) if scale is not None else (1.0, 1.0)
    norm = abs(y0) if y0 != 0 else 1.0
    beyond = offset.low < lx[0] - x0 or offset.high > lx[-1] - x0 or not np.all(np.isfinite(costs))
    low = 0.0 if a <= 0 <= b else float(np.nanmin(costs)) / norm * scale_lo
    return low, math.inf if beyond else float(costs.max()) / norm * scale_hi


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


def _sides(rng: Interval | None, civ: Interval | None, bound: tuple[float, float], cost_rel: float,
           shift_max: float, cost_max: float) -> tuple[str, str]:
    """Where the shift range and the relative cost lie against their thresholds: "below", "above",
    "straddles" (or "unknown" for a cost that could not be measured) -- by interval where there is one, else
    by the optima's bound (the shift) or the point (the cost)."""
    if rng is not None:
        s_side = side(rng, shift_max)
    else:
        s_side = "below" if bound[1] <= shift_max else "above" if bound[0] > shift_max else "straddles"
    if math.isnan(cost_rel):
        c_side = "unknown"
    elif math.isinf(cost_rel) or civ is None:
        c_side = "below" if cost_rel <= cost_max else "above"
    else:
        c_side = side(civ, cost_max)
    return s_side, c_side


def _suggested(need: dict[str, int | None], centres: dict[str, float], limits: dict[str, float]) -> int | None:
    """The seeds that would decide: to go below, every straddling interval must (the larger number); to go
    above, one suffices (the smaller number among those whose centre lies above)."""
    if all(centres[k] <= limits[k] for k in need):
        return None if any(m is None for m in need.values()) else max(need.values(), default=None)
    above = [m for k, m in need.items() if centres[k] > limits[k] and m is not None]
    return min(above) if above else None


def _transfer_verdict(optima: Sequence[LrOptimum], shift_range: float, bound: tuple[float, float], cost: float,
                      cost_rel: float, cnote: str, shift_max: float, cost_max: float, seeded: _SeedEvidence
                      ) -> tuple[str, str, str, int | None]:
    """:func:`lr_transfer`'s verdict, code, reason (without the diverged-runs note) and suggested seeds, once
    >= 2 sizes have an optimum and none has only diverged runs."""
    rng, civ = seeded.range, seeded.cost
    s_side, c_side = _sides(rng, civ, bound, cost_rel, shift_max, cost_max)
    need: dict[str, int | None] = {}
    if s_side == "straddles" and rng is not None:
        need["shift"] = seeds_needed(rng, shift_max)
    if c_side == "straddles" and civ is not None:
        need["cost"] = seeds_needed(civ, cost_max, image=lambda *parts: cost_bounds(optima[-1], *parts))
    suggested = None
    if "above" in (s_side, c_side):
        verdict = "shifts"
        code = "interval" if (rng is not None and s_side == "above") or (civ is not None and c_side == "above") \
            else "transfer-diverges" if math.isinf(cost_rel) and seeded.n_paired >= 2 else "no-interval"
    elif s_side == c_side == "below":
        verdict, code = "transfers", "interval" if rng is not None and civ is not None else "no-interval"
    else:
        verdict = "undetermined"
        grid_end = any(o.edge_cause == "grid-end" for o in (*optima, *(o for so in seeded.optima for o in so.optima)))
        if s_side == "straddles" and (rng is None or (need.get("shift") is None and seeded.censored)):
            code = "grid-end" if grid_end else "censored"
        elif "straddles" in (s_side, c_side):
            code = "straddles"
            centres = {"shift": rng.estimate if rng is not None else shift_range,
                       "cost": civ.estimate if civ is not None else cost_rel}
            suggested = _suggested(need, centres, {"shift": shift_max, "cost": cost_max})
        else:
            code = "cost-outside-grid"
    return verdict, code, _transfer_reason(optima, shift_range, bound, cost, cost_rel, cnote, shift_max, cost_max,
                                           seeded, verdict, code, suggested), suggested


def _transfer_reason(optima: Sequence[LrOptimum], shift_range: float, bound: tuple[float, float], cost: float,
                     cost_rel: float, cnote: str, shift_max: float, cost_max: float, seeded: _SeedEvidence,
                     verdict: str, code: str, suggested: int | None) -> str:
    """One sentence with the numbers behind :func:`_transfer_verdict`'s verdict."""
    if bound[0] == bound[1] == shift_range:
        shift_txt = f"optimum moves {shift_range:.3g} octaves across sizes"
    else:
        shift_txt = (f"optimum moves {shift_range:.3g} octaves across sizes between best grid points (their bounds "
                     f"allow {bound[0]:.3g}..{bound[1]:.3g})")
    reason = (f"{shift_txt} (threshold {shift_max:g}); transferring the smallest size's lr costs {cost:.3g} "
              f"({cost_rel:.3g} relative, threshold {cost_max:g}{', ' + cnote if cnote else ''})")
    rng, civ = seeded.range, seeded.cost
    if rng is not None or civ is not None:
        parts = ([f"shift {rng.low:.3g}..{rng.high:.3g} octaves"] if rng is not None else []) + (
            [f"relative cost {civ.low:.3g}..{civ.high:.3g}"] if civ is not None else [])
        level = (rng or civ).level  # type: ignore[union-attr]
        reason += f"; {level:.0%} interval over {seeded.n_paired} seeds: " + ", ".join(parts)
    elif verdict != "undetermined":
        reason += "; no interval (one seed)"
    edges = [f"{size_key(o.size)} ({o.edge}, {o.edge_cause})" for o in optima if o.at_grid_edge]
    if edges:
        reason += f"; optimum at the grid edge for {edges} (a bound, not a point)"
    if verdict == "undetermined":
        reason += f"; undetermined: {CODES[code]}"
        if code == "straddles":
            reason += seeds_note(suggested)
    return reason
