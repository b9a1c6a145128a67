"""Probe files and the sweep runner: train a small grid, resume, measure spectra."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import probe_text
from sharpscope.cli import main
from sharpscope.runs.spectra import SpectraFile, spectra_path
from sharpscope.runs.store import open_run
from sharpscope.sweep import load_probe, plan, run_sweep

PROBE = probe_text(parameterizations=("mup", "sp"), lrs=(0.2, 1e38), quantities=("hessian", "precond"))


def test_sweep_trains_measures_and_resumes(tmp_path):
    probe_file = tmp_path / "tiny.toml"
    probe_file.write_text(PROBE)
    probe = load_probe(probe_file)
    assert len(plan(probe)) == 8
    result = run_sweep(probe_file, tmp_path / "out", progress=False)
    assert result.trained == 8 and len(result.runs) == 8
    ok = [r for r in result.runs if "lr0.2-" in r.name]
    diverged = [r for r in result.runs if "lr1e+38" in r.name]
    for run_path in ok:
        with open_run(run_path) as run:
            assert run.steps == [0, 3, 6]
            assert run.meta["parameterization"]["parameterization"]["name"] == run.meta["user"]["probe"]["parameterization"]
        with SpectraFile(spectra_path(run_path)) as sf:
            assert [r["step"] for r in sf.rows("hessian")] == [0, 3, 6]
            assert [r["step"] for r in sf.rows("precond")] == [0, 3, 6]  # plain SGD: no state needed
    assert result.spectra.diverged >= 1  # the huge lr blows up; its last checkpoint is not measured
    for run_path in diverged:
        with open_run(run_path) as run:
            assert run.steps[-1] <= 6
    again = run_sweep(probe_file, tmp_path / "out", progress=False)
    assert again.trained == 0 and again.spectra.computed == 0  # everything skipped


def test_interrupted_run_is_retrained(tmp_path):
    probe_file = tmp_path / "tiny.toml"
    probe_file.write_text(PROBE.replace('lrs = [0.2, 1e+38]', 'lrs = [0.2]').replace('widths = [16, 32]', 'widths = [16]')
                          .replace('["mup", "sp"]', '["mup"]'))
    run_sweep(probe_file, tmp_path / "out", progress=False)
    run_file = next((tmp_path / "out" / "runs").glob("*.h5"))
    data = run_file.read_bytes()
    run_file.write_bytes(data[: len(data) // 2])  # a broken file: retrained, not trusted
    result = run_sweep(probe_file, tmp_path / "out", progress=False)
    assert result.trained == 1
    with open_run(run_file) as run:
        assert run.steps == [0, 3, 6]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('["mup", "sp"]', '["mup", "xp"]'), "unknown parameterization 'xp'"),
    (lambda s: s.replace('["sgd"]', '["lion"]'), "unknown optimizer 'lion'"),
    (lambda s: s.replace("lrs = [0.2, 1e+38]", "lrs = [-1.0]"), r"\[train\] lrs entry must be positive"),
    (lambda s: s.replace('widths = [16, 32]\n', ''), r"\[model\] needs 'widths'"),
    (lambda s: s + "[[[", "not valid TOML"),
])
def test_bad_probe_files(tmp_path, capsys, edit, message):
    probe_file = tmp_path / "bad.toml"
    probe_file.write_text(edit(PROBE))
    assert main(["sweep", str(probe_file), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sharpscope sweep: error:")
    import re
    assert re.search(message, err[0])


def test_shipped_probes_parse():
    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("probes").glob("*.toml")):
        probe = load_probe(path)
        assert probe.description and probe.expected and probe.source, path.name


def test_sweep_command_prints_a_summary(tmp_path, capsys):
    probe_file = tmp_path / "tiny.toml"
    probe_file.write_text(PROBE.replace("lrs = [0.2, 1e+38]", "lrs = [0.2]"))
    assert main(["sweep", str(probe_file), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "quantity", "first", "(step)", "last", "(step)"]
    assert sum(1 for line in out if line.startswith("mup-sgd-w16-lr0.2-s0")) == 2  # hessian and precond


def test_training_runs_on_a_dask_cluster_and_matches_local(tmp_path):
    pytest.importorskip("distributed")
    probe_file = tmp_path / "tiny.toml"
    probe_file.write_text(PROBE.replace("lrs = [0.2, 1e+38]", "lrs = [0.2]"))
    local = run_sweep(probe_file, tmp_path / "local", progress=False)
    remote = run_sweep(probe_file, tmp_path / "dask", executor="dask-local:2", progress=False)
    assert remote.trained == 4 and not remote.spectra.failures
    for a, b in zip(local.runs, remote.runs):
        with open_run(a) as ra, open_run(b) as rb:
            assert ra.steps == rb.steps and ra.loss(ra.steps[-1]) == rb.loss(rb.steps[-1])  # deterministic


def test_a_run_interrupted_before_its_first_loss_is_not_complete(tmp_path):
    import sharpscope as ss
    from sharpscope.sweep import _run_state

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "early.h5"
    with ss.Recorder(path, model, opt, every=10) as rec:  # step 0 captured with no loss yet
        rec.step()
    assert _run_state(path, {}, 100) == "interrupted"
    diverged = tmp_path / "diverged.h5"
    with ss.Recorder(diverged, model, opt, every=10) as rec:
        rec.log_loss(float("nan"))  # what a sweep does when the first loss is already non-finite
    assert _run_state(diverged, {}, 100) == "unrecorded"  # no config record: reused by its name


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("lrs = [0.2, 1e+38]", "lrs = [0.2, 0.2]"), "duplicate runs"),
    (lambda s: s.replace('data = "digits"', 'data = "cifar10"'), "needs \\[train.data_kwargs\\] root"),
    (lambda s: s.replace("base_width = 16", "base_width = 16\nbase_depth = 0"), r"\[model\] base_depth must be >= 1"),
])
def test_more_bad_probe_files(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(PROBE))
    with pytest.raises(ValueError, match=message):
        load_probe(path)


def test_a_sample_budget_sets_the_steps_per_batch_size(tmp_path):
    """``[train] samples``: a fixed budget of training samples, steps = samples / batch_size per run (issue 25:
    Muon vs AdamW across batch sizes at equal data)."""
    from sharpscope.sweep import _steps, run_config

    path = tmp_path / "budget.toml"
    budget = PROBE.replace("steps = 6", "samples = 640") + '[sweep]\ncompare = "batch_size"\n[sweep.axes]\nbatch_size = [32, 64]\n'
    path.write_text(budget.replace("widths = [16, 32]", "widths = [16]"))
    probe = load_probe(path)
    assert probe.samples == 640 and {(s.value("batch_size"), _steps(probe, s)) for s in plan(probe)} == {(32, 20), (64, 10)}
    assert {run_config(probe, s)["steps"] for s in plan(probe)} == {20, 10}
    for text, message in [(PROBE.replace("steps = 6", "steps = 6\nsamples = 640"), "steps or samples"),
                          (PROBE.replace("steps = 6", "samples = 640"), "needs mini-batches")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_probe(path)
