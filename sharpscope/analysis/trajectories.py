r"""Trajectories of one quantity per size, put on common steps; the conventions the analysis modules share.

* A *size* (the mapping key) is a finite number: the width n, or equally the depth L, or any other
  value of the compared axis. "Widest" means the largest key.
* A *trajectory* is a pair ``(steps, values)`` of equal-length 1-D sequences. Steps may be
  optimizer steps, tokens or samples seen; they must be finite and distinct. Values may be NaN
  (a missing measurement or a diverged run); NaN is never silently replaced.
* A *window* selects the steps a summary is taken over, after warm-up:
  a float ``f`` in [0, 1) keeps steps t with ``t >= t_min + f * (t_max - t_min)`` (a fraction of
  the *step range*, not of the number of records, so log-spaced capture schedules are not
  dominated by early steps); a pair ``(start, stop)`` keeps ``start <= t <= stop``
  (either may be None for open).
* Summaries over a window are medians over steps (``nanmedian``): robust to the EoS
  oscillations of sharpness and to a few missing points.

Plain numpy: the analysis modules know nothing of torch or plotting.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np

__all__ = ["Trajectory", "Window", "CommonSteps", "on_common_steps", "check_size", "check_trajectory", "float_pair",
           "window_mask", "nanmedian", "size_key", "finite_or_none"]

Trajectory = tuple[Sequence[float], Sequence[float]]
Window = Union[float, tuple[Union[float, None], Union[float, None]]]


@dataclass(frozen=True, eq=False)
class CommonSteps:
    """Trajectories on common steps: ``values[i, j]`` is size ``sizes[i]`` at ``steps[j]``.

    ``sizes`` are sorted ascending (the last one is the widest); NaN marks a missing value.
    """

    sizes: tuple[float, ...]
    steps: np.ndarray
    values: np.ndarray

    def __iter__(self):  # allows ``sizes, steps, values = on_common_steps(...)``
        return iter((self.sizes, self.steps, self.values))


def check_size(key: Any) -> float:
    """A value of the compared axis: any finite number (width, depth, batch size, a weight decay of 0...)."""
    try:
        v = float(key)
    except (TypeError, ValueError):
        raise ValueError(f"a size (a value of the compared axis) must be a number, got {key!r}") from None
    if isinstance(key, bool) or not math.isfinite(v):
        raise ValueError(f"a size (a value of the compared axis) must be a finite number, got {key!r}")
    return v


def float_pair(pair: Any, error: str) -> tuple[np.ndarray, np.ndarray]:
    """``pair`` unpacked into two float arrays, or ``ValueError(error)`` when it is not a pair."""
    try:
        a, b = pair
    except (TypeError, ValueError):
        raise ValueError(error) from None
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)


def check_trajectory(key: Any, traj: Any) -> tuple[np.ndarray, np.ndarray]:
    """One trajectory as float arrays sorted by step, or a ValueError naming its size and the fault."""
    s, v = float_pair(traj, f"trajectory for size {key!r} must be a pair (steps, values)")
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


def on_common_steps(trajectories: Mapping[Any, Trajectory], on: Union[str, Sequence[float]] = "common",
                    *, interpolate: bool = False) -> CommonSteps:
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
    items = sorted(((check_size(k), k, traj) for k, traj in trajectories.items()), key=lambda x: x[0])
    sizes = tuple(x[0] for x in items)
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"duplicate sizes in {[x[1] for x in items]}")
    data = [check_trajectory(k, traj) for _, k, traj in items]
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
    return CommonSteps(sizes, grid, values)


def window_mask(steps: np.ndarray, window: Window, name: str = "window") -> np.ndarray:
    """The steps (sorted) inside ``window`` (module docstring), or a ValueError when it holds none."""
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


def nanmedian(x: np.ndarray, axis=None):
    """``np.nanmedian`` without the all-NaN warning (an all-NaN slice is NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def finite_or_none(x) -> float | None:
    """A float for JSON: None where not finite."""
    x = float(x)
    return x if math.isfinite(x) else None


def size_key(size: float) -> int | float:
    """A size as a JSON key: an int where integral."""
    return int(size) if float(size).is_integer() else float(size)

