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
* ``"cached"`` -- the gradient graph is built once and reused: each product is only the second
  backward (about half the cost of ``"reverse"``; PyHessian's trick). Needs the graphs of all
  batches in memory; their size is measured while they are built (saved-tensor hooks) and the
  operator falls back to ``"reverse"`` when it exceeds ``graph_memory_budget``.
* ``"auto"`` (default) -- ``"cached"`` when the graphs fit the budget; else the first four
  products alternate ``"reverse"`` and ``"forward"`` and the faster is kept (on the 2-core CPU,
  scripts/bench_eigs.py measured double backward 1.32x faster than forward-over-reverse on an MLP
  and 0.81x as fast on a CNN). If an op has no double backward (fused SDPA attention kernels) the
  product is retried with the math attention kernel, then with the other mode, with a warning.

Operators follow the live model. Before every product an operator compares the model's
:meth:`~sharpscope.functional.ModelFunction.fingerprint` with the one it was built on: inside one
solve (:meth:`~sharpscope.linop.SymmetricOperator.pinned`, which :func:`~sharpscope.lanczos` and the
estimators use) a change raises :class:`~sharpscope.linop.StaleOperatorError`; between solves the
operator rebuilds itself on the model as it now is (new parameters, dtype, device; cached graphs
dropped). Before its first product on a model, an operator evaluates the data twice and refuses a
forward pass that is not deterministic (:class:`~sharpscope.linop.StochasticForwardError`): a cached
graph would otherwise freeze one dropout mask or one noise draw into a symmetric, wrong matrix.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from .functional import (BatchNormMode, ModelFunction, as_batches, check_loss, check_targets, describe_change,
                         loss_reduction_weight)
from .linop import StaleOperatorError, StochasticForwardError, SymmetricOperator

__all__ = ["hessian_operator", "ggn_operator", "ntk_operator", "HessianOperator", "GGNOperator",
           "NTKOperator", "CurvatureOperator", "loss_output_hvp"]

HvpMode = Literal["auto", "reverse", "forward", "cached"]
_MODES = ("auto", "reverse", "forward", "cached")
_TRIAL = ("reverse", "forward", "reverse", "forward")  # auto, no cache: warm-up pair, then a timed pair


def default_graph_memory_budget(device: torch.device) -> int:
    """Bytes the cached gradient graphs may use: half the free GPU memory, or 1/4 of host RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2 << 30


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


def _accumulate(acc: torch.Tensor | None, part: torch.Tensor, weight: float) -> torch.Tensor:
    """``acc + weight * part``, reusing ``part`` as the accumulator on the first call (no extra pass)."""
    if acc is None:
        return part if weight == 1.0 else part.mul_(weight)
    return acc.add_(part, alpha=weight)


class CurvatureOperator(SymmetricOperator):
    """Shared machinery: data, deterministic evaluation, HVP-mode choice and fallbacks."""

    def __init__(self, fn: ModelFunction, loss_fn: Callable | None, data: Any, n: int,
                 hvp_mode: HvpMode, graph_memory_budget: int | None, with_targets: bool = True) -> None:
        if hvp_mode not in _MODES:
            raise ValueError(f"hvp_mode must be one of {_MODES}, got {hvp_mode!r}")
        super().__init__(n, fn.dtype, fn.device)
        self.fn, self.loss_fn = fn, loss_fn
        self._data, self._with_targets, self._data_dtype = data, with_targets, fn.dtype
        self.batches = as_batches(data, fn.device, with_targets=with_targets)
        self._fingerprint = fn.fingerprint()
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

    # -- data --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        if self._total is None:
            self._total = self.batches.total_size()
        return self._total

    def _weight(self, size: int) -> float:
        return loss_reduction_weight(self.loss_fn, size, self.num_samples)

    def _loss(self, outputs: torch.Tensor, batch) -> torch.Tensor:
        if not self._checked:
            check_targets(self.loss_fn, outputs, batch.targets)
        loss = self.loss_fn(outputs, batch.targets)
        if not self._checked:
            check_loss(loss, "on the first batch")
        return loss

    # -- following the live model ----------------------------------------------------------------
    def _sync(self) -> None:
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
        self.batches = as_batches(self._data, fn.device, dtype, with_targets=self._with_targets)
        self._fingerprint = fn.fingerprint()
        self._graphs = None
        self._deterministic_checked = False
        self.hvp_mode, self._trial_times, self._checked = self.requested_mode, [], False
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
                shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in batch.inputs)
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
        if not self._deterministic_checked:
            self._check_deterministic()
        if self.hvp_mode == "auto":
            self.hvp_mode = "cached"
        while True:
            try:
                with torch.enable_grad(), self.fn.deterministic(), self._context():
                    out = self._product(v)
                self._checked = True
                return out
            except (RuntimeError, NotImplementedError) as err:
                if not _is_unsupported_derivative(err):
                    raise
                self._fall_back(err)

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
        raise err

    def _product(self, v: torch.Tensor) -> torch.Tensor:
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
                graphs.append((self._weight(batch.size), self._build_graph(batch)))
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

    def release(self) -> None:
        """Free cached graphs (they are rebuilt on the next product)."""
        self._graphs = None

    # -- per-operator pieces -------------------------------------------------------------------
    def _build_graph(self, batch):  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply_graphs(self, graphs, v: torch.Tensor, retain: bool) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _forward_product(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


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

    def gradient(self) -> torch.Tensor:
        """The full-data gradient as a flat vector (one backward per batch)."""
        self._sync()
        acc = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with torch.enable_grad(), self.fn.deterministic(), self._context():
            for batch in self.batches:
                loss = self._loss(self.fn(self.fn.params, batch.inputs), batch)
                g = torch.autograd.grad(loss, self.fn.params, allow_unused=True)
                acc.add_(self.fn.flatten(g), alpha=self._weight(batch.size))
        return acc

    def loss(self) -> float:
        """The full-data loss at the current parameters."""
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


class GGNOperator(CurvatureOperator):
    r"""Generalized Gauss-Newton :math:`G = \sum_b \frac{n_b}{N} J_b^\top (\nabla_f^2 \ell_b) J_b`.

    The loss Hessian w.r.t. the outputs is applied exactly for any twice-differentiable loss
    (MSE: :math:`\frac{2}{N C} I`; cross-entropy: :math:`\frac1N(\mathrm{diag}(p) - p p^\top)` per sample).
    """

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


class NTKOperator(CurvatureOperator):
    r"""Empirical NTK Gram matrix :math:`K = J J^\top` on the stacked outputs of the batches.

    ``K u = J (J^\top u)``: one vector-Jacobian and one Jacobian-vector product per batch. The
    operator's dimension is the total number of output entries (samples x outputs).
    """

    def __init__(self, fn: ModelFunction, inputs: Any, hvp_mode: HvpMode,
                 graph_memory_budget: int | None) -> None:
        batches = as_batches(inputs, fn.device, with_targets=False)
        with torch.no_grad(), fn.deterministic():
            self.output_shapes = [fn(fn.params, b.inputs).shape for b in batches]
        n = sum(int(torch.Size(s).numel()) for s in self.output_shapes)
        super().__init__(fn, None, inputs, n, hvp_mode, graph_memory_budget, with_targets=False)
        self._sizes = [int(torch.Size(s).numel()) for s in self.output_shapes]

    def _after_rebuild(self) -> None:
        with torch.no_grad(), self.fn.deterministic():
            shapes = [self.fn(self.fn.params, b.inputs).shape for b in self.batches]
        if shapes != self.output_shapes:
            raise ValueError(f"NTKOperator: the model's outputs changed shape ({self.output_shapes[0]} -> "
                             f"{shapes[0]}): the operator's dimension cannot change; build a new operator")

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


def hessian_operator(model: nn.Module, loss_fn: Callable, data: Any, *,
                     params: Sequence[str] | str | None = None, hvp_mode: HvpMode = "auto",
                     batchnorm: BatchNormMode = "batch",
                     graph_memory_budget: int | None = None) -> HessianOperator:
    """The loss Hessian w.r.t. the (selected) trainable parameters, as a matrix-free operator.

    Args:
        model: the model; read, never modified (its train/eval flags are restored after each product).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, averaging over the batch (torch's default).
        data: one ``(inputs, targets)`` batch, a list of batches or a fixed-order DataLoader;
            the operator is the sample-weighted average over all of them.
        params: parameter names or module prefixes to restrict to (per-layer curvature); default all trainable.
        hvp_mode: ``"auto"``, ``"cached"``, ``"reverse"`` or ``"forward"`` (module docstring).
        batchnorm: ``"batch"`` (batch statistics, running stats untouched) or ``"eval"``.
        graph_memory_budget: bytes cached graphs may take (default: 1/4 of RAM, 1/2 of free GPU memory).

    Example:
        >>> import torch, sharpscope as ss
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> H = ss.hessian_operator(model, torch.nn.MSELoss(), (x, y))
        >>> H.shape
        (8, 8)
    """
    fn = ModelFunction(model, params, batchnorm)
    return HessianOperator(fn, loss_fn, data, fn.dim, hvp_mode, graph_memory_budget)


def ggn_operator(model: nn.Module, loss_fn: Callable, data: Any, *,
                 params: Sequence[str] | str | None = None, hvp_mode: HvpMode = "auto",
                 batchnorm: BatchNormMode = "batch", graph_memory_budget: int | None = None) -> GGNOperator:
    """The generalized Gauss-Newton matrix ``J^T H_L J`` (same arguments as :func:`hessian_operator`)."""
    fn = ModelFunction(model, params, batchnorm)
    return GGNOperator(fn, loss_fn, data, fn.dim, hvp_mode, graph_memory_budget)


def ntk_operator(model: nn.Module, inputs: Any, *, params: Sequence[str] | str | None = None,
                 hvp_mode: HvpMode = "auto", batchnorm: BatchNormMode = "batch",
                 graph_memory_budget: int | None = None) -> NTKOperator:
    """The empirical NTK ``K = J J^T`` on the outputs of ``inputs`` (a tensor or a list of input batches).

    ``hvp_mode`` selects how Jacobian products are formed: ``"cached"``/``"reverse"`` (double-vjp
    trick) or ``"forward"`` (``torch.func.jvp``/``vjp``). For an exact dense Gram matrix on small
    problems use :func:`sharpscope.dense.ntk_gram`.
    """
    fn = ModelFunction(model, params, batchnorm)
    return NTKOperator(fn, inputs, hvp_mode, graph_memory_budget)
