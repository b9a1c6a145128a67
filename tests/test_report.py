"""The report over runs: verdicts from a small sweep, and bad inputs as messages, not crashes."""
from __future__ import annotations

import json

from sharpscope.cli import main
from sharpscope.analysis.report import write_report
from sharpscope.sweep import run_sweep
from conftest import probe_text

PROBE = probe_text("mini", widths=(16, 32, 64), lrs=(0.1, 0.2, 0.4), steps=8, every=4)


def test_sweep_writes_a_report_with_verdicts(tmp_path, capsys):
    probe = tmp_path / "mini.toml"
    probe.write_text(PROBE)
    result = run_sweep(probe, tmp_path / "out", progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["groups"]) == 3 and len(metrics["runs"]) == 9
    group = metrics["groups"][0]
    assert group["axis"] == "width" and group["sizes"] == [16, 32, 64] and group["quantities"]["precond"]["verdict"] in (
        "consistent", "converging", "diverging-up", "diverging-down", "inconsistent")
    assert set(group["quantities"]["precond"]["edge_of_stability"]) == {"16.0", "32.0", "64.0"}
    assert metrics["transfer"][0]["verdict"] in ("transfers", "shifts", "undetermined")
    page = result.report.read_text()
    assert page.count("data:image/png;base64,") == 8  # 3 lrs x (trajectories + spread), across lrs, lr sweep and "<td class='v'>" in page
    assert (tmp_path / "out" / "report.md").exists()
    assert main(["report", *map(str, result.runs[:3]), "--out", str(tmp_path / "r2")]) == 0
    assert "report:" in capsys.readouterr().out


