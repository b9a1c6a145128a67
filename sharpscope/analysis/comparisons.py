"""Comparing runs: which runs differ only along one axis (width, depth or any recorded setting), and the
verdicts on them.

:func:`analyze` groups the runs read by :func:`~sharpscope.analysis.summaries.collect` into
:class:`Comparison` s along the compared axis -- same parameterization, optimizer, lr and value of
every other varied axis, seeds averaged on common steps -- applies
:func:`~sharpscope.analysis.consistency.super_consistency` to every measured quantity, sets
thresholded quantities against their edge of stability, and runs
:func:`~sharpscope.analysis.transfer.lr_transfer` across lrs. Along ``steps`` (the training
horizon) trajectories are compared at equal fractions of training. Runs from different probes or
batches are not compared; what cannot be compared is returned as a list of problems, never raised.
A check that cannot apply to the runs at all (one size, fewer than 3 lrs, a layer whose fan-in does not
grow) keeps its ``undetermined`` verdict and gets a ``not_analysed`` key with the short reason: the report
folds those into one note instead of the verdict table.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .alignment import compare_alignment
from .consistency import super_consistency
from .eos import edge_of_stability
from .summaries import LayerSharpness, RunSummary, collect, finite_number
from .transfer import lr_transfer

__all__ = ["RunSummary", "Comparison", "LayerSharpness", "QuantityResult", "ComparedGroup", "TransferFamily",
           "Analysis", "collect", "analyze", "analyze_in_detail", "group_label", "plural", "AXES", "compared_axes"]


AXES = ("width", "depth")  # the size axes of every run; any other recorded setting is an axis too
LR_TRANSFER_MIN_LRS = 3  # lr_transfer fits a parabola in log2 lr around the best grid point


def plural(axis: str) -> str:
    """The compared axis in the plural, for verdicts and captions: ``width`` -> ``widths``; names that
    already end in s (``steps``, ``num_experts``) stay as they are."""
    return axis if axis.endswith("s") else f"{axis}s"


def group_label(parameterization: str, optimizer: str, lr: float | None = None,
                fixed: Mapping[str, Any] | None = None) -> str:
    """``"mup / sgd / lr 0.5 / depth 4"``: a group of runs by all its coordinates (empty ones left out), as the
    command line's verdict lines name it; problem lines name only the coordinates that vary
    (:func:`_short_label`), the report's page uses :class:`~sharpscope.analysis.findings.Labels`."""
    parts = [x for x in (parameterization, optimizer) if x] + ([f"lr {lr:g}"] if lr is not None else [])
    parts += [f"{name} {_show(value)}" for name, value in (fixed or {}).items()]
    return " / ".join(parts)


def _named(label: str, text: str) -> str:
    """A problem line about a group: ``"sp: every lr diverged ..."``; without a prefix when ``label`` is ""."""
    return f"{label}: {text}" if label else text


def _short_label(shown: set[str], parameterization: str, optimizer: str, lr: float | None,
                 fixed: Mapping[str, Any]) -> str:
    """:func:`group_label` with only the coordinates in ``shown`` (those that vary among the runs)."""
    return group_label(parameterization if "parameterization" in shown else "",
                       optimizer if "optimizer" in shown else "", lr if "lr" in shown else None,
                       {k: v for k, v in fixed.items() if k in shown})


def _shown(summaries: Sequence[RunSummary]) -> set[str]:
    """The coordinates that vary among the runs: what a group's name needs."""
    shown = set(_varying(summaries))
    shown.update(name for name in ("parameterization", "optimizer", "lr")
                 if len({getattr(s, name) for s in summaries}) > 1)
    return shown


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Comparison:
    """Runs that differ only along ``axis`` (and in seed): same parameterization, optimizer, lr and
    the same value of every other varied axis (``fixed``)."""

    axis: str
    parameterization: str
    optimizer: str
    lr: float
    fixed: dict[str, Any]
    members: list[RunSummary]

    @property
    def sizes(self) -> list[float]:
        return sorted({m.value(self.axis) for m in self.members})

    def by_size(self) -> dict[float, list[RunSummary]]:
        out: dict[float, list[RunSummary]] = defaultdict(list)
        for m in self.members:
            out[m.value(self.axis)].append(m)
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class QuantityResult:
    """One quantity of one comparison: the trajectory per compared value and its verdict."""

    trajectories: dict[float, tuple[list[float], list[float]]]
    result: Any  # consistency.ConsistencyResult


