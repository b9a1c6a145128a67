"""What produced a run (its provenance record) and where it sits (its axes); docs/formats.md.

The record holds the caller's config and its digest, what the Recorder sees itself and the software
versions. Only the config is digested: it is what a caller (a sweep) can state again before training
to ask "is this stored run the one I would produce?"; what the Recorder sees (every optimizer option
torch reports) and the versions change with upgrades, which must not make stored runs look different.
"""
from __future__ import annotations

import hashlib
import json
import platform
from typing import Any, Mapping

__all__ = ["canonical_json", "config_digest", "software_versions", "provenance_record", "check_axes"]


def canonical_json(obj: Any, what: str = "config") -> str:
    """Sorted keys, no spaces, UTF-8 characters as they are, no NaN or infinity: equal values give
    equal strings whatever their key order (a tuple gives the list JSON makes of it)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be plain JSON (numbers, strings, lists, string-keyed objects; "
                         f"no NaN or infinity; nothing is pickled): {err}") from None


def config_digest(config: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON of ``config``: compare it with a stored run's
    ``run.provenance["config_digest"]`` to tell whether the run was produced from this config."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a JSON object), got {type(config).__name__}")
    return "sha256:" + hashlib.sha256(canonical_json(dict(config)).encode()).hexdigest()


def software_versions() -> dict[str, str]:
    """Recorded with every run, never compared."""
    import h5py
    import numpy as np
    import torch

    from .._version import __version__

    return {"sharpscope": __version__, "torch": torch.__version__, "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version, "numpy": np.__version__, "python": platform.python_version()}


def provenance_record(config: Mapping[str, Any] | None, recorder: Mapping[str, Any]) -> dict:
    """The ``/provenance`` record: config (as stored JSON) and its digest (None without a config),
    what the Recorder saw, the software versions."""
    stored = None if config is None else json.loads(canonical_json(dict(config)))
    return {"config": stored, "config_digest": None if config is None else config_digest(stored),
            "recorder": json.loads(canonical_json(dict(recorder), "the recorder's description")),
            "versions": software_versions()}


def check_axes(axes: Mapping[str, Any] | None) -> dict[str, int | float | str]:
    """Validated axes: string names, number or string values (``{"width": 256, "optimizer": "adam"}``)."""
    if axes is None:
        return {}
    if not isinstance(axes, Mapping):
        raise TypeError(f"axes must be a mapping of name -> number or string, got {type(axes).__name__}")
    out = {}
    for name, value in axes.items():
        if not isinstance(name, str):
            raise ValueError(f"axis names must be strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"axis {name!r} must be a number or a string, got {value!r}")
        out[name] = value
    canonical_json(out, "axes")  # no NaN or infinity
    return out
