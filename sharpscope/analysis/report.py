"""The report over a set of runs: metrics.json, report.md, a self-contained report.html and figures/.

The analysis (grouping, verdicts, problems) is :mod:`sharpscope.analysis.comparisons`; this module draws the
figures with :mod:`sharpscope.analysis.plots` -- trajectories per size with the edge-of-stability line,
parameterizations side by side, spread per step, EoS-normalised sharpness against lr x step, loss
against lr, spectral densities, per-layer heatmaps -- and writes the files. The HTML embeds the
figures (base64 PNG) and opens without a server. Every problem (one width only, no results, all
runs diverged, mismatched probes) becomes a line in the report, never a crash or an empty figure.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._version import __version__
from ..runs.quantities import REGISTRY
from . import plots
from .comparisons import Analysis, ComparedGroup, Comparison, TransferFamily, analyze_in_detail, collect, group_label, plural

__all__ = ["write_report", "verdict_lines"]

LABELS = {name: q.label for name, q in REGISTRY.items()}


class _Figures:
    """The report's figures, saved as PNG and PDF under ``out/figures``, with their captions in order."""

    def __init__(self, out: Path) -> None:
        self.out, self.saved = out, []

    def keep(self, fig, name: str, caption: str) -> None:
        import matplotlib.pyplot as plt

        path = self.out / "figures" / f"{name}.png"
        plots.save(fig, path)
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        plt.close(fig)
        self.saved.append((caption, path))

    def group(self, group: ComparedGroup) -> None:
        """Per comparison: each quantity's trajectories and spread, the densities, the per-layer heatmap."""
        c = group.comparison
        tag = _tag(c.parameterization, c.optimizer, c.lr, c.axis, c.fixed)
        for q, found in group.quantities.items():
            traj, res = found.trajectories, found.result
            thresholds = [m.thresholds[q] for m in c.members if q in m.thresholds]
            self.keep(plots.trajectories(traj, quantity=LABELS.get(q, q), size_label=c.axis, title=f"{q}: {c.label}",
                                         threshold=thresholds[0] if thresholds else None, step_label=_x_label(c.axis)),
                      f"{q}-{tag}", f"{q} per {c.axis}, {c.label}")
            self.keep(plots.spread(res.steps, res.spread, quantity=f"relative spread across {plural(c.axis)} ({res.spread_kind})",
                                   threshold=res.thresholds.spread_max, title=f"{q} spread: {c.label}"),
                      f"{q}-spread-{tag}", f"{q}: spread across {plural(c.axis)}, {c.label} (verdict {res.verdict})")
        density = _density_curves(c)
        if density:
            step, curves = density
            self.keep(plots.density_overlay(curves, size_label=c.axis, title=f"Hessian density at step {step}: {c.label}"),
                      f"density-{tag}", f"Hessian spectral density per {c.axis} at step {step}, {c.label}")
        _alignment_figure(group.entry.get("alignment"), c, tag, self.keep)
        widest = max((m for m in c.members if m.layers), key=lambda m: m.value(c.axis), default=None)
        if widest is not None:
            layers, size = widest.layers, widest.value(c.axis)
            self.keep(plots.layer_heatmap(layers.names, layers.steps, np.array(layers.values).T,
                                          title=f"per-layer sharpness, {c.axis} {size:g}: {c.label}"),
                      f"layers-{tag}", f"per-layer top Hessian eigenvalue, {c.axis} {size:g}, {c.label}")

    def side_by_side(self, groups: Sequence[ComparedGroup]) -> None:
        """Parameterizations side by side, one figure per (axis, optimizer, lr, other axes, quantity)."""
        panels: dict[tuple, list] = defaultdict(list)
        for group in groups:
            c = group.comparison
            for q, found in group.quantities.items():
                panels[(c.axis, c.optimizer, c.lr, tuple(c.fixed.items()), q)].append((c, found.trajectories))
        for (axis, optimizer, lr, fixed, q), row in sorted(panels.items(), key=lambda kv: str(kv[0])):
            if len(row) > 1:
                names = " vs ".join(c.parameterization for c, _ in row)
                tag = _tag("-vs-".join(c.parameterization for c, _ in row), optimizer, lr, axis, dict(fixed))
                self.keep(_side_by_side(row, q), f"{q}-{tag}",
                          f"{q} per {axis}: {group_label(names, optimizer, lr, dict(fixed))}")

    def across_lrs(self, groups: Sequence[ComparedGroup]) -> None:
        """The quantity over its EoS threshold against lr x step, one curve per lr."""
        rows: dict[tuple, list] = defaultdict(list)
        for group in groups:
            c = group.comparison
            for q, found in group.quantities.items():
                rows[(c.axis, c.parameterization, c.optimizer, tuple(c.fixed.items()), q)].append((c, found.trajectories))
        for (axis, param, optimizer, fixed, q), row in sorted(rows.items(), key=lambda kv: str(kv[0])):
            rescaled = _eos_normalized(row, q) if axis != "steps" else None
            if rescaled is None:
                continue
            size, curves = rescaled
            label = f"{group_label(param, optimizer, None, dict(fixed))}, {axis} {size:g}"
            self.keep(plots.trajectories(curves, quantity=f"{q} / its EoS threshold", threshold=1.0, size_label="lr",
                                         rescale_steps={lr: lr for lr in curves}, step_label="lr x step",
                                         title=f"{q} across lrs: {label}"),
                      f"{q}-lrs-{_tag(param, optimizer, None, axis, dict(fixed))}-{axis}{size:g}",
                      f"{q} / EoS threshold against lr x step, one curve per lr, {label}")

    def transfer(self, family: TransferFamily) -> None:
        """Final loss against lr per compared value, with the optima."""
        entry, curves, res = family.entry, family.curves, family.result
        if max((sum(map(math.isfinite, curve.values())) for curve in curves.values()), default=0) < 2:
            return  # no curve to draw (one lr, or all diverged): the verdict table says why
        optima = {o.size: o.lr_opt for o in res.optima if o.lr_opt is not None} if res is not None else None
        label = group_label(entry["parameterization"], entry["optimizer"], None, entry["fixed"])
        self.keep(plots.lr_sweep(curves, optima=optima, size_label=entry["axis"], title=f"final loss vs lr: {label}"),
                  f"lr-{_tag(entry['parameterization'], entry['optimizer'], None, entry['axis'], entry['fixed'])}",
                  f"final training loss vs lr per {entry['axis']}, {label}")


