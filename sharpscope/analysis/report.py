"""The report over a set of runs: metrics.json, report.md, a self-contained report.html and figures/.

It is three steps, each a module that only calls the ones below it:

1. **analysis** -- :mod:`~sharpscope.analysis.summaries` reads the runs, :mod:`~sharpscope.analysis.comparisons`
   groups them and computes the verdicts (metrics.json);
2. **figures** -- :mod:`~sharpscope.analysis.figures` draws them with the primitives of
   :mod:`~sharpscope.analysis.plots`;
3. **page** -- :mod:`~sharpscope.analysis.page` writes report.html and report.md from the metrics, the
   findings (:mod:`~sharpscope.analysis.findings`: verdict rows, labels, the summary paragraph, the
   expectations of :mod:`~sharpscope.analysis.expectations`) and the figures.

This module runs them in that order and holds the ``sharpscope report`` command. Every problem (one width
only, no results, all runs diverged, mismatched probes) becomes a line in the report, never a crash or an
empty figure. Its imports are lazy, so building the command-line parser loads neither torch nor matplotlib.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["write_report", "verdict_lines", "summary_lines"]


def _json_default(x: Any) -> Any:
    import numpy as np

    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _run_entry(s) -> dict[str, Any]:
    """A run's metrics.json entry: coordinates, losses and, per measured quantity, its first and last
    measured value and threshold, and its first and last finite loss (what the summary says of a run compared
    with nothing)."""
    quantities = {}
    for q, (steps, values) in s.trajectories.items():
        finite = [(st, v) for st, v in zip(steps, values) if math.isfinite(v)]
        if finite:
            quantities[q] = {"first": list(finite[0]), "last": list(finite[-1]), "threshold": s.thresholds.get(q)}
    losses = [(st, v) for st, v in zip(*s.loss_curve) if math.isfinite(v)]
    return {"path": s.path, "parameterization": s.parameterization, "optimizer": s.optimizer, "lr": s.lr,
            "width": s.width, "depth": s.depth, "seed": s.seed, "axes": s.axes, "results_settings": s.settings_used,
            "final_loss": _finite(s.final_loss), "initial_loss": _finite(s.initial_loss), "blew_up": s.blew_up,
            "quantities": quantities, "online_logs": sorted(s.logs),
            "loss_first": list(losses[0]) if losses else None, "loss_last": list(losses[-1]) if losses else None}


def _expectations(expect: Any):
    from .expectations import Expectation, parse_expectations

    if expect is None:
        return ()
    if isinstance(expect, Mapping):
        return parse_expectations(expect)
    if all(isinstance(e, Expectation) for e in expect):
        return tuple(expect)
    raise ValueError("expect must be an [expect] table (a dict) or Expectation objects from load_probe(...).expect")


def write_report(runs: Sequence[str | Path], out_dir: str | Path, title: str = "sharpscope report",
                 settings: dict | None = None, *, compare: str | None = None, spectrum: Any = None,
                 expect: Any = None) -> Path:
    """Write metrics.json, report.md, report.html and figures/ under ``out_dir``; returns report.html.

    ``compare``: the axis the verdicts compare (default: the runs' sweep's, else width and depth where
    they vary); ``spectrum``: a :class:`~sharpscope.runs.jobs.SpectrumSettings` whose results to use
    when a run holds results under several settings (default: the settings most results used);
    ``settings``: shown in the report (``expected`` and ``source``: what the probe predicts, under the
    summary); ``expect``: a probe's ``[expect]`` table (or ``Probe.expect``), checked against the verdicts."""
    if not runs:
        raise ValueError("no run files given")
    expectations = _expectations(expect)
    import numpy as np
    import torch

    from .._version import __version__
    from . import figures as figure_files
    from .comparisons import analyze_in_detail, collect
    from .expectations import check_expectations
    from .findings import Labels, findings, summary_sentences
    from .page import html_page, markdown_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries, problems = collect(runs, compare=compare, spectrum=spectrum)
    analysis = analyze_in_detail(summaries, compare)
    metrics = analysis.metrics
    metrics["problems"] = problems + metrics["problems"]
    if not analysis.runs:
        metrics["problems"].append("no usable run among the files given: nothing to analyse")
    metrics["runs"] = [_run_entry(s) for s in analysis.runs]
    metrics["settings"] = settings or {}
    metrics["versions"] = {"sharpscope": __version__, "torch": torch.__version__, "numpy": np.__version__}
    labels = Labels.of(metrics)
    items = findings(metrics, labels)
    checks = check_expectations(expectations, items)
    metrics["summary"] = summary_sentences(metrics, items, labels)
    if checks:
        metrics["expectations"] = [c.as_dict() for c in checks]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    saved = figure_files.build(analysis, out, items, labels)
    (out / "report.md").write_text(markdown_page(title, metrics, items, labels, saved, out, checks))
    page = out / "report.html"
    page.write_text(html_page(title, metrics, items, labels, saved, checks))
    return page


def verdict_lines(metrics_json: str | Path) -> list[str]:
    """One line per verdict of a written ``metrics.json``, then one for the checks that cannot apply, then
    one per note."""
    from .findings import Labels, findings, not_analysed_note

    metrics = json.loads(Path(metrics_json).read_text())
    labels = Labels.full(metrics)
    rows = [(f.subject or "all runs", f.check, f.verdict, f.reason) for f in findings(metrics, labels) if f.applicable]
    wa, wb = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
    lines = [f"{a:<{wa}}  {b:<{wb}}  {c:<13} {d}" for a, b, c, d in rows]
    missing = not_analysed_note(findings(metrics, labels))
    lines += [f"not analysed: {'; '.join(missing)}"] if missing else []
    return lines + [f"note: {p}" for p in metrics["problems"]]


def summary_lines(metrics_json: str | Path, width: int = 100) -> list[str]:
    """The report's summary paragraph (and expectation checks) of a written ``metrics.json``, wrapped."""
    import textwrap

    metrics = json.loads(Path(metrics_json).read_text())
    from .findings import summary_sentences

    text = " ".join(metrics.get("summary") or summary_sentences(metrics))
    lines = textwrap.wrap(text, width)
    for c in metrics.get("expectations", []):
        lines.append(f"expected {c['parameterization']} {c['check']} {' or '.join(c['expected'])}: {c['status']}"
                     + (f" -- {c['note']}" if c.get("note") and c["status"] != "held" else ""))
    return lines


def _report_command(args) -> int:
    page = write_report(args.runs, args.out, title=args.title, compare=args.compare)
    metrics = Path(args.out) / "metrics.json"
    for line in summary_lines(metrics):
        print(line)
    print()
    for line in verdict_lines(metrics):
        print(line)
    print(f"report: {page}")
    if not json.loads(metrics.read_text())["runs"]:
        print("sharpscope report: error: no usable run among the files given (see the notes above)", file=sys.stderr)
        return 2
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="verdicts, figures and report.html over run files",
                              description="Analyse runs (grouped by parameterization, optimizer and lr; "
                                          "compared across widths, and across depths when they vary) and write metrics.json, report.md, "
                                          "report.html and figures/ to --out.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN.h5")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--title", default="sharpscope report")
    p.add_argument("--compare", metavar="AXIS", help="the axis the verdicts compare: width, depth or any setting the "
                                                     "runs record (sweep axes, the Recorder's axes= or meta keys, e.g. "
                                                     "batch_size); default: the runs' sweep's, else width/depth")
    p.set_defaults(func=_report_command)
