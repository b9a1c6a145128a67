"""The report over a set of runs: metrics.json, report.md and a self-contained report.html.

Runs are grouped by (parameterization, optimizer, lr); within a group the sizes (widths) are
compared with :func:`~sharpscope.consistency.super_consistency` for every measured quantity, the
preconditioned sharpness is set against its edge-of-stability threshold, and across lrs
:func:`~sharpscope.consistency.lr_transfer` says whether the optimal lr moves with width. Every
problem (one width only, no results, all runs diverged) becomes a line in the report, never a crash
or an empty figure. Figures come from :mod:`sharpscope.plots`; the HTML embeds them (base64 PNG)
and opens without a server.
"""
from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import consistency, plots
from ._version import __version__
from .jobs import SpectraFile, spectra_path
from .store import open_run

__all__ = ["RunSummary", "collect", "analyze", "write_report", "verdict_lines"]


@dataclass
class RunSummary:
    """What the report needs from one run: its coordinates, final loss and measured trajectories."""

    path: str
    parameterization: str
    optimizer: str
    lr: float
    width: float
    final_loss: float
    trajectories: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


def _coordinates(meta: dict) -> tuple[str, str, float | None, float | None]:
    user = meta.get("user") or {}
    probe = user.get("probe") or {}
    record = meta.get("parameterization") or {}
    param = probe.get("parameterization") or (record.get("parameterization") or {}).get("name") \
        or user.get("parameterization") or "unknown"
    opt_meta = meta.get("optimizer") or {}
    optimizer = probe.get("optimizer") or user.get("optimizer") or opt_meta.get("class", "unknown").rsplit(".", 1)[-1].lower()
    lr = probe.get("lr") or user.get("lr") or (opt_meta.get("defaults") or {}).get("lr")
    width = probe.get("width") or user.get("width") or (meta.get("model_kwargs") or {}).get("width")
    return str(param), str(optimizer), lr, width


def collect(runs: Sequence[str | Path]) -> tuple[list[RunSummary], list[str]]:
    """Read each run's coordinates, last loss and stored spectra; problems come back as messages."""
    summaries, problems = [], []
    for path in runs:
        path = Path(path)
        with open_run(path) as run:
            param, optimizer, lr, width = _coordinates(run.meta)
            steps = run.steps
            final = run.loss(steps[-1]) if steps else float("nan")
        if width is None or lr is None:
            problems.append(f"{path.name}: no width or lr in its meta (record them in meta['user']): left out")
            continue
        summary = RunSummary(str(path), param, optimizer, float(lr), float(width), float(final))
        results = spectra_path(path)
        if results.exists():
            with SpectraFile(results) as sf:
                for row in sf.rows():
                    if row["quantity"] in ("density", "layers") or not len(row["values"]):
                        continue
                    steps_, values = summary.trajectories.setdefault(row["quantity"], ([], []))
                    steps_.append(row["step"])
                    values.append(float(row["values"][0]))
                    if "threshold" in row["info"]:
                        summary.thresholds[row["quantity"]] = float(row["info"]["threshold"])
        else:
            problems.append(f"{path.name}: no spectra measured yet (run sharpscope spectrum)")
        summaries.append(summary)
    return summaries, problems


