"""Declarative probes: a TOML file describes a width x lr x parameterization x optimizer x seed grid;
:func:`run_sweep` trains every run with a :class:`~sharpscope.Recorder` and measures the spectra.

A probe file::

    [probe]
    name = "quickstart"
    description = "..."            # what it shows
    expected = "..."               # the outcome the source predicts
    source = "Noci et al. 2024, arXiv 2402.17457"

    [model]
    factory = "sharpscope.models:MLP"          # or a family name: mlp, cnn, transformer, moe
    kwargs = { depth = 2, in_features = 64, out_features = 10, activation = "tanh" }
    widths = [64, 128, 256]
    width_key = "width"                        # the factory's width argument
    base_width = 64
    depths = [2, 4, 8]                         # optional depth axis (residual models)
    depth_key = "depth"                        # the factory's depth argument
    base_depth = 1                             # L_0 of depth-muP's (L / L_0)^(-1/2)

    [train]
    parameterizations = ["mup", "sp"]
    optimizers = ["sgd"]
    lrs = [0.1, 0.2]
    steps = 100
    batch_size = 0                             # 0: full batch
    seeds = [0]
    data = "digits"                            # or "teacher-student", "cifar10"; [train.data_kwargs] for options
    loss = "CrossEntropyLoss"
    depth_scaling = false                      # depth-muP: residual branches times (L / L_0)^(-1/2)

    [capture]
    every = 10                                 # the last step is always captured
    probe_size = 256                           # first samples of the data: the probe batch

    [measure]
    quantities = ["hessian", "precond"]
    k = 1
    executor = "local"                         # for training and spectra: local, process:N, dask-local:N, dask://HOST:PORT

Runs are files ``runs/<parameterization>-<optimizer>-w<width>[-d<depth>]-lr<lr>-s<seed>.h5`` under the
output folder (with a remote ``dask://`` cluster the workers must see that folder: a shared file
system). A run whose file holds its final step (or stopped at a diverged, non-finite loss) is
complete and skipped on a re-run; an incomplete one (interrupted) is trained again from scratch
(training is deterministic for a seed). Spectra are resumable the same way (see :mod:`sharpscope.runs.jobs`).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import DATASETS, load as load_data
from .models import build_model
from .optim import build_optimizer
from .param import PARAMETERIZATIONS, parametrize
from .runs.capture import Recorder
from .runs.executors import executor_from_spec
from .runs.jobs import JobReport, SpectrumSettings, run_spectrum_job
from .runs.rebuild import build_loss
from .runs.spectra import spectra_path
from .runs.store import RunFileError, first_diverged_step, open_run

__all__ = ["Probe", "RunSpec", "load_probe", "plan", "train_run", "run_sweep", "SweepResult", "summary_rows"]

_OPTIMIZERS = ("sgd", "adam", "adamw", "adafactor", "muon")


@dataclass(frozen=True)
class Probe:
    """A parsed, validated probe file (see the module docstring for the format)."""

    name: str
    factory: str
    widths: tuple[int, ...]
    parameterizations: tuple[str, ...]
    optimizers: tuple[str, ...]
    lrs: tuple[float, ...]
    steps: int
    description: str = ""
    expected: str = ""
    source: str = ""
    kwargs: dict = field(default_factory=dict)
    width_key: str = "width"
    base_width: int | None = None
    batch_size: int = 0
    seeds: tuple[int, ...] = (0,)
    data: str = "digits"
    data_kwargs: dict = field(default_factory=dict)
    loss: str = "CrossEntropyLoss"
    every: int = 10
    probe_size: int = 256
    quantities: tuple[str, ...] = ("hessian",)
    k: int = 1
    executor: str = "local"
    depths: tuple[int, ...] = ()
    depth_key: str = "depth"
    base_depth: int | None = None
    depth_scaling: bool = False
    file: str = ""
    sha256: str = ""


def _need(table: dict, key: str, where: str) -> Any:
    if key not in table:
        raise ValueError(f"probe file: [{where}] needs '{key}'")
    return table[key]


def load_probe(path: str | Path) -> Probe:
    """Read and validate a probe TOML file; every problem is reported as a one-line ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such probe file")
    text = path.read_bytes()
    try:
        raw = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    meta, model, train = raw.get("probe", {}), raw.get("model", {}), raw.get("train", {})
    capture, measure = raw.get("capture", {}), raw.get("measure", {})
    probe = Probe(
        name=str(meta.get("name", path.stem)), description=meta.get("description", ""),
        expected=meta.get("expected", ""), source=meta.get("source", ""),
        factory=str(_need(model, "factory", "model")), kwargs=dict(model.get("kwargs", {})),
        widths=tuple(int(w) for w in _need(model, "widths", "model")), width_key=model.get("width_key", "width"),
        base_width=model.get("base_width"),
        parameterizations=tuple(_need(train, "parameterizations", "train")),
        optimizers=tuple(o.lower() for o in _need(train, "optimizers", "train")),
        lrs=tuple(float(x) for x in _need(train, "lrs", "train")), steps=int(_need(train, "steps", "train")),
        batch_size=int(train.get("batch_size", 0)), seeds=tuple(int(s) for s in train.get("seeds", [0])),
        data=train.get("data", "digits"), data_kwargs=dict(train.get("data_kwargs", {})),
        loss=train.get("loss", "CrossEntropyLoss"), every=int(capture.get("every", 10)),
        probe_size=int(capture.get("probe_size", 256)), quantities=tuple(measure.get("quantities", ["hessian"])),
        k=int(measure.get("k", 1)), executor=measure.get("executor", "local"),
        depths=tuple(int(d) for d in model.get("depths", [])), depth_key=model.get("depth_key", "depth"),
        base_depth=model.get("base_depth"), depth_scaling=bool(train.get("depth_scaling", False)),
        file=str(path.resolve()), sha256=hashlib.sha256(text).hexdigest(),
    )
    _validate(probe, path)
    return probe


