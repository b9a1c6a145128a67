r"""The edge of stability along training (Cohen et al. 2021; Cohen et al. 2022 for adaptive methods).

The ratio of the (preconditioned) sharpness to its threshold per step: 1 = at the edge. The thresholds
are :func:`sharpscope.stability.eos_threshold`'s (``ss.eos_threshold``); this module takes them as
numbers, one or one per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .trajectories import Window, check_trajectory, window_mask

__all__ = ["EoSResult", "edge_of_stability"]


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

    ``threshold``: a positive number (e.g. from :func:`sharpscope.stability.eos_threshold`) or one per step (lr
    schedules). ``fraction``: the ratio counted as "at the edge" (default 0.9). ``tail``: the
    steps averaged, same convention as a window (default 0.8: the last 20% of the step range).
    """
    s, v = check_trajectory("sharpness", (steps, sharpness))
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
    mask = window_mask(s, tail, "tail")
    tr = ratio[mask]
    fin = tr[np.isfinite(tr)]
    tail_mean = float(fin.mean()) if fin.size else float("nan")
    above = float(np.mean(fin >= fraction)) if fin.size else float("nan")
    return EoSResult(steps=s, ratio=ratio, threshold=th, fraction=float(fraction), first_step=first,
                     tail_steps=(float(s[mask][0]), float(s[mask][-1])), tail_mean=tail_mean,
                     tail_fraction_above=above)
