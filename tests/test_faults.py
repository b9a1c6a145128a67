"""The fault suite: bad input gets one line and loses nothing; resume follows provenance, not names.
(Crafted run files for code execution and stale/stochastic operators: tests/test_trust.py and
tests/test_staleness.py; checksums: tests/test_formats_v2.py; SIGKILL loops: tests/test_store.py, slow.)"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import psutil
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.cli import main
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.spectra import SpectraFile, spectra_path
from sharpscope.sweep import load_probe, run_sweep
from conftest import make_data, make_mlp, probe_text

CE = nn.CrossEntropyLoss()
KWARGS = {"width": 8, "depth": 1, "in_features": 4, "out_features": 3}


def _record(path, width=8, lr=0.1, optimizer="sgd", steps=2, model=None):
    torch.manual_seed(0)
    model = model if model is not None else ss.MLP(**{**KWARGS, "width": width})
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    meta = {"model_factory": "sharpscope.models:MLP", "model_kwargs": {**KWARGS, "width": width}, "width": width, "lr": lr}
    with ss.Recorder(path, model, opt, batch=(x, y), every=1, loss_fn=CE, meta=meta) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = CE(model(x), y)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return model, opt


def _edit(path, group, attr, value):
    with h5py.File(path, "r+") as f:
        f[group].attrs[attr] = value


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


# -- malformed files ------------------------------------------------------------------------------------------
def test_a_malformed_meta_is_a_problem_in_the_report_not_a_crash(tmp_path, capsys):
    good = [tmp_path / f"w{w}.h5" for w in (8, 16)]
    for path, w in zip(good, (8, 16)):
        _record(path, width=w)
    bad = {"list": json.dumps([1, 2, 3]), "nested": "[" * 100_000 + "]" * 100_000}
    paths = []
    for name, raw in bad.items():
        path = tmp_path / f"{name}.h5"
        _record(path)
        _edit(path, "meta", "json", raw)
        paths.append(path)
    string_opt = tmp_path / "stringopt.h5"
    _record(string_opt, width=32)
    with h5py.File(string_opt, "r+") as f:
        meta = json.loads(f["meta"].attrs["json"])
        meta["optimizer"] = "adam"
        f["meta"].attrs["json"] = json.dumps(meta)
    out = tmp_path / "report"
    assert main(["report", *map(str, good + paths + [string_opt]), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    problems = " ".join(metrics["problems"])
    assert "list.h5: not a readable sharpscope run (" in problems and "not an object" in problems
    assert "nested.h5" in problems and "nested too deeply" in problems
    assert len(metrics["runs"]) == 3  # the string optimizer reads as absent: the run stays


@pytest.mark.parametrize("edit, message", [
    (lambda specs: [{**specs[0], "offset": 10**9}] + specs[1:], "lies outside its dataset"),
    (lambda specs: [{**specs[0], "shape": [-1, 4]}] + specs[1:], "invalid shape"),
    (lambda specs: [{**specs[0], "dataset": "flat_nothing"}] + specs[1:], "missing dataset"),
    (lambda specs: specs[:1] + [[1, 2]], "malformed"),
])
def test_edited_tensor_lists_are_one_line_errors(tmp_path, capsys, edit, message):
    path = tmp_path / "run.h5"
    _record(path)
    with h5py.File(path, "r+") as f:
        specs = json.loads(f["checkpoints"].attrs["tensors"])
        f["checkpoints"].attrs["tensors"] = json.dumps(edit(specs))
    with pytest.raises(ss.RunFileError, match=message):
        ss.open_run(path)
    _one_line_error(capsys, ["spectrum", str(path), "--quiet"], message)
    _one_line_error(capsys, ["inspect", str(path)], message)


def test_overwritten_checkpoint_bytes_fail_that_checkpoint_by_name(tmp_path):
    path = tmp_path / "run.h5"
    _record(path)
    with h5py.File(path, "r") as f:
        ds = f["checkpoints/flat_float32"]
        offset = ds.id.get_chunk_info_by_coord((1, 0)).byte_offset
    with open(path, "r+b") as fh:  # a few bytes inside the checkpoint at step 1
        fh.seek(offset + 8)
        fh.write(b"\x7f\x7f\x7f\x7f")
    report = run_spectrum_job([path], ["hessian"], SpectrumSettings(k=1), progress=False)
    assert report.written == 2 and len(report.failures) == 1
    run_path, step, message = report.failures[0]
    assert step == 1 and "step 1" in message and "param input.weight" in message


# -- the Recorder ------------------------------------------------------------------------------------------------
def test_resume_refuses_another_model_or_optimizer(tmp_path):
    path = tmp_path / "run.h5"
    model, _ = _record(path, optimizer="adam")
    subset = nn.Sequential()
    subset.input = model.input  # holds a subset of the run's tensors
    with pytest.raises(ss.RunFileError, match="cannot resume: the run stores param hidden"):
        ss.Recorder(path, subset, torch.optim.Adam(subset.parameters()), resume=True)
    with pytest.raises(ss.RunFileError, match="recorded with Adam, this optimizer is SGD"):
        ss.Recorder(path, model, torch.optim.SGD(model.parameters(), lr=0.1), resume=True)
    with ss.open_run(path) as run:
        assert run.steps == [0, 1, 2]  # nothing lost


# -- operators ---------------------------------------------------------------------------------------------------
def test_operator_inputs_that_cannot_work_are_one_line_errors():
    model, data = make_mlp(0), make_data("mlp", 0)
    with pytest.raises(ValueError, match=r"params=\[\] selects no parameter"):
        ss.hessian_operator(model, CE, data, params=[])
    detached = ss.hessian_operator(model, lambda o, y: CE(o.detach(), y), data)
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        ss.lanczos(detached, k=1)
    argmax = ss.hessian_operator(model, lambda o, y: (o.argmax(1) == y).double().mean(), data)
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        ss.lanczos(argmax, k=1)
    integers = ss.hessian_operator(model, CE, (data[0].long(), data[1]))
    with pytest.raises(ValueError, match=r"cannot be evaluated on batch 0 \(inputs \(16, 6\) int64\)"):
        ss.lanczos(integers, k=1)


# -- spectrum jobs -------------------------------------------------------------------------------------------------
def test_a_full_disk_during_spectrum_is_one_line_and_keeps_what_was_stored(tmp_path, capsys, monkeypatch):
    path = tmp_path / "run.h5"
    _record(path, steps=3)
    original = SpectraFile.append
    written = []

    def full_after_two(self, row):
        if len(written) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, row)
        written.append(row)

    monkeypatch.setattr(SpectraFile, "append", full_after_two)
    _one_line_error(capsys, ["spectrum", str(path), "--quiet", "--k", "1"], "No space left on device")
    monkeypatch.setattr(SpectraFile, "append", original)
    with SpectraFile(spectra_path(path)) as sf:
        assert len(sf.rows()) == 2
    assert main(["spectrum", str(path), "--quiet", "--k", "1"]) == 0  # continues where it stopped
    with SpectraFile(spectra_path(path)) as sf:
        assert sorted(r["step"] for r in sf.rows()) == [0, 1, 2, 3]


def test_results_are_keyed_by_loss_and_settings_and_the_report_says_which(tmp_path, capsys):
    paths = [tmp_path / f"w{w}.h5" for w in (8, 16)]
    for p, w in zip(paths, (8, 16)):
        _record(p, width=w)
    assert main(["spectrum", *map(str, paths), "--quiet", "--k", "1"]) == 0
    capsys.readouterr()
    assert main(["spectrum", *map(str, paths), "--quiet", "--k", "1", "--loss", "NLLLoss"]) == 0
    assert "wrote 6 result(s), skipped 0" in capsys.readouterr().out  # the loss is part of the key
    assert main(["spectrum", *map(str, paths), "--quiet", "--k", "1", "--tol", "1e-3"]) == 0
    with SpectraFile(spectra_path(paths[0])) as sf:
        keys = {json.dumps(r["settings"], sort_keys=True) for r in sf.rows("hessian")}
    assert len(keys) == 3  # three results per step coexist
    out = tmp_path / "report"
    assert main(["report", *map(str, paths), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert any("hessian measured under 3 settings; the report uses" in p for p in metrics["problems"])
    assert not any("duplicate steps" in json.dumps(g) for g in metrics["groups"])


def test_devices_that_do_not_exist_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path)
    reason = "asked for, but this torch" if not torch.cuda.is_available() else "does not exist"
    _one_line_error(capsys, ["spectrum", str(path), "--quiet", "--device", "cuda:99"], reason)
    _one_line_error(capsys, ["spectrum", str(path), "--quiet", "--device", "gpu"], "unknown device 'gpu'")
    assert main(["spectrum", str(path), "--quiet", "--k", "1", "--device", "auto"]) == 0


def test_spectra_files_among_the_inputs_are_ignored(tmp_path, capsys):
    path = tmp_path / "run.h5"
    _record(path)
    for _ in range(2):  # the second time the glob picks up run.spectra.h5 too
        inputs = sorted(str(p) for p in tmp_path.glob("*.h5"))
        assert main(["spectrum", *inputs, "--quiet", "--k", "1"]) == 0
    assert "note: 1 spectra file(s) among the inputs ignored (run.spectra.h5)" in capsys.readouterr().out


# -- probe files ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old, new, message", [
    ("steps = 6", "steps = true", r"\[train\] steps must be an integer, got True"),
    ("steps = 6", "steps = 2.9", r"\[train\] steps must be an integer, got 2.9"),
    ("widths = [16, 32]", "widths = [8.7]", r"\[model\] widths entry must be an integer, got 8.7"),
    ("base_width = 16", "base_width = 0", r"\[model\] base_width must be >= 1, got 0"),
    ('optimizers = ["sgd"]', "optimizers = [1]", r"\[train\] optimizers entry must be a non-empty string"),
    ("widths = [16, 32]", 'widths = "64"', r"\[model\] widths must be a list, got str"),
    ("lrs = [0.2]", "lrs = [inf]", r"\[train\] lrs entry must be a finite number, got inf"),
    ("in_features = 64", "in_features = 10", "does not run on the data 'digits'"),
    ('loss = "CrossEntropyLoss"', 'loss = "MSELoss"', "mismatched target shape"),
    ("steps = 6", 'steps = 6\ndevice = "cuda:7"', r"\[train\] device: device 'cuda:7' "),
    ("steps = 6", 'steps = 6\ndevice = "tpu"', "unknown device 'tpu'"),
])
def test_bad_probe_values_are_one_line_errors_at_load_time(tmp_path, capsys, old, new, message):
    text = probe_text() + '\n'
    text = text.replace('data = "digits"', 'data = "digits"\nloss = "CrossEntropyLoss"')
    assert old in text, old
    probe = tmp_path / "bad.toml"
    probe.write_text(text.replace(old, new))
    with pytest.raises(ValueError, match=message):
        load_probe(probe)
    assert main(["sweep", str(probe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing trained


def test_a_sweep_reuses_only_runs_of_the_same_config(tmp_path, capsys):
    probe = tmp_path / "p.toml"
    probe.write_text(probe_text(widths=(16,), steps=4, every=2, quantities=("hessian",)))
    out = tmp_path / "out"
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    (run_path,) = (out / "runs").glob("*-s0.h5")
    first = run_path.stat().st_mtime_ns
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    assert "(0 trained now)" in capsys.readouterr().out and run_path.stat().st_mtime_ns == first
    probe.write_text(probe.read_text().replace("steps = 4", "steps = 6"))  # steps edited: not the same run
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "(1 trained now)" in printed and "came from another config" in printed
    kept = list((out / "runs" / "superseded").glob("*/*-s0.h5"))
    assert len(kept) == 1 and spectra_path(kept[0]).exists()  # never deleted, spectra kept with it
    with ss.open_run(run_path) as run:
        assert run.steps[-1] == 6
    probe.write_text(probe.read_text().replace('activation = "tanh"', 'activation = "relu"'))
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    assert "(1 trained now)" in capsys.readouterr().out
    with ss.open_run(run_path) as run:
        assert run.meta["model_kwargs"]["activation"] == "relu"


# -- no orphans ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("executor", ["process:2", "dask-local:2"])
def test_workers_die_with_a_killed_parent(tmp_path, executor):
    if executor.startswith("dask"):
        pytest.importorskip("distributed")
    path = tmp_path / "run.h5"
    _record(path, width=64, steps=12)
    cmd = [sys.executable, "-m", "sharpscope", "spectrum", str(path), "--quiet", "--what", "hessian,density",
           "--density-steps", "200", "--density-probes", "20", "--executor", executor]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proc = psutil.Process(parent.pid)
    deadline = time.time() + 60
    while len(proc.children(recursive=True)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the workers are busy
    children = proc.children(recursive=True)
    assert len(children) >= 2, "the executor started no workers"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs(children, timeout=15)
    for p in alive:
        p.kill()
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
