"""A full disk is one line, and resumable (issue 21, item 8).

On a 1 MiB tmpfs ``spectrum`` segfaulted (36 KB free) or ended in a traceback (60-120 KB), the spectra file
was then unreadable ("actual len exceeds EOA") and every re-run failed the same way; a Recorder raised
nothing in the training loop and left 201 checkpoints marked complete, 199 of which failed their
checksums. The cases mount a small tmpfs (root only: CI and this machine run as root; skipped otherwise,
with the reason) and check the on-disk invariants: the rows kept are readable and equal a reference computed
on a normal disk, a re-run after freeing space continues to the full result, nothing is marked complete
unwritten."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.cli import main
from sharpscope.runs.spectra import SpectraFile, spectra_path

from ._run_files import crash_spectra_writer, fill, free_space, record, tmpfs  # noqa: F401 - tmpfs is a fixture

WHAT = ["--what", "hessian,density", "--k", "1", "--density-probes", "4", "--density-steps", "40", "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run of 12 steps and its results computed on a normal disk."""
    folder = tmp_path_factory.mktemp("normal-disk")
    run = folder / "run.h5"
    record(run, steps=12)
    ref = folder / "ref" / "run.h5"
    ref.parent.mkdir()
    shutil.copy(run, ref)
    assert main(["spectrum", str(ref), *WHAT]) == 0
    with SpectraFile(spectra_path(ref)) as sf:
        rows = {(r["step"], r["quantity"]): r["values"] for r in sf.rows()}
    return run, rows


def _rows(path):
    with SpectraFile(spectra_path(path)) as sf:
        return {(r["step"], r["quantity"]): r["values"] for r in sf.rows()}


def _matches(rows, reference):
    return all(np.array_equal(v, reference[key]) for key, v in rows.items())


@pytest.mark.parametrize("free_kib", [36, 60, 120, 160])
def test_spectrum_on_a_full_disk_is_one_line_and_a_rerun_continues(tmpfs, reference, capsys, free_kib):  # noqa: F811
    run, want = reference
    path = tmpfs / "run.h5"
    shutil.copy(run, path)
    filler = fill(tmpfs, free_kib * 1024)
    status = main(["spectrum", str(path), *WHAT])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert f"{spectra_path(path)}: disk full: " in err[0] and " free, the next write needs " in err[0]
    assert "free space and run again to continue" in err[0]
    kept = _rows(path) if spectra_path(path).exists() else {}
    assert _matches(kept, want)  # what was stored before is readable and right
    assert (len(kept) > 0) == (free_kib >= 120)  # 36, 60 KiB: too little for the file; 120, 160: some results
    assert not list(tmpfs.glob("*.creating")) and not list(tmpfs.glob("*.recovering"))
    filler.unlink()
    assert main(["spectrum", str(path), *WHAT]) == 0  # after freeing space: continues where it stopped
    assert f"skipped {len(kept)} already stored" in capsys.readouterr().out
    rows = _rows(path)
    assert rows.keys() == want.keys() and _matches(rows, want)


def _train(rec, model, opt, data, steps, log_every_step):
    x, y = data
    done = 0
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if log_every_step:
            rec.log_loss(float(loss.detach()))
        rec.step(loss=loss)
        done += 1
    return done


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.01), (torch.randn(32, 64), torch.randint(0, 10, (32,)))


@pytest.mark.parametrize("writes", ["checkpoints", "checkpoints and a loss log"])
def test_a_recorder_on_a_full_disk_raises_into_the_loop(tmpfs, writes):  # noqa: F811
    model, opt, data = _setup()
    path = tmpfs / "run.h5"
    rec = ss.Recorder(path, model, opt, batch=data, every=1 if writes == "checkpoints" else 5)
    with pytest.raises(OSError) as caught:
        _train(rec, model, opt, data, 400, log_every_step=writes != "checkpoints")
    rec.close()
    assert caught.value.errno == errno.ENOSPC
    message = caught.value.strerror
    assert "\n" not in message and f"{path}: disk full: " in message and "stored before are intact" in message
    with ss.open_run(path) as run:  # every checkpoint marked complete is whole
        steps = run.steps
        assert steps and run.verify() == []
    free = free_space(tmpfs)
    os.system(f"mount -o remount,size=4m {tmpfs}")  # room made (the Recorder filled the disk itself)
    assert free_space(tmpfs) > free
    with ss.Recorder(path, model, opt, resume=True, every=1) as rec:  # resumes after space was made
        _train(rec, model, opt, data, 3, log_every_step=False)
    with ss.open_run(path) as run:
        assert run.steps[: len(steps)] == steps and len(run.steps) > len(steps) and run.verify() == []


def test_on_disk_full_stop_keeps_training_and_warns_once(tmpfs):  # noqa: F811
    model, opt, data = _setup()
    path = tmpfs / "run.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ss.Recorder(path, model, opt, batch=data, every=1, on_disk_full="stop") as rec:
            assert _train(rec, model, opt, data, 400, log_every_step=True) == 400  # training went on
    stopped = [w for w in caught if "capturing stopped" in str(w.message)]
    assert len(stopped) == 1 and issubclass(stopped[0].category, RuntimeWarning)
    assert rec.stopped and "disk full" in rec.stopped
    with ss.open_run(path) as run:
        assert run.steps and run.steps[-1] < 400 and run.verify() == []


