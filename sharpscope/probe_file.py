"""Probe files: a TOML experiment parsed and checked in full before anything trains.

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
    steps = 100                                # or samples = 38400: a fixed budget of training samples,
                                               # steps = samples / batch_size per run (mini-batches only)
    batch_size = 0                             # 0: full batch
    seeds = [0]
    data = "digits"                            # or "teacher-student", "cifar10"; [train.data_kwargs] for options
    loss = "CrossEntropyLoss"
    depth_scaling = false                      # depth-muP: residual branches times (L / L_0)^(-1/2)
    device = "cpu"                             # where runs train and spectra are measured: cpu, cuda, cuda:N, auto
    optimizer_kwargs = { eps = 1e-3 }          # extra constructor keywords of every run's optimizer
    parametrize = { init_scale = 1.0 }         # extra keywords of ss.parametrize (lr_scaling, roles, ...)

    [sweep]                                    # optional: more varied settings, and the compared axis
    compare = "batch_size"                     # the ONE axis the verdicts compare (default below)
    [sweep.axes]
    batch_size = [16, 64, 256]                 # each list multiplies the grid
    lr_scaling = ["global", "full_alignment"]

    [capture]
    every = 10                                 # the last step is always captured
    probe_size = 256                           # first samples of the data: the stored batch

    [measure]
    quantities = ["hessian", "precond"]
    k = 1
    executor = "local"                         # for training and spectra: local, process:N, dask-local:N, dask://HOST:PORT

    [expect]                                   # optional: verdicts the report checks (analysis/expectations.py)
    mup = "consistent"                         # or a list (any of), or [expect.mup] precond = ..., transfer = ...

**Axes.** Widths, depths, lrs, parameterizations, optimizers and seeds are varied by their own
lists. ``[sweep.axes]`` varies any other setting; a name resolves, in this order, to a run setting
(``steps``, ``batch_size``), a keyword of :func:`sharpscope.parametrize` (``lr_scaling``,
``init_scale``, ...), an optimizer hyper-parameter (``weight_decay``, ``eps`` or ``adam_eps``,
``momentum``, ``beta1``, ``beta2``, ``dampening``, ``nesterov``) or a keyword of the model factory
(``num_experts``, ``top_k``, ...); the prefixes ``model.``, ``optimizer.``, ``parametrize.`` and
``data.`` (data-set keywords) choose explicitly. ``[sweep] compare`` names the one axis whose
values the verdicts compare (super consistency, lr transfer): ``"width"`` by default, ``"depth"``
when only depths vary; its values must be numbers, at least two. Every other varied setting makes
groups. Along ``steps``, trajectories are compared at equal fractions of training.

Every problem -- a wrong type (``steps = true``, ``widths = [8.7]``, a string where a list
belongs), a value out of range (``lrs = [inf]``, ``base_width = 0``), an unknown name or axis, an
axis the factory does not take, a single value or two names on the compared axis, a model whose
inputs or outputs do not fit the data or the loss -- is one ``ValueError`` line at load time.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import tomllib
import torch

from .analysis.expectations import parse_expectations
from .data import DATASETS
from .param import OPTIMIZERS, PARAMETERIZATIONS, ParametrizeOptions

__all__ = ["Probe", "RunSpec", "Axis", "load_probe", "plan", "RUN_SETTINGS", "OPTIMIZER_SETTINGS"]

RUN_SETTINGS = ("steps", "batch_size")
OPTIMIZER_SETTINGS = {"weight_decay": "weight_decay", "eps": "eps", "adam_eps": "eps", "momentum": "momentum",
                      "beta1": "beta1", "beta2": "beta2", "dampening": "dampening", "nesterov": "nesterov"}
_OWN_LISTS = ("width", "depth", "lr", "seed", "parameterization", "optimizer")
_PARAMETRIZE_FIXED = ("model", "parameterization", "optimizer", "lr", "base_width", "base_model", "delta_model",
                      "seed")
_TARGETS = ("run", "parametrize", "optimizer", "model", "data")


class ProbeFileError(ValueError):
    """A probe file that cannot be run as written (the message is one line naming the fix)."""


@dataclass(frozen=True)
class Axis:
    """A varied setting: its name in the file, where its value goes (``target``, ``key``) and its values."""

    name: str
    target: str
    key: str
    values: tuple


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
    samples: int = 0
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
    optimizer_kwargs: dict = field(default_factory=dict)
    parametrize_kwargs: dict = field(default_factory=dict)
    axes: tuple[Axis, ...] = ()
    compare: str = "width"
    device: str = "cpu"
    expect: tuple = ()  # the [expect] table as sharpscope.analysis.expectations.Expectation s
    file: str = ""
    sha256: str = ""

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: its coordinates and the values of the ``[sweep.axes]`` settings."""

    parameterization: str
    optimizer: str
    width: int
    lr: float
    seed: int
    depth: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def filename(self) -> str:
        depth = "" if self.depth is None else f"-d{self.depth}"
        extra = "".join(f"-{_safe(name)}{_safe(_fmt(value))}" for name, value in self.settings)
        return f"{self.parameterization}-{self.optimizer}-w{self.width}{depth}-lr{self.lr:g}{extra}-s{self.seed}.h5"

    def value(self, name: str, default: Any = None) -> Any:
        return dict(self.settings).get(name, default)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def plan(probe: Probe) -> list[RunSpec]:
    """Every combination, in a fixed order."""
    extra = [[(a.name, v) for v in a.values] for a in probe.axes]
    return [RunSpec(p, o, w, lr, s, d, tuple(settings)) for p, o, w, d, lr, *settings, s in itertools.product(
        probe.parameterizations, probe.optimizers, probe.widths, probe.depths or (None,), probe.lrs, *extra,
        probe.seeds)]


