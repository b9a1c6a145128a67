"""The report's figures, drawn from an :class:`~sharpscope.analysis.comparisons.Analysis` with the primitives
of :mod:`sharpscope.analysis.plots`, saved as PNG and PDF under ``out/figures``.

Which figures, in the page's order:

* **comparison figures**: per quantity, the groups that differ in one setting (the parameterization if it
  varies, else the lr, the optimizer or another axis) side by side, at most :data:`MAX_PANELS` per figure:
  the trajectories per size on top (with the edge-of-stability threshold), the relative spread across
  sizes below (verdict window shaded, its median drawn, the threshold), the verdict in each panel's
  title. A group alone gets its trajectories and spread side by side. Each group appears once.
* **run figures**: a run compared with nothing (one size) gets its own figure: each measured quantity
  against the step with its threshold, the online sharpness its loop logged, and its training loss.
* the quantity over its threshold against lr x step per lr, the final loss against lr with the optima,
  the spectral densities, per-layer sharpness and alignment exponents.

One of them is the **headline** (:func:`headline`), first on the page: the comparison of the parameterizations
(else of the lrs, else a group's own figure, else a run's) of the preferred quantity (:data:`PREFERRED`).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..runs.quantities import REGISTRY
from . import plots
from .comparisons import Analysis, ComparedGroup, Comparison, TransferFamily
from .findings import Finding, Labels, display, findings, plural, quantity_name

__all__ = ["FigureFile", "build", "headline", "MAX_PANELS", "PREFERRED"]

MAX_PANELS = 3  # side-by-side panels per figure: more would shrink the tick labels below reading size
MAX_RUN_FIGURES = 8
PREFERRED = ("precond", "hessian")  # the headline's quantity: the lr-weighted sharpness compares with 2/lr
PANEL_ORDER = ("parameterization", "lr", "optimizer")  # which varying setting the panels of a figure differ in
STYLE = {"font.size": 11, "axes.titlesize": 11.5, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 12.5}


@dataclass(frozen=True)
class FigureFile:
    """A saved figure: its file ``path`` (PNG; a PDF beside it), ``caption``, ``role`` (headline,
    comparison, run, lrs, transfer, density, layers, alignment) and whether the page gives it the full
    width (``wide``)."""

    name: str
    caption: str
    path: Path
    role: str
    wide: bool = False


class _Saver:
    def __init__(self, out: Path) -> None:
        self.out, self.saved, self.names = out, [], set()

    def keep(self, fig, name: str, caption: str, role: str, wide: bool = False) -> FigureFile:
        import matplotlib.pyplot as plt

        base, i = name, 2
        while name in self.names:
            name, i = f"{base}-{i}", i + 1
        self.names.add(name)
        path = self.out / "figures" / f"{name}.png"
        plots.save(fig, path)
        fig.savefig(path.with_suffix(".pdf"), bbox_inches="tight")
        plt.close(fig)
        saved = FigureFile(name, caption, path, role, wide)
        self.saved.append(saved)
        return saved


def _tag(parameterization: str | None, optimizer: str | None, lr: float | None, axis: str, fixed: dict) -> str:
    """A file-name tag of a group: its coordinates, the compared axis and the other axes' values."""
    parts = [x for x in (parameterization, optimizer) if x] + ([f"lr{lr:g}"] if lr is not None else [])
    parts += [f"{plural(axis)}"]
    parts += [f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}" for name, value in fixed.items()]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))


def _x_label(axis: str) -> str:
    return "fraction of training (step / steps)" if axis == "steps" else "step"


def _order(quantities) -> list[str]:
    names = list(REGISTRY)
    return sorted(quantities, key=lambda q: (PREFERRED.index(q) if q in PREFERRED else len(PREFERRED),
                                             names.index(q) if q in names else len(names), q))


def _coordinates(c: Comparison) -> dict[str, Any]:
    return {"parameterization": c.parameterization, "optimizer": c.optimizer, "lr": c.lr, **c.fixed}


def _pick(labels: Labels) -> str | None:
    """The setting the panels of a comparison figure differ in."""
    for name in (*PANEL_ORDER, *labels.varying):
        if name in labels.varying:
            return name
    return None


def _panel_name(c: Comparison, pick: str | None) -> str:
    if pick in ("parameterization", "optimizer"):
        return display(_coordinates(c)[pick])
    if pick == "lr":
        return f"lr {c.lr:g}"
    if pick is not None:
        value = _coordinates(c).get(pick)
        return f"{pick} {value:g}" if isinstance(value, float) else f"{pick} {value}"
    return display(c.parameterization)


