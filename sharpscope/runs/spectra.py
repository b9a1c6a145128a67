"""The spectra file ``<run>.spectra.h5``: the results of spectrum jobs for one run, one writer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .h5file import LIBVER, H5Handle, RunFileError, WriterLock, open_for_reading
from .table import AppendTable, Column, create_table, open_for_append

__all__ = ["SpectraFile", "spectra_path", "SPECTRA_FORMAT"]

SPECTRA_FORMAT = "sharpscope.spectra"
SPECTRA_VERSION = 1


def spectra_path(run_path: str | os.PathLike) -> Path:
    p = Path(run_path)
    return p.with_name(p.stem + ".spectra.h5")


_STR = h5py.string_dtype()
_VLEN = h5py.vlen_dtype(np.float64)
_COLUMNS = {"step": "i8", "quantity": _STR, "settings": _STR, "values": _VLEN, "residuals": _VLEN,
            "num_matvecs": "i8", "seconds": "f8", "info": _STR}


class SpectraFile(H5Handle):
    """The results of spectrum jobs for one run: an append-only SWMR table, one writer."""

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        self.path = Path(path)
        try:
            self._file = self._open_append() if mode == "a" else open_for_reading(self.path)
            if self._file.attrs.get("format") != SPECTRA_FORMAT:
                raise RunFileError(f"{self.path}: not a sharpscope spectra file")
            self._table = AppendTable(self._file)
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
                create_table(f, {name: Column(dtype, chunk_rows=256) for name, dtype in _COLUMNS.items()})
            os.replace(tmp, self.path)  # the file appears complete or not at all
        return open_for_append(self.path, "/")

    def __len__(self) -> int:
        return len(self._table)

    def keys(self) -> set[tuple[int, str, str]]:
        n = len(self)
        steps = self._file["step"][:n]
        qs = self._file["quantity"].asstr()[:n]
        ss = self._file["settings"].asstr()[:n]
        return {(int(a), str(b), str(c)) for a, b, c in zip(steps, qs, ss)}

    def append(self, row: dict) -> None:
        self._table.append({name: row[name] for name in _COLUMNS})

    def rows(self, quantity: str | None = None) -> list[dict]:
        """All complete results (optionally of one quantity), sorted by step."""
        n = len(self)
        f = self._file
        out = []
        for i in range(n):
            q = f["quantity"].asstr()[i]
            if quantity is not None and q != quantity:
                continue
            out.append({"step": int(f["step"][i]), "quantity": q, "settings": json.loads(f["settings"].asstr()[i]),
                        "values": np.array(f["values"][i]), "residuals": np.array(f["residuals"][i]),
                        "num_matvecs": int(f["num_matvecs"][i]), "seconds": float(f["seconds"][i]),
                        "info": json.loads(f["info"].asstr()[i])})
        return sorted(out, key=lambda r: (r["quantity"], r["step"]))


