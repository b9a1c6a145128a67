"""A run is its id, not its path; stored data is checked (issue 21, items 5 and 6).

Item 6: record a run, compute its spectra, delete the run file, record a different run at the same path,
run ``spectrum``: it said "skipped 4 already stored" and kept the old values (0.44187 where the new run's
is 10.864). Item 5: one exponent bit of the stored batch flipped, ``inspect --verify`` said every
checkpoint read back intact and the spectrum changed. Each case checks the answer against a dense float64
Hessian of the run actually at the path, or an on-disk invariant."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import sharpscope as ss
from sharpscope.cli import main
from sharpscope.runs.spectra import SpectraFile, spectra_path

from ._run_files import allclose, dense_top, dense_top_rebuilt, plain_rows, record, spectra_values, superseded_notes


def _spectrum(capsys, path, *extra) -> str:
    assert main(["spectrum", str(path), "--k", "1", "--quiet", *extra]) == 0
    return capsys.readouterr().out


def _run_id(path):
    with ss.open_run(path) as run:
        return getattr(run, "id", None)


def _check_against_dense(path):
    values = spectra_values(path)
    with ss.open_run(path) as run:
        steps = run.steps
    assert sorted(values) == steps
    for step in steps:
        assert allclose(values[step][0], dense_top(path, step), rtol=1e-4), (step, values[step], dense_top(path, step))


# -- item 6: a path stands for a run ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deleted", "moved away", "copied over"])
def test_a_new_run_at_an_old_path_gets_its_own_spectra(tmp_path, capsys, how):
    path = tmp_path / "run.h5"
    record(path, seed=0, lr=0.1)
    _spectrum(capsys, path)
    old = spectra_values(path)
    if how == "deleted":
        path.unlink()
        record(path, seed=1, lr=0.5, width=12)
    elif how == "moved away":
        (tmp_path / "elsewhere").mkdir()
        path.rename(tmp_path / "elsewhere" / "run.h5")
        record(path, seed=1, lr=0.5, width=12)
    else:
        record(tmp_path / "other.h5", seed=1, lr=0.5, width=12)
        shutil.copy(tmp_path / "other.h5", path)
    out = _spectrum(capsys, path)
    assert "skipped 0 already stored" in out and "moved to" in out
    _check_against_dense(path)  # the new run's values, not the old ones
    assert spectra_values(path)[3] != old[3]
    moved = list(tmp_path.glob("superseded/*/run.spectra.h5"))
    assert len(moved) == 1  # the old results: kept, with a note, never reused
    with SpectraFile(moved[0]) as sf:
        assert {r["step"]: r["values"].tolist() for r in sf.rows()} == old
    assert "belong to run" in superseded_notes(tmp_path)


def test_spectra_from_before_run_ids_are_not_taken_for_a_run_with_an_id(tmp_path, capsys):
    path = tmp_path / "run.h5"
    record(path, seed=0)
    _spectrum(capsys, path)
    with SpectraFile(spectra_path(path)) as sf:
        rows = plain_rows(sf.rows())
    spectra_path(path).rename(tmp_path / "kept.h5")
    with SpectraFile(spectra_path(path), "a", run_id=None) as sf:  # what an older sharpscope wrote: no id
        for r in rows:
            sf.append({**r, "values": np.asarray(r["values"]), "residuals": np.asarray(r["residuals"])})
    out = _spectrum(capsys, path)
    assert "skipped 0 already stored" in out and "none (an older file)" in superseded_notes(tmp_path)
    _check_against_dense(path)


def test_old_pairs_without_ids_are_still_matched_by_path(tmp_path, capsys):
    path = tmp_path / "run.h5"
    record(path, seed=0)
    with h5py.File(path, "r+") as f:  # a run file from before run ids
        if "run_id" in f.attrs:
            del f.attrs["run_id"]
    assert "wrote 4 result(s)" in _spectrum(capsys, path)
    assert "skipped 4 already stored" in _spectrum(capsys, path)
    with SpectraFile(spectra_path(path)) as sf:
        assert "run_id" not in sf._file.attrs and all("run_id" not in r["info"] for r in sf.rows())
    _check_against_dense(path)


_CRASH_WRITER = """
import os, signal, sys, h5py
f = h5py.File(sys.argv[1], "r+", libver="latest")
f.swmr_mode = True
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_id_survives_resume_and_crash_recovery(tmp_path):
    path = tmp_path / "run.h5"
    record(path, steps=2)
    first = _run_id(path)
    assert isinstance(first, str) and len(first) == 32
    subprocess.run([sys.executable, "-c", _CRASH_WRITER, str(path)], check=False)  # a writer died with it open
    model = ss.MLP(**{"width": 8, "depth": 1, "in_features": 4, "out_features": 3})
    with ss.Recorder(path, model, resume=True) as rec:  # recovered by copy, then appended to
        rec.capture()
    assert _run_id(path) == first
    shutil.copy(path, tmp_path / "copy.h5")
    assert _run_id(tmp_path / "copy.h5") == first  # a copy is the same run
    record(tmp_path / "again.h5", steps=2)
    assert _run_id(tmp_path / "again.h5") != first  # the same recipe recorded again is another run


def test_a_result_of_a_run_replaced_while_the_job_ran_is_refused(tmp_path, monkeypatch):
    import sharpscope.runs.jobs as jobs

    path = tmp_path / "run.h5"
    record(path, seed=0)
    original = jobs.compute_task
    replaced = []

    def compute_then_replace(run_path, *args, **kwargs):
        rows = original(run_path, *args, **kwargs)
        if not replaced:  # the run is recorded again while its first result is in flight
            os.unlink(run_path)
            record(run_path, seed=1, lr=0.5, width=12)
            replaced.append(True)
        return rows

    monkeypatch.setattr(jobs, "compute_task", compute_then_replace)
    report = jobs.run_spectrum_job([path], ["hessian"], jobs.SpectrumSettings(k=1), progress=False)
    assert report.failures and all("cannot go into the results" in m for _, _, m in report.failures)
    monkeypatch.setattr(jobs, "compute_task", original)
    report = jobs.run_spectrum_job([path], ["hessian"], jobs.SpectrumSettings(k=1), progress=False)
    assert not report.failures
    _check_against_dense(path)


