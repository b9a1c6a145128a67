"""Reading runs and comparing them: which runs differ only along one axis (width, depth or any
recorded setting), and the verdicts on them.

:func:`collect` reads each run file's coordinates (parameterization, optimizer, lr, width, depth,
the other recorded axes, seed, probe), final training loss and stored spectra; unreadable files,
malformed metas and missing coordinates become messages. :func:`analyze` groups the runs into
:class:`Comparison` s along the compared axis -- same parameterization, optimizer, lr and value of
every other varied axis, seeds averaged on common steps -- applies
:func:`~sharpscope.analysis.consistency.super_consistency` to every measured quantity, sets
thresholded quantities against their edge of stability, and runs
:func:`~sharpscope.analysis.consistency.lr_transfer` across lrs. Along ``steps`` (the training
horizon) trajectories are compared at equal fractions of training. Runs from different probes or
batches are not compared; what cannot be compared is returned as a list of problems, never raised.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..runs.quantities import get as get_quantity
from ..runs.spectra import SpectraFile, spectra_path
from ..runs.store import first_diverged_step, logged_losses, open_run
from . import consistency
from .alignment import compare_alignment, series_from_rows

__all__ = ["RunSummary", "Comparison", "LayerSharpness", "QuantityResult", "ComparedGroup", "TransferFamily",
           "Analysis", "collect", "analyze", "analyze_in_detail", "group_label", "plural", "AXES", "compared_axes"]


AXES = ("width", "depth")  # the size axes of every run; any other recorded setting is an axis too
BLOWUP_FACTOR = 2.0  # a run ending above this multiple of its initial loss blew up
_COORDINATES = ("parameterization", "optimizer", "lr", "seed", "width", "depth")


@dataclass(frozen=True)
class LayerSharpness:
    """Per-layer top Hessian eigenvalues of one run: ``values[i][j]`` is layer ``names[j]`` at ``steps[i]``."""

    names: list[str]
    steps: list[int]
    values: list[list[float]]


@dataclass
class RunSummary:
    """What the report needs from one run: its coordinates (``axes`` holds every recorded setting
    beyond parameterization, optimizer, lr, width, depth and seed), final loss and measured results
    (trajectories of the scalar quantities, SLQ densities per step, per-layer sharpness, per-layer
    alignment: an :class:`~sharpscope.analysis.alignment.AlignmentSeries`)."""

    path: str
    parameterization: str
    optimizer: str
    lr: float
    width: float | None
    final_loss: float
    depth: float | None = None
    seed: int | None = None
    probe_name: str | None = None
    probe_digest: str | None = None
    trajectories: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    densities: dict[int, Any] = field(default_factory=dict)
    layers: LayerSharpness | None = None
    loss_source: str = "checkpoint"
    initial_loss: float = float("nan")
    axes: dict[str, Any] = field(default_factory=dict)
    compare: str | None = None
    settings_used: dict[str, str] = field(default_factory=dict)
    alignment: Any = None

    @property
    def blew_up(self) -> bool:
        """Training ended above twice its (known, positive) initial loss -- a margin over mini-batch
        noise and over runs whose lr is merely too small to learn: for the lr sweep as good as diverged."""
        return (math.isfinite(self.final_loss) and self.initial_loss > 0
                and self.final_loss > BLOWUP_FACTOR * self.initial_loss)

    def value(self, axis: str) -> Any:
        """The run's value along ``axis`` (None when it has none)."""
        if axis == "width":
            return self.width
        if axis == "depth":
            return self.depth
        return self.axes.get(axis)

    size = value  # the size along a width/depth axis: the name the report used before any axis existed


def plural(axis: str) -> str:
    """The compared axis in the plural, for verdicts and captions: ``width`` -> ``widths``; names that
    already end in s (``steps``, ``num_experts``) stay as they are."""
    return axis if axis.endswith("s") else f"{axis}s"


