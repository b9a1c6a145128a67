"""The spectra file ``<run>.spectra.h5``: the results of spectrum jobs for one run, one writer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .store import FORMAT_VERSION, H5Handle, RunFileError, WriterLock, _open_for_reading

__all__ = ["SpectraFile", "spectra_path", "SPECTRA_FORMAT"]

SPECTRA_FORMAT = "sharpscope.spectra"


def spectra_path(run_path: str | os.PathLike) -> Path:
    p = Path(run_path)
    return p.with_name(p.stem + ".spectra.h5")


_STR = h5py.string_dtype()
_VLEN = h5py.vlen_dtype(np.float64)
_COLUMNS = {"step": "i8", "quantity": _STR, "settings": _STR, "values": _VLEN, "residuals": _VLEN,
            "num_matvecs": "i8", "seconds": "f8", "info": _STR, "complete": "u1"}


class SpectraFile(H5Handle):
    """The results of spectrum jobs for one run: an append-only SWMR table, one writer."""

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        self.path = Path(path)
        if mode == "a":
            self._lock = WriterLock(self.path)
            if not self.path.exists():
                tmp = self.path.with_name(self.path.name + ".creating")
                with h5py.File(tmp, "w", libver="latest") as f:
                    f.attrs["format"] = SPECTRA_FORMAT
                    f.attrs["format_version"] = FORMAT_VERSION
                    for name, dtype in _COLUMNS.items():
                        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
                os.replace(tmp, self.path)
            else:
                self._recover()
            self._file = h5py.File(self.path, "r+", libver="latest")
            self._file.swmr_mode = True
        else:
            self._file = _open_for_reading(self.path)
        if self._file.attrs.get("format") != SPECTRA_FORMAT:
            self._file.close()
            raise RunFileError(f"{self.path}: not a sharpscope spectra file")

    def _recover(self) -> None:
        """After a crashed writer HDF5 refuses write access: copy the complete rows into a fresh file."""
        try:
            h5py.File(self.path, "r+", libver="latest").close()
            return
        except OSError:
            pass
        tmp = self.path.with_name(self.path.name + ".recovering")
        with _open_for_reading(self.path) as src, h5py.File(tmp, "w", libver="latest") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            n = src["complete"].shape[0]
            for name, dtype in _COLUMNS.items():
                ds = dst.create_dataset(name, shape=(n,), maxshape=(None,), dtype=dtype, chunks=(256,))
                if n:
                    ds[:] = src[name][:n]
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        return int(self._file["complete"].shape[0])

    def keys(self) -> set[tuple[int, str, str]]:
        n = len(self)
        steps = self._file["step"][:n]
        qs = self._file["quantity"].asstr()[:n]
        ss = self._file["settings"].asstr()[:n]
        return {(int(a), str(b), str(c)) for a, b, c in zip(steps, qs, ss)}

    def append(self, row: dict) -> None:
        n = len(self)
        for name in _COLUMNS:
            if name == "complete":
                continue
            ds = self._file[name]
            ds.resize(n + 1, axis=0)
            ds[n] = row[name]
        self._file.flush()
        self._file["complete"].resize(n + 1, axis=0)
        self._file["complete"][n] = 1
        self._file.flush()

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


