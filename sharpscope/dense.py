"""Dense ground truth for small problems, by a different differentiation path than the operators.

``torch.autograd.functional.hessian`` / ``jacobian`` of the *flattened*-parameter function, one
row at a time: the references the test-suite and users check operators and estimators against
(use float64 models). Memory is ``O(P^2)``: a few thousand parameters.
(Not ``torch.func.hessian``/``jacrev``: their ``vmap`` gives wrong, even asymmetric, Hessians for
``nn.MultiheadAttention`` in torch 2.13 -- checked against finite differences in the tests.)
Attention runs on the math SDPA kernel here (the fused CPU kernels have no forward-mode derivative).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .closures import BatchLoss, closure_batches
from .functional import BatchNormMode, ModelFunction, as_batches, loss_reduction_weight

__all__ = ["dense_hessian", "dense_ggn", "dense_jacobian", "ntk_gram"]


def _exact_mode(fn: ModelFunction):
    """Deterministic mode plus the math attention kernel, which supports every derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(fn.deterministic())
    stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def _check_size(fn: ModelFunction, max_params: int) -> None:
    if fn.dim > max_params:
        raise ValueError(f"dense references are for small problems: {fn.dim} parameters > max_params={max_params}")


def _setup(model: nn.Module, loss_fn: Any, data: Any, params, batchnorm: BatchNormMode, max_params: int,
           outputs: bool = False):
    """``(fn, batches, weight of a batch, loss of outputs)``; with a loss closure (:func:`~sharpscope.batch_loss`)
    ``fn`` evaluates its loss (``outputs``: its outputs) and batches are weighted by its ``weight``."""
    closure = loss_fn if isinstance(loss_fn, BatchLoss) else None
    if closure is not None:
        if outputs:
            closure.require_outputs("the dense reference")
        fn = ModelFunction(model, params, batchnorm, call=closure.outputs if outputs else closure.loss)
        _check_size(fn, max_params)
        batches = list(closure_batches(data, fn.device, None, closure))
        total = sum(b.size for b in batches)
        criterion = closure.loss_of_outputs if outputs else (lambda out, _: out)
        return fn, batches, (lambda b: b.size / total), criterion
    fn = ModelFunction(model, params, batchnorm)
    _check_size(fn, max_params)
    batches = list(as_batches(data, fn.device))
    total = sum(b.size for b in batches)
    return fn, batches, (lambda b: loss_reduction_weight(loss_fn, b.size, total)), loss_fn


def dense_hessian(model: nn.Module, loss_fn: Callable | BatchLoss, data: Any, *,
                  params: Sequence[str] | str | None = None, batchnorm: BatchNormMode = "batch",
                  max_params: int = 5000) -> torch.Tensor:
    """The ``P x P`` Hessian of the sample-weighted full-data loss (``loss_fn`` a criterion or a loss closure)."""
    fn, batches, weight, criterion = _setup(model, loss_fn, data, params, batchnorm, max_params)
    theta = fn.flat_params()

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        ps = fn.unflatten(flat)
        return sum(weight(b) * criterion(fn(ps, b.inputs), b.targets) for b in batches)

    with _exact_mode(fn):
        H = torch.autograd.functional.hessian(loss_of, theta)
    return (H + H.T) / 2


def dense_jacobian(model: nn.Module, inputs: Any, data: Any = None, *, params: Sequence[str] | str | None = None,
                   batchnorm: BatchNormMode = "batch", max_params: int = 5000) -> torch.Tensor:
    """The ``(sum of output sizes) x P`` Jacobian of the stacked outputs (``(model, closure, data)``: of
    the closure's ``outputs``, as :func:`~sharpscope.ntk_operator`)."""
    if isinstance(inputs, BatchLoss):
        inputs.require_outputs("the dense Jacobian")
        fn = ModelFunction(model, params, batchnorm, call=inputs.outputs)
        _check_size(fn, max_params)
        batches = list(closure_batches(data, fn.device, None, inputs, weigh=False))
    else:
        fn = ModelFunction(model, params, batchnorm)
        _check_size(fn, max_params)
        batches = list(as_batches(inputs, fn.device, with_targets=False))
    theta = fn.flat_params()
    with _exact_mode(fn):
        rows = [torch.autograd.functional.jacobian(
            lambda flat, b=b: fn(fn.unflatten(flat), b.inputs).reshape(-1), theta) for b in batches]
    return torch.cat(rows)


def ntk_gram(model: nn.Module, inputs: Any, data: Any = None, *, params: Sequence[str] | str | None = None,
             batchnorm: BatchNormMode = "batch", max_params: int = 200_000) -> torch.Tensor:
    """The exact empirical NTK Gram matrix ``J J^T`` (outputs x outputs) from the dense Jacobian."""
    J = dense_jacobian(model, inputs, data, params=params, batchnorm=batchnorm, max_params=max_params)
    K = J @ J.T
    return (K + K.T) / 2


def dense_ggn(model: nn.Module, loss_fn: Callable | BatchLoss, data: Any, *,
              params: Sequence[str] | str | None = None, batchnorm: BatchNormMode = "batch",
              max_params: int = 5000) -> torch.Tensor:
    """The ``P x P`` generalized Gauss-Newton ``sum_b w_b J_b^T H_{L,b} J_b`` from dense pieces."""
    fn, batches, weight, criterion = _setup(model, loss_fn, data, params, batchnorm, max_params, outputs=True)
    theta = fn.flat_params()
    G = torch.zeros(fn.dim, fn.dim, dtype=fn.dtype, device=fn.device)
    with _exact_mode(fn):
        for b in batches:
            J = torch.autograd.functional.jacobian(
                lambda flat, b=b: fn(fn.unflatten(flat), b.inputs).reshape(-1), theta)
            out = fn(fn.unflatten(theta), b.inputs).detach()
            HL = torch.autograd.functional.hessian(
                lambda o, b=b, shape=out.shape: criterion(o.view(shape), b.targets), out.reshape(-1))
            G += weight(b) * (J.T @ HL @ J)
    return (G + G.T) / 2