# -- typed reading: one line per problem ---------------------------------------------------------------
class _Reader:
    """Typed access to a probe file's tables; every problem raises one ProbeFileError line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, message: str) -> None:
        raise ProbeFileError(f"{self.path}: {message}")

    def table(self, raw: dict, name: str) -> dict:
        value = raw.get(name, {})
        if not isinstance(value, dict):
            self.fail(f"[{name}] must be a table, got {type(value).__name__}")
        return value

    def get(self, table: dict, key: str, where: str, required: bool = False, default: Any = None) -> Any:
        if key not in table:
            if required:
                self.fail(f"[{where}] needs '{key}'")
            return default
        return table[key]

    def integer(self, value: Any, what: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{what} must be an integer, got {value!r}")
        if value < minimum:
            self.fail(f"{what} must be >= {minimum}, got {value}")
        return value

    def number(self, value: Any, what: str, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(f"{what} must be a finite number, got {value!r}")
        if positive and not value > 0:
            self.fail(f"{what} must be positive, got {value!r}")
        return float(value)

    def text(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(f"{what} must be a non-empty string, got {value!r}")
        return value

    def values(self, value: Any, what: str, convert: Callable[[Any, str], Any], nonempty: bool = True) -> tuple:
        if not isinstance(value, list):
            self.fail(f"{what} must be a list, got {type(value).__name__} {value!r}")
        if nonempty and not value:
            self.fail(f"{what} must not be empty")
        return tuple(convert(v, f"{what} entry") for v in value)

    def mapping(self, value: Any, what: str) -> dict:
        if not isinstance(value, dict):
            self.fail(f"{what} must be a table, got {type(value).__name__} {value!r}")
        return dict(value)


def load_probe(path: str | Path) -> Probe:
    """Read and validate a probe TOML file; every problem is reported as a one-line ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such probe file")
    text = path.read_bytes()
    try:
        raw = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ProbeFileError(f"{path}: not valid TOML: {err}") from None
    r = _Reader(path)
    meta, model, train = r.table(raw, "probe"), r.table(raw, "model"), r.table(raw, "train")
    capture, measure, sweep = r.table(raw, "capture"), r.table(raw, "measure"), r.table(raw, "sweep")
    unknown = sorted(set(raw) - {"probe", "model", "train", "capture", "measure", "sweep", "expect"})
    if unknown:
        r.fail(f"unknown table(s) {unknown}: the tables are [probe], [model], [train], [sweep], [capture], [measure], [expect]")
    pos_int = lambda minimum: lambda v, what: r.integer(v, what, minimum)  # noqa: E731
    lower = lambda v, what: r.text(v, what).lower()  # noqa: E731
    base_width, base_depth = r.get(model, "base_width", "model"), r.get(model, "base_depth", "model")
    steps, samples = _train_length(r, train)
    probe = Probe(
        name=str(r.get(meta, "name", "probe", default=path.stem)), description=str(meta.get("description", "")),
        expected=str(meta.get("expected", "")), source=str(meta.get("source", "")),
        factory=r.text(r.get(model, "factory", "model", True), "[model] factory"),
        kwargs=r.mapping(model.get("kwargs", {}), "[model] kwargs"),
        widths=r.values(r.get(model, "widths", "model", True), "[model] widths", pos_int(1)),
        width_key=r.text(model.get("width_key", "width"), "[model] width_key"),
        base_width=None if base_width is None else r.integer(base_width, "[model] base_width", 1),
        parameterizations=r.values(r.get(train, "parameterizations", "train", True), "[train] parameterizations", lower),
        optimizers=r.values(r.get(train, "optimizers", "train", True), "[train] optimizers", lower),
        lrs=r.values(r.get(train, "lrs", "train", True), "[train] lrs", lambda v, w: r.number(v, w, positive=True)),
        steps=steps, samples=samples,
        batch_size=r.integer(train.get("batch_size", 0), "[train] batch_size", 0),
        seeds=r.values(train.get("seeds", [0]), "[train] seeds", pos_int(0)),
        data=r.text(train.get("data", "digits"), "[train] data"),
        data_kwargs=r.mapping(train.get("data_kwargs", {}), "[train] data_kwargs"),
        loss=r.text(train.get("loss", "CrossEntropyLoss"), "[train] loss"),
        every=r.integer(capture.get("every", 10), "[capture] every", 1),
        probe_size=r.integer(capture.get("probe_size", 256), "[capture] probe_size", 1),
        quantities=r.values(measure.get("quantities", ["hessian"]), "[measure] quantities", r.text),
        k=r.integer(measure.get("k", 1), "[measure] k", 1),
        executor=r.text(measure.get("executor", "local"), "[measure] executor"),
        depths=r.values(model.get("depths", []), "[model] depths", pos_int(1), nonempty=False),
        depth_key=r.text(model.get("depth_key", "depth"), "[model] depth_key"),
        base_depth=None if base_depth is None else r.integer(base_depth, "[model] base_depth", 1),
        depth_scaling=_flag(r, train.get("depth_scaling", False), "[train] depth_scaling"),
        optimizer_kwargs=r.mapping(train.get("optimizer_kwargs", {}), "[train] optimizer_kwargs"),
        parametrize_kwargs=r.mapping(train.get("parametrize", {}), "[train] parametrize"),
        device=r.text(train.get("device", "cpu"), "[train] device"),
        file=str(path.resolve()), sha256=hashlib.sha256(text).hexdigest(),
    )
    axes = _axes(r, probe, r.mapping(sweep.get("axes", {}), "[sweep] axes"))
    compare = _compare(r, probe, axes, sweep)
    expect = parse_expectations(raw.get("expect", {}), parameterizations=probe.parameterizations,
                                quantities=probe.quantities, where=str(path))  # [expect]: one line per problem
    probe = _replace(probe, axes=axes, compare=compare, expect=expect)
    _check_budget(r, probe)
    _validate(r, probe)
    return probe


