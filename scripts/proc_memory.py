"""The memory of this process as Linux reports it, for the benchmarks' peak-memory columns.

``status_kib("VmRSS")`` is the resident set now and ``status_kib("VmHWM")`` its peak (the high-water mark);
:func:`reset_peak` sets the peak back to the current RSS, so that a peak read after a solve is that solve's.
"""
from __future__ import annotations

import os
from pathlib import Path


def status_kib(key: str) -> int:
    """A field of ``/proc/self/status`` in KiB (e.g. ``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """``VmHWM`` back to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    """The resident set now, in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