def _validate(p: Probe, path: Path) -> None:
    def bad(message: str) -> None:
        raise ValueError(f"{path}: {message}")

    if not p.widths or any(w < 1 for w in p.widths):
        bad(f"widths must be positive integers, got {list(p.widths)}")
    if p.data not in DATASETS:
        bad(f"unknown data set {p.data!r}; choose from {', '.join(DATASETS)}")
    if any(d < 1 for d in p.depths):
        bad(f"depths must be positive integers, got {list(p.depths)}")
    for name in p.parameterizations:
        if name not in PARAMETERIZATIONS:
            bad(f"unknown parameterization {name!r}; choose from {', '.join(PARAMETERIZATIONS)}")
    for name in p.optimizers:
        if name not in _OPTIMIZERS:
            bad(f"unknown optimizer {name!r}; choose from {', '.join(_OPTIMIZERS)}")
    if not p.lrs or any(not lr > 0 for lr in p.lrs):
        bad(f"learning rates must be positive, got {list(p.lrs)}")
    if p.steps < 1 or p.every < 1 or p.probe_size < 1 or p.batch_size < 0 or p.k < 1:
        bad("steps, capture.every, capture.probe_size and measure.k must be >= 1 and batch_size >= 0")
    if p.base_depth is not None and not (isinstance(p.base_depth, int) and p.base_depth >= 1):
        bad(f"base_depth must be a positive integer, got {p.base_depth!r}")
    if p.data == "cifar10" and "root" not in p.data_kwargs:
        bad('data = "cifar10" needs [train.data_kwargs] root = "<folder holding cifar-10-batches-py>"')
    names = [spec.filename for spec in plan(p)]
    if len(set(names)) != len(names):
        bad("the grid has duplicate runs (a repeated width, depth, lr or seed, or lrs equal to 6 digits)")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    parameterization: str
    optimizer: str
    width: int
    lr: float
    seed: int
    depth: int | None = None

    @property
    def filename(self) -> str:
        depth = "" if self.depth is None else f"-d{self.depth}"
        return f"{self.parameterization}-{self.optimizer}-w{self.width}{depth}-lr{self.lr:g}-s{self.seed}.h5"


def plan(probe: Probe) -> list[RunSpec]:
    """Every combination, in a fixed order."""
    return [RunSpec(p, o, w, lr, s, d) for p, o, w, d, lr, s in itertools.product(
        probe.parameterizations, probe.optimizers, probe.widths, probe.depths or (None,), probe.lrs, probe.seeds)]


