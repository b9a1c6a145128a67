"""The report over runs: verdicts from a small sweep, and bad inputs as messages, not crashes."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import probe_text, report_metrics, sweep_runs
from sharpscope.analysis import figures as figure_files
from sharpscope.analysis import findings, page
from sharpscope.analysis.comparisons import RunSummary, analyze_in_detail
from sharpscope.analysis.expectations import Expectation, check_expectations, parse_expectations
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


# -- the report's shape (issue 22, item 3): on RunSummary objects, without run files, where it can be --
STEPS = list(range(0, 101, 10))


def _quickstart_like(lrs=(0.5,), depths=(2.0,)) -> list[RunSummary]:
    """muP (trajectories that coincide at the edge 2/lr) and SP (growing with width; width 512 blew up)."""
    runs = []
    for param in ("mup", "sp"):
        for lr in lrs:
            for depth in depths:
                for width in (64, 128, 256, 512):
                    edge = 2 / lr
                    bump = 1 + (0.02 if param == "mup" else 0.6) * math.log2(width / 64)
                    values = [edge * (1 - math.exp(-s / 15)) * bump for s in STEPS]
                    final = 104.5 if (param, width) == ("sp", 512) else 0.08
                    r = RunSummary(f"{param}-w{width}-lr{lr}-d{depth}.h5", param, "sgd", lr, float(width), final,
                                   depth=depth, initial_loss=2.3, trajectories={"precond": (STEPS, values)},
                                   thresholds={"precond": edge})
                    runs.append(r)
    return runs


def _metrics(runs, compare=None):
    from sharpscope.analysis.report import _run_entry

    analysis = analyze_in_detail(runs, compare)
    analysis.metrics["runs"] = [_run_entry(s) for s in analysis.runs]
    return analysis, analysis.metrics


def test_the_summary_is_written_from_the_verdicts():
    _, metrics = _metrics(_quickstart_like())
    text = " ".join(findings.summary_sentences(metrics))
    assert text.startswith("muP: preconditioned sharpness consistent across widths 64-512 (spread ")
    assert "at the edge of stability" in text.split("SP:")[0]
    sp = text.split("SP: ")[1]
    assert sp.startswith("diverging-up (spread ") and "width 512 diverged at lr 0.5" in sp
    assert text.endswith("Not analysed: lr transfer across widths: 1 lr (needs >= 3).")
    labels = findings.Labels.of(metrics)  # only the parameterization varies: no "sgd / lr 0.5 / depth 2"
    assert labels.varying == ("parameterization",) and labels.common() == ["SGD", "lr 0.5", "depth 2"]


def test_labels_carry_only_the_settings_that_vary():
    _, metrics = _metrics(_quickstart_like(lrs=(0.25, 0.5), depths=(2.0, 4.0)), compare="width")
    labels = findings.Labels.of(metrics)
    assert set(labels.varying) == {"parameterization", "lr", "depth"}
    subjects = {f.subject for f in findings.findings(metrics) if f.kind == "consistency"}
    assert "muP / lr 0.25 / depth 4" in subjects and not any("SGD" in s for s in subjects)
    assert findings.Labels.full(metrics).entry(metrics["groups"][0]) == "mup / sgd / lr 0.25 / depth 2"  # the CLI's


def test_checks_that_cannot_apply_are_one_note_not_table_rows(tmp_path):
    runs = _quickstart_like()
    runs[0].trajectories["hessian"] = (STEPS, [1.0] * len(STEPS))  # measured at one width only
    analysis, metrics = _metrics(runs)
    assert [t["not_analysed"] for t in metrics["transfer"]] == ["1 lr (needs >= 3)"] * 2
    assert metrics["transfer"][0]["verdict"] == "undetermined"  # metrics.json keeps its verdict and reason
    assert metrics["groups"][0]["quantities"]["hessian"]["not_analysed"] == "1 width measured (needs >= 2)"
    items = findings.findings(metrics)
    rows = page.verdict_rows(items, interval=False)
    assert [r[1] for r in rows] == ["precond across widths"] * 2  # no "lr transfer" or one-width rows
    assert findings.not_analysed_note(items) == [
        "super consistency across widths (hessian) for muP: 1 width measured (needs >= 2)",
        "lr transfer across widths: 1 lr (needs >= 3)"]
    labels = findings.Labels.of(metrics)
    html = page.html_page("t", {**metrics, "settings": {}, "versions": {}}, items, labels, [])
    assert html.count("<b>Not analysed</b>") == 1 and "lr transfer across widths</td>" not in html


def test_the_page_opens_on_the_summary_then_the_headline_and_folds_the_settings(tmp_path):
    analysis, metrics = _metrics(_quickstart_like())
    metrics.update(settings={"probe": "x" * 500, "expected": "muP coincides; SP grows with width."},
                   versions={"sharpscope": "0"})
    labels = findings.Labels.of(metrics)
    items = findings.findings(metrics, labels)
    saved = figure_files.build(analysis, tmp_path, items, labels)
    assert [f.role for f in saved] == ["headline"] and saved[0].wide  # muP and SP side by side, nothing twice
    assert saved[0].name == "precond-muP-vs-SP-sgd-lr0.5-widths-depth2"
    checks = check_expectations(parse_expectations({"mup": "consistent", "sp": "consistent"}), items)
    html = page.html_page("quickstart", metrics, items, labels, saved, checks)
    order = [html.index(x) for x in ("id=summary", "<b>Expected</b>", "id=headline", "<h2>Verdicts</h2>",
                                     "<details><summary>Settings and software</summary>")]
    assert order == sorted(order) and "<pre>" not in html
    assert "✓ muP consistent: held" in html and "✗ SP consistent: did not hold (precond across widths (SP): diverging-up)" in html
    md = page.markdown_page("quickstart", metrics, items, labels, saved, tmp_path, checks)
    assert md.index("![") < md.index("## Verdicts") and "| muP | precond across widths | **consistent** |" in md


def test_expectations_held_failed_untested_and_their_one_line_errors(tmp_path):
    _, metrics = _metrics(_quickstart_like())
    items = findings.findings(metrics)
    found = check_expectations([Expectation("mup", "precond", ("consistent",)),
                                Expectation("sp", "consistency", ("inconsistent", "diverging-up")),
                                Expectation("mup", "transfer", ("transfers",)), Expectation("ntk", "consistency", ("consistent",))],
                               items)
    assert [c.status for c in found] == ["held", "held", "not tested", "not tested"]
    assert found[2].note == "not analysed: 1 lr (needs >= 3)"
    from sharpscope.probe_file import load_probe

    for table, message in (('mup = "consistant"', "[expect] mup: unknown verdict 'consistant'; choose from consistent"),
                           ('ntk = "consistent"', "[expect] ntk: not a parameterization of this probe; use one of mup"),
                           ('[expect.mup]\nhessian = "consistent"', "[expect.mup] hessian: not a check of this probe"),
                           ('[expect.mup]\ntransfer = "consistent"', "[expect.mup] transfer: unknown verdict")):
        probe = tmp_path / "p.toml"
        probe.write_text(PROBE + ("[expect]\n" if not table.startswith("[") else "") + table + "\n")
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
            load_probe(probe)
        assert "\n" not in str(err.value)
    probe.write_text(PROBE + '[expect.mup]\nprecond = ["consistent", "converging"]\ntransfer = "shifts"\n')
    assert load_probe(probe).expect == (Expectation("mup", "precond", ("consistent", "converging")),
                                        Expectation("mup", "transfer", ("shifts",)))
    assert load_probe(probe).expect[1].as_dict() == {"parameterization": "mup", "check": "transfer", "expected": ["shifts"]}


def _recorded_run(path, width=8, online=True, steps=6):
    import torch

    import sharpscope as ss
    from sharpscope.models import MLP

    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    model = MLP(width=width, in_features=8, out_features=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    with ss.Recorder(path, model, opt, batch=(x, y), every=2, loss_fn=loss_fn, sharpness_every=2 if online else None,
                     meta={"model_factory": "sharpscope.models:MLP", "width": width, "lr": 1e-3,
                           "model_kwargs": {"width": width, "in_features": 8, "out_features": 4}}) as rec:
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return path


def test_a_one_run_report_shows_that_runs_trajectories(tmp_path):
    from sharpscope.runs.jobs import run_spectrum_job

    run = _recorded_run(tmp_path / "adam.h5")
    assert run_spectrum_job([run], ["precond"], progress=False).computed > 0
    page_path = write_report([run], tmp_path / "r")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["summary"][0].startswith("The run: preconditioned sharpness ")
    assert "x its EoS threshold 3.8e4" in metrics["summary"][0] and "training loss" in metrics["summary"][0]
    assert metrics["runs"][0]["online_logs"] == ["eos_ratio", "sharpness_preconditioned"]
    (figure,) = (tmp_path / "r" / "figures").glob("*.png")
    assert figure.name == "run-adam.png"
    html = page_path.read_text()
    assert html.index("id=summary") < html.index("<figure id=headline class=wide>") < html.index("<h2>Verdicts</h2>")
    assert "No verdict among these runs" in html and "online preconditioned sharpness (Recorder)" in html
    # variant: no spectra measured, only the loop's online sharpness: still the run's figure
    bare = _recorded_run(tmp_path / "bare.h5", width=16)
    write_report([bare], tmp_path / "r2")
    assert [p.name for p in (tmp_path / "r2" / "figures").glob("*.png")] == ["run-bare.png"]


def test_the_report_modules_only_call_downward():
    """report -> page -> figures -> findings -> expectations; figures -> comparisons -> summaries; plots below
    all: each module imports (lazily too) only modules after it in this order."""
    order = ["report", "page", "figures", "findings", "expectations", "comparisons", "summaries", "plots"]
    folder = Path(__file__).resolve().parents[1] / "sharpscope" / "analysis"
    for i, name in enumerate(order):
        imported = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import x
                imported.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        upward = imported & set(order[:i + 1])
        assert not upward, f"{name} imports {sorted(upward)}, which call it"


def test_the_demo_density_axis_reaches_the_edge_of_stability(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from sharpscope.demo import _plot
    from sharpscope.estimators import SpectralDensity

    nodes = [np.array([0.0, 0.01, 0.8, 1.76, 3.32])] * 2
    density = SpectralDensity(nodes, [np.full(5, 0.2)] * 2, 0, 0)
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)  # keep the figure to read its axes
    try:
        _plot(density, [3.32, 1.76], 4.0, tmp_path / "d.png")
    finally:
        plt.close = real
    ax = captured["fig"].axes[0]
    assert ax.get_xlim()[1] > 4.0 and any(list(ln.get_xdata()) == [4.0, 4.0] for ln in ax.lines)
    assert "2/lr" in ax.get_title(loc="left") and (tmp_path / "d.png").exists()
    plt.close(captured["fig"])
