"""Nothing stored is ever deleted (issue 21, item 8; issue 22, item 4's lock files).

Item 8: a sweep re-run after one run's provenance record was damaged and another's ``format_version`` set to
3 unlinked both run files and both spectra files and retrained, with no note; a second sweep on the same
``--out`` unlinked the first's live run file. Here every stored file must still exist afterwards, byte for
byte, in place or in ``superseded/<stamp>/`` with a note; a second sweep refuses, naming the holder. Lock
files live in one hidden folder and are never removed, so two processes never hold one lock."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import pytest

import sharpscope as ss
from conftest import probe_text
from sharpscope.cli import main
from sharpscope.runs.spectra import spectra_path

from ._run_files import ROOT, record, superseded_notes, torch_free_prelude, visible_files


def _digests(folder) -> dict[str, str]:
    """sha256 -> name of every file under ``folder`` (hidden lock files aside)."""
    return {hashlib.sha256(p.read_bytes()).hexdigest(): str(p.relative_to(folder))
            for p in sorted(folder.rglob("*")) if p.is_file() and ".sharpscope-locks" not in p.parts}


def _damage_provenance(path):
    with h5py.File(path, "r+") as f:
        f["provenance"].attrs["json"] = '{"config": {"model": '  # cut short


def _future_format(path):
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 3


def _foreign_hdf5(path):
    path.unlink()
    with h5py.File(path, "w") as f:
        f["measurements"] = [1.0, 2.0]


def _not_hdf5(path):
    path.write_text("my notes, saved under the wrong name\n")


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_typed_attribute(path):
    with h5py.File(path, "r+") as f:
        f.attrs["versions"] = "[]"


def _interrupted(path):
    with h5py.File(path, "r+") as f:  # only the step-0 checkpoint complete: the same config, not done
        f["checkpoints/complete"].resize(1, axis=0)


DAMAGE = {"provenance damaged": (_damage_provenance, "cannot be read"),
          "format_version 3": (_future_format, "written by a later sharpscope"),
          "foreign HDF5 file": (_foreign_hdf5, "not a sharpscope run file"),
          "not HDF5 at all": (_not_hdf5, "cannot be read"),
          "truncated": (_truncated, "cannot be read"),
          "versions = '[]'": (_wrong_typed_attribute, "cannot be read"),
          "interrupted": (_interrupted, "interrupted at step 0 of 4")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_sweep_moves_aside_every_run_it_will_not_reuse(tmp_path, capsys, damage):
    probe = tmp_path / "p.toml"
    probe.write_text(probe_text(widths=(16,), steps=4, every=2, quantities=("hessian",)))
    out = tmp_path / "out"
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    (run,) = (out / "runs").glob("*-s0.h5")
    edit, reason = DAMAGE[damage]
    edit(run)
    before = _digests(out / "runs")
    capsys.readouterr()
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "(1 trained now)" in printed and "superseded" in printed
    after = _digests(out / "runs")
    lost = {name for digest, name in before.items() if digest not in after}
    assert not lost, f"deleted: {lost}"  # every byte stored before is still there
    moved = {name for digest, name in after.items() if digest in before and name.startswith("superseded/")}
    assert {n.rsplit("/", 1)[-1] for n in moved} == {run.name, spectra_path(run).name}
    notes = superseded_notes(out / "runs")
    assert f"{run.name}: " in notes and reason in notes and "by sharpscope sweep" in notes
    with ss.open_run(run) as fresh:  # trained again, whole
        assert fresh.steps == [0, 2, 4]


def test_a_second_sweep_on_the_same_folder_refuses_naming_the_holder(tmp_path, capsys):
    from sharpscope.runs.locks import Lock, folder_lock_file

    probe = tmp_path / "p.toml"
    probe.write_text(probe_text(widths=(16,), steps=4, every=2, quantities=("hessian",)))
    out = tmp_path / "out"
    out.mkdir()
    with Lock(folder_lock_file(out, "sweep")):  # a sweep running here
        assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another sweep is running" in err[0] and f"pid {os.getpid()} on " in err[0]
    assert not (out / "runs").exists()  # it touched nothing
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0  # released: the next one runs


@pytest.mark.slow
def test_a_second_sweep_never_touches_the_live_runs_of_the_first(tmp_path, capsys):
    probe = tmp_path / "p.toml"
    probe.write_text(probe_text(widths=(16, 32, 64), steps=40, every=1, quantities=("hessian",)))
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "sharpscope", "sweep", str(probe), "--out", str(out), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "runs").glob("*.h5")) and time.time() < deadline:
        time.sleep(0.1)
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"another sweep is running in this folder (pid {first.pid} on " in err[0]
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    for run in sorted((out / "runs").glob("*-s0.h5")):
        with ss.open_run(run) as r:
            assert r.steps[-1] == 40


def test_train_run_called_directly_keeps_the_stored_run(tmp_path):
    from sharpscope.sweep import load_probe, plan, train_run

    probe_file = tmp_path / "p.toml"
    probe_file.write_text(probe_text(widths=(16,), steps=4, every=2, quantities=("hessian",)))
    probe = load_probe(probe_file)
    (spec,) = plan(probe)
    path = train_run(probe, spec, tmp_path / "out")
    _interrupted(path)
    kept = path.read_bytes()
    train_run(probe, spec, tmp_path / "out")
    moved = list((tmp_path / "out" / "runs" / "superseded").glob("*/" + path.name))
    assert len(moved) == 1 and moved[0].read_bytes() == kept


def test_a_file_being_written_is_never_moved(tmp_path, capsys):
    from sharpscope.runs.h5file import WriterLock

    path = tmp_path / "run.h5"
    record(path, seed=0)
    assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 0
    path.unlink()
    record(path, seed=1)  # its spectra file is now another run's, and someone is writing it
    lock = WriterLock(spectra_path(path))
    try:
        assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be moved aside" in err[0] and "being written by another process" in err[0]
    assert spectra_path(path).exists() and not (tmp_path / "superseded").exists()


def test_moving_aside_never_overwrites(tmp_path):
    from sharpscope.runs.superseded import Aside

    for n in range(3):  # three moves of one name within a second
        (tmp_path / "run.h5").write_text(f"version {n}")
        Aside(tmp_path, "a test").move(tmp_path / "run.h5", f"reason {n}")
    kept = sorted(p.read_text() for p in tmp_path.glob("superseded/*/run.h5"))
    assert kept == ["version 0", "version 1", "version 2"]
    assert len(list(tmp_path.glob("superseded/*/NOTES.txt"))) == 3


# -- lock files ---------------------------------------------------------------------------------------------------------
def test_lock_files_are_out_of_sight(tmp_path, capsys):
    path = tmp_path / "run.h5"
    record(path)
    assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 0
    assert visible_files(tmp_path) == ["run.h5", "run.spectra.h5"]
    assert sorted(p.name for p in (tmp_path / ".sharpscope-locks").iterdir()) == ["run.h5.lock", "run.spectra.h5.lock"]


_PRELUDE = torch_free_prelude("from sharpscope.runs.locks import Lock, LockHeldError, lock_file_for")

_HOLD = _PRELUDE + textwrap.dedent("""
    lock = Lock(lock_file_for(sys.argv[2]))
    try:
        lock.acquire()
    except LockHeldError as err:
        print("refused", err.holder, flush=True)
        sys.exit(3)
    print("holding", os.getpid(), flush=True)
    time.sleep(float(sys.argv[3]))
