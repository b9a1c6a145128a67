"""Offline spectrum jobs over the checkpoints of run files: local, process pool or Dask distributed.

A job is a list of tasks, one per (run file, checkpoint step); a task rebuilds the model from the
run's meta (``model_factory`` = ``"module:function"`` + JSON ``model_kwargs``; no pickle), loads the
checkpoint, and measures the requested quantities on the stored probe batch:

============  ===================================================================================
``hessian``   top-k Hessian eigenvalues (Lanczos, ``which="LA"``)
``precond``   top-k of the optimizer-preconditioned Hessian ``D^1/2 H D^1/2`` (info: its threshold)
``ggn``       top-k of the generalized Gauss-Newton matrix
``ntk``       top-k of the empirical NTK ``J J^T`` on the probe inputs
``trace``     Hessian trace by Hutch++ (values: [estimate], residuals: [stderr])
``density``   SLQ spectral density (values: nodes, residuals: weights; info: probes, steps)
``layers``    top Hessian eigenvalue of each parameter-owning module (values in ``info["layers"]`` order)
============  ===================================================================================

Results go to a sibling file ``<run>.spectra.h5`` through one writer (the process that runs the
job), appended row by row in SWMR mode like the run file itself, so an interrupted job loses only
the tasks in flight and a re-run skips every (step, quantity, settings) already stored.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from torch import nn

from .executors import executor_from_spec
from .rebuild import NoOptimizerState, allowed_by_probe, build_loss, check_trusted, model_at, optimizer_at
from .spectra import SpectraFile, spectra_path
from .store import first_diverged_step, open_run

__all__ = ["QUANTITIES", "SpectrumSettings", "JobReport", "run_spectrum_job", "compute_task", "layer_groups"]

QUANTITIES = ("hessian", "precond", "ggn", "ntk", "trace", "density", "layers")


@dataclass(frozen=True)
class SpectrumSettings:
    """Solver settings; part of each result's identity (a re-run with other settings recomputes)."""

    k: int = 5
    tol: float = 1e-6
    seed: int = 0
    trace_matvecs: int = 99
    density_probes: int = 10
    density_steps: int = 80
    batchnorm: str = "batch"

    def key(self, quantity: str) -> str:
        """Canonical JSON of the settings that matter for ``quantity``."""
        relevant = {"seed": self.seed, "batchnorm": self.batchnorm}
        if quantity in ("hessian", "precond", "ggn", "ntk", "layers"):
            relevant.update(k=self.k if quantity != "layers" else 1, tol=self.tol)
        elif quantity == "trace":
            relevant.update(matvecs=self.trace_matvecs)
        elif quantity == "density":
            relevant.update(probes=self.density_probes, steps=self.density_steps)
        return json.dumps(relevant, sort_keys=True)



# -- one task ---------------------------------------------------------------------------------------------
def compute_task(run_path: str, step: int, quantities: Sequence[str], settings: SpectrumSettings,
                 loss: str | None = None, allow: Sequence[str] = ()) -> list[dict]:
    """Measure ``quantities`` at one checkpoint (runs in a worker; returns plain, picklable dicts; a
    quantity that cannot be measured at this checkpoint comes back as ``{"error": ...}``). ``allow``:
    patterns of factory names trusted beyond the built-in ones (:mod:`sharpscope.registry`)."""
    from ..estimators import hutchpp_trace, spectral_density
    from ..lanczos import lanczos
    from ..operators import ggn_operator, hessian_operator, ntk_operator
    from ..preconditioning import preconditioned_hessian_operator

    with open_run(run_path) as run:
        model = model_at(run, step, allow=allow)
        probe = run.batch()
        optimizer, optimizer_error, not_applicable = None, None, None
        if "precond" in quantities:
            try:
                optimizer = optimizer_at(run, step, model, allow=allow)
            except NoOptimizerState as err:  # stored as an empty result: done, not a failure
                not_applicable = str(err)
            except ValueError as err:  # the others still run
                optimizer_error = str(err)
        loss_spec = loss or run.meta.get("loss")
        loss_allow = [*allow, *allowed_by_probe(run.meta), *([loss] if loss else [])]
    if probe is None:
        raise ValueError(f"{run_path}: no batch stored (pass batch= to the Recorder)")
    inputs, targets = probe
    inputs = inputs[0] if len(inputs) == 1 else inputs
    data = (inputs, targets)
    loss_fn = build_loss(loss_spec, loss_allow, run_path) if any(q != "ntk" for q in quantities) else None
    common = dict(batchnorm=settings.batchnorm)
    out = []
    for q in quantities:
        if q == "precond" and optimizer_error:
            out.append({"step": int(step), "quantity": q, "error": optimizer_error})
            continue
        if q == "precond" and not_applicable:
            out.append({"step": int(step), "quantity": q, "settings": settings.key(q), "values": np.zeros(0),
                        "residuals": np.zeros(0), "num_matvecs": 0, "seconds": 0.0,
                        "info": json.dumps({"not_applicable": not_applicable})})
            continue
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if q in ("hessian", "ggn", "ntk", "precond"):
            if q == "hessian":
                op = hessian_operator(model, loss_fn, data, **common)
            elif q == "ggn":
                op = ggn_operator(model, loss_fn, data, **common)
            elif q == "ntk":
                op = ntk_operator(model, inputs, **common)
            else:
                op = preconditioned_hessian_operator(model, loss_fn, data, optimizer, **common)
                info["threshold"] = op.threshold
            k = min(settings.k, op.shape[0] - 1)
            res = lanczos(op, k=k, tol=settings.tol, seed=settings.seed)
            values, residuals, mv = res.eigenvalues.numpy(), res.residuals.numpy(), res.num_matvecs
            info["converged"] = res.converged.tolist()
        elif q == "trace":
            est = hutchpp_trace(hessian_operator(model, loss_fn, data, **common), settings.trace_matvecs,
                                seed=settings.seed)
            values, residuals, mv = np.array([est.estimate]), np.array([est.stderr]), est.num_matvecs
        elif q == "density":
            dens = spectral_density(hessian_operator(model, loss_fn, data, **common), settings.density_probes,
                                    settings.density_steps, seed=settings.seed)
            values, residuals, mv = np.concatenate(dens.nodes), np.concatenate(dens.weights), dens.num_matvecs
            info["nodes_per_probe"] = [len(n) for n in dens.nodes]
        elif q == "layers":
            groups = layer_groups(model)
            layers = list(groups)
            vals, mv = [], 0
            for name in layers:
                op = hessian_operator(model, loss_fn, data, params=groups[name], **common)
                res = lanczos(op, k=1, tol=settings.tol, seed=settings.seed) if op.shape[0] > 1 else None
                vals.append(float(res.eigenvalues[0]) if res is not None else float(op.to_dense()[0, 0]))
                mv += res.num_matvecs if res is not None else 1
            values, residuals = np.array(vals), np.zeros(len(vals))
            info["layers"] = layers
        else:
            raise ValueError(f"unknown quantity {q!r}; choose from {QUANTITIES}")
        out.append({"step": int(step), "quantity": q, "settings": settings.key(q),
                    "values": np.asarray(values, dtype=np.float64), "residuals": np.asarray(residuals, dtype=np.float64),
                    "num_matvecs": int(mv), "seconds": time.perf_counter() - t0, "info": json.dumps(info)})
    return out


