"""The spectra file ``<run>.spectra.h5``: the results of spectrum jobs for one run, one writer.

An append-only table (:mod:`.table`) in the file's root group; version 2 rows carry one crc32 over all
their fields, verified on every read. Layouts, versions and why a version 1 file stays version 1
when appended to: docs/formats.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .h5file import LIBVER, H5Handle, RunFileError, WriterLock, open_for_reading
from .table import CHECKSUM, AppendTable, Column, RowChecksum, create_table, open_for_append

__all__ = ["SpectraFile", "spectra_path", "SPECTRA_FORMAT", "SPECTRA_VERSION"]

SPECTRA_FORMAT = "sharpscope.spectra"
SPECTRA_VERSION = 2  # written by new files
READ_VERSIONS = (1, 2)  # read; appending keeps a file's version


def spectra_path(run_path: str | os.PathLike) -> Path:
    p = Path(run_path)
    return p.with_name(p.stem + ".spectra.h5")


_STR = h5py.string_dtype()
_VLEN = h5py.vlen_dtype(np.float64)
_COLUMNS = {"step": "i8", "quantity": _STR, "settings": _STR, "values": _VLEN, "residuals": _VLEN,
            "num_matvecs": "i8", "seconds": "f8", "info": _STR}
_ROW_CHECKSUM = RowChecksum(_COLUMNS)  # version 2: one crc32 over the fields, in this order


class SpectraFile(H5Handle):
    """The results of spectrum jobs for one run: an append-only SWMR table, one writer."""

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        self.path = Path(path)
        try:
            self._file = self._open_append() if mode == "a" else open_for_reading(self.path)
            if self._file.attrs.get("format") != SPECTRA_FORMAT:
                raise RunFileError(f"{self.path}: not a sharpscope spectra file")
            self.version = int(self._file.attrs.get("format_version", -1))
            if self.version not in READ_VERSIONS:
                raise RunFileError(f"{self.path}: spectra format version {self.version} is not supported by this "
                                   f"sharpscope (reads versions {READ_VERSIONS[0]}-{READ_VERSIONS[-1]}): upgrade sharpscope")
            try:
                self._table = AppendTable(self._file, _ROW_CHECKSUM if self.version >= 2 else None)
            except KeyError as err:
                raise RunFileError(f"{self.path}: damaged spectra file ({err})") from None
        except BaseException:
            self.close()
            raise

    def _open_append(self) -> h5py.File:
        self._lock = WriterLock(self.path)
        if not self.path.exists():
            tmp = self.path.with_name(self.path.name + ".creating")
            with h5py.File(tmp, "w", libver=LIBVER) as f:
                f.attrs["format"] = SPECTRA_FORMAT
                f.attrs["format_version"] = SPECTRA_VERSION
                columns = {name: Column(dtype, chunk_rows=256) for name, dtype in _COLUMNS.items()}
                create_table(f, {**columns, CHECKSUM: Column("u4", chunk_rows=256)})
            os.replace(tmp, self.path)  # the file appears complete or not at all
        return open_for_append(self.path, "/")

    def __len__(self) -> int:
        return len(self._table)

    @property
    def checksummed(self) -> bool:
        """Whether rows carry checksums (version 2) and are verified on every read."""
        return self._table.checksum is not None

    def _read(self, quantity: str | None = None) -> list[dict]:
        """The complete rows (of ``quantity``) as stored, checksums verified: every column is read in
        one go (a spectra file holds a few thousand small rows at most)."""
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
                                       "damaged; delete it and run the spectrum job again (results are recomputed)")
            out.append(row)
        return out

    def keys(self) -> set[tuple[int, str, str]]:
        """``(step, quantity, settings)`` of every complete row (what a job skips)."""
        return {(int(r["step"]), str(r["quantity"]), str(r["settings"])) for r in self._read()}

    def append(self, row: dict) -> None:
        self._table.append({name: row[name] for name in _COLUMNS})

    def rows(self, quantity: str | None = None) -> list[dict]:
        """All complete results (optionally of one quantity), sorted by quantity and step."""
        out = [{"step": int(r["step"]), "quantity": str(r["quantity"]), "settings": json.loads(r["settings"]),
                "values": np.array(r["values"], dtype=np.float64), "residuals": np.array(r["residuals"], dtype=np.float64),
                "num_matvecs": int(r["num_matvecs"]), "seconds": float(r["seconds"]), "info": json.loads(r["info"])}
               for r in self._read(quantity)]
        return sorted(out, key=lambda r: (r["quantity"], r["step"]))
