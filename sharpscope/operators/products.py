"""Products of a curvature operator: the mode ladder driving the strategies (:mod:`.strategies`), the fallbacks on
unsupported derivatives, the first product's derivative check and the symmetry-failure switch (module docs:
docs/operators-semantics.md). A mixin of :class:`~.base.CurvatureOperator`."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .. import finite_difference as fd
from ..linop import DerivativeCheckError, NotSymmetricError
from ._autograd import SavedBytes, default_graph_memory_budget, is_unsupported_derivative
from .following import parameter_norm
from .modes import FD
from .strategies import STRATEGIES

_FOLDING = ("cached", "reverse")  # strategies whose first product evaluates every batch at the parameters
SWITCH_WITHIN = 8  # auto: a symmetry failure within this many products switches to finite differences
CHECKED_MODES = ("auto", "cached")  # the modes whose first product is checked against finite differences


class Products:
    """Vector and block products through the ladder's current strategy, with fallbacks and checks."""

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.parallel.product(self, self._product, v)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.parallel.product(self, self._block_product, V)

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        return STRATEGIES[self.modes.state].product(self, v)

    def _rows_product(self, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        """Products of the rows of ``rows`` (``(m, n)``), as rows, in the current mode."""
        return STRATEGIES[self.modes.state].rows(self, rows, batched)

    def _context(self):
        return self.modes.context()

    @property
    def derivative_check(self) -> str:
        """``"pending"`` (no product yet), ``"passed"``, ``"inconclusive"``, ``"switched"`` or ``"unchecked"``
        (docs/operators-semantics.md: the derivative check)."""
        return self._derivatives

    def _adopt_verdict(self, verdict: str) -> None:
        """The derivative check's outcome agreed with other ranks (:class:`~.parallel.DataParallel`)."""
        self._derivatives = verdict

    def _with_fallbacks(self, product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``product(x)`` in the deterministic context, down the fallback ladder on unsupported derivatives."""
        # the determinism check: folded into the first product where its strategy evaluates every batch
        fold = not self._deterministic_checked and self.modes.start() in _FOLDING
        if not self._deterministic_checked and not fold:
            self._check_deterministic()
        self.modes.start()
        self._recording, self._recorded = fold, None
        try:
            while True:
                try:
                    with torch.enable_grad(), self.fn.deterministic(), self.modes.context():
                        out = product(x)
                    self._checked = True
                    break
                except Exception as err:
                    if not (isinstance(err, (RuntimeError, NotImplementedError)) and is_unsupported_derivative(err)):
                        if fold:  # the check's one-line error where the forward pass fails on the data
                            self._check_deterministic()
                        raise
                    self._graphs = None
                    self.modes.fall_back(err)
                    self._batched_failed = None  # a new rung: batching may work there
                    self._recorded = None
        finally:
            self._recording = False
        if fold:  # the product's own evaluation of every batch, and a second one (both, where none was seen)
            self._check_deterministic(self._recorded)
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
        if tol is None or self.modes.state == FD:
            self._derivatives = "unchecked"
            return out
        v, hv = (x, out) if x.ndim == 1 else (x[:, 0], out[:, 0])
        if not float(v.norm()) > 0:
            return out  # a zero vector proves nothing: the next product is checked
        with torch.enable_grad(), self.fn.deterministic(), self.modes.context():
            at_step, at_half = self._fd_product(v), self._fd_product(v, step_scale=0.5)
        verdict, error, spread = fd.derivative_verdict(hv, at_step, at_half, tol)
        if verdict != "disagree":
            self._derivatives = verdict
            return out
        ops = self._custom_functions()
        named = f" (custom autograd.Function in the graph: {', '.join(ops)})" if ops else ""
        reason = (f"the first product (hvp_mode={self.modes.last_mode()!r}) differs from central differences of the "
                  f"gradient by {error:.2g} relative, and the differences at steps eps and eps/2 agree to "
                  f"{spread:.1g}: an op's second derivative is wrong{named}")
        if self.modes.request != "auto":
            raise DerivativeCheckError(f"{type(self).__name__}: {reason}; use hvp_mode='finite-difference' (first "
                                       "derivatives only) or hvp_mode='auto', which switches to it")
        self._derivatives = "switched"
        self._switch_to_fd(reason)
        if x.ndim == 1:
            return at_step  # the finite-difference product itself
        with torch.enable_grad(), self.fn.deterministic(), self.modes.context():
            return product(x)

    def _custom_functions(self) -> list[str]:
        """The custom ``autograd.Function`` classes in the first batch's graph (for the check's warning)."""
        try:
            with torch.enable_grad(), self.fn.deterministic(), self.modes.context():
                return fd.custom_functions(self._value(next(iter(self.batches))))
        except Exception:  # noqa: BLE001 - a hint only
            return []

    def _switch_to_fd(self, reason: str) -> None:
        """``auto`` only: products by finite differences from now on, with a one-line warning."""
        self._graphs = None
        self.modes.switch_to_fd(reason)

    def _after_asymmetry(self, error: NotSymmetricError, num_matvecs: int) -> bool:
        """A symmetry failure seen by a solver: in ``auto`` mode within the first :data:`SWITCH_WITHIN` products
        on a model that passed the determinism check, an op's double backward is wrong or missing: switch to
        finite differences (True: the solver restarts). In finite-difference mode the products are random."""
        if self.modes.reported == FD:
            raise NotSymmetricError(f"{type(self).__name__}: {str(error).split(': either')[0]}: "
                                    f"{fd.FD_RANDOM_HINT}") from error
        if self.modes.request != "auto" or not self._deterministic_checked or num_matvecs > SWITCH_WITHIN:
            return False
        self._derivatives = "switched"
        self._switch_to_fd(f"the products failed the symmetry test after {num_matvecs} products on a deterministic "
                           "model, so an op's double backward is wrong or missing (e.g. a custom autograd.Function "
                           "with @once_differentiable)")
        return True

    # -- graphs ----------------------------------------------------------------------------------
    def _graph_groups(self):
        """The graphs a reverse product applies, one group at a time: each batch's graph with its weight."""
        values, depends = [], True
        for i, batch in enumerate(self.batches):
            value, graph = self._build_graph(batch)
            values.append(value.detach())
            depends = depends if i else value.requires_grad
            del value
            yield [(self._weight(batch.size), graph)]
            del graph
        self._record_pass(values, depends)

    def _record_pass(self, values: list[torch.Tensor], depends: bool) -> None:
        """A complete pass over the batches (their values, the first one's dependence on the parameters): kept
        for the determinism check while the first product of a solve records (:meth:`_with_fallbacks`)."""
        if self._recording and self._recorded is None:
            self._recorded = (values, depends)

    def _budget(self) -> int:
        budget = self.graph_memory_budget
        return default_graph_memory_budget(self.device) if budget is None else budget

    def _cached_graphs(self) -> list | None:
        """Every batch's graph for this solve, measured while built (saved-tensor hooks); None over the budget."""
        if self._graphs is not None:
            return self._graphs
        budget = self._budget()
        counter = SavedBytes(self.fn.params)
        graphs, values, depends = [], [], True
        with counter.hooks():
            for i, batch in enumerate(self.batches):
                before = counter.nbytes
                value, graph = self._build_graph(batch)
                graphs.append((self._weight(batch.size), graph))
                values.append(value.detach())
                depends = depends if i else value.requires_grad
                del value, graph
                self._column_bytes = max(self._column_bytes or 0, counter.nbytes - before)
                if counter.nbytes > budget:
                    break
            else:
                self._record_pass(values, depends)
        self.graph_bytes = counter.nbytes
        if counter.nbytes > budget:
            if self.modes.request == "cached":
                warnings.warn(f"{type(self).__name__}: the gradient graphs need more than the "
                              f"graph_memory_budget ({budget / 2**20:.0f} MiB); recomputing them per product "
                              "(hvp_mode='reverse')", RuntimeWarning, stacklevel=6)
            return None
        self._graphs = graphs
        return graphs

    # -- finite differences (sharpscope/finite_difference.py) ---------------------------------------
    def _fd_step(self, v: torch.Tensor) -> float:
        """The central-difference step for direction ``v`` (0.0 for a zero vector)."""
        if self._fd_theta is None or self._fd_theta[0] is not self.fn:
            self._fd_theta = (self.fn, parameter_norm(self.fn.params))
        v_norm = float(v.norm())
        return fd.fd_step(self.dtype, self._fd_theta[1], v_norm) if v_norm > 0 else 0.0

    def _fd_outputs_jvp(self, vs, eps: float, batch) -> torch.Tensor:
        """``J_b v`` by central differences of the batch's outputs (no graph)."""
        theta = [p.detach() for p in self.fn.params]
        with torch.no_grad():
            return fd.central_difference(lambda s: self.fn(fd.shifted(theta, vs, s), batch.inputs), eps)

    # -- per-operator functions -------------------------------------------------------------------
    def _build_graph(self, batch) -> tuple[torch.Tensor, Any]:  # pragma: no cover - abstract
        """``(value, graph)``: the batch's value (what the determinism check compares) and its graph."""
        raise NotImplementedError

    def _apply_graphs(self, graphs, v: torch.Tensor, retain: bool) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _apply_graphs_batched(self, graphs, rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _forward_product(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _forward_batched(self, rows: torch.Tensor) -> torch.Tensor:
        """Forward-over-reverse products of a block: ``torch.func.vmap`` over the one-vector product."""
        return torch.func.vmap(self._forward_product)(rows)

    def _fd_product(self, v: torch.Tensor, step_scale: float = 1.0) -> torch.Tensor:  # pragma: no cover
        """The product by central differences, at ``step_scale`` times the usual step."""
        raise NotImplementedError