def test_single_width_and_missing_results_are_reported(tmp_path):
    probe = tmp_path / "one.toml"
    probe.write_text(PROBE.replace("widths = [16, 32, 64]", "widths = [16]").replace("lrs = [0.1, 0.2, 0.4]", "lrs = [0.1]"))
    result = run_sweep(probe, tmp_path / "out", progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["groups"][0]["quantities"]["precond"]["reason"] == "only 1 width(s) measured"
    assert "needs >= 2 widths" in metrics["transfer"][0]["reason"]
    result.runs[0].with_name(result.runs[0].stem + ".spectra.h5").unlink()
    write_report(result.runs, tmp_path / "r")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert any("no spectra measured yet" in p for p in metrics["problems"])
    assert "No spectra to plot" in (tmp_path / "r" / "report.html").read_text()


def _sweep(tmp_path, name: str, **kwargs):
    probe = tmp_path / f"{name}.toml"
    probe.write_text(probe_text(name, **kwargs))
    return run_sweep(probe, tmp_path / name, progress=False).runs


def _metrics(tmp_path, runs, sub="r"):
    write_report(runs, tmp_path / sub)
    return json.loads((tmp_path / sub / "metrics.json").read_text())


def test_depth_axis_is_compared_and_seeds_are_averaged(tmp_path):
    text = probe_text("deep", widths=(16,), lrs=(0.1,)).replace(
        "kwargs = { depth = 1,", "kwargs = { residual = true,").replace(
        "base_width = 16", "base_width = 16\ndepths = [1, 2, 4]").replace(
        'data = "digits"', 'data = "digits"\ndepth_scaling = true\nseeds = [0, 1]')
    probe = tmp_path / "deep.toml"
    probe.write_text(text)
    result = run_sweep(probe, tmp_path / "out", progress=False)
    assert len(result.runs) == 6 and "-w16-d4-lr0.1-s1" in result.runs[-1].name
    from sharpscope.runs.store import open_run
    with open_run(result.runs[-1]) as run:
        assert run.meta["parameterization"]["depth"]["branch_multiplier"] == 0.5  # 1/sqrt(4)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (group,) = metrics["groups"]
    assert group["axis"] == "depth" and group["sizes"] == [1, 2, 4] and group["fixed"] == {"width": 16}
    assert group["seeds"] == {"1.0": 2, "2.0": 2, "4.0": 2}
    assert group["quantities"]["precond"]["verdict"] != "undetermined"
    assert metrics["transfer"][0]["axis"] == "depth"
    assert "precond across depths" in (tmp_path / "out" / "report.md").read_text()


def test_runs_of_different_probes_or_batches_are_not_compared(tmp_path):
    a = _sweep(tmp_path, "a", widths=(16,), quantities=("precond", "hessian"))
    b = _sweep(tmp_path, "b", widths=(32,))
    metrics = _metrics(tmp_path, a + b)
    assert metrics["groups"][0]["quantities"]["precond"] == {
        "verdict": "undetermined", "reason": "runs come from different probes (a, b)"}
    assert any("different probes (a, b); not compared" in p for p in metrics["problems"])
    # same probe name, other probe batch (another probe_size)
    other = probe_text("a", widths=(32,)).replace("probe_size = 64", "probe_size = 32")
    (tmp_path / "a2.toml").write_text(other)
    c = run_sweep(tmp_path / "a2.toml", tmp_path / "a2", progress=False).runs
    metrics = _metrics(tmp_path, a + c, "r2")
    assert "2 different probe batches" in metrics["groups"][0]["quantities"]["precond"]["reason"]


def test_a_quantity_missing_for_some_widths_is_named(tmp_path):
    a = _sweep(tmp_path, "q", widths=(16,), quantities=("precond", "hessian"))
    (tmp_path / "q2.toml").write_text(probe_text("q", widths=(32, 64)))
    b = run_sweep(tmp_path / "q2.toml", tmp_path / "q2", progress=False).runs
    metrics = _metrics(tmp_path, a + b)
    quantities = metrics["groups"][0]["quantities"]
    assert quantities["hessian"]["reason"] == "only 1 width(s) measured"
    assert quantities["precond"]["verdict"] != "undetermined"
    assert any("hessian measured for widths 16 but not for 32, 64" in p for p in metrics["problems"])


def test_all_diverged_lr_grid_and_unreadable_files_are_messages(tmp_path, capsys):
    runs = _sweep(tmp_path, "hot", lrs=(1e38, 2e38, 3e38))
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    metrics = _metrics(tmp_path, [*runs, junk, tmp_path / "missing.h5"])
    assert metrics["transfer"][0]["verdict"] == "undetermined"
    assert "all runs diverged" in metrics["transfer"][0]["reason"]
    assert any("every lr diverged for widths 16, 32" in p for p in metrics["problems"])
    assert any(p.startswith("junk.h5: not a readable sharpscope run") for p in metrics["problems"])
    assert any(p.startswith("missing.h5: not a readable sharpscope run") for p in metrics["problems"])
    assert not list((tmp_path / "r" / "figures").glob("lr-*"))  # no empty lr-sweep figure
    assert main(["report", str(junk), "--out", str(tmp_path / "r3")]) == 2
    captured = capsys.readouterr()
    assert "no usable run" in captured.err and "Traceback" not in captured.err + captured.out
    assert "note: no usable run among the files given" in captured.out


def test_density_and_layer_results_get_their_figures(tmp_path):
    runs = _sweep(tmp_path, "full", widths=(16, 32), steps=2, every=2, quantities=("hessian", "layers", "density"))
    metrics = _metrics(tmp_path, runs)
    assert set(metrics["groups"][0]["quantities"]) == {"hessian"}  # density/layers are figures, not trajectories
    names = {p.name for p in (tmp_path / "r" / "figures").glob("*.png")}
    assert any(n.startswith("density-") for n in names) and any(n.startswith("layers-") for n in names)
    from sharpscope.runs.spectra import SpectraFile, spectra_path
    with SpectraFile(spectra_path(runs[0])) as sf:  # muP's parametrizations belong to their layers
        assert sf.rows("layers")[0]["info"]["layers"] == ["input", "hidden.0", "readout"]


def test_a_loop_without_losses_is_measured_and_left_out_of_lr_transfer(tmp_path):
    import torch
    import sharpscope as ss
    from sharpscope.runs.jobs import run_spectrum_job
    from sharpscope.models import MLP

    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    runs = []
    for width in (8, 16):
        torch.manual_seed(0)
        model = MLP(width=width, in_features=8, out_features=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = tmp_path / f"w{width}.h5"
        with ss.Recorder(path, model, opt, probe=(x, y), every=2, loss_fn=torch.nn.CrossEntropyLoss(),
                         meta={"model_factory": "sharpscope.models:MLP",
                               "model_kwargs": {"width": width, "in_features": 8, "out_features": 4},
                               "width": width, "lr": 0.1}) as rec:
            for _ in range(4):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                rec.step()  # no loss passed: unknown, not diverged
        runs.append(path)
    job = run_spectrum_job(runs, ["hessian"], progress=False)
    assert job.diverged == 0 and job.computed == 6
    metrics = _metrics(tmp_path, runs)
    assert metrics["groups"][0]["quantities"]["hessian"]["verdict"] != "undetermined"
    assert any("w8.h5: records no training loss" in p for p in metrics["problems"])
    assert metrics["transfer"][0]["verdict"] == "undetermined"


def test_blown_up_runs_count_as_diverged_in_the_lr_transfer():
    from sharpscope.analysis.comparisons import RunSummary, analyze

    def run(width, lr, final):
        return RunSummary(f"w{width}-lr{lr}.h5", "mup", "sgd", lr, width, final, initial_loss=2.3)

    grid = {0.25: 0.9, 0.5: 0.6, 1.0: 0.7, 2.0: 40.0}  # lr 2 blew up: finite, far above the initial 2.3
    metrics = analyze([run(w, lr, loss) for w in (16, 32) for lr, loss in grid.items()])
    (transfer,) = metrics["transfer"]
    assert transfer["n_diverged"] == {16: 1, 32: 1}
    assert any("2 run(s) ended above twice their initial loss (width@lr: 16@2, 32@2)" in p for p in metrics["problems"])
    assert 0.5 < transfer["lr_opt"][16] < 1.0  # the optimum from the finite bracket 0.25, 0.5, 1