@dataclass(frozen=True)
class ComparedGroup:
    """A comparison, its metrics.json entry and, per quantity that got a verdict, its result."""

    comparison: Comparison
    entry: dict[str, Any]
    quantities: dict[str, QuantityResult]


@dataclass(frozen=True)
class TransferFamily:
    """The runs of one lr sweep along the compared axis: its metrics.json entry, the loss curves
    (size -> lr -> final loss) and the lr-transfer result (None when undetermined)."""

    entry: dict[str, Any]
    curves: dict[float, dict[float, float]]
    result: Any  # transfer.TransferResult | None


@dataclass(frozen=True)
class Analysis:
    """Everything :func:`analyze_in_detail` finds: the metrics (JSON-able) and what the figures need."""

    metrics: dict[str, Any]
    groups: list[ComparedGroup]
    transfers: list[TransferFamily]
    runs: list[RunSummary]  # the runs compared (those with a value along a compared axis)


def _axis_names(summaries: Sequence[RunSummary]) -> list[str]:
    names = list(AXES) + sorted({k for s in summaries for k in s.axes})
    return names


def _varying(summaries: Sequence[RunSummary]) -> list[str]:
    """The axes along which runs take at least two values (runs without a value do not count)."""
    return [a for a in _axis_names(summaries)
            if len({repr(s.value(a)) for s in summaries if s.value(a) is not None}) >= 2]


def compared_axes(summaries: Sequence[RunSummary], compare: str | None = None,
                  problems: list[str] | None = None) -> list[str]:
    """The axis (or axes) the verdicts compare: ``compare`` if given; else the one the runs' sweep
    named; else width and depth, each where it varies (both, when both do); else the one numeric
    axis that varies; else width."""
    if compare:
        return [compare]
    hints = {s.compare for s in summaries if s.compare}
    if len(hints) == 1:
        return [hints.pop()]
    if len(hints) > 1 and problems is not None:
        problems.append(f"the runs' sweeps compare different axes ({', '.join(sorted(hints))}): comparing "
                        f"{' and '.join(a for a in AXES)} where they vary (pass --compare to choose)")
    varying = _varying(summaries)
    sizes = [a for a in AXES if a in varying]
    if sizes:
        return sizes
    numeric = [a for a in varying if all(finite_number(s.value(a)) is not None for s in summaries)]
    return numeric[:1] if len(numeric) == 1 else ["width"]


def _groups(summaries: Sequence[RunSummary], axis: str, with_lr: bool) -> dict[tuple, list[RunSummary]]:
    """Runs with a value along ``axis`` grouped by parameterization, optimizer, (lr) and every other
    varied axis' value, in sorted order."""
    others = [a for a in _varying(summaries) if a != axis]
    if axis in AXES:  # along width, the depth names the group even when all runs share it (and vice versa)
        other = AXES[1 - AXES.index(axis)]
        if other not in others and any(s.value(other) is not None for s in summaries):
            others.insert(0, other)
    groups: dict[tuple, list[RunSummary]] = defaultdict(list)
    for s in summaries:
        if finite_number(s.value(axis)) is None:
            continue
        fixed = tuple((a, s.value(a)) for a in others)
        groups[(s.parameterization, s.optimizer, s.lr if with_lr else None, fixed)].append(s)
    order = lambda kv: tuple(repr(x) if not isinstance(x, (int, float)) else x for x in kv[0][:3]) + (repr(kv[0][3]),)  # noqa: E731
    return dict(sorted(groups.items(), key=order))


def _comparisons(summaries: Sequence[RunSummary], axes: Sequence[str]) -> list[Comparison]:
    return [Comparison(axis, param, opt, lr, dict(fixed), members)
            for axis in axes for (param, opt, lr, fixed), members in _groups(summaries, axis, True).items()]


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
                f"comparable (capture every run with the same batch=(x, y))")
    return None


def _trajectories(c: Comparison, q: str) -> dict[float, tuple[list[float], list[float]]]:
    """Per value of the compared axis, the seed-mean trajectory of ``q``; along ``steps`` (the training
    horizon) its x is the fraction of training, step / steps, so that horizons compare at equal
    fractions."""
    out = {}
    for size, runs in c.by_size().items():
        trajs = [m.trajectories[q] for m in runs if q in m.trajectories]
        if trajs:
            steps, values = _mean_trajectory(trajs)
            out[size] = ([x / size for x in steps], values) if c.axis == "steps" else (steps, values)
    return out


