"""Run and spectra files version 2: batches (tuple or mapping, dtypes restored), provenance and its
digest, axes, checksums that catch damaged bytes, crash safety of the spectra file, the renames."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.cli import main
from sharpscope.runs import provenance as provenance_module
from sharpscope.runs.capture import Recorder
from sharpscope.runs.provenance import config_digest
from sharpscope.runs.spectra import SpectraFile, spectra_path
from sharpscope.runs.store import RunFileError, RunWriter, open_run

CONFIG = {"model": {"factory": "sharpscope.models:MLP", "kwargs": {"width": 16, "depth": 1}},
          "data": {"name": "digits", "size": 64}, "optimizer": {"name": "adam", "lr": 0.01, "betas": (0.9, 0.999)},
          "schedule": {"every": 2}, "steps": 4, "seed": 0}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def _record(path, batch=None, steps=4, every=2, **kwargs):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with Recorder(path, model, opt, batch=(x, y) if batch is None else batch, every=every, **kwargs) as rec:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step()
    return model


def _equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# -- the batch -------------------------------------------------------------------------------------------
def test_tuple_batch_round_trip_restores_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(4, 3, generator=g).to(torch.bfloat16), torch.randint(0, 50000, (4, 7), generator=g),
              torch.rand(4, 7, generator=g) > 0.5, torch.randn(4, 2, dtype=torch.float64, generator=g))
    targets = torch.randint(0, 3, (4,), generator=g)
    _record(tmp_path / "t.h5", batch=(inputs, targets), steps=0)
    with open_run(tmp_path / "t.h5") as run:
        assert run.version == 2 and run.checksummed
        got_inputs, got_targets = run.batch()
    assert len(got_inputs) == 4 and all(_equal(a, b) for a, b in zip(got_inputs, inputs))
    assert _equal(got_targets, targets)
    _record(tmp_path / "one.h5", batch=(inputs[0], None), steps=0)  # a single input tensor, no targets
    with open_run(tmp_path / "one.h5") as run:
        (x,), y = run.batch()
    assert _equal(x, inputs[0]) and y is None


def test_mapping_batch_round_trip_keeps_keys_and_order(tmp_path):
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 32000, (2, 9), generator=g),
             "attention_mask": torch.ones(2, 9, dtype=torch.int64),
             "labels": torch.randint(0, 32000, (2, 9), generator=g),
             "pixel/values with spaces": torch.randn(2, 3, generator=g).to(torch.bfloat16),
             "0": torch.tensor(3.5)}
    _record(tmp_path / "hf.h5", batch=batch, steps=0)
    with open_run(tmp_path / "hf.h5") as run:
        got = run.batch()
        digest = run.provenance["recorder"]["batch_digest"]
    assert list(got) == list(batch) and all(_equal(got[k], batch[k]) for k in batch)
    reordered = dict(reversed(list(batch.items())))
    _record(tmp_path / "hf2.h5", batch=reordered, steps=0)
    with open_run(tmp_path / "hf2.h5") as run:
        assert list(run.batch()) == list(reordered)
        assert run.provenance["recorder"]["batch_digest"] != digest  # order is part of the batch


def test_bad_batches_are_refused_before_a_file_exists(tmp_path):
    model = _model()
    with pytest.raises(TypeError, match=r"batch\['ids'\] is a list: the stored batch holds tensors only"):
        Recorder(tmp_path / "a.h5", model, batch={"ids": [1, 2, 3]})
    with pytest.raises(TypeError, match="batch keys must be strings"):
        Recorder(tmp_path / "b.h5", model, batch={1: torch.zeros(2)})
    with pytest.raises(TypeError, match=r"batch must be \(inputs, targets\) or a mapping"):
        Recorder(tmp_path / "c.h5", model, batch=torch.zeros(3))
    assert not any(tmp_path.glob("*.h5")) and not any(tmp_path.glob("*.creating"))


# -- provenance and axes ---------------------------------------------------------------------------------
def test_config_digest_is_canonical():
    same = json.loads(json.dumps(CONFIG))  # tuples become lists
    shuffled = {k: CONFIG[k] for k in reversed(list(CONFIG))}
    assert config_digest(CONFIG) == config_digest(same) == config_digest(shuffled)
    assert config_digest(CONFIG).startswith("sha256:") and len(config_digest(CONFIG)) == 7 + 64
    for changed in ({**CONFIG, "seed": 1}, {**CONFIG, "steps": 4.0},
                    {**CONFIG, "optimizer": {**CONFIG["optimizer"], "lr": 0.010000001}}):
        assert config_digest(changed) != config_digest(CONFIG)
    with pytest.raises(ValueError, match="config must be plain JSON"):
        config_digest({"lr": float("nan")})
    with pytest.raises(ValueError, match="config must be plain JSON"):
        config_digest({"model": nn.Linear(2, 2)})


def test_provenance_is_recorded_and_versions_are_not_digested(tmp_path, monkeypatch):
    _record(tmp_path / "a.h5", config=CONFIG, meta={"model_factory": "x:y", "seed": 0})
    real = provenance_module.software_versions()
    monkeypatch.setattr(provenance_module, "software_versions", lambda: {**real, "torch": "99.0", "sharpscope": "9.9"})
    _record(tmp_path / "b.h5", config=dict(reversed(list(CONFIG.items()))))
    _record(tmp_path / "c.h5", config={**CONFIG, "seed": 1})
    with open_run(tmp_path / "a.h5") as a, open_run(tmp_path / "b.h5") as b, open_run(tmp_path / "c.h5") as c:
        pa, pb, pc = a.provenance, b.provenance, c.provenance
    assert pa["versions"]["torch"] == torch.__version__ and pb["versions"]["torch"] == "99.0"
    assert pa["config_digest"] == pb["config_digest"] != pc["config_digest"]  # an upgrade changes nothing
    assert config_digest(pa["config"]) == pa["config_digest"]  # recomputable from what is stored
    assert pa["config"]["optimizer"]["betas"] == [0.9, 0.999]
    rec = pa["recorder"]
    assert rec["model_factory"] == "x:y" and rec["seed"] == 0 and rec["schedule"] == {"every": 2}
    assert rec["optimizer"]["class"] == "torch.optim.adam.Adam" and rec["optimizer"]["defaults"]["lr"] == 0.01
    assert rec["batch_digest"].startswith("sha256:") and rec["batch_digest"] == pb["recorder"]["batch_digest"]
    _record(tmp_path / "d.h5")
    with open_run(tmp_path / "d.h5") as d:  # no config: nothing to match
        assert d.provenance["config"] is None and d.provenance["config_digest"] is None


def test_schedules_are_described(tmp_path):
    for name, kwargs, want in [("log.h5", {"schedule": "log"}, "log"), ("list.h5", {"schedule": [5, 2]}, {"steps": [2, 5]}),
                               ("fn.h5", {"schedule": lambda s: s == 3}, None),
                               ("demand.h5", {"schedule": "on_demand"}, "on_demand")]:
        with Recorder(tmp_path / name, _model(), **kwargs):
            pass
        with open_run(tmp_path / name) as run:
            assert run.provenance["recorder"]["schedule"] == want


def test_resume_refuses_another_config(tmp_path):
    _record(tmp_path / "r.h5", config=CONFIG, steps=2)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(RunFileError, match="cannot resume: the config given differs from the run's"):
        Recorder(tmp_path / "r.h5", model, opt, every=2, resume=True, config={**CONFIG, "seed": 5})
    with Recorder(tmp_path / "r.h5", model, opt, every=2, resume=True, config=CONFIG) as rec:
        rec.step()
        rec.step()
    assert open_run(tmp_path / "r.h5").steps == [0, 2, 4]


def test_axes(tmp_path):
    axes = {"width": 256, "batch_size": 64, "lr": 0.01, "optimizer": "adam"}
    _record(tmp_path / "a.h5", axes=axes, steps=0)
    with open_run(tmp_path / "a.h5") as run:
        assert run.axes == axes
    _record(tmp_path / "none.h5", steps=0)
    assert open_run(tmp_path / "none.h5").axes == {}
    with pytest.raises(ValueError, match="axis 'width' must be a number or a string"):
        Recorder(tmp_path / "bad.h5", _model(), axes={"width": [1, 2]})
    with pytest.raises(ValueError, match="axis names must be strings"):
        Recorder(tmp_path / "bad.h5", _model(), axes={1: 2})


# -- checksums --------------------------------------------------------------------------------------------
def _flip(path, offset, count=4):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(count))
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def test_damaged_checkpoint_bytes_name_the_file_step_and_tensor(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path)
    with open_run(path) as run:
        spec = next(s for s in run.specs if s.kind == "param" and s.name == "3.weight")
        row = run.steps.index(2)
        with h5py.File(path, "r") as f:  # where the bytes of 3.weight at step 2 live in the file
            ds = f["checkpoints"][spec.dataset]
            start = ds.id.get_chunk_info_by_coord((row, 0)).byte_offset + spec.offset * ds.dtype.itemsize
    _flip(path, start + 8)
    with open_run(path) as run:
        with pytest.raises(RunFileError) as err:
            run.params(2)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "step 2" in message and "param 3.weight" in message
        assert "fails its checksum" in message and "restore it from a copy" in message
        assert run.params(0) and run.params(4) and run.buffers(2) and run.optimizer_state(2)  # the rest is fine
        assert len(run.verify()) == 1
    assert main(["inspect", str(path), "--verify"]) == 1
    assert "DAMAGED:     " + message in capsys.readouterr().out


def test_damaged_optimizer_state_is_named(tmp_path):
    path = tmp_path / "run.h5"
    _record(path)
    with open_run(path) as run:
        spec = next(s for s in run.specs if s.kind == "optim" and s.key == "exp_avg_sq" and s.name == "0.weight")
        row = run.steps.index(4)
        with h5py.File(path, "r") as f:
            ds = f["checkpoints"][spec.dataset]
            start = ds.id.get_chunk_info_by_coord((row, 0)).byte_offset + spec.offset * ds.dtype.itemsize
    _flip(path, start, 1)
    with open_run(path) as run, pytest.raises(RunFileError, match=r"step 4, optim 0.weight/exp_avg_sq fails its checksum"):
        run.optimizer_state(4)


def _spectra_row(step, quantity="hessian", values=(3.0, 2.0)):
    return {"step": step, "quantity": quantity, "settings": json.dumps({"k": 2}), "values": np.array(values),
            "residuals": np.array([1e-9] * len(values)), "num_matvecs": 40, "seconds": 0.5,
            "info": json.dumps({"converged": [True] * len(values)})}


def test_damaged_spectra_rows_are_detected(tmp_path):
    path = tmp_path / "run.spectra.h5"
    with SpectraFile(path, "a") as sf:
        for step in (0, 2, 4):
            sf.append(_spectra_row(step, values=(step + 3.0, step + 1.0)))
    with SpectraFile(path) as sf:
        assert sf.version == 2 and sf.checksummed
        assert [r["values"].tolist() for r in sf.rows()] == [[3.0, 1.0], [5.0, 3.0], [7.0, 5.0]]
    with h5py.File(path, "r") as f:  # flip the bytes of num_matvecs in row 1
        start = f["num_matvecs"].id.get_chunk_info(0).byte_offset + 1 * 8
    _flip(path, start, 2)
    with SpectraFile(path) as sf:
        with pytest.raises(RunFileError) as err:
            sf.rows()
        assert "\n" not in str(err.value) and "result row 1 (step 2, hessian) fails its checksum" in str(err.value)
        with pytest.raises(RunFileError, match="row 1"):
            sf.keys()
    _flip(path, start, 2)  # repaired; now change a variable-length value behind the checksum's back
    with h5py.File(path, "r+") as f:
        f["values"][2] = np.array([7.0, 5.5])
    with SpectraFile(path) as sf, pytest.raises(RunFileError, match=r"row 2 \(step 4, hessian\) fails its checksum"):
        sf.rows("hessian")


_SPECTRA_WRITER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from sharpscope.runs.spectra import SpectraFile
    sf = SpectraFile(sys.argv[1], "a")
    n = len(sf)
    print("ready", flush=True)
    while True:
        sf.append({"step": n, "quantity": "density", "settings": "{}", "values": np.arange(n % 500, dtype=float),
                   "residuals": np.ones(n % 500), "num_matvecs": n, "seconds": 0.1, "info": json.dumps({"n": n})})
        n += 1
""")


