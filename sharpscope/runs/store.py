"""The HDF5 run file: writing checkpoints crash-safely, reading them validated. Nothing is ever unpickled.

The layout of every version (1 and 2; new files are 2) and the reading rules are in docs/formats.md.
In short: ``/meta`` (JSON description, axes), ``/provenance`` (config, its digest, versions),
``/batch`` (the stored data batch), ``/checkpoints`` (an append-only table: step, loss, time, lr,
one flat row per dtype holding every tensor, one crc32 per tensor, ``complete``) and ``/scalars``.

Crash safety. Every dataset is created up front and the writer switches to HDF5's single-writer /
multiple-reader mode (SWMR), in which the library orders its metadata writes so that the file stays
readable whatever moment the writer dies at. A checkpoint is appended by growing every dataset by
one row, writing and flushing it, and only then growing ``complete`` (:mod:`.table`): a reader sees
exactly the rows that ``complete`` covers and reports any row beyond as incomplete. After a crash the
file can be read at once; appending again (``RunWriter.resume``) first copies the complete
checkpoints into a fresh file that atomically replaces the old one (HDF5 refuses to reopen a crashed
SWMR file for writing), so the row being written at the crash is the only loss.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np
import torch

from .batch import Batch, batch_problems, read_batch, to_numpy, write_batch
from .h5file import H5Handle, NotSharpscopeFileError, RunFileError, UnsupportedVersionError, WriterLock, open_for_reading
from .provenance import check_axes, config_digest, provenance_record, software_versions
from .space import DiskFullError
from .table import CHECKSUM, AppendTable, Column, ColumnSpace, SegmentChecksum, allocation_bytes, create_file, create_table, open_for_append

__all__ = ["H5Handle", "WriterLock", "RunWriter", "Run", "open_run", "RunFileError", "FORMAT", "FORMAT_VERSION",
           "READ_VERSIONS", "TensorSpec", "logged_losses", "first_diverged_step"]

FORMAT = "sharpscope.run"
FORMAT_VERSION = 2  # written by new files
READ_VERSIONS = (1, 2)  # read; appending to a file keeps its version


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: an id, what it is (``param``, ``buffer``, ``optim``), its name, shape and
    dtype, for optimizer state the state key (``exp_avg_sq``, ``step``...), and where it lives (the
    flat dataset of its dtype and its offset there; assigned by :class:`RunWriter`)."""

    id: str
    kind: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    key: str | None = None
    dataset: str = ""
    offset: int = 0

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _layout(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Assign each tensor its flat dataset (one per dtype) and offset."""
    totals: dict[str, int] = {}
    out = []
    for s in specs:
        name = f"flat_{s.dtype}"
        out.append(replace(s, dataset=name, offset=totals.get(name, 0)))
        totals[name] = totals.get(name, 0) + s.numel
    return out


def _totals(specs: list[TensorSpec]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for s in specs:
        totals[s.dataset] = max(totals.get(s.dataset, 0), s.offset + s.numel)
    return totals



_np = to_numpy  # a tensor as stored (bfloat16 as float32)


def _as_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"{what} must be JSON-serializable (no objects are pickled): {err}") from None


def _segments(specs: list[TensorSpec]) -> SegmentChecksum:
    """One checksum segment per tensor, in the order of the specs."""
    return SegmentChecksum([(s.dataset, s.offset, s.numel) for s in specs])


def _tensor_label(spec: TensorSpec) -> str:
    return f"{spec.kind} {spec.name}{'/' + spec.key if spec.key else ''}"


class StepList(list):
    """The steps of complete checkpoints; calling it (``writer.steps()``, a method until now) still
    works, with a DeprecationWarning, for one release (CHANGELOG.md)."""

    def __call__(self) -> list[int]:
        warnings.warn("RunWriter.steps is a property now (like Run.steps): drop the call parentheses",
                      DeprecationWarning, stacklevel=2)
        return list(self)


class RunWriter(H5Handle):
    """The one writer of a run file (used by :class:`sharpscope.Recorder`).

    Args:
        path: the run file to create (refused if it exists; use :meth:`resume`).
        meta: JSON-able description (model factory, kwargs, loss, optimizer, seed, user data).
        tensors: the tensors captured at every checkpoint (see :class:`TensorSpec`).
        lr_groups: number of optimizer param groups (columns of ``lr``).
        batch: optional data batch stored once: ``(inputs, targets)`` or a mapping of named tensors.
        config: the caller's config, stored with its digest in ``/provenance`` (docs/formats.md).
        recorded: what the Recorder knows itself (model, optimizer, loss, schedule), for ``/provenance``.
        axes: the run's coordinates (name -> number or string), ``Run.axes``.

    The file gets a new run id (``Run.id``, docs/formats.md "Run identity") and is created from an image
    built in memory (a full disk is one :class:`~.space.DiskFullError` line, nothing left behind); every
    later write reserves its disk space first (:mod:`.space`).
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, Any], tensors: list[TensorSpec],
                 lr_groups: int = 0, batch: Batch | Mapping[str, torch.Tensor] | None = None,
                 scalars: Iterable[str] = ("sharpness", "loss"), *, config: Mapping[str, Any] | None = None,
                 recorded: Mapping[str, Any] | None = None, axes: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists: resume it (RunWriter.resume) or choose a new path")
        meta_json = _as_json(dict(meta), "meta")
        axes_json = json.dumps(check_axes(axes), sort_keys=True)
        tensors = _layout(tensors)
        recorded = dict(recorded or {})
        provenance_record(config, recorded)  # refuse a config that is not JSON before creating anything
        self.run_id = uuid.uuid4().hex

        def build(f: h5py.File) -> None:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["run_id"] = self.run_id
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["versions"] = json.dumps(software_versions())
            f.create_group("meta").attrs["json"] = meta_json
            f["meta"].attrs["axes"] = axes_json
            digest = write_batch(f.create_group("batch"), batch) if batch is not None else None
            f.create_group("provenance").attrs["json"] = json.dumps(
                provenance_record(config, {**recorded, "batch_digest": digest}), sort_keys=True)
            grp = f.create_group("checkpoints")
            grp.attrs["tensors"] = json.dumps([asdict(s) for s in tensors])
            create_table(grp, _checkpoint_columns(tensors, lr_groups, checksums=True))
            _create_scalar_logs(f.create_group("scalars"), scalars)

        self._lock = WriterLock(self.path)
        try:
            create_file(self.path, build)  # the file appears complete or not at all
            self._open()
        except BaseException:
            self.close()
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike) -> "RunWriter":
        """Reopen an existing run for appending, dropping an incomplete last checkpoint (after a crash).
        The file keeps its version: a version 1 run gets version 1 checkpoints (no checksums)."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._lock = WriterLock(self.path)  # before touching the file: never under a live writer
        try:
            open_run(self.path).close()  # validates
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def _open(self) -> None:
        try:
            self._file, self._reservation = open_for_append(self.path, "checkpoints")
        except DiskFullError:
            self.close()
            raise
        except (OSError, BlockingIOError) as err:
            self.close()
            raise RunFileError(f"{self.path}: cannot open for writing ({err})") from None
        self.version = int(self._file.attrs["format_version"])
        self.run_id = self._file.attrs.get("run_id")
        grp = self._file["checkpoints"]
        self._specs = _spec_list(grp.attrs["tensors"])
        self._totals = _totals(self._specs)
        self._grp = grp
        self._table = AppendTable(grp, _segments(self._specs) if self.version >= 2 else None, self._reservation,
                                  "checkpoints")

    @property
    def specs(self) -> list[TensorSpec]:
        return list(self._specs)

    @property
    def num_checkpoints(self) -> int:
        return len(self._table)

    @property
    def steps(self) -> StepList:
        """Steps of the complete checkpoints (like :attr:`Run.steps`)."""
        return StepList(int(s) for s in self._grp["step"][: len(self._table)])

    def append(self, step: int, tensors: Mapping[str, torch.Tensor | None], loss: float = float("nan"),
               lrs: Iterable[float] = ()) -> None:
        """Append one checkpoint; ``tensors`` maps each spec's id to its tensor (None: a NaN slot)."""
        grp = self._grp
        rows = {name: np.empty(total, dtype=grp[name].dtype) for name, total in self._totals.items()}
        for spec in self._specs:
            value = tensors.get(spec.id)
            slot = rows[spec.dataset][spec.offset: spec.offset + spec.numel]
            if value is None:
                slot[:] = np.nan
                continue
            arr = _np(value)
            if tuple(arr.shape) != spec.shape:
                raise ValueError(f"{_tensor_label(spec)} has shape {tuple(arr.shape)}, the run stores {spec.shape}")
            slot[:] = arr.reshape(-1)
        lr_row = np.asarray(list(lrs), dtype=np.float64)
        if lr_row.shape != (grp["lr"].shape[1],):
            raise ValueError(f"expected {grp['lr'].shape[1]} learning rates, got {lr_row.shape[0]}")
        self._table.append({"step": step, "loss": loss, "time": time.time(), "lr": lr_row, **rows})

    def log_scalar(self, name: str, step: int, value: float) -> None:
        """Append ``(step, value)`` to the scalar log ``name`` (e.g. online sharpness)."""
        grp = self._file["scalars"]
        if name not in grp:
            raise KeyError(f"{self.path} has no scalar log {name!r} (has: {sorted(grp)})")
        ds = grp[name]
        i = ds.shape[0]
        self._reservation.ensure(allocation_bytes([(ColumnSpace.of(ds), None, i)]),
                                 f"the {name} log's {i} entries stored before are intact")
        ds.resize(i + 1, axis=0)
        ds[i] = (step, value)
        ds.flush()