def _finding(items: Sequence[Finding], c: Comparison, q: str) -> Finding | None:
    return next((f for f in items if f.kind == "consistency" and f.quantity == q and f.axis == c.axis
                 and f.parameterization == c.parameterization and f.optimizer == c.optimizer and f.lr == c.lr
                 and f.fixed == c.fixed), None)


def _verdict_title(name: str, f: Finding | None) -> str:
    if f is None:
        return name
    value = f" (spread {f.value:.2g})" if f.value is not None else ""
    return f"{name}: {f.verdict}{value}"


def _threshold(c: Comparison, q: str) -> float | None:
    found = [m.thresholds[q] for m in c.members if q in m.thresholds]
    return found[0] if found else None


def _window(res) -> tuple[float, float] | None:
    steps = np.asarray(res.steps)[np.asarray(res.in_window, dtype=bool)]
    return (float(steps[0]), float(steps[-1])) if steps.size else None


def _comparison_figure(groups: Sequence[ComparedGroup], q: str, pick: str | None, labels: Labels,
                       items: Sequence[Finding]):
    """Trajectories (top) and spread (bottom) of ``groups`` side by side; one group: the two side by side."""
    import matplotlib.pyplot as plt

    n = len(groups)
    c0 = groups[0].comparison
    trajs = [g.quantities[q].trajectories for g in groups]
    results = [g.quantities[q].result for g in groups]
    styles = plots.size_styles(sorted({s for t in trajs for s in t}))
    values = np.concatenate([np.asarray(v, dtype=float) for t in trajs for _, v in t.values()])
    logy = plots.spans_decades(values)
    thresholds = [_threshold(g.comparison, q) for g in groups]
    known = [t for t in thresholds if t is not None]
    far = any(plots.threshold_is_far(t, values, logy) for t in known)
    spreads = np.concatenate([np.asarray(r.spread, dtype=float) for r in results])
    spread_log = plots.spans_decades(spreads)
    if n == 1:
        fig, axes = plt.subplots(1, 2, figsize=(11.6, 4.3), layout="constrained", squeeze=False)
        top, bottom = [axes[0][0]], [axes[0][1]]
    else:
        width = 4.6 if n == 2 else 3.9
        fig, axes = plt.subplots(2, n, figsize=(width * n + 2.2, 5.2), layout="constrained", sharex="col",
                                 sharey="row", height_ratios=[3, 2], squeeze=False)
        top, bottom = list(axes[0]), list(axes[1])
    spread_label = "relative spread" if n > 1 else f"relative spread across {plural(c0.axis)}"
    for j, (g, res, t) in enumerate(zip(groups, results, thresholds)):
        c = g.comparison
        plots.trajectories(trajs[j], quantity=quantity_name(q) if j == 0 else "",
                           threshold=t, size_label=c.axis, ax=top[j], legend=False, styles=styles, logy=logy,
                           far=far, step_label=_x_label(c.axis) if n == 1 else "",
                           title=_verdict_title(_panel_name(c, pick), _finding(items, c, q)) if n > 1 else
                           _verdict_title(labels.entry(g.entry) or quantity_name(q), _finding(items, c, q)))
        plots.spread(res.steps, res.spread, quantity=spread_label if (j == 0 or n == 1) else "",
                     threshold=res.thresholds.spread_max, window=_window(res), summary=res.spread_summary,
                     ax=bottom[j], legend=False, logy=spread_log, step_label=_x_label(c.axis),
                     title="the spread behind the verdict" if n == 1 else "")
    size_legend = plots.size_handles(styles) if styles.discrete else []
    threshold_lines = [ln for ln in top[0].get_lines() if ln.get_label().startswith("EoS threshold")]
    if threshold_lines and len(set(known)) > 1:
        threshold_lines[0].set_label("EoS threshold")
    if not styles.discrete:
        fig.colorbar(styles.mappable, ax=top, label=c0.axis, pad=0.01)
    if size_legend or threshold_lines:
        fig.legend(handles=size_legend + threshold_lines[:1], title=c0.axis if styles.discrete else None,
                   loc="outside right upper", frameon=False)
    handles, names = bottom[0].get_legend_handles_labels()
    names = ["window median" if s.startswith("window median") else s for s in names]  # each panel has its own
    fig.legend(handles, names, loc="outside right lower", frameon=False)
    if n > 1:
        common = ", ".join(x for x in labels.common() if x)
        fig.suptitle(f"{quantity_name(q)} per {c0.axis}: {' vs '.join(_panel_name(g.comparison, pick) for g in groups)}"
                     + (f"  ({common})" if common else ""), x=0.02, ha="left")
    return fig