""")


def _hold(path, seconds):
    return subprocess.Popen([sys.executable, "-c", _HOLD, str(ROOT), str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)


def test_two_writer_processes_one_holds_the_other_names_it(tmp_path):
    path = tmp_path / "run.h5"
    first = _hold(path, 30)
    assert first.stdout.readline().split() == ["holding", str(first.pid)]
    second = _hold(path, 0)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 3 and f"refused pid {first.pid} on " in out
    inode = os.stat(tmp_path / ".sharpscope-locks" / "run.h5.lock").st_ino
    os.kill(first.pid, signal.SIGKILL)  # the OS releases a dead holder's lock
    first.wait()
    third = _hold(path, 0)
    assert third.stdout.readline().split()[0] == "holding"
    third.wait()
    assert os.stat(tmp_path / ".sharpscope-locks" / "run.h5.lock").st_ino == inode  # never removed


_CONTEND = _PRELUDE + textwrap.dedent("""
    log = sys.argv[3]
    held = 0
    deadline = time.time() + 20
    while held < int(sys.argv[4]) and time.time() < deadline:
        lock = Lock(lock_file_for(sys.argv[2]))
        try:
            lock.acquire()
        except LockHeldError:
            continue
        with open(log, "a") as fh:
            fh.write(f"in {os.getpid()}\\n")
        time.sleep(0.001)
        with open(log, "a") as fh:
            fh.write(f"out {os.getpid()}\\n")
        lock.release()
        held += 1
    print(held)
""")


def test_concurrent_writers_never_hold_one_lock_together(tmp_path):
    """Four processes take and release one lock 40 times each; every "in" is followed by the same process's
    "out" before anyone else's "in" (a lock file unlinked when free would let two in)."""
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", _CONTEND, str(ROOT), str(tmp_path / "run.h5"), str(log), "40"],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    held = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert held == [40] * 4
    lines = log.read_text().split("\n")[:-1]
    assert len(lines) == 320
    for a, b in zip(lines[::2], lines[1::2]):
        assert a.startswith("in ") and b == "out " + a.split()[1], (a, b)


def test_a_sweep_lock_file_names_its_holder(tmp_path):
    from sharpscope.runs.locks import Lock, folder_lock_file

    with Lock(folder_lock_file(tmp_path, "sweep")) as lock:
        record_ = json.loads(lock.path.read_text())
        assert record_["pid"] == os.getpid() and record_["host"] and record_["started"]