def _replace(probe: Probe, **changes: Any) -> Probe:
    from dataclasses import replace

    return replace(probe, **changes)


def _flag(r: _Reader, value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        r.fail(f"{what} must be true or false, got {value!r}")
    return value


# -- axes ---------------------------------------------------------------------------------------------------
def _factory_keywords(factory: str) -> set[str] | None:
    """The keyword arguments the model factory takes (None: it takes any, via **kwargs)."""
    from .models import resolve_factory

    try:
        signature = inspect.signature(resolve_factory(factory))
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return set(signature.parameters)


def _parametrize_keywords() -> set[str]:
    return {f.name for f in fields(ParametrizeOptions)} - set(_PARAMETRIZE_FIXED)


def _resolve_axis(r: _Reader, probe: Probe, name: str) -> tuple[str, str]:
    """Where an axis' value goes: ``(target, key)``; the module docstring gives the order."""
    prefix, _, rest = name.partition(".")
    if rest:
        if prefix not in _TARGETS[1:]:
            r.fail(f"axis {name!r}: unknown prefix {prefix!r}; use model., optimizer., parametrize. or data.")
        target, key = prefix, rest
    elif name in _OWN_LISTS:
        r.fail(f"axis {name!r} is varied by its own list ([model] {name}s / [train] {name}s), not [sweep.axes]")
    elif name in RUN_SETTINGS:
        return "run", name
    elif name in _parametrize_keywords():
        return "parametrize", name
    elif name in OPTIMIZER_SETTINGS:
        return "optimizer", OPTIMIZER_SETTINGS[name]
    else:
        keywords = _factory_keywords(probe.factory)
        if keywords is not None and name not in keywords:
            r.fail(f"unknown axis {name!r}: not a run setting ({', '.join(RUN_SETTINGS)}), a parametrize keyword, "
                   f"an optimizer hyper-parameter ({', '.join(OPTIMIZER_SETTINGS)}) or a keyword of the factory "
                   f"{probe.factory!r} ({', '.join(sorted(keywords))})")
        return "model", name
    if target == "model":
        keywords = _factory_keywords(probe.factory)
        if keywords is not None and key not in keywords:
            r.fail(f"axis {name!r}: the factory {probe.factory!r} takes no keyword {key!r} "
                   f"(it takes {', '.join(sorted(keywords))})")
    if target == "parametrize" and key not in _parametrize_keywords():
        r.fail(f"axis {name!r}: ss.parametrize takes no keyword {key!r}")
    if target == "optimizer" and key not in OPTIMIZER_SETTINGS:
        r.fail(f"axis {name!r}: unknown optimizer hyper-parameter {key!r}; choose from {', '.join(OPTIMIZER_SETTINGS)}")
    return target, OPTIMIZER_SETTINGS.get(key, key) if target == "optimizer" else key


def _axis_value(r: _Reader, name: str, target: str, key: str, value: Any) -> Any:
    what = f"[sweep.axes] {name} value"
    if target == "run":
        return r.integer(value, what, 1 if key == "steps" else 0)
    if target == "optimizer" and key == "nesterov":
        return _flag(r, value, what)
    if target == "optimizer":
        return r.number(value, what)
    if isinstance(value, float) and not math.isfinite(value):
        r.fail(f"{what} must be finite, got {value!r}")
    if not isinstance(value, (str, int, float, bool)):
        r.fail(f"{what} must be a number, a string or a boolean, got {type(value).__name__}")
    return value


def _flat(table: dict) -> dict:
    """TOML reads ``model.top_k = [1, 2]`` as a nested table: back to the dotted name."""
    out = {}
    for name, value in table.items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in _flat(value).items()})
        else:
            out[name] = value
    return out


