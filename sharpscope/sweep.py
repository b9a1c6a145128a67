"""Sweeps: :func:`run_sweep` trains every run of a probe file's grid with a :class:`~sharpscope.Recorder`,
measures the spectra and writes the report. The probe-file format is :mod:`sharpscope.probe_file`.

Runs are files ``runs/<parameterization>-<optimizer>-w<width>[-d<depth>]-lr<lr>[-<axis><value>...]-s<seed>.h5``
under the output folder (with a remote ``dask://`` cluster the workers must see that folder: a shared
file system); every varied setting is in the name and, with the compared axis, in the run's meta.
A run whose file holds its final step (or stopped at a diverged, non-finite loss) is complete and
skipped on a re-run; an incomplete one (interrupted) is trained again from scratch (training is
deterministic for a seed). Spectra are resumable the same way (see :mod:`sharpscope.runs.jobs`).

Nothing stored is deleted: a stored file the sweep will not reuse (another config, interrupted,
unreadable, not a sharpscope run, a later format) is moved with its spectra to
``runs/superseded/<stamp>/`` with a note (:mod:`sharpscope.runs.superseded`). A sweep holds a lock on
its output folder for its whole run; a second sweep on the same folder refuses, naming the holder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import load as load_data
from .devices import resolve_device
from .models import build_model
from .optim import build_optimizer
from .param import parametrize
from .probe_file import Probe, RunSpec, load_probe, plan, run_values, settings_of
from .progress import progress_bar
from .registry import allowances
from .runs.capture import Recorder
from .runs.executors import executor_from_spec
from .runs.h5file import NotSharpscopeFileError, UnsupportedVersionError
from .runs.jobs import JobReport, SpectrumSettings, run_spectrum_job
from .runs.locks import Lock, LockHeldError, folder_lock_file
from .runs.provenance import config_digest
from .runs.rebuild import build_loss
from .runs.spectra import spectra_path
from .runs.store import RunFileError, first_diverged_step, open_run
from .runs.superseded import Aside

__all__ = ["Probe", "RunSpec", "load_probe", "plan", "train_run", "run_sweep", "run_config", "SweepResult",
           "summary_rows"]


def _optimizer_kwargs(probe: Probe, spec: RunSpec) -> dict[str, Any]:
    """The optimizer's constructor keywords: ``[train] optimizer_kwargs`` and the run's optimizer axes
    (``beta1``/``beta2`` become ``betas``; under Muon, Adam's keywords go to its AdamW)."""
    kwargs = {**probe.optimizer_kwargs, **settings_of(probe, spec, "optimizer")}
    if "beta1" in kwargs or "beta2" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1", 0.9), kwargs.pop("beta2", 0.999))
    if spec.optimizer == "muon":
        adam = {k: kwargs.pop(k) for k in ("eps", "betas") if k in kwargs}
        if adam:
            kwargs["adamw_kwargs"] = adam
    return kwargs


def _steps(probe: Probe, spec: RunSpec) -> int:
    return spec.value("steps", probe.steps)


def run_config(probe: Probe, spec: RunSpec) -> dict[str, Any]:
    """The run's resolved config: everything that decides what training produces (model factory and
    kwargs, data, parameterization and its options, optimizer and its hyper-parameters, schedule,
    steps, seed). It is stored in the run's provenance record; a re-run reuses a stored run only when
    this config matches (:func:`~sharpscope.runs.provenance.config_digest`). The probe's name,
    description and measurement settings are not part of it: they do not change the run."""
    kwargs = {**probe.kwargs, probe.width_key: spec.width, **settings_of(probe, spec, "model")}
    if spec.depth is not None:
        kwargs[probe.depth_key] = spec.depth
    return {"model": {"factory": probe.factory, "kwargs": kwargs},
            "data": {"name": probe.data, "kwargs": {**probe.data_kwargs, **settings_of(probe, spec, "data")},
                     "batch": probe.probe_size},
            "parameterization": {"name": spec.parameterization, "base_width": probe.base_width or min(probe.widths),
                                 "options": _parametrize_options(probe, spec)},
            "optimizer": {"name": spec.optimizer, "lr": spec.lr, "kwargs": _jsonable(_optimizer_kwargs(probe, spec))},
            "loss": probe.loss, "steps": _steps(probe, spec), "batch_size": spec.value("batch_size", probe.batch_size),
            "schedule": {"every": probe.every, "last": True}, "seed": spec.seed,
            **({"device": resolve_device(probe.device).type} if resolve_device(probe.device).type != "cpu" else {})}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _parametrize_options(probe: Probe, spec: RunSpec) -> dict[str, Any]:
    return {"depth_scaling": probe.depth_scaling, "base_depth": probe.base_depth,
            **probe.parametrize_kwargs, **settings_of(probe, spec, "parametrize")}


def _run_state(path: Path, config: dict[str, Any], final: int) -> str:
    """What a stored run is to this sweep: ``missing``, ``complete`` (same config, done or diverged),
    ``interrupted`` (same config, not done), ``different`` (another config), ``unrecorded`` (an older file
    without a config record, done: reused by its name), ``unreadable``, ``foreign`` (not a sharpscope run)
    or ``future`` (a format this sharpscope does not read). Every state but ``missing``, ``complete`` and
    ``unrecorded`` moves the file aside (:func:`_stored_run`)."""
    return _stored_run(path, config, final)[0]


def _stored_run(path: Path, config: dict[str, Any], final: int) -> tuple[str, str]:
    """``(state, why)``: :func:`_run_state` and, for a file that is moved aside, the reason in its note."""
    if not path.exists():
        return "missing", ""
    try:
        with open_run(path) as run:
            steps = run.steps
            done = bool(steps) and (steps[-1] == final or first_diverged_step(run) < math.inf)
            stored = (run.provenance or {}).get("config_digest")
    except NotSharpscopeFileError as err:
        return "foreign", f"not a sharpscope run file ({_reason(err, path)})"
    except UnsupportedVersionError as err:
        return "future", f"written by a later sharpscope ({_reason(err, path)})"
    except (RunFileError, OSError, KeyError) as err:
        return "unreadable", f"cannot be read ({_reason(err, path)}): trained again"
    if stored is None:
        return ("unrecorded", "") if done else ("interrupted", f"interrupted at step {steps[-1] if steps else 0} "
                                                               f"of {final}: trained again from scratch")
    if stored != config_digest(config):
        return "different", (f"a run of another config (the probe file changed: digest {stored[:19]}..., this "
                             f"sweep's {config_digest(config)[:19]}...): trained again")
    if done:
        return "complete", ""
    return "interrupted", f"interrupted at step {steps[-1] if steps else 0} of {final}: trained again from scratch"


def _reason(err: Exception, path: Path) -> str:
    return str(err).splitlines()[0].removeprefix(f"{path}: ") if str(err) else type(err).__name__


def _set_aside(aside: Aside, path: Path, why: str) -> Path:
    """Move a stored run and its spectra file aside with the same reason (never deleted)."""
    moved = aside.move(path, why)
    results = spectra_path(path)
    if results.exists():
        aside.move(results, f"the results of {path.name}, moved with it: {why}")
    return moved


def train_run(probe: Probe, spec: RunSpec, out_dir: str | Path) -> Path:
    """Train one run of the grid into ``out_dir/runs/``. A stored complete run of the same config is
    kept; :func:`run_sweep` has moved aside stored runs of another config before."""
    path = Path(out_dir) / "runs" / spec.filename
    config = run_config(probe, spec)
    final, batch_size = config["steps"], config["batch_size"]
    state, why = _stored_run(path, config, final)
    if state in ("complete", "unrecorded"):
        return path
    if state != "missing":  # run_sweep has done this before; a direct call keeps the file the same way
        _set_aside(Aside(path.parent, "sharpscope.sweep.train_run"), path, why)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(probe.device)
    x, y = load_data(probe.data, **config["data"]["kwargs"])
    x, y = x.to(device), y.to(device)
    kwargs = config["model"]["kwargs"]
    torch.manual_seed(spec.seed)
    model = build_model(probe.factory, kwargs)
    groups = parametrize(model, spec.parameterization, optimizer=spec.optimizer, lr=spec.lr,
                         base_width=config["parameterization"]["base_width"], seed=spec.seed,
                         **_parametrize_options(probe, spec))
    model.to(device)  # after parametrize: its init is drawn on the CPU, the same numbers on every device
    opt = build_optimizer(groups, **_optimizer_kwargs(probe, spec))
    loss_fn = build_loss(probe.loss, allow=[probe.loss])
    axes = run_values(probe, spec)
    meta = {"model_factory": probe.factory, "model_kwargs": kwargs, "parameterization": groups.record,
            "seed": spec.seed, "loss": probe.loss,
            "probe": {"name": probe.name, **axes, "depth": spec.depth, "steps": final,
                      "axes": {a.name: spec.value(a.name) for a in probe.axes}, "compare": probe.compare,
                      "file": probe.file, "sha256": probe.sha256}}  # provenance only: it grants no trust
    gen = torch.Generator().manual_seed(spec.seed)
    with Recorder(path, model, opt, batch=(x[: probe.probe_size], y[: probe.probe_size]),
                  schedule=lambda s: s % probe.every == 0 or s == final, meta=meta, loss_fn=loss_fn,
                  config=config, axes={k: v for k, v in axes.items() if k != "seed"}) as rec:
        for _ in range(final):
            if batch_size:
                idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen).to(device)
                xb, yb = x[idx], y[idx]
            else:
                xb, yb = x, y
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            if not torch.isfinite(loss):
                rec.log_loss(float(loss.detach()))  # the diverged loss, logged and with a final checkpoint
                rec.capture(loss=float(loss.detach()))
                break
            if rec.step_count == 0:  # the initial model's loss: the reference for "blew up"
                rec.log_loss(float(loss.detach()), step=0)
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return path