def _comparisons(groups: Sequence[ComparedGroup], saver: _Saver, labels: Labels, items: Sequence[Finding]):
    """Per quantity, the groups side by side in sets that differ only in the picked setting."""
    pick = _pick(labels)
    quantities = _order({q for g in groups for q in g.quantities})
    made: dict[str, list[tuple[FigureFile, list[ComparedGroup]]]] = {}
    for q in quantities:
        sets: dict[tuple, list[ComparedGroup]] = defaultdict(list)
        for g in groups:
            if q in g.quantities:
                coords = _coordinates(g.comparison)
                sets[(g.comparison.axis, repr(sorted((k, repr(v)) for k, v in coords.items() if k != pick)))].append(g)
        for members in sets.values():
            for i in range(0, len(members), MAX_PANELS):
                chunk = members[i:i + MAX_PANELS]
                c = chunk[0].comparison
                if len(chunk) == 1:
                    name = f"{q}-{_tag(c.parameterization, c.optimizer, c.lr, c.axis, c.fixed)}"
                    subject = labels.entry(chunk[0].entry)
                    caption = (f"{q} per {c.axis}{', ' + subject if subject else ''}: trajectories, and their relative "
                               f"spread with the verdict window shaded")
                else:
                    names = [_panel_name(g.comparison, pick) for g in chunk]
                    rest = _tag(None if pick == "parameterization" else c.parameterization,
                                None if pick == "optimizer" else c.optimizer, None if pick == "lr" else c.lr,
                                c.axis, {k: v for k, v in c.fixed.items() if k != pick})
                    name = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{q}-{'-vs-'.join(x.replace(' ', '') for x in names)}-{rest}")
                    caption = (f"{q} per {c.axis}, {' vs '.join(names)}: trajectories (top) and their relative "
                               f"spread (bottom; the verdict window shaded, its median drawn)")
                fig = _comparison_figure(chunk, q, pick, labels, items)
                made.setdefault(q, []).append((saver.keep(fig, name, caption, "comparison", wide=True), chunk))
    return made


def _alone(analysis: Analysis) -> list:
    """The runs that no comparison with a verdict figure holds (one size: nothing to compare with)."""
    compared = {id(m) for g in analysis.groups if g.quantities for m in g.comparison.members}
    return [r for r in analysis.runs if id(r) not in compared]


def _run_figures(analysis: Analysis, saver: _Saver) -> list[FigureFile]:
    out = []
    for run in _alone(analysis)[:MAX_RUN_FIGURES]:
        curves = {quantity_name(q): run.trajectories[q] for q in _order(run.trajectories)}
        thresholds = {quantity_name(q): t for q, t in run.thresholds.items() if q in run.trajectories}
        online, logs = {}, run.logs
        for name, label in (("sharpness_preconditioned", "online preconditioned sharpness (Recorder)"),
                            ("sharpness", "online sharpness (Recorder)")):
            if name in logs and not online:
                online[label] = logs[name]
                if name == "sharpness_preconditioned" and "eos_ratio" in logs:
                    ratio = dict(zip(*logs["eos_ratio"]))
                    implied = [v / ratio[s] for s, v in zip(*logs[name]) if ratio.get(s)]
                    if implied:
                        thresholds[label] = float(np.median(implied))
        if not curves and not online:
            continue
        stem = Path(run.path).stem
        fig = plots.run_curves(curves, thresholds=thresholds, online=online, loss=run.loss_curve,
                               quantity="top eigenvalue", title=f"{stem}: along training")
        what = ", ".join([*curves, *online]) or "measured quantities"
        out.append(saver.keep(fig, f"run-{re.sub(r'[^A-Za-z0-9._+-]', '_', stem)}",
                              f"{stem}: {what} against the step with the edge-of-stability threshold, and the "
                              f"training loss", "run", wide=True))
    return out


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


def _across_lrs(groups: Sequence[ComparedGroup], saver: _Saver, labels: Labels) -> None:
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
        label = ", ".join(x for x in (labels(param, optimizer, None, dict(fixed)), f"{axis} {size:g}") if x)
        fig = plots.trajectories(curves, quantity=f"{q} / its EoS threshold", threshold=1.0, size_label="lr",
                                 rescale_steps={lr: lr for lr in curves}, step_label="lr x step",
                                 title=f"{q} across lrs: {label}", threshold_label="edge of stability")
        saver.keep(fig, f"{q}-lrs-{_tag(param, optimizer, None, axis, dict(fixed))}-{axis}{size:g}",
                   f"{q} / EoS threshold against lr x step, one curve per lr, {label}", "lrs")