def analyze(summaries: Sequence[RunSummary]) -> dict[str, Any]:
    """Verdicts and their evidence, as a JSON-able dict."""
    groups: dict[tuple, list[RunSummary]] = defaultdict(list)
    for s in summaries:
        groups[(s.parameterization, s.optimizer, s.lr)].append(s)
    out: dict[str, Any] = {"groups": [], "transfer": [], "problems": []}
    for (param, optimizer, lr), members in sorted(groups.items()):
        entry: dict[str, Any] = {"parameterization": param, "optimizer": optimizer, "lr": lr,
                                 "widths": sorted(m.width for m in members), "quantities": {}}
        quantities = sorted({q for m in members for q in m.trajectories})
        for q in quantities:
            traj = {m.width: m.trajectories[q] for m in members if q in m.trajectories}
            if len(traj) < 2:
                entry["quantities"][q] = {"verdict": "undetermined", "reason": f"only {len(traj)} width(s) measured"}
                continue
            try:
                res = consistency.super_consistency(traj, spread="std")  # robust to EoS oscillations
                entry["quantities"][q] = res.evidence
            except ValueError as err:
                entry["quantities"][q] = {"verdict": "undetermined", "reason": str(err)}
            thresholds = {m.width: m.thresholds[q] for m in members if q in m.thresholds}
            if thresholds:
                eos = {}
                for w, threshold in thresholds.items():
                    steps, values = traj[w]
                    r = consistency.edge_of_stability(steps, values, threshold)
                    eos[str(w)] = {"threshold": threshold, "tail_ratio": r.tail_mean,
                                   "first_step_at_0.9": r.first_step}
                entry["quantities"][q]["edge_of_stability"] = eos
        if not quantities:
            out["problems"].append(f"{param}/{optimizer}/lr {lr:g}: no spectra to compare")
        out["groups"].append(entry)
    by_family: dict[tuple, dict[float, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for s in summaries:
        by_family[(s.parameterization, s.optimizer)][s.width][s.lr] = s.final_loss
    for (param, optimizer), losses in sorted(by_family.items()):
        n_lrs = max(len(curve) for curve in losses.values())
        if len(losses) < 2 or n_lrs < 3:
            out["transfer"].append({"parameterization": param, "optimizer": optimizer, "verdict": "undetermined",
                                    "reason": f"needs >= 2 widths and >= 3 lrs, has {len(losses)} width(s) and "
                                              f"{n_lrs} lr(s)"})
            continue
        try:
            res = consistency.lr_transfer({w: dict(c) for w, c in losses.items()})
            out["transfer"].append({"parameterization": param, "optimizer": optimizer, **res.evidence})
        except ValueError as err:
            out["transfer"].append({"parameterization": param, "optimizer": optimizer, "verdict": "undetermined",
                                    "reason": str(err)})
    return out


def _figures(summaries: Sequence[RunSummary], out: Path) -> list[tuple[str, Path]]:
    import matplotlib.pyplot as plt

    figures = []
    groups: dict[tuple, list[RunSummary]] = defaultdict(list)
    for s in summaries:
        groups[(s.parameterization, s.optimizer, s.lr)].append(s)
    for (param, optimizer, lr), members in sorted(groups.items()):
        for q in sorted({q for m in members for q in m.trajectories}):
            traj = {m.width: m.trajectories[q] for m in members if q in m.trajectories}
            thresholds = [m.thresholds[q] for m in members if q in m.thresholds]
            name = f"{q}-{param}-{optimizer}-lr{lr:g}"
            path = out / "figures" / f"{name}.png"
            fig = plots.trajectories(traj, quantity=q, threshold=thresholds[0] if thresholds else None,
                                     title=f"{q}: {param} / {optimizer}, lr {lr:g}", path=path)
            fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
            plt.close(fig)
            figures.append((f"{q}, {param} / {optimizer}, lr {lr:g}", path))
    return figures


def write_report(runs: Sequence[str | Path], out_dir: str | Path, title: str = "sharpscope report",
                 settings: dict | None = None) -> Path:
    """Write metrics.json, report.md, report.html and figures/ under ``out_dir``; returns report.html."""
    if not runs:
        raise ValueError("no run files given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries, problems = collect(runs)
    metrics = analyze(summaries)
    metrics["problems"] = problems + metrics["problems"]
    metrics["runs"] = [{"path": s.path, "parameterization": s.parameterization, "optimizer": s.optimizer,
                        "lr": s.lr, "width": s.width, "final_loss": s.final_loss if math.isfinite(s.final_loss) else None}
                       for s in summaries]
    metrics["settings"] = settings or {}
    import torch

    metrics["versions"] = {"sharpscope": __version__, "torch": torch.__version__, "numpy": np.__version__}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    figures = _figures(summaries, out)
    (out / "report.md").write_text(_markdown(title, metrics, figures, out))
    page = out / "report.html"
    page.write_text(_html(title, metrics, figures))
    return page


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _verdict_rows(metrics: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for g in metrics["groups"]:
        for q, ev in g["quantities"].items():
            rows.append((f"{g['parameterization']} / {g['optimizer']} / lr {g['lr']:g}", q, ev.get("verdict", "?"),
                         ev.get("reason", "")))
    for t in metrics["transfer"]:
        rows.append((f"{t['parameterization']} / {t['optimizer']}", "lr transfer", t.get("verdict", "?"),
                     t.get("reason", "")))
    return rows


def _markdown(title: str, metrics: dict, figures, out: Path) -> str:
    lines = [f"# {title}", "", "| runs | quantity | verdict | evidence |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | **{c}** | {d} |" for a, b, c, d in _verdict_rows(metrics)]
    if metrics["problems"]:
        lines += ["", "Problems:", ""] + [f"- {p}" for p in metrics["problems"]]
    lines += [""] + [f"![{cap}]({path.relative_to(out)})" for cap, path in figures]
    lines += ["", f"Software: {json.dumps(metrics['versions'])}", ""]
    return "\n".join(lines)


def _html(title: str, metrics: dict, figures) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td class='v'>{esc(c)}</td><td>{esc(d)}</td></tr>"
                   for a, b, c, d in _verdict_rows(metrics))
    problems = "".join(f"<li>{esc(p)}</li>" for p in metrics["problems"])
    images = "".join(
        f"<figure><img alt='{esc(cap)}' src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'>"
        f"<figcaption>{esc(cap)}</figcaption></figure>" for cap, path in figures)
    runs = "".join(f"<tr><td>{esc(Path(r['path']).name)}</td><td>{r['width']:g}</td><td>{r['lr']:g}</td>"
                   f"<td>{'diverged' if r['final_loss'] is None else format(r['final_loss'], '.4g')}</td></tr>"
                   for r in metrics["runs"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}
td.v{{font-weight:bold}}figure{{display:inline-block;margin:8px}}img{{max-width:520px}}
</style></head><body><h1>{esc(title)}</h1>
<h2>Verdicts</h2><table><tr><th>runs</th><th>quantity</th><th>verdict</th><th>evidence</th></tr>{rows}</table>
{'<h2>Problems</h2><ul>' + problems + '</ul>' if problems else ''}
<h2>Figures</h2>{images or '<p>No spectra to plot.</p>'}
<h2>Runs</h2><table><tr><th>run</th><th>width</th><th>lr</th><th>final loss</th></tr>{runs}</table>
<h2>Settings and software</h2><pre>{esc(json.dumps({'settings': metrics['settings'], 'versions': metrics['versions']}, indent=2))}</pre>
</body></html>"""


def verdict_lines(metrics_json: str | Path) -> list[str]:
    """One line per verdict (and per problem) of a written ``metrics.json``."""
    metrics = json.loads(Path(metrics_json).read_text())
    lines = [f"{a:<26} {b:<12} {c:<15} {d}" for a, b, c, d in _verdict_rows(metrics)]
    return lines + [f"note: {p}" for p in metrics["problems"]]


def _report_command(args) -> int:
    page = write_report(args.runs, args.out, title=args.title)
    for line in verdict_lines(Path(args.out) / "metrics.json"):
        print(line)
    print(f"report: {page}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="verdicts, figures and report.html over run files",
                              description="Analyse runs (grouped by parameterization, optimizer and lr; "
                                          "compared across widths) and write metrics.json, report.md, "
                                          "report.html and figures/ to --out.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN.h5")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--title", default="sharpscope report")
    p.set_defaults(func=_report_command)
