r"""The Hessian seen through an optimizer's per-parameter step sizes, and its stability threshold.

With reference learning rate :math:`\eta_{ref}` = ``optimizer.defaults["lr"]`` and the effective
step size :math:`s_i` of parameter entry :math:`i` (its group's lr divided by the optimizer's
preconditioner :math:`p_i`), the operator is

.. math::  \tilde H = D^{1/2} H D^{1/2}, \qquad D = \mathrm{diag}(s / \eta_{ref}).

Gradient descent with per-parameter steps :math:`D \eta_{ref}` on a quadratic is stable iff
:math:`\lambda_{max}(\tilde H) < 2/\eta_{ref}` (heavy-ball momentum :math:`\mu`: :math:`(2+2\mu)/\eta_{ref}`),
so this is the sharpness to compare with the thresholds of :func:`stability_threshold`
(Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"). For Adam (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"):
:math:`p_i = (1-\beta_1^t)(\sqrt{\hat v_i} + \epsilon)` and the threshold is
:math:`(2 + 2\beta_1)/((1-\beta_1)\eta_{ref})` (38/eta at beta1 = 0.9). Because :math:`D` absorbs the
per-layer learning rates, :math:`\lambda_{max}(\tilde H)` is invariant under the abc-symmetry of
parameterizations (Everett et al. 2024) and comparable across widths and parameterizations.

Adam-atan2 (:class:`sharpscope.optim.AdamAtan2`, Everett et al. 2024) updates by
:math:`\eta\, a\, \mathrm{atan2}(\hat m, b\sqrt{\hat v})`. Derived here (not read from a paper):
linearizing that update in the first moment around the current state, with :math:`\hat v` frozen
as for Adam, a perturbation :math:`\delta m` of the raw EMA moves the parameter by
:math:`\eta\, a\, x\, \delta m / ((1-\beta_1^t)(x^2 + \hat m^2))`, :math:`x = b\sqrt{\hat v}`
(the derivative of atan2 in its first argument). So its preconditioner is
:math:`p_i = (1-\beta_1^t)(x_i^2 + \hat m_i^2)/(a\, x_i)`, which is Adam's with
:math:`\epsilon = 0` and lr times a/b where :math:`|\hat m| \ll b\sqrt{\hat v}` and larger (a
saturated atan2 responds less) where the first moment is not small against the second. The update
is the same EMA momentum as Adam's, so the threshold is Adam's,
:math:`(2+2\beta_1)/((1-\beta_1)\eta_{ref})`. Approximations: :math:`\hat v` frozen (it moves by a
fraction :math:`1-\beta_2` per step), the tangent of atan2 at the current :math:`\hat m` (exact for
small perturbations; the next step's :math:`\hat m` is not the current one), and entries with no
gradient history (:math:`v = 0`, where atan2 acts as a sign step with no linearization) excluded
(:math:`s_i = 0`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .distributed import model_values
from .linop import StaleOperatorError, SymmetricOperator
from .operators import HessianOperator, HvpMode, hessian_operator
from .stability import eos_threshold

__all__ = ["preconditioned_hessian_operator", "stability_threshold", "effective_step_sizes",
           "PreconditionedOperator"]

_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def _lr(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _reference_lr(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.defaults.get("lr")
    if lr is None:
        raise ValueError(f"{type(optimizer).__name__} has no default lr (optimizer.defaults['lr']); "
                         "pass reference_lr=")
    return _lr(lr)


def stability_threshold(optimizer: torch.optim.Optimizer, reference_lr: float | None = None) -> float:
    r"""The edge-of-stability value of the preconditioned sharpness for this optimizer.

    SGD (momentum, dampening, Nesterov), Adam/AdamW, Adam-atan2 and Adafactor, with the hyper-parameters
    read from ``optimizer.defaults`` and :math:`\eta` = ``reference_lr`` (default ``defaults["lr"]``); the
    formulas are :func:`sharpscope.stability.eos_threshold`'s.
    """
    eta = reference_lr if reference_lr is not None else _reference_lr(optimizer)
    d, rule = optimizer.defaults, _update_rule(optimizer)
    if rule == "sgd":
        return eos_threshold(rule, eta, float(d.get("momentum", 0.0)), dampening=float(d.get("dampening", 0.0)),
                             nesterov=bool(d.get("nesterov", False)))
    if rule in ("adam", "adam-atan2"):
        return eos_threshold(rule, eta, beta1=float(d["betas"][0]))
    return eos_threshold(rule, eta)


def _update_rule(optimizer: torch.optim.Optimizer) -> str:
    """The update rule (:data:`sharpscope.stability.UPDATE_RULES`) of torch's SGD, Adam, AdamW and Adafactor,
    or the one an optimizer class declares as ``update_rule`` (:class:`sharpscope.optim.AdamAtan2`)."""
    declared = getattr(type(optimizer), "update_rule", None)
    if declared is not None:
        return declared
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, _ADAM):
        return "adam"
    if isinstance(optimizer, torch.optim.Adafactor):
        return "adafactor"
    raise ValueError(_unsupported(optimizer))


def _unsupported(optimizer: torch.optim.Optimizer) -> str:
    name = type(optimizer).__name__
    if name == "Muon":
        return ("Muon's orthogonalized (Newton-Schulz) update is not a diagonal preconditioner: its "
                "preconditioned sharpness is not defined here; use the raw Hessian (ss.hessian_operator)")
    return f"preconditioned sharpness is implemented for SGD, Adam, AdamW, Adam-atan2 and Adafactor, not {name}"


def _adam_preconditioner(state: dict, group: dict, name: str) -> torch.Tensor:
    if "exp_avg_sq" not in state:
        raise ValueError(f"Adam has no second-moment state for {name} yet: take at least one optimizer step")
    t = _lr(state["step"])
    beta1, beta2 = group["betas"]
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    v_hat = v / (1.0 - beta2 ** t)
    return (1.0 - beta1 ** t) * (v_hat.sqrt() + group["eps"])


def _adam_atan2_step(state: dict, group: dict, name: str) -> torch.Tensor:
    """Adam-atan2's step per entry: the tangent gain of ``lr a atan2(m_hat, b sqrt(v_hat))`` in the raw
    first moment, ``lr a x / ((1 - beta1^t)(x^2 + m_hat^2))``, x = b sqrt(v_hat); 0 where v = 0."""
    if "exp_avg_sq" not in state:
        raise ValueError(f"Adam-atan2 has no second-moment state for {name} yet: take at least one optimizer step")
    t = _lr(state["step"])
    beta1, beta2 = group["betas"]
    bc1 = 1.0 - beta1 ** t
    x = float(group["b"]) * (state["exp_avg_sq"] / (1.0 - beta2 ** t)).sqrt()
    m_hat = state["exp_avg"] / bc1
    den = bc1 * (x * x + m_hat * m_hat)
    gain = torch.where(x > 0, x / torch.where(x > 0, den, torch.ones_like(den)), torch.zeros_like(x))
    return _lr(group["lr"]) * float(group["a"]) * gain


def _adafactor_step(state: dict, group: dict, param: torch.Tensor, name: str) -> torch.Tensor:
    """torch.optim.Adafactor's step per entry, ``alpha_t / sqrt(v_est)`` (update clipping ignored: it only shrinks steps)."""
    if "step" not in state:
        raise ValueError(f"Adafactor has no state for {name} yet: take at least one optimizer step")
    t = _lr(state["step"])
    eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(param.dtype).eps
    eps2 = group["eps"][1]
    rho = min(_lr(group["lr"]), 1.0 / t ** 0.5)
    alpha = max(eps2, float(param.detach().norm()) / param.numel() ** 0.5) * rho
    if param.dim() > 1:
        row, col = state["row_var"], state["col_var"]
        v_est = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:
        v_est = state["variance"]
    return alpha * v_est.clamp(min=eps1 * eps1).rsqrt()


