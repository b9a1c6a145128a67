"""The report over runs: verdicts from a small sweep, and bad inputs as messages, not crashes."""
from __future__ import annotations

import json

from sharpscope.cli import main
from sharpscope.report import write_report
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
    assert group["widths"] == [16, 32, 64] and group["quantities"]["precond"]["verdict"] in (
        "consistent", "converging", "diverging-up", "diverging-down", "inconsistent")
    assert set(group["quantities"]["precond"]["edge_of_stability"]) == {"16.0", "32.0", "64.0"}
    assert metrics["transfer"][0]["verdict"] in ("transfers", "shifts", "undetermined")
    page = result.report.read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td class='v'>" in page
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
