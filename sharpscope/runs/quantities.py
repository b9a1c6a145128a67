"""The quantities spectrum jobs measure: one frozen description per quantity, used by the jobs, the
comparisons and the report.

Each :class:`Quantity` says how it is named and labelled, which solver settings identify a stored
result (its key in the spectra file), how it is stored (``kind``), what it needs (a loss, the
optimizer) and how to measure it at one checkpoint. Adding a quantity is one entry in
:data:`REGISTRY`.

============  ===================================================================================
``hessian``   top-k Hessian eigenvalues (Lanczos, ``which="LA"``)
``precond``   top-k of the optimizer-preconditioned Hessian ``D^1/2 H D^1/2`` (info: its threshold)
``ggn``       top-k of the generalized Gauss-Newton matrix
``ntk``       top-k of the empirical NTK ``J J^T`` on the stored inputs
``trace``     Hessian trace by Hutch++ (values: [estimate], residuals: [stderr])
``density``   SLQ spectral density (values: nodes, residuals: weights; info: nodes per probe)
``layers``    top Hessian eigenvalue of each parameter-owning module (values in ``info["layers"]`` order)
``alignment`` per weight-like layer, alignment of its update since step 0 (values) and of its weights
              (residuals) with its inputs, 0 none .. 1 full (:mod:`sharpscope.alignment`; info: the
              layers, fan-ins and the terms M, N, F of both; needs the run's step-0 checkpoint)
============  ===================================================================================
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
from torch import nn

__all__ = ["Quantity", "Measurement", "Checkpoint", "REGISTRY", "QUANTITIES", "get", "layer_groups"]

Kind = Literal["eigenvalues", "trace", "density", "layers", "alignment"]


@dataclass(frozen=True)
class Checkpoint:
    """What a quantity is measured on: the rebuilt model at one step, its stored batch, the loss,
    the optimizer (for ``precond``; None otherwise), the job's settings and, for quantities that
    compare with the start of training (``alignment``), the model at step 0 (or why it is missing).
    A Mapping batch (a Hugging Face run) comes with a loss closure (:class:`~sharpscope.BatchLoss`):
    ``data`` and ``inputs`` are then both the batch."""

    model: nn.Module
    data: tuple[Any, Any]
    inputs: Any
    loss_fn: Callable | None
    optimizer: Any
    settings: Any  # sharpscope.runs.jobs.SpectrumSettings
    initial: nn.Module | None = None
    initial_error: str | None = None


@dataclass(frozen=True)
class Measurement:
    """One stored result: values, residuals (stderr or weights by kind), products used and extra info."""

    values: np.ndarray
    residuals: np.ndarray
    num_matvecs: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Quantity:
    """A measurable quantity.

    Attributes:
        name: its name in files, on the command line and in the report.
        label: the axis label of its figures.
        kind: how its results are stored and read (``eigenvalues``: the first value is the top one).
        settings: the fields of :class:`~sharpscope.runs.jobs.SpectrumSettings` that identify a result,
            as ``(key in the stored JSON, settings attribute or a fixed value)``.
        measure: ``measure(checkpoint) -> Measurement``.
        needs_loss, needs_optimizer, needs_initial: what the checkpoint must provide (``needs_initial``:
            the model at step 0, rebuilt from the run's step-0 checkpoint).
    """

    name: str
    label: str
    kind: Kind
    settings: tuple[tuple[str, Any], ...]
    measure: Callable[[Checkpoint], Measurement]
    needs_loss: bool = True
    needs_optimizer: bool = False
    needs_initial: bool = False

    def key(self, settings: Any) -> str:
        """The canonical JSON of the settings that identify a result of this quantity (byte-identical to
        the keys stored by earlier versions for the same settings, so stored results are found)."""
        relevant: dict[str, Any] = {"seed": settings.seed, "batchnorm": settings.batchnorm}
        for key, source in self.settings:
            relevant[key] = getattr(settings, source) if isinstance(source, str) else source
        relevant.update(settings.extra_key())
        return json.dumps(relevant, sort_keys=True)


# -- how each is measured ----------------------------------------------------------------------------------
def _top_k(op, cp: Checkpoint, info: dict[str, Any] | None = None) -> Measurement:
    from ..lanczos import lanczos

    s = cp.settings
    if s.k >= op.shape[0]:
        raise ValueError(f"k={s.k} is not below the operator's dimension {op.shape[0]}: ask for fewer eigenvalues")
    res = lanczos(op, k=s.k, tol=s.tol, seed=s.seed)
    return Measurement(res.eigenvalues.numpy(), res.residuals.numpy(), res.num_matvecs,
                       {**(info or {}), "converged": res.converged.tolist()})


def _common(cp: Checkpoint) -> dict[str, Any]:
    return {"batchnorm": cp.settings.batchnorm}


def _hessian(cp: Checkpoint) -> Measurement:
    from ..operators import hessian_operator

    return _top_k(hessian_operator(cp.model, cp.loss_fn, cp.data, **_common(cp)), cp)


def _precond(cp: Checkpoint) -> Measurement:
    from ..preconditioning import preconditioned_hessian_operator

    op = preconditioned_hessian_operator(cp.model, cp.loss_fn, cp.data, cp.optimizer, **_common(cp))
    return _top_k(op, cp, {"threshold": op.threshold})


def _ggn(cp: Checkpoint) -> Measurement:
    from ..operators import ggn_operator

    return _top_k(ggn_operator(cp.model, cp.loss_fn, cp.data, **_common(cp)), cp)


def _ntk(cp: Checkpoint) -> Measurement:
    from ..closures import BatchLoss
    from ..operators import ntk_operator

    if isinstance(cp.loss_fn, BatchLoss):  # a Mapping batch: the NTK of the closure's outputs
        return _top_k(ntk_operator(cp.model, cp.loss_fn, cp.data, **_common(cp)), cp)
    return _top_k(ntk_operator(cp.model, cp.inputs, **_common(cp)), cp)


def _trace(cp: Checkpoint) -> Measurement:
    from ..estimators import hutchpp_trace
    from ..operators import hessian_operator

    s = cp.settings
    est = hutchpp_trace(hessian_operator(cp.model, cp.loss_fn, cp.data, **_common(cp)), s.trace_matvecs, seed=s.seed)
    return Measurement(np.array([est.estimate]), np.array([est.stderr]), est.num_matvecs)


def _density(cp: Checkpoint) -> Measurement:
    from ..estimators import spectral_density
    from ..operators import hessian_operator

    s = cp.settings
    dens = spectral_density(hessian_operator(cp.model, cp.loss_fn, cp.data, **_common(cp)), s.density_probes,
                            s.density_steps, seed=s.seed)
    return Measurement(np.concatenate(dens.nodes), np.concatenate(dens.weights), dens.num_matvecs,
                       {"nodes_per_probe": [len(n) for n in dens.nodes]})


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


def _layers(cp: Checkpoint) -> Measurement:
    from ..lanczos import lanczos
    from ..operators import hessian_operator

    s = cp.settings
    groups = layer_groups(cp.model)
    values, products = [], 0
    for name in groups:
        op = hessian_operator(cp.model, cp.loss_fn, cp.data, params=groups[name], **_common(cp))
        if op.shape[0] > 1:
            res = lanczos(op, k=1, tol=s.tol, seed=s.seed)
            values.append(float(res.eigenvalues[0]))
            products += res.num_matvecs
        else:  # a one-entry layer: its Hessian is a number
            values.append(float(op.to_dense()[0, 0]))
            products += 1
    return Measurement(np.array(values), np.zeros(len(values)), products, {"layers": list(groups)})


def _alignment(cp: Checkpoint) -> Measurement:
    """Per layer: alignment of the update since step 0 (values; NaN at step 0, where it is zero) and of
    the effective weights (residuals) with the layer's inputs on the stored batch; info holds the
    layer names, fan-ins and the terms (measured M, no-alignment N, full-alignment F, entry RMSs) of
    both, from which the report fits the exponents across widths."""
    from ..alignment import layer_alignment

    if cp.initial is None:
        raise ValueError(cp.initial_error or "alignment needs the run's step-0 checkpoint (the initial weights)")
    layers = layer_alignment(cp.model, cp.inputs, cp.initial, batchnorm=cp.settings.batchnorm)

    def terms(t) -> dict[str, float]:
        return {"measured": t.measured, "none": t.none, "full": t.full, "rms_u": t.rms_u, "rms_x": t.rms_x}

    info = {"layers": [la.name for la in layers], "fan_in": [la.fan_in for la in layers],
            "update": [terms(la.update) for la in layers], "params": [terms(la.params) for la in layers]}
    return Measurement(np.array([la.update.alignment for la in layers]),
                       np.array([la.params.alignment for la in layers]), 0, info)


_TOP_K = (("k", "k"), ("tol", "tol"))
REGISTRY: dict[str, Quantity] = {q.name: q for q in (
    Quantity("hessian", "sharpness: top eigenvalue of H", "eigenvalues", _TOP_K, _hessian),
    Quantity("precond", "preconditioned sharpness: top eig. of P^-1 H", "eigenvalues", _TOP_K, _precond,
             needs_optimizer=True),
    Quantity("ggn", "top eigenvalue of the Gauss-Newton G", "eigenvalues", _TOP_K, _ggn),
    Quantity("ntk", "top eigenvalue of the NTK J J^T", "eigenvalues", _TOP_K, _ntk, needs_loss=False),
    Quantity("trace", "trace of H (Hutch++)", "trace", (("matvecs", "trace_matvecs"),), _trace),
    Quantity("density", "Hessian spectral density (SLQ)", "density",
             (("probes", "density_probes"), ("steps", "density_steps")), _density),
    Quantity("layers", "top Hessian eigenvalue per layer", "layers", (("k", 1), ("tol", "tol")), _layers),
    Quantity("alignment", "alignment of the update with the layer input (0 none, 1 full)", "alignment", (),
             _alignment, needs_loss=False, needs_initial=True),
)}
QUANTITIES = tuple(REGISTRY)


def get(name: str) -> Quantity:
    """The registered quantity ``name``, or a one-line error listing them."""
    if name not in REGISTRY:
        raise ValueError(f"unknown quantity {name!r}; choose from {', '.join(QUANTITIES)}")
    return REGISTRY[name]
