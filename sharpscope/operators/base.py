"""The base of the curvature operators: data and loss closures, following the live model (staleness, rebuilds,
per-solve caches) and the determinism check. Products come from :mod:`.products` and :mod:`.batching`, ranks
from :mod:`.parallel`; an operator module supplies the per-batch functions (docs/operators-semantics.md)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..closures import BatchLoss, check_closure_loss, closure_batches, describe_batch
from ..functional import ModelFunction, as_batches, check_loss, check_targets, loss_reduction_weight
from ..linop import NotSymmetricError, StaleOperatorError, SymmetricOperator
from ._autograd import is_unsupported_derivative
from .batching import BlockProducts
from .following import ModelWatch, check_same_evaluation
from .modes import HvpMode, ModeLadder
from .parallel import SingleProcess
from .products import CHECKED_MODES, Products


class CurvatureOperator(Products, BlockProducts, SymmetricOperator):
    """Shared machinery: data, loss closures, following the model, the determinism check; products with their
    mode ladder (:class:`~.modes.ModeLadder`), block planning and ranks (``parallel``) are collaborators."""

    _closure_part = "loss"  # what a loss closure's wrapper evaluates: the loss, or the outputs (GGN, NTK)
    _closure_weighs = True  # whether the closure's batch weights are read (not by the NTK)
    _fixed_dimension = True  # the parameters' count is the dimension (not the NTK's: its outputs are)
    _value_name = "loss"

    def __init__(self, fn: ModelFunction, loss_fn: Callable | None, data: Any, n: int,
                 hvp_mode: HvpMode, graph_memory_budget: int | None, with_targets: bool = True, *,
                 batched: bool | None = None, parallel: SingleProcess | None = None) -> None:
        if batched not in (None, True, False):
            raise ValueError(f"batched must be None (measure), True or False, got {batched!r}")
        self.modes = ModeLadder(hvp_mode, type(self).__name__)
        super().__init__(n, fn.dtype, fn.device)
        self.fn, self.loss_fn = fn, loss_fn
        # a loss closure (ss.batch_loss): batches of any structure, weighted by closure.weight
        self.closure = loss_fn if isinstance(loss_fn, BatchLoss) else None
        if self.closure is not None and self._closure_part == "outputs":
            self.loss_fn = self.closure.loss_of_outputs
        self._data, self._with_targets, self._data_dtype = data, with_targets, fn.dtype
        self.batches = self._make_batches(None)
        self.parallel = parallel if parallel is not None else SingleProcess()
        self._watch = ModelWatch(lambda: self.fn.fingerprint())
        self._digest = fn.value_digest()
        self._deterministic_checked = False
        self._recording = False  # the first product of a solve records its values for the determinism check
        self._recorded: tuple[list[torch.Tensor], bool] | None = None
        self._checked = False  # the loss and targets validated (first batch of a solve)
        self._total: float | None = None
        self.graph_memory_budget = graph_memory_budget
        self.graph_bytes: int | None = None
        self._graphs: list | None = None
        self._fd_theta: tuple[Any, float] | None = None
        self._derivatives = "pending" if hvp_mode in CHECKED_MODES else "unchecked"
        self.batched = batched
        self._reset_batching()

    @property
    def requested_mode(self) -> HvpMode:
        """The ``hvp_mode`` the operator was built with."""
        return self.modes.request

    @property
    def hvp_mode(self) -> str:
        """How products are formed now (:data:`~.modes.ProductMode`; the request before the first product)."""
        return self.modes.reported

    @property
    def _trial_times(self) -> list[float]:
        """The measured products' times (:attr:`~.modes.ModeLadder.trial_times`)."""
        return self.modes.trial_times

    @property
    def global_num_samples(self) -> float | None:
        """All ranks' samples on a data-parallel operator (None on one process)."""
        return self.parallel.global_num_samples

    # -- data --------------------------------------------------------------------------------
    def _make_batches(self, dtype: torch.dtype | None):
        if self.closure is not None:
            return closure_batches(self._data, self.fn.device, dtype, self.closure, weigh=self._closure_weighs)
        return as_batches(self._data, self.fn.device, dtype, with_targets=self._with_targets)

    @property
    def num_samples(self) -> int:
        """The number of samples (with a loss closure: the sum of the batches' weights)."""
        if self._total is None:
            self._total = self.batches.total_size()
        return self._total

    def _weight(self, size: int) -> float:
        if self.closure is not None:
            return size / self.num_samples
        return loss_reduction_weight(self.loss_fn, size, self.num_samples)

    def _loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        if self.closure is not None:
            if self._closure_part == "loss":
                loss, what = outputs, "the loss closure fn(model, batch)"
            else:
                loss, what = self.loss_fn(outputs, batch.targets), "loss_of_outputs(outputs, batch)"
            if not self._checked:
                check_closure_loss(loss, what, "on the first batch")
            return loss
        if not self._checked:
            check_targets(self.loss_fn, outputs, batch.targets)
        loss = self.loss_fn(outputs, batch.targets)
        if not self._checked:
            check_loss(loss, "on the first batch")
        return loss

    # -- following the live model ----------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self) -> Iterator["CurvatureOperator"]:
        """:meth:`SymmetricOperator.pinned`, plus the values the per-product fingerprint cannot see (writes
        through ``p.data`` bump no version counter): a summary of the parameters' values is compared when
        a solve starts (changed since the last one: the operator rebuilds) and when it ends (changed during
        it: :class:`StaleOperatorError`). Two passes over the parameters per solve, not per product."""
        if self._pins:
            with super().pinned():
                yield self
            return
        self._begin_solve()
        before = self._digest
        try:
            with super().pinned():
                yield self
        except NotSymmetricError as err:  # the symmetry test may see the change first: name the real cause
            if not torch.equal(self.fn.value_digest(), before):
                raise self._changed_values() from err
            raise
        finally:
            self._end_solve()
        if not torch.equal(self.fn.value_digest(), before):
            raise self._changed_values()

    def _begin_solve(self) -> None:
        """A solve starts: rebuild if the parameter values changed since the last one; the ranks agree on the
        model's values and the loss (:meth:`~.parallel.DataParallel.begin_solve`)."""
        if not torch.equal(self.fn.value_digest(), self._digest):
            try:
                self._rebuild()
            except Exception as err:
                if not self.parallel.defer(err):
                    raise
        self.parallel.begin_solve(self)

    def _end_solve(self) -> None:
        """A solve ended: drop what was proved or cached about the model, the loss and the data for it (the
        gradient graphs, the determinism and loss checks, the finite-difference step's parameter norm)."""
        self._graphs = None
        self._fd_theta = None
        self._deterministic_checked = False
        self._checked = False

    def _changed_values(self) -> StaleOperatorError:
        return StaleOperatorError(f"{type(self).__name__}: the model's parameter values changed during a solve "
                                  "without a version change (an in-place write through .data?): products before "
                                  "and after belong to two different matrices; do not modify the model while "
                                  "lanczos or an estimator runs")

    def _sync(self) -> None:
        try:
            self._follow_model()
        except Exception as err:
            if not self.parallel.defer(err):
                raise

    def _follow_model(self) -> None:
        change = self._watch.change()
        if change is None:
            return
        if self._pins:
            raise ModelWatch.stale(type(self).__name__, change)
        self._rebuild()

    def _rebuild(self) -> None:
        """Rebuild on the model as it is now: its parameters, dtype and device; cached graphs dropped."""
        fn = self.fn.rebuilt()
        if fn.dim != self.fn.dim and self._fixed_dimension:
            raise ValueError(f"{type(self).__name__}: the selected parameters now hold {fn.dim} entries, not "
                             f"{self.fn.dim}: the operator's dimension cannot change; build a new operator")
        dtype = fn.dtype if fn.dtype != self._data_dtype else None  # data follows a model cast (e.g. .double())
        self.fn, self.dtype, self.device = fn, fn.dtype, fn.device
        self.batches = self._make_batches(dtype)
        self._watch.refresh()
        self._digest = fn.value_digest()
        self._graphs = None
        self._deterministic_checked = False
        self.modes.reset(switched=self._derivatives == "switched")  # a verdict on the ops outlives the model
        self._checked = False
        self._reset_batching()
        self._after_rebuild()

    def _after_rebuild(self) -> None:
        """Operator-specific state that depends on the model (the NTK's output shapes)."""

    # -- determinism ---------------------------------------------------------------------------
    def _check_deterministic(self, first: tuple[list[torch.Tensor], bool] | None = None) -> None:
        """Evaluate the data twice and refuse values that differ by more than rounding: a random
        forward pass (dropout forced on, input noise) or a random batch order (a sampler that is not
        sequential, with BatchNorm) would make every product a different matrix
        (:func:`~.following.check_same_evaluation`). The first pass also checks that the value depends on the
        parameters (a detached or argmax loss does not) and turns a forward pass that fails on the data into
        one line. ``first``: the first product's own values of every batch and whether the first depends on
        the parameters (:meth:`~.products.Products._with_fallbacks`): one pass instead of two."""
        with self.fn.deterministic(), self.modes.context():
            if first is None:
                values = self._first_pass()
            else:
                values, depends = first
                if not depends:
                    raise self._independent()
                self._check_first(values)
            with torch.no_grad():
                for i, (batch, a) in enumerate(zip(self.batches, values)):
                    check_same_evaluation(type(self).__name__, i, a, self._value(batch), self._value_name, self.dtype)
        self._deterministic_checked = True

    def _first_pass(self) -> list[torch.Tensor]:
        values = []
        for i, batch in enumerate(self.batches):
            try:
                with torch.enable_grad() if i == 0 else torch.no_grad():
                    value = self._value(batch)
            except (RuntimeError, TypeError, IndexError) as err:
                if is_unsupported_derivative(err):
                    raise
                shapes = describe_batch(batch.inputs[0] if self.closure is not None else batch.inputs)
                raise ValueError(f"{type(self).__name__}: the model cannot be evaluated on batch {i} (inputs "
                                 f"{shapes}): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
            if i == 0 and not value.requires_grad:
                raise self._independent()
            values.append(value.detach())
        self._check_first(values)
        return values

    def _independent(self) -> ValueError:
        return ValueError(f"{type(self).__name__}: the {self._value_name} does not depend on the parameters (a "
                          "detached tensor, or computed through argmax or integer ops): its curvature is zero or "
                          "undefined")

    def _check_first(self, values: list[torch.Tensor]) -> None:
        """Operator-specific checks of the first evaluation (the NTK: its outputs' shapes)."""

    def _value(self, batch) -> torch.Tensor:
        """What the determinism check compares: the batch's loss (the NTK: its outputs)."""
        return self._loss(self.fn(self.fn.params, batch.inputs), batch)

    def same_on_all_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.same_on_all_ranks(x)