def _axes(r: _Reader, probe: Probe, table: dict) -> tuple[Axis, ...]:
    axes = []
    for name, values in _flat(table).items():
        target, key = _resolve_axis(r, probe, name)
        vals = r.values(values, f"[sweep.axes] {name}",
                        lambda v, w, name=name, target=target, key=key: _axis_value(r, name, target, key, v))
        if len(set(map(repr, vals))) != len(vals):
            r.fail(f"[sweep.axes] {name} repeats a value: {list(vals)}")
        axes.append(Axis(name, target, key, vals))
    return tuple(axes)


def _compare(r: _Reader, probe: Probe, axes: tuple[Axis, ...], sweep: dict) -> str:
    compare = sweep.get("compare")
    if compare is None:
        return "depth" if len(probe.widths) < 2 and len(probe.depths) >= 2 else "width"
    if isinstance(compare, list):
        r.fail(f"[sweep] compare names one axis, got {len(compare)}: {compare}; the other varied settings "
               "become groups by themselves")
    compare = r.text(compare, "[sweep] compare")
    values = {"width": probe.widths, "depth": probe.depths}.get(compare)
    if values is None:
        axis = next((a for a in axes if a.name == compare), None)
        if axis is None:
            r.fail(f"[sweep] compare = {compare!r} is not varied: compare width, depth or a name of [sweep.axes] "
                   f"({', '.join(a.name for a in axes) or 'none'})")
        values = axis.values
    if len(values) < 2:
        r.fail(f"[sweep] compare = {compare!r} has a single value {list(values)}: comparing needs >= 2")
    if any(isinstance(v, (bool, str)) for v in values):
        r.fail(f"[sweep] compare = {compare!r}: the compared axis needs numbers, got {list(values)}")
    return compare