def _complete(path: Path, steps: int) -> bool:
    """The run holds its final step, or stopped because it diverged (a non-finite recorded loss);
    a run interrupted before that has neither and is trained again."""
    try:
        with open_run(path) as run:
            done = run.steps
            return bool(done) and (done[-1] == steps or first_diverged_step(run) < math.inf)
    except (RunFileError, OSError, KeyError):
        return False


def train_run(probe: Probe, spec: RunSpec, out_dir: str | Path) -> Path:
    """Train one run of the grid into ``out_dir/runs/``; skip it when complete (returns its path)."""
    path = Path(out_dir) / "runs" / spec.filename
    if path.exists():
        if _complete(path, probe.steps):
            return path
        path.unlink()  # interrupted: retrain from scratch (deterministic for the seed)
        spectra_path(path).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    x, y = load_data(probe.data, **probe.data_kwargs)
    kwargs = {**probe.kwargs, probe.width_key: spec.width}
    if spec.depth is not None:
        kwargs[probe.depth_key] = spec.depth
    torch.manual_seed(spec.seed)
    model = build_model(probe.factory, kwargs)
    groups = parametrize(model, spec.parameterization, optimizer=spec.optimizer, lr=spec.lr,
                         base_width=probe.base_width or min(probe.widths), seed=spec.seed,
                         depth_scaling=probe.depth_scaling, base_depth=probe.base_depth)
    opt = build_optimizer(groups)
    loss_fn = build_loss(probe.loss)
    final = probe.steps
    meta = {"model_factory": probe.factory, "model_kwargs": kwargs, "parameterization": groups.record,
            "seed": spec.seed, "loss": probe.loss,
            "probe": {"name": probe.name, "width": spec.width, "depth": spec.depth, "lr": spec.lr,
                      "optimizer": spec.optimizer, "parameterization": spec.parameterization,
                      "file": probe.file, "sha256": probe.sha256}}  # the probe file trusts its factory
    gen = torch.Generator().manual_seed(spec.seed)
    with Recorder(path, model, opt, batch=(x[: probe.probe_size], y[: probe.probe_size]),
                  schedule=lambda s: s % probe.every == 0 or s == final, meta=meta, loss_fn=loss_fn) as rec:
        for _ in range(probe.steps):
            if probe.batch_size:
                idx = torch.randint(0, x.shape[0], (probe.batch_size,), generator=gen)
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
    """The run files of a sweep, the spectrum job's report and the written report.html."""

    probe: Probe
    runs: list[Path]
    trained: int
    spectra: JobReport
    report: Path


def run_sweep(probe_path: str | Path, out_dir: str | Path, *, executor: str | None = None,
              progress: bool = True) -> SweepResult:
    """Train the probe's grid (skipping complete runs), measure its spectra (skipping stored ones) and
    write the report (``out_dir/report.html``, ``report.md``, ``metrics.json``, ``figures/``).

    ``executor`` (default: the probe's) runs both the training runs and the spectrum tasks: ``local``
    one after the other, ``process:N`` / ``dask-local:N`` / ``dask://HOST:PORT`` in parallel."""
    from tqdm.auto import tqdm

    probe = load_probe(probe_path)
    executor = executor or probe.executor
    out = Path(out_dir).resolve()  # workers of a remote cluster do not share our working directory
    specs = plan(probe)
    todo = [s for s in specs if not _complete(out / "runs" / s.filename, probe.steps)]
    if todo:
        submit, shutdown, completed = executor_from_spec(executor)
        try:
            futures = [submit(train_run, probe, spec, out) for spec in todo]
            for fut in tqdm(completed(futures), total=len(futures), desc=f"train {probe.name}", unit="run",
                            disable=not progress):
                fut.result()  # a failed run stops the sweep with its error (its file is retrained next time)
        finally:
            shutdown()
    runs = [out / "runs" / s.filename for s in specs]
    settings = SpectrumSettings(k=probe.k)
    report = run_spectrum_job(runs, probe.quantities, settings, executor=executor, progress=progress,
                              allow_factories=[probe.factory, probe.loss])
    from .analysis.report import write_report

    page = write_report(runs, out, title=f"sharpscope: {probe.name}",
                        settings={"probe": str(probe_path), "description": probe.description,
                                  "expected": probe.expected, "source": probe.source})
    return SweepResult(probe, runs, len(todo), report, page)


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