def effective_step_sizes(optimizer: torch.optim.Optimizer, named_params: Sequence[tuple[str, torch.Tensor]]
                         ) -> list[torch.Tensor]:
    """Per-entry effective step size ``s_i = lr_group / p_i`` for each given parameter."""
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    steps = []
    for name, p in named_params:
        group = where.get(id(p))
        if group is None:
            raise ValueError(f"parameter {name} is not in the optimizer's param groups")
        state = optimizer.state.get(p, {})
        if isinstance(optimizer, torch.optim.SGD):
            s = torch.full_like(p, _lr(group["lr"]))
        elif isinstance(optimizer, _ADAM):
            s = _lr(group["lr"]) / _adam_preconditioner(state, group, name)
        elif _update_rule(optimizer) == "adam-atan2":
            s = _adam_atan2_step(state, group, name)
        elif isinstance(optimizer, torch.optim.Adafactor):
            s = _adafactor_step(state, group, p, name)
        else:
            raise ValueError(_unsupported(optimizer))
        steps.append(s.detach().to(p.dtype))
    return steps


class PreconditionedOperator(SymmetricOperator):
    r""":math:`D^{1/2} H D^{1/2}` for a diagonal :math:`D` given as the flat vector ``d_sqrt`` = :math:`D^{1/2}`.

    Built by :func:`preconditioned_hessian_operator` with the optimizer, it follows the optimizer like
    the Hessian follows the model: :math:`D` is read again when the optimizer's state or learning
    rates changed since (between solves; inside one, a change raises :class:`StaleOperatorError`).
    """

    def __init__(self, base: SymmetricOperator, d_sqrt: torch.Tensor, threshold: float | None = None,
                 optimizer: torch.optim.Optimizer | None = None, reference_lr: float | None = None) -> None:
        super().__init__(base.shape[0], base.dtype, base.device)
        self.base, self.threshold = base, threshold
        self.optimizer, self.reference_lr = optimizer, reference_lr
        self._set_diagonal(d_sqrt)
        self._state = self._optimizer_fingerprint()

    def _set_diagonal(self, d_sqrt: torch.Tensor) -> None:
        if d_sqrt.shape != (self.base.shape[0],):
            raise ValueError(f"diagonal has shape {tuple(d_sqrt.shape)}, expected ({self.base.shape[0]},)")
        if not torch.isfinite(d_sqrt).all() or (d_sqrt < 0).any():
            raise FloatingPointError("the preconditioner's step sizes contain NaN, inf or negative values")
        self.d_sqrt = d_sqrt.to(self.base.dtype)
        self.dtype, self.device = self.base.dtype, self.base.device

    def _optimizer_fingerprint(self) -> tuple:
        """The optimizer state D is read from, cheaply: state tensors' versions and storage, the lrs,
        and the base operator's parameters (a rebuilt Hessian means other tensors)."""
        if self.optimizer is None or not isinstance(self.base, HessianOperator):
            return ()
        state = []
        for p in self.base.fn.params:
            for key, value in sorted(self.optimizer.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor):
                    state.append((key, value._version, value.data_ptr()))
                else:
                    state.append((key, value))
        lrs = tuple(_lr(g["lr"]) for g in self.optimizer.param_groups)
        return (tuple(id(p) for p in self.base.fn.params), tuple(state), lrs)

    def _sync(self) -> None:
        try:
            self._follow_optimizer()
        except Exception as err:  # a data-parallel base reports it to every rank at the next product
            defer = getattr(self.base, "_defer", None)
            if not (callable(defer) and defer(err)):
                raise

    def _follow_optimizer(self) -> None:
        self.base._sync()
        now = self._optimizer_fingerprint()
        if now == self._state:
            return
        if self._pins:
            raise StaleOperatorError("PreconditionedOperator: the optimizer's state or learning rates changed "
                                     "during a solve: do not step the optimizer while lanczos or an estimator runs")
        H = self.base
        steps = effective_step_sizes(self.optimizer, list(zip(H.fn.names, H.fn.params)))
        self._set_diagonal(torch.sqrt(H.fn.flatten(steps) / self.reference_lr))
        self.threshold = stability_threshold(self.optimizer, self.reference_lr)
        self._state = now

    def _dependencies(self) -> tuple[SymmetricOperator, ...]:
        return (self.base,)

    @contextlib.contextmanager
    def pinned(self) -> Iterator["PreconditionedOperator"]:
        """:meth:`SymmetricOperator.pinned`; on a data-parallel base, the ranks' step sizes ``D`` are compared
        at the start of each solve too (:func:`_check_same_preconditioner`)."""
        outermost = not self._pins
        with super().pinned():
            group = getattr(self.base, "_group", None)
            if outermost and group is not None:
                _check_same_preconditioner(group, self.d_sqrt, skip=getattr(self.base, "_deferred", None) is not None)
            yield self

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.d_sqrt * self.base.matvec(self.d_sqrt * v)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``D^1/2 H (D^1/2 V)``: one block product of the base operator (batched where it batches)."""
        d = self.d_sqrt[:, None]
        return d * self.base.matmat(d * V)


def preconditioned_hessian_operator(model: nn.Module, loss_fn: Callable, data: Any,
                                   optimizer: torch.optim.Optimizer, *,
                                   params: Sequence[str] | str | None = None,
                                   reference_lr: float | None = None, hvp_mode: HvpMode = "auto",
                                   batchnorm: str = "batch", graph_memory_budget: int | None = None,
                                   batched: bool | None = None, distributed: Any = None) -> PreconditionedOperator:
    """``D^{1/2} H D^{1/2}`` with ``D = diag(s / eta_ref)`` from the optimizer's state (module docstring).

    Its top eigenvalue is compared with ``op.threshold`` = :func:`stability_threshold`. The step
    sizes are read here and again whenever the optimizer's state or lrs change between solves.
    ``batched`` is the Hessian's (its block products serve :meth:`~sharpscope.linop.SymmetricOperator.matmat`).
    ``distributed=`` makes the Hessian data-parallel (:func:`~sharpscope.hessian_operator`); ``D`` is read
    from each rank's optimizer, which must hold the same state (DDP's does): checked here, refused if not.
    """
    from .distributed import is_fsdp_model, unwrap_model

    if distributed is not None and distributed is not False and is_fsdp_model(unwrap_model(model)):
        raise ValueError("preconditioned_hessian_operator does not support FSDP2-sharded models (fully_shard): "
                         "use hessian_operator, which multiplies them by finite differences")
    H: HessianOperator = hessian_operator(model, loss_fn, data, params=params, hvp_mode=hvp_mode,
                                          batchnorm=batchnorm, graph_memory_budget=graph_memory_budget,
                                          batched=batched, distributed=distributed)
    group = H._group
    with group.guarded() if group is not None else contextlib.nullcontext():
        eta = reference_lr if reference_lr is not None else _reference_lr(optimizer)
        named = list(zip(H.fn.names, H.fn.params))
        steps = effective_step_sizes(optimizer, named)
        d_sqrt = torch.sqrt(H.fn.flatten(steps) / eta)
    if group is not None:
        _check_same_preconditioner(group, d_sqrt)
    return PreconditionedOperator(H, d_sqrt, stability_threshold(optimizer, eta), optimizer=optimizer,
                                  reference_lr=eta)


def _check_same_preconditioner(group, d_sqrt: torch.Tensor, skip: bool = False) -> None:
    """Refuse ranks whose optimizers give different step sizes: ``D^1/2``'s dot products with two seeded random
    vectors compared with rank 0's (:func:`~sharpscope.distributed.model_values`; a sum and a norm would miss
    two entries swapped)."""
    group.agree_on_values("preconditioned_hessian_operator", model_values(["d_sqrt"], [d_sqrt]), "", skip,
                          subject="optimizer step sizes",
                          fix="every rank needs the same optimizer state (DDP keeps it so)")
