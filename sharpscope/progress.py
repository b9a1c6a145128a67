"""One progress bar for long work (spectrum jobs, coord checks, sweeps): tqdm, silenced on request."""
from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it", leave: bool = True) -> Any:
    """A tqdm bar over ``total`` items (a no-op bar when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)