def _train_length(r: _Reader, train: dict) -> tuple[int, int]:
    """``(steps, samples)``: ``[train] steps``, or ``[train] samples`` (a fixed budget of training samples; steps
    then 0 here and ``samples / batch_size`` per run), one of them."""
    if "samples" not in train:
        return r.integer(r.get(train, "steps", "train", True), "[train] steps", 1), 0
    if "steps" in train:
        r.fail("[train] give steps or samples (a fixed budget of training samples: steps = samples / batch_size), "
               "not both")
    return 0, r.integer(train["samples"], "[train] samples", 1)


def _check_budget(r: _Reader, p: Probe) -> None:
    """A sample budget needs a batch size in every run, and no steps axis."""
    batches = p.axis("batch_size").values if p.axis("batch_size") else (p.batch_size,)
    if p.samples and (p.axis("steps") or not all(batches)):
        r.fail("[train] samples needs mini-batches (batch_size > 0 in every run) and no steps axis: steps = "
               "samples / batch_size")


# -- whole-file checks ----------------------------------------------------------------------------------------
def _validate(r: _Reader, p: Probe) -> None:
    from .devices import resolve_device
    from .runs.quantities import QUANTITIES

    try:
        resolve_device(p.device)
    except ValueError as err:
        r.fail(f"[train] device: {err}")
    if p.data not in DATASETS:
        r.fail(f"unknown data set {p.data!r}; choose from {', '.join(DATASETS)}")
    for name in p.parameterizations:
        if name not in PARAMETERIZATIONS:
            r.fail(f"unknown parameterization {name!r}; choose from {', '.join(PARAMETERIZATIONS)}")
    for name in p.optimizers:
        if name not in OPTIMIZERS:
            r.fail(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    for q in p.quantities:
        if q not in QUANTITIES:
            r.fail(f"unknown quantity {q!r}; choose from {', '.join(QUANTITIES)}")
    if p.data == "cifar10" and "root" not in p.data_kwargs:
        r.fail('data = "cifar10" needs [train.data_kwargs] root = "<folder holding cifar-10-batches-py>"')
    names = [spec.filename for spec in plan(p)]
    if len(set(names)) != len(names):
        r.fail("the grid has duplicate runs (a repeated width, depth, lr, seed or axis value, or lrs equal to 6 digits)")
    _dry_run(r, p)


def _dry_run(r: _Reader, p: Probe) -> None:
    """Before anything trains: every distinct model configuration the sweep will build is built with
    shapes only (the ``meta`` device: no memory), run on the data's shape and checked against the loss
    and the machine's memory (:func:`_check_config`); then the smallest one is built for real and run on
    two samples (what shapes cannot show: a loss that fails on the values). Inputs that do not fit a
    model (``in_features``), targets that do not fit the loss, a model too big to train: one line here,
    not a traceback after the first runs have trained."""
    from .data import load as load_data
    from .runs.rebuild import build_loss

    try:
        loss_fn = build_loss(p.loss, allow=[p.loss], where=str(r.path))
    except ValueError as err:
        r.fail(f"[train] loss {p.loss!r}: {err}")
    datasets: dict[str, tuple] = {}
    configs: dict[str, tuple[dict, str]] = {}
    for spec in plan(p):
        kwargs = {**p.kwargs, p.width_key: spec.width, **settings_of(p, spec, "model")}
        if spec.depth is not None:
            kwargs[p.depth_key] = spec.depth
        data_kwargs = {**p.data_kwargs, **settings_of(p, spec, "data")}
        configs.setdefault(repr(sorted(kwargs.items())) + repr(sorted(data_kwargs.items())), (kwargs, repr(data_kwargs)))
        if repr(data_kwargs) not in datasets:
            try:
                datasets[repr(data_kwargs)] = load_data(p.data, **data_kwargs)
            except FileNotFoundError:
                datasets[repr(data_kwargs)] = None  # not on this machine (yet): training will say so first
            except (TypeError, ValueError, OSError) as err:
                r.fail(f"data {p.data!r} with {data_kwargs}: {err}")
    sizes = {}
    for kwargs, data_key in configs.values():
        if datasets[data_key] is not None:
            sizes[repr(kwargs)] = (_check_config(r, p, kwargs, datasets[data_key], loss_fn), kwargs, data_key)
    if sizes:
        _, kwargs, data_key = min(sizes.values(), key=lambda t: t[0])
        _run_for_real(r, p, kwargs, datasets[data_key], loss_fn)


def _training_bytes(model: torch.nn.Module) -> int:
    """A lower bound of what training the model holds: its parameters and their gradients."""
    return 2 * sum(q.numel() * q.element_size() for q in model.parameters())


def _check_config(r: _Reader, p: Probe, kwargs: dict, data: tuple, loss_fn: Callable) -> int:
    """One configuration, shapes only: built on the ``meta`` device, sized against the machine, run on two
    samples' shapes, its outputs checked against the loss (and, for class losses, the number of classes).
    Returns its parameter bytes."""
    from ._memory import memory_budget
    from .devices import resolve_device
    from .functional import check_targets
    from .models import build_model

    x, y = data
    try:
        with torch.device("meta"):
            model = build_model(p.factory, kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        if "overflow" in str(err):  # sizes past what a tensor can hold (even shapes only)
            r.fail(f"the model {p.factory} {kwargs} is too big to build: its tensor sizes overflow "
                   f"({_first_line(err)}): lower the sizes")
        r.fail(f"the model {p.factory} {kwargs} cannot be built: {_first_line(err)}")
    need = _training_bytes(model)
    device = resolve_device(p.device)
    available = memory_budget(device, gpu_free=1.0, host=1.0)
    if need > available:
        from .runs.space import human_bytes

        count = sum(q.numel() for q in model.parameters())
        r.fail(f"the model {p.factory} {kwargs} has {count:.3g} parameters: training it needs at least "
               f"{human_bytes(need)} (parameters and gradients), more than the {human_bytes(available)} of this "
               f"machine's {'GPU' if device.type == 'cuda' else 'memory'}: lower the sizes")
    try:
        with torch.no_grad():
            out = model(x[:2].to("meta"))
        check_targets(loss_fn, out, y[:2].to("meta"))
        loss = loss_fn(out, y[:2].to("meta"))
    except NotImplementedError:
        return need  # an operation without a meta kernel: the real run of the smallest model checks what it can
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        r.fail(f"the model {p.factory} {kwargs} does not run on the data {p.data!r} with {p.loss}: {_first_line(err)}")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        r.fail(f"the loss {p.loss} does not return a scalar on the model's outputs")
    if _class_loss(loss_fn) and not y.is_floating_point() and y.ndim == out.ndim - 1 and out.ndim >= 2 \
            and y.numel() and int(y.max()) >= out.shape[1]:
        r.fail(f"the model {p.factory} {kwargs} has {out.shape[1]} outputs, but the data {p.data!r} has class "
               f"{int(y.max())}: {p.loss} needs one output per class")
    return need


def _class_loss(loss_fn: Callable) -> bool:
    return isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))


