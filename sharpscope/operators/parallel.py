"""Where an operator's products run: on one process (:class:`SingleProcess`), or data-parallel over a process
group (:class:`DataParallel`): each rank multiplies its own shard and the product is the sum over the ranks of
the local one times ``N_local / N`` (:mod:`sharpscope.distributed`). The operators call these wrappers and never
test for a group themselves."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ..distributed import RankGroup, loss_description, model_values
from ..functional import loss_reduction_weight

_VERDICT_ORDER = ("pending", "unchecked", "passed", "inconclusive", "switched")  # agreed across ranks: the last


class SingleProcess:
    """One process: products computed as they are, errors raised where they happen."""

    group: RankGroup | None = None
    deferred: Exception | None = None
    global_num_samples: float | None = None

    def product(self, op: Any, product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return op._with_fallbacks(product, x)

    def full_data(self, op: Any, compute: Callable[[], Any], scalar: bool) -> Any:
        return compute()

    def begin_solve(self, op: Any) -> None:
        """Nothing to agree on."""

    def defer(self, err: Exception) -> bool:
        return False

    def same_on_all_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DataParallel(SingleProcess):
    """Data parallelism around any curvature operator: products weighted and summed over the ranks in one
    guarded ``all_reduce`` (an error or a NaN on any rank raised on every rank), the first product's derivative
    check agreed, the model's values and the loss agreed when a solve starts, and errors found outside a product
    (staleness, a failed rebuild) deferred to the next product, which reports them to every rank."""

    def __init__(self, group: RankGroup) -> None:
        self.group = group
        self.rank_weight = 1.0  # N_local / N_global (1 for a summed loss)
        self.global_num_samples = None
        self.deferred = None
        self._in_guard = False

    def agreed(self, op: Any, total: float) -> None:
        """The ranks agreed on the operator (:meth:`RankGroup.agree_on_operator`): ``total`` samples in all."""
        self.rank_weight = loss_reduction_weight(op.loss_fn, op.num_samples, total)
        self.global_num_samples = total

    def product(self, op: Any, product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if op.derivative_check == "pending":  # the first product: checked on every rank, the verdict agreed
            local = self._checked_on_every_rank(op, product, x)
            compute: Callable[[], torch.Tensor] = lambda: local  # noqa: E731
        else:
            def compute() -> torch.Tensor:
                return self._guarded(lambda: op._with_fallbacks(product, x))
        return self.group.sum_products(compute, self.rank_weight, tuple(x.shape), op.dtype, op.device)

    def _checked_on_every_rank(self, op: Any, product: Callable[[torch.Tensor], torch.Tensor],
                               x: torch.Tensor) -> torch.Tensor:
        """The first product and its derivative check on this rank's data, errors agreed; then the ranks' verdicts
        agreed (the most severe): a rank whose own check passed or was inconclusive switches too when another's
        disagreed, since the ranks run the same ops."""
        group = self.group
        out = None
        with group.guarded():
            out = self._guarded(lambda: op._with_fallbacks(product, x))
        agreed = max(group.gather(op.derivative_check), key=_VERDICT_ORDER.index)
        if agreed == "switched" and op.derivative_check != "switched":
            with group.guarded():
                op._adopt_verdict("switched")
                op._switch_to_fd("another rank's first product disagreed with central differences of its gradient")
                out = self._guarded(lambda: op._with_fallbacks(product, x))
        op._adopt_verdict(agreed)
        return out

    def _guarded(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` inside a rank-guarded collective: a deferred error is raised here, as are new ones."""
        self._in_guard = True
        try:
            if self.deferred is not None:
                err, self.deferred = self.deferred, None
                raise err
            return compute()
        finally:
            self._in_guard = False

    def full_data(self, op: Any, compute: Callable[[], Any], scalar: bool) -> Any:
        """A full-data quantity (gradient, loss): this rank's, weighted and summed in one guarded ``all_reduce``."""
        shape = () if scalar else (op.shape[0],)

        def local():
            out = self._guarded(compute)
            return torch.tensor(out, dtype=torch.float64, device=op.device) if scalar else out
        out = self.group.sum_products(local, self.rank_weight, shape, torch.float64 if scalar else op.dtype, op.device)
        return float(out) if scalar else out

    def begin_solve(self, op: Any) -> None:
        """Agree across ranks on the model's values and the loss (:meth:`RankGroup.agree_on_values`)."""
        self.group.agree_on_values(type(op).__name__, model_values(op.fn.names, op.fn.params),
                                   loss_description(op.loss_fn), skip=self.deferred is not None)

    def defer(self, err: Exception) -> bool:
        """Outside a guarded product, keep a staleness or rebuild error for the next product, which reports it
        to every rank (raising here would leave the others waiting)."""
        if self._in_guard:
            return False
        self.deferred = err
        return True

    def same_on_all_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.broadcast(x)


def over_all_data(method: Callable[..., Any]) -> Callable[..., Any]:
    """A full-data quantity of an operator (gradient, loss), summed over the ranks by ``op.parallel``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self.parallel.full_data(self, lambda: method(self, *args, **kwargs), method.__name__ == "loss")
    return wrapper