@dataclass
class SweepResult:
    """The run files of a sweep, the spectrum job's report, the written report.html and what the
    sweep did with stored runs (``notes``: reused without a record, moved aside)."""

    probe: Probe
    runs: list[Path]
    trained: int
    spectra: JobReport
    report: Path
    notes: list[str] = field(default_factory=list)


def _plan_training(probe: Probe, specs: list[RunSpec], runs_dir: Path) -> tuple[list[RunSpec], list[str]]:
    """Which runs to train, after moving aside (never deleting) every stored run the sweep will not reuse."""
    todo, notes, unrecorded = [], [], []
    aside = Aside(runs_dir, "sharpscope sweep")
    counts: dict[str, int] = {}
    for spec in specs:
        path = runs_dir / spec.filename
        state, why = _stored_run(path, run_config(probe, spec), _steps(probe, spec))
        if state == "unrecorded":
            unrecorded.append(path.name)
        elif state not in ("missing", "complete"):
            _set_aside(aside, path, why)
            counts[state] = counts.get(state, 0) + 1
        if state not in ("complete", "unrecorded"):
            todo.append(spec)
    labels = {"different": "came from another config (the probe file changed)", "interrupted": "were interrupted",
              "unreadable": "could not be read", "foreign": "are not sharpscope run files",
              "future": "are in a later sharpscope's format"}
    for state, n in counts.items():
        notes.append(f"{n} stored run(s) {labels[state]}: kept in {aside.target} (with their spectra; reasons in "
                     f"NOTES.txt) and trained again")
    if unrecorded:
        notes.append(f"{len(unrecorded)} stored run(s) have no config record (an older sharpscope): reused by "
                     f"their name ({unrecorded[0]}{', ...' if len(unrecorded) > 1 else ''})")
    return todo, notes


