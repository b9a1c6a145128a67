"""What both sharpscope HDF5 files share: their error, the one-writer lock, the handle that owns an
open file, and opening a file for reading whether or not a writer has it (or crashed with it)."""
from __future__ import annotations

import os
from pathlib import Path

import h5py

__all__ = ["RunFileError", "WriterLock", "H5Handle", "open_for_reading", "LIBVER"]

LIBVER = "latest"  # SWMR needs the newest file-format features


class RunFileError(ValueError):
    """A run or spectra file that cannot be used: not sharpscope's, unknown version, truncated,
    damaged (a checksum mismatch), mismatched with the model."""


class WriterLock:
    """One writer per file: an exclusive ``flock`` on ``<file>.lock``, held while the writer lives
    (released by the OS if the process dies, so a crash never leaves a stale lock)."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self.path = path.with_name(path.name + ".lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RunFileError(f"{path} is being written by another process (lock {self.path})") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class H5Handle:
    """An object owning an open ``h5py.File`` in ``self._file`` (and, for writers, a
    :class:`WriterLock`): ``close()`` and ``with`` support."""

    _file: h5py.File | None = None
    _lock: WriterLock | None = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_for_reading(path: str | os.PathLike) -> h5py.File:
    """Open read-only. A plain open checks the file's integrity (end-of-file address); a file that
    is being written -- or whose SWMR writer crashed -- refuses it and is read in SWMR mode instead."""
    try:
        return h5py.File(path, "r", libver=LIBVER)
    except OSError as err:
        if "already open for write" not in str(err):
            raise RunFileError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from None
    try:
        return h5py.File(path, "r", libver=LIBVER, swmr=True)
    except OSError as err:
        raise RunFileError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from None