def _fraction_axis(axis: str) -> dict[str, Any]:
    """How trajectories along ``axis`` are put on common steps: as recorded, or (along steps) interpolated on
    common fractions of training."""
    return {"on": "common", "interpolate": True} if axis == "steps" else {}


def _compare(c: Comparison, problems: list[str], shown: set[str]) -> ComparedGroup:
    """The JSON entry of one comparison and the results its figures need (``shown``: the coordinates its
    problem lines name)."""
    label = _short_label(shown, c.parameterization, c.optimizer, c.lr, c.fixed)
    names = f"{plural(c.axis)}"
    seeds = {_key(size): len(runs) for size, runs in c.by_size().items()}
    entry: dict[str, Any] = {"axis": c.axis, "parameterization": c.parameterization, "optimizer": c.optimizer,
                             "lr": c.lr, "fixed": c.fixed, "sizes": c.sizes, "seeds": seeds, "quantities": {},
                             "x": "fraction of training" if c.axis == "steps" else "step"}
    results: dict[str, QuantityResult] = {}
    mismatch = _mismatch(c)
    if mismatch:
        problems.append(_named(label, f"{mismatch}; not compared"))
    quantities = sorted({q for m in c.members for q in m.trajectories})
    for q in quantities:
        traj = _trajectories(c, q)
        missing = [s for s in c.sizes if s not in traj]
        if missing and len(traj) >= 1:
            problems.append(_named(label, f"{q} measured for {names} {_fmt(traj)} but not for {_fmt(missing)}"))
        if mismatch:
            entry["quantities"][q] = {"verdict": "undetermined", "reason": mismatch}
            continue
        if len(traj) < 2:
            entry["quantities"][q] = {"verdict": "undetermined", "reason": f"only {len(traj)} {c.axis}(s) measured",
                                      "not_analysed": f"{_count(len(traj), c.axis)} measured (needs >= 2)"}
            continue
        try:
            res = super_consistency(traj, **_fraction_axis(c.axis))
        except ValueError as err:
            entry["quantities"][q] = {"verdict": "undetermined", "reason": str(err)}
            continue
        entry["quantities"][q] = res.evidence
        results[q] = QuantityResult(traj, res)
        thresholds = {m.value(c.axis): m.thresholds[q] for m in c.members if q in m.thresholds}
        if thresholds:
            eos = {}
            for size, threshold in sorted(thresholds.items()):
                r = edge_of_stability(*traj[size], threshold)
                eos[_key(size)] = {"threshold": threshold, "tail_ratio": r.tail_mean, "first_step_at_0.9": r.first_step}
            entry["quantities"][q]["edge_of_stability"] = eos
    if any(m.alignment is not None for m in c.members) and not mismatch:
        found = _alignment(c)
        if found is not None:
            entry["alignment"] = found
    if not quantities and not mismatch and "alignment" not in entry:
        problems.append(_named(label, "no spectra to compare"))
    return ComparedGroup(c, entry, results)


def _alignment(c: Comparison) -> dict[str, Any] | None:
    """The alignment entry of a comparison; a layer whose fan-in is the same at every size (an input
    layer) has no exponent to fit: ``not_analysed``."""
    found = compare_alignment({size: [m.alignment for m in runs] for size, runs in c.by_size().items()}, c.axis)
    for layer in (found or {}).get("layers", {}).values():
        if len(set(layer["fan_in"].values())) < 2:
            layer["not_analysed"] = f"fan-in {next(iter(layer['fan_in'].values()))} at every {c.axis}"
    return found


def _key(size: float) -> str:
    return str(float(size))


def _count(n: int, axis: str) -> str:
    """``"1 lr"``, ``"2 lrs"``, ``"1 width"``."""
    return f"{n} {axis if n == 1 else plural(axis)}"


def _fmt(sizes) -> str:
    return ", ".join(f"{s:g}" for s in sorted(sizes))