def _figures(analysis: Analysis, out: Path) -> list[tuple[str, Path]]:
    figures = _Figures(out)
    for group in analysis.groups:
        figures.group(group)
    figures.side_by_side(analysis.groups)
    figures.across_lrs(analysis.groups)
    for family in analysis.transfers:
        figures.transfer(family)
    return figures.saved


def _alignment_figure(found: dict | None, c: Comparison, tag: str, keep) -> None:
    """The fitted alignment exponent per layer against the step (layers whose fan-in grows)."""
    if not found:
        return
    from .alignment import FULL_AT_LEAST, NONE_AT_MOST

    curves = {layer: {int(s): e for s, e in a["exponent_by_step"].items() if e is not None}
              for layer, a in found["layers"].items()}
    curves = {layer: by_step for layer, by_step in curves.items() if by_step}
    if curves:
        keep(plots.alignment_exponents(curves, full_at_least=FULL_AT_LEAST, none_at_most=NONE_AT_MOST,
                                       title=f"alignment exponent across {plural(c.axis)}: {c.label}"),
             f"alignment-{tag}", f"fitted alignment exponent per layer against the step, across {plural(c.axis)}, {c.label}")


def _tag(parameterization: str, optimizer: str, lr: float | None, axis: str, fixed: dict) -> str:
    """A file-name tag of a group: its coordinates, the compared axis and the other axes' values."""
    parts = [parameterization, optimizer] + ([f"lr{lr:g}"] if lr is not None else []) + [f"{plural(axis)}"]
    parts += [f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}" for name, value in fixed.items()]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))


def _x_label(axis: str) -> str:
    return "fraction of training (step / steps)" if axis == "steps" else "step"


def _eos_normalized(row: list, q: str):
    """For the largest size measured at >= 2 lrs: per lr, the quantity over its EoS threshold
    (2/lr for SGD, 38/lr for Adam...), to be drawn against lr x step: at the edge of stability every
    lr sits at 1, and progressive sharpening at different lrs lines up in "time" lr x step."""
    per_size: dict[float, dict[float, tuple]] = defaultdict(dict)
    for c, traj in row:
        thresholds = {m.value(c.axis): m.thresholds[q] for m in c.members if q in m.thresholds}
        for size, (steps, values) in traj.items():
            if size in thresholds and thresholds[size] > 0:
                per_size[size][c.lr] = (steps, [v / thresholds[size] for v in values])
    sizes = [size for size, curves in per_size.items() if len(curves) >= 2]
    return (max(sizes), per_size[max(sizes)]) if sizes else None


