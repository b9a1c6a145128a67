"""The spectra file ``<run>.spectra.h5``: the results of spectrum jobs for one run, one writer.

An append-only table (:mod:`.table`) in the file's root group; version 2 rows carry one crc32 over all
their fields, verified on every read. A spectra file belongs to one run: it carries the run's id (root
attribute ``run_id``, and ``info["run_id"]`` in every row, under the row checksum) and is read for a run
only when the ids agree (:func:`belongs`). Layouts, versions and why a version 1 file stays version 1
when appended to: docs/formats.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .h5file import H5Handle, NotSharpscopeFileError, RunFileError, UnsupportedVersionError, WriterLock, open_for_reading
from .table import CHECKSUM, AppendTable, Column, RowChecksum, create_file, create_table, open_for_append

__all__ = ["SpectraFile", "spectra_path", "belongs", "SPECTRA_FORMAT", "SPECTRA_VERSION", "ANY_RUN",
           "ForeignSpectraError"]

SPECTRA_FORMAT = "sharpscope.spectra"
SPECTRA_VERSION = 2  # written by new files
READ_VERSIONS = (1, 2)  # read; appending keeps a file's version
ANY_RUN = object()  # SpectraFile(run_id=ANY_RUN): read without checking whose results they are


class ForeignSpectraError(RunFileError):
    """A spectra file (or row) that belongs to another run than the one it is read or written for."""


def spectra_path(run_path: str | os.PathLike) -> Path:
    """Where a run's results live: ``run.h5`` -> ``run.spectra.h5``."""
    p = Path(run_path)
    return p.with_name(p.stem + ".spectra.h5")


def belongs(spectra_id: str | None, run_id: str | None) -> bool:
    """Whether results carrying ``spectra_id`` are those of the run ``run_id``: the same id, or neither has
    one (files from before run ids, paired by path). A run with an id never owns id-less results: every
    spectra file written for it carries its id."""
    return spectra_id == run_id


def _short(run_id: str | None) -> str:
    return "none (an older file)" if run_id is None else run_id


_STR = h5py.string_dtype()
_VLEN = h5py.vlen_dtype(np.float64)
_COLUMNS = {"step": "i8", "quantity": _STR, "settings": _STR, "values": _VLEN, "residuals": _VLEN,
            "num_matvecs": "i8", "seconds": "f8", "info": _STR}
_ROW_CHECKSUM = RowChecksum(_COLUMNS)  # version 2: one crc32 over the fields, in this order