def test_spectra_file_survives_sigkill(tmp_path):
    path = tmp_path / "crash.spectra.h5"
    seen = 0
    for trial, delay in enumerate((0.2, 0.35)):
        proc = subprocess.Popen([sys.executable, "-c", _SPECTRA_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with SpectraFile(path) as sf:  # readable at once, every complete row intact
            rows = sf.rows()
        assert len(rows) > seen and [r["step"] for r in rows] == list(range(len(rows)))
        assert all(r["values"].tolist() == list(range(r["step"] % 500)) for r in rows)
        seen = len(rows)
    with SpectraFile(path, "a") as sf:  # recovered by copy, appended to, still version 2
        sf.append(_spectra_row(10**6))
        assert sf.version == 2 and len(sf.keys()) == seen + 1


# -- renames --------------------------------------------------------------------------------------------
def test_deprecated_names_warn_and_work(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    rec = Recorder(tmp_path / "old.h5", model, opt, batch=(x, y), every=1)
    rec.step()
    assert rec.writer.steps == [0, 1]  # a property now
    with pytest.warns(DeprecationWarning, match="RunWriter.steps is a property now"):
        assert rec.writer.steps() == [0, 1]  # calling it still works for one release
    rec.close()


def test_the_pre_release_probe_aliases_are_gone(tmp_path):
    """Recorder(probe=), Recorder.probe, RunWriter(probe=), Run.probe() and the callbacks' probe= were
    never released (issue 23): they are removed, not deprecated."""
    model = _model()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with pytest.raises(TypeError, match="probe"):
        Recorder(tmp_path / "old.h5", model, probe=(x, y), every=1)
    with pytest.raises(TypeError, match="probe"):
        RunWriter(tmp_path / "writer.h5", {}, [], probe=(x, y))
    assert not (tmp_path / "old.h5").exists() and not (tmp_path / "writer.h5").exists()
    with Recorder(tmp_path / "new.h5", model, batch=(x, y), every=1) as rec:
        assert not hasattr(rec, "probe")
    with open_run(tmp_path / "new.h5") as run:
        assert not hasattr(run, "probe")


def test_inspect_v2(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path, batch={"input_ids": torch.zeros(2, 5, dtype=torch.int64), "labels": torch.ones(2, 5, dtype=torch.int64)},
            config=CONFIG, axes={"width": 16, "optimizer": "adam"})
    with SpectraFile(spectra_path(path), "a") as sf:
        sf.append(_spectra_row(2))
    assert main(["inspect", str(path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "format:      v2, checksummed rows" in out and "verified:    every checkpoint reads back intact\n" in out
    assert 'axes:        {"optimizer": "adam", "width": 16}' in out and f"config:      {config_digest(CONFIG)}" in out
    assert "batch:       input_ids [2, 5] int64, labels [2, 5] int64" in out
    assert "results:     {'hessian': 1} (v2, checksummed rows)" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "v2, checksummed rows" and info["axes"] == {"width": 16, "optimizer": "adam"}
    assert info["batch"]["kind"] == "mapping" and info["results"]["format"] == "v2, checksummed rows"
