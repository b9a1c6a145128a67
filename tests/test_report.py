"""The report over runs: verdicts from a small sweep, and bad inputs as messages, not crashes."""
from __future__ import annotations

import json

from conftest import probe_text, report_metrics, sweep_runs
from sharpscope.analysis.report import write_report
from sharpscope.cli import main
from sharpscope.sweep import run_sweep

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
    # 3 figures: the headline (the 3 lrs side by side, trajectories over spread), across lrs, lr sweep. It was 8
    # (3 lrs x (trajectories + spread) + across lrs + lr sweep): issue 22 asks for the headline comparison first,
    # so each group's trajectories and spread are now panels of one figure, drawn once
    assert page.count("data:image/png;base64,") == 3 and "<figure id=headline class=wide>" in page
    assert page.index("id=summary") < page.index("id=headline") < page.index("<h2>Verdicts</h2>")
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


def test_all_diverged_lr_grid_and_unreadable_files_are_messages(tmp_path, capsys):
    runs = sweep_runs(tmp_path, "hot", lrs=(1e38, 2e38, 3e38))
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    metrics = report_metrics(tmp_path, [*runs, junk, tmp_path / "missing.h5"])
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
    runs = sweep_runs(tmp_path, "full", widths=(16, 32), steps=2, every=2, quantities=("hessian", "layers", "density"))
    metrics = report_metrics(tmp_path, runs)
    assert set(metrics["groups"][0]["quantities"]) == {"hessian"}  # density/layers are figures, not trajectories
    names = {p.name for p in (tmp_path / "r" / "figures").glob("*.png")}
    assert any(n.startswith("density-") for n in names) and any(n.startswith("layers-") for n in names)
    from sharpscope.runs.spectra import SpectraFile, spectra_path
    with SpectraFile(spectra_path(runs[0])) as sf:  # muP's parametrizations belong to their layers
        assert sf.rows("layers")[0]["info"]["layers"] == ["input", "hidden.0", "readout"]
