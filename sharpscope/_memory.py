"""How much memory may one consumer use: the one place the budgets of cached graphs, batched products,
Lanczos bases and SLQ probe blocks are derived from, and where a user's ``max_memory=`` is read."""
from __future__ import annotations

import os
from numbers import Integral, Real

import torch

__all__ = ["memory_budget", "free_bytes", "max_memory_bytes"]


def _host_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def _host_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (what can be allocated without swapping); half the physical
    memory where that file is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    return _host_bytes() // 2  # pragma: no cover


def free_bytes(device: torch.device | str) -> int:
    """Memory free now on ``device``: the CUDA device's free memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _host_available()


def memory_budget(device: torch.device | str, *, gpu_free: float, host: float) -> int:
    """Bytes a consumer on ``device`` may use: the fraction ``gpu_free`` of the CUDA device's free
    memory (read now), or the fraction ``host`` of the physical memory for any other device.

    The callers' fractions: cached gradient graphs 1/2 of free GPU memory or 1/4 of RAM
    (:func:`sharpscope.operators.default_graph_memory_budget`), the Lanczos basis 1/4 or 1/8."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(free_bytes(device) * gpu_free)
    return int(_host_bytes() * host)


def max_memory_bytes(max_memory: int | float, device: torch.device | str) -> int:
    """A user's ``max_memory=`` in bytes: an integer is bytes; a float in ``(0, 1]`` is that fraction of
    the memory free now on ``device`` (:func:`free_bytes`). Anything else is a one-line ValueError."""
    if isinstance(max_memory, bool) or not isinstance(max_memory, Real):
        raise ValueError(f"max_memory must be bytes (an integer) or a fraction of the free memory in (0, 1], "
                         f"got {max_memory!r}")
    if isinstance(max_memory, Integral):
        if max_memory < 1:
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}")
        return int(max_memory)
    if not 0.0 < float(max_memory) <= 1.0:
        raise ValueError(f"max_memory={max_memory} as a float is a fraction of the free memory and must lie in "
                         "(0, 1]; give bytes as an integer (e.g. 8 << 30 for 8 GiB)")
    return int(free_bytes(device) * float(max_memory))
