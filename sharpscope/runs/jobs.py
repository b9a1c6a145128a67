"""Offline spectrum jobs over the checkpoints of run files: local, process pool or Dask distributed.

A job is a list of tasks, one per (run file, checkpoint step); a task rebuilds the model from the
run's meta (trusted factory + JSON kwargs; no pickle: :mod:`.rebuild`), loads the checkpoint on the
settings' device, and measures the requested quantities (:mod:`.quantities`) on the stored batch.

Results go to a sibling file ``<run>.spectra.h5`` through one writer (the process that runs the
job), appended row by row in SWMR mode like the run file itself, so an interrupted job loses only
the tasks in flight and a re-run skips every (step, quantity, settings) already stored -- for this
run: every result carries the id of the run it was measured on, and a spectra file of another run
(the run file was replaced at the same path) is moved aside, never reused (docs/formats.md). A result's
settings key holds everything that changes it (the solver settings, a loss override, a non-CPU
device): results of one step under different settings coexist.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..closures import BatchLoss
from ..devices import resolve_device
from ..progress import progress_bar
from ..registry import allow_patterns
from .executors import executor_from_spec
from .quantities import QUANTITIES, Checkpoint, layer_groups
from .quantities import get as get_quantity
from .rebuild import NoOptimizerState, build_loss, check_trusted, model_at, optimizer_at
from .space import DiskFullError
from .spectra import ForeignSpectraError, SpectraFile, spectra_path
from .store import first_diverged_step, open_run
from .superseded import Aside

__all__ = ["QUANTITIES", "SpectrumSettings", "JobReport", "run_spectrum_job", "compute_task", "layer_groups"]



@dataclass(frozen=True)
class SpectrumSettings:
    """Solver settings; part of each result's identity (a re-run with other settings recomputes).

    ``loss`` overrides the run's own loss (a ``torch.nn`` name or a trusted ``"module:function"``);
    ``device`` is where the products run (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; runs captured
    on one device are measured on any other). Both enter a result's key only when they change it from
    the defaults, so results stored before they existed keep their keys."""

    k: int = 5
    tol: float = 1e-6
    seed: int = 0
    trace_matvecs: int = 99
    density_probes: int = 10
    density_steps: int = 80
    batchnorm: str = "batch"
    loss: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("k", "trace_matvecs", "density_probes", "density_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {self.tol!r}")
        if self.batchnorm not in ("batch", "eval"):
            raise ValueError(f"batchnorm must be 'batch' or 'eval', got {self.batchnorm!r}")

    def key(self, quantity: str) -> str:
        """Canonical JSON of the settings that matter for ``quantity`` (:mod:`.quantities`)."""
        return get_quantity(quantity).key(self)

    def extra_key(self) -> dict[str, Any]:
        """The settings that enter every key only when they are not the defaults: the loss, the device."""
        extra: dict[str, Any] = {}
        if self.loss:
            extra["loss"] = self.loss
        device = resolve_device(self.device)
        if device.type != "cpu":
            extra["device"] = device.type
        return extra


# -- one task ---------------------------------------------------------------------------------------------
def _load_checkpoint(run, step: int, quantities: Sequence[str], settings: SpectrumSettings,
                     allow: Sequence[str]) -> tuple[Checkpoint, str | None, str | None]:
    """The checkpoint's model, batch, loss and (for ``precond``) optimizer on the settings' device;
    plus why the optimizer is missing (an error message, or a not-applicable note)."""
    device = resolve_device(settings.device)
    model = model_at(run, step, allow=allow).to(device)
    batch = run.batch()
    if batch is None:
        raise ValueError(f"{run.path}: no batch stored (pass batch= to the Recorder)")
    optimizer, error, not_applicable = None, None, None
    if any(get_quantity(q).needs_optimizer for q in quantities):
        try:
            optimizer = optimizer_at(run, step, model, allow=allow)
        except NoOptimizerState as err:  # stored as an empty result: done, not a failure
            not_applicable = str(err)
        except ValueError as err:  # the other quantities still run
            error = str(err)
    loss_spec = settings.loss or run.meta.get("loss")
    loss_fn = None
    mapping = isinstance(batch, Mapping)  # a Hugging Face batch: every quantity needs the loss closure
    if mapping or any(get_quantity(q).needs_loss for q in quantities):
        loss_fn = build_loss(loss_spec, [*allow, *([settings.loss] if settings.loss and ":" in settings.loss else [])],
                             str(run.path))
    initial, initial_error = None, None
    if any(get_quantity(q).needs_initial for q in quantities):
        initial, initial_error = _initial_model(run, step, model, allow, device)
    if mapping:
        if not isinstance(loss_fn, BatchLoss):
            raise ValueError(f"{run.path}: the stored batch is a Mapping (keys {', '.join(list(batch)[:5])}) but the loss "
                             f"{loss_spec!r} is a criterion of (outputs, targets): name a loss closure, e.g. "
                             "--loss sharpscope.hf:causal_lm_loss")
        data = {k: v.to(device) for k, v in batch.items()}
        return Checkpoint(model, data, data, loss_fn, optimizer, settings, initial, initial_error), error, not_applicable
    inputs, targets = batch
    inputs = tuple(t.to(device) for t in inputs)
    inputs = inputs[0] if len(inputs) == 1 else inputs
    targets = targets.to(device) if targets is not None else None
    return Checkpoint(model, (inputs, targets), inputs, loss_fn, optimizer, settings, initial, initial_error), \
        error, not_applicable


def _initial_model(run, step: int, model, allow: Sequence[str], device) -> tuple[Any, str | None]:
    """The model at step 0 (the reference of ``alignment``), or why there is none (one line)."""
    steps = run.steps
    if 0 not in steps:
        first = f"its first checkpoint is step {steps[0]}" if steps else "it has no complete checkpoint"
        return None, (f"{run.path}: alignment needs the step-0 checkpoint (the initial weights), but {first}: "
                      "record from the start of training (the Recorder stores step 0 when it opens)")
    if step == 0:
        return model, None
    return model_at(run, 0, allow=allow).to(device), None


def compute_task(run_path: str, step: int, quantities: Sequence[str], settings: SpectrumSettings,
                 loss: str | None = None, allow: Sequence[str] = ()) -> list[dict]:
    """Measure ``quantities`` at one checkpoint (runs in a worker; returns plain, picklable dicts; a
    quantity that cannot be measured at this checkpoint comes back as ``{"error": ...}``). ``allow``:
    patterns of factory names trusted beyond the built-in ones (:mod:`sharpscope.registry`)."""
    if loss is not None:
        settings = replace(settings, loss=loss)
    with open_run(run_path) as run:
        checkpoint, optimizer_error, not_applicable = _load_checkpoint(run, step, quantities, settings, allow)
        run_id = run.id
    out = []
    for name in quantities:
        quantity = get_quantity(name)
        row = {"step": int(step), "quantity": name, "run_id": run_id}
        if quantity.needs_optimizer and optimizer_error:
            out.append({**row, "error": optimizer_error})
            continue
        if quantity.needs_optimizer and not_applicable:
            out.append({**row, "settings": quantity.key(settings), "values": np.zeros(0), "residuals": np.zeros(0),
                        "num_matvecs": 0, "seconds": 0.0, "info": json.dumps({"not_applicable": not_applicable})})
            continue
        t0 = time.perf_counter()
        try:
            m = quantity.measure(checkpoint)
        except ValueError as err:  # one quantity's refusal (e.g. k too large) does not stop the others
            out.append({**row, "error": str(err)})
            continue
        out.append({**row, "settings": quantity.key(settings), "values": np.asarray(m.values, dtype=np.float64),
                    "residuals": np.asarray(m.residuals, dtype=np.float64), "num_matvecs": int(m.num_matvecs),
                    "seconds": time.perf_counter() - t0, "info": json.dumps(m.info)})
    return out


# -- executors and the driver ---------------------------------------------------------------------------------
@dataclass
class JobReport:
    """What a job did: tasks run, results skipped (already stored), results written, checkpoints
    skipped because the run had diverged, results that do not apply (e.g. Adam's preconditioned
    sharpness before its first step; stored empty), failures (run, step, error message)."""

    computed: int = 0
    skipped: int = 0
    written: int = 0
    diverged: int = 0
    not_applicable: int = 0
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)



def run_spectrum_job(runs: Sequence[str | os.PathLike], quantities: Sequence[str] = ("hessian",),
                     settings: SpectrumSettings = SpectrumSettings(), executor: str = "local",
                     steps: Iterable[int] | None = None, loss: str | None = None, progress: bool = True,
                     allow_factories: Sequence[str] = ()) -> JobReport:
    """Measure ``quantities`` at every complete checkpoint of every run; skip what is stored already.

    Model factories, losses and optimizer classes named in the runs must be trusted
    (:mod:`sharpscope.registry`): sharpscope's own, registered ones, or those matching
    ``allow_factories`` (e.g. ``["mypkg.models:*"]``); any other run is refused before anything is
    imported."""
    allow = allow_patterns(allow_factories)  # a bad pattern is one line, before anything runs
    bad = [q for q in quantities if q not in QUANTITIES]
    if bad:
        raise ValueError(f"unknown quantities {bad}; choose from {', '.join(QUANTITIES)}")
    if not quantities:
        raise ValueError("nothing to measure: give at least one quantity")
    if loss is not None:
        settings = replace(settings, loss=loss)
    resolve_device(settings.device)  # a device that does not exist fails here, in one line
    report = JobReport()
    tasks = _plan_tasks(runs, quantities, settings, steps, allow, report)
    if tasks:
        _run_tasks(tasks, settings, executor, allow, progress, report)
    return report


def _plan_tasks(runs: Sequence[str | os.PathLike], quantities: Sequence[str], settings: SpectrumSettings,
                steps: Iterable[int] | None, allow: list[str], report: JobReport) -> list[tuple[str, int, list[str]]]:
    """``(run, step, quantities to measure)`` for every checkpoint with something missing; trust is checked
    here, before anything is imported; spectra files among the inputs are skipped with a note."""
    wanted_steps = None if steps is None else {int(s) for s in steps}
    results_files = [str(p) for p in runs if str(p).endswith(".spectra.h5")]
    if results_files:
        report.notes.append(f"{len(results_files)} spectra file(s) among the inputs ignored "
                            f"({Path(results_files[0]).name}{', ...' if len(results_files) > 1 else ''})")
    tasks = []
    for path in (str(Path(p)) for p in runs if not str(p).endswith(".spectra.h5")):
        with open_run(path) as run:
            # checkpoints from the diverged step on are meaningless (step 0, the initial model, stays)
            bad = first_diverged_step(run)
            run_steps = [s for s in run.steps if s == 0 or s < bad]
            report.diverged += len(run.steps) - len(run_steps)
            if not run.meta.get("model_factory"):
                raise ValueError(f"{path}: meta has no model_factory ('module:function'): the model cannot be rebuilt")
            check_trusted(run, allow, settings.loss)
            run_id = run.id
        done = _stored_keys(Path(path), run_id, report)
        for step in run_steps:
            if wanted_steps is not None and step not in wanted_steps:
                continue
            todo = [q for q in quantities if (step, q, settings.key(q)) not in done]
            report.skipped += len(quantities) - len(todo)
            if todo:
                tasks.append((path, step, todo))
    return tasks


def _stored_keys(path: Path, run_id: str | None, report: JobReport) -> set[tuple[int, str, str]]:
    """The results stored for this run. A spectra file of another run (docs/formats.md, "Belonging") is
    moved aside under its writer lock, with a note: its results are never taken for this run's."""
    results = spectra_path(path)
    if not results.exists():
        return set()
    try:
        with SpectraFile(results, run_id=run_id) as sf:
            return sf.keys()
    except ForeignSpectraError as err:
        reason = str(err).removeprefix(f"{results}: ")
    aside = Aside(path.parent, "sharpscope spectrum")
    moved = aside.move(results, f"{reason} at {path}")
    report.notes.append(f"{results.name}: {reason}: moved to {moved.parent}; this run is measured afresh")
    return set()


