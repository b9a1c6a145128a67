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
import hashlib
import html
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import consistency, plots
from ._version import __version__
from .jobs import SpectraFile, spectra_path
from .store import open_run

__all__ = ["RunSummary", "Comparison", "collect", "analyze", "write_report", "verdict_lines"]


AXES = ("width", "depth")


@dataclass
class RunSummary:
    """What the report needs from one run: its coordinates, final loss and measured results
    (trajectories of the scalar quantities, SLQ densities per step, per-layer sharpness)."""

    path: str
    parameterization: str
    optimizer: str
    lr: float
    width: float
    final_loss: float
    depth: float | None = None
    seed: int | None = None
    probe_name: str | None = None
    probe_digest: str | None = None
    trajectories: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    densities: dict[int, Any] = field(default_factory=dict)
    layers: tuple[list[str], list[int], list[list[float]]] | None = None
    loss_source: str = "checkpoint"

    def size(self, axis: str) -> float | None:
        return self.width if axis == "width" else self.depth


def _coordinates(meta: dict) -> dict[str, Any]:
    user = meta.get("user") or {}
    probe = user.get("probe") or {}
    record = meta.get("parameterization") or {}
    kwargs = meta.get("model_kwargs") or {}
    opt_meta = meta.get("optimizer") or {}

    def first(*values):
        return next((v for v in values if v is not None), None)

    return {
        "parameterization": str(first(probe.get("parameterization"), (record.get("parameterization") or {}).get("name"),
                                      user.get("parameterization"), "unknown")),
        "optimizer": str(first(probe.get("optimizer"), user.get("optimizer"),
                               opt_meta.get("class", "unknown").rsplit(".", 1)[-1].lower())),
        "lr": first(probe.get("lr"), user.get("lr"), (opt_meta.get("defaults") or {}).get("lr")),
        "width": first(probe.get("width"), user.get("width"), kwargs.get("width")),
        "depth": first(probe.get("depth"), user.get("depth"), kwargs.get("depth")),
        "seed": first(meta.get("seed"), user.get("seed")),
        "probe_name": probe.get("name"),
    }


def _final_loss(run) -> tuple[float, str]:
    """The run's final training loss and where it comes from: the last checkpoint's loss
    ("checkpoint"; NaN/inf there = diverged), else the last value of the ``loss`` scalar log
    ("logged", e.g. a framework's logged loss), else NaN ("unknown": the loop passed no loss)."""
    losses = [run.loss(s) for s in run.steps if s > 0]
    if any(map(math.isfinite, losses)):
        return float(losses[-1]), "checkpoint"
    try:
        _, logged = run.scalars("loss")
    except KeyError:
        logged = []
    if len(logged):
        return float(logged[-1]), "logged"
    return float("nan"), "unknown"


def _digest(probe) -> str | None:
    """A fingerprint of the stored probe batch: runs compared must be measured on the same data."""
    if probe is None:
        return None
    h = hashlib.sha1()
    inputs, targets = probe
    for t in (*inputs, *(() if targets is None else (targets,))):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _read_spectra(summary: RunSummary, results: Path) -> None:
    with SpectraFile(results) as sf:
        layer_steps, layer_values, layer_names = [], [], None
        for row in sf.rows():
            q, info = row["quantity"], row["info"]
            if not len(row["values"]):
                continue
            if q == "density":
                summary.densities[row["step"]] = (row["values"], row["residuals"], info.get("nodes_per_probe"))
            elif q == "layers":
                layer_names = info.get("layers")
                layer_steps.append(row["step"])
                layer_values.append(list(row["values"]))
            else:
                steps_, values = summary.trajectories.setdefault(q, ([], []))
                steps_.append(row["step"])
                values.append(float(row["values"][0]))
                if "threshold" in info:
                    summary.thresholds[q] = float(info["threshold"])
        if layer_names and all(len(v) == len(layer_names) for v in layer_values):
            summary.layers = (layer_names, layer_steps, layer_values)