def _run_for_real(r: _Reader, p: Probe, kwargs: dict, data: tuple, loss_fn: Callable) -> None:
    """The smallest configuration built for real and run on two samples with the loss."""
    from .functional import check_targets
    from .models import build_model

    x, y = data
    try:
        model = build_model(p.factory, kwargs)
        with torch.no_grad():
            out = model(x[:2])
        check_targets(loss_fn, out, y[:2])
        loss = loss_fn(out, y[:2])
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        r.fail(f"the model {p.factory} {kwargs} does not run on the data {p.data!r} with {p.loss}: {_first_line(err)}")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        r.fail(f"the loss {p.loss} does not return a scalar on the model's outputs")


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def run_values(probe: Probe, spec: RunSpec) -> dict[str, Any]:
    """Every coordinate of one run: width, depth, lr, parameterization, optimizer, seed and the axes."""
    out: dict[str, Any] = {"width": spec.width, "lr": spec.lr, "parameterization": spec.parameterization,
                           "optimizer": spec.optimizer, "seed": spec.seed}
    if spec.depth is not None:
        out["depth"] = spec.depth
    out.update(dict(spec.settings))
    return out


def settings_of(probe: Probe, spec: RunSpec, target: str) -> dict[str, Any]:
    """The ``[sweep.axes]`` values of one run that go to ``target`` (``run``, ``parametrize``, ...), by key."""
    return {a.key: spec.value(a.name) for a in probe.axes if a.target == target}
