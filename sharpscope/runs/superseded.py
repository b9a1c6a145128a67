"""Nothing stored is deleted: what sharpscope will not use is moved to ``superseded/<stamp>/`` beside
it, with a line in ``superseded/<stamp>/NOTES.txt`` saying what it was and why (docs/formats.md,
"Moving aside, never deleting")."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from .h5file import RunFileError, WriterLock

__all__ = ["Aside", "SUPERSEDED", "NOTES"]

SUPERSEDED = "superseded"
NOTES = "NOTES.txt"


class Aside:
    """Moves files of one folder into one fresh ``<folder>/superseded/<stamp>/`` (made on the first move).

    ``who`` names the command in the notes (``"sharpscope sweep"``). Each move takes the file's writer
    lock (a file being written is never moved) unless the caller holds it already (``locked=True``)."""

    def __init__(self, folder: str | os.PathLike, who: str) -> None:
        self.folder = Path(folder)
        self.who = who
        self.target: Path | None = None
        self.moved: list[tuple[Path, str]] = []

    def _target(self) -> Path:
        if self.target is None:
            root = self.folder / SUPERSEDED
            root.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for n in range(1, 10_000):
                candidate = root / (stamp if n == 1 else f"{stamp}-{n}")
                try:
                    candidate.mkdir()
                except FileExistsError:
                    continue
                self.target = candidate
                break
            else:  # pragma: no cover - ten thousand moves in one second
                raise RunFileError(f"{root}: cannot make a fresh folder for {stamp}")
        return self.target

    def move(self, path: str | os.PathLike, reason: str, *, locked: bool = False) -> Path:
        """Move ``path`` (which must be in this folder) aside with ``reason``; returns where it went."""
        path = Path(path)
        lock = None
        if not locked:
            try:
                lock = WriterLock(path)
            except RunFileError as err:
                raise RunFileError(f"{path} cannot be moved aside ({reason}): {err}") from None
        try:
            target = self._target()
            moved = target / path.name
            if moved.exists():  # two files of one name in one move: never overwrite
                raise RunFileError(f"{moved} exists: {path} not moved")
            os.rename(path, moved)
            self._note(moved, path, reason)
            self.moved.append((moved, reason))
            return moved
        finally:
            if lock is not None:
                lock.release()

    def _note(self, moved: Path, original: Path, reason: str) -> None:
        line = (f"{moved.name}: {reason} (moved from {original} by {self.who}, pid {os.getpid()} on "
                f"{socket.gethostname()}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')})\n")
        with open(moved.parent / NOTES, "a", encoding="utf-8") as fh:
            fh.write(line)

    def summary(self) -> str | None:
        """One line for the command's output: how many files went where (None if none)."""
        if not self.moved:
            return None
        return f"{len(self.moved)} file(s) moved aside to {self.target} (reasons in {self.target / NOTES})"