class SpectraFile(H5Handle):
    """The results of spectrum jobs for one run: an append-only SWMR table, one writer.

    ``run_id``: the id of the run whose results are wanted (``Run.id``; None for a run without one). The
    file is refused (:class:`ForeignSpectraError`, one line) unless it belongs to that run. Reading with
    ``ANY_RUN`` (the default) skips the check; a writer (``mode="a"``) with ``ANY_RUN`` writes for the run
    file beside it (``run.spectra.h5`` -> ``run.h5``; no run there: a run without an id). A writer creates
    a missing file with the run's id."""

    def __init__(self, path: str | os.PathLike, mode: str = "r", *, run_id: Any = ANY_RUN) -> None:
        self.path = Path(path)
        try:
            if mode == "a" and run_id is ANY_RUN:
                run_id = _sibling_run_id(self.path)
            self._file = self._open_append(run_id) if mode == "a" else open_for_reading(self.path)
            if self._file.attrs.get("format") != SPECTRA_FORMAT:
                raise NotSharpscopeFileError(f"{self.path}: not a sharpscope spectra file")
            raw = self._file.attrs.get("format_version", -1)
            if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
                shown = raw.item() if isinstance(raw, np.generic) else raw
                raise RunFileError(f"{self.path}: damaged spectra file (format_version {shown!r} is not an integer)")
            self.version = int(raw)
            if self.version not in READ_VERSIONS:
                raise UnsupportedVersionError(f"{self.path}: spectra format version {self.version} is not supported by "
                                              f"this sharpscope (reads versions {READ_VERSIONS[0]}-{READ_VERSIONS[-1]}): "
                                              "upgrade sharpscope")
            stored = self._file.attrs.get("run_id")
            if stored is not None and not isinstance(stored, str):
                shown = stored.item() if isinstance(stored, np.generic) else stored
                raise RunFileError(f"{self.path}: damaged spectra file (run_id {shown!r} is not a string)")
            self.run_id: str | None = stored
            if run_id is not ANY_RUN and not belongs(self.run_id, run_id):
                raise ForeignSpectraError(f"{self.path}: the results belong to run {_short(self.run_id)}, not to this "
                                     f"run {_short(run_id)}")
            try:
                self._table = AppendTable(self._file, _ROW_CHECKSUM if self.version >= 2 else None,
                                          self._reservation, "results")
            except KeyError as err:
                raise RunFileError(f"{self.path}: damaged spectra file ({err})") from None
        except BaseException:
            self.close()
            raise

    def _open_append(self, run_id: str | None):
        self._lock = WriterLock(self.path)
        if not self.path.exists():
            def build(f: h5py.File) -> None:
                f.attrs["format"] = SPECTRA_FORMAT
                f.attrs["format_version"] = SPECTRA_VERSION
                if run_id is not None:
                    f.attrs["run_id"] = run_id
                columns = {name: Column(dtype, chunk_rows=256) for name, dtype in _COLUMNS.items()}
                create_table(f, {**columns, CHECKSUM: Column("u4", chunk_rows=256)})

            create_file(self.path, build)  # the file appears complete or not at all
        f, self._reservation = open_for_append(self.path, "/")
        return f

    def __len__(self) -> int:
        return len(self._table)

    @property
    def checksummed(self) -> bool:
        """Whether rows carry checksums (version 2) and are verified on every read."""
        return self._table.checksum is not None

    def _read(self, quantity: str | None = None) -> list[dict]:
        """The complete rows (of ``quantity``) as stored, checksums and run ids verified: every column is
        read in one go (a spectra file holds a few thousand small rows at most)."""
        n = len(self)
        f = self._file
        cols = {name: (f[name].asstr()[:n] if dtype is _STR else f[name][:n]) for name, dtype in _COLUMNS.items()}
        stored = f[CHECKSUM][:n] if self.checksummed else None
        out = []
        for i in range(n):
            if quantity is not None and cols["quantity"][i] != quantity:
                continue
            row = {name: cols[name][i] for name in _COLUMNS}
            if stored is not None:
                actual = _ROW_CHECKSUM.compute(row)
                if actual != int(stored[i]):
                    raise RunFileError(f"{self.path}: result row {i} (step {int(row['step'])}, {row['quantity']}) fails "
                                       f"its checksum (stored {int(stored[i]):08x}, read {actual:08x}): the file is "
                                       "damaged; move it away and run the spectrum job again (results are recomputed)")
            row_id = _row_run_id(row["info"])
            if not belongs(row_id, self.run_id):
                raise ForeignSpectraError(f"{self.path}: result row {i} (step {int(row['step'])}, {row['quantity']}) belongs "
                                     f"to run {_short(row_id)}, the file to run {_short(self.run_id)}")
            out.append(row)
        return out

    def keys(self) -> set[tuple[int, str, str]]:
        """``(step, quantity, settings)`` of every complete row (what a job skips)."""
        return {(int(r["step"]), str(r["quantity"]), str(r["settings"])) for r in self._read()}

    def append(self, row: dict) -> None:
        """Append one result; ``row["run_id"]`` (when given) must be this file's run (a row measured on
        another run is refused, never mixed in)."""
        if "run_id" in row and not belongs(row["run_id"], self.run_id):
            raise ForeignSpectraError(f"{self.path}: a result of run {_short(row['run_id'])} cannot go into the results "
                                 f"of run {_short(self.run_id)} (the run file was replaced while the job ran?)")
        values = {name: row[name] for name in _COLUMNS}
        if self.run_id is not None:
            values["info"] = json.dumps({**json.loads(row["info"]), "run_id": self.run_id})
        self._table.append(values)

    def rows(self, quantity: str | None = None) -> list[dict]:
        """All complete results (optionally of one quantity), sorted by quantity and step; a row of a run
        with an id carries it in ``info["run_id"]``."""
        out = [{"step": int(r["step"]), "quantity": str(r["quantity"]), "settings": json.loads(r["settings"]),
                "values": np.array(r["values"], dtype=np.float64), "residuals": np.array(r["residuals"], dtype=np.float64),
                "num_matvecs": int(r["num_matvecs"]), "seconds": float(r["seconds"]), "info": json.loads(r["info"])}
               for r in self._read(quantity)]
        return sorted(out, key=lambda r: (r["quantity"], r["step"]))


def _sibling_run_id(path: Path) -> str | None:
    """The id of the run file a spectra file belongs beside (``run.spectra.h5`` -> ``run.h5``), None if there is
    no such file or it has no id."""
    run_path = path.with_name(path.name.removesuffix(".spectra.h5") + ".h5")
    if not path.name.endswith(".spectra.h5") or not run_path.exists():
        return None
    with open_for_reading(run_path) as f:
        run_id = f.attrs.get("run_id")
    return run_id if isinstance(run_id, str) else None


def _row_run_id(info: str) -> str | None:
    try:
        parsed = json.loads(info)
    except ValueError:
        return None
    return parsed.get("run_id") if isinstance(parsed, dict) else None
