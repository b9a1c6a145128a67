"""The stored data batch, on which offline spectra are measured (docs/formats.md, "Batch").

A tuple ``(inputs, targets)`` -- ``inputs`` a tensor or a tuple of tensors, ``targets`` a tensor or
None -- or a mapping of named tensors (a Hugging Face batch: ``{"input_ids": ..., "labels": ...}``).
Version 2 stores it under ``/batch``, one dataset per tensor named by position (mapping keys may hold
any character, so they live in the ``entries`` attribute, not in HDF5 names), with each tensor's
dtype so that bfloat16 (stored as float32: numpy has none) comes back as bfloat16. Version 1 stored
a tuple under ``/probe``; it is still read.
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

__all__ = ["Batch", "to_numpy", "flatten_batch", "write_batch", "read_batch", "batch_digest"]

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
    """Store ``batch`` in ``group`` (``/batch``); returns its digest."""
    kind, entries, tensors = flatten_batch(batch)
    arrays = [to_numpy(t) for t in tensors]
    group.attrs["kind"] = kind
    group.attrs["entries"] = json.dumps(entries)
    for j, a in enumerate(arrays):
        group.create_dataset(str(j), data=a)
    return batch_digest(entries, arrays)


def read_batch(f: h5py.File) -> Batch | None:
    """The stored batch: ``(inputs, targets)`` (inputs a tuple) or a dict in the stored order; None."""
    if "batch" in f:
        return _read_v2(f["batch"], f.filename)
    if "probe" in f:  # version 1
        grp = f["probe"]
        inputs = tuple(torch.from_numpy(np.array(grp[f"inputs/{i}"])) for i in range(int(grp.attrs["num_inputs"])))
        targets = torch.from_numpy(np.array(grp["targets"])) if "targets" in grp else None
        return inputs, targets
    return None


def _read_v2(grp: h5py.Group, path: str) -> Batch:
    try:
        kind = str(grp.attrs["kind"])
        entries = json.loads(grp.attrs["entries"])
        tensors = [_restore(torch.from_numpy(np.array(grp[str(j)])), e["dtype"]) for j, e in enumerate(entries)]
    except (KeyError, ValueError, TypeError) as err:
        raise RunFileError(f"{path}: damaged stored batch ({err})") from None
    if kind == "mapping":
        return {e["key"]: t for e, t in zip(entries, tensors)}
    if kind != "tuple":
        raise RunFileError(f"{path}: stored batch of unknown kind {kind!r}: upgrade sharpscope")
    inputs = tuple(t for e, t in zip(entries, tensors) if e["role"] == "input")
    targets = [t for e, t in zip(entries, tensors) if e["role"] == "target"]
    return inputs, (targets[0] if targets else None)


def _restore(t: torch.Tensor, dtype: str) -> torch.Tensor:
    want = getattr(torch, dtype, None)
    if not isinstance(want, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return t if t.dtype == want else t.to(want)