def collect(runs: Sequence[str | Path]) -> tuple[list[RunSummary], list[str]]:
    """Read each run's coordinates, last loss and stored spectra; problems (unreadable files, missing
    coordinates, nothing measured) come back as messages, and such a run is left out or kept without results."""
    summaries, problems = [], []
    for path in runs:
        path = Path(path)
        try:
            with open_run(path) as run:
                c = _coordinates(run.meta)
                steps = run.steps
                final, loss_source = _final_loss(run)
                digest = _digest(run.probe())
        except (OSError, ValueError, KeyError) as err:
            problems.append(f"{path.name}: not a readable sharpscope run ({err}): left out")
            continue
        if not steps:
            problems.append(f"{path.name}: holds no complete checkpoint: left out")
            continue
        if c["width"] is None or c["lr"] is None:
            problems.append(f"{path.name}: no width or lr in its meta (record them in meta['user']): left out")
            continue
        summary = RunSummary(str(path), c["parameterization"], c["optimizer"], float(c["lr"]), float(c["width"]),
                             float(final), depth=None if c["depth"] is None else float(c["depth"]),
                             seed=c["seed"], probe_name=c["probe_name"], probe_digest=digest,
                             loss_source=loss_source)
        if loss_source == "unknown":
            problems.append(f"{path.name}: records no training loss (pass loss= to Recorder.step or use "
                            f"Recorder.log_loss): left out of the lr transfer")
        results = spectra_path(path)
        if results.exists():
            try:
                _read_spectra(summary, results)
            except (OSError, ValueError, KeyError) as err:
                problems.append(f"{results.name}: unreadable results ({err}): the run counts for lr transfer only")
        else:
            problems.append(f"{path.name}: no spectra measured yet (run sharpscope spectrum)")
        summaries.append(summary)
    return summaries, problems


@dataclass
class Comparison:
    """Runs that differ only in their size along ``axis`` (and seed): same parameterization,
    optimizer, lr and the other axis' value ``fixed``."""

    axis: str
    parameterization: str
    optimizer: str
    lr: float
    fixed: float | None
    members: list[RunSummary]

    @property
    def label(self) -> str:
        other = "depth" if self.axis == "width" else "width"
        fixed = f" / {other} {self.fixed:g}" if self.fixed is not None else ""
        return f"{self.parameterization} / {self.optimizer} / lr {self.lr:g}{fixed}"

    @property
    def sizes(self) -> list[float]:
        return sorted({m.size(self.axis) for m in self.members})

    def by_size(self) -> dict[float, list[RunSummary]]:
        out: dict[float, list[RunSummary]] = defaultdict(list)
        for m in self.members:
            out[m.size(self.axis)].append(m)
        return dict(sorted(out.items()))


def _axes_of(summaries: Sequence[RunSummary]) -> list[str]:
    """The axes along which the runs vary (width, depth); width when they vary along neither."""
    varying = [a for a in AXES if len({s.size(a) for s in summaries if s.size(a) is not None}) >= 2]
    return varying or ["width"]


def _comparisons(summaries: Sequence[RunSummary]) -> list[Comparison]:
    out = []
    for axis in _axes_of(summaries):
        other = "depth" if axis == "width" else "width"
        groups: dict[tuple, list[RunSummary]] = defaultdict(list)
        for s in summaries:
            if s.size(axis) is not None:
                groups[(s.parameterization, s.optimizer, s.lr, s.size(other))].append(s)
        for (param, opt, lr, fixed), members in sorted(groups.items(), key=lambda kv: tuple(
                (x is None, x) for x in kv[0])):
            out.append(Comparison(axis, param, opt, lr, fixed, members))
    return out


