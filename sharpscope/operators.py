r"""Matrix-free curvature operators: Hessian, generalized Gauss-Newton, empirical NTK.

All operators act on flat vectors: the concatenated selected parameters (Hessian, GGN) or the
stacked model outputs of the batches (NTK). With batches :math:`b` of sizes :math:`n_b`,
:math:`N = \sum_b n_b`, and a loss that averages over its batch,

.. math::

    H = \sum_b \tfrac{n_b}{N} \nabla^2_\theta L_b(\theta), \qquad
    G = \sum_b \tfrac{n_b}{N} J_b^\top (\nabla^2_f \ell_b) J_b, \qquad
    K = J J^\top,

where :math:`J_b = \partial f(x_b; \theta) / \partial \theta`. Products are computed batch by batch;
only one batch's graph is alive at a time unless the graphs are cached (``hvp_mode="cached"``).

HVP strategies (``hvp_mode``):

* ``"reverse"`` -- double backward: forward, gradient with ``create_graph=True``, then a second
  backward per product (Pearlmutter 1994).
* ``"forward"`` -- forward-over-reverse, ``torch.func.jvp(torch.func.grad(loss), (theta,), (v,))``.
* ``"cached"`` -- the gradient graph is built once per solve and reused by its products: each product
  is only the second backward (about half the cost of ``"reverse"``; PyHessian's trick). Needs the graphs of all
  batches in memory; their size is measured while they are built (saved-tensor hooks) and the
  operator falls back to ``"reverse"`` when it exceeds ``graph_memory_budget``.
* ``"finite-difference"`` -- central differences of gradients (of outputs for the GGN's and the NTK's
  Jacobian products), :mod:`sharpscope.finite_difference`: first derivatives only, for ops without a
  usable double backward; the parameters are not written (the perturbed values are passed functionally).
* ``"auto"`` (default) -- ``"cached"`` when the graphs fit the budget; else the first four
  products alternate ``"reverse"`` and ``"forward"`` and the faster is kept (on the 2-core CPU,
  scripts/bench_eigs.py measured double backward 1.32x faster than forward-over-reverse on an MLP
  and 0.81x as fast on a CNN). If an op has no double backward (fused SDPA attention kernels) the
  product is retried with the math attention kernel, then with the other mode, then by finite
  differences, with a warning at each rung. An op whose double backward is silently wrong is caught by
  the derivative check below; one that makes the products asymmetric (a custom ``autograd.Function``
  with ``@once_differentiable``) also by the Lanczos symmetry probe: a failure within the first
  :data:`SWITCH_WITHIN` products, on a model that passed the determinism check, switches the operator to
  finite differences with a one-line warning and :func:`~sharpscope.lanczos` restarts its solve (both
  attempts' products counted); later failures raise as before, and a failure in finite-difference mode
  means random products.

The derivative check (``"auto"`` and ``"cached"``, float32 and float64 models): the first product of an
operator (once per operator, not per solve) is compared with central differences of its gradient at two
steps, ``eps`` and ``eps/2`` (:func:`~sharpscope.finite_difference.derivative_verdict`; 4 gradient
evaluations). Where the two differences disagree with each other (ReLU, max-pool, top-k routing: kinks within
the step) the check is inconclusive and the mode is kept; a conclusive disagreement switches ``"auto"`` to
finite differences with a one-line warning naming the custom ``autograd.Function`` in the graph, and raises
:class:`~sharpscope.linop.DerivativeCheckError` where the user fixed ``hvp_mode="cached"``. The outcome is
``op.derivative_check`` and every result's ``derivative_check`` field.

Batched products (``batched``, for :meth:`~sharpscope.linop.SymmetricOperator.matmat`: Hutchinson,
Hutch++ and SLQ probes, block Lanczos): a block of ``m`` vectors is multiplied either one column at a
time (in ``"reverse"`` mode the columns share each data batch's graph: one forward pass and first
backward per block) or batched -- ``torch.autograd.grad(..., is_grads_batched=True)`` over the gradient
graph (``"cached"``, ``"reverse"``), ``torch.func.vmap`` over the forward-over-reverse product
(``"forward"``). A batched product keeps ``m`` copies of the intermediate tensors of one backward pass,
so a block is cut into chunks that fit ``graph_memory_budget`` (less the cached graphs), from the
measured size of one batch's graph. ``batched=None`` (default) measures on the first block of at least
8 columns: chunks alternate batched and one-at-a-time (a warm-up pair, then a timed pair; every result
is a real product) and batching is kept for the operator when it is at least 1.25 times faster per
column (on an H200 a vmapped forward-over-reverse product of 16 vectors took 0.28 ms per vector
against 1.07 ms one at a time; on the 2-core CPU the batched second backward over the cached graph of
an MLP took 0.4x the time of one at a time); narrower blocks go one at a time until then. The two
paths agree to rounding, not bitwise, so two runs that measure differently can differ at the rounding
level (as ``hvp_mode="auto"`` without cached graphs): ``batched=True`` (batching; an op without a
batching rule falls back to one column at a time, with a warning) or ``False`` (never) give
bitwise-reproducible runs. The choice is in ``op.matmat_choice``.

Operators follow the live model. What an operator proves or caches about the model, the loss and the
data -- the gradient graphs, the determinism check, the finite-difference step -- serves one solve
(:meth:`~sharpscope.linop.SymmetricOperator.pinned`, which :func:`~sharpscope.lanczos` and the estimators
open; a product outside one is a solve of its own) and is dropped when the solve ends, because no
fingerprint can list everything a forward pass reads (hooks, submodules, plain attributes, a loss's
weight, a closure's globals). Inside a solve, before every product, an operator compares the model's
:meth:`~sharpscope.functional.ModelFunction.fingerprint` with the one it was built on and raises
:class:`~sharpscope.linop.StaleOperatorError` on a change; between solves it rebuilds itself on the model
as it now is (new parameters, dtype, device). At the start of each solve an operator evaluates the data
twice and refuses a forward pass that is not deterministic (:class:`~sharpscope.linop.StochasticForwardError`):
a cached graph would otherwise freeze one dropout mask or one noise draw into a symmetric, wrong matrix.
What only chooses how to compute (the timed reverse/forward choice, batching, graph sizes) is kept across
solves: a stale choice costs time, never correctness. docs/operators-semantics.md has the whole contract.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from . import finite_difference as fd
from ._memory import memory_budget
from .closures import BatchLoss, check_closure_loss, closure_batches, describe_batch
from .distributed import (
    RankGroup,
    local_sample_count,
    loss_description,
    model_signature,
    model_values,
    resolve_group,
    unwrap_model,
)
from .functional import BatchNormMode, ModelFunction, as_batches, check_loss, check_targets, describe_change, loss_reduction_weight
from .linop import DerivativeCheckError, NotSymmetricError, StaleOperatorError, StochasticForwardError, SymmetricOperator

__all__ = ["hessian_operator", "ggn_operator", "ntk_operator", "HessianOperator", "GGNOperator",
           "NTKOperator", "CurvatureOperator", "loss_output_hvp"]

HvpMode = Literal["auto", "reverse", "forward", "cached", "finite-difference"]
_FD = "finite-difference"
_MODES = ("auto", "reverse", "forward", "cached", _FD)
SWITCH_WITHIN = 8  # auto: a symmetry failure within this many products switches to finite differences
_TRIAL = ("reverse", "forward", "reverse", "forward")  # auto, no cache: warm-up pair, then a timed pair
_BATCH_TRIAL = (True, False, True, False)  # batched=None: warm-up pair, then a timed pair
_TRIAL_BLOCK = 8   # batched=None measures on a block of at least this many columns, in chunks of
_TRIAL_CHUNK = 4   # at least this many, and batches only when that is this much faster per column:
_TRIAL_GAIN = 1.25
_BATCH_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)
_CHECKED_MODES = ("auto", "cached")  # the modes whose first product is checked against finite differences
_VERDICT_ORDER = ("pending", "unchecked", "passed", "inconclusive", "switched")  # agreed across ranks: the last


def default_graph_memory_budget(device: torch.device) -> int:
    """Bytes the cached gradient graphs may use: half the free GPU memory, or 1/4 of host RAM."""
    return memory_budget(device, gpu_free=0.5, host=0.25)


class _SavedBytes:
    """Counts the bytes of tensors autograd saves for backward (unique storages, parameters excluded)."""

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.nbytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.seen:
                self.seen.add(ptr)
                self.nbytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            self.nbytes += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _is_unsupported_derivative(err: Exception) -> bool:
    msg = str(err)
    return any(s in msg for s in ("derivative for", "not implemented", "does not support",
                                  "forward AD", "double backward", "twice"))


def _grad(outputs: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor],
          grad_outputs: Sequence[torch.Tensor], retain_graph: bool) -> tuple[torch.Tensor | None, ...]:
    """``autograd.grad`` that skips outputs not connected to the graph (their contribution is zero)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return tuple(None for _ in inputs)
    outs, gos = zip(*pairs)
    return torch.autograd.grad(outs, inputs, gos, retain_graph=retain_graph, allow_unused=True)


