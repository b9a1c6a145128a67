r"""Loss closures: curvature of ``fn(model, batch) -> loss`` for batches of any structure.

Transformer code hands over dict batches (``input_ids``, ``attention_mask``, ``labels``, ...) and a
loss computed inside the model (``model(**batch).loss``), not an ``(inputs, targets)`` pair and a
criterion of the outputs. :func:`batch_loss` wraps such a closure for the curvature operators:

.. math::  H = \sum_b \frac{w_b}{W} \nabla^2_\theta L_b(\theta), \qquad W = \sum_b w_b,

with :math:`L_b` = ``fn(model, batch_b)`` (the batch's mean loss) and :math:`w_b` = ``weight(batch_b)``
(default: the leading dimension of the batch's first tensor; for causal LMs the number of predicted
label tokens, so that :math:`H` is the Hessian of the token-weighted mean: a list of batches gives the
operator of their concatenation). The Gauss-Newton matrix and the NTK need the model's outputs apart
from the loss: ``batch_loss(outputs=..., loss_of_outputs=...)``.

The closure is evaluated with substituted parameters through ``torch.func.functional_call`` on a small
wrapper module (:class:`sharpscope.functional.ModelFunction` with ``call=``), so every HVP mode,
the determinism check, the staleness fingerprint and batched products work as for a criterion.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch

from .functional import Batch, _check_fixed_order, _to, mapping_batch_error

__all__ = ["BatchLoss", "batch_loss", "closure_batches", "first_tensor", "describe_batch", "mapping_batch_error"]


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The batch's first tensor (mapping values and sequence items in order, depth first)."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def _leading_dimension(batch: Any) -> int:
    t = first_tensor(batch)
    if t is None:
        raise ValueError(f"cannot infer the weight of a {type(batch).__name__} batch without tensors: pass "
                         "ss.batch_loss(fn, weight=lambda batch: ...)")
    return int(t.shape[0]) if t.ndim > 0 else 1


def describe_batch(batch: Any) -> str:
    """A short description of a batch for error messages (keys, shapes, dtypes)."""
    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        return type(t).__name__
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return ", ".join(one(t) for t in batch)
    return one(batch)


class BatchLoss:
    """A loss closure for the curvature operators; made by :func:`batch_loss`.

    Attributes:
        fn: ``fn(model, batch) -> scalar`` (the batch's mean loss).
        weight: ``weight(batch) -> positive number`` (None: the leading dimension of the first tensor).
        outputs, loss_of_outputs: the split the GGN and the NTK need (None for a bare closure).
        name: a trusted ``"module:function"`` factory that rebuilds this loss offline (recorded in run
            files by the :class:`~sharpscope.Recorder`), or None.
    """

    def __init__(self, fn: Callable | None, weight: Callable | None, outputs: Callable | None,
                 loss_of_outputs: Callable | None, name: str | None) -> None:
        self.fn, self.weight, self.outputs, self.loss_of_outputs, self.name = fn, weight, outputs, loss_of_outputs, name

    @property
    def has_outputs(self) -> bool:
        return self.outputs is not None

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The batch's loss: ``fn(model, batch)``, or ``loss_of_outputs(outputs(model, batch), batch)``."""
        if self.fn is not None:
            return self.fn(model, batch)
        return self.loss_of_outputs(self.outputs(model, batch), batch)

    def batch_weight(self, batch: Any, index: int) -> float:
        """The batch's weight in the mean, checked: a positive, finite number."""
        value = self.weight(batch) if self.weight is not None else _leading_dimension(batch)
        return check_weight(value, index)

    def require_outputs(self, who: str) -> None:
        """Refuse a bare closure where the outputs must be separate from the loss (GGN, NTK)."""
        if not self.has_outputs:
            raise ValueError(f"{who} needs the model's outputs apart from the loss: pass ss.batch_loss(outputs="
                             "lambda model, batch: ..., loss_of_outputs=lambda outputs, batch: ...); a bare closure "
                             "gives the loss only")

    def __repr__(self) -> str:
        parts = [f"name={self.name!r}"] if self.name else []
        parts.append("outputs/loss_of_outputs" if self.has_outputs else "closure")
        return f"BatchLoss({', '.join(parts)})"


def check_weight(value: Any, index: int) -> float:
    """A batch weight must be a positive, finite number (one-line error naming the batch otherwise)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"weight(batch) returned {value!r} for batch {index}: a batch's weight must be a positive, "
                         "finite number (its number of samples or predicted label tokens)")
    return value


def batch_loss(fn: Callable | None = None, weight: Callable | None = None, *, outputs: Callable | None = None,
               loss_of_outputs: Callable | None = None, name: str | None = None) -> BatchLoss:
    """A loss closure for :func:`~sharpscope.hessian_operator` and the other operators.

    Args:
        fn: ``fn(model, batch) -> scalar``, the batch's mean loss (e.g. ``lambda m, b: m(**b).loss``).
            Evaluated with the operator's parameters substituted (``torch.func.functional_call``), in
            deterministic mode (dropout off).
        weight: ``weight(batch) -> number > 0``, the batch's weight in the mean over batches. Default:
            the leading dimension of the batch's first tensor. For a causal LM pass the number of
            predicted label tokens (``(batch["labels"][:, 1:] != -100).sum()``): the operator is then
            the Hessian of the token-weighted mean, as if the batches were one.
        outputs: ``outputs(model, batch) -> tensor`` (e.g. the logits); with ``loss_of_outputs``, the
            split the Gauss-Newton matrix and the NTK need.
        loss_of_outputs: ``loss_of_outputs(outputs, batch) -> scalar``. Without ``fn``, the loss is
            ``loss_of_outputs(outputs(model, batch), batch)``; with ``fn`` both must give the same value
            (the GGN checks it on its first batch).
        name: a trusted ``"module:function"`` factory returning this loss, recorded in run files so that
            offline jobs rebuild it (the built-in ones: :mod:`sharpscope.hf`).

    Example:
        >>> import torch, sharpscope as ss
        >>> model = torch.nn.Linear(3, 2)
        >>> loss = ss.batch_loss(lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"]))
        >>> H = ss.hessian_operator(model, loss, {"x": torch.randn(8, 3), "y": torch.randn(8, 2)})
        >>> H.shape
        (8, 8)
    """
    for label, f in (("fn", fn), ("weight", weight), ("outputs", outputs), ("loss_of_outputs", loss_of_outputs)):
        if f is not None and not callable(f):
            raise TypeError(f"batch_loss: {label} must be callable, got {type(f).__name__}")
    if (outputs is None) != (loss_of_outputs is None):
        raise ValueError("batch_loss: give outputs= and loss_of_outputs= together (the GGN and NTK need both)")
    if fn is None and outputs is None:
        raise ValueError("batch_loss needs fn(model, batch) -> loss, or outputs= and loss_of_outputs=")
    return BatchLoss(fn, weight, outputs, loss_of_outputs, name)


def _is_one_batch(data: Any) -> bool:
    """A Mapping, a tensor, or a tuple/list of tensors (an ``(inputs, targets)`` pair) is one batch;
    a list of anything else is a list of batches."""
    if isinstance(data, (Mapping, torch.Tensor)):
        return True
    if isinstance(data, (tuple, list)) and data:
        return all(isinstance(t, torch.Tensor) or t is None or (isinstance(t, (tuple, list)) and t and all(
            isinstance(u, torch.Tensor) for u in t)) for t in data)
    return False


class closure_batches:  # noqa: N801 - used like a function, as functional.as_batches
    """A re-iterable view of ``data`` for a loss closure: :class:`~sharpscope.functional.Batch` objects
    whose ``inputs`` is ``(batch,)`` and ``targets`` the batch itself (on ``device``, floating tensors
    in ``dtype`` when given), ``size`` its checked weight (1 when ``weigh=False``: the NTK)."""

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype | None, loss: BatchLoss,
                 weigh: bool = True) -> None:
        self.device, self.dtype, self.loss, self.weigh = device, dtype, loss, weigh
        if data is None:
            raise ValueError("no data: pass a batch (e.g. a dict of tensors) or an iterable of batches")
        if _is_one_batch(data):
            self._source: Any = [data]
        else:
            _check_fixed_order(data)
            if iter(data) is data:  # one-shot iterator: keep what it yields
                data = list(data)
            self._source = data

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        for item in self._source:
            if isinstance(item, Mapping) and not isinstance(item, dict):
                item = dict(item)  # e.g. transformers' BatchEncoding
            moved = _to(item, self.device, self.dtype)
            size = self.loss.batch_weight(moved, count) if self.weigh else 1.0
            count += 1
            yield Batch((moved,), moved, size)
        if count == 0:
            raise ValueError("empty data: the iterable yielded no batches")

    def total_size(self) -> float:
        return sum(b.size for b in self)


def check_closure_loss(loss: Any, what: str, where: str) -> None:
    """A closure's loss must be a finite scalar tensor (one line naming the closure otherwise)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
        raise ValueError(f"{what} returned {got} {where}: it must return a scalar tensor (the batch's mean loss)")
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"{what} returned {loss.item()} {where}: curvature of a non-finite loss is undefined")
