"""Following the live model, shared by every curvature operator (the sharded one included): the fingerprint check
before each product and its message, the determinism check's comparison, and the parameter norm that sets the
finite-difference step (docs/operators-semantics.md)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..functional import Fingerprint, describe_change
from ..linop import StaleOperatorError, StochasticForwardError


class ModelWatch:
    """The fingerprint an operator was built on (``read()``: the model's now) and the check before a product."""

    def __init__(self, read: Callable[[], Fingerprint]) -> None:
        self.read = read
        self.seen = read()

    def change(self) -> str | None:
        """The model's first change since :meth:`refresh`, in words; None when there is none."""
        now = self.read()
        return None if now == self.seen else describe_change(self.seen, now)

    def refresh(self) -> None:
        self.seen = self.read()

    @staticmethod
    def stale(who: str, change: str) -> StaleOperatorError:
        """The error for a change during a solve."""
        return StaleOperatorError(f"{who}: the model changed during a solve ({change}): products before and after "
                                  "belong to two different matrices; do not train or modify the model while lanczos "
                                  "or an estimator runs")


def shard_fingerprint(model: torch.nn.Module) -> Fingerprint:
    """:meth:`~sharpscope.functional.ModelFunction.fingerprint` of a model whose parameters may be DTensor shards
    (their local tensors' storage is read): parameters and training flags."""
    def local(p):
        return getattr(p, "_local_tensor", p)
    params = tuple((n, id(p), p._version, local(p).data_ptr(), p.dtype, local(p).device, p.requires_grad)
                   for n, p in model.named_parameters())
    return Fingerprint(params, (), tuple(m.training for m in model.modules()))


def evaluation_tolerance(dtype: torch.dtype) -> float:
    """Relative difference two evaluations of the same function may show: a few dozen ulps, not bitwise (CUDA
    reductions with atomics reorder sums)."""
    return (64 if torch.finfo(dtype).bits >= 32 else 4) * torch.finfo(dtype).eps


def check_same_evaluation(who: str, index: int, a: torch.Tensor, b: torch.Tensor, what: str,
                          dtype: torch.dtype) -> None:
    """Raise :class:`StochasticForwardError` when two evaluations of batch ``index`` differ beyond rounding
    (:func:`evaluation_tolerance` of the operator's ``dtype``)."""
    diff = float((a - b).abs().max()) if a.shape == b.shape else math.inf
    scale = max(float(a.abs().max()), float(b.abs().max()), torch.finfo(dtype).tiny)
    if not diff <= evaluation_tolerance(dtype) * scale:
        raise StochasticForwardError(
            f"{who}: two evaluations of batch {index} differ ({what} {float(a.reshape(-1)[0]):.6g} vs "
            f"{float(b.reshape(-1)[0]):.6g}, relative difference {diff / scale:.2g}): the forward pass or the data "
            "order is random (dropout called with training=True, input noise, a shuffling sampler); curvature needs "
            "a fixed function")


def parameter_norm(params: Sequence[torch.Tensor],
                   all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """``||theta||_2`` in float64 (of the local shards, summed by ``all_sum`` over the ranks where given)."""
    sq = sum(float(getattr(p, "_local_tensor", p).detach().double().pow(2).sum()) for p in params)
    if all_sum is not None:
        sq = float(all_sum(torch.tensor([sq], dtype=torch.float64))[0])
    return math.sqrt(sq)
