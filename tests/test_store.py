"""Run files: round trips, crash safety under SIGKILL, validation and resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from conftest import recorder_setup, train_step
from sharpscope.runs.capture import Recorder
from sharpscope.runs.store import RunFileError, open_run

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adafactor"])
def test_round_trip_is_bit_exact(tmp_path, optimizer):
    model, opt, data = recorder_setup(optimizer=optimizer)
    snapshots = {}
    with Recorder(tmp_path / "run.h5", model, opt, batch=data, every=3, loss_fn=CE,
                  meta={"model_factory": "torch.nn:Identity", "seed": 0, "note": "hello"}) as rec:
        for _ in range(7):
            loss = train_step(model, opt, data)
            if rec.step(loss=loss):
                snapshots[rec.step_count] = ({n: p.detach().clone() for n, p in model.named_parameters()},
                                             {n: b.clone() for n, b in model.named_buffers()},
                                             {n: {k: v.clone() for k, v in opt.state[p].items()}
                                              for n, p in model.named_parameters()})
    with open_run(tmp_path / "run.h5") as run:
        assert run.steps == [0, 3, 6] and run.incomplete == 0
        assert run.meta["user"] == {"note": "hello"} and run.meta["seed"] == 0
        assert run.meta["optimizer"]["param_groups"][0]["params"][0] == "0.weight"
        for step, (params, buffers, state) in snapshots.items():
            for n, p in params.items():
                assert torch.equal(run.params(step)[n], p)
            for n, b in buffers.items():
                assert torch.equal(run.buffers(step)[n], b)
            stored = run.optimizer_state(step)
            for n, st in state.items():
                for k, v in st.items():
                    assert torch.equal(stored[n][k], v.reshape(stored[n][k].shape)), (n, k)
        inputs, targets = run.batch()
        assert torch.equal(inputs[0], data[0]) and torch.equal(targets, data[1])
        assert run.lrs(3) == [pytest.approx(opt.param_groups[0]["lr"])]


_WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from sharpscope.runs.capture import Recorder
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    rec = Recorder(sys.argv[1], model, opt, batch=(x, y), every=1, resume=True)
    print("ready", flush=True)
    while True:
        opt.zero_grad(); loss = nn.functional.cross_entropy(model(x), y); loss.backward(); opt.step()
        rec.step(loss=loss)
""")


def _kill_writer_at_random(path, seed):
    rng = np.random.default_rng(seed)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(float(rng.uniform(0.05, 0.4)))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _check_intact(path):
    with open_run(path) as run:
        steps = run.steps
        assert steps == sorted(set(steps))
        for step in steps[-3:]:
            params = run.params(step)
            assert all(torch.isfinite(t).all() for t in params.values())
            state = run.optimizer_state(step)  # Adam has no state before its first step: NaN rows at 0
            assert all(torch.isfinite(v).all() == (step > 0) for st in state.values() for v in st.values())
        return steps


@pytest.mark.parametrize("trials", [3])
def test_sigkill_never_corrupts_and_resume_appends(tmp_path, trials):
    path = tmp_path / "crash.h5"
    seen = 0
    for trial in range(trials):
        _kill_writer_at_random(path, trial)
        steps = _check_intact(path)
        assert len(steps) >= seen  # earlier checkpoints survive every crash
        seen = len(steps)
    assert seen > 0


@pytest.mark.slow
def test_sigkill_twenty_times(tmp_path):
    test_sigkill_never_corrupts_and_resume_appends(tmp_path, 20)


def test_validation_errors_and_nothing_lost(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run file"):
        open_run(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(RunFileError, match="not a readable HDF5 file"):
        open_run(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(RunFileError, match="not a sharpscope run file"):
        open_run(tmp_path / "other.h5")
    model, opt, data = recorder_setup()
    with Recorder(tmp_path / "run.h5", model, opt, every=1) as rec:
        rec.step()
    with h5py.File(tmp_path / "run.h5", "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(RunFileError, match="version 99 is not supported"):
        open_run(tmp_path / "run.h5")
    with h5py.File(tmp_path / "run.h5", "r+") as f:
        f.attrs["format_version"] = 1
    size = (tmp_path / "run.h5").stat().st_size
    with pytest.raises(FileExistsError, match="resume it"):
        Recorder(tmp_path / "run.h5", model, opt, every=1)
    with Recorder(tmp_path / "run.h5", model, opt, every=1, resume=True) as live:  # one writer at a time
        with pytest.raises(RunFileError, match="being written by another process"):
            Recorder(tmp_path / "run.h5", model, opt, every=1, resume=True)
        assert open_run(tmp_path / "run.h5").steps == [0, 1]  # readers are welcome
    assert live.step_count == 1
    bigger = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 3))
    with pytest.raises(RunFileError, match="cannot resume: param 0.weight has shape"):
        Recorder(tmp_path / "run.h5", bigger, torch.optim.Adam(bigger.parameters()), every=1, resume=True)
    with open_run(tmp_path / "run.h5") as run:
        assert run.steps == [0, 1]
    assert (tmp_path / "run.h5").stat().st_size >= size * 0.5
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes((tmp_path / "run.h5").read_bytes()[: size // 3])
    with pytest.raises(RunFileError, match="truncated or corrupt"):
        open_run(truncated)
    with pytest.raises(ValueError, match="JSON-serializable"):
        Recorder(tmp_path / "meta.h5", model, opt, meta={"bad": object()})
    assert not (tmp_path / "meta.h5").exists()