def _side_by_side(row: list, q: str):
    """One panel per parameterization, shared y axis: the trajectories across sizes side by side."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(row), figsize=(4.6 * len(row), 3.8), sharey=True, squeeze=False)
    for ax, (c, traj) in zip(axes[0], row):
        thresholds = [m.thresholds[q] for m in c.members if q in m.thresholds]
        plots.trajectories(traj, quantity=LABELS.get(q, q), threshold=thresholds[0] if thresholds else None,
                           size_label=c.axis, ax=ax, title=c.parameterization, step_label=_x_label(c.axis))
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def _density_curves(c: Comparison):
    """SLQ densities of each size at the last step all sizes measured (first seed), on one grid."""
    from ..estimators import SpectralDensity

    firsts = {size: runs[0] for size, runs in c.by_size().items() if runs[0].densities}
    if len(firsts) < 1:
        return None
    common = set.intersection(*(set(m.densities) for m in firsts.values()))
    if not common:
        return None
    step = max(common)
    dens = {}
    for size, m in firsts.items():
        nodes, weights, per_probe = m.densities[step]
        cuts = np.cumsum(per_probe or [len(nodes)])[:-1]
        dens[size] = SpectralDensity(np.split(np.asarray(nodes), cuts), np.split(np.asarray(weights), cuts), 0, 0)
    lo = min(float(np.concatenate(d.nodes).min()) for d in dens.values())
    hi = max(float(np.concatenate(d.nodes).max()) for d in dens.values())
    sigma = max(d.default_sigma() for d in dens.values())
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 800)
    return step, {size: (grid, d.pdf(grid, sigma)) for size, d in dens.items()}


def write_report(runs: Sequence[str | Path], out_dir: str | Path, title: str = "sharpscope report",
                 settings: dict | None = None, *, compare: str | None = None, spectrum: Any = None) -> Path:
    """Write metrics.json, report.md, report.html and figures/ under ``out_dir``; returns report.html.

    ``compare``: the axis the verdicts compare (default: the runs' sweep's, else width and depth where
    they vary); ``spectrum``: a :class:`~sharpscope.runs.jobs.SpectrumSettings` whose results to use
    when a run holds results under several settings (default: the settings most results used)."""
    if not runs:
        raise ValueError("no run files given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries, problems = collect(runs, compare=compare, spectrum=spectrum)
    analysis = analyze_in_detail(summaries, compare)
    metrics = analysis.metrics
    metrics["problems"] = problems + metrics["problems"]
    summaries = analysis.runs
    if not summaries:
        metrics["problems"].append("no usable run among the files given: nothing to analyse")
    metrics["runs"] = [{"path": s.path, "parameterization": s.parameterization, "optimizer": s.optimizer,
                        "lr": s.lr, "width": s.width, "depth": s.depth, "seed": s.seed, "axes": s.axes,
                        "results_settings": s.settings_used,
                        "final_loss": s.final_loss if math.isfinite(s.final_loss) else None,
                        "initial_loss": s.initial_loss if math.isfinite(s.initial_loss) else None,
                        "blew_up": s.blew_up}
                       for s in summaries]
    metrics["settings"] = settings or {}
    import torch

    metrics["versions"] = {"sharpscope": __version__, "torch": torch.__version__, "numpy": np.__version__}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    figures = _figures(analysis, out)
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


def _fixed(entry: dict) -> dict:
    """The other axes' values of a metrics entry (a number in metrics.json files of sharpscope 0.1)."""
    fixed = entry.get("fixed")
    if isinstance(fixed, dict):
        return fixed
    return {} if fixed is None else {"depth" if entry["axis"] == "width" else "width": fixed}


