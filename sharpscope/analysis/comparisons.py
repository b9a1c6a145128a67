"""Reading runs and comparing them: which runs differ only in size (width or depth), and the
verdicts on them.

:func:`collect` reads each run file's coordinates (parameterization, optimizer, lr, width, depth,
seed, probe), final training loss and stored spectra; unreadable files and missing coordinates
become messages. :func:`analyze` groups the runs into :class:`Comparison` s -- same
parameterization, optimizer, lr and other-axis value, seeds averaged on common steps -- and applies
:func:`~sharpscope.analysis.consistency.super_consistency` to every measured quantity, sets thresholded
quantities against their edge of stability, and runs :func:`~sharpscope.analysis.consistency.lr_transfer`
across lrs. Runs from different probes or probe batches are not compared; what cannot be compared
is returned as a list of problems, never raised.
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import consistency
from ..runs.spectra import SpectraFile, spectra_path
from ..runs.store import first_diverged_step, logged_losses, open_run

__all__ = ["RunSummary", "Comparison", "collect", "analyze", "analyze_in_detail", "AXES"]


AXES = ("width", "depth")
BLOWUP_FACTOR = 2.0  # a run ending above this multiple of its initial loss blew up


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
    initial_loss: float = float("nan")

    @property
    def blew_up(self) -> bool:
        """Training ended above twice its (known, positive) initial loss -- a margin over mini-batch
        noise and over runs whose lr is merely too small to learn: for the lr sweep as good as diverged."""
        return (math.isfinite(self.final_loss) and self.initial_loss > 0
                and self.final_loss > BLOWUP_FACTOR * self.initial_loss)

    def size(self, axis: str) -> float | None:
        return self.width if axis == "width" else self.depth


def _coordinates(meta: dict) -> dict[str, Any]:
    user = meta.get("user") or {}
    probe = user.get("probe") or {}
    record = meta.get("parameterization")
    # a parametrize() record names its parameterization; a plain string is a label (e.g. "sp")
    named = (record.get("parameterization") or {}).get("name") if isinstance(record, dict) else \
        record if isinstance(record, str) else None
    kwargs = meta.get("model_kwargs") or {}
    opt_meta = meta.get("optimizer") or {}

    def first(*values):
        return next((v for v in values if v is not None), None)

    return {
        "parameterization": str(first(probe.get("parameterization"), named, user.get("parameterization"), "unknown")),
        "optimizer": str(first(probe.get("optimizer"), user.get("optimizer"),
                               opt_meta.get("class", "unknown").rsplit(".", 1)[-1].lower())),
        "lr": first(probe.get("lr"), user.get("lr"), (opt_meta.get("defaults") or {}).get("lr")),
        "width": first(probe.get("width"), user.get("width"), kwargs.get("width")),
        "depth": first(probe.get("depth"), user.get("depth"), kwargs.get("depth")),
        "seed": first(meta.get("seed"), user.get("seed")),
        "probe_name": probe.get("name"),
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
                initial, final, loss_source = _losses(run)
                digest = _digest(run.batch())
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
                             loss_source=loss_source, initial_loss=initial)
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
        fixed = f" / {_other(self.axis)} {self.fixed:g}" if self.fixed is not None else ""
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


def _other(axis: str) -> str:
    return "depth" if axis == "width" else "width"


def _by_axis(summaries: Sequence[RunSummary], coords: Callable[[RunSummary], tuple]):
    """For each axis the runs vary along: ``(axis, key, runs)`` for the groups of runs that share
    ``coords(run)`` and the other axis' value (the last element of ``key``), in sorted order."""
    for axis in _axes_of(summaries):
        groups: dict[tuple, list[RunSummary]] = defaultdict(list)
        for s in summaries:
            if s.size(axis) is not None:
                groups[(*coords(s), s.size(_other(axis)))].append(s)
        for key, members in sorted(groups.items(), key=lambda kv: tuple((x is None, x) for x in kv[0])):
            yield axis, key, members


def _comparisons(summaries: Sequence[RunSummary]) -> list[Comparison]:
    return [Comparison(axis, *key, members) for axis, key, members in
            _by_axis(summaries, lambda s: (s.parameterization, s.optimizer, s.lr))]


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


def _key(size: float) -> str:
    return str(float(size))


def _fmt(sizes) -> str:
    return ", ".join(f"{s:g}" for s in sorted(sizes))


def _lr_curves(c_members: Sequence[RunSummary], axis: str) -> dict[float, dict[float, float]]:
    """size -> lr -> final loss, the mean over seeds; a seed that diverged, or blew up (ended above
    twice its initial loss: a finite but meaningless loss that would bend the quadratic fit of the
    optimum), makes the point diverged (NaN)."""
    points: dict[float, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in c_members:
        if s.loss_source != "unknown":
            points[s.size(axis)][s.lr].append(float("nan") if s.blew_up else s.final_loss)
    return {size: {lr: float(np.mean(v)) if all(math.isfinite(x) for x in v) else float("nan")
                   for lr, v in curve.items()} for size, curve in sorted(points.items())}


def _transfers(summaries: Sequence[RunSummary], problems: list[str]) -> list[tuple[dict[str, Any], Any]]:
    out = []
    for axis, (param, opt, fixed), members in _by_axis(summaries, lambda s: (s.parameterization, s.optimizer)):
        label = f"{param} / {opt}" + (f" / {_other(axis)} {fixed:g}" if fixed is not None else "")
        curves = _lr_curves(members, axis)
        blown = sorted(f"{s.size(axis):g}@{s.lr:g}" for s in members if s.blew_up)
        if blown:
            problems.append(f"{label}: {len(blown)} run(s) ended above twice their initial loss ({axis}@lr: "
                            f"{', '.join(blown)}): counted as diverged in the lr transfer")
        head = {"axis": axis, "parameterization": param, "optimizer": opt, "fixed": fixed}
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


def analyze_in_detail(summaries: Sequence[RunSummary]) -> tuple[dict[str, Any], list, list]:
    """:func:`analyze`'s metrics, plus what the figures need: ``(comparison, entry, {quantity:
    (trajectories, ConsistencyResult)})`` per comparison and ``(entry, (lr curves, TransferResult or
    None))`` per lr-transfer family."""
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
    return analyze_in_detail(summaries)[0]
