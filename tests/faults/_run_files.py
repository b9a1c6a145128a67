"""Shared by the storage fault modules (identity, deletion, full disk, recovery, one-line errors): small
recorded runs, their dense float64 reference, crashes at chosen moments in a light subprocess, a tmpfs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss

ROOT = Path(__file__).resolve().parents[2]
CE = nn.CrossEntropyLoss()
KWARGS = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}


def record(path, seed: int = 0, steps: int = 3, lr: float = 0.1, width: int = 8, **recorder) -> None:
    """A tanh MLP trained ``steps`` SGD steps with a Recorder capturing every step; ``seed`` picks the
    weights and the batch (two seeds: two different runs)."""
    kwargs = {**KWARGS, "width": width}
    torch.manual_seed(seed)
    model = ss.MLP(**kwargs)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    meta = {"model_factory": "sharpscope.models:MLP", "model_kwargs": kwargs, "width": width, "lr": lr}
    with ss.Recorder(path, model, opt, batch=(x, y), every=1, loss_fn=CE, meta=meta, **recorder) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)


def dense_top(path, step: int) -> float:
    """The top Hessian eigenvalue of the checkpoint at ``step``, from a dense float64 Hessian of the model
    rebuilt by hand (not through the spectrum job's code path)."""
    with ss.open_run(path) as run:
        model = ss.MLP(**run.meta["model_kwargs"]).double()
        model.load_state_dict({k: v.double() for k, v in run.params(step).items()}, strict=False)
        (x,), y = run.batch()
    H = ss.dense_hessian(model, CE, (x.double(), y))
    return float(torch.linalg.eigvalsh(H)[-1])


def dense_top_rebuilt(path, step: int) -> float:
    """As :func:`dense_top`, for a run whose model only its factory can rebuild (a parametrized sweep run)."""
    from sharpscope.runs.rebuild import model_at

    with ss.open_run(path) as run:
        model = model_at(run, step).double()
        (x,), y = run.batch()
    H = ss.dense_hessian(model, CE, (x.double(), y))
    return float(torch.linalg.eigvalsh(H)[-1])


def spectra_values(path, quantity: str = "hessian") -> dict[int, list[float]]:
    """``{step: values}`` of a run's stored results (read for that run: its id must match)."""
    from sharpscope.runs.spectra import SpectraFile, spectra_path

    with ss.open_run(path) as run:
        run_id = getattr(run, "id", None)
    kwargs = {"run_id": run_id} if run_id is not None else {}
    with SpectraFile(spectra_path(path), **kwargs) as sf:
        return {r["step"]: r["values"].tolist() for r in sf.rows(quantity)}


def superseded_notes(folder) -> str:
    """Every note of every ``superseded/*/NOTES.txt`` under ``folder`` (empty when nothing was moved)."""
    return "".join(p.read_text() for p in sorted(Path(folder).glob("superseded/*/NOTES.txt")))


def visible_files(folder) -> list[str]:
    """The names a user sees in ``folder`` (``ls``: no hidden entries), recursively."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if not any(part.startswith(".") for part in p.relative_to(folder).parts))


# -- crashes at chosen moments, in a subprocess that does not import torch (fast) -------------------------
def torch_free_prelude(*imports: str) -> str:
    """The start of a subprocess script that imports ``sharpscope.runs`` modules without importing torch
    (``sys.argv[1]`` is the repository root), then ``imports`` (lines)."""
    return "\n".join(["import json, os, signal, sys, time, types",
                      'for name in ("sharpscope", "sharpscope.runs"):',
                      "    module = types.ModuleType(name)",
                      '    module.__path__ = [os.path.join(sys.argv[1], *name.split("."))]',
                      "    sys.modules[name] = module", *imports, ""])


_PRELUDE = torch_free_prelude("import h5py", "import numpy as np", "from sharpscope.runs import table",
                              "from sharpscope.runs.spectra import SpectraFile")

_WRITE_AND_DIE = _PRELUDE + textwrap.dedent("""
    path, rows, kill = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill["stage"] in ("mid_columns", "before_complete"):
        resize = h5py.Dataset.resize
        column = "values" if kill["stage"] == "mid_columns" else "complete"

        def resize_and_maybe_die(self, size, axis=None):
            if self.name.rsplit("/", 1)[-1] == column and size == kill["row"] + 1:
                if kill["stage"] == "mid_columns":
                    resize(self, size, axis=axis)
                    # half a row: this column written, the later ones not (a ragged column: its index entry)
                    self[kill["row"]] = (0, 7) if "ragged" in self.attrs else np.arange(7.0)
                die()
            return resize(self, size, axis=axis)

        h5py.Dataset.resize = resize_and_maybe_die
    if kill["stage"] == "in_recovery_copy":
        create = h5py.Group.create_dataset

        def create_and_maybe_die(self, name, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > kill["after_datasets"]:
                die()
            return create(self, name, *args, **kwargs)

        h5py.Group.create_dataset = create_and_maybe_die
    ids = {"run_id": kill["run_id"]} if kill.get("run_id") is not None else {}  # (no ids before run ids)
    with SpectraFile(path, "a", **ids) as sf:
        for i, row in enumerate(rows):
            if kill["stage"] == "after_complete" and i == kill["row"]:
                die()
            sf.append({**row, "values": np.asarray(row["values"]), "residuals": np.asarray(row["residuals"])})
    print("finished without dying", flush=True)
""")


def crash_spectra_writer(path, rows: list[dict], stage: str, row: int = 0, run_id: str | None = None,
                         after_datasets: int = 0) -> int:
    """Write ``rows`` into the spectra file ``path`` with the real writer, in a subprocess SIGKILLed at
    ``stage``: ``mid_columns`` (row ``row`` half written), ``before_complete`` (every column of row ``row``
    written, ``complete`` not grown), ``after_complete`` (rows before ``row`` complete, nothing of it), or
    ``in_recovery_copy`` (the recovery copy of a crashed file killed after ``after_datasets`` datasets).
    Returns the exit status (``-SIGKILL`` when it died as asked)."""
    kill = {"stage": stage, "row": row, "run_id": run_id, "after_datasets": after_datasets}
    proc = subprocess.run([sys.executable, "-c", _WRITE_AND_DIE, str(ROOT), str(path), json.dumps(rows), json.dumps(kill)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 or "finished" in proc.stdout, proc.stderr[-2000:]
    return proc.returncode


def plain_rows(rows: list[dict]) -> list[dict]:
    """Spectra rows (as ``SpectraFile.rows`` returns them) as the JSON the crash subprocess appends."""
    out = []
    for r in rows:
        info = {k: v for k, v in r["info"].items() if k != "run_id"}
        out.append({"step": r["step"], "quantity": r["quantity"], "settings": json.dumps(r["settings"], sort_keys=True),
                    "values": r["values"].tolist(), "residuals": r["residuals"].tolist(),
                    "num_matvecs": r["num_matvecs"], "seconds": r["seconds"], "info": json.dumps(info)})
    return out


# -- a small tmpfs (root only) ---------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted at ``tmp_path/disk`` (root only; skipped otherwise, with the reason); unmounted
    after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root): the full-disk cases are not run")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the full-disk cases are not run")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free (one filler file, returned: unlink it to free the space)."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "ab") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def free_space(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def allclose(a, b, rtol=1e-5) -> bool:
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=0)


# -- editing a stored spectra row in place (the fault cases' tampering) ----------------------------------------
def spectra_field(f, name: str, i: int):
    """Field ``name`` of row ``i`` of an open spectra file as stored: a ragged column's entry (version 3) or a
    variable-length one (versions 1-2); text as ``str``."""
    ds = f[name]
    if "ragged" in ds.attrs:
        start, stop = ds[i]
        data = f[ds.attrs["ragged"]][start:stop]
        return data.tobytes().decode() if ds.attrs["text"] else data
    return ds.asstr()[i] if h5py.check_string_dtype(ds.dtype) else ds[i]


def set_spectra_field(f, name: str, i: int, value) -> None:
    """Overwrite field ``name`` of row ``i`` (no new checksum): in place when the new entry has the old length,
    else appended to the column's data with the row pointing at it."""
    ds = f[name]
    if "ragged" not in ds.attrs:
        ds[i] = value
        return
    data = f[ds.attrs["ragged"]]
    flat = np.frombuffer(value.encode(), dtype=np.uint8) if ds.attrs["text"] else np.asarray(value, dtype=data.dtype)
    start, stop = (int(x) for x in ds[i])
    if flat.size != stop - start:
        start = data.shape[0]
        data.resize(start + flat.size, axis=0)
    data[start: start + flat.size] = flat
    ds[i] = (start, start + flat.size)