def _run_tasks(tasks: list[tuple[str, int, list[str]]], settings: SpectrumSettings, executor: str,
               allow: list[str], progress: bool, report: JobReport) -> None:
    """Run the tasks on the executor and store each result through its run's one writer.

    On a Dask cluster a task whose future fails is submitted once more, after the others: Dask retries a
    task that raised, but a worker killed mid-task can also surface as an error of the cluster's own
    machinery (e.g. an asyncio event bound to another loop) that no retry covered."""
    submit, shutdown, completed = executor_from_spec(executor)
    writers: dict[str, SpectraFile] = {}
    resubmit = executor.startswith(("dask-local:", "dask-cuda", "dask://", "tcp://"))
    try:
        bar = progress_bar(len(tasks), "spectra", progress, unit="ckpt")
        failed = _drain(submit, completed, tasks, settings, allow, writers, report, bar, keep_failed=resubmit)
        if failed:
            _drain(submit, completed, [t for t, _ in failed], settings, allow, writers, report, bar, keep_failed=False)
        bar.close()
    finally:
        for sf in writers.values():
            sf.close()
        shutdown()


def _drain(submit, completed, tasks, settings, allow, writers, report, bar, keep_failed: bool) -> list:
    """Submit ``tasks``, store their rows as they finish; failed futures are returned (``keep_failed``) or
    reported."""
    futures = {submit(compute_task, path, step, todo, settings, None, allow): (path, step, todo)
               for path, step, todo in tasks}
    failed = []
    for fut in completed(list(futures)):
        path, step, todo = futures[fut]
        try:
            rows = fut.result()
        except Exception as err:  # noqa: BLE001 - one failed checkpoint does not stop the job
            if keep_failed:
                failed.append(((path, step, todo), err))
                continue
            report.failures.append((path, step, f"{type(err).__name__}: {err}"))
        else:
            for row in rows:
                if "error" in row:
                    report.failures.append((path, step, f"{row['quantity']}: {row['error']}"))
                    continue
                try:
                    _store(writers, path, row)
                except ForeignSpectraError as err:  # the run file was replaced while the task ran
                    report.failures.append((path, step, f"{row['quantity']}: {err}"))
                    continue
                report.written += 1
                report.not_applicable += "not_applicable" in json.loads(row["info"])
            report.computed += 1
        bar.update(1)
    return failed


def _store(writers: dict[str, SpectraFile], path: str, row: dict) -> None:
    """Append one result through the run's one writer; a failed write (a full disk) stops the job with
    one line: the rows stored before it are complete and kept, a re-run continues from there."""
    results = spectra_path(path)
    try:
        # the writer writes for the run file at the path now; a row measured on another (a run replaced while
        # the job ran) is refused by append
        sf = writers.get(path)
        if sf is None:  # (not ``or``: a writer of an empty file has len() 0)
            sf = writers[path] = SpectraFile(results, "a")
        sf.append(row)
    except DiskFullError:
        raise  # one line already: the file, the free space, what is kept
    except OSError as err:
        reason = err.strerror or str(err).splitlines()[0]
        raise OSError(err.errno, f"{results}: results could not be written ({reason}); the results stored "
                                 "before are intact: free space and run again to continue") from None