def test_the_report_reads_only_the_runs_own_results(tmp_path, capsys):
    from sharpscope.analysis.comparisons import collect

    path = tmp_path / "run.h5"
    record(path, seed=0)
    _spectrum(capsys, path)
    path.unlink()
    record(path, seed=1, lr=0.5)
    summaries, problems = collect([path])
    assert summaries and not summaries[0].trajectories
    assert any("belong to run" in p for p in problems), problems


def test_a_sweep_run_deleted_before_the_probe_was_edited_gets_its_own_spectra(tmp_path, capsys):
    from conftest import probe_text

    probe = tmp_path / "p.toml"
    probe.write_text(probe_text(widths=(16, 32), steps=4, every=2, quantities=("hessian",)))
    out = tmp_path / "out"
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    victim = next((out / "runs").glob("*-w16-*.h5"))
    old = spectra_values(victim)
    victim.unlink()  # its spectra file stays behind
    probe.write_text(probe.read_text().replace('activation = "tanh"', 'activation = "relu"'))
    capsys.readouterr()
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    assert "(2 trained now)" in capsys.readouterr().out
    new = spectra_values(victim)
    assert sorted(new) == [0, 2, 4] and new[4] != old[4]
    for step, values in new.items():
        assert allclose(values[0], dense_top_rebuilt(victim, step), rtol=1e-4), step
    assert "belong to run" in superseded_notes(out / "runs")  # the orphaned results: aside, not reused


# -- item 5: stored data unguarded ------------------------------------------------------------------------------------
def _flip_bit(path, dataset: str, bit: int) -> None:
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        offset, itemsize = ds.id.get_offset(), ds.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(offset + bit // 8)
        byte = fh.read(1)[0]
        fh.seek(offset + bit // 8)
        fh.write(bytes([byte ^ (1 << (bit % 8))]))
    assert itemsize


@pytest.mark.parametrize("case", ["input exponent bit", "target bit", "no checksums attribute: the digest"])
def test_a_damaged_batch_is_found_and_never_measured(tmp_path, capsys, case):
    path = tmp_path / "run.h5"
    record(path)
    if case == "no checksums attribute: the digest":  # a version 2 file from before batch checksums
        with h5py.File(path, "r+") as f:
            if "checksums" in f["batch"].attrs:
                del f["batch"].attrs["checksums"]
    dataset, bit = ("batch/1", 3) if case == "target bit" else ("batch/0", 30)  # bit 30: float32 exponent
    _flip_bit(path, dataset, bit)
    assert main(["inspect", str(path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "every checkpoint reads back intact" not in out
    assert ("stored batch" in out and "fails its checksum" in out) or "the stored batch digests to" in out
    assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert printed.count("FAILED") == 4 and "batch" in printed
    assert not spectra_path(path).exists() or not spectra_values(path)  # no value measured on damaged data


@pytest.mark.parametrize("field", ["config", "batch_digest"])
def test_a_damaged_provenance_record_is_found_by_verify(tmp_path, capsys, field):
    path = tmp_path / "run.h5"
    record(path, config={"model": "mlp", "seed": 0, "lr": 0.1})
    with h5py.File(path, "r+") as f:
        record_ = json.loads(f["provenance"].attrs["json"])
        if field == "config":
            record_["config"]["lr"] = 0.2  # the digest still says 0.1
        else:
            record_["recorder"]["batch_digest"] = "sha256:" + "0" * 64
        f["provenance"].attrs["json"] = json.dumps(record_)
    assert main(["inspect", str(path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert ("config digests to" if field == "config" else "the stored batch digests to") in out


@pytest.mark.parametrize("tamper", ["a value", "the row's run id"])
def test_a_damaged_result_row_is_found_by_verify(tmp_path, capsys, tamper):
    path = tmp_path / "run.h5"
    record(path)
    _spectrum(capsys, path)
    with SpectraFile(spectra_path(path)) as sf:
        rows = sf.rows()
    with h5py.File(spectra_path(path), "r+") as f:
        if tamper == "a value":
            f["values"][2] = np.asarray(rows[2]["values"]) * 1.01  # no new checksum
        else:  # a consistent row (new checksum) that says it is another run's
            from sharpscope.runs.spectra import _ROW_CHECKSUM

            info = {**rows[2]["info"], "run_id": "f" * 32}
            row = {name: f[name].asstr()[2] if h5py.check_string_dtype(f[name].dtype) else f[name][2]
                   for name in ("step", "quantity", "settings", "values", "residuals", "num_matvecs", "seconds", "info")}
            row["info"] = json.dumps(info)
            f["info"][2] = row["info"]
            f["checksum"][2] = _ROW_CHECKSUM.compute(row)
    assert main(["inspect", str(path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert ("fails its checksum" if tamper == "a value" else "belongs to run ffff") in out
    if tamper == "a value":  # a damaged row: one line, nothing skipped on it
        assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 2
        assert "move it away and run the spectrum job again" in capsys.readouterr().err
    else:  # a file holding another run's row is not this run's: aside, and measured afresh
        _spectrum(capsys, path)
        assert len(list(tmp_path.glob("superseded/*/run.spectra.h5"))) == 1
        _check_against_dense(path)
