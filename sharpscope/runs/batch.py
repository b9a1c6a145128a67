"""The stored data batch, on which offline spectra are measured (docs/formats.md, "Batch").

A tuple ``(inputs, targets)`` -- ``inputs`` a tensor or a tuple of tensors, ``targets`` a tensor or
None -- or a mapping of named tensors (a Hugging Face batch: ``{"input_ids": ..., "labels": ...}``).
Version 2 stores it under ``/batch``, one dataset per tensor named by position (mapping keys may hold
any character, so they live in the ``entries`` attribute, not in HDF5 names), with each tensor's
dtype so that bfloat16 (stored as float32: numpy has none) comes back as bfloat16, and one crc32 per
tensor (attribute ``checksums``) checked on every read -- or, in version 2 files written before those
checksums, the provenance record's ``batch_digest``. Version 1 stored a tuple under ``/probe``; it is
still read, unchecked.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Union

import h5py
import numpy as np
import torch

from .h5file import RunFileError
from .provenance import canonical_json
from .table import crc32

__all__ = ["Batch", "to_numpy", "flatten_batch", "write_batch", "read_batch", "batch_digest", "batch_problems"]

Batch = Union[tuple[tuple[torch.Tensor, ...], Union[torch.Tensor, None]], dict[str, torch.Tensor]]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as stored (bfloat16 as float32)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: stored as float32 (exact)
        t = t.float()
    return t.cpu().numpy()


def _tensor(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} is a {type(value).__name__}: the stored batch holds tensors only "
                        "(convert it with torch.as_tensor)")
    return value


def flatten_batch(batch: Any) -> tuple[str, list[dict], list[torch.Tensor]]:
    """``(kind, entries, tensors)`` of a batch given to the Recorder; one-line errors otherwise."""
    if isinstance(batch, Mapping):
        entries, tensors = [], []
        for key, value in batch.items():
            if not isinstance(key, str):
                raise TypeError(f"batch keys must be strings, got {key!r}")
            tensors.append(_tensor(value, f"batch[{key!r}]"))
            entries.append({"role": "value", "key": key})
        return "mapping", _with_dtypes(entries, tensors), tensors
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be (inputs, targets) or a mapping of named tensors, got {type(batch).__name__}")
    inputs, targets = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    tensors = [_tensor(t, f"batch input {i}") for i, t in enumerate(inputs)]
    entries = [{"role": "input", "key": None} for _ in tensors]
    if targets is not None:
        tensors.append(_tensor(targets, "batch targets"))
        entries.append({"role": "target", "key": None})
    return "tuple", _with_dtypes(entries, tensors), tensors


def _with_dtypes(entries: list[dict], tensors: list[torch.Tensor]) -> list[dict]:
    return [{**e, "dtype": str(t.dtype).removeprefix("torch.")} for e, t in zip(entries, tensors)]


def batch_digest(entries: list[dict], arrays: list[np.ndarray]) -> str:
    """``"sha256:<hex>"`` over each entry's ``[role, key, dtype, shape]`` (canonical JSON) and its
    stored bytes (little-endian): equal for runs measured on the same data."""
    h = hashlib.sha256()
    for e, a in zip(entries, arrays):
        h.update(canonical_json([e["role"], e["key"], e["dtype"], list(a.shape)]).encode())
        h.update(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes())
    return "sha256:" + h.hexdigest()


def write_batch(group: h5py.Group, batch: Any) -> str:
    """Store ``batch`` in ``group`` (``/batch``) with one crc32 per tensor; returns its digest."""
    kind, entries, tensors = flatten_batch(batch)
    arrays = [to_numpy(t) for t in tensors]
    group.attrs["kind"] = kind
    group.attrs["entries"] = json.dumps(entries)
    group.attrs["checksums"] = json.dumps([crc32(a) for a in arrays])
    for j, a in enumerate(arrays):
        group.create_dataset(str(j), data=a)
    return batch_digest(entries, arrays)


def read_batch(f: h5py.File, provenance: Mapping[str, Any] | None = None) -> Batch | None:
    """The stored batch: ``(inputs, targets)`` (inputs a tuple) or a dict in the stored order; None.
    A version 2 batch is verified (its checksums, else the ``batch_digest`` of ``provenance``)."""
    if "batch" in f:
        entries, arrays = _stored(f["batch"], f.filename)
        problem = _check(f["batch"], f.filename, entries, arrays, provenance, both=False)
        if problem:
            raise RunFileError(problem[0])
        return _assemble(f["batch"], f.filename, entries, arrays)
    if "probe" in f:  # version 1
        grp = f["probe"]
        inputs = tuple(torch.from_numpy(np.array(grp[f"inputs/{i}"])) for i in range(int(grp.attrs["num_inputs"])))
        targets = torch.from_numpy(np.array(grp["targets"])) if "targets" in grp else None
        return inputs, targets
    return None


def batch_problems(f: h5py.File, provenance: Mapping[str, Any] | None) -> list[str]:
    """Every check of the stored batch (``inspect --verify``): its checksums and the provenance digest,
    both where both exist; one line per problem."""
    if "batch" not in f:
        digest = ((provenance or {}).get("recorder") or {}).get("batch_digest")
        return [f"{f.filename}: provenance names a batch ({str(digest)[:19]}...) but none is stored"] if digest else []
    try:
        entries, arrays = _stored(f["batch"], f.filename)
    except RunFileError as err:
        return [str(err)]
    return _check(f["batch"], f.filename, entries, arrays, provenance, both=True)


def _stored(grp: h5py.Group, path: str) -> tuple[list[dict], list[np.ndarray]]:
    """The entries and the datasets as stored (before dtypes are restored)."""
    try:
        entries = json.loads(grp.attrs["entries"])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("the entries attribute is not a JSON list of objects")
        arrays = [np.asarray(grp[str(j)]) for j in range(len(entries))]
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise RunFileError(f"{path}: damaged stored batch ({str(err).splitlines()[0]})") from None
    return entries, arrays


def _label(j: int, entry: dict, a: np.ndarray) -> str:
    name = entry.get("key") or entry.get("role")
    return f"entry {j} ({name}, {a.dtype} {list(a.shape)})"


def _check(grp: h5py.Group, path: str, entries: list[dict], arrays: list[np.ndarray],
           provenance: Mapping[str, Any] | None, both: bool) -> list[str]:
    """Problems with the stored batch: its checksums when it has them; the provenance digest when it has
    none (or, with ``both``, always)."""
    problems = []
    raw = grp.attrs.get("checksums")
    if raw is not None:
        try:
            stored = json.loads(raw)
            if not isinstance(stored, list) or len(stored) != len(arrays):
                raise ValueError
        except (TypeError, ValueError):
            return [f"{path}: damaged stored batch (its checksums attribute is not a list of {len(arrays)} numbers)"]
        for j, (entry, a) in enumerate(zip(entries, arrays)):
            actual = crc32(a)
            if actual != stored[j]:
                problems.append(f"{path}: stored batch {_label(j, entry, a)} fails its checksum (stored "
                                f"{int(stored[j]) & 0xffffffff:08x}, read {actual:08x}): the file is damaged; restore "
                                "it from a copy or capture the run again")
        if not both:
            return problems[:1]
    digest = ((provenance or {}).get("recorder") or {}).get("batch_digest")
    if isinstance(digest, str):
        try:
            actual = batch_digest(entries, arrays)
        except (KeyError, TypeError):
            actual = None
        if actual != digest:
            problems.append(f"{path}: the stored batch digests to {str(actual)[:19]}..., the provenance record says "
                            f"{digest[:19]}...: the batch (or the record) is damaged; restore the file from a copy")
    return problems


def _assemble(grp: h5py.Group, path: str, entries: list[dict], arrays: list[np.ndarray]) -> Batch:
    try:
        kind = str(grp.attrs["kind"])
        tensors = [_restore(torch.from_numpy(a.copy()), e["dtype"]) for a, e in zip(arrays, entries)]
        roles = [e["role"] for e in entries]
        keys = [e["key"] for e in entries]
    except (KeyError, ValueError, TypeError) as err:
        raise RunFileError(f"{path}: damaged stored batch ({err})") from None
    if kind == "mapping":
        return dict(zip(keys, tensors))
    if kind != "tuple":
        raise RunFileError(f"{path}: stored batch of unknown kind {kind!r}: upgrade sharpscope")
    inputs = tuple(t for r, t in zip(roles, tensors) if r == "input")
    targets = [t for r, t in zip(roles, tensors) if r == "target"]
    return inputs, (targets[0] if targets else None)


def _restore(t: torch.Tensor, dtype: str) -> torch.Tensor:
    want = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(want, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return t if t.dtype == want else t.to(want)
