r"""The edge of stability along training (Cohen et al. 2021; Cohen et al. 2022 for adaptive methods).

The ratio of the (preconditioned) sharpness to its threshold per step: 1 = at the edge. The thresholds
are :func:`sharpscope.stability.eos_threshold`'s (``ss.eos_threshold``); this module takes them as
numbers, one or one per step. With several seeds (sharpness as seeds x steps), the tail ratio gets a
Student t interval over the seeds' own tail ratios (:mod:`sharpscope.analysis.uncertainty`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .trajectories import Window, check_trajectory, window_mask
from .uncertainty import LEVEL, Interval, check_level, mean_interval

__all__ = ["EoSResult", "edge_of_stability"]


@dataclass(frozen=True, eq=False)
class EoSResult:
    """Result of :func:`edge_of_stability`.

    steps, ratio (sharpness / threshold per step), threshold (per step), fraction, first_step
    (first step with ratio >= fraction, None if never), tail_steps (first, last step of the tail),
    tail_mean (mean ratio over the tail, NaN ignored), tail_fraction_above (share of tail steps
    with ratio >= fraction); with seeds (2-D sharpness): n_seeds, tail_per_seed (each seed's tail mean),
    tail_interval (Student t over them; None with one seed or a seed without a finite tail value). ``ratio``
    is the seed mean's.
    """

    steps: np.ndarray
    ratio: np.ndarray
    threshold: np.ndarray
    fraction: float
    first_step: float | None
    tail_steps: tuple[float, float]
    tail_mean: float
    tail_fraction_above: float
    n_seeds: int = 1
    tail_per_seed: np.ndarray | None = None
    tail_interval: Interval | None = None


def edge_of_stability(steps: Sequence[float], sharpness: Sequence[float] | np.ndarray,
                      threshold: float | Sequence[float], *, fraction: float = 0.9,
                      tail: Window = 0.8, level: float = LEVEL) -> EoSResult:
    """Ratio of sharpness to its edge-of-stability threshold along training (Cohen et al. 2021/2022).

    ``sharpness``: one value per step, or a 2-D array (seeds x steps) of several seeds on the same steps
    (NaN where a seed has no value): the ratio is then the seed mean's (NaN where any seed's is), and the
    tail mean gets a ``level`` (default 90%) Student t interval over the seeds' own tail means.
    ``threshold``: a positive number (e.g. from :func:`sharpscope.stability.eos_threshold`) or one per step
    (lr schedules). ``fraction``: the ratio counted as "at the edge" (default 0.9). ``tail``: the
    steps averaged, same convention as a window (default 0.8: the last 20% of the step range).
    """
    level = check_level(level)
    per_seed = np.asarray(sharpness, dtype=float)
    if per_seed.ndim == 2:
        if per_seed.shape[0] == 0 or per_seed.shape[1] != np.size(steps):
            raise ValueError(f"sharpness per seed must be seeds x steps with {np.size(steps)} steps, got shape "
                             f"{per_seed.shape}")
        with np.errstate(invalid="ignore"):
            mean = per_seed.mean(axis=0)
    else:
        mean, per_seed = per_seed, per_seed[None, :] if per_seed.ndim == 1 else per_seed
    s, v = check_trajectory("sharpness", (steps, mean))
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
    tail_mean, above = _tail(ratio[mask], fraction)
    seeds = per_seed[:, order][:, mask] / th[mask]
    per = np.array([_tail(row, fraction)[0] for row in seeds])
    interval = mean_interval(per, level) if per.size >= 2 and np.all(np.isfinite(per)) else None
    return EoSResult(steps=s, ratio=ratio, threshold=th, fraction=float(fraction), first_step=first,
                     tail_steps=(float(s[mask][0]), float(s[mask][-1])), tail_mean=tail_mean,
                     tail_fraction_above=above, n_seeds=per.size, tail_per_seed=per if per.size > 1 else None,
                     tail_interval=interval)


def _tail(ratios: np.ndarray, fraction: float) -> tuple[float, float]:
    """(mean of the finite ratios, share of them >= fraction); NaN without any."""
    fin = ratios[np.isfinite(ratios)]
    if not fin.size:
        return float("nan"), float("nan")
    return float(fin.mean()), float(np.mean(fin >= fraction))