def _mean_trajectory(trajs: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The mean over seeds on the steps every seed measured."""
    if len(trajs) == 1:
        return trajs[0]
    common = sorted(set.intersection(*(set(s) for s, _ in trajs)))
    tables = [dict(zip(s, v)) for s, v in trajs]
    return common, [float(np.mean([t[step] for t in tables])) for step in common]


def _mismatch(c: Comparison) -> str | None:
    """Why the runs of a comparison cannot be compared, or None."""
    names = sorted({m.probe_name for m in c.members if m.probe_name})
    if len(names) > 1:
        return f"runs come from different probes ({', '.join(names)})"
    digests = {m.probe_digest for m in c.members if m.probe_digest}
    if len(digests) > 1:
        return (f"runs were measured on {len(digests)} different probe batches: their curvatures are not "
                f"comparable (capture every run with the same probe=(x, y))")
    return None


def _trajectories(c: Comparison, q: str) -> dict[float, tuple[list[int], list[float]]]:
    return {size: _mean_trajectory([m.trajectories[q] for m in runs if q in m.trajectories])
            for size, runs in c.by_size().items() if any(q in m.trajectories for m in runs)}


def _compare(c: Comparison, problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON entry of one comparison and the objects its figures need."""
    names = f"{c.axis}s"
    seeds = {_key(size): len(runs) for size, runs in c.by_size().items()}
    entry: dict[str, Any] = {"axis": c.axis, "parameterization": c.parameterization, "optimizer": c.optimizer,
                             "lr": c.lr, "fixed": c.fixed, "sizes": c.sizes, "seeds": seeds, "quantities": {}}
    artifacts: dict[str, Any] = {}
    mismatch = _mismatch(c)
    if mismatch:
        problems.append(f"{c.label}: {mismatch}; not compared")
    quantities = sorted({q for m in c.members for q in m.trajectories})
    for q in quantities:
        traj = _trajectories(c, q)
        missing = [s for s in c.sizes if s not in traj]
        if missing and len(traj) >= 1:
            problems.append(f"{c.label}: {q} measured for {names} {_fmt(traj)} but not for {_fmt(missing)}")
        if mismatch:
            entry["quantities"][q] = {"verdict": "undetermined", "reason": mismatch}
            continue
        if len(traj) < 2:
            entry["quantities"][q] = {"verdict": "undetermined", "reason": f"only {len(traj)} {c.axis}(s) measured"}
            continue
        try:
            res = consistency.super_consistency(traj)
        except ValueError as err:
            entry["quantities"][q] = {"verdict": "undetermined", "reason": str(err)}
            continue
        entry["quantities"][q] = res.evidence
        artifacts[q] = (traj, res)
        thresholds = {m.size(c.axis): m.thresholds[q] for m in c.members if q in m.thresholds}
        if thresholds:
            eos = {}
            for size, threshold in sorted(thresholds.items()):
                r = consistency.edge_of_stability(*traj[size], threshold)
                eos[_key(size)] = {"threshold": threshold, "tail_ratio": r.tail_mean, "first_step_at_0.9": r.first_step}
            entry["quantities"][q]["edge_of_stability"] = eos
    if not quantities and not mismatch:
        problems.append(f"{c.label}: no spectra to compare")
    return entry, artifacts


LABELS = {"hessian": "sharpness: top eigenvalue of H", "precond": "preconditioned sharpness: top eig. of P^-1 H",
          "ggn": "top eigenvalue of the Gauss-Newton G", "ntk": "top eigenvalue of the NTK J J^T",
          "trace": "trace of H (Hutch++)"}


def _key(size: float) -> str:
    return str(float(size))


def _fmt(sizes) -> str:
    return ", ".join(f"{s:g}" for s in sorted(sizes))


def _lr_curves(c_members: Sequence[RunSummary], axis: str) -> dict[float, dict[float, float]]:
    """size -> lr -> final loss, the mean over seeds (a diverged seed makes the point diverged)."""
    points: dict[float, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in c_members:
        if s.loss_source != "unknown":
            points[s.size(axis)][s.lr].append(s.final_loss)
    return {size: {lr: float(np.mean(v)) if all(math.isfinite(x) for x in v) else float("nan")
                   for lr, v in curve.items()} for size, curve in sorted(points.items())}


def _transfers(summaries: Sequence[RunSummary], problems: list[str]) -> list[tuple[dict[str, Any], Any]]:
    out = []
    for axis in _axes_of(summaries):
        other = "depth" if axis == "width" else "width"
        families: dict[tuple, list[RunSummary]] = defaultdict(list)
        for s in summaries:
            if s.size(axis) is not None:
                families[(s.parameterization, s.optimizer, s.size(other))].append(s)
        for (param, opt, fixed), members in sorted(families.items(), key=lambda kv: tuple(
                (x is None, x) for x in kv[0])):
            curves = _lr_curves(members, axis)
            head = {"axis": axis, "parameterization": param, "optimizer": opt, "fixed": fixed}
            label = f"{param} / {opt}" + (f" / {other} {fixed:g}" if fixed is not None else "")
            n_lrs = max((len(curve) for curve in curves.values()), default=0)
            dead = [size for size, curve in curves.items() if not any(math.isfinite(v) for v in curve.values())]
            if dead:
                problems.append(f"{label}: every lr diverged for {axis}s {_fmt(dead)}: lower the lr grid")
            if len(curves) < 2 or n_lrs < 3:
                out.append(({**head, "verdict": "undetermined",
                             "reason": f"needs >= 2 {axis}s and >= 3 lrs, has {len(curves)} {axis}(s) and "
                                       f"{n_lrs} lr(s)"}, (curves, None)))
                continue
            try:
                res = consistency.lr_transfer(curves)
                out.append(({**head, **res.evidence}, (curves, res)))
            except ValueError as err:
                out.append(({**head, "verdict": "undetermined", "reason": str(err)}, (curves, None)))
    return out


def _analysis(summaries: Sequence[RunSummary]) -> tuple[dict[str, Any], list, list]:
    problems: list[str] = []
    comparisons = _comparisons(summaries)
    for axis in AXES:
        sizes = {s.size(axis) for s in summaries if s.size(axis) is not None}
        if axis == _axes_of(summaries)[0] and len(sizes) == 1 and summaries:
            problems.append(f"all runs have the same {axis} ({_fmt(sizes)}): super consistency and lr transfer "
                            f"need >= 2 {axis}s (better >= 3, for the convergence exponent)")
    compared = [(c, *_compare(c, problems)) for c in comparisons]
    transfers = _transfers(summaries, problems)
    metrics = {"groups": [entry for _, entry, _ in compared], "transfer": [entry for entry, _ in transfers],
               "problems": problems}
    return metrics, compared, transfers


def analyze(summaries: Sequence[RunSummary]) -> dict[str, Any]:
    """Verdicts and their evidence, as a JSON-able dict: ``groups`` (super consistency of every
    quantity across widths, or depths, per parameterization/optimizer/lr), ``transfer`` (lr transfer
    per parameterization/optimizer) and ``problems`` (what could not be compared, and why)."""
    return _analysis(summaries)[0]


def _figures(summaries: Sequence[RunSummary], compared, transfers, out: Path) -> list[tuple[str, Path]]:
    import matplotlib.pyplot as plt

    figures: list[tuple[str, Path]] = []

    def keep(fig, name: str, caption: str) -> None:
        path = out / "figures" / f"{name}.png"
        plots.save(fig, path)
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        plt.close(fig)
        figures.append((caption, path))

    for c, _, artifacts in compared:
        tag = f"{c.parameterization}-{c.optimizer}-lr{c.lr:g}" + (f"-{c.axis}s-at{c.fixed:g}" if c.fixed is not None else "")
        for q, (traj, res) in artifacts.items():
            thresholds = [m.thresholds[q] for m in c.members if q in m.thresholds]
            keep(plots.trajectories(traj, quantity=LABELS.get(q, q), threshold=thresholds[0] if thresholds else None,
                                    size_label=c.axis, title=f"{q}: {c.label}"),
                 f"{q}-{tag}", f"{q} per {c.axis}, {c.label}")
            keep(plots.spread(res.steps, res.spread, quantity=f"relative spread across {c.axis}s ({res.spread_kind})",
                              threshold=res.thresholds.spread_max, title=f"{q} spread: {c.label}"),
                 f"{q}-spread-{tag}", f"{q}: spread across {c.axis}s, {c.label} (verdict {res.verdict})")
        density = _density_curves(c)
        if density:
            step, curves = density
            keep(plots.density_overlay(curves, size_label=c.axis, title=f"Hessian density at step {step}: {c.label}"),
                 f"density-{tag}", f"Hessian spectral density per {c.axis} at step {step}, {c.label}")
        widest = max((m for m in c.members if m.layers), key=lambda m: m.size(c.axis), default=None)
        if widest is not None:
            names, steps, values = widest.layers
            keep(plots.layer_heatmap(names, steps, np.array(values).T,
                                     title=f"per-layer sharpness, {c.axis} {widest.size(c.axis):g}: {c.label}"),
                 f"layers-{tag}", f"per-layer top Hessian eigenvalue, {c.axis} {widest.size(c.axis):g}, {c.label}")
    panels: dict[tuple, list] = defaultdict(list)
    for c, _, artifacts in compared:
        for q, (traj, _) in artifacts.items():
            panels[(c.axis, c.optimizer, c.lr, c.fixed, q)].append((c, traj))
    for (axis, optimizer, lr, fixed, q), row in sorted(panels.items(), key=lambda kv: str(kv[0])):
        if len(row) > 1:
            fig = _side_by_side(row, q)
            names = " vs ".join(c.parameterization for c, _ in row)
            tag = f"{q}-{'-vs-'.join(c.parameterization for c, _ in row)}-{optimizer}-lr{lr:g}"
            keep(fig, tag + (f"-{axis}s-at{fixed:g}" if fixed is not None else ""),
                 f"{q} per {axis}: {names}, {optimizer}, lr {lr:g}")
    across_lrs: dict[tuple, list] = defaultdict(list)
    for c, _, artifacts in compared:
        for q, (traj, _) in artifacts.items():
            across_lrs[(c.axis, c.parameterization, c.optimizer, c.fixed, q)].append((c, traj))
    for (axis, param, optimizer, fixed, q), row in sorted(across_lrs.items(), key=lambda kv: str(kv[0])):
        rescaled = _eos_normalized(row, q)
        if rescaled is not None:
            size, curves = rescaled
            label = f"{param} / {optimizer}, {axis} {size:g}"
            keep(plots.trajectories(curves, quantity=f"{q} / its EoS threshold", threshold=1.0, size_label="lr",
                                    rescale_steps={lr: lr for lr in curves}, step_label="lr x step",
                                    title=f"{q} across lrs: {label}"),
                 f"{q}-lrs-{param}-{optimizer}-{axis}{size:g}" + (f"-at{fixed:g}" if fixed is not None else ""),
                 f"{q} / EoS threshold against lr x step, one curve per lr, {label}")
    for entry, (curves, res) in transfers:
        if max((sum(map(math.isfinite, curve.values())) for curve in curves.values()), default=0) < 2:
            continue  # no curve to draw (one lr, or all diverged): the verdict table says why
        optima = {o.size: o.lr_opt for o in res.optima if o.lr_opt is not None} if res is not None else None
        label = f"{entry['parameterization']} / {entry['optimizer']}"
        if entry["fixed"] is not None:
            label += f" / {'depth' if entry['axis'] == 'width' else 'width'} {entry['fixed']:g}"
        keep(plots.lr_sweep(curves, optima=optima, size_label=entry["axis"], title=f"final loss vs lr: {label}"),
             f"lr-{label.replace(' / ', '-').replace(' ', '')}", f"final training loss vs lr per {entry['axis']}, {label}")
    return figures


def _eos_normalized(row: list, q: str):
    """For the largest size measured at >= 2 lrs: per lr, the quantity over its EoS threshold
    (2/lr for SGD, 38/lr for Adam...), to be drawn against lr x step: at the edge of stability every
    lr sits at 1, and progressive sharpening at different lrs lines up in "time" lr x step."""
    per_size: dict[float, dict[float, tuple]] = defaultdict(dict)
    for c, traj in row:
        thresholds = {m.size(c.axis): m.thresholds[q] for m in c.members if q in m.thresholds}
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
                           size_label=c.axis, ax=ax, title=c.parameterization)
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def _density_curves(c: Comparison):
    """SLQ densities of each size at the last step all sizes measured (first seed), on one grid."""
    from .estimators import SpectralDensity

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
                 settings: dict | None = None) -> Path:
    """Write metrics.json, report.md, report.html and figures/ under ``out_dir``; returns report.html."""
    if not runs:
        raise ValueError("no run files given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries, problems = collect(runs)
    metrics, compared, transfers = _analysis(summaries)
    metrics["problems"] = problems + metrics["problems"]
    if not summaries:
        metrics["problems"].append("no usable run among the files given: nothing to analyse")
    metrics["runs"] = [{"path": s.path, "parameterization": s.parameterization, "optimizer": s.optimizer,
                        "lr": s.lr, "width": s.width, "depth": s.depth, "seed": s.seed,
                        "final_loss": s.final_loss if math.isfinite(s.final_loss) else None}
                       for s in summaries]
    metrics["settings"] = settings or {}
    import torch

    metrics["versions"] = {"sharpscope": __version__, "torch": torch.__version__, "numpy": np.__version__}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    figures = _figures(summaries, compared, transfers, out)
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
    def other(entry: dict) -> str:
        fixed = entry.get("fixed")
        return "" if fixed is None else f" / {'depth' if entry['axis'] == 'width' else 'width'} {fixed:g}"

    for g in metrics["groups"]:
        for q, ev in g["quantities"].items():
            rows.append((f"{g['parameterization']} / {g['optimizer']} / lr {g['lr']:g}{other(g)}",
                         f"{q} across {g['axis']}s", ev.get("verdict", "?"), ev.get("reason", "")))
    for t in metrics["transfer"]:
        rows.append((f"{t['parameterization']} / {t['optimizer']}{other(t)}", f"lr transfer across {t['axis']}s",
                     t.get("verdict", "?"), t.get("reason", "")))
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
    def figure(caption: str, path: Path) -> str:
        png = path.read_bytes()
        wide = int.from_bytes(png[16:20], "big") > 1200  # the PNG header's width: side-by-side panels
        return (f"<figure{' class=wide' if wide else ''}><img alt='{esc(caption)}' "
                f"src='data:image/png;base64,{base64.b64encode(png).decode()}'><figcaption>{esc(caption)}</figcaption></figure>")

    images = "".join(figure(cap, path) for cap, path in figures)
    runs = "".join(f"<tr><td>{esc(Path(r['path']).name)}</td><td>{r['width']:g}</td>"
                   f"<td>{'' if r['depth'] is None else format(r['depth'], 'g')}</td><td>{r['lr']:g}</td>"
                   f"<td>{'diverged' if r['final_loss'] is None else format(r['final_loss'], '.4g')}</td></tr>"
                   for r in metrics["runs"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}
td.v{{font-weight:bold}}figure{{display:inline-block;vertical-align:top;width:520px;margin:8px}}figure.wide{{width:100%}}img{{max-width:100%}}
figcaption{{font-size:13px;color:#444}}
</style></head><body><h1>{esc(title)}</h1>
<h2>Verdicts</h2><table><tr><th>runs</th><th>quantity</th><th>verdict</th><th>evidence</th></tr>{rows}</table>
{'<h2>Problems</h2><ul>' + problems + '</ul>' if problems else ''}
<h2>Figures</h2>{images or '<p>No spectra to plot.</p>'}
<h2>Runs</h2><table><tr><th>run</th><th>width</th><th>depth</th><th>lr</th><th>final loss</th></tr>{runs}</table>
<h2>Settings and software</h2><pre>{esc(json.dumps({'settings': metrics['settings'], 'versions': metrics['versions']}, indent=2))}</pre>
</body></html>"""


def verdict_lines(metrics_json: str | Path) -> list[str]:
    """One line per verdict (and per problem) of a written ``metrics.json``."""
    metrics = json.loads(Path(metrics_json).read_text())
    lines = [f"{a:<26} {b:<24} {c:<15} {d}" for a, b, c, d in _verdict_rows(metrics)]
    return lines + [f"note: {p}" for p in metrics["problems"]]


def _report_command(args) -> int:
    page = write_report(args.runs, args.out, title=args.title)
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
    p.set_defaults(func=_report_command)
