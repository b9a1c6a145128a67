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

import importlib
import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import h5py
import numpy as np
import torch
from torch import nn

from .models import build_model, resolve_factory
from .store import FORMAT_VERSION, H5Handle, RunFileError, WriterLock, _open_for_reading, open_run

__all__ = ["QUANTITIES", "SpectrumSettings", "run_spectrum_job", "SpectraFile", "spectra_path", "build_loss",
           "model_at"]

QUANTITIES = ("hessian", "precond", "ggn", "ntk", "trace", "density", "layers")
_SPECTRA_FORMAT = "sharpscope.spectra"


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


# -- rebuilding models without pickle ---------------------------------------------------------------
def build_loss(spec: str | None) -> Callable:
    """A loss from its name in ``torch.nn`` (``"CrossEntropyLoss"``) or a ``"module:function"`` factory."""
    if not spec:
        raise ValueError("the run's meta names no loss: pass loss= (a torch.nn loss name or 'module:function')")
    if ":" in spec:
        return resolve_factory(spec)()
    if not hasattr(nn, spec):
        raise ValueError(f"unknown loss {spec!r}: not in torch.nn; give 'module:function'")
    return getattr(nn, spec)()


def model_at(run, step: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The run's model rebuilt from its meta (factory + kwargs, then the recorded parameterization's
    forward multipliers, without re-initializing) with the checkpoint at ``step`` loaded."""
    meta = run.meta
    if not meta.get("model_factory"):
        raise ValueError(f"{run.path}: meta has no model_factory ('module:function'): the model cannot be "
                         "rebuilt offline; pass meta={'model_factory': ..., 'model_kwargs': ...} to the Recorder")
    model = build_model(meta["model_factory"], meta.get("model_kwargs"))
    if meta.get("parameterization"):
        from .param import parametrize_from_record

        parametrize_from_record(model, meta["parameterization"])
    state = {**run.params(step), **run.buffers(step)}
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in state.items():
        if name not in expected:
            raise RunFileError(f"{run.path}: checkpoint tensor {name} does not exist in the rebuilt model")
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise RunFileError(f"{run.path}: checkpoint tensor {name} has shape {tuple(tensor.shape)} but the "
                               f"rebuilt model's has {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
    return model.to(dtype) if dtype is not None else model


class NoOptimizerState(ValueError):
    """The checkpoint precedes the optimizer's first step (e.g. Adam at step 0): 'precond' does not apply."""