def _lock_output(out: Path) -> Lock:
    """The sweep's lock on its output folder (:mod:`sharpscope.runs.locks`); a second sweep refuses in one line."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        return Lock(folder_lock_file(out, "sweep")).acquire()
    except LockHeldError as err:
        raise RunFileError(f"{out}: another sweep is running in this folder ({err.holder}): wait for it to finish "
                           "or choose another --out") from None


def run_sweep(probe_path: str | Path, out_dir: str | Path, *, executor: str | None = None,
              progress: bool = True) -> SweepResult:
    """Train the probe's grid (reusing stored runs of the same config, moving aside those of another),
    measure its spectra (skipping stored ones) and write the report (``out_dir/report.html``,
    ``report.md``, ``metrics.json``, ``figures/``).

    ``executor`` (default: the probe's) runs both the training runs and the spectrum tasks: ``local``
    one after the other, ``process:N`` / ``dask-local:N`` / ``dask://HOST:PORT`` in parallel."""
    probe = load_probe(probe_path)
    allow = allowances(probe.factory, probe.loss)  # the user's probe trusts its own names, for its own jobs
    executor = executor or probe.executor
    out = Path(out_dir).resolve()  # workers of a remote cluster do not share our working directory
    with _lock_output(out):
        return _sweep_locked(probe, probe_path, out, executor, progress, allow)


def _sweep_locked(probe: Probe, probe_path: str | Path, out: Path, executor: str, progress: bool,
                  allow: list[str]) -> SweepResult:
    specs = plan(probe)
    todo, notes = _plan_training(probe, specs, out / "runs")
    if todo:
        submit, shutdown, completed = executor_from_spec(executor)
        try:
            futures = [submit(train_run, probe, spec, out) for spec in todo]
            bar = progress_bar(len(futures), f"train {probe.name}", progress, unit="run")
            for fut in completed(futures):
                fut.result()  # a failed run stops the sweep with its error (its file is retrained next time)
                bar.update(1)
            bar.close()
        finally:
            shutdown()
    runs = [out / "runs" / s.filename for s in specs]
    settings = SpectrumSettings(k=probe.k, device=probe.device)
    report = run_spectrum_job(runs, probe.quantities, settings, executor=executor, progress=progress,
                              allow_factories=allow)
    notes += report.notes
    from .analysis.report import write_report

    page = write_report(runs, out, title=f"sharpscope: {probe.name}", compare=probe.compare,
                        settings={"probe": str(probe_path), "description": probe.description,
                                  "expected": probe.expected, "source": probe.source}, expect=probe.expect)
    return SweepResult(probe, runs, len(todo), report, page, notes)


def summary_rows(result: SweepResult) -> list[dict]:
    """Per run and quantity: the top value at the first and last measured checkpoint."""
    from .runs.spectra import SpectraFile

    rows = []
    for path in result.runs:
        results = spectra_path(path)
        if not results.exists():
            continue
        with SpectraFile(results) as sf:
            for quantity in result.probe.quantities:
                measured = [r for r in sf.rows(quantity) if len(r["values"])]
                if measured:
                    rows.append({"run": path.stem, "quantity": quantity, "first_step": measured[0]["step"],
                                 "first": float(measured[0]["values"][0]), "last_step": measured[-1]["step"],
                                 "last": float(measured[-1]["values"][0])})
    return rows


def _sweep_command(args) -> int:
    result = run_sweep(args.probe, args.out, executor=args.executor, progress=not args.quiet)
    rows = summary_rows(result)
    if rows:
        name_width = max(len(r["run"]) for r in rows)
        print(f"{'run':<{name_width}}  {'quantity':<9} {'first (step)':>18} {'last (step)':>18}")
        for r in rows:
            print(f"{r['run']:<{name_width}}  {r['quantity']:<9} {r['first']:>11.4g} ({r['first_step']:>4}) "
                  f"{r['last']:>11.4g} ({r['last_step']:>4})")
    print(f"{result.probe.name}: {len(result.runs)} runs ({result.trained} trained now) in {Path(args.out) / 'runs'}; "
          f"spectra: {result.spectra.computed} checkpoints measured, {result.spectra.skipped} already stored, "
          f"{result.spectra.diverged} diverged checkpoints skipped"
          + (f", {result.spectra.not_applicable} results not applicable (e.g. Adam's preconditioner before "
             f"its first step)" if result.spectra.not_applicable else ""))
    for path, step, message in result.spectra.failures:
        print(f"FAILED {path} step {step}: {message}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {result.report}")
    return 1 if result.spectra.failures else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="train a probe's grid and measure its spectra",
                              description="Run a probe file (see probes/): train the width x lr x "
                                          "parameterization x optimizer x seed grid with a Recorder, then "
                                          "measure the spectra. Complete runs and stored spectra are skipped.")
    p.add_argument("probe", type=Path, metavar="PROBE.toml")
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/ and results)")
    p.add_argument("--executor", help="override the probe's executor (local, process:N, dask-local:N, dask://...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_sweep_command)
