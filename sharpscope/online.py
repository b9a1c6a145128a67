r"""Online sharpness: the top eigenvalue of what the optimizer sees, measured while training goes on.

:class:`OnlineSharpness` measures, at the steps its caller chooses, the top eigenvalue of the
preconditioned Hessian :math:`D^{1/2} H D^{1/2}` (:mod:`sharpscope.preconditioning`; :math:`D` the next
step's per-parameter step sizes over the reference lr) and its ratio to the edge-of-stability threshold,
or of the raw Hessian where the optimizer defines no threshold (none, RMSprop, Muon). The
:class:`~sharpscope.Recorder` and the Lightning / Hugging Face callbacks use it; it writes nothing.

What makes it cheap enough to leave on:

* **One operator for the whole run.** It is built at the first measurement and reused: an operator
  follows the live model and optimizer (it rebuilds itself between solves when the parameters, their
  values or the optimizer's state changed), and everything it proves or caches about them -- the
  gradient graph, the determinism check -- lives for one solve only (docs/operators-semantics.md), so
  reuse is exact. What reuse saves is what lives longer: the first-product derivative check (4 gradient
  evaluations, once per operator) and the operator's construction.
* **A warm start.** Each solve starts from the previous top eigenvector; the sharpness moves little
  between measurements, so a few products usually suffice. The first solve, with no previous vector,
  starts from the gradient the training step left in ``p.grad`` (times :math:`D^{1/2}` for the
  preconditioned operator) where every selected parameter holds a finite, nonzero one: the gradient lies
  mostly in the top eigenspace of the Hessian (Gur-Ari, Roberts & Dyer 2018, "Gradient descent happens
  in a tiny subspace"), so the solve may need fewer products than from a random vector: 28 to 22 on the MLP
  bench of docs/bench-notes.md (SGD); no gain on its CNN with Adam (39 products over four first solves
  either way). Else (gradients zeroed, as a Hugging Face Trainer does before its
  callbacks; sharded parameters) a seeded random vector. The start changes how fast the solve converges,
  never what it certifies: the stop rule below is the same.
* **A tracking tolerance.** ``tol`` (default ``1e-2``) is the relative Ritz-residual tolerance of
  :func:`~sharpscope.lanczos`: the solve stops when the top Ritz pair :math:`(\theta, y)` has
  :math:`\|A y - \theta y\| \le \mathrm{tol}\,|\theta|`. What that guarantees about the logged value
  :math:`\theta`, with :math:`\lambda_1` the top eigenvalue:

  - *rigorously*, some eigenvalue of :math:`A` lies within :math:`\mathrm{tol}\,|\theta|` of
    :math:`\theta` (Krylov-Weinstein; Parlett, *The Symmetric Eigenvalue Problem*, ch. 4), and
    :math:`\theta \le \lambda_1` (a Ritz value of the top end is a Rayleigh quotient; up to the products'
    rounding, 1e-5 relative allowed in float32 by the tests). That eigenvalue is
    :math:`\lambda_1` unless the start vector had no component along its eigenvector, the limit of every
    Krylov method; the tests check the logged values against a converged solve to this bound;
  - *as an estimate*, :math:`\lambda_1 - \theta \approx \|r\|^2 / (\theta - \lambda_2)` (Kato-Temple;
    Parlett, ch. 10): ``tol**2 / g`` relative for a relative gap ``g`` between the two top eigenvalues.
    On the MLP bench (g = 0.01 to 0.04) the measured errors at the default were 1e-5 to 1.9e-3 relative,
    about 1e-3 as online tracking needs; where the gap is small a tighter ``tol`` costs products (the
    Ritz vector converges at the gap's rate, the value twice as fast).

  Why not a tolerance on the eigenvalue itself: no bound on :math:`\lambda_1 - \theta` follows from a
  Krylov space without an upper bound on :math:`\lambda_2`, and the one a solve offers (the second Ritz
  value) is a *lower* bound that overstates the gap after few products: a stop rule on that estimate
  logged errors of 3.7e-3 for a 1e-3 target on the MLP bench (docs/bench-notes.md).

Each measurement records its cost (:class:`OnlineMeasurement`: seconds, products); :meth:`cost`
sums them (:class:`OnlineCost`).
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["OnlineSharpness", "OnlineMeasurement", "OnlineCost", "SHARPNESS_METRICS", "DEFAULT_TOL"]

SHARPNESS_METRICS = ("sharpness/preconditioned", "sharpness/eos_ratio", "sharpness/hessian")
DEFAULT_TOL = 1e-2  # relative Ritz residual: within 1e-2 of an eigenvalue; ~(1e-2)^2 / relative gap of the top one
_MAX_BASIS = 20     # one eigenpair from a warm start: a short basis, thick-restarted (memory: 21 vectors)


@dataclass(frozen=True)
class OnlineMeasurement:
    """One measurement at ``step``: the ``metrics`` (empty where ``skipped`` holds the reason), the
    value (NaN when skipped), the relative Ritz residual ``residual / |value|`` that bounds its error,
    the cost: wall ``seconds`` (operator building included) and operator products ``num_matvecs``, and
    the solve's ``start`` vector: ``"warm"`` (the previous top eigenvector), ``"gradient"`` or ``"random"``."""

    step: int
    value: float
    metrics: dict[str, float] = field(default_factory=dict)
    relative_residual: float = math.nan
    converged: bool = False
    num_matvecs: int = 0
    seconds: float = 0.0
    skipped: str | None = None
    start: str = ""


