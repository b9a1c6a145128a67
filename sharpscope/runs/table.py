"""The append-only table under both file formats (docs/formats.md, "The append-only table").

Columns are datasets in one group, grown one row at a time in SWMR mode; the ``complete`` column
is grown last, so a row exists exactly when ``complete`` covers it, whatever moment the writer dies
at. A file whose writer crashed is recovered by copying its complete rows into a fresh file that
atomically replaces it (HDF5 refuses to reopen such a file for writing). Before each row the writer
reserves the disk space the row can take (:mod:`.space`): HDF5 never meets a full disk. Version 2 tables carry a
``checksum`` column written with the row (before ``complete``): one crc32 per segment of a row
(:class:`SegmentChecksum`, the run file's tensors) or one over the whole row (:class:`RowChecksum`,
the spectra file).
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import h5py
import numpy as np

from .h5file import LIBVER, RunFileError, open_for_reading
from .space import METADATA_ALLOWANCE, DiskFullError, Reservation, write_new_file

__all__ = ["Column", "AppendTable", "create_table", "open_for_append", "copy_complete", "SegmentChecksum",
           "RowChecksum", "CHECKSUM", "file_image", "create_file", "allocation_bytes", "ColumnSpace"]

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

    def __init__(self, group: h5py.Group, checksum: SegmentChecksum | RowChecksum | None = None,
                 reservation: Reservation | None = None, rows_are: str = "rows") -> None:
        self.group = group
        self.checksum = checksum
        self.reservation = reservation
        self.rows_are = rows_are  # what a row is, for messages ("checkpoints", "results")
        self.columns = [name for name, obj in group.items() if isinstance(obj, h5py.Dataset) and name != COMPLETE]
        if COMPLETE not in group:
            raise KeyError(f"no {COMPLETE!r} column in {group.name}")
        # a writer's columns and their space, looked up once: an h5py lookup costs about 0.1 ms, per column per row
        self._datasets: dict[str, h5py.Dataset] | None = None
        self._space: dict[str, ColumnSpace] | None = None
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

    def _writing(self) -> dict[str, h5py.Dataset]:
        if self._datasets is None:
            self._datasets = {name: self.group[name] for name in (*self.columns, COMPLETE)}
        return self._datasets

    def bytes_needed(self, values: Mapping[str, Any]) -> int:
        """The most appending ``values`` can allocate in the file (:func:`allocation_bytes`)."""
        if self._space is None:
            self._space = {name: ColumnSpace.of(ds) for name, ds in self._writing().items()}
        n = len(self)
        return allocation_bytes([(space, values.get(name), n) for name, space in self._space.items()])

    def append(self, values: Mapping[str, Any]) -> int:
        """Append one row (``values`` has an entry for every column); returns its index. The disk space the
        row can take is reserved first (a full disk stops here, before HDF5 writes anything); every column is
        grown, written and flushed -- its errors raised -- before ``complete`` is grown and flushed."""
        if self.checksum is not None:
            values = {**values, CHECKSUM: self.checksum.compute(values)}
        missing = sorted(set(self.columns) - set(values))
        if missing:
            raise KeyError(f"row lacks column(s) {missing}")
        i = len(self)
        if self.reservation is not None:
            self.reservation.ensure(self.bytes_needed(values), f"the {i} {self.rows_are} stored before are intact")
        datasets = self._writing()
        for name in self.columns:
            ds = datasets[name]
            ds.resize(i + 1, axis=0)  # also drops a row a crashed append left beyond the complete ones
            ds[i] = values[name]
        for name in self.columns:  # the chunk caches are written here, their errors raised (not when closed)
            datasets[name].flush()
        self.group.file.flush()
        done = datasets[COMPLETE]
        done.resize(i + 1, axis=0)
        done[i] = 1
        done.flush()
        self.group.file.flush()
        return i


_VLEN_SLOT = 16  # bytes a variable-length entry takes in its chunk (length + global heap id)


@dataclass(frozen=True)
class ColumnSpace:
    """What one row of a column takes on disk: ``per_row`` bytes in its chunk, ``chunk_rows`` rows per
    chunk, and for variable-length columns (``kind`` ``"str"`` or ``"vlen"`` of ``base``) heap data."""

    per_row: int
    chunk_rows: int
    kind: str = "fixed"
    base: Any = None

    @classmethod
    def of(cls, ds: h5py.Dataset) -> "ColumnSpace":
        slot = int(np.prod(ds.shape[1:], dtype=np.int64))
        chunk_rows = ds.chunks[0] if ds.chunks else 1
        if h5py.check_string_dtype(ds.dtype) is not None:
            return cls(_VLEN_SLOT * slot, chunk_rows, "str")
        base = h5py.check_vlen_dtype(ds.dtype)
        if base is not None:
            return cls(_VLEN_SLOT * slot, chunk_rows, "vlen", base)
        return cls(ds.dtype.itemsize * slot, chunk_rows)

    def bytes(self, value: Any, n: int) -> int:
        """The most writing ``value`` as row ``n`` allocates: a whole new chunk where row ``n`` starts one
        (HDF5 allocates a chunk whole on its first write), and twice the heap data of a variable-length
        value (the global heap grows by collections), plus its heap object header."""
        total = self.per_row * self.chunk_rows if n % self.chunk_rows == 0 else 0
        if self.kind == "str":
            total += 2 * len(value.encode() if isinstance(value, str) else bytes(value or b"")) + _VLEN_SLOT
        elif self.kind == "vlen":
            total += 2 * int(np.asarray(value, dtype=self.base).nbytes) + _VLEN_SLOT
        return total


def allocation_bytes(rows: Iterable[tuple[ColumnSpace, Any, int]]) -> int:
    """The most writing each ``(column, value, row index)`` can allocate (:meth:`ColumnSpace.bytes`), plus
    HDF5's own metadata: a fixed allowance, :data:`~.space.METADATA_ALLOWANCE`."""
    return METADATA_ALLOWANCE + sum(column.bytes(value, n) for column, value, n in rows)


