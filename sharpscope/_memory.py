"""How much memory may one consumer use: the one place the budgets of cached graphs, batched products,
Lanczos bases and SLQ probe blocks are derived from."""
from __future__ import annotations

import os

import torch

__all__ = ["memory_budget"]


def _host_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def memory_budget(device: torch.device | str, *, gpu_free: float, host: float) -> int:
    """Bytes a consumer on ``device`` may use: the fraction ``gpu_free`` of the CUDA device's free
    memory (read now), or the fraction ``host`` of the physical memory for any other device.

    The callers' fractions: cached gradient graphs 1/2 of free GPU memory or 1/4 of RAM
    (:func:`sharpscope.operators.default_graph_memory_budget`), the Lanczos basis 1/4 or 1/8."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * gpu_free)
    return int(_host_bytes() * host)
