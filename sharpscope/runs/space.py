"""Disk space for the writers: reserve it before HDF5 writes, so that a full disk stops a writer with
one line and never inside HDF5 (docs/formats.md, "A full disk").

An HDF5 write that fails for space leaves the library's metadata cache inconsistent: the file becomes
unreadable ("actual len exceeds EOA") or the process segfaults when the file is closed. So a writer
reserves, before each row, the most the row can allocate, plus a standing reserve for closing the
file. On Linux the reservation is ``fallocate(FALLOC_FL_KEEP_SIZE)`` past the end of the file: the
blocks belong to the file and HDF5's writes into them cannot fail for space, whoever else fills the
disk. Elsewhere it is a ``statvfs`` check of the same amount (which a concurrent writer can defeat).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

__all__ = ["DiskFullError", "Reservation", "STANDING_RESERVE", "METADATA_ALLOWANCE", "free_bytes", "human_bytes",
           "write_new_file"]

# kept past the end of an open file, for closing it (closing an SWMR file rewrote metadata in place and grew
# the file by 0 bytes in every measurement, docs/bench-notes.md)
STANDING_RESERVE = 16 * 1024
# HDF5's own allocations per row beyond the row's chunks and heap data (chunk-index blocks, heap collections,
# aggregator blocks): at most 25 KiB over 700 spectra rows and 15 KiB over 1,500 checkpoints, measured;
# twice that
METADATA_ALLOWANCE = 48 * 1024

_KEEP_SIZE = 0x01  # FALLOC_FL_KEEP_SIZE (linux/falloc.h)
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP}


def _load_fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _load_fallocate()


def human_bytes(n: int) -> str:
    """``36 KiB``, ``1.2 MiB``, ``3.4 GiB``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 10 or unit == "KiB" else f"{value:.1f} {unit}"
    return f"{n} B"


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged process may still allocate on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskFullError(OSError):
    """A writer stopped for space before writing (errno ``ENOSPC``); the message is one line naming the
    file, the free space, what the next write needed and what is kept."""

    def __init__(self, path: str | os.PathLike, free: int, need: int, kept: str) -> None:
        self.path, self.free, self.need = str(path), free, need
        super().__init__(errno.ENOSPC, f"{path}: disk full: {human_bytes(free)} free, the next write needs "
                                       f"{human_bytes(need)}; {kept}: free space and run again to continue")

    def __reduce__(self):  # picklable (executors send it between processes)
        return (_rebuild_disk_full, (self.path, self.free, self.need, self.strerror))


def _rebuild_disk_full(path: str, free: int, need: int, message: str) -> DiskFullError:
    err = DiskFullError.__new__(DiskFullError)
    OSError.__init__(err, errno.ENOSPC, message)
    err.path, err.free, err.need = path, free, need
    return err


class Reservation:
    """Blocks reserved past the end of one open file (a second descriptor on it: HDF5 keeps its own).

    :meth:`ensure` before every write that may allocate; :meth:`release` after the file is closed (it
    gives back what is reserved past the end)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_RDWR)
        self.allocates = _FALLOCATE is not None  # False: statvfs checks only

    def ensure(self, nbytes: int, kept: str) -> None:
        """Make sure ``nbytes`` more (plus the standing reserve) can be written to the file; otherwise raise
        :class:`DiskFullError` (``kept``: what the message says is intact)."""
        need = int(nbytes) + STANDING_RESERVE
        if self.allocates:
            size = os.fstat(self._fd).st_size
            if _FALLOCATE(self._fd, _KEEP_SIZE, size, need) == 0:
                return
            code = ctypes.get_errno()
            if code in _UNSUPPORTED:
                self.allocates = False  # this file system cannot reserve: check instead, from now on
            elif code in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(self.path, free_bytes(self.path.parent), need, kept)
            else:
                raise OSError(code, f"{self.path}: cannot reserve disk space ({os.strerror(code)})")
        free = free_bytes(self.path.parent)
        if free < need:
            raise DiskFullError(self.path, free, need, kept)

    def release(self) -> None:
        """Give back the blocks reserved past the end of the file (call once HDF5 has closed it)."""
        if self._fd is None:
            return
        try:
            if self.allocates:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size)  # frees blocks past the end; no byte changes
        except OSError:
            pass  # a read-only or odd file system: the blocks go when the file is next truncated or copied
        finally:
            os.close(self._fd)
            self._fd = None


def write_new_file(path: Path, image: bytes, kept: str, shown: Path | None = None) -> None:
    """Write ``image`` to ``path`` (a temporary file of the caller's) with plain writes: a full disk is
    a :class:`DiskFullError` naming ``shown`` (default ``path``), never an HDF5 write. The partial file is
    removed on failure (our own temporary file: nothing stored is lost)."""
    need = len(image) + METADATA_ALLOWANCE + STANDING_RESERVE  # the image, then opening it for appending
    free = free_bytes(path.parent)
    if free < need:
        raise DiskFullError(shown or path, free, need, kept)
    try:
        with open(path, "wb") as fh:
            fh.write(image)
    except OSError as err:
        path.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(shown or path, free_bytes(path.parent), need, kept) from None
        raise
