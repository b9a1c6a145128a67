"""Results as long ("tidy") tables: one row per (size, step), in the style of microsoft/mup's coord-check
data frames."""
from __future__ import annotations

import math
from typing import Any, Mapping

from .consistency import ConsistencyResult
from .trajectories import CommonSteps, Trajectory, check_size, check_trajectory, size_key

__all__ = ["to_long_table"]


def to_long_table(data: Mapping[Any, Trajectory] | CommonSteps | ConsistencyResult, quantity: str,
                  *, size_name: str = "width", drop_nan: bool = False, **extra: Any) -> list[dict[str, Any]]:
    """Long ("tidy") table, one dict per (size, step): ``{size_name, "step", "quantity", "value"}``
    plus the constant columns ``extra`` (e.g. ``parameterization="mup", lr=0.1``), in the style of
    microsoft/mup's coord-check data frames. ``data``: size -> (steps, values), an
    :class:`~sharpscope.analysis.trajectories.CommonSteps` or a
    :class:`~sharpscope.analysis.consistency.ConsistencyResult` (its values on common steps, and rows of
    quantity ``"<quantity>/spread"`` with size None for its spread). NaN values are kept unless
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

    if isinstance(data, (ConsistencyResult, CommonSteps)):
        _grid_rows(add, data, quantity)
        return rows
    if not isinstance(data, Mapping) or not data:
        raise ValueError("need a non-empty mapping size -> (steps, values), a CommonSteps or a ConsistencyResult")
    for key in sorted(data, key=check_size):
        s, v = check_trajectory(key, data[key])
        for t, x in zip(s, v):
            add(size_key(check_size(key)), t, quantity, x)
    return rows


def _grid_rows(add: Any, data: "CommonSteps | ConsistencyResult", quantity: str) -> None:
    """:func:`to_long_table`'s rows of values on common steps (and, of a :class:`ConsistencyResult`, its spread)."""
    for i, s in enumerate(data.sizes):
        for j, t in enumerate(data.steps):
            add(size_key(s), t, quantity, data.values[i, j])
    if isinstance(data, ConsistencyResult):
        for j, t in enumerate(data.steps):
            add(None, t, f"{quantity}/spread", data.spread[j])