@dataclass(frozen=True)
class OnlineCost:
    """What online sharpness cost so far: measurements taken (skipped ones included), their total
    seconds, and products per measurement (the first, the median, the total)."""

    measurements: int
    seconds: float
    products_first: int
    products_median: float
    products_total: int

    def describe(self, elapsed: float | None = None) -> str:
        """One line; with ``elapsed`` (seconds of the training loop it ran in), the share of that time."""
        share = f", {self.seconds / elapsed:.0%} of {elapsed:.1f} s of training" if elapsed else ""
        per = self.seconds / max(self.measurements, 1)
        return (f"online sharpness: {self.measurements} measurements, {self.seconds:.2f} s ({per * 1e3:.0f} ms "
                f"each{share}), products per measurement: median {self.products_median:g}, first "
                f"{self.products_first}")


class OnlineSharpness:
    """The online sharpness of ``model`` on a fixed ``batch`` (module docstring).

    Args:
        model: the model being trained (followed live: no copy).
        loss_fn: a criterion ``loss_fn(outputs, targets)`` or a loss closure (:func:`~sharpscope.batch_loss`).
        batch: the fixed batch ``(inputs, targets)`` or, with a loss closure, a mapping of tensors.
        optimizer: the optimizer whose next step defines :math:`D` and the threshold; None: the raw Hessian.
        tol: relative Ritz-residual tolerance: the value is within ``tol`` relative of an eigenvalue and at most
            the top one; its error to the top one is an estimate, ``tol**2 / g`` (module docstring).
        max_basis: Lanczos basis size before a thick restart (default 20; None: :func:`~sharpscope.lanczos`'s).
        warn: called with a message once when the optimizer defines no threshold (the raw Hessian is
            measured instead) and at each skipped measurement; default :func:`warnings.warn`.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batch: Any, optimizer: torch.optim.Optimizer | None = None,
                 *, tol: float = DEFAULT_TOL, max_basis: int | None = _MAX_BASIS,
                 warn: Callable[[str], Any] | None = None) -> None:
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"sharpness tol must be in (0, 1) (a relative Ritz residual, e.g. 1e-2), got {tol!r}")
        self.model, self.loss_fn, self.batch, self.optimizer = model, loss_fn, batch, optimizer
        self.tol, self.max_basis = float(tol), max_basis
        self._warn = warn if warn is not None else (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=4))
        self.operator = None                     # built at the first measurement, then reused
        self.threshold_defined: bool | None = None
        self._warm: torch.Tensor | None = None
        self.history: list[OnlineMeasurement] = []

    def measure(self, step: int) -> OnlineMeasurement:
        """Measure now (the model and optimizer as they are), record and return the measurement. An
        undefined preconditioned sharpness (every lr 0; no optimizer state yet) is skipped with its reason."""
        from .lanczos import lanczos

        start = time.perf_counter()
        reason = self._prepare()
        if reason is not None:
            out = OnlineMeasurement(step, math.nan, seconds=time.perf_counter() - start, skipped=reason)
            self.history.append(out)
            self._warn(f"online sharpness not logged at step {step}: {reason}")
            return out
        op = self.operator
        kind, v0 = self._start_vector(op)
        res = lanczos(op, k=1, tol=self.tol, v0=v0, return_eigenvectors=True,
                      max_basis=None if self.max_basis is None else min(self.max_basis, op.shape[0] - 1))
        self._warm = res.eigenvectors[:, 0]
        value = float(res.eigenvalues[0])
        out = OnlineMeasurement(step, value, self._metrics(value), float(res.residuals[0]) / max(abs(value), 1e-300),
                                bool(res.converged[0]), int(res.num_matvecs), time.perf_counter() - start,
                                start=kind)
        self.history.append(out)
        return out

    def _start_vector(self, op) -> tuple[str, torch.Tensor | None]:
        """The solve's start (module docstring): the previous top eigenvector, else the training gradient in
        ``p.grad`` (times ``D^1/2``), else None (lanczos draws a seeded random vector)."""
        if self._warm is not None and self._warm.shape[0] == op.shape[0]:
            return "warm", self._warm
        g = self._gradient(op)
        return ("gradient", g) if g is not None else ("random", None)

    def _gradient(self, op) -> torch.Tensor | None:
        """The flat gradient of the operator's parameters as ``p.grad`` holds it (the model's parameters now, by
        name), times ``D^1/2`` for the preconditioned operator; None unless every one is a plain tensor of its
        parameter's shape, dtype and device and the result is finite and nonzero."""
        from .vector_space import space_of

        fn = getattr(getattr(op, "base", op), "fn", None)
        if fn is None or space_of(op).sharded:  # no parameter list, or a rank's shards of the vectors
            return None
        live = dict(self.model.named_parameters())
        grads = []
        for name, p in zip(fn.names, fn.params):
            g = getattr(live.get(name), "grad", None)
            if g is None or type(g) is not torch.Tensor or g.shape != p.shape or g.dtype != p.dtype \
                    or g.device != p.device:
                return None
            grads.append(g.detach())
        v = fn.flatten(grads)
        d_sqrt = getattr(op, "d_sqrt", None)
        if d_sqrt is not None:
            v = v * d_sqrt
        norm = float(torch.linalg.vector_norm(v))
        return v if math.isfinite(norm) and norm > 0 else None

    def _prepare(self) -> str | None:
        """Build the operator on first use; the reason the value is undefined now, or None."""
        from .operators import hessian_operator
        from .preconditioning import preconditioned_hessian_operator, stability_threshold

        if self.threshold_defined is None:
            self.threshold_defined = self.optimizer is not None
            if self.optimizer is not None:
                try:
                    stability_threshold(self.optimizer)
                except (ValueError, ZeroDivisionError) as err:  # no threshold defined for this optimizer
                    self.threshold_defined = False
                    self._warn("online sharpness is the raw Hessian's, without an edge-of-stability ratio: "
                               f"{str(err).splitlines()[0] or type(err).__name__}")
        if not self.threshold_defined:
            if self.operator is None:
                self.operator = hessian_operator(self.model, self.loss_fn, self.batch)
            return None
        if all(float(g["lr"]) == 0 for g in self.optimizer.param_groups):
            return ("every learning rate of the optimizer is 0 (e.g. the end of a linear schedule): "
                    "a step of size 0 has no edge of stability")
        if self.operator is None:
            try:
                self.operator = preconditioned_hessian_operator(self.model, self.loss_fn, self.batch, self.optimizer)
            except ValueError as err:  # no optimizer state yet
                return str(err).splitlines()[0]
        return None

    def _metrics(self, value: float) -> dict[str, float]:
        op = self.operator
        if not self.threshold_defined:
            return {"sharpness/hessian": value}
        metrics = {"sharpness/preconditioned": value, "sharpness/eos_ratio": value / op.threshold}
        if bool((op.d_sqrt == 1).all()):  # D = I (SGD, one lr): this is the raw Hessian too
            metrics["sharpness/hessian"] = value
        return metrics

    def cost(self) -> OnlineCost:
        """The cost so far (:class:`OnlineCost`)."""
        products = [m.num_matvecs for m in self.history if m.skipped is None]
        return OnlineCost(len(self.history), sum(m.seconds for m in self.history), products[0] if products else 0,
                          statistics.median(products) if products else 0.0, sum(products))
