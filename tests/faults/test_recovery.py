"""Recovery never blocks: a spectrum job killed at any moment, for any k and any quantity set, resumes on
the next run and ends with exactly the results an uninterrupted job stores (issue 21, item 8: ``spectrum
--k 1`` killed after 4 rows, then "Can't broadcast (4, 1) -> (4,)" and a ``.recovering`` file on every
re-run). The writer is killed inside its own append (a subprocess that patches the moment to die at)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sharpscope.cli import main
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job
from sharpscope.runs.spectra import SpectraFile, spectra_path
from sharpscope.runs.store import open_run

from ._run_files import crash_spectra_writer, plain_rows, record

SETS = {  # quantity set -> (quantities, settings): equal-length variable rows of length 1, 2 and 12
    "k1": (["hessian"], SpectrumSettings(k=1)),
    "k2+trace": (["hessian", "trace"], SpectrumSettings(k=2, trace_matvecs=9)),
    "density": (["density"], SpectrumSettings(k=1, density_probes=2, density_steps=6)),
}
STAGES = ["mid_columns", "before_complete", "after_complete", "in_recovery_copy"]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """A recorded run and, per quantity set, the rows an uninterrupted job stores for it."""
    folder = tmp_path_factory.mktemp("reference")
    run = folder / "run.h5"
    record(run, steps=5)
    out = {}
    for name, (quantities, settings) in SETS.items():
        target = folder / name / "run.h5"
        target.parent.mkdir()
        shutil.copy(run, target)  # a copy is the same run (same id)
        report = run_spectrum_job([target], quantities, settings, progress=False)
        assert not report.failures
        with SpectraFile(spectra_path(target)) as sf:
            out[name] = sf.rows()
    return run, out


def _keyed(rows):
    return {(r["step"], r["quantity"], str(r["settings"])): r for r in rows}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("qset", sorted(SETS))
def test_a_job_killed_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path, references, qset, stage):
    run, reference = references[0], references[1][qset]
    quantities, settings = SETS[qset]
    target = tmp_path / "run.h5"
    shutil.copy(run, target)
    with open_run(target) as r:
        run_id = getattr(r, "id", None)
    rows = plain_rows(reference)
    crash_at = 4 if len(rows) > 4 else len(rows) - 1  # the "after 4 rows"
    if stage == "in_recovery_copy":  # a crashed file first, then its recovery killed half-way
        crash_spectra_writer(spectra_path(target), rows, "before_complete", row=crash_at, run_id=run_id)
        status = crash_spectra_writer(spectra_path(target), rows[crash_at:], "in_recovery_copy", run_id=run_id,
                                      after_datasets=3)
    else:
        status = crash_spectra_writer(spectra_path(target), rows, stage, row=crash_at, run_id=run_id)
    assert status == -signal.SIGKILL
    with SpectraFile(spectra_path(target)) as sf:  # readable at once: the complete rows, nothing else
        kept = sf.rows()
    assert len(kept) == crash_at and all(np.array_equal(a["values"], b["values"]) for a, b in zip(
        kept, sorted(reference[:crash_at], key=lambda r: (r["quantity"], r["step"]))))
    report = run_spectrum_job([target], quantities, settings, progress=False)  # the next run
    assert not report.failures and report.skipped == crash_at
    assert report.written == len(reference) - crash_at
    assert not list(tmp_path.glob("*.recovering")) and not list(tmp_path.glob("*.creating"))
    with SpectraFile(spectra_path(target)) as sf:
        assert sf.version == 2 and sf.checksummed
        got = _keyed(sf.rows())
    want = _keyed(reference)
    assert got.keys() == want.keys()
    for key, r in want.items():
        assert np.array_equal(got[key]["values"], r["values"]), key
        assert got[key]["values"].shape == r["values"].shape  # (n,) rows, never (n, 1)


def test_a_partial_recovery_file_left_by_a_crash_is_replaced(tmp_path, references):
    run, reference = references[0], references[1]["k1"]
    target = tmp_path / "run.h5"
    shutil.copy(run, target)
    with open_run(target) as r:
        run_id = getattr(r, "id", None)
    rows = plain_rows(reference)
    crash_spectra_writer(spectra_path(target), rows, "before_complete", row=2, run_id=run_id)
    (tmp_path / "run.spectra.h5.recovering").write_bytes(b"a copy killed half-way")
    assert main(["spectrum", str(target), "--k", "1", "--quiet"]) == 0
    assert not (tmp_path / "run.spectra.h5.recovering").exists()
    with SpectraFile(spectra_path(target)) as sf:
        assert len(sf.rows()) == len(reference)


@pytest.mark.parametrize("length", [1, 5])
def test_equal_length_variable_rows_survive_the_recovery_copy(tmp_path, length):
    """The column whose rows all have one length (1: ``k = 1``) reads back as (n, length) from h5py; the copy
    writes it row by row, so every row keeps its length and values."""
    path = tmp_path / "x.spectra.h5"
    rows = [{"step": i, "quantity": "hessian", "settings": "{}", "values": [float(v + i) for v in range(length)],
             "residuals": [0.0] * length, "num_matvecs": 3, "seconds": 0.0, "info": "{}"} for i in range(6)]
    assert crash_spectra_writer(path, rows, "before_complete", row=4) == -signal.SIGKILL
    with SpectraFile(path, "a") as sf:  # recovery copy, then one more row
        sf.append({**rows[4], "values": np.asarray(rows[4]["values"]), "residuals": np.zeros(length)})
    with SpectraFile(path) as sf:
        got = sf.rows()
    assert [r["values"].tolist() for r in got] == [r["values"] for r in rows[:5]]


# -- the process-level cases (slow: real processes importing torch) --------------------------------------
@pytest.mark.slow
def test_spectrum_k1_sigkilled_after_4_rows_then_rerun(tmp_path):
    path = tmp_path / "run.h5"
    record(path, steps=30, width=48)
    cmd = [sys.executable, "-m", "sharpscope", "spectrum", str(path), "--k", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        if spectra_path(path).exists():
            try:
                with SpectraFile(spectra_path(path)) as sf:
                    rows = len(sf)
            except Exception:  # noqa: BLE001 - created but not yet readable
                rows = 0
        if rows >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert rows >= 4, "the job ended before 4 rows"
    assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 0
    assert main(["spectrum", str(path), "--k", "1", "--quiet"]) == 0  # and every later run
    assert not list(tmp_path.glob("*.recovering"))
    with SpectraFile(spectra_path(path)) as sf:
        assert sorted(r["step"] for r in sf.rows()) == list(range(31))


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(4))
def test_a_sweep_killed_in_training_and_again_in_spectra_finishes(tmp_path, attempt):
    from conftest import probe_text

    probe = tmp_path / "p.toml"
    probe.write_text(probe_text(widths=(16, 32), steps=12, every=1, quantities=("hessian",)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sharpscope", "sweep", str(probe), "--out", str(out), "--quiet"]
    rng = np.random.default_rng(attempt)
    for phase in ("training", "spectra"):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            done = list((out / "runs").glob("*.spectra.h5")) if phase == "spectra" else list((out / "runs").glob("*.h5"))
            if done:
                break
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert main(["sweep", str(probe), "--out", str(out), "--quiet"]) == 0
    assert not list(out.rglob("*.recovering"))
    for run in sorted((out / "runs").glob("*-s0.h5")):
        with SpectraFile(spectra_path(run)) as sf:
            assert sorted(r["step"] for r in sf.rows()) == list(range(13))
