"""The append-only table under both file formats (docs/formats.md, "The append-only table").

Columns are datasets in one group, grown one row at a time in SWMR mode; the ``complete`` column
is grown last, so a row exists exactly when ``complete`` covers it, whatever moment the writer dies
at. A file whose writer crashed is recovered by copying its complete rows into a fresh file that
atomically replaces it (HDF5 refuses to reopen such a file for writing). Version 2 tables carry a
``checksum`` column written with the row (before ``complete``): one crc32 per segment of a row
(:class:`SegmentChecksum`, the run file's tensors) or one over the whole row (:class:`RowChecksum`,
the spectra file).
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from .h5file import LIBVER, open_for_reading

__all__ = ["Column", "AppendTable", "create_table", "open_for_append", "copy_complete", "SegmentChecksum",
           "RowChecksum", "CHECKSUM"]

COMPLETE = "complete"
CHECKSUM = "checksum"


@dataclass(frozen=True)
class Column:
    """A column: its dtype, the shape of one row's entry, how many rows a chunk holds and (for very
    long rows) the chunk's shape within a row (default: the whole row)."""

    dtype: Any
    shape: tuple[int, ...] = ()
    chunk_rows: int = 1024
    row_chunk: tuple[int, ...] | None = None

    @property
    def chunks(self) -> tuple[int, ...]:
        return (self.chunk_rows, *(max(1, n) for n in (self.row_chunk or self.shape)))


def create_table(group: h5py.Group, columns: Mapping[str, Column]) -> None:
    """Create the (empty) columns and ``complete`` in ``group`` (before the file turns SWMR: in
    SWMR mode no dataset can be created)."""
    for name, col in {**columns, COMPLETE: Column("u1")}.items():
        group.create_dataset(name, shape=(0, *col.shape), maxshape=(None,) * (1 + len(col.shape)), dtype=col.dtype,
                             chunks=col.chunks)


def _little_endian(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))


def crc32(arr: np.ndarray) -> int:
    """crc32 (zlib, initial value 0) of an array's elements as little-endian bytes."""
    return zlib.crc32(_little_endian(np.asarray(arr)).reshape(-1).view(np.uint8))


class SegmentChecksum:
    """One crc32 per segment of a row; segment ``j`` is ``row[column][offset : offset + size]``.
    The run file has one segment per stored tensor, so a damaged row names the damaged tensor."""

    def __init__(self, segments: Sequence[tuple[str, int, int]]) -> None:
        self.segments = list(segments)

    def compute(self, values: Mapping[str, Any]) -> np.ndarray:
        return np.array([crc32(values[col][off: off + size]) for col, off, size in self.segments], dtype=np.uint32)

    def mismatches(self, stored: np.ndarray, values: Mapping[str, Any], which: Iterable[int]
                   ) -> list[tuple[int, int, int]]:
        """``(segment, stored crc, crc of the data)`` for every segment in ``which`` that differs."""
        out = []
        for j in which:
            col, off, size = self.segments[j]
            actual = crc32(values[col][off: off + size])
            if actual != int(stored[j]):
                out.append((j, int(stored[j]), actual))
        return out


def field_bytes(dtype: Any, value: Any) -> bytes:
    """A field's bytes as checksummed: strings as UTF-8, numbers and variable-length arrays as
    their elements' little-endian bytes in the column's (base) dtype."""
    if h5py.check_string_dtype(np.dtype(dtype)) is not None:
        return value.encode() if isinstance(value, str) else bytes(value)
    base = h5py.check_vlen_dtype(np.dtype(dtype))
    return _little_endian(np.asarray(value, dtype=base if base is not None else dtype)).tobytes()


