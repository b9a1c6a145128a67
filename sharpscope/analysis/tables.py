"""Results as long ("tidy") tables: one row per (size, step) -- per (size, seed, step) for seed-resolved
data --, in the style of microsoft/mup's coord-check data frames."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .consistency import ConsistencyResult
from .trajectories import CommonSteps, Trajectory, check_size, check_trajectory, size_key, split_seeds

__all__ = ["to_long_table"]


def to_long_table(data: Mapping[Any, Trajectory] | CommonSteps | ConsistencyResult, quantity: str,
                  *, size_name: str = "width", drop_nan: bool = False, **extra: Any) -> list[dict[str, Any]]:
    """Long ("tidy") table, one dict per (size, step): ``{size_name, "step", "quantity", "value"}``
    plus the constant columns ``extra`` (e.g. ``parameterization="mup", lr=0.1``), in the style of
    microsoft/mup's coord-check data frames. ``data``: size -> (steps, values), an
    :class:`~sharpscope.analysis.trajectories.CommonSteps` or a
    :class:`~sharpscope.analysis.consistency.ConsistencyResult` (its values on common steps, and rows of
    quantity ``"<quantity>/spread"`` with size None for its spread), or seed-resolved data: size -> a
    mapping seed -> (steps, values) or a pair (steps, values 2-D, seeds x steps), which adds a ``"seed"``
    column. NaN values are kept unless ``drop_nan``. Steps are given as int when integral.
    """
    if not isinstance(quantity, str) or not quantity:
        raise ValueError("quantity must be a non-empty string")
    reserved = {size_name, "seed", "step", "quantity", "value"} & set(extra)
    if reserved:
        raise ValueError(f"extra columns may not reuse the names {sorted(reserved)}")
    rows: list[dict[str, Any]] = []

    def add(size, step, q, value, **seed):
        value = float(value)
        if drop_nan and not math.isfinite(value):
            return
        st = float(step)
        rows.append({size_name: size, **seed, "step": int(st) if st.is_integer() else st, "quantity": q,
                     "value": value, **extra})

    if isinstance(data, (ConsistencyResult, CommonSteps)):
        _grid_rows(add, data, quantity)
        return rows
    if not isinstance(data, Mapping) or not data:
        raise ValueError("need a non-empty mapping size -> (steps, values), a CommonSteps or a ConsistencyResult")
    for key in sorted(data, key=check_size):
        size = size_key(check_size(key))
        value = data[key]
        if isinstance(value, Mapping) or (isinstance(value, (tuple, list)) and len(value) == 2
                                          and np.ndim(value[1]) == 2):
            for seed, traj in split_seeds(key, value).items():
                s, v = check_trajectory(f"{key!r} (seed {seed!r})", traj)
                for t, x in zip(s, v):
                    add(size, t, quantity, x, seed=seed)
            continue
        s, v = check_trajectory(key, value)
        for t, x in zip(s, v):
            add(size, t, quantity, x)
    return rows


def _grid_rows(add: Any, data: "CommonSteps | ConsistencyResult", quantity: str) -> None:
    """:func:`to_long_table`'s rows of values on common steps (and, of a :class:`ConsistencyResult`, its spread)."""
    for i, s in enumerate(data.sizes):
        for j, t in enumerate(data.steps):
            add(size_key(s), t, quantity, data.values[i, j])
    if isinstance(data, ConsistencyResult):
        for j, t in enumerate(data.steps):
            add(None, t, f"{quantity}/spread", data.spread[j])