def _optimizer_at(run, step: int, model: nn.Module) -> torch.optim.Optimizer:
    """Rebuild the optimizer (class, groups, hyper-parameters) and load its state at ``step``."""
    info = run.meta.get("optimizer")
    if not info:
        raise ValueError(f"{run.path}: no optimizer recorded: 'precond' needs the Recorder's optimizer=")
    module_name, _, cls_name = info["class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    params = dict(model.named_parameters())
    groups = []
    for g in info["param_groups"]:
        hyper = {k: (tuple(v) if isinstance(v, list) else v) for k, v in g.items() if k != "params"}
        groups.append({**hyper, "params": [params[n] for n in g["params"]]})
    defaults = {k: (tuple(v) if isinstance(v, list) else v) for k, v in info["defaults"].items()}
    opt = cls(groups, **{k: v for k, v in defaults.items() if k in ("lr",)})
    opt.defaults.update(defaults)
    for name, st in run.optimizer_state(step).items():
        if any(torch.isnan(v).any() for v in st.values()):
            raise NoOptimizerState(f"no optimizer state at step {step}: the optimizer had not stepped yet, "
                                   f"its preconditioner is undefined")
        opt.state[params[name]] = dict(st)
    return opt


# -- one task ---------------------------------------------------------------------------------------------
def compute_task(run_path: str, step: int, quantities: Sequence[str], settings: SpectrumSettings,
                 loss: str | None = None) -> list[dict]:
    """Measure ``quantities`` at one checkpoint (runs in a worker; returns plain, picklable dicts; a
    quantity that cannot be measured at this checkpoint comes back as ``{"error": ...}``)."""
    from .estimators import hutchpp_trace, spectral_density
    from .lanczos import lanczos
    from .operators import ggn_operator, hessian_operator, ntk_operator
    from .preconditioning import preconditioned_hessian_operator

    with open_run(run_path) as run:
        model = model_at(run, step)
        probe = run.probe()
        optimizer, optimizer_error, not_applicable = None, None, None
        if "precond" in quantities:
            try:
                optimizer = _optimizer_at(run, step, model)
            except NoOptimizerState as err:  # stored as an empty result: done, not a failure
                not_applicable = str(err)
            except ValueError as err:  # the others still run
                optimizer_error = str(err)
        loss_spec = loss or run.meta.get("loss")
    if probe is None:
        raise ValueError(f"{run_path}: no probe batch stored (pass probe= to the Recorder)")
    inputs, targets = probe
    inputs = inputs[0] if len(inputs) == 1 else inputs
    data = (inputs, targets)
    loss_fn = build_loss(loss_spec) if any(q != "ntk" for q in quantities) else None
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


# -- the results file ----------------------------------------------------------------------------------------
def logged_losses(run) -> tuple[np.ndarray, np.ndarray]:
    """The run's ``loss`` scalar log as ``(steps, values)`` (empty for files without one)."""
    try:
        return run.scalars("loss")
    except KeyError:
        return np.zeros(0), np.zeros(0)


def first_diverged_step(run) -> float:
    """The first step whose recorded training loss is NaN/inf -- the run diverged there -- or inf.

    Two records count: the ``loss`` scalar log (sweeps log the loss of the step that diverged, a
    framework callback its logged losses) and the checkpoints' losses, the latter only when the loop
    passed losses at all (some checkpoint after step 0 has a finite one): a loop that never passed a
    loss leaves NaN there, which means "unknown", not "diverged"."""
    bad = [float(s) for s, v in zip(*logged_losses(run)) if not math.isfinite(v)]
    checkpoints = [(s, run.loss(s)) for s in run.steps if s > 0]
    if any(math.isfinite(v) for _, v in checkpoints):
        bad += [float(s) for s, v in checkpoints if not math.isfinite(v)]
    return min(bad, default=math.inf)


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


def spectra_path(run_path: str | os.PathLike) -> Path:
    p = Path(run_path)
    return p.with_name(p.stem + ".spectra.h5")


_STR = h5py.string_dtype()
_VLEN = h5py.vlen_dtype(np.float64)
_COLUMNS = {"step": "i8", "quantity": _STR, "settings": _STR, "values": _VLEN, "residuals": _VLEN,
            "num_matvecs": "i8", "seconds": "f8", "info": _STR, "complete": "u1"}


class SpectraFile(H5Handle):
    """The results of spectrum jobs for one run: an append-only SWMR table, one writer."""

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        self.path = Path(path)
        if mode == "a":
            self._lock = WriterLock(self.path)
            if not self.path.exists():
                tmp = self.path.with_name(self.path.name + ".creating")
                with h5py.File(tmp, "w", libver="latest") as f:
                    f.attrs["format"] = _SPECTRA_FORMAT
                    f.attrs["format_version"] = FORMAT_VERSION
                    for name, dtype in _COLUMNS.items():
                        f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
                os.replace(tmp, self.path)
            else:
                self._recover()
            self._file = h5py.File(self.path, "r+", libver="latest")
            self._file.swmr_mode = True
        else:
            self._file = _open_for_reading(self.path)
        if self._file.attrs.get("format") != _SPECTRA_FORMAT:
            self._file.close()
            raise RunFileError(f"{self.path}: not a sharpscope spectra file")

    def _recover(self) -> None:
        """After a crashed writer HDF5 refuses write access: copy the complete rows into a fresh file."""
        try:
            h5py.File(self.path, "r+", libver="latest").close()
            return
        except OSError:
            pass
        tmp = self.path.with_name(self.path.name + ".recovering")
        with _open_for_reading(self.path) as src, h5py.File(tmp, "w", libver="latest") as dst:
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            n = src["complete"].shape[0]
            for name, dtype in _COLUMNS.items():
                ds = dst.create_dataset(name, shape=(n,), maxshape=(None,), dtype=dtype, chunks=(256,))
                if n:
                    ds[:] = src[name][:n]
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        return int(self._file["complete"].shape[0])

    def keys(self) -> set[tuple[int, str, str]]:
        n = len(self)
        steps = self._file["step"][:n]
        qs = self._file["quantity"].asstr()[:n]
        ss = self._file["settings"].asstr()[:n]
        return {(int(a), str(b), str(c)) for a, b, c in zip(steps, qs, ss)}

    def append(self, row: dict) -> None:
        n = len(self)
        for name in _COLUMNS:
            if name == "complete":
                continue
            ds = self._file[name]
            ds.resize(n + 1, axis=0)
            ds[n] = row[name]
        self._file.flush()
        self._file["complete"].resize(n + 1, axis=0)
        self._file["complete"][n] = 1
        self._file.flush()

    def rows(self, quantity: str | None = None) -> list[dict]:
        """All complete results (optionally of one quantity), sorted by step."""
        n = len(self)
        f = self._file
        out = []
        for i in range(n):
            q = f["quantity"].asstr()[i]
            if quantity is not None and q != quantity:
                continue
            out.append({"step": int(f["step"][i]), "quantity": q, "settings": json.loads(f["settings"].asstr()[i]),
                        "values": np.array(f["values"][i]), "residuals": np.array(f["residuals"][i]),
                        "num_matvecs": int(f["num_matvecs"][i]), "seconds": float(f["seconds"][i]),
                        "info": json.loads(f["info"].asstr()[i])})
        return sorted(out, key=lambda r: (r["quantity"], r["step"]))



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


class _DeferredTask:
    """A task of the in-process executor: computed by ``result()``."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        self.fn, self.args = fn, args

    def result(self) -> Any:
        return self.fn(*self.args)


def executor_from_spec(spec: str):
    """``local`` | ``process:N`` | ``dask-local:N`` | ``dask://HOST:PORT`` -> ``(submit, shutdown, completed)``:
    ``submit(fn, *args)`` returns a future, ``completed(futures)`` yields them as they finish."""
    if spec == "local":  # tasks run one by one, when their result is asked for (so progress shows)
        return _DeferredTask, lambda: None, iter
    if spec.startswith("process:"):
        pool = ProcessPoolExecutor(max_workers=_count(spec))
        return pool.submit, lambda: pool.shutdown(cancel_futures=True), as_completed
    if spec.startswith("dask-local:") or spec.startswith("dask://") or spec.startswith("tcp://"):
        try:
            from distributed import Client, LocalCluster
            from distributed import as_completed as dask_as_completed
        except ImportError:
            raise ValueError("the Dask executors need the 'dask' extra: pip install 'sharpscope[dask]'") from None
        if spec.startswith("dask-local:"):
            cluster = LocalCluster(n_workers=_count(spec), threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
            stop = lambda: (client.close(), cluster.close())  # noqa: E731
        else:
            client = Client(spec.replace("dask://", "tcp://"))
            stop = client.close
        return (lambda fn, *a: client.submit(fn, *a, pure=False, retries=2)), stop, dask_as_completed
    raise ValueError(f"unknown executor {spec!r}: use local, process:N, dask-local:N or dask://HOST:PORT")


def _count(spec: str) -> int:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"executor {spec!r}: the worker count must be a positive integer")
    return n


def run_spectrum_job(runs: Sequence[str | os.PathLike], quantities: Sequence[str] = ("hessian",),
                     settings: SpectrumSettings = SpectrumSettings(), executor: str = "local",
                     steps: Iterable[int] | None = None, loss: str | None = None, progress: bool = True) -> JobReport:
    """Measure ``quantities`` at every complete checkpoint of every run; skip what is stored already."""
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
        futures = {submit(compute_task, path, step, todo, settings, loss): (path, step) for path, step, todo in tasks}
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
