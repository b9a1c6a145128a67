"""What both sharpscope HDF5 files share: their error, the one-writer lock, the handle that owns an
open file, and opening a file for reading whether or not a writer has it (or crashed with it)."""
from __future__ import annotations

import os
from pathlib import Path

import h5py

from .locks import Lock, LockHeldError, lock_file_for

__all__ = ["RunFileError", "NotSharpscopeFileError", "UnsupportedVersionError", "WriterLock", "H5Handle", "open_for_reading",
           "LIBVER"]

LIBVER = "latest"  # SWMR needs the newest file-format features


class RunFileError(ValueError):
    """A run or spectra file that cannot be used: not sharpscope's, unknown version, truncated,
    damaged (a checksum mismatch), mismatched with the model."""


class NotSharpscopeFileError(RunFileError):
    """An HDF5 file that is not a sharpscope run (or spectra) file: a foreign file."""


class UnsupportedVersionError(RunFileError):
    """A sharpscope file in a format version this sharpscope does not read (written by a later one)."""


class WriterLock:
    """One writer per file: an exclusive lock on ``<dir>/.sharpscope-locks/<name>.lock``
    (:mod:`.locks`), held while the writer lives (released by the OS if the process dies, so a crash
    never leaves a stale lock)."""

    def __init__(self, path: Path) -> None:
        self._lock = Lock(lock_file_for(path))
        self.path = self._lock.path
        try:
            self._lock.acquire()
        except LockHeldError as err:
            raise RunFileError(f"{path} is being written by another process ({err.holder}); wait for it to "
                               "finish") from None

    def release(self) -> None:
        self._lock.release()


class H5Handle:
    """An object owning an open ``h5py.File`` in ``self._file`` (and, for writers, a
    :class:`WriterLock` and the file's disk :class:`~.space.Reservation`): ``close()`` and ``with`` support."""

    _file: h5py.File | None = None
    _lock: WriterLock | None = None
    _reservation = None

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            if self._reservation is not None:
                self._reservation.release()  # after HDF5 closed the file: what is reserved past its end
                self._reservation = None
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