def _verdict_rows(metrics: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for g in metrics["groups"]:
        for q, ev in g["quantities"].items():
            rows.append((group_label(g["parameterization"], g["optimizer"], g["lr"], _fixed(g)),
                         f"{q} across {plural(g['axis'])}", ev.get("verdict", "?"), ev.get("reason", "")))
    for t in metrics["transfer"]:
        rows.append((group_label(t["parameterization"], t["optimizer"], None, _fixed(t)),
                     f"lr transfer across {plural(t['axis'])}", t.get("verdict", "?"), t.get("reason", "")))
    for g in metrics["groups"]:
        found = g.get("alignment") or {}
        th = found.get("thresholds", {})
        for layer, a in found.get("layers", {}).items():
            evidence = a.get("reason") or (f"exponent {a['exponent']:.2f} of ||dW x||/(RMS dW RMS x) vs fan-in at step "
                                           f"{found['step']} (none 1/2, full 1; full >= {th.get('full')}, none <= "
                                           f"{th.get('none')})")
            rows.append((group_label(g["parameterization"], g["optimizer"], g["lr"], _fixed(g)),
                         f"alignment of {layer} across {plural(g['axis'])}", a.get("verdict", "?"), evidence))
    return rows


def _alignment_tables(metrics: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per comparison with alignment results: a caption, the column heads and one row per layer (fan-in
    and update alignment per size at the verdict's step, the fitted exponents and the regime)."""
    tables = []
    for g in metrics["groups"]:
        found = g.get("alignment")
        if not found or not found.get("layers"):
            continue
        sizes = list(next(iter(found["layers"].values()))["fan_in"])
        head = ["layer"] + [f"{g['axis']} {float(s):g}: fan-in / alignment (W)" for s in sizes] + \
            ["exponent dW", "exponent W", "regime"]
        rows = []
        for layer, a in found["layers"].items():
            cells = [f"{a['fan_in'][s]} / {_num(a['alignment'][s])} ({_num(a['param_alignment'][s])})" for s in sizes]
            rows.append([layer, *cells, _num(a["exponent"]), _num(a["param_exponent"]), a["verdict"]])
        caption = (f"{group_label(g['parameterization'], g['optimizer'], g['lr'], _fixed(g))}, step {found['step']}")
        tables.append((caption, head, rows))
    return tables


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


ALIGNMENT_NOTE = ("Alignment per layer (0 = none, 1 = full; not clipped: below 0 anti-aligned) of the update dW "
                  "since step 0, and in brackets of the weights W, with the layer's inputs on the stored batch; "
                  "the exponent is the slope of log(||dW x|| / (RMS dW RMS x)) against log(fan-in) across the "
                  "compared runs (1/2: no alignment, 1: full); regimes: full >= {full}, none <= {none}.")


def _markdown(title: str, metrics: dict, figures, out: Path) -> str:
    lines = [f"# {title}", "", "| runs | quantity | verdict | evidence |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | **{c}** | {d} |" for a, b, c, d in _verdict_rows(metrics)]
    tables = _alignment_tables(metrics)
    if tables:
        from .alignment import FULL_AT_LEAST, NONE_AT_MOST

        lines += ["", "## Alignment", "", ALIGNMENT_NOTE.format(full=FULL_AT_LEAST, none=NONE_AT_MOST)]
        for caption, head, rows in tables:
            lines += ["", f"{caption}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
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
    def figure(caption: str, path: Path) -> str:
        png = path.read_bytes()
        wide = int.from_bytes(png[16:20], "big") > 1200  # the PNG header's width: side-by-side panels
        return (f"<figure{' class=wide' if wide else ''}><img alt='{esc(caption)}' "
                f"src='data:image/png;base64,{base64.b64encode(png).decode()}'><figcaption>{esc(caption)}</figcaption></figure>")

    images = "".join(figure(cap, path) for cap, path in figures)
    alignment = ""
    tables = _alignment_tables(metrics)
    if tables:
        from .alignment import FULL_AT_LEAST, NONE_AT_MOST

        alignment = f"<h2>Alignment</h2><p>{esc(ALIGNMENT_NOTE.format(full=FULL_AT_LEAST, none=NONE_AT_MOST))}</p>"
        for caption, head, rows in tables:
            alignment += (f"<p>{esc(caption)}</p><table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>"
                          + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
                          + "</table>")
    runs = "".join(f"<tr><td>{esc(Path(r['path']).name)}</td><td>{_cell(r['width'])}</td>"
                   f"<td>{_cell(r['depth'])}</td><td>{r['lr']:g}</td>"
                   f"<td>{'diverged' if r['final_loss'] is None else format(r['final_loss'], '.4g')}</td></tr>"
                   for r in metrics["runs"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}
td.v{{font-weight:bold}}figure{{display:inline-block;vertical-align:top;width:520px;margin:8px}}figure.wide{{width:100%}}img{{max-width:100%}}
figcaption{{font-size:13px;color:#444}}
</style></head><body><h1>{esc(title)}</h1>
<h2>Verdicts</h2><table><tr><th>runs</th><th>quantity</th><th>verdict</th><th>evidence</th></tr>{rows}</table>
{alignment}
{'<h2>Problems</h2><ul>' + problems + '</ul>' if problems else ''}
<h2>Figures</h2>{images or '<p>No spectra to plot.</p>'}
<h2>Runs</h2><table><tr><th>run</th><th>width</th><th>depth</th><th>lr</th><th>final loss</th></tr>{runs}</table>
<h2>Settings and software</h2><pre>{esc(json.dumps({'settings': metrics['settings'], 'versions': metrics['versions']}, indent=2))}</pre>
</body></html>"""


def _cell(value: Any) -> str:
    return "" if value is None else format(value, "g") if isinstance(value, (int, float)) else html.escape(str(value))


def verdict_lines(metrics_json: str | Path) -> list[str]:
    """One line per verdict (and per problem) of a written ``metrics.json``."""
    metrics = json.loads(Path(metrics_json).read_text())
    rows = _verdict_rows(metrics)
    wa, wb = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
    lines = [f"{a:<{wa}}  {b:<{wb}}  {c:<13} {d}" for a, b, c, d in rows]
    return lines + [f"note: {p}" for p in metrics["problems"]]


def _report_command(args) -> int:
    page = write_report(args.runs, args.out, title=args.title, compare=args.compare)
    for line in verdict_lines(Path(args.out) / "metrics.json"):
        print(line)
    print(f"report: {page}")
    if not json.loads((Path(args.out) / "metrics.json").read_text())["runs"]:
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