def test_creating_a_file_on_a_full_disk_leaves_nothing_behind(tmpfs):  # noqa: F811
    model, opt, data = _setup()
    fill(tmpfs, 8 * 1024)
    with pytest.raises(OSError) as caught:
        ss.Recorder(tmpfs / "run.h5", model, opt, batch=data, every=1)
    assert caught.value.errno == errno.ENOSPC and "nothing was written" in caught.value.strerror
    assert not (tmpfs / "run.h5").exists() and not list(tmpfs.glob("*.creating"))


def test_recovering_a_crashed_file_on_a_full_disk_is_one_line_and_touches_nothing(tmpfs, reference):  # noqa: F811
    run, want = reference
    path = tmpfs / "run.h5"
    shutil.copy(run, path)
    with ss.open_run(path) as r:
        run_id = r.id
    rows = [{"step": s, "quantity": "hessian", "settings": json.dumps({"batchnorm": "batch", "k": 1, "seed": 0, "tol": 1e-06},
                                                                        sort_keys=True),
             "values": want[(s, "hessian")].tolist(), "residuals": [0.0], "num_matvecs": 1, "seconds": 0.0, "info": "{}"}
            for s in range(6)]
    assert crash_spectra_writer(spectra_path(path), rows, "before_complete", row=4, run_id=run_id) == -signal.SIGKILL
    crashed = spectra_path(path).read_bytes()
    os.truncate(spectra_path(path), len(crashed))  # give back what the killed writer had reserved past the end
    filler = fill(tmpfs, len(crashed) // 2)  # too little room for the recovery copy
    with pytest.raises(OSError) as caught:
        SpectraFile(spectra_path(path), "a")
    assert caught.value.errno == errno.ENOSPC and "recovering it needs a copy" in caught.value.strerror
    assert spectra_path(path).read_bytes() == crashed and not list(tmpfs.glob("*.recovering"))
    filler.unlink()
    with SpectraFile(spectra_path(path), "a") as sf:
        assert len(sf) == 4


def test_reserved_space_holds_when_another_process_fills_the_disk(tmpfs):  # noqa: F811
    path = tmpfs / "x.spectra.h5"
    row = {"step": 0, "quantity": "density", "settings": "{}", "values": np.arange(500.0), "residuals": np.zeros(500),
           "num_matvecs": 1, "seconds": 0.0, "info": "{}"}
    with SpectraFile(path, "a") as sf:
        sf.append(row)
        sf._table.reservation.ensure(4 * sf._table.bytes_needed({**row, "checksum": 0}), "test")  # room for more rows
        filler = fill(tmpfs, 0)  # someone else takes every free block
        assert free_space(tmpfs) < 4096
        for i in range(1, 3):  # the rows fit in the blocks reserved before: HDF5 never meets the full disk
            sf.append({**row, "step": i})
    with SpectraFile(path) as sf:
        assert [r["step"] for r in sf.rows()] == [0, 1, 2]
    filler.unlink()


# -- the reservation covers every row (no tmpfs needed) -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spectra file", "run file"])
def test_a_row_never_allocates_more_than_was_reserved(tmp_path, kind):
    from sharpscope.runs.space import STANDING_RESERVE

    rng = np.random.default_rng(0)
    grew = []
    if kind == "spectra file":
        path = tmp_path / "x.spectra.h5"
        writer = SpectraFile(path, "a")
        table = writer._table

        def append(i):
            n = int(rng.choice([1, 5, 100, 800, 3000]))
            row = {"step": i, "quantity": "density", "settings": json.dumps({"n": n}), "values": rng.random(n),
                   "residuals": rng.random(n), "num_matvecs": 1, "seconds": 0.1, "info": "x" * int(rng.integers(0, 300))}
            need = table.bytes_needed({**row, "checksum": 0})
            writer.append(row)
            return need
        rows = 300  # past the first 256-row chunk of every column
    else:
        path = tmp_path / "run.h5"
        model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3))
        rec = ss.Recorder(path, model, torch.optim.Adam(model.parameters()), schedule="on_demand")
        writer, table = rec.writer, rec.writer._table

        def append(i):
            rows_ = {name: np.zeros(total, dtype=writer._grp[name].dtype) for name, total in writer._totals.items()}
            need = table.bytes_needed({"step": i, "loss": 0.0, "time": 0.0, "lr": np.zeros(1), **rows_,
                                       "checksum": np.zeros(len(writer.specs), dtype=np.uint32)})
            rec.step_count = i + 1
            rec.capture()
            return need
        rows = 300
    for i in range(rows):
        before = os.path.getsize(path)
        need = append(i)
        grew.append((os.path.getsize(path) - before, need))
    writer.close()
    worst = max(g - need for g, need in grew)
    assert worst <= 0, f"a row grew the file {worst} bytes beyond its reservation"
    assert all(g <= need + STANDING_RESERVE for g, need in grew)