def file_image(build: Callable[[h5py.File], None]) -> bytes:
    """The bytes of a new HDF5 file, built in memory by ``build(f)``: files are created from an image
    written with plain writes (:func:`create_file`), so that creating one never runs HDF5 into a full disk."""
    buf = io.BytesIO()
    with h5py.File(buf, "w", libver=LIBVER) as f:
        build(f)
    return buf.getvalue()


def create_file(path: Path, build: Callable[[h5py.File], None]) -> None:
    """Create ``path`` from :func:`file_image`: written to ``<path>.creating`` and renamed into place, so the
    file appears complete or not at all (a full disk: :class:`~.space.DiskFullError`, nothing left behind)."""
    tmp = path.with_name(path.name + ".creating")
    write_new_file(tmp, file_image(build), "nothing was written", shown=path)
    os.replace(tmp, path)


def open_for_append(path: Path, table: str) -> tuple[h5py.File, Reservation]:
    """Open ``path`` for appending in SWMR mode (the caller holds its :class:`~.h5file.WriterLock`), with the
    file's :class:`~.space.Reservation` (the standing reserve taken before HDF5 opens it; release it after
    closing the file). When HDF5 refuses (a crashed SWMR writer's file, or a reader holding it with a plain
    open), the complete rows of ``table`` are first copied into a fresh file that atomically replaces it."""
    try:
        f = _open_reserved(path)
    except OSError as err:
        if isinstance(err, DiskFullError):
            raise
        tmp = path.with_name(path.name + ".recovering")
        copy_complete(path, tmp, table)
        os.replace(tmp, path)
        f = _open_reserved(path)
    return f


def _open_reserved(path: Path) -> tuple[h5py.File, Reservation]:
    reservation = Reservation(path)
    try:
        reservation.ensure(0, "nothing was changed")
        f = h5py.File(path, "r+", libver=LIBVER)
    except BaseException:
        reservation.release()
        raise
    try:
        f.swmr_mode = True
    except BaseException:
        f.close()
        reservation.release()
        raise
    return f, reservation


def copy_complete(src: Path, dst: Path, table: str) -> None:
    """Copy ``src`` into a fresh (not SWMR-flagged) ``dst``: attributes and every other object as
    they are, the columns of ``table`` (a top-level group's name, or ``"/"``) cut to the complete rows,
    each with its dtype, chunking and maximum shape. ``dst`` is created from an empty image and the
    copy's space (the size of ``src``) is reserved before HDF5 writes; on any failure ``dst`` -- a
    partial copy of ours, ``src`` is untouched -- is removed."""
    kept = f"{src} is unchanged (recovering it needs a copy)"
    write_new_file(dst, file_image(lambda f: None), kept, shown=src)
    reservation = None
    try:
        reservation = Reservation(dst)
        try:
            reservation.ensure(os.path.getsize(src), kept)
        except DiskFullError as err:
            raise DiskFullError(src, err.free, err.need, kept) from None
        with open_for_reading(src) as f, h5py.File(dst, "r+", libver=LIBVER) as g:
            _copy_into(f, g, table)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    finally:
        if reservation is not None:
            reservation.release()


def _copy_into(f: h5py.File, g: h5py.File, table: str) -> None:
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
    if COMPLETE not in src_grp:
        raise RunFileError(f"{f.filename}: damaged ({COMPLETE!r} column missing): cannot recover it")
    n = int(src_grp[COMPLETE].shape[0])
    for name, ds in src_grp.items():
        if not isinstance(ds, h5py.Dataset):
            f.copy(ds, dst_grp, name)
            continue
        new = dst_grp.create_dataset(name, shape=(n, *ds.shape[1:]), maxshape=ds.maxshape, chunks=ds.chunks,
                                     dtype=ds.dtype)
        if not n:
            continue
        if h5py.check_vlen_dtype(ds.dtype) is not None and h5py.check_string_dtype(ds.dtype) is None:
            for i, row in enumerate(ds[:n]):  # row by row: equal-length rows would read back as one 2-D array
                new[i] = row
        else:
            new[:n] = ds[:n]
