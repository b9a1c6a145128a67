"""Reading runs for the report: each run file's coordinates, losses and stored results as a :class:`RunSummary`.

:func:`collect` reads each run file's coordinates (parameterization, optimizer, lr, width, depth, the other
recorded axes, seed, probe), its training loss (first, last and the logged curve), the online sharpness the
Recorder logged, and the stored spectra; unreadable files, malformed metas and missing coordinates become
messages, never exceptions. Grouping and verdicts are :mod:`sharpscope.analysis.comparisons`.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..runs.quantities import get as get_quantity
from ..runs.spectra import SpectraFile, spectra_path
from ..runs.store import first_diverged_step, logged_losses, open_run
from .alignment import series_from_rows

__all__ = ["RunSummary", "LayerSharpness", "collect", "finite_number", "BLOWUP_FACTOR", "ONLINE_LOGS"]

BLOWUP_FACTOR = 2.0  # a run ending above this multiple of its initial loss blew up
# the Recorder's scalar logs the report draws for a run: the training loss and the online sharpness
# (capture.py: "sharpness_preconditioned" with its "eos_ratio", or the raw Hessian's "sharpness")
ONLINE_LOGS = ("loss", "sharpness_preconditioned", "eos_ratio", "sharpness")
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
    alignment: an :class:`~sharpscope.analysis.alignment.AlignmentSeries`) and its scalar logs
    (``logs``: name in :data:`ONLINE_LOGS` -> ``(steps, values)``, the non-empty ones) and the losses
    stored with its checkpoints."""

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
    logs: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    checkpoint_losses: tuple[list[int], list[float]] = ((), ())

    @property
    def loss_curve(self) -> tuple[list[int], list[float]]:
        """The training loss along training: the ``loss`` log where the run has one, else the losses stored
        with the checkpoints (NaN where the loop passed none)."""
        return self.logs.get("loss") or self.checkpoint_losses

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


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _axis_value(value: Any) -> Any:
    """An axis value as compared: numbers as floats, strings and booleans as they are."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    number = finite_number(value)
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
        "lr": finite_number(first(probe.get("lr"), user.get("lr"), run_axes.get("lr"),
                            _mapping(opt_meta.get("defaults")).get("lr"))),
        "width": finite_number(first(probe.get("width"), user.get("width"), run_axes.get("width"), kwargs.get("width"))),
        "depth": finite_number(first(probe.get("depth"), user.get("depth"), run_axes.get("depth"), kwargs.get("depth"))),
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


def _logs(run) -> dict[str, tuple[list[int], list[float]]]:
    """The run's scalar logs of :data:`ONLINE_LOGS` that hold values (a file without a log has none)."""
    out = {}
    for name in ONLINE_LOGS:
        try:
            steps, values = run.scalars(name)
        except (KeyError, AttributeError):
            continue
        if len(steps):
            out[name] = ([int(s) for s in steps], [float(v) for v in values])
    return out


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
                logs = _logs(run)
                losses = ([int(st) for st in steps], [float(run.loss(st)) for st in steps])
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
                             compare=c["compare"], logs=logs, checkpoint_losses=losses)
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