def _checkpoint_columns(specs: list[TensorSpec], lr_groups: int, checksums: bool) -> dict[str, Column]:
    columns = {"step": Column("i8"), "loss": Column("f8"), "time": Column("f8"), "lr": Column("f8", (lr_groups,))}
    dtypes = {s.dataset: s.dtype for s in specs}
    for name, total in _totals(specs).items():  # one row per chunk, at most 2**24 elements per chunk
        columns[name] = Column(dtypes[name], (total,), chunk_rows=1, row_chunk=(min(total, 1 << 24),))
    if checksums:  # (N, number of tensors) uint32; chunks of about 64 KiB
        columns[CHECKSUM] = Column("u4", (len(specs),), chunk_rows=max(1, min(1024, 16384 // max(1, len(specs)))))
    return columns


def _create_scalar_logs(grp: h5py.Group, names: Iterable[str]) -> None:
    for name in names:
        grp.create_dataset(name, shape=(0, 2), maxshape=(None, 2), dtype="f8", chunks=(256, 2))


_SPEC_KEYS = {"id", "kind", "name", "shape", "dtype", "key", "dataset", "offset"}
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def _plain(value: Any) -> Any:
    """A stored attribute as Python shows it (``2.5``, not ``np.float64(2.5)``), for messages."""
    return value.item() if isinstance(value, np.generic) else value


def _json_attr(attrs: h5py.AttributeManager, name: str, what: str, kind: type, default: str | None = None) -> Any:
    """A JSON attribute that must hold a value of type ``kind`` (a one-line ValueError otherwise)."""
    if name not in attrs and default is not None:
        raw = default
    else:
        raw = attrs[name]
    if not isinstance(raw, (str, bytes)):
        raise ValueError(f"{what} is a {type(_plain(raw)).__name__}, not a JSON string")
    value = json.loads(raw)
    if not isinstance(value, kind):
        raise ValueError(f"{what} is a JSON {type(value).__name__}, not {'an object' if kind is dict else kind.__name__}")
    return value


def _spec_list(raw: str) -> list[TensorSpec]:
    """The stored tensor list, each entry checked (an edited list fails here, in one line)."""
    entries = json.loads(raw)
    if not isinstance(entries, list):
        raise ValueError("the tensor list is not a JSON list")
    specs = []
    for e in entries:
        if not isinstance(e, dict) or not {"id", "kind", "name", "shape", "dtype"} <= set(e) or set(e) - _SPEC_KEYS:
            raise ValueError(f"a tensor entry is malformed: {str(e)[:80]}")
        shape = e["shape"]
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"tensor {e['name']!r} has an invalid shape {shape!r}")
        offset = e.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"tensor {e['name']!r} has an invalid offset {offset!r}")
        specs.append(TensorSpec(**{**e, "shape": tuple(shape)}))
    return specs


def _check_layout(grp: h5py.Group, specs: list[TensorSpec]) -> None:
    """Every tensor lies inside an existing flat dataset of its dtype."""
    widths: dict[str, int] = {}  # one h5py lookup per dataset, not per tensor
    for s in specs:
        if s.dataset not in widths:
            if s.dataset not in grp:
                raise ValueError(f"tensor {s.name!r} points to a missing dataset {s.dataset!r}")
            shape = grp[s.dataset].shape
            widths[s.dataset] = shape[1] if len(shape) == 2 else -1
        width = widths[s.dataset]
        if s.offset + s.numel > width:
            raise ValueError(f"tensor {s.name!r} (offset {s.offset}, {s.numel} entries) lies outside its dataset "
                             f"{s.dataset!r} of width {width}")


class Run(H5Handle):
    """Read side of a run file (use :func:`open_run`); can follow a file that is being written.

    Attributes:
        id: the run's id (32 hex digits), None for files written before run ids (docs/formats.md).
        meta: the stored description (dict).
        axes: the run's coordinates given to the Recorder (``{}`` for version 1 files).
        provenance: config, config digest, what the Recorder saw, versions (None for version 1 files).
        version: the file's format version (1 or 2); version 2 rows are checksummed.
        steps: sorted steps of complete checkpoints.
        incomplete: number of rows present beyond the complete ones (a checkpoint being written or lost).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such run file")
        self._file = open_for_reading(self.path)
        f = self._file
        try:
            fmt = f.attrs.get("format")
            if fmt != FORMAT:
                raise NotSharpscopeFileError(f"{self.path}: not a sharpscope run file (format attribute {fmt!r})")
            version = f.attrs.get("format_version", -1)
            if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
                raise RunFileError(f"{self.path}: damaged run file (format_version {_plain(version)!r} is not an "
                                   "integer)")
            if int(version) not in READ_VERSIONS:
                raise UnsupportedVersionError(f"{self.path}: run format version {int(version)} is not supported by "
                                              f"this sharpscope (reads versions {READ_VERSIONS[0]}-{READ_VERSIONS[-1]}): "
                                              "upgrade sharpscope")
            self.version = int(version)
            self._read_description(f)
        except RunFileError:
            self.close()
            raise
        except (KeyError, ValueError, TypeError, RecursionError) as err:
            self.close()
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
            raise RunFileError(f"{self.path}: damaged run file ({reason})") from None

    def _read_description(self, f: h5py.File) -> None:
        """The typed attributes (docs/formats.md, reading rule 8): each a JSON value of its type."""
        version = self.version
        run_id = f.attrs.get("run_id")
        if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.fullmatch(run_id)):
            raise ValueError(f"run_id {_plain(run_id)!r} is not 32 hex digits")
        self.id: str | None = run_id
        self.meta: dict = _json_attr(f["meta"].attrs, "json", "the meta", dict)
        self.axes: dict = _json_attr(f["meta"].attrs, "axes", "the axes", dict, "{}") if version >= 2 else {}
        self.provenance: dict | None = _json_attr(f["provenance"].attrs, "json", "the provenance record", dict) \
            if version >= 2 and "provenance" in f else None
        self.versions: dict = _json_attr(f.attrs, "versions", "the versions attribute", dict, "{}")
        self._grp = f["checkpoints"]
        self.specs = _spec_list(self._grp.attrs["tensors"])
        _check_layout(self._grp, self.specs)
        self._segments = _segments(self.specs) if version >= 2 else None
        self._table = AppendTable(self._grp, self._segments)

    @property
    def checksummed(self) -> bool:
        """Whether checkpoint rows carry checksums (version 2) and are verified on every read."""
        return self._segments is not None

    # -- following a live file -----------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up checkpoints appended since opening (SWMR readers see new rows after a refresh)."""
        self._table.refresh()

    @property
    def num_checkpoints(self) -> int:
        return len(self._table)

    @property
    def incomplete(self) -> int:
        return self._table.present - len(self._table)

    @property
    def steps(self) -> list[int]:
        n = self.num_checkpoints
        return [int(s) for s in self._grp["step"][:n]]

    def _row(self, step: int) -> int:
        steps = self.steps
        if step not in steps:
            raise KeyError(f"{self.path}: no complete checkpoint at step {step} (steps: {steps[:10]}"
                           f"{'...' if len(steps) > 10 else ''})")
        return steps.index(step)

    def _tensors(self, step: int, kind: str | None) -> dict:
        """The tensors of one kind (None: all, keyed by spec id) at ``step``, checksums verified."""
        i = self._row(step)
        which = [j for j, s in enumerate(self.specs) if kind is None or s.kind == kind]
        try:
            rows = {name: np.asarray(self._grp[name][i]) for name in {self.specs[j].dataset for j in which}}
            stored = np.asarray(self._grp[CHECKSUM][i]) if self._segments is not None and which else None
        except OSError as err:
            raise RunFileError(f"{self.path}: checkpoint at step {step} cannot be read ({err}): the file is "
                               "damaged; restore it from a copy or capture the run again") from None
        if stored is not None:
            bad = self._segments.mismatches(stored, rows, which)
            if bad:
                j, want, got = bad[0]
                more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
                raise RunFileError(f"{self.path}: checkpoint at step {step}, {_tensor_label(self.specs[j])} fails its "
                                   f"checksum (stored {want:08x}, read {got:08x}){more}: the file is damaged; restore "
                                   "it from a copy or capture the run again")
        out = {}
        for j in which:
            s = self.specs[j]
            value = torch.from_numpy(rows[s.dataset][s.offset: s.offset + s.numel].reshape(s.shape).copy())
            out[s.id if kind is None else (s.name, s.key) if kind == "optim" else s.name] = value
        return out

    def params(self, step: int) -> dict[str, torch.Tensor]:
        """Trainable parameters at ``step`` as ``{name: tensor}`` (bit-exact as captured)."""
        return self._tensors(step, "param")

    def buffers(self, step: int) -> dict[str, torch.Tensor]:
        return self._tensors(step, "buffer")

    def optimizer_state(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state at ``step`` as ``{param name: {state key: tensor}}``."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        for (name, key), t in self._tensors(step, "optim").items():
            state.setdefault(name, {})[key] = t
        return state

    def verify(self) -> list[str]:
        """Read and check everything stored (docs/formats.md, "Verifying a run"): every tensor of every
        complete checkpoint, the stored batch (its checksums and the provenance batch digest) and the
        provenance record's digests. The one-line problems found (none: ``[]``). Version 1 files have no
        checksums: only unreadable rows are found there."""
        problems = []
        for step in self.steps:
            try:
                self._tensors(step, None)
            except RunFileError as err:
                problems.append(str(err))
        problems += batch_problems(self._file, self.provenance)
        problems += self.provenance_problems()
        return problems

    def provenance_problems(self) -> list[str]:
        """Whether the stored config digests to the stored ``config_digest`` (one line per problem)."""
        record = self.provenance
        if record is None:
            return []
        config, digest = record.get("config"), record.get("config_digest")
        if config is None:
            return [] if digest is None else [f"{self.path}: provenance: a config digest {str(digest)[:19]}... "
                                              "without a config: the record is damaged"]
        try:
            actual = config_digest(config)
        except (TypeError, ValueError) as err:
            return [f"{self.path}: provenance: the config is not plain JSON ({err}): the record is damaged"]
        if actual != digest:
            return [f"{self.path}: provenance: the config digests to {actual[:19]}..., the record says "
                    f"{str(digest)[:19]}...: the record is damaged (restore the file from a copy)"]
        return []

    def loss(self, step: int) -> float:
        return float(self._grp["loss"][self._row(step)])

    def lrs(self, step: int) -> list[float]:
        return [float(x) for x in self._grp["lr"][self._row(step)]]

    def scalars(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A scalar log (e.g. ``"sharpness"``) as ``(steps, values)``."""
        grp = self._file.get("scalars")
        if grp is None or name not in grp:
            raise KeyError(f"{self.path} has no scalar log {name!r}")
        data = np.array(grp[name])
        return data[:, 0].astype(np.int64), data[:, 1]

    def batch(self) -> Batch | None:
        """The stored data batch: ``(inputs, targets)`` with ``inputs`` a tuple of tensors, or a dict
        of named tensors (a mapping batch, in its stored order); None if none was stored. Verified on
        every read (its checksums, else the provenance batch digest; docs/formats.md)."""
        return read_batch(self._file, self.provenance)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={len(self.steps)}, incomplete={self.incomplete})"


def open_run(path: str | os.PathLike) -> Run:
    """Open a run file for reading (validated; safe on a file that is being written)."""
    return Run(path)


def logged_losses(run) -> tuple[np.ndarray, np.ndarray]:
    """The run's ``loss`` scalar log as ``(steps, values)`` (empty for files without one)."""
    try:
        return run.scalars("loss")
    except KeyError:
        return np.zeros(0), np.zeros(0)


def first_diverged_step(run) -> float:
    """The first step whose recorded training loss is NaN/inf -- the run diverged there -- or inf.

    Two records count: the ``loss`` scalar log (sweeps log the loss of the step that diverged, a
    framework callback its logged losses) and the checkpoints' losses, the latter only when the loop
    passed losses at all (some checkpoint after step 0 has a finite one): a loop that never passed a
    loss leaves NaN there, which means "unknown", not "diverged"."""
    bad = [float(s) for s, v in zip(*logged_losses(run)) if not math.isfinite(v)]
    checkpoints = [(s, run.loss(s)) for s in run.steps if s > 0]
    if any(math.isfinite(v) for _, v in checkpoints):
        bad += [float(s) for s, v in checkpoints if not math.isfinite(v)]
    return min(bad, default=math.inf)