class RowChecksum:
    """One crc32 over the fields of a row, in the order of ``fields`` (name -> column dtype): each
    field contributes its byte length (8 bytes, little-endian) and its bytes (:func:`field_bytes`)."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = dict(fields)

    def compute(self, values: Mapping[str, Any]) -> int:
        crc = 0
        for name, dtype in self.fields.items():
            data = field_bytes(dtype, values[name])
            crc = zlib.crc32(data, zlib.crc32(struct.pack("<Q", len(data)), crc))
        return crc


class AppendTable:
    """The table in ``group``: how many rows are complete, appending one row, following a writer.
    With a ``checksum`` scheme, :meth:`append` fills the ``checksum`` column from the row."""

    def __init__(self, group: h5py.Group, checksum: SegmentChecksum | RowChecksum | None = None) -> None:
        self.group = group
        self.checksum = checksum
        self.columns = [name for name, obj in group.items() if isinstance(obj, h5py.Dataset) and name != COMPLETE]
        if COMPLETE not in group:
            raise KeyError(f"no {COMPLETE!r} column in {group.name}")
        if checksum is not None and CHECKSUM not in group:
            raise KeyError(f"no {CHECKSUM!r} column in {group.name}")

    def __len__(self) -> int:
        """The number of complete rows."""
        return int(self.group[COMPLETE].shape[0])

    def __getitem__(self, name: str) -> h5py.Dataset:
        return self.group[name]

    @property
    def present(self) -> int:
        """Rows present in any column: complete ones plus one being written (or lost in a crash)."""
        return max(int(self.group[name].shape[0]) for name in (*self.columns, COMPLETE))

    def refresh(self) -> None:
        """See rows a live writer appended since (SWMR readers see them after a refresh)."""
        for name in (*self.columns, COMPLETE):
            self.group[name].refresh()

    def append(self, values: Mapping[str, Any]) -> int:
        """Append one row (``values`` has an entry for every column); returns its index. Every column
        is grown and written and the file flushed before ``complete`` is grown and flushed."""
        if self.checksum is not None:
            values = {**values, CHECKSUM: self.checksum.compute(values)}
        missing = sorted(set(self.columns) - set(values))
        if missing:
            raise KeyError(f"row lacks column(s) {missing}")
        i = len(self)
        for name in self.columns:
            ds = self.group[name]
            ds.resize(i + 1, axis=0)  # also drops a row a crashed append left beyond the complete ones
            ds[i] = values[name]
        self.group.file.flush()
        done = self.group[COMPLETE]
        done.resize(i + 1, axis=0)
        done[i] = 1
        self.group.file.flush()
        return i


def open_for_append(path: Path, table: str) -> h5py.File:
    """Open ``path`` for appending in SWMR mode (the caller holds its :class:`~.h5file.WriterLock`).
    When HDF5 refuses (a crashed SWMR writer's file, or a reader holding it with a plain open),
    the complete rows of ``table`` are first copied into a fresh file that atomically replaces it."""
    try:
        f = h5py.File(path, "r+", libver=LIBVER)
    except OSError:
        tmp = path.with_name(path.name + ".recovering")
        copy_complete(path, tmp, table)
        os.replace(tmp, path)
        f = h5py.File(path, "r+", libver=LIBVER)
    f.swmr_mode = True
    return f


def copy_complete(src: Path, dst: Path, table: str) -> None:
    """Copy ``src`` into a fresh (not SWMR-flagged) ``dst``: attributes and every other object as
    they are, the columns of ``table`` (a top-level group's name, or ``"/"``) cut to the complete rows,
    each with its dtype, chunking and maximum shape."""
    with open_for_reading(src) as f, h5py.File(dst, "w", libver=LIBVER) as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        at_root = table.strip("/") == ""
        for name, obj in f.items():
            if (not at_root and name == table) or (at_root and isinstance(obj, h5py.Dataset)):
                continue
            f.copy(obj, g, name)
        src_grp = f if at_root else f[table]
        dst_grp = g if at_root else g.create_group(table)
        if not at_root:
            for key, value in src_grp.attrs.items():
                dst_grp.attrs[key] = value
        n = int(src_grp[COMPLETE].shape[0])
        for name, ds in src_grp.items():
            if not isinstance(ds, h5py.Dataset):
                f.copy(ds, dst_grp, name)
                continue
            new = dst_grp.create_dataset(name, shape=(n, *ds.shape[1:]), maxshape=ds.maxshape, chunks=ds.chunks,
                                         dtype=ds.dtype)
            if n:
                new[:n] = ds[:n]
