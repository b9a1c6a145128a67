"""Training-loop hooks: :class:`Recorder` captures checkpoints (and optional online sharpness) into a run file.

Two or three lines in an existing loop::

    rec = ss.Recorder("run.h5", model, optimizer=opt, batch=(x, y), every=100, loss_fn=loss_fn)
    for step in ...:
        ...; opt.step()
        rec.step(loss=loss)       # once per optimizer step: captures when the schedule says so
    rec.close()                   # or use the Recorder as a context manager

Step ``t`` counts optimizer steps taken: the checkpoint at ``t`` holds the parameters after ``t`` steps
(``t = 0``: at construction, the initialization) and the optimizer state that the next step will use.

Online sharpness (``sharpness_every=K``) is the top eigenvalue of what the optimizer sees: the
preconditioned Hessian ``D^1/2 H D^1/2`` (:mod:`sharpscope.preconditioning`: Adam/AdamW/Adafactor, SGD
with per-group lrs or momentum) compared with its edge-of-stability threshold, or the raw Hessian where
no threshold is defined (no optimizer, Muon). The metrics, by name (:data:`SHARPNESS_METRICS`):

* ``sharpness/preconditioned`` -- top eigenvalue of ``D^1/2 H D^1/2``;
* ``sharpness/eos_ratio`` -- that over its threshold (``ss.stability_threshold``): 1 = at the edge;
* ``sharpness/hessian`` -- top eigenvalue of the raw Hessian, when that is what was measured (no
  threshold defined) or the same thing (SGD with one lr: ``D = I``, the ratio is ``lambda / (2/lr)``).

They go to the run file (scalar logs ``sharpness_preconditioned``, ``eos_ratio``, ``sharpness``), to
``log_fn(metrics, step)``, and to ``summary_writer`` (TensorBoard tags ``sharpscope/<name>``). The
preconditioner is the next step's (the optimizer's state and current lrs); where it is undefined (every
lr 0 at the end of a schedule, no second moment yet) nothing is logged at that step, and
``Recorder.sharpness_skipped`` holds the step and the reason.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..closures import BatchLoss
from ..functional import mapping_batch_error
from ..online import DEFAULT_TOL, SHARPNESS_METRICS, OnlineCost, OnlineSharpness
from ..optim import AdamAtan2
from ..registry import REBUILD_FIX, is_name
from .provenance import config_digest
from .space import DiskFullError
from .store import RunFileError, RunWriter, TensorSpec, open_run

__all__ = ["Recorder", "every_schedule", "log_schedule", "optimizer_state_specs", "SHARPNESS_METRICS"]

# the run file's scalar log of each metric
_SCALAR_LOGS = {"sharpness/preconditioned": "sharpness_preconditioned", "sharpness/eos_ratio": "eos_ratio",
                "sharpness/hessian": "sharpness"}
# the run file's logs of what each online measurement cost
_COST_LOGS = ("online_seconds", "online_products")
_log = logging.getLogger("sharpscope")


def writes_here() -> bool:
    """Whether this process writes run files: always on one process; under an initialized
    ``torch.distributed`` only global rank 0 (the other ranks' Recorders and callbacks are inert)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# -- schedules -------------------------------------------------------------------------------------
def every_schedule(n: int) -> Callable[[int], bool]:
    """Capture at steps 0, n, 2n, ..."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"every must be a positive integer, got {n!r}")
    return lambda step: step % n == 0


def log_schedule(per_decade: int = 10, max_step: int = 10**9) -> Callable[[int], bool]:
    """Log-spaced steps (dense early, where edge-of-stability dynamics happen): 0, 1, 2, ..., then
    ``round(10 ** (i / per_decade))`` for i = 0, 1, ...; ``per_decade`` points per factor of 10."""
    if per_decade < 1:
        raise ValueError(f"per_decade must be >= 1, got {per_decade}")
    steps = {0}
    i = 0
    while True:
        s = int(round(10 ** (i / per_decade)))
        if s > max_step:
            break
        steps.add(s)
        i += 1
    return steps.__contains__


def _schedule(every: int | None, schedule: Any) -> Callable[[int], bool]:
    if every is not None and schedule is not None:
        raise ValueError("give either every= or schedule=, not both")
    if every is not None:
        return every_schedule(every)
    if schedule is None or schedule == "on_demand":
        return lambda step: False
    if schedule == "log":
        return log_schedule()
    if callable(schedule):
        return schedule
    if isinstance(schedule, Iterable) and not isinstance(schedule, (str, bytes)):
        wanted = {int(s) for s in schedule}
        return wanted.__contains__
    raise ValueError(f"schedule must be 'log', 'on_demand', a list of steps or a callable, got {schedule!r}")


def describe_schedule(every: int | None, schedule: Any) -> Any:
    """The schedule as JSON for the provenance record; None for a callable (not describable)."""
    if every is not None:
        return {"every": int(every)}
    if schedule is None or isinstance(schedule, str):
        return schedule or "on_demand"
    if callable(schedule):
        return None
    return {"steps": sorted(int(s) for s in schedule)}


# -- what is stored ----------------------------------------------------------------------------------
def optimizer_state_specs(optimizer: torch.optim.Optimizer | None, names: Mapping[int, str]
                          ) -> list[tuple[str, str, tuple[int, ...], torch.dtype]]:
    """``(param name, state key, shape, dtype)`` of the optimizer state to capture, for every managed
    parameter. Taken from the state when it exists, else predicted from torch's SGD (momentum), Adam,
    AdamW, Adafactor, Muon and :class:`sharpscope.optim.AdamAtan2` (their state appears only at the
    first step)."""
    if optimizer is None:
        return []
    out = []
    # an OptimizerList (Muon + AdamW) is predicted member by member
    for member in getattr(optimizer, "optimizers", [optimizer]):
        for group in member.param_groups:
            for p in group["params"]:
                name = names.get(id(p))
                if name is None:
                    continue
                state = member.state.get(p, {})
                if state:
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor):
                            out.append((name, key, tuple(value.shape), value.dtype))
                    continue
                for key, shape, dtype in _predicted_state(member, group, p):
                    out.append((name, key, shape, dtype))
    return out


def _predicted_state(optimizer, group, p) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    shape = tuple(p.shape)
    if isinstance(optimizer, AdamAtan2):  # Adam's keys and dtypes, no amsgrad
        return [("step", (), torch.float32), ("exp_avg", shape, p.dtype), ("exp_avg_sq", shape, p.dtype)]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        keys = [("step", (), torch.float32), ("exp_avg", shape, p.dtype), ("exp_avg_sq", shape, p.dtype)]
        if group.get("amsgrad"):
            keys.append(("max_exp_avg_sq", shape, p.dtype))
        return keys
    if isinstance(optimizer, torch.optim.SGD):
        return [("momentum_buffer", shape, p.dtype)] if group.get("momentum", 0) else []
    if isinstance(optimizer, torch.optim.Adafactor):
        if p.dim() > 1:
            return [("step", (), torch.float32), ("row_var", shape[:-1] + (1,), p.dtype),
                    ("col_var", shape[:-2] + (1,) + shape[-1:], p.dtype)]
        return [("step", (), torch.float32), ("variance", shape, p.dtype)]
    if type(optimizer).__name__ == "Muon":
        return [("momentum_buffer", shape, p.dtype)]
    return []


def _np_dtype(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "float32"
    return str(torch.empty(0, dtype=dtype).numpy().dtype)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def optimizer_meta(optimizer: torch.optim.Optimizer | None, names: Mapping[int, str]) -> dict | None:
    """JSON description of the optimizer: class, defaults and per-group hyper-parameters and members."""
    if optimizer is None:
        return None
    groups = []
    for g in optimizer.param_groups:
        hyper = {k: _jsonable(v) for k, v in g.items() if k != "params"}
        hyper["params"] = [names.get(id(p), "?") for p in g["params"]]
        groups.append(hyper)
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "defaults": {k: _jsonable(v) for k, v in optimizer.defaults.items()}, "param_groups": groups}


def _check_same_config(run, config: Mapping[str, Any] | None) -> None:
    """A resumed run continues the run it was: refuse a config whose digest differs from the stored one."""
    stored = (run.provenance or {}).get("config_digest")
    if config is not None and stored is not None and config_digest(config) != stored:
        raise RunFileError(f"{run.path}: cannot resume: the config given differs from the run's (digest "
                           f"{config_digest(config)[:19]} vs {stored[:19]}); start a new run file")


class Recorder:
    """Captures checkpoints of ``model`` (and ``optimizer``) into a run file on a schedule.

    Args:
        path: the run file (``.h5``). An existing file is refused unless ``resume=True``.
        model: the model being trained.
        optimizer: its optimizer (state captured for preconditioned sharpness; lrs logged).
        batch: a fixed data batch stored once, on which spectra are measured: ``(inputs, targets)``
            (inputs a tensor or a tuple of tensors) or a mapping of named tensors (a Hugging Face batch,
            measured with a loss closure: ``loss_fn=ss.batch_loss(...)``, e.g. ``sharpscope.hf.causal_lm_loss()``).
        every: capture every ``every`` steps (and at step 0); or give ``schedule``:
            ``"log"``, ``"on_demand"`` (only :meth:`capture`), a list of steps, or ``callable(step) -> bool``.
        meta: user metadata (JSON). Keys ``model_factory`` (``"module:function"``) and
            ``model_kwargs`` let offline jobs rebuild the model without pickle (without one, a
            ``UserWarning`` at creation names the fix); ``loss`` names the loss.
        loss_fn: needed for online sharpness; a criterion (its class name is recorded) or a loss closure
            (:func:`~sharpscope.batch_loss`; its ``name``, a trusted factory, is recorded).
        sharpness_every: also measure the online sharpness on the batch every K steps (module docstring:
            preconditioned when the optimizer defines it; :class:`sharpscope.online.OnlineSharpness`: one
            operator for the run, warm-started Lanczos), logged in the run file, to ``log_fn`` and to
            ``summary_writer``; what each measurement cost (seconds, products) goes to the run file's
            ``online_seconds`` and ``online_products`` logs and :attr:`online_cost` (docs/capture.md, "Cost").
        sharpness_tol: the online measurement's relative Ritz-residual tolerance (default 1e-2), not a tolerance
            on the eigenvalue: each logged value is within ``sharpness_tol`` relative of an eigenvalue of the
            operator (guaranteed) and at most the top one; its error to the top one is about
            ``sharpness_tol**2 / g`` for a relative gap ``g`` between the two top eigenvalues (an estimate;
            1e-5 to 1.9e-3 measured on the MLP bench) (:mod:`sharpscope.online`; docs/capture.md, "Cost").
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (optional).
        log_fn: ``log_fn(metrics: dict, step: int)``, called with the sharpness metrics at each measured
            step (e.g. ``lambda m, s: wandb.log(m, step=s)``); the Lightning and Hugging Face callbacks
            use it to log through their framework.
        resume: append to an existing run (dropping a checkpoint a crash left incomplete); training
            continues from ``start_step`` (default: the last captured step).
        config: the run's resolved config (JSON: for a sweep, model factory and kwargs, data, optimizer
            and hyper-parameters, schedule, steps, seed), stored with its digest in the run's provenance
            (``run.provenance``; :func:`sharpscope.runs.provenance.config_digest` recomputes it).
        axes: the run's coordinates, name -> number or string (``{"width": 256, "batch_size": 64}``),
            read back as ``run.axes``.
        on_disk_full: what a full disk does (docs/formats.md, "A full disk"): ``"raise"`` (default) raises
            :class:`~sharpscope.runs.space.DiskFullError` -- one line naming the file and the free space --
            from :meth:`step` / :meth:`capture` into the training loop; ``"stop"`` stops capturing, warns once
            (``RuntimeWarning``, the same line) and lets training go on (:attr:`stopped` holds the line). The
            checkpoints stored before are complete either way, and none is ever marked complete unwritten.

    Under ``torch.distributed`` (an initialized process group) only global rank 0 writes: one writer per
    file. Every rank may create its Recorder (and the Lightning / Hugging Face callbacks do); on the other
    ranks it is inert (``rec.writer`` is None: no file, no captures, no online sharpness), so they need not
    agree on the path.
    """

    def __init__(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 batch: tuple[Any, Any] | Mapping[str, torch.Tensor] | None = None, every: int | None = None,
                 schedule: Any = None, meta: Mapping[str, Any] | None = None, *, loss_fn: Callable | None = None,
                 sharpness_every: int | None = None, summary_writer: Any = None, resume: bool = False,
                 start_step: int | None = None, config: Mapping[str, Any] | None = None,
                 axes: Mapping[str, Any] | None = None, log_fn: Callable[[dict, int], Any] | None = None,
                 on_disk_full: str = "raise", sharpness_tol: float = DEFAULT_TOL) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if sharpness_every is not None and (loss_fn is None or batch is None):
            raise ValueError("sharpness_every needs loss_fn= and batch=")
        if sharpness_every is not None and isinstance(batch, Mapping) and not isinstance(loss_fn, BatchLoss):
            raise mapping_batch_error(batch)
        if log_fn is not None and not callable(log_fn):
            raise TypeError(f"log_fn must be callable as log_fn(metrics, step), got {type(log_fn).__name__}")
        if on_disk_full not in ("raise", "stop"):
            raise ValueError(f"on_disk_full must be 'raise' or 'stop', got {on_disk_full!r}")
        self.on_disk_full = on_disk_full
        self.stopped: str | None = None
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.batch = batch
        self.should_capture = _schedule(every, schedule)
        self.sharpness_every = sharpness_every
        self.summary_writer = summary_writer
        self.log_fn = log_fn
        self._warned: set[str] = set()
        self._loss = float("nan")  # the last loss passed to step() or capture()
        self._cost_logged = False
        self._started = time.perf_counter()
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())
        self._names = {id(p): n for n, p in self._params.items()}
        self._specs = self._tensor_specs()
        self.sharpness_tol = sharpness_tol
        self.online = (OnlineSharpness(model, loss_fn, batch, optimizer, tol=sharpness_tol, warn=self._warn_once)
                       if sharpness_every is not None else None)
        self.sharpness_log: list[tuple[int, float]] = []
        self.metrics_log: list[tuple[int, dict[str, float]]] = []
        self.sharpness_skipped: list[tuple[int, str]] = []
        if not writes_here():  # under torch.distributed only rank 0 writes: one writer per file
            self.writer = None
            self.step_count = 0 if start_step is None else int(start_step)
            self._last_captured = None
            return
        if resume and os.path.exists(path):
            with open_run(path) as run:  # check before rewriting anything
                self._check_compatible(run, path)
                _check_same_config(run, config)
            self.writer = RunWriter.resume(path)
            self._specs = self.writer.specs
            steps = self.writer.steps
            self.step_count = start_step if start_step is not None else (steps[-1] if steps else 0)
            self._last_captured = steps[-1] if steps else None
        else:
            meta = self._meta(meta)
            factory = meta["model_factory"]
            if not is_name("model", factory):  # say it now, not when `sharpscope spectrum` fails
                what = f"model_factory {factory!r} is not a 'module:function' outside __main__" if factory else \
                    "meta has no model_factory"
                warnings.warn(f"{path}: {what}, so `sharpscope spectrum` cannot rebuild this run: {REBUILD_FIX}",
                              UserWarning, stacklevel=2)
            recorded = {key: meta[key] for key in ("model_factory", "model_kwargs", "model_class", "loss", "seed",
                                                   "optimizer")}
            recorded.update(schedule=describe_schedule(every, schedule), sharpness_every=sharpness_every)
            self.writer = RunWriter(path, meta, self._specs, lr_groups=self._lr_groups(), batch=batch,
                                    scalars=("sharpness", "loss", *[_SCALAR_LOGS[m] for m in SHARPNESS_METRICS[:2]],
                                             *(_COST_LOGS if sharpness_every is not None else ())),
                                    config=config, recorded=recorded, axes=axes)
            self.step_count = 0 if start_step is None else int(start_step)
            self._last_captured = None
            if self.should_capture(self.step_count):
                self.capture()

    # -- set-up --------------------------------------------------------------------------------
    def _lr_groups(self) -> int:
        return len(self.optimizer.param_groups) if self.optimizer is not None else 0

    def _tensor_specs(self) -> list[TensorSpec]:
        specs = []
        for name, p in self._params.items():
            specs.append(TensorSpec(f"t{len(specs)}", "param", name, tuple(p.shape), _np_dtype(p.dtype)))
        for name, b in self._buffers.items():
            specs.append(TensorSpec(f"t{len(specs)}", "buffer", name, tuple(b.shape), _np_dtype(b.dtype)))
        for name, key, shape, dtype in optimizer_state_specs(self.optimizer, self._names):
            specs.append(TensorSpec(f"t{len(specs)}", "optim", name, shape, _np_dtype(dtype), key))
        if self.optimizer is not None and not any(s.kind == "optim" for s in specs) \
                and not isinstance(self.optimizer, torch.optim.SGD):
            warnings.warn(f"{type(self.optimizer).__name__}'s state is not known before its first step: "
                          "optimizer state will not be captured", RuntimeWarning, stacklevel=3)
        return specs

    def _meta(self, user: Mapping[str, Any] | None) -> dict:
        user = dict(user or {})
        meta = {
            "model_factory": user.pop("model_factory", None),
            "model_kwargs": user.pop("model_kwargs", {}),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__name__}",
            "loss": user.pop("loss", self._loss_name()),
            "optimizer": optimizer_meta(self.optimizer, self._names),
            "parameterization": user.pop("parameterization", None),
            "seed": user.pop("seed", None),
            "user": user,
        }
        try:
            json.dumps(meta)
        except TypeError as err:
            raise ValueError(f"meta must be JSON-serializable (no objects are pickled): {err}") from None
        return meta

    def _loss_name(self) -> str | None:
        """What ``meta["loss"]`` records: a criterion's class name, a loss closure's trusted name (or None)."""
        if self.loss_fn is None:
            return None
        if isinstance(self.loss_fn, BatchLoss):
            return self.loss_fn.name
        return type(self.loss_fn).__name__

    def _check_compatible(self, run, path) -> None:
        """A resumed run continues with the same model and optimizer: the same tensors both ways (a
        model holding a subset, or another optimizer's state, would leave stored slots unfilled)."""
        stored_class = (run.meta.get("optimizer") or {}).get("class")
        current = optimizer_meta(self.optimizer, self._names)
        if stored_class and current and stored_class != current["class"]:
            raise RunFileError(f"{path}: cannot resume: the run was recorded with {stored_class.rsplit('.', 1)[-1]}, "
                               f"this optimizer is {current['class'].rsplit('.', 1)[-1]}")
        stored = {(s.kind, s.name, s.key): s for s in run.specs}
        mine = {(s.kind, s.name, s.key): s for s in self._specs}
        for s in self._specs:
            old = stored.get((s.kind, s.name, s.key))
            if old is None or old.shape != s.shape:
                raise RunFileError(f"{path}: cannot resume: {s.kind} {s.name} has shape {s.shape}, "
                                   f"the run stores {None if old is None else old.shape}")
        for key, s in stored.items():
            if key not in mine and not (s.kind == "optim" and not self._predictable()):
                raise RunFileError(f"{path}: cannot resume: the run stores {s.kind} {s.name}"
                                   f"{'/' + s.key if s.key else ''}, which this model and optimizer do not have")

    def _predictable(self) -> bool:
        """Whether this optimizer's state tensors are known before its first step (see optimizer_state_specs)."""
        return self.optimizer is None or any(s.kind == "optim" for s in self._specs) or isinstance(
            self.optimizer, torch.optim.SGD)

    # -- the loop --------------------------------------------------------------------------------
    def step(self, loss: float | torch.Tensor | None = None) -> bool:
        """Call once after each optimizer step; captures when the schedule says so. Returns whether it did."""
        self.step_count += 1
        self._loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else (
            float("nan") if loss is None else float(loss))
        if self.writer is None or self.stopped:  # another rank writes the run file, or the disk filled up
            return False
        if self.sharpness_every and self.step_count % self.sharpness_every == 0:
            self.measure_sharpness()
        if self.should_capture(self.step_count):
            self.capture()
            return True
        return False

    def log_loss(self, value: float, step: int | None = None) -> None:
        """Log a training loss known apart from :meth:`step` (e.g. a framework's averaged logged loss)
        to the run's ``loss`` scalar log, at ``step`` (default: the current step). A run file from
        before that log existed (resumed) cannot grow one: the loss is then dropped, with one warning."""
        if self.writer is None or self.stopped:
            return
        try:
            with self._disk_guard():
                self.writer.log_scalar("loss", self.step_count if step is None else int(step), float(value))
        except KeyError:
            self._warn_once(f"{self.writer.path} has no loss log (an older run file): logged losses are not stored",
                            stacklevel=3)

    def capture(self, loss: float | None = None) -> None:
        """Capture a checkpoint at the current step now (the on-demand schedule uses only this);
        ``loss`` overrides the last loss passed to :meth:`step`."""
        if loss is not None:
            self._loss = float(loss)
        if self.writer is None or self.stopped or self._last_captured == self.step_count:
            return
        tensors: dict[str, torch.Tensor | None] = {}
        state = self.optimizer.state if self.optimizer is not None else {}
        for spec in self._specs:
            if spec.kind == "param":
                tensors[spec.id] = self._params[spec.name]
            elif spec.kind == "buffer":
                tensors[spec.id] = self._buffers[spec.name]
            else:
                value = state.get(self._params[spec.name], {}).get(spec.key)
                tensors[spec.id] = value if isinstance(value, torch.Tensor) else None
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups] if self.optimizer is not None else []
        with self._disk_guard():
            self.writer.append(self.step_count, tensors, loss=self._loss, lrs=lrs)
            self._last_captured = self.step_count

    @contextlib.contextmanager
    def _disk_guard(self):
        """A full disk raises into the loop, or (``on_disk_full="stop"``) stops capturing with one warning."""
        try:
            yield
        except DiskFullError as err:
            if self.on_disk_full == "raise":
                raise
            self.stopped = str(err.strerror)
            warnings.warn(f"capturing stopped: {self.stopped}", RuntimeWarning, stacklevel=4)

    def measure_sharpness(self) -> float:
        """The online sharpness on the stored batch (:class:`sharpscope.online.OnlineSharpness`): the top
        eigenvalue of the preconditioned Hessian when the optimizer defines one, else of the Hessian (module
        docstring). Logged to the run file, ``log_fn`` and ``summary_writer``, with its cost (run-file logs
        ``online_seconds``, ``online_products``); returns the value measured.

        The preconditioner is the one the next step will use: the optimizer's state and its groups'
        current learning rates (after a scheduler's step; a Hugging Face Trainer's logged
        ``learning_rate`` is the one of the step just taken). Where that value means nothing -- every
        learning rate 0 (the end of a linear schedule) or no second moment yet (Adam before its first
        step) -- nothing is logged: the step and the reason go to :attr:`sharpness_skipped`, with a
        ``RuntimeWarning``, and NaN is returned."""
        if self.online is None:  # measured on demand without sharpness_every
            if self.loss_fn is None or self.batch is None:
                raise ValueError("measure_sharpness needs loss_fn= and batch= (given to the Recorder)")
            self.online = OnlineSharpness(self.model, self.loss_fn, self.batch, self.optimizer, tol=self.sharpness_tol,
                                          warn=self._warn_once)
        m = self.online.measure(self.step_count)
        if m.skipped is not None:
            self.sharpness_skipped.append((self.step_count, m.skipped))
            return float("nan")
        self.sharpness_log.append((self.step_count, m.value))
        self.metrics_log.append((self.step_count, dict(m.metrics)))
        for name, v in m.metrics.items():
            self._log_scalar(_SCALAR_LOGS[name], v)
            if self.summary_writer is not None:
                self.summary_writer.add_scalar(f"sharpscope/{name}", v, self.step_count)
        self._log_scalar("online_seconds", m.seconds)
        self._log_scalar("online_products", float(m.num_matvecs))
        if self.log_fn is not None:
            self.log_fn(dict(m.metrics), self.step_count)
        return m.value

    @property
    def online_cost(self) -> OnlineCost | None:
        """What online sharpness cost so far (measurements, seconds, products per measurement), or None."""
        return self.online.cost() if self.online is not None else None

    def _warn_once(self, message: str, stacklevel: int = 4) -> None:
        """The Recorder's one warn-once: each distinct message is warned once (``RuntimeWarning``)."""
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def _log_scalar(self, name: str, value: float) -> None:
        """Append to a run-file scalar log; a resumed file from before that log existed drops it (one warning)."""
        try:
            with self._disk_guard():
                self.writer.log_scalar(name, self.step_count, value)
        except KeyError:
            self._warn_once(f"{self.writer.path} has no scalar log {name!r} (an older run file): not stored there")

    def close(self) -> None:
        """Close the run file; log what online sharpness cost (logger ``sharpscope``, INFO) with its share of
        the time since the Recorder was created (:meth:`sharpscope.online.OnlineCost.describe`)."""
        cost = self.online_cost
        if cost is not None and cost.measurements and not self._cost_logged:
            self._cost_logged = True
            _log.info("%s", cost.describe(time.perf_counter() - self._started))
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
