"""Rebuilding a run's model, loss and optimizer from its meta: no pickle, and only trusted names.

Every name a run file holds (model factory, loss, optimizer class) goes through
:func:`sharpscope.registry.resolve_trusted` before anything is imported: a crafted file cannot run
code, and nothing the file holds (a probe file it names, a checksum) can make its names trusted. The
checkpoint must then cover the rebuilt model: every parameter and persistent buffer (by ``state_dict``
key, tied weights once) stored with its shape -- a model rebuilt with other kwargs,
or a row missing a tensor, would otherwise be measured partly at its fresh random initialization.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..registry import UntrustedNameError, is_trusted, resolve_trusted
from .store import RunFileError

__all__ = ["build_loss", "model_at", "optimizer_at", "NoOptimizerState", "check_trusted"]


def build_loss(spec: str | None, allow: Iterable[str] = (), where: str = "the run file") -> Callable:
    """A loss from its name in ``torch.nn`` (``"CrossEntropyLoss"``) or a trusted ``"module:function"``
    factory (:mod:`sharpscope.registry`; it may return a loss closure, ``sharpscope.hf:causal_lm_loss``)."""
    if not spec:
        raise ValueError("the run's meta names no loss: pass loss= (a torch.nn loss name or 'module:function')")
    if not isinstance(spec, str):
        raise ValueError(f"{where} names the loss {spec!r}: expected a torch.nn loss name or 'module:function'")
    if ":" not in spec:
        cls = getattr(nn, spec, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.modules.loss._Loss)):
            raise ValueError(f"unknown loss {spec!r}: not a torch.nn loss; give 'module:function'")
        return cls()
    return resolve_trusted("loss", spec, allow, where)()


def _made_by_a_sweep(meta: Mapping[str, Any]) -> bool:
    user = meta.get("user")
    return isinstance(user, Mapping) and isinstance(user.get("probe"), Mapping)


def check_trusted(run, allow: Iterable[str] = (), loss: str | None = None) -> None:
    """Refuse, before any of it is called, a run whose model factory, loss or optimizer class is not trusted
    (:mod:`sharpscope.registry`). Trust comes from ``allow`` and the registry only, never from the run file: a
    probe file the run names (a sweep's record) grants nothing; a sweep's run gets a hint naming the fix."""
    meta, where = run.meta, str(run.path)
    names = [("model", meta.get("model_factory"))]
    stored_loss = meta.get("loss")
    if loss is None and isinstance(stored_loss, str) and ":" in stored_loss:  # an override is the user's own
        names.append(("loss", stored_loss))
    info = meta.get("optimizer")
    if isinstance(info, Mapping) and info.get("class"):
        names.append(("optimizer", info["class"]))
    for kind, spec in names:
        try:
            is_trusted(kind, spec, allow, where, check_object=True)
        except UntrustedNameError as err:
            if not _made_by_a_sweep(meta):
                raise
            raise UntrustedNameError(f"{err}; or, if you made this run with `sharpscope sweep PROBE.toml`, run that "
                                     "sweep again (a sweep trusts its own probe's factory and loss)") from None


def _rebuilt_model(run, allow: Iterable[str]) -> nn.Module:
    meta = run.meta
    factory = meta.get("model_factory")
    if not factory:
        raise ValueError(f"{run.path}: meta has no model_factory ('module:function'): the model cannot be "
                         "rebuilt offline; pass meta={'model_factory': ..., 'model_kwargs': ...} to the Recorder")
    build = resolve_trusted("model", factory, allow, where=str(run.path))
    kwargs = meta.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RunFileError(f"{run.path}: model_kwargs must be a JSON object, got {type(kwargs).__name__}")
    try:
        model = build(**kwargs)
    except TypeError as err:
        raise ValueError(f"{run.path}: factory {factory!r} rejected kwargs {sorted(kwargs)}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{run.path}: factory {factory!r} returned {type(model).__name__}, not an nn.Module")
    record = meta.get("parameterization")
    if isinstance(record, Mapping):  # a parametrize() record: re-applied; a string is only a label
        from ..param import parametrize_from_record

        parametrize_from_record(model, record)
    return model


def _required_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by ``state_dict`` key, a tied tensor under its first name."""
    seen: set[int] = set()
    required = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            required[name] = tensor
    return required


def model_at(run, step: int, dtype: torch.dtype | None = None, allow: Iterable[str] = ()) -> nn.Module:
    """The run's model rebuilt from its meta (trusted factory + kwargs, then the recorded
    parameterization's forward multipliers, without re-initializing) with the checkpoint at ``step``
    loaded; the checkpoint must hold every tensor of the rebuilt model (module docstring)."""
    model = _rebuilt_model(run, allow)
    state = {**run.params(step), **run.buffers(step)}
    present = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in state.items():
        if name not in present:
            raise RunFileError(f"{run.path}: checkpoint tensor {name} does not exist in the rebuilt model")
        if tuple(present[name].shape) != tuple(tensor.shape):
            raise RunFileError(f"{run.path}: checkpoint tensor {name} has shape {tuple(tensor.shape)} but the "
                               f"rebuilt model's has {tuple(present[name].shape)}")
    missing = [name for name in _required_tensors(model) if name not in state]
    if missing:
        raise RunFileError(f"{run.path}: the checkpoint at step {step} does not cover the rebuilt model: "
                           f"{missing[0]} is not stored ({len(missing)} tensor(s) missing; was the model rebuilt "
                           "with other kwargs than the run used?)")
    with torch.no_grad():
        for name, tensor in state.items():
            present[name].copy_(tensor)
    return model.to(dtype) if dtype is not None else model


class NoOptimizerState(ValueError):  # noqa: N818 - a public name since 0.1 (not an error: "not applicable")
    """The checkpoint precedes the optimizer's first step (e.g. Adam at step 0): 'precond' does not apply."""


def _tuples(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}


def _set_lrs(run, step: int, opt: torch.optim.Optimizer) -> None:
    """The groups' lrs at ``step`` as stored with the checkpoint (a scheduler changes them; the recorded
    groups hold those at the Recorder's construction). Every lr 0 (the end of a linear schedule):
    :class:`NoOptimizerState`, as the preconditioned sharpness of a zero step is undefined."""
    try:
        lrs = run.lrs(step)
    except (KeyError, IndexError, ValueError):
        return
    if len(lrs) != len(opt.param_groups) or not all(math.isfinite(lr) for lr in lrs):
        return
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    if lrs and all(lr == 0 for lr in lrs):
        raise NoOptimizerState(f"every learning rate is 0 at step {step} (e.g. the end of a linear schedule): "
                               "the preconditioned sharpness of a zero step is undefined")


def optimizer_at(run, step: int, model: nn.Module, allow: Iterable[str] = ()) -> torch.optim.Optimizer:
    """Rebuild the optimizer (trusted class, groups, hyper-parameters) and load its state at ``step``."""
    info = run.meta.get("optimizer")
    if not info:
        raise ValueError(f"{run.path}: no optimizer recorded: 'precond' needs the Recorder's optimizer=")
    if not isinstance(info, Mapping) or not isinstance(info.get("param_groups"), list):
        raise RunFileError(f"{run.path}: the recorded optimizer is not a Recorder's description (got "
                           f"{type(info).__name__})")
    cls = resolve_trusted("optimizer", info.get("class"), allow, where=str(run.path))
    params = dict(model.named_parameters())
    groups = []
    for g in info["param_groups"]:
        unknown = [n for n in g.get("params", []) if n not in params]
        if unknown:
            raise RunFileError(f"{run.path}: the optimizer's parameter {unknown[0]} is not in the rebuilt model")
        groups.append({**_tuples({k: v for k, v in g.items() if k != "params"}),
                       "params": [params[n] for n in g["params"]]})
    defaults = _tuples(info.get("defaults") or {})
    opt = cls(groups, **{k: v for k, v in defaults.items() if k in ("lr",)})
    opt.defaults.update(defaults)
    _set_lrs(run, step, opt)
    for name, st in run.optimizer_state(step).items():
        if any(torch.isnan(v).any() for v in st.values()):
            raise NoOptimizerState(f"no optimizer state at step {step}: the optimizer had not stepped yet, "
                                   f"its preconditioner is undefined")
        opt.state[params[name]] = dict(st)
    return opt
