"""Rebuilding a run's model, loss and optimizer from its meta: no pickle, only named factories."""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from ..models import build_model, resolve_factory
from .store import RunFileError

__all__ = ["build_loss", "model_at", "optimizer_at", "NoOptimizerState"]


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
        from ..param import parametrize_from_record

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


def optimizer_at(run, step: int, model: nn.Module) -> torch.optim.Optimizer:
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