def _lr_curves(c_members: Sequence[RunSummary], axis: str) -> dict[float, dict[float, float]]:
    """Size -> lr -> final loss, the mean over seeds; a seed that diverged, or blew up (ended above
    twice its initial loss: a finite but meaningless loss that would bend the quadratic fit of the
    optimum), makes the point diverged (NaN)."""
    points: dict[float, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in c_members:
        if s.loss_source != "unknown":
            points[s.value(axis)][s.lr].append(float("nan") if s.blew_up else s.final_loss)
    return {size: {lr: float(np.mean(v)) if all(math.isfinite(x) for x in v) else float("nan")
                   for lr, v in curve.items()} for size, curve in sorted(points.items())}


def _transfers(summaries: Sequence[RunSummary], axes: Sequence[str], problems: list[str],
               shown: set[str]) -> list[TransferFamily]:
    out = []
    for axis in axes:
        for (param, opt, _, fixed), members in _groups(summaries, axis, False).items():
            fixed = dict(fixed)
            label = _short_label(shown, param, opt, None, fixed)
            curves = _lr_curves(members, axis)
            head = {"axis": axis, "parameterization": param, "optimizer": opt, "fixed": fixed}
            n_lrs = max((len(curve) for curve in curves.values()), default=0)
            blown = sorted(f"{s.value(axis):g}@{s.lr:g}" for s in members if s.blew_up)
            if len(curves) < 2 or n_lrs < LR_TRANSFER_MIN_LRS:
                if blown:
                    problems.append(_named(label, f"{len(blown)} run(s) ended above twice their initial loss "
                                                  f"({axis}@lr: {', '.join(blown)}): they diverged"))
                reason = f"needs >= 2 {plural(axis)} and >= 3 lrs, has {len(curves)} {axis}(s) and {n_lrs} lr(s)"
                short = ("no training loss recorded" if not curves
                         else f"{_count(n_lrs, 'lr')} (needs >= {LR_TRANSFER_MIN_LRS})" if n_lrs < LR_TRANSFER_MIN_LRS
                         else f"{_count(len(curves), axis)} (needs >= 2)")
                out.append(TransferFamily({**head, "verdict": "undetermined", "reason": reason, "not_analysed": short},
                                          curves, None))
                continue
            if blown:
                problems.append(_named(label, f"{len(blown)} run(s) ended above twice their initial loss ({axis}@lr: "
                                              f"{', '.join(blown)}): counted as diverged in the lr transfer"))
            dead = [size for size, curve in curves.items() if not any(math.isfinite(v) for v in curve.values())]
            if dead:
                problems.append(_named(label, f"every lr diverged for {plural(axis)} {_fmt(dead)}: lower the lr grid"))
            try:
                res = lr_transfer(curves)
                out.append(TransferFamily({**head, **res.evidence}, curves, res))
            except ValueError as err:
                out.append(TransferFamily({**head, "verdict": "undetermined", "reason": str(err)}, curves, None))
    return out


def analyze_in_detail(summaries: Sequence[RunSummary], compare: str | None = None) -> Analysis:
    """:func:`analyze`'s metrics, plus what the figures need: per comparison its results, per lr-sweep
    family its curves and transfer result."""
    problems: list[str] = []
    axes = compared_axes(summaries, compare, problems)
    for s in summaries:
        if all(finite_number(s.value(axis)) is None for axis in axes):
            problems.append(f"{Path(s.path).name}: no {' or '.join(axes)} in its meta (record it in meta['user'] or "
                            "the Recorder's axes=): left out")
    summaries = [s for s in summaries if any(finite_number(s.value(axis)) is not None for axis in axes)]
    for axis in axes:
        values = {s.value(axis) for s in summaries if s.value(axis) is not None}
        if summaries and not values:
            problems.append(f"no run records a value of {axis!r} (sweeps record their axes; for your own runs put "
                            f"it in the Recorder's meta or axes=)")
        elif any(finite_number(v) is None for v in values):
            problems.append(f"the compared axis {axis!r} holds values that are not numbers "
                            f"({', '.join(sorted(map(str, values)))}): compare a numeric axis")
    shown = _shown(summaries)
    groups = [_compare(c, problems, shown) for c in _comparisons(summaries, axes)]
    transfers = _transfers(summaries, axes, problems, shown)
    metrics = {"compared": axes, "groups": [g.entry for g in groups], "transfer": [t.entry for t in transfers],
               "problems": problems}
    return Analysis(metrics, groups, transfers, summaries)


def analyze(summaries: Sequence[RunSummary], compare: str | None = None) -> dict[str, Any]:
    """Verdicts and their evidence, as a JSON-able dict: ``compared`` (the axes compared), ``groups``
    (super consistency of every quantity along the compared axis, per parameterization / optimizer /
    lr / other varied settings), ``transfer`` (lr transfer along it) and ``problems`` (what could not
    be compared, and why)."""
    return analyze_in_detail(summaries, compare).metrics
