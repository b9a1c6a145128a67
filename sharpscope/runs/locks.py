"""Exclusive locks for writers and sweeps: one ``flock`` per lock file, all lock files in one hidden
folder (docs/formats.md, "Locks").

A lock file is ``<dir>/.sharpscope-locks/<name>.lock``. It is never removed: a ``flock`` belongs to an
open file (an inode), not to a name, so unlinking a free lock file would let a process that opened it
just before lock the unlinked inode while a newcomer locks a new file under the same name -- two
holders. The OS drops a ``flock`` when its process dies, so a crash leaves no stale lock. The holder
writes one JSON line (pid, host, start time) into the file, from which a refused process names it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_DIR", "Lock", "LockHeldError", "lock_file_for", "folder_lock_file"]

LOCK_DIR = ".sharpscope-locks"


class LockHeldError(BlockingIOError):
    """The lock is held by another process; ``holder`` describes it (``"pid 12 on host since ..."``)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def lock_file_for(path: str | os.PathLike) -> Path:
    """The lock file of a data file: ``<dir>/.sharpscope-locks/<name>.lock``."""
    p = Path(path)
    return p.parent / LOCK_DIR / f"{p.name}.lock"


def folder_lock_file(folder: str | os.PathLike, name: str) -> Path:
    """The lock file of a whole folder's job (``name``: ``"sweep"``): ``<folder>/.sharpscope-locks/<name>.lock``."""
    return Path(folder) / LOCK_DIR / f"{name}.lock"


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on {info['host']} since {info['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that has not written its name yet"


class Lock:
    """An exclusive, non-blocking ``flock`` on ``lock_file`` (its folder is created if needed).

    ``acquire()`` raises :class:`LockHeldError` naming the holder; ``release()`` (or process death) drops it.
    """

    def __init__(self, lock_file: str | os.PathLike) -> None:
        self.path = Path(lock_file)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "Lock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise LockHeldError(f"{self.path} is held by {holder}", holder) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, its holder goes unnamed
            pass
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays (module docstring)
            self._fd = None

    def __enter__(self) -> "Lock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()