def _grad_rows(outputs: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor],
               grad_rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """:func:`_grad` for a block of cotangents at once (leading dimension: the block), the graph retained."""
    pairs = [(o, g) for o, g in zip(outputs, grad_rows) if o is not None and o.requires_grad]
    if not pairs:
        return tuple(None for _ in inputs)
    outs, gos = zip(*pairs)
    return torch.autograd.grad(outs, inputs, gos, retain_graph=True, allow_unused=True, is_grads_batched=True)


def _unflatten_rows(fn: ModelFunction, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of an ``(m, dim)`` block as per-parameter ``(m, *shape)`` tensors."""
    m = rows.shape[0]
    return tuple(t.reshape(m, *s) for t, s in zip(torch.split(rows, fn.numels, dim=1), fn.shapes))


def _flatten_rows(fn: ModelFunction, parts: Sequence[torch.Tensor | None], m: int) -> torch.Tensor:
    """Per-parameter ``(m, *shape)`` tensors (None read as zeros) as one ``(m, dim)`` block."""
    return torch.cat([torch.zeros(m, n, dtype=fn.dtype, device=fn.device) if t is None else t.reshape(m, -1)
                      for t, n in zip(parts, fn.numels)], dim=1)


def loss_output_hvp(loss_fn: Callable, outputs: torch.Tensor, targets: Any,
                    u: torch.Tensor) -> torch.Tensor:
    r"""``(\nabla^2_f \ell) u``: Hessian of the loss w.r.t. the model outputs times ``u`` (double backward
    on a detached copy of the outputs: cheap, the outputs are small)."""
    with torch.enable_grad():
        o = outputs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(o, targets), o, create_graph=True)
        if not g.requires_grad:  # loss linear in the outputs
            return torch.zeros_like(u)
        (hu,) = torch.autograd.grad(g, o, u, allow_unused=True)
    return torch.zeros_like(u) if hu is None else hu


def _loss_output_hvp_rows(loss_fn: Callable, outputs: torch.Tensor, targets: Any, U: torch.Tensor) -> torch.Tensor:
    """:func:`loss_output_hvp` for a block ``U`` of shape ``(m, *outputs.shape)``."""
    with torch.enable_grad():
        o = outputs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(o, targets), o, create_graph=True)
        if not g.requires_grad:
            return torch.zeros_like(U)
        (hu,) = torch.autograd.grad(g, o, U, allow_unused=True, is_grads_batched=True)
    return torch.zeros_like(U) if hu is None else hu


def _accumulate(acc: torch.Tensor | None, part: torch.Tensor, weight: float) -> torch.Tensor:
    """``acc + weight * part``, reusing ``part`` as the accumulator on the first call (no extra pass)."""
    if acc is None:
        return part if weight == 1.0 else part.mul_(weight)
    return acc.add_(part, alpha=weight)


class CurvatureOperator(SymmetricOperator):
    """Shared machinery: data, deterministic evaluation, HVP-mode choice and fallbacks."""

    def __init__(self, fn: ModelFunction, loss_fn: Callable | None, data: Any, n: int,
                 hvp_mode: HvpMode, graph_memory_budget: int | None, with_targets: bool = True, *,
                 batched: bool | None = None) -> None:
        if batched not in (None, True, False):
            raise ValueError(f"batched must be None (measure), True or False, got {batched!r}")
        if hvp_mode not in _MODES:
            raise ValueError(f"hvp_mode must be one of {_MODES}, got {hvp_mode!r}")
        super().__init__(n, fn.dtype, fn.device)
        self.fn, self.loss_fn = fn, loss_fn
        # a loss closure (ss.batch_loss): batches of any structure, weighted by closure.weight
        self.closure = loss_fn if isinstance(loss_fn, BatchLoss) else None
        if self.closure is not None and self._closure_part == "outputs":
            self.loss_fn = self.closure.loss_of_outputs
        self._data, self._with_targets, self._data_dtype = data, with_targets, fn.dtype
        self.batches = self._make_batches(None)
        self._fingerprint = fn.fingerprint()
        self._digest = fn.value_digest()
        self._deterministic_checked = False
        self.requested_mode = hvp_mode
        self.hvp_mode: str = hvp_mode  # resolved on the first product
        self.graph_memory_budget = graph_memory_budget
        self.graph_bytes: int | None = None
        self._graphs: list | None = None
        self._math_sdpa = False
        self._switched_mode = False
        self._trial_times: list[float] = []
        self._checked = False
        self._total: int | None = None
        self.batched = batched
        self._reset_batching()
        self._group: RankGroup | None = None  # data-parallel: set by distribute()
        self._rank_weight = 1.0               # N_local / N_global (1 for a summed loss)
        self._deferred: Exception | None = None
        self._in_guard = False
        self._fd_theta: tuple[Any, float] | None = None
        self._derivatives = "pending" if hvp_mode in _CHECKED_MODES else "unchecked"

    # -- data --------------------------------------------------------------------------------
    _closure_part = "loss"  # what a loss closure's wrapper evaluates: the loss, or the outputs (GGN, NTK)
    _closure_weighs = True  # whether the closure's batch weights are read (not by the NTK)

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
        """A solve starts: rebuild if the parameter values changed since the last one; on a data-parallel
        operator, agree across ranks on the model's values and the loss (:meth:`RankGroup.agree_on_values`)."""
        now = self.fn.value_digest()
        if not torch.equal(now, self._digest):
            try:
                self._rebuild()
            except Exception as err:
                if not self._defer(err):
                    raise
        if self._group is not None:
            self._group.agree_on_values(type(self).__name__, model_values(self.fn.names, self.fn.params),
                                        loss_description(self.loss_fn), skip=self._deferred is not None)

    def _end_solve(self) -> None:
        """A solve ended: drop what was proved or cached about the model, the loss and the data for it (the
        gradient graphs, the determinism and loss checks, the finite-difference step's parameter norm)."""
        self._graphs = None
        self._fd_theta = None
        self._deterministic_checked = False
        self._checked = False

    @property
    def derivative_check(self) -> str:
        """``"pending"`` (no product yet), ``"passed"``, ``"inconclusive"``, ``"switched"`` or ``"unchecked"``
        (module docstring: the derivative check)."""
        return self._derivatives

    def _changed_values(self) -> StaleOperatorError:
        return StaleOperatorError(f"{type(self).__name__}: the model's parameter values changed during a solve "
                                  "without a version change (an in-place write through .data?): products before "
                                  "and after belong to two different matrices; do not modify the model while "
                                  "lanczos or an estimator runs")

    def _sync(self) -> None:
        try:
            self._follow_model()
        except Exception as err:
            if not self._defer(err):
                raise

    def _defer(self, err: Exception) -> bool:
        """On a data-parallel operator outside a guarded product, keep a staleness or rebuild error for the
        next product, which reports it to every rank (raising here would leave the others waiting)."""
        if self._group is None or self._in_guard:
            return False
        self._deferred = err
        return True

    def _follow_model(self) -> None:
        now = self.fn.fingerprint()
        if now == self._fingerprint:
            return
        change = describe_change(self._fingerprint, now)
        if self._pins:
            raise StaleOperatorError(f"{type(self).__name__}: the model changed during a solve ({change}): "
                                     "products before and after belong to two different matrices; do not "
                                     "train or modify the model while lanczos or an estimator runs")
        self._rebuild()

    def _rebuild(self) -> None:
        """Rebuild on the model as it is now: its parameters, dtype and device; cached graphs dropped."""
        fn = self.fn.rebuilt()
        if fn.dim != self.fn.dim and not isinstance(self, NTKOperator):
            raise ValueError(f"{type(self).__name__}: the selected parameters now hold {fn.dim} entries, not "
                             f"{self.fn.dim}: the operator's dimension cannot change; build a new operator")
        dtype = fn.dtype if fn.dtype != self._data_dtype else None  # data follows a model cast (e.g. .double())
        self.fn, self.dtype, self.device = fn, fn.dtype, fn.device
        self.batches = self._make_batches(dtype)
        self._fingerprint = fn.fingerprint()
        self._digest = fn.value_digest()
        self._graphs = None
        self._deterministic_checked = False
        self.hvp_mode = _FD if self._derivatives == "switched" else self.requested_mode  # a verdict on the ops
        self._trial_times, self._checked = [], False
        self._reset_batching()
        self._after_rebuild()

    def _after_rebuild(self) -> None:
        """Operator-specific state that depends on the model (the NTK's output shapes)."""

    def _check_deterministic(self) -> None:
        """Evaluate the data twice and refuse values that differ by more than rounding: a random
        forward pass (dropout forced on, input noise) or a random batch order (a sampler that is not
        sequential, with BatchNorm) would make every product a different matrix. A tolerance of a few
        dozen ulps of the value, not bitwise: CUDA reductions with atomics reorder sums. The first pass
        also checks that the value depends on the parameters (a detached or argmax loss does not) and
        turns a forward pass that fails on the data into one line."""
        rel = (64 if torch.finfo(self.dtype).bits >= 32 else 4) * torch.finfo(self.dtype).eps
        with self.fn.deterministic(), self._context():
            first = self._first_pass()
            with torch.no_grad():
                for i, (batch, a) in enumerate(zip(self.batches, first)):
                    b = self._value(batch)
                    diff = float((a - b).abs().max()) if a.shape == b.shape else math.inf
                    scale = max(float(a.abs().max()), float(b.abs().max()), torch.finfo(self.dtype).tiny)
                    if not diff <= rel * scale:
                        raise StochasticForwardError(
                            f"{type(self).__name__}: two evaluations of batch {i} differ ({self._value_name} "
                            f"{float(a.reshape(-1)[0]):.6g} vs {float(b.reshape(-1)[0]):.6g}, relative difference "
                            f"{diff / scale:.2g}): the forward pass or the data order is random (dropout called "
                            "with training=True, input noise, a shuffling sampler); curvature needs a fixed function")
        self._deterministic_checked = True

    def _first_pass(self) -> list[torch.Tensor]:
        values = []
        for i, batch in enumerate(self.batches):
            try:
                with torch.enable_grad() if i == 0 else torch.no_grad():
                    value = self._value(batch)
            except (RuntimeError, TypeError, IndexError) as err:
                if _is_unsupported_derivative(err):
                    raise
                shapes = describe_batch(batch.inputs[0] if self.closure is not None else batch.inputs)
                raise ValueError(f"{type(self).__name__}: the model cannot be evaluated on batch {i} (inputs "
                                 f"{shapes}): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
            if i == 0 and not value.requires_grad:
                raise ValueError(f"{type(self).__name__}: the {self._value_name} does not depend on the parameters "
                                 "(a detached tensor, or computed through argmax or integer ops): its curvature is "
                                 "zero or undefined")
            values.append(value.detach())
        return values

    _value_name = "loss"

    def _value(self, batch) -> torch.Tensor:
        """What the determinism check compares: the batch's loss (the NTK: its outputs)."""
        return self._loss(self.fn(self.fn.params, batch.inputs), batch)

    # -- evaluation context -------------------------------------------------------------------
    def _context(self):
        if self._math_sdpa:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.MATH])
        return nullcontext()

    # -- products with fallbacks --------------------------------------------------------------
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._reduced(self._product, v)

    def _reduced(self, product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``product(x)`` with fallbacks; on a data-parallel operator, weighted and summed over the ranks
        (an error or a NaN on any rank raised on every rank: :mod:`sharpscope.distributed`)."""
        if self._group is None:
            return self._with_fallbacks(product, x)
        if self._derivatives == "pending":  # the first product: checked on every rank, the verdict agreed
            local = self._checked_on_every_rank(product, x)
            compute: Callable[[], torch.Tensor] = lambda: local  # noqa: E731
        else:
            def compute() -> torch.Tensor:
                return self._guarded(lambda: self._with_fallbacks(product, x))
        return self._group.sum_products(compute, self._rank_weight, tuple(x.shape), self.dtype, self.device)

    def _checked_on_every_rank(self, product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The first product of a data-parallel operator and its derivative check on this rank's data, errors
        agreed; then the ranks' verdicts agreed (the most severe): a rank whose own check passed or was
        inconclusive switches too when another's disagreed, since the ranks run the same ops."""
        group = self._group
        out = None
        with group.guarded():
            out = self._guarded(lambda: self._with_fallbacks(product, x))
        agreed = max(group.gather(self._derivatives), key=_VERDICT_ORDER.index)
        if agreed == "switched" and self._derivatives != "switched":
            with group.guarded():
                self._derivatives = "switched"
                self._switch_to_fd("another rank's first product disagreed with central differences of its gradient")
                out = self._guarded(lambda: self._with_fallbacks(product, x))
        self._derivatives = agreed
        return out

    def _guarded(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` inside a rank-guarded collective: a deferred error is raised here, as are new ones."""
        self._in_guard = True
        try:
            if self._deferred is not None:
                err, self._deferred = self._deferred, None
                raise err
            return compute()
        finally:
            self._in_guard = False

    def same_on_all_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._group is None else self._group.broadcast(x)

    def _with_fallbacks(self, product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``product(x)`` in the deterministic context, down the fallback ladder on unsupported derivatives."""
        if not self._deterministic_checked:
            self._check_deterministic()
        if self.hvp_mode == "auto":
            self.hvp_mode = "cached"
        while True:
            try:
                with torch.enable_grad(), self.fn.deterministic(), self._context():
                    out = product(x)
                self._checked = True
                break
            except (RuntimeError, NotImplementedError) as err:
                if not _is_unsupported_derivative(err):
                    raise
                self._fall_back(err)
                self._batched_failed = None  # a new rung: batching may work there
        if self._derivatives == "pending":
            out = self._check_derivatives(product, x, out)
        return out

    def _check_derivatives(self, product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           out: torch.Tensor) -> torch.Tensor:
        """The first product (of a vector, or a block's first column) against central differences of the
        gradient at steps ``eps`` and ``eps/2`` (:func:`~sharpscope.finite_difference.derivative_verdict`).
        A conclusive disagreement switches ``auto`` to finite differences (the product is taken again) and
        raises :class:`DerivativeCheckError` in a fixed mode; 16-bit models and products that already fell
        to finite differences are not checked. Returns the product."""
        tol = fd.derivative_tolerance(self.dtype)
        if tol is None or self.hvp_mode == _FD:
            self._derivatives = "unchecked"
            return out
        v, hv = (x, out) if x.ndim == 1 else (x[:, 0], out[:, 0])
        if not float(v.norm()) > 0:
            return out  # a zero vector proves nothing: the next product is checked
        with torch.enable_grad(), self.fn.deterministic(), self._context():
            at_step, at_half = self._fd_product(v), self._fd_product(v, step_scale=0.5)
        verdict, error, spread = fd.derivative_verdict(hv, at_step, at_half, tol)
        if verdict != "disagree":
            self._derivatives = verdict
            return out
        mode = _TRIAL[len(self._trial_times) - 1] if self.hvp_mode == "measuring" else self.hvp_mode
        ops = self._custom_functions()
        named = f" (custom autograd.Function in the graph: {', '.join(ops)})" if ops else ""
        reason = (f"the first product (hvp_mode={mode!r}) differs from central differences of the gradient by "
                  f"{error:.2g} relative, and the differences at steps eps and eps/2 agree to {spread:.1g}: an op's "
                  f"second derivative is wrong{named}")
        if self.requested_mode != "auto":
            raise DerivativeCheckError(f"{type(self).__name__}: {reason}; use hvp_mode='finite-difference' (first "
                                       "derivatives only) or hvp_mode='auto', which switches to it")
        self._derivatives = "switched"
        self._switch_to_fd(reason)
        if x.ndim == 1:
            return at_step  # the finite-difference product itself
        with torch.enable_grad(), self.fn.deterministic(), self._context():
            return product(x)

    def _custom_functions(self) -> list[str]:
        """The custom ``autograd.Function`` classes in the first batch's graph (for the check's warning)."""
        try:
            with torch.enable_grad(), self.fn.deterministic(), self._context():
                return fd.custom_functions(self._value(next(iter(self.batches))))
        except Exception:  # noqa: BLE001 - a hint only
            return []

    def _fall_back(self, err: Exception) -> None:
        """One rung down the ladder: the math attention kernel, then the other differentiation mode."""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        self._graphs = None
        if not self._math_sdpa:
            self._math_sdpa = True
            warnings.warn(f"{type(self).__name__}: an op lacks the derivative needed ({reason}); "
                          "retrying with the math attention kernel", RuntimeWarning, stacklevel=4)
            return
        if not self._switched_mode:
            self._switched_mode = True
            self.hvp_mode = "reverse" if self._running_mode() == "forward" else "forward"
            warnings.warn(f"{type(self).__name__}: derivative still unsupported ({reason}); "
                          f"switching to hvp_mode={self.hvp_mode!r}", RuntimeWarning, stacklevel=4)
            return
        if self.requested_mode == "auto" and self.hvp_mode != _FD:
            self._switch_to_fd(f"torch has no second derivative for an op: {reason}")
            return
        raise err

    def _switch_to_fd(self, reason: str) -> None:
        """``auto`` only: products by finite differences from now on, with a one-line warning."""
        self.hvp_mode = _FD
        self._graphs = None
        warnings.warn(f"{type(self).__name__}: {reason}; switching to hvp_mode='finite-difference' (first "
                      "derivatives only)", RuntimeWarning, stacklevel=5)

    def _after_asymmetry(self, error: NotSymmetricError, num_matvecs: int) -> bool:
        """A symmetry failure seen by a solver: in ``auto`` mode within the first :data:`SWITCH_WITHIN` products
        on a model that passed the determinism check, an op's double backward is wrong or missing: switch to
        finite differences (True: the solver restarts). In finite-difference mode the products are random."""
        if self.hvp_mode == _FD:
            raise NotSymmetricError(f"{type(self).__name__}: {str(error).split(': either')[0]}: "
                                    f"{fd.FD_RANDOM_HINT}") from error
        if self.requested_mode != "auto" or not self._deterministic_checked or num_matvecs > SWITCH_WITHIN:
            return False
        self._derivatives = "switched"
        self._switch_to_fd(f"the products failed the symmetry test after {num_matvecs} products on a deterministic "
                           "model, so an op's double backward is wrong or missing (e.g. a custom autograd.Function "
                           "with @once_differentiable)")
        return True

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        if self.hvp_mode == _FD:
            return self._fd_product(v)
        if self.hvp_mode == "cached":
            graphs = self._cached_graphs()
            if graphs is not None:
                return self._apply_graphs(graphs, v, retain=True)
            self.hvp_mode = "measuring" if self.requested_mode == "auto" else "reverse"
        if self.hvp_mode == "measuring":
            return self._measured_product(v)
        if self.hvp_mode == "reverse":
            return self._reverse_product(v)
        return self._forward_product(v)

    def _reverse_product(self, v: torch.Tensor) -> torch.Tensor:
        acc = None
        for batch in self.batches:
            graph = self._build_graph(batch)
            part = self._apply_graphs([(self._weight(batch.size), graph)], v, retain=True)
            acc = part if acc is None else acc.add_(part)
            del graph
        return acc

    def _measured_product(self, v: torch.Tensor) -> torch.Tensor:
        """``auto`` without cached graphs: the first four products alternate double backward and
        forward-over-reverse (a warm-up pair, then a timed pair; every result is a real product) and
        the faster mode is kept -- on CPU double backward usually wins for MLPs, forward-over-reverse
        for convolutions."""
        mode = _TRIAL[len(self._trial_times)]
        start = time.perf_counter()
        out = self._reverse_product(v) if mode == "reverse" else self._forward_product(v)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._trial_times.append(time.perf_counter() - start)
        if len(self._trial_times) == len(_TRIAL):
            reverse, forward = self._trial_times[-2:]
            self.hvp_mode = "reverse" if reverse <= forward else "forward"
        return out

    def _running_mode(self) -> str:
        return _TRIAL[len(self._trial_times)] if self.hvp_mode == "measuring" else self.hvp_mode

    def _cached_graphs(self) -> list | None:
        if self._graphs is not None:
            return self._graphs
        budget = self.graph_memory_budget
        if budget is None:
            budget = default_graph_memory_budget(self.device)
        counter = _SavedBytes(self.fn.params)
        graphs = []
        with counter.hooks():
            for batch in self.batches:
                before = counter.nbytes
                graphs.append((self._weight(batch.size), self._build_graph(batch)))
                self._column_bytes = max(self._column_bytes or 0, counter.nbytes - before)
                if counter.nbytes > budget:
                    break
        self.graph_bytes = counter.nbytes
        if counter.nbytes > budget:
            if self.requested_mode == "cached":
                warnings.warn(f"{type(self).__name__}: the gradient graphs need more than the "
                              f"graph_memory_budget ({budget / 2**20:.0f} MiB); recomputing them per product "
                              "(hvp_mode='reverse')", RuntimeWarning, stacklevel=5)
            return None
        self._graphs = graphs
        return graphs

    # -- batched products (matmat) ---------------------------------------------------------------
    def _reset_batching(self) -> None:
        self.matmat_choice: str | None = {True: "batched", False: "one-at-a-time", None: None}[self.batched]
        self._batch_trials: list[tuple[bool, float]] = []
        self._batched_failed: str | None = None
        self._column_bytes: int | None = None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._reduced(self._block_product, V)

    def _block_product(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` as rows: chunks of columns, batched or not (:meth:`_plan`); single columns and the
        products of the auto reverse/forward trial go one at a time."""
        rows, m = V.T, V.shape[1]
        out = torch.empty(m, self.shape[0], dtype=self.dtype, device=self.device)
        i = 0
        while i < m:
            if self.hvp_mode in ("measuring", _FD) or m - i == 1:
                out[i] = self._product(rows[i])
                i += 1
                continue
            batched, width = self._plan(m, m - i)
            out[i: i + width] = self._timed_rows(rows[i: i + width]) if batched is None else \
                self._try_rows(rows[i: i + width], batched)
            i += width
        return out.T

    def _plan(self, block: int, remaining: int) -> tuple[bool | None, int]:
        """Batched or not, and how many columns, for the next chunk of a ``block``-column product; None:
        a chunk of the auto measurement (which of the two it is, :meth:`_timed_rows` knows)."""
        if self.batched is False or self._batched_failed is not None:
            return False, remaining
        if self.batched is True or self.matmat_choice == "batched":
            return True, min(remaining, self._max_columns())
        if self.matmat_choice is not None or block < _TRIAL_BLOCK or remaining < _TRIAL_CHUNK:
            return False, remaining  # too narrow to measure: one at a time, as without batching
        return None, min(remaining, self._max_columns(), max(_TRIAL_CHUNK, block // 4))

    def _timed_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """A chunk of the auto measurement: batched and one at a time alternate (a warm-up pair, then a
        timed pair; every result is a real product); batching is kept when it is ``_TRIAL_GAIN`` times
        faster per column."""
        batched, mode = _BATCH_TRIAL[len(self._batch_trials)], self.hvp_mode
        self._synchronize()
        start = time.perf_counter()
        out = self._try_rows(rows, batched)
        self._synchronize()
        if self._batched_failed is None and self.hvp_mode == mode:
            self._batch_trials.append((batched, (time.perf_counter() - start) / rows.shape[0]))
            if len(self._batch_trials) == len(_BATCH_TRIAL):
                per_column = dict(self._batch_trials[-2:])
                faster = per_column[True] * _TRIAL_GAIN <= per_column[False]
                self.matmat_choice = "batched" if faster else "one-at-a-time"
        return out

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _try_rows(self, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        """The chunk's products; when a batched one fails and one column at a time succeeds (an op without
        a batching rule), batching is off for this operator from then on. An error of both (an op without
        the derivative) goes down the fallback ladder, batching not blamed."""
        if not batched:
            return self._rows_product(rows, False)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
                return self._rows_product(rows, True)
        except _BATCH_ERRORS as err:
            failure = err
        out = self._rows_product(rows, False)
        self._batched_failed = f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        self.matmat_choice = "one-at-a-time"
        if self.batched is True:
            warnings.warn(f"{type(self).__name__}: batched products unsupported ({self._batched_failed}); "
                          "taking the columns one at a time", RuntimeWarning, stacklevel=6)
        return out

    def _rows_product(self, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        """Products of the rows of ``rows`` (``(m, n)``), as rows, in the current hvp mode."""
        if self.hvp_mode == "cached":
            graphs = self._cached_graphs()
            if graphs is not None:
                return self._apply_graphs_rows(graphs, rows, batched)
            self.hvp_mode = "measuring" if self.requested_mode == "auto" else "reverse"
        if self.hvp_mode == "measuring":
            return torch.stack([self._product(r) for r in rows])
        if self.hvp_mode == "reverse":
            return self._reverse_rows(rows, batched)
        if batched:
            return self._forward_batched(rows)
        return torch.stack([self._forward_product(r) for r in rows])

    def _forward_batched(self, rows: torch.Tensor) -> torch.Tensor:
        """Forward-over-reverse products of a block: ``torch.func.vmap`` over the one-vector product."""
        return torch.func.vmap(self._forward_product)(rows)

    def _reverse_rows(self, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        """Double backward for a block: each data batch's graph is built once for all the columns."""
        acc = None
        for batch in self.batches:
            graph = self._build_graph(batch)
            part = self._apply_graphs_rows([(self._weight(batch.size), graph)], rows, batched)
            acc = part if acc is None else acc.add_(part)
            del graph
        return acc

    def _apply_graphs_rows(self, graphs, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        if batched:
            return self._apply_graphs_batched(graphs, rows)
        return torch.stack([self._apply_graphs(graphs, r, retain=True) for r in rows])

    def _max_columns(self) -> int:
        """Columns a batched chunk may hold: the budget left by the cached graphs over one column's share
        (one batch's graph, measured once with saved-tensor hooks)."""
        if self._column_bytes is None:
            counter = _SavedBytes(self.fn.params)
            with counter.hooks():
                graph = self._build_graph(next(iter(self.batches)))
            del graph
            self._column_bytes = counter.nbytes
        budget = self.graph_memory_budget
        if budget is None:
            budget = default_graph_memory_budget(self.device)
        cached = (self.graph_bytes or 0) if self._graphs is not None else 0
        return int(max(1, (budget - cached) // max(self._column_bytes, 1)))

    def _apply_graphs_batched(self, graphs, rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- per-operator pieces -------------------------------------------------------------------
    def _build_graph(self, batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply_graphs(self, graphs, v: torch.Tensor, retain: bool) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _forward_product(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _fd_product(self, v: torch.Tensor, step_scale: float = 1.0) -> torch.Tensor:  # pragma: no cover
        """The product by central differences, at ``step_scale`` times the usual step."""
        raise NotImplementedError

    # -- finite differences (sharpscope/finite_difference.py) ---------------------------------------
    def _fd_step(self, v: torch.Tensor) -> float:
        """The central-difference step for direction ``v`` (0.0 for a zero vector)."""
        if self._fd_theta is None or self._fd_theta[0] is not self.fn:
            norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.fn.params))
            self._fd_theta = (self.fn, norm)
        v_norm = float(v.norm())
        return fd.fd_step(self.dtype, self._fd_theta[1], v_norm) if v_norm > 0 else 0.0

    def _fd_outputs_jvp(self, vs, eps: float, batch) -> torch.Tensor:
        """``J_b v`` by central differences of the batch's outputs (no graph)."""
        theta = [p.detach() for p in self.fn.params]
        with torch.no_grad():
            return fd.central_difference(lambda s: self.fn(fd.shifted(theta, vs, s), batch.inputs), eps)


def _summed_over_ranks(method: Callable[..., Any]) -> Callable[..., Any]:
    """A full-data quantity (gradient, loss) of a data-parallel operator: this rank's, weighted and summed
    over the ranks in one guarded ``all_reduce``."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._group is None:
            return method(self, *args, **kwargs)
        scalar = method.__name__ == "loss"
        shape = () if scalar else (self.shape[0],)

        def local():
            out = self._guarded(lambda: method(self, *args, **kwargs))
            return torch.tensor(out, dtype=torch.float64, device=self.device) if scalar else out
        out = self._group.sum_products(local, self._rank_weight, shape, torch.float64 if scalar else self.dtype,
                                       self.device)
        return float(out) if scalar else out
    return wrapper


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \sum_b \frac{n_b}{N} \nabla^2 L_b` of the loss w.r.t. the selected parameters."""

    def _build_graph(self, batch):
        params = self.fn.params
        loss = self._loss(self.fn(params, batch.inputs), batch)
        return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)

    def _apply_graphs(self, graphs, v, retain):
        vs = self.fn.unflatten(v)
        acc = None
        for weight, grads in graphs:
            part = self.fn.flatten(_grad(grads, self.fn.params, vs, retain_graph=retain))
            acc = _accumulate(acc, part, weight)
        return acc

    def _apply_graphs_batched(self, graphs, rows):
        vs = _unflatten_rows(self.fn, rows)
        acc = None
        for weight, grads in graphs:
            part = _flatten_rows(self.fn, _grad_rows(grads, self.fn.params, vs), rows.shape[0])
            acc = _accumulate(acc, part, weight)
        return acc

    def _forward_product(self, v):
        vs = self.fn.unflatten(v)
        primals = tuple(p.detach() for p in self.fn.params)
        acc = torch.zeros_like(v)
        for batch in self.batches:
            def loss_of(ps, batch=batch):
                return self._loss(self.fn(ps, batch.inputs), batch)
            hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (vs,))[1]
            acc.add_(self.fn.flatten(hv), alpha=self._weight(batch.size))
        return acc

    def _fd_product(self, v, step_scale=1.0):
        """``(g(theta + eps v) - g(theta - eps v)) / (2 eps)``, the gradients at new parameter tensors."""
        eps = self._fd_step(v) * step_scale
        if eps == 0.0:
            return torch.zeros_like(v)
        theta, vs = [p.detach() for p in self.fn.params], self.fn.unflatten(v)

        def gradient_at(step: float) -> torch.Tensor:
            ps = [t.requires_grad_(True) for t in fd.shifted(theta, vs, step)]
            acc = None
            for batch in self.batches:
                loss = self._loss(self.fn(ps, batch.inputs), batch)
                acc = _accumulate(acc, self.fn.flatten(torch.autograd.grad(loss, ps, allow_unused=True)),
                                  self._weight(batch.size))
            return acc

        return fd.central_difference(gradient_at, eps)

    @_summed_over_ranks
    def gradient(self) -> torch.Tensor:
        """The full-data gradient as a flat vector (one backward per batch; over all ranks' data on a
        data-parallel operator)."""
        self._sync()
        acc = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with torch.enable_grad(), self.fn.deterministic(), self._context():
            for batch in self.batches:
                loss = self._loss(self.fn(self.fn.params, batch.inputs), batch)
                g = torch.autograd.grad(loss, self.fn.params, allow_unused=True)
                acc.add_(self.fn.flatten(g), alpha=self._weight(batch.size))
        return acc

    @_summed_over_ranks
    def loss(self) -> float:
        """The full-data loss at the current parameters (over all ranks' data on a data-parallel operator)."""
        self._sync()
        total = 0.0
        with torch.no_grad(), self.fn.deterministic(), self._context():
            for batch in self.batches:
                total += self._weight(batch.size) * float(self._loss(self.fn(self.fn.params, batch.inputs), batch))
        return total


class _JacobianGraph:
    """Reverse-mode J v and J^T u for one batch: outputs with their graph, plus the double-vjp trick
    ``J v = d/du <J^T u, v>`` through a dummy cotangent ``u``."""

    def __init__(self, fn: ModelFunction, inputs) -> None:
        self.fn = fn
        self.outputs = fn(fn.params, inputs)
        self.dummy = torch.zeros_like(self.outputs, requires_grad=True)
        self.vjp_of_dummy = torch.autograd.grad(self.outputs, fn.params, self.dummy,
                                                create_graph=True, allow_unused=True)

    def jvp(self, vs) -> torch.Tensor:
        (jv,) = _grad(self.vjp_of_dummy, [self.dummy], vs, retain_graph=True)
        return torch.zeros_like(self.outputs) if jv is None else jv

    def vjp(self, u: torch.Tensor):
        return torch.autograd.grad(self.outputs, self.fn.params, u, retain_graph=True, allow_unused=True)

    def jvp_rows(self, vs) -> torch.Tensor:
        """:meth:`jvp` for a block (per-parameter ``(m, *shape)`` tangents); ``(m, *outputs.shape)``."""
        (jv,) = _grad_rows(self.vjp_of_dummy, [self.dummy], vs)
        m = vs[0].shape[0]
        return self.outputs.new_zeros((m, *self.outputs.shape)) if jv is None else jv

    def vjp_rows(self, U: torch.Tensor):
        """:meth:`vjp` for a block of cotangents ``(m, *outputs.shape)``."""
        return torch.autograd.grad(self.outputs, self.fn.params, U, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)


class GGNOperator(CurvatureOperator):
    r"""Generalized Gauss-Newton :math:`G = \sum_b \frac{n_b}{N} J_b^\top (\nabla_f^2 \ell_b) J_b`.

    The loss Hessian w.r.t. the outputs is applied exactly for any twice-differentiable loss
    (MSE: :math:`\frac{2}{N C} I`; cross-entropy: :math:`\frac1N(\mathrm{diag}(p) - p p^\top)` per sample).
    With a loss closure, ``f`` is ``closure.outputs`` and the loss ``closure.loss_of_outputs``.
    """

    _closure_part = "outputs"

    def _check_deterministic(self) -> None:
        super()._check_deterministic()
        if self.closure is not None and self.closure.fn is not None:
            self._check_same_loss()

    def _check_same_loss(self) -> None:
        """A closure given as ``fn`` and as ``outputs``/``loss_of_outputs`` must describe one loss (the
        Hessian uses the first, the GGN the second): compared on the first batch, to 1e-4 relative (a
        loss computed in float32 inside a float64 model, as Hugging Face's, differs at rounding)."""
        batch = next(iter(self.batches))
        whole_fn = ModelFunction(self.fn.model, self.fn.selection, self.fn.batchnorm, call=self.closure.fn)
        with torch.no_grad(), self.fn.deterministic(), self._context():
            split = float(self._loss(self.fn(self.fn.params, batch.inputs), batch))
            whole = float(whole_fn(whole_fn.params, batch.inputs))
        if not abs(split - whole) <= 1e-4 * max(abs(split), abs(whole), 1e-30):
            raise ValueError(f"GGNOperator: fn(model, batch) = {whole:.8g} but loss_of_outputs(outputs(model, batch), "
                             f"batch) = {split:.8g} on batch 0: the two must describe the same loss")

    def _build_graph(self, batch):
        graph = _JacobianGraph(self.fn, batch.inputs)
        self._loss(graph.outputs, batch)  # validates targets and loss on the first batch
        return graph, batch.targets

    def _apply_graphs(self, graphs, v, retain):
        vs = self.fn.unflatten(v)
        acc = torch.zeros_like(v)
        for weight, (graph, targets) in graphs:
            hjv = loss_output_hvp(self.loss_fn, graph.outputs, targets, graph.jvp(vs))
            acc.add_(self.fn.flatten(graph.vjp(hjv)), alpha=weight)
        return acc

    def _apply_graphs_batched(self, graphs, rows):
        vs = _unflatten_rows(self.fn, rows)
        acc = torch.zeros_like(rows)
        for weight, (graph, targets) in graphs:
            hjv = _loss_output_hvp_rows(self.loss_fn, graph.outputs, targets, graph.jvp_rows(vs))
            acc.add_(_flatten_rows(self.fn, graph.vjp_rows(hjv), rows.shape[0]), alpha=weight)
        return acc

    def _forward_product(self, v):
        vs = self.fn.unflatten(v)
        primals = tuple(p.detach() for p in self.fn.params)
        acc = torch.zeros_like(v)
        for batch in self.batches:
            def f(ps, batch=batch):
                return self.fn(ps, batch.inputs)
            outputs, jv = torch.func.jvp(f, (primals,), (vs,))
            if not self._checked:
                self._loss(outputs, batch)
            hjv = loss_output_hvp(self.loss_fn, outputs, batch.targets, jv)
            _, vjp_fn = torch.func.vjp(f, primals)
            acc.add_(self.fn.flatten(vjp_fn(hjv)[0]), alpha=self._weight(batch.size))
        return acc

    def _fd_product(self, v, step_scale=1.0):
        """``J^T H_L J v`` with ``J v`` by central differences of the outputs, ``J^T u`` by one backward."""
        eps = self._fd_step(v) * step_scale
        if eps == 0.0:
            return torch.zeros_like(v)
        vs, acc = self.fn.unflatten(v), torch.zeros_like(v)
        for batch in self.batches:
            jv = self._fd_outputs_jvp(vs, eps, batch)
            outputs = self.fn(self.fn.params, batch.inputs)
            if not self._checked:
                self._loss(outputs, batch)
            hjv = loss_output_hvp(self.loss_fn, outputs, batch.targets, jv)
            jt = torch.autograd.grad(outputs, self.fn.params, hjv, allow_unused=True)
            acc.add_(self.fn.flatten(jt), alpha=self._weight(batch.size))
        return acc

    def _forward_batched(self, rows):
        primals = tuple(p.detach() for p in self.fn.params)

        def product(v):  # the loss-output Hessian by torch.func too (vmap forbids requires_grad_)
            vs, acc = self.fn.unflatten(v), torch.zeros_like(v)
            for batch in self.batches:
                def f(ps, batch=batch):
                    return self.fn(ps, batch.inputs)

                def loss_grad(o, batch=batch):
                    return torch.func.grad(lambda out: self.loss_fn(out, batch.targets))(o)
                outputs, jv = torch.func.jvp(f, (primals,), (vs,))
                hjv = torch.func.jvp(loss_grad, (outputs,), (jv,))[1]
                _, vjp_fn = torch.func.vjp(f, primals)
                acc = acc + self._weight(batch.size) * self.fn.flatten(vjp_fn(hjv)[0])
            return acc

        return torch.func.vmap(product)(rows)


class NTKOperator(CurvatureOperator):
    r"""Empirical NTK Gram matrix :math:`K = J J^\top` on the stacked outputs of the batches.

    ``K u = J (J^\top u)``: one vector-Jacobian and one Jacobian-vector product per batch. The
    operator's dimension is the total number of output entries (samples x outputs).
    """

    _closure_part = "outputs"
    _closure_weighs = False

    def __init__(self, fn: ModelFunction, inputs: Any, hvp_mode: HvpMode,
                 graph_memory_budget: int | None, *, batched: bool | None = None,
                 closure: BatchLoss | None = None) -> None:
        if closure is not None:
            batches: Any = closure_batches(inputs, fn.device, None, closure, weigh=False)
        else:
            batches = as_batches(inputs, fn.device, with_targets=False)
        with torch.no_grad(), fn.deterministic():
            self.output_shapes = [fn(fn.params, b.inputs).shape for b in batches]
        n = sum(int(torch.Size(s).numel()) for s in self.output_shapes)
        super().__init__(fn, closure, inputs, n, hvp_mode, graph_memory_budget, with_targets=False, batched=batched)
        self._sizes = [int(torch.Size(s).numel()) for s in self.output_shapes]

    def _after_rebuild(self) -> None:
        with torch.no_grad(), self.fn.deterministic():
            self._check_shapes([self.fn(self.fn.params, b.inputs).shape for b in self.batches])

    def _check_shapes(self, shapes: list) -> None:
        if shapes != self.output_shapes:
            raise ValueError(f"NTKOperator: the model's outputs changed shape ({self.output_shapes[0]} -> "
                             f"{shapes[0]}): the operator's dimension cannot change; build a new operator")

    def _first_pass(self) -> list[torch.Tensor]:  # each solve: the outputs' shapes too (a swapped submodule)
        values = super()._first_pass()
        self._check_shapes([v.shape for v in values])
        return values

    def _weight(self, size: int) -> float:
        return 1.0

    _value_name = "first output"

    def _value(self, batch) -> torch.Tensor:
        return self.fn(self.fn.params, batch.inputs)

    def _build_graph(self, batch):
        return _JacobianGraph(self.fn, batch.inputs)

    def _split(self, u: torch.Tensor):
        return [part.view(shape) for part, shape in zip(torch.split(u, self._sizes), self.output_shapes)]

    def _apply_graphs(self, graphs, u, retain):
        graphs = [g for _, g in graphs]
        w = torch.zeros(self.fn.dim, dtype=self.dtype, device=self.device)
        for graph, ub in zip(graphs, self._split(u)):
            w.add_(self.fn.flatten(graph.vjp(ub)))
        ws = self.fn.unflatten(w)
        return torch.cat([graph.jvp(ws).reshape(-1) for graph in graphs])

    def _reverse_product(self, u):  # both passes need every batch's graph: build them per product
        graphs = [(1.0, self._build_graph(b)) for b in self.batches]
        return self._apply_graphs(graphs, u, retain=True)

    def _reverse_rows(self, rows, batched):
        graphs = [(1.0, self._build_graph(b)) for b in self.batches]
        return self._apply_graphs_rows(graphs, rows, batched)

    def _apply_graphs_batched(self, graphs, rows):
        graphs = [g for _, g in graphs]
        m = rows.shape[0]
        W = torch.zeros(m, self.fn.dim, dtype=self.dtype, device=self.device)
        for graph, part, shape in zip(graphs, torch.split(rows, self._sizes, dim=1), self.output_shapes):
            W.add_(_flatten_rows(self.fn, graph.vjp_rows(part.reshape(m, *shape)), m))
        ws = _unflatten_rows(self.fn, W)
        return torch.cat([graph.jvp_rows(ws).reshape(m, -1) for graph in graphs], dim=1)

    def _forward_product(self, u):
        primals = tuple(p.detach() for p in self.fn.params)
        w = torch.zeros(self.fn.dim, dtype=self.dtype, device=self.device)
        fs = []
        for batch, ub in zip(self.batches, self._split(u)):
            def f(ps, batch=batch):
                return self.fn(ps, batch.inputs)
            fs.append(f)
            _, vjp_fn = torch.func.vjp(f, primals)
            w.add_(self.fn.flatten(vjp_fn(ub)[0]))
        ws = self.fn.unflatten(w)
        return torch.cat([torch.func.jvp(f, (primals,), (ws,))[1].reshape(-1) for f in fs])

    def _fd_product(self, u, step_scale=1.0):
        """``J (J^T u)``: ``J^T u`` by one backward per batch, ``J w`` by central differences of the outputs."""
        w = torch.zeros(self.fn.dim, dtype=self.dtype, device=self.device)
        for batch, ub in zip(self.batches, self._split(u)):
            outputs = self.fn(self.fn.params, batch.inputs)
            w.add_(self.fn.flatten(torch.autograd.grad(outputs, self.fn.params, ub, allow_unused=True)))
        eps = self._fd_step(w) * step_scale
        if eps == 0.0:
            return torch.zeros_like(u)
        ws = self.fn.unflatten(w)
        return torch.cat([self._fd_outputs_jvp(ws, eps, batch).reshape(-1) for batch in self.batches])

    def _forward_batched(self, rows):
        primals = tuple(p.detach() for p in self.fn.params)
        fs = [lambda ps, batch=batch: self.fn(ps, batch.inputs) for batch in self.batches]

        def product(u):  # out of place: vmap cannot add a batched tensor into an unbatched one
            w = sum(self.fn.flatten(torch.func.vjp(f, primals)[1](ub)[0]) for f, ub in zip(fs, self._split(u)))
            ws = self.fn.unflatten(w)
            return torch.cat([torch.func.jvp(f, (primals,), (ws,))[1].reshape(-1) for f in fs])

        return torch.func.vmap(product)(rows)


def _model_function(model: nn.Module, loss_fn: Any, params: Sequence[str] | str | None, batchnorm: BatchNormMode,
                    hvp_mode: str, who: str, outputs: bool = False) -> ModelFunction:
    """The model as a function of its parameters: its forward pass, or a loss closure's loss (``outputs``:
    the closure's outputs, refused for a bare closure). Finite differences need floating, trainable parameters."""
    if hvp_mode == _FD:
        fd.check_fd_parameters(model, params)
    if not isinstance(loss_fn, BatchLoss):
        return ModelFunction(model, params, batchnorm)
    if outputs:
        loss_fn.require_outputs(who)
    return ModelFunction(model, params, batchnorm, call=loss_fn.outputs if outputs else loss_fn.loss)


def _make(group: RankGroup | None, what: str, build: Callable[[], CurvatureOperator]) -> CurvatureOperator:
    """``build()`` on one process; with a process group, on every rank, agreed (parameters, sample counts,
    errors: :meth:`~sharpscope.distributed.RankGroup.agree_on_operator`) and made data-parallel: each
    product is the local one times ``N_local / N`` summed over the ranks."""
    if group is None:
        return build()

    def local():
        op = build()
        count = local_sample_count(op.batches)
        op._total = count or None
        signature = (model_signature(list(zip(op.fn.names, op.fn.params))), model_values(op.fn.names, op.fn.params),
                     loss_description(op.loss_fn))
        return op, signature, count

    op, total = group.agree_on_operator(local, what)
    op._group = group
    op._rank_weight = loss_reduction_weight(op.loss_fn, op.num_samples, total)
    op.global_num_samples = total
    return op


def _sharded(model: nn.Module, loss_fn: Callable, data: Any, group: RankGroup | None, params, hvp_mode: str,
             batchnorm: str, what: str):
    """The Hessian of an FSDP2-sharded model: finite differences on every rank (:mod:`sharpscope.finite_difference`)."""
    if what != "hessian_operator":
        raise ValueError(f"{what} does not support FSDP2-sharded models (fully_shard): only hessian_operator does, "
                         "by finite differences")
    if group is None:
        raise ValueError("the model is sharded with FSDP2 (fully_shard): pass distributed=True (or its process group)")
    if hvp_mode not in ("auto", _FD):
        raise ValueError(f"an FSDP2-sharded model is multiplied by finite differences only: hvp_mode='auto' or "
                         f"'finite-difference', got {hvp_mode!r}")
    if isinstance(loss_fn, BatchLoss):
        raise ValueError("an FSDP2-sharded model takes a criterion loss_fn(outputs, targets) and (inputs, targets) "
                         "batches, not a loss closure (ss.batch_loss)")

    def local():
        op = fd.ShardedHessianOperator(model, loss_fn, data, group, params=params, batchnorm=batchnorm)
        count = local_sample_count(op.batches)
        return op, (model_signature(list(zip(op.names, op.params))), None, loss_description(loss_fn)), count

    op, total = group.agree_on_operator(local, what)
    op._agreed(total, max(group.gather(len(list(op.batches)))))
    op.global_num_samples = total
    return op


def _no_ntk(distributed: Any) -> None:
    if distributed is not None and distributed is not False:
        raise ValueError("ntk_operator has no data-parallel form: the NTK is a matrix over the outputs of all samples "
                         "(its dimension is theirs), so it does not split into per-rank sums; gather the inputs on one "
                         "rank and build it there without distributed=")


def hessian_operator(model: nn.Module, loss_fn: Callable, data: Any, *,
                     params: Sequence[str] | str | None = None, hvp_mode: HvpMode = "auto",
                     batchnorm: BatchNormMode = "batch",
                     graph_memory_budget: int | None = None, batched: bool | None = None,
                     distributed: Any = None) -> HessianOperator:
    """The loss Hessian w.r.t. the (selected) trainable parameters, as a matrix-free operator.

    Args:
        model: the model; read, never modified (its train/eval flags are restored after each product).
            A ``DistributedDataParallel`` wrapper is unwrapped.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, averaging over the batch (torch's default); or
            a loss closure :func:`~sharpscope.batch_loss` for batches of any structure (dicts of tensors).
        data: one ``(inputs, targets)`` batch, a list of batches or a fixed-order DataLoader;
            the operator is the sample-weighted average over all of them (with a closure: one batch,
            e.g. a dict, or an iterable of them, weighted by the closure's ``weight``).
        params: parameter names or module prefixes to restrict to (per-layer curvature); default all trainable.
        hvp_mode: ``"auto"``, ``"cached"``, ``"reverse"``, ``"forward"`` or ``"finite-difference"`` (module
            docstring).
        batchnorm: ``"batch"`` (batch statistics, running stats untouched) or ``"eval"``.
        graph_memory_budget: bytes cached graphs may take (default: 1/4 of RAM, 1/2 of free GPU memory);
            batched products are cut into chunks that fit what the cached graphs leave of it.
        batched: how :meth:`~sharpscope.linop.SymmetricOperator.matmat` multiplies a block: ``None``
            (measured on the first block of 8 or more columns), ``True`` (batched) or ``False`` (one
            column at a time); module docstring.
        distributed: ``True`` (the default process group) or a ``ProcessGroup``: ``data`` is this rank's
            shard and the operator is the sample-weighted mean over all ranks' samples
            (:mod:`sharpscope.distributed`); every rank must call. A model sharded with FSDP2 needs it and
            is multiplied by finite differences (:class:`~sharpscope.finite_difference.ShardedHessianOperator`).

    Example:
        >>> import torch, sharpscope as ss
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> H = ss.hessian_operator(model, torch.nn.MSELoss(), (x, y))
        >>> H.shape
        (8, 8)
    """
    group = resolve_group(distributed)
    model = unwrap_model(model)
    if _is_sharded(model):
        return _sharded(model, loss_fn, data, group, params, hvp_mode, batchnorm, "hessian_operator")

    def build():
        fn = _model_function(model, loss_fn, params, batchnorm, hvp_mode, "hessian_operator")
        return HessianOperator(fn, loss_fn, data, fn.dim, hvp_mode, graph_memory_budget, batched=batched)
    return _make(group, "hessian_operator", build)


def ggn_operator(model: nn.Module, loss_fn: Callable, data: Any, *,
                 params: Sequence[str] | str | None = None, hvp_mode: HvpMode = "auto",
                 batchnorm: BatchNormMode = "batch", graph_memory_budget: int | None = None,
                 batched: bool | None = None, distributed: Any = None) -> GGNOperator:
    """The generalized Gauss-Newton matrix ``J^T H_L J`` (same arguments as :func:`hessian_operator`;
    in ``"finite-difference"`` mode ``J v`` is a central difference of the outputs). A loss closure must
    give the outputs apart from the loss: ``ss.batch_loss(outputs=..., loss_of_outputs=...)``."""
    group = resolve_group(distributed)
    model = unwrap_model(model)
    if _is_sharded(model):
        return _sharded(model, loss_fn, data, group, params, hvp_mode, batchnorm, "ggn_operator")

    def build():
        fn = _model_function(model, loss_fn, params, batchnorm, hvp_mode, "ggn_operator", outputs=True)
        return GGNOperator(fn, loss_fn, data, fn.dim, hvp_mode, graph_memory_budget, batched=batched)
    return _make(group, "ggn_operator", build)


def ntk_operator(model: nn.Module, inputs: Any, data: Any = None, *, params: Sequence[str] | str | None = None,
                 hvp_mode: HvpMode = "auto", batchnorm: BatchNormMode = "batch",
                 graph_memory_budget: int | None = None, batched: bool | None = None,
                 distributed: Any = None) -> NTKOperator:
    """The empirical NTK ``K = J J^T`` on the outputs of ``inputs`` (a tensor or a list of input batches).

    With a loss closure, ``ntk_operator(model, ss.batch_loss(outputs=..., loss_of_outputs=...), data)``:
    the NTK of ``outputs(model, batch)`` over the batches of ``data`` (e.g. dicts of tensors).
    ``hvp_mode`` selects how Jacobian products are formed: ``"cached"``/``"reverse"`` (double-vjp
    trick), ``"forward"`` (``torch.func.jvp``/``vjp``) or ``"finite-difference"`` (``J w`` by central
    differences of the outputs). For an exact dense Gram matrix on small problems use
    :func:`sharpscope.dense.ntk_gram`. ``distributed=`` is refused: the NTK's dimension is the number of
    outputs of all samples, so it has no per-rank sum form.
    """
    _no_ntk(distributed)
    model = unwrap_model(model)
    closure, inputs = _ntk_closure(inputs, data)
    fn = _model_function(model, closure, params, batchnorm, hvp_mode, "ntk_operator", outputs=True)
    return NTKOperator(fn, inputs, hvp_mode, graph_memory_budget, batched=batched, closure=closure)


def _is_sharded(model: nn.Module) -> bool:
    from .distributed import is_fsdp_model

    return is_fsdp_model(model)


def _ntk_closure(inputs: Any, data: Any) -> tuple[BatchLoss | None, Any]:
    """``(closure, data)`` of ``ntk_operator(model, closure, data)``, ``(None, inputs)`` of ``(model, inputs)``."""
    if isinstance(inputs, BatchLoss):
        if data is None:
            raise ValueError("ntk_operator(model, loss, data): the data is missing")
        return inputs, data
    if data is not None:
        raise ValueError("ntk_operator(model, inputs) takes the inputs only; a third argument is the data after "
                         "a loss closure: ntk_operator(model, ss.batch_loss(outputs=..., loss_of_outputs=...), data)")
    return None, inputs
