"""Alignment across widths: the exponent of each layer's ``||dW x||`` against its fan-in, and its regime.

Per run and checkpoint, the ``alignment`` quantity (:mod:`sharpscope.alignment`) stores for each
weight-like layer its fan-in d and the ratio ``R = ||dW x|| / (RMS(dW) RMS(x))`` (RMS over samples
and outputs, effective weights ``W = m^-a w``). R grows like ``d^(1/2)`` when the update is not
aligned with the layer's inputs (central limit theorem) and like ``d`` when it is fully aligned (law
of large numbers); dividing by the entry scales removes the parameterization's multiplier and the
lr's width scaling (Everett et al. 2024, arXiv 2407.05872, the section on alignment). Across the
runs of a comparison the exponent is the least-squares slope of ``log R`` (mean over seeds) against
``log d`` at one checkpoint step, and its regime:

* ``full``     exponent >= :data:`FULL_AT_LEAST` (0.85);
* ``none``     exponent <= :data:`NONE_AT_MOST` (0.65);
* ``between``  in between; ``undetermined`` where d does not vary (an input layer, a depth axis) or
  the update is zero (step 0).

The thresholds sit 0.15 from the predictions 1/2 and 1 and split the gap in three. Calibrated on
probes/alignment_sgd.toml (tanh MLP on digits, full-batch SGD, widths 64..512, 2 seeds; 2026-11-28):
the weights at initialization, unaligned by construction, read 0.48-0.56 (hidden and readout
layers); the updates of muP read 0.99-1.00 at every checkpoint (steps 20..100), those of NTK and SP
0.80-1.03, rising with training (0.80-0.91 at step 20, 0.92-0.98 at step 100); spot checks under
muP with mini-batch SGD (0.98-1.00) and full-batch Adam (0.95-0.99) read full too. No measured
update read ``between``: the less-than-full alignment Everett et al. report for long runs of large
models is not reproduced at this scale. Plain numpy: no torch models here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["AlignmentSeries", "FULL_AT_LEAST", "NONE_AT_MOST", "fit_exponent", "regime", "series_from_rows",
           "compare_alignment"]

FULL_AT_LEAST = 0.85
NONE_AT_MOST = 0.65


@dataclass
class AlignmentSeries:
    """One run's stored alignment: per step, per layer (``names`` order) the fan-in, the update's
    normalised alignment and ratio R, and the same for the weights themselves."""

    names: list[str]
    fan_in: list[int]
    steps: list[int] = field(default_factory=list)
    update: list[list[float]] = field(default_factory=list)
    update_ratio: list[list[float]] = field(default_factory=list)
    params: list[list[float]] = field(default_factory=list)
    params_ratio: list[list[float]] = field(default_factory=list)


def _ratio(terms: Mapping[str, float]) -> float:
    scale = terms.get("rms_u", 0.0) * terms.get("rms_x", 0.0)
    return terms["measured"] / scale if scale > 0 else float("nan")


def series_from_rows(rows: Sequence[tuple[int, Sequence[float], Sequence[float], Mapping[str, Any]]]
                     ) -> AlignmentSeries | None:
    """An :class:`AlignmentSeries` from stored rows ``(step, values, residuals, info)``; None when the
    rows disagree on the layers (results of different models)."""
    series = None
    for step, values, residuals, info in sorted(rows, key=lambda r: r[0]):
        names, fan_in = list(info.get("layers", [])), list(info.get("fan_in", []))
        if series is None:
            series = AlignmentSeries(names, fan_in)
        if names != series.names or fan_in != series.fan_in or len(values) != len(names):
            return None
        series.steps.append(int(step))
        series.update.append([float(v) for v in values])
        series.params.append([float(v) for v in residuals])
        series.update_ratio.append([_ratio(t) for t in info["update"]])
        series.params_ratio.append([_ratio(t) for t in info["params"]])
    return series


def fit_exponent(fan_in: Sequence[float], ratios: Sequence[float]) -> float:
    """The least-squares slope of log(ratio) against log(fan-in); NaN with fewer than two distinct
    fan-ins or a ratio that is not a positive finite number."""
    d, r = np.asarray(fan_in, dtype=float), np.asarray(ratios, dtype=float)
    if len(d) != len(r) or len(np.unique(d)) < 2 or not (np.isfinite(r).all() and (r > 0).all()):
        return float("nan")
    x, y = np.log(d), np.log(r)
    return float(np.polyfit(x, y, 1)[0])


def regime(exponent: float) -> str:
    """``full`` / ``none`` / ``between`` by the thresholds; ``undetermined`` for NaN."""
    if not math.isfinite(exponent):
        return "undetermined"
    return "full" if exponent >= FULL_AT_LEAST else "none" if exponent <= NONE_AT_MOST else "between"


def _clean(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def compare_alignment(by_size: Mapping[float, Sequence[AlignmentSeries]], axis: str) -> dict[str, Any] | None:
    """The metrics entry of one comparison: per layer, at the last step every size measured with a
    nonzero update (seeds: mean of log R), the fan-in, alignment and R per size, the fitted exponent
    of the update (and of the weights) against fan-in, the regime, and the exponent at every common
    step. None when no run holds alignment results."""
    runs = {size: [s for s in series if s is not None] for size, series in by_size.items()}
    runs = {size: series for size, series in runs.items() if series}
    if not runs:
        return None
    names = [n for n in next(iter(runs.values()))[0].names
             if all(n in s.names for series in runs.values() for s in series)]
    common = sorted(set.intersection(*(set(s.steps) for series in runs.values() for s in series)))

    def at(size: float, step: int, layer: str, attr: str) -> tuple[float, int]:
        """The seed mean of ``attr`` (log-mean for ratios) and the fan-in of ``layer`` at ``step``."""
        vals, fan = [], 0
        for s in runs[size]:
            j, i = s.names.index(layer), s.steps.index(step)
            vals.append(getattr(s, attr)[i][j])
            fan = s.fan_in[j]
        vals = np.asarray(vals, dtype=float)
        if attr.endswith("ratio"):
            return (float(np.exp(np.mean(np.log(vals)))) if (vals > 0).all() else float("nan")), fan
        return float(np.mean(vals)), fan

    def exponent(step: int, layer: str, attr: str) -> float:
        pairs = [at(size, step, layer, attr) for size in runs]
        return fit_exponent([f for _, f in pairs], [r for r, _ in pairs])

    moved = [step for step in common if any(math.isfinite(at(size, step, n, "update_ratio")[0])
                                            for size in runs for n in names)]
    step = max(moved) if moved else (max(common) if common else None)
    entry: dict[str, Any] = {"axis": axis, "step": step, "thresholds": {"full": FULL_AT_LEAST, "none": NONE_AT_MOST},
                             "fitted": "slope of log(||dW x|| / (RMS(dW) RMS(x))) against log(fan-in)",
                             "layers": {}}
    if step is None:
        entry["reason"] = "the runs share no measured step"
        return entry
    for layer in names:
        per = {size: (at(size, step, layer, "update_ratio"), at(size, step, layer, "update")[0],
                      at(size, step, layer, "params")[0], at(size, step, layer, "params_ratio")[0]) for size in runs}
        fans = {size: p[0][1] for size, p in per.items()}
        e = exponent(step, layer, "update_ratio")
        found: dict[str, Any] = {
            "fan_in": {str(float(size)): f for size, f in fans.items()},
            "ratio": {str(float(size)): _clean(p[0][0]) for size, p in per.items()},
            "alignment": {str(float(size)): _clean(p[1]) for size, p in per.items()},
            "param_alignment": {str(float(size)): _clean(p[2]) for size, p in per.items()},
            "exponent": _clean(e), "verdict": regime(e),
            "param_exponent": _clean(exponent(step, layer, "params_ratio")),
            "exponent_by_step": {str(s): _clean(exponent(s, layer, "update_ratio")) for s in moved},
        }
        if len(set(fans.values())) < 2:
            found["reason"] = f"fan-in {next(iter(fans.values()))} at every {axis}: no exponent"
        elif not math.isfinite(e):
            found["reason"] = f"no update measured at step {step} for every {axis}"
        entry["layers"][layer] = found
    return entry