def _transfer(family: TransferFamily, saver: _Saver, labels: Labels) -> None:
    """Final loss against lr per compared value, with the optima."""
    import math

    entry, curves, res = family.entry, family.curves, family.result
    if max((sum(map(math.isfinite, curve.values())) for curve in curves.values()), default=0) < 2:
        return  # no curve to draw (one lr, or all diverged): the verdicts say why
    optima = {o.size: o.lr_opt for o in res.optima if o.lr_opt is not None} if res is not None else None
    label = labels(entry["parameterization"], entry["optimizer"], None, entry["fixed"]) or "all runs"
    fig = plots.lr_sweep(curves, optima=optima, size_label=entry["axis"], title=f"final loss vs lr: {label}")
    saver.keep(fig, f"lr-{_tag(entry['parameterization'], entry['optimizer'], None, entry['axis'], entry['fixed'])}",
               f"final training loss vs lr per {entry['axis']} (x: diverged; dotted: the optima), {label}", "transfer")


def _density_curves(c: Comparison):
    """SLQ densities of each size at the last step all sizes measured (first seed), on one grid."""
    from ..estimators import SpectralDensity

    firsts = {size: runs[0] for size, runs in c.by_size().items() if runs[0].densities}
    if not firsts:
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


def _group_extras(group: ComparedGroup, saver: _Saver, labels: Labels) -> None:
    """Per comparison: the densities, the alignment exponents and the per-layer heatmap."""
    from .alignment import FULL_AT_LEAST, NONE_AT_MOST

    c = group.comparison
    tag = _tag(c.parameterization, c.optimizer, c.lr, c.axis, c.fixed)
    label = labels.entry(group.entry) or "all runs"
    density = _density_curves(c)
    if density:
        step, curves = density
        fig = plots.density_overlay(curves, size_label=c.axis, title=f"Hessian density at step {step}: {label}")
        saver.keep(fig, f"density-{tag}", f"Hessian spectral density per {c.axis} at step {step}, {label}", "density")
    found = group.entry.get("alignment")
    if found:
        curves = {layer: {int(s): e for s, e in a["exponent_by_step"].items() if e is not None}
                  for layer, a in found["layers"].items()}
        curves = {layer: by_step for layer, by_step in curves.items() if by_step}
        if curves:
            fig = plots.alignment_exponents(curves, full_at_least=FULL_AT_LEAST, none_at_most=NONE_AT_MOST,
                                            title=f"alignment exponent across {plural(c.axis)}: {label}")
            saver.keep(fig, f"alignment-{tag}", f"fitted alignment exponent per layer against the step, across "
                                               f"{plural(c.axis)}, {label}", "alignment")
    widest = max((m for m in c.members if m.layers), key=lambda m: m.value(c.axis), default=None)
    if widest is not None:
        layers, size = widest.layers, widest.value(c.axis)
        fig = plots.layer_heatmap(layers.names, layers.steps, np.array(layers.values).T,
                                  title=f"per-layer sharpness, {c.axis} {size:g}: {label}")
        saver.keep(fig, f"layers-{tag}", f"per-layer top Hessian eigenvalue, {c.axis} {size:g}, {label}", "layers")


def headline(made: dict[str, list[tuple[FigureFile, list[ComparedGroup]]]],
             runs: Sequence[FigureFile]) -> FigureFile | None:
    """The figure the page opens with: of the first quantity in :data:`PREFERRED` order, a comparison
    figure with side-by-side panels (the middle one of several: e.g. the middle lr of a grid, whose panels
    are the parameterizations), else its middle single-group figure; else the first run figure."""
    for figures in made.values():
        pool = [f for f, chunk in figures if len(chunk) > 1] or [f for f, _ in figures]
        return pool[(len(pool) - 1) // 2]
    return runs[0] if runs else None


def build(analysis: Analysis, out: Path, items: Sequence[Finding] | None = None,
          labels: Labels | None = None) -> list[FigureFile]:
    """Draw and save every figure of the report; the headline first (role ``headline``), then the rest in
    the page's order."""
    import matplotlib.pyplot as plt

    labels = labels or Labels.of(analysis.metrics)
    items = list(findings(analysis.metrics, labels) if items is None else items)
    saver = _Saver(Path(out))
    with plt.rc_context(STYLE):
        made = _comparisons(analysis.groups, saver, labels, items)
        runs = _run_figures(analysis, saver)
        _across_lrs(analysis.groups, saver, labels)
        for family in analysis.transfers:
            _transfer(family, saver, labels)
        for group in analysis.groups:
            _group_extras(group, saver, labels)
    first = headline(made, runs)
    if first is None:
        return list(saver.saved)
    top = replace(first, role="headline", wide=True)
    return [top] + [f for f in saver.saved if f.path != first.path]