def group_label(parameterization: str, optimizer: str, lr: float | None = None,
                fixed: Mapping[str, Any] | None = None) -> str:
    """``"mup / sgd / lr 0.5 / depth 4"``: the one way a group of runs is named in verdicts and figures."""
    parts = [parameterization, optimizer] + ([f"lr {lr:g}"] if lr is not None else [])
    parts += [f"{name} {_show(value)}" for name, value in (fixed or {}).items()]
    return " / ".join(parts)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _axis_value(value: Any) -> Any:
    """An axis value as compared: numbers as floats, strings and booleans as they are."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    number = _number(value)
    return number


def _coordinates(meta: Any, run_axes: Mapping[str, Any], wanted: Sequence[str]) -> dict[str, Any]:
    """A run's coordinates from its meta: the sweep's record (``meta["user"]["probe"]``), the file's
    axes (format v2), the user's own keys (``meta["user"]``) and the model's kwargs -- in that order.
    Malformed entries (a list where a table belongs, an optimizer given as a string) read as absent."""
    meta = _mapping(meta)
    user = _mapping(meta.get("user"))
    probe = _mapping(user.get("probe"))
    record = meta.get("parameterization")
    # a parametrize() record names its parameterization; a plain string is a label (e.g. "sp")
    named = _mapping(record.get("parameterization")).get("name") if isinstance(record, dict) else \
        record if isinstance(record, str) else None
    kwargs = _mapping(meta.get("model_kwargs"))
    opt_meta = _mapping(meta.get("optimizer"))
    opt_class = opt_meta.get("class") if isinstance(opt_meta.get("class"), str) else "unknown"

    def first(*values):
        return next((v for v in values if v is not None and not isinstance(v, (dict, list))), None)

    axes: dict[str, Any] = {}
    for source in (run_axes, _mapping(probe.get("axes"))):
        axes.update({k: v for k, v in source.items() if k not in _COORDINATES})
    for name in wanted:
        if name not in axes and name not in _COORDINATES:
            value = first(probe.get(name), user.get(name), kwargs.get(name))
            if value is not None:
                axes[name] = value
    if "steps" in axes or "steps" in wanted:
        axes.setdefault("steps", first(probe.get("steps"), user.get("steps")))
    return {
        "parameterization": str(first(probe.get("parameterization"), named, user.get("parameterization"),
                                      run_axes.get("parameterization"), "unknown")),
        "optimizer": str(first(probe.get("optimizer"), user.get("optimizer"), run_axes.get("optimizer"),
                               opt_class.rsplit(".", 1)[-1].lower())),
        "lr": _number(first(probe.get("lr"), user.get("lr"), run_axes.get("lr"),
                            _mapping(opt_meta.get("defaults")).get("lr"))),
        "width": _number(first(probe.get("width"), user.get("width"), run_axes.get("width"), kwargs.get("width"))),
        "depth": _number(first(probe.get("depth"), user.get("depth"), run_axes.get("depth"), kwargs.get("depth"))),
        "seed": first(meta.get("seed"), user.get("seed")),
        "probe_name": probe.get("name") if isinstance(probe.get("name"), str) else None,
        "compare": probe.get("compare") if isinstance(probe.get("compare"), str) else None,
        "axes": {k: _axis_value(v) for k, v in axes.items() if _axis_value(v) is not None},
    }


def _losses(run) -> tuple[float, float, str]:
    """``(initial, final, source)`` of the run's training loss. ``final``: NaN for a run that
    diverged (:func:`~sharpscope.runs.store.first_diverged_step`; source "diverged"), else the last
    checkpoint's loss ("checkpoint"), else the last logged loss after step 0 ("logged", e.g. a
    framework's), else NaN ("unknown": the loop passed no loss). ``initial``: the loss logged at step
    0 (sweeps log the initial model's loss there), else NaN -- then no blow-up test is made."""
    log_steps, logged = logged_losses(run)
    at_zero = [float(v) for s, v in zip(log_steps, logged) if s == 0 and math.isfinite(v)]
    initial = at_zero[0] if at_zero else float("nan")
    if math.isfinite(first_diverged_step(run)):
        return initial, float("nan"), "diverged"
    checkpoints = [run.loss(s) for s in run.steps if s > 0]
    if any(map(math.isfinite, checkpoints)):
        return initial, float(checkpoints[-1]), "checkpoint"
    later = [float(v) for s, v in zip(log_steps, logged) if s > 0]
    if later:
        return initial, later[-1], "logged"
    return initial, float("nan"), "unknown"


def _digest(batch) -> str | None:
    """A fingerprint of the stored batch (a tuple or a mapping): runs compared must be measured on the
    same data."""
    if batch is None:
        return None
    h = hashlib.sha1()
    if isinstance(batch, Mapping):
        tensors = [t for _, t in sorted(batch.items())]
    else:
        inputs, targets = batch
        tensors = [*inputs, *(() if targets is None else (targets,))]
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.float().contiguous().numpy().tobytes() if t.dtype == torch.bfloat16
                 else t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _chosen_keys(rows: list[dict], wanted: Any, summary: RunSummary, problems: list[str]) -> dict[str, str]:
    """The settings key used per quantity: ``wanted.key(q)`` when the report was asked for settings,
    else the key with the most stored rows (ties: the most recent); a choice among several is noted."""
    keys: dict[str, Counter] = defaultdict(Counter)
    last: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        key = json.dumps(row["settings"], sort_keys=True)
        keys[row["quantity"]][key] += 1
        last[(row["quantity"], key)] = i
    chosen = {}
    for q, counts in keys.items():
        if wanted is not None:
            try:
                chosen[q] = wanted.key(q)
            except ValueError:
                continue
        else:
            chosen[q] = max(counts, key=lambda k: (counts[k], last[(q, k)]))
        if len(counts) > 1:
            problems.append(f"{Path(summary.path).name}: {q} measured under {len(counts)} settings; the report uses "
                            f"{chosen[q]}")
    return chosen


def _read_spectra(summary: RunSummary, results: Path, wanted: Any, problems: list[str], run_id: str | None) -> None:
    with SpectraFile(results, run_id=run_id) as sf:  # only this run's results (docs/formats.md, "Belonging")
        rows = sf.rows()
    chosen = _chosen_keys(rows, wanted, summary, problems)
    summary.settings_used = dict(chosen)
    layer_steps, layer_values, layer_names = [], [], None
    alignment_rows = []
    for row in rows:
        q, info = row["quantity"], row["info"]
        if json.dumps(row["settings"], sort_keys=True) != chosen.get(q) or not len(row["values"]):
            continue
        try:
            kind = get_quantity(q).kind
        except ValueError:
            continue  # a quantity this version does not know
        if kind == "density":
            summary.densities[row["step"]] = (row["values"], row["residuals"], info.get("nodes_per_probe"))
        elif kind == "alignment":
            alignment_rows.append((row["step"], row["values"], row["residuals"], info))
        elif kind == "layers":
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
        summary.layers = LayerSharpness(layer_names, layer_steps, layer_values)
    if alignment_rows:
        summary.alignment = series_from_rows(alignment_rows)
        if summary.alignment is None:
            problems.append(f"{results.name}: alignment results of different layers at different steps: left out")


def collect(runs: Sequence[str | Path], *, compare: str | None = None, spectrum: Any = None
            ) -> tuple[list[RunSummary], list[str]]:
    """Read each run's coordinates, last loss and stored spectra; problems (unreadable files, malformed
    metas, missing coordinates, nothing measured) come back as messages, and such a run is left out or
    kept without results. ``compare`` names an axis to read from the user's meta too (for runs not made
    by a sweep); ``spectrum`` (a :class:`~sharpscope.runs.jobs.SpectrumSettings`) picks the stored
    results measured with those settings (default: per quantity, the settings most results used)."""
    summaries, problems = [], []
    wanted = [compare] if compare else []
    for path in runs:
        path = Path(path)
        try:
            with open_run(path) as run:
                c = _coordinates(run.meta, _mapping(getattr(run, "axes", {})), wanted)
                steps = run.steps
                initial, final, loss_source = _losses(run)
                digest = _digest(run.batch())
                run_id = getattr(run, "id", None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"{path.name}: not a readable sharpscope run ({str(err).splitlines()[0]}): left out")
            continue
        if not steps:
            problems.append(f"{path.name}: holds no complete checkpoint: left out")
            continue
        if c["lr"] is None or c["lr"] <= 0:
            problems.append(f"{path.name}: no positive lr in its meta (record it in meta['user']): left out")
            continue
        summary = RunSummary(str(path), c["parameterization"], c["optimizer"], c["lr"], c["width"],
                             float(final), depth=c["depth"], seed=c["seed"], probe_name=c["probe_name"],
                             probe_digest=digest, loss_source=loss_source, initial_loss=initial, axes=c["axes"],
                             compare=c["compare"])
        if loss_source == "unknown":
            problems.append(f"{path.name}: records no training loss (pass loss= to Recorder.step or use "
                            f"Recorder.log_loss): left out of the lr transfer")
        results = spectra_path(path)
        if results.exists():
            try:
                _read_spectra(summary, results, spectrum, problems, run_id)
            except (OSError, ValueError, KeyError) as err:
                problems.append(f"{results.name}: unreadable results ({err}): the run counts for lr transfer only")
        else:
            problems.append(f"{path.name}: no spectra measured yet (run sharpscope spectrum)")
        summaries.append(summary)
    return summaries, problems


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
    def label(self) -> str:
        return group_label(self.parameterization, self.optimizer, self.lr, self.fixed)

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
    result: Any  # consistency.TransferResult | None


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
    numeric = [a for a in varying if all(_number(s.value(a)) is not None for s in summaries)]
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
        if _number(s.value(axis)) is None:
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
    """How trajectories along ``axis`` are aligned: on common steps, or (along steps) interpolated on
    common fractions of training."""
    return {"on": "common", "interpolate": True} if axis == "steps" else {}


def _compare(c: Comparison, problems: list[str]) -> ComparedGroup:
    """The JSON entry of one comparison and the results its figures need."""
    names = f"{plural(c.axis)}"
    seeds = {_key(size): len(runs) for size, runs in c.by_size().items()}
    entry: dict[str, Any] = {"axis": c.axis, "parameterization": c.parameterization, "optimizer": c.optimizer,
                             "lr": c.lr, "fixed": c.fixed, "sizes": c.sizes, "seeds": seeds, "quantities": {},
                             "x": "fraction of training" if c.axis == "steps" else "step"}
    results: dict[str, QuantityResult] = {}
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
            res = consistency.super_consistency(traj, **_fraction_axis(c.axis))
        except ValueError as err:
            entry["quantities"][q] = {"verdict": "undetermined", "reason": str(err)}
            continue
        entry["quantities"][q] = res.evidence
        results[q] = QuantityResult(traj, res)
        thresholds = {m.value(c.axis): m.thresholds[q] for m in c.members if q in m.thresholds}
        if thresholds:
            eos = {}
            for size, threshold in sorted(thresholds.items()):
                r = consistency.edge_of_stability(*traj[size], threshold)
                eos[_key(size)] = {"threshold": threshold, "tail_ratio": r.tail_mean, "first_step_at_0.9": r.first_step}
            entry["quantities"][q]["edge_of_stability"] = eos
    if any(m.alignment is not None for m in c.members) and not mismatch:
        found = compare_alignment({size: [m.alignment for m in runs] for size, runs in c.by_size().items()}, c.axis)
        if found is not None:
            entry["alignment"] = found
    if not quantities and not mismatch and "alignment" not in entry:
        problems.append(f"{c.label}: no spectra to compare")
    return ComparedGroup(c, entry, results)


def _key(size: float) -> str:
    return str(float(size))


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


def _transfers(summaries: Sequence[RunSummary], axes: Sequence[str], problems: list[str]) -> list[TransferFamily]:
    out = []
    for axis in axes:
        for (param, opt, _, fixed), members in _groups(summaries, axis, False).items():
            fixed = dict(fixed)
            label = group_label(param, opt, None, fixed)
            curves = _lr_curves(members, axis)
            blown = sorted(f"{s.value(axis):g}@{s.lr:g}" for s in members if s.blew_up)
            if blown:
                problems.append(f"{label}: {len(blown)} run(s) ended above twice their initial loss ({axis}@lr: "
                                f"{', '.join(blown)}): counted as diverged in the lr transfer")
            head = {"axis": axis, "parameterization": param, "optimizer": opt, "fixed": fixed}
            n_lrs = max((len(curve) for curve in curves.values()), default=0)
            dead = [size for size, curve in curves.items() if not any(math.isfinite(v) for v in curve.values())]
            if dead:
                problems.append(f"{label}: every lr diverged for {plural(axis)} {_fmt(dead)}: lower the lr grid")
            if len(curves) < 2 or n_lrs < 3:
                reason = f"needs >= 2 {plural(axis)} and >= 3 lrs, has {len(curves)} {axis}(s) and {n_lrs} lr(s)"
                out.append(TransferFamily({**head, "verdict": "undetermined", "reason": reason}, curves, None))
                continue
            try:
                res = consistency.lr_transfer(curves)
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
        if all(_number(s.value(axis)) is None for axis in axes):
            problems.append(f"{Path(s.path).name}: no {' or '.join(axes)} in its meta (record it in meta['user'] or "
                            "the Recorder's axes=): left out")
    summaries = [s for s in summaries if any(_number(s.value(axis)) is not None for axis in axes)]
    for axis in axes:
        values = {s.value(axis) for s in summaries if s.value(axis) is not None}
        if summaries and not values:
            problems.append(f"no run records a value of {axis!r} (sweeps record their axes; for your own runs put "
                            f"it in the Recorder's meta or axes=)")
        elif len(values) == 1:
            problems.append(f"all runs have the same {axis} ({_fmt(values)}): super consistency and lr transfer "
                            f"need >= 2 {plural(axis)} (better >= 3, for the convergence exponent)")
        elif any(_number(v) is None for v in values):
            problems.append(f"the compared axis {axis!r} holds values that are not numbers "
                            f"({', '.join(sorted(map(str, values)))}): compare a numeric axis")
    groups = [_compare(c, problems) for c in _comparisons(summaries, axes)]
    transfers = _transfers(summaries, axes, problems)
    metrics = {"compared": axes, "groups": [g.entry for g in groups], "transfer": [t.entry for t in transfers],
               "problems": problems}
    return Analysis(metrics, groups, transfers, summaries)


def analyze(summaries: Sequence[RunSummary], compare: str | None = None) -> dict[str, Any]:
    """Verdicts and their evidence, as a JSON-able dict: ``compared`` (the axes compared), ``groups``
    (super consistency of every quantity along the compared axis, per parameterization / optimizer /
    lr / other varied settings), ``transfer`` (lr transfer along it) and ``problems`` (what could not
    be compared, and why)."""
    return analyze_in_detail(summaries, compare).metrics