_PARAMETRIZED = re.compile(r"(?:^|\.)parametrizations\.")  # torch.nn.utils.parametrize's inserted path


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Trainable parameter names grouped by the layer (module) that owns them, in model order; a
    parameter under ``torch.nn.utils.parametrize`` (``layer.parametrizations.weight.original``, as muP
    multipliers are applied) belongs to ``layer``, not to the parametrization's internal module."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = _PARAMETRIZED.split(name)[0] if _PARAMETRIZED.search(name) else name.rpartition(".")[0]
        groups.setdefault(owner or "(top level)", []).append(name)
    return groups



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



def run_spectrum_job(runs: Sequence[str | os.PathLike], quantities: Sequence[str] = ("hessian",),
                     settings: SpectrumSettings = SpectrumSettings(), executor: str = "local",
                     steps: Iterable[int] | None = None, loss: str | None = None, progress: bool = True,
                     allow_factories: Sequence[str] = ()) -> JobReport:
    """Measure ``quantities`` at every complete checkpoint of every run; skip what is stored already.

    Model factories, losses and optimizer classes named in the runs must be trusted
    (:mod:`sharpscope.registry`): sharpscope's own, registered ones, or those matching
    ``allow_factories`` (e.g. ``["mypkg.models:*"]``); any other run is refused before anything is
    imported."""
    allow = list(allow_factories)
    bad = [q for q in quantities if q not in QUANTITIES]
    if bad:
        raise ValueError(f"unknown quantities {bad}; choose from {', '.join(QUANTITIES)}")
    if not quantities:
        raise ValueError("nothing to measure: give at least one quantity")
    wanted_steps = None if steps is None else {int(s) for s in steps}
    tasks: list[tuple[str, int, list[str]]] = []
    report = JobReport()
    for path in runs:
        path = str(Path(path))
        with open_run(path) as run:
            # checkpoints from the diverged step on are meaningless (step 0, the initial model, stays)
            bad = first_diverged_step(run)
            run_steps = [s for s in run.steps if s == 0 or s < bad]
            report.diverged += len(run.steps) - len(run_steps)
            if not run.meta.get("model_factory"):
                raise ValueError(f"{path}: meta has no model_factory ('module:function'): the model cannot be rebuilt")
            check_trusted(run, allow, loss)
        done = set()
        if spectra_path(path).exists():
            with SpectraFile(spectra_path(path)) as sf:
                done = sf.keys()
        for step in run_steps:
            if wanted_steps is not None and step not in wanted_steps:
                continue
            todo = [q for q in quantities if (step, q, settings.key(q)) not in done]
            report.skipped += len(quantities) - len(todo)
            if todo:
                tasks.append((path, step, todo))
    if not tasks:
        return report
    submit, shutdown, completed = executor_from_spec(executor)
    writers: dict[str, SpectraFile] = {}
    try:
        futures = {submit(compute_task, path, step, todo, settings, loss, allow): (path, step)
                   for path, step, todo in tasks}
        bar = _progress(len(futures), progress)
        for fut in completed(list(futures)):
            path, step = futures[fut]
            try:
                rows = fut.result()
            except Exception as err:  # noqa: BLE001 - one failed checkpoint does not stop the job
                report.failures.append((path, step, f"{type(err).__name__}: {err}"))
            else:
                for row in rows:
                    if "error" in row:
                        report.failures.append((path, step, f"{row['quantity']}: {row['error']}"))
                        continue
                    sf = writers.get(path) or writers.setdefault(path, SpectraFile(spectra_path(path), "a"))
                    sf.append(row)
                    report.written += 1
                    report.not_applicable += "not_applicable" in json.loads(row["info"])
                report.computed += 1
            bar.update(1)
        bar.close()
    finally:
        for sf in writers.values():
            sf.close()
        shutdown()
    return report


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="spectra", unit="ckpt", disable=not enabled)
