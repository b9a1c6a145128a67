r"""Hessian-vector products by central differences of gradients (``hvp_mode="finite-difference"``).

For ops without a usable double backward (a custom ``autograd.Function`` with ``@once_differentiable``,
fused kernels) and for models sharded with FSDP2, whose parameters cannot be swapped for a functional
evaluation: only first derivatives are taken.

.. math::  d(\varepsilon) = \frac{g(\theta + \varepsilon v) - g(\theta - \varepsilon v)}{2\varepsilon}
           = H v + \frac{\varepsilon^2}{6} \nabla^4 L[v, v, v, \cdot] + O(\varepsilon^4).

**Error bound and step.** With :math:`M` a bound on the fourth derivative near :math:`\theta` and unit
roundoff :math:`u` (``torch.finfo(dtype).eps / 2``):

* truncation: :math:`\le \frac{\varepsilon^2}{6} M \|v\|^3`;
* rounding: each computed gradient is off by about :math:`c\,u\,G` (:math:`G \ge \|g\|`, the scale of
  the terms it sums), and the perturbed parameters :math:`\mathrm{fl}(\theta \pm \varepsilon v)` are off
  by :math:`u|\theta_i|` per entry, which moves the gradient by :math:`u\|H\|\|\theta\|`; divided by
  :math:`2\varepsilon`: :math:`\le u K / \varepsilon`, :math:`K = cG + \|H\|\|\theta\|`.

:math:`E(\varepsilon) = \frac{\varepsilon^2}{6} M\|v\|^3 + uK/\varepsilon` is smallest at
:math:`\varepsilon^* = (3uK / (M\|v\|^3))^{1/3}`, where :math:`E^* \propto u^{2/3}`. :math:`M` and
:math:`K` are unknown; a network's curvature changes on a scale set by its weights (moving a layer by a
fraction of its norm changes its activations by about that fraction), and the rounding of
:math:`\theta \pm \varepsilon v` is relative to :math:`|\theta|`, so the step is a fixed fraction of the
parameters' norm, :math:`K/M = (c\|\theta\|)^3`:

.. math::  \varepsilon = c\,(3u)^{1/3} \, \max(\|\theta\|, 1) / \|v\|, \qquad c = 0.1,

:math:`6.9 \cdot 10^{-7}` of :math:`\|\theta\|` in float64 and :math:`5.6 \cdot 10^{-4}` in float32
(the floor 1 for parameters near zero). The constant :math:`c` is calibrated: on the test models
(tanh and GELU MLPs, a CNN with BatchNorm, attention) and the digits MLP the top-5 error is
truncation-bound (falling like :math:`c^2`) down to :math:`c \approx 0.1`-:math:`0.3` and flat or rising
below, where rounding takes over; at :math:`c = 0.1` it is 1e-11 to 3e-11 relative in float64 and 6e-6 to
1.5e-5 in float32 (at :math:`c = 1`: up to 1.9e-9 and 1.4e-3). Stated and tested accuracy
(``tests/test_finite_difference.py``): top eigenvalues within 1e-6 relative of the exact ones in float64
and 3e-3 in float32 on smooth models (tanh, GELU). The product is symmetric only to that accuracy (it is
not even exactly linear in :math:`v`); the Lanczos symmetry probe's tolerance
(:math:`100\sqrt{\epsilon}\|A\|`) is far above it, so a symmetry failure in this mode means random products.

**Cost.** Two gradients (forward and backward) per data batch and product, against a forward, a backward
and a double backward for ``"reverse"``: no cached graph and no second-order memory.

**The parameters are not written** on a model evaluated functionally (the curvature operators'
``ModelFunction``): the perturbed values are new tensors passed to ``torch.func.functional_call``, so
the model, its version counters and other operators' cached graphs are untouched. An FSDP2-sharded model
(:class:`sharpscope.operators.ShardedHessianOperator`) must be called as it is: its parameters are perturbed in place under
``torch.no_grad``, restored by copying the saved shards back (bit-exact), and the operator's staleness
fingerprint is refreshed after its own writes.

**The derivative check** (``hvp_mode="auto"`` and ``"cached"``, :func:`derivative_verdict`): the first
product of an operator is compared with central differences at two steps, :math:`d(\varepsilon)` and
:math:`d(\varepsilon/2)`. Where the model is smooth at that scale the two agree to their truncation and
rounding error (1e-4 to 1e-3 relative in float32 on tanh/GELU MLPs, BatchNorm CNNs and attention); across
kinks (ReLU, max-pool, top-k routing) they do not, and the check is inconclusive.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["fd_step", "central_difference", "perturbed", "check_fd_parameters",
           "FD_RANDOM_HINT", "derivative_verdict", "derivative_tolerance", "custom_functions"]

FD_RANDOM_HINT = ("in hvp_mode='finite-difference' the products need no double backward, so this means the products "
                  "are random: a forward pass that stays stochastic in eval mode (F.dropout(training=True), input "
                  "noise) or a data order that changes between passes")


STEP_FRACTION = 0.1  # c in the module docstring: calibrated on the test models and the digits MLP


def fd_step(dtype: torch.dtype, theta_norm: float, v_norm: float) -> float:
    r"""The central-difference step :math:`c\,(3u)^{1/3} \max(\|\theta\|, 1) / \|v\|` (module docstring)."""
    u = torch.finfo(dtype).eps / 2
    return STEP_FRACTION * (3 * u) ** (1 / 3) * max(float(theta_norm), 1.0) / float(v_norm)


def central_difference(evaluate: Callable[[float], torch.Tensor], eps: float) -> torch.Tensor:
    """``(evaluate(+eps) - evaluate(-eps)) / (2 eps)``: ``evaluate(s)`` is the quantity at ``theta + s v``."""
    plus = evaluate(eps)
    minus = evaluate(-eps)
    return plus.sub_(minus).div_(2 * eps)


def derivative_tolerance(dtype: torch.dtype) -> float | None:
    """Relative tolerance of the derivative check: 1e-6 in float64, 1e-2 in float32; None (no check) in
    16-bit, where central differences are too coarse (a 16-bit model is reported unchecked)."""
    bits = torch.finfo(dtype).bits
    return 1e-6 if bits >= 64 else 1e-2 if bits >= 32 else None


def derivative_verdict(product: torch.Tensor, fd_step: torch.Tensor, fd_half: torch.Tensor,
                       tol: float) -> tuple[str, float, float]:
    r"""``(verdict, error, spread)`` of a product against central differences at steps :math:`\varepsilon`
    (``fd_step``) and :math:`\varepsilon/2` (``fd_half``), norms relative to the largest of the three:

    * ``spread`` = :math:`\|d(\varepsilon) - d(\varepsilon/2)\|`: above ``tol`` the differences do not
      agree with each other (a kink within the step): ``"inconclusive"``;
    * ``error`` = the distance of the product to the nearer of the two: ``"disagree"`` when it exceeds
      ``tol + 2 spread`` (the differences' own uncertainty), else ``"passed"``.

    The detection limit is thus ``tol`` plus twice the differences' spread: in float32 an error above about
    1% of the product, in float64 above about 1e-6."""
    norms = [float(torch.linalg.vector_norm(t, dtype=torch.float64)) for t in (product, fd_step, fd_half)]
    scale = max(norms)
    if not scale > 0:
        return "passed", 0.0, 0.0
    spread = float(torch.linalg.vector_norm(fd_step - fd_half, dtype=torch.float64)) / scale
    error = min(float(torch.linalg.vector_norm(product - d, dtype=torch.float64)) for d in (fd_step, fd_half)) / scale
    if not spread <= tol:
        return "inconclusive", error, spread
    return ("disagree" if error > tol + 2 * spread else "passed"), error, spread


def custom_functions(value: torch.Tensor, limit: int = 3) -> list[str]:
    """Names of the custom ``autograd.Function`` classes in ``value``'s graph (the usual suspects of a wrong
    second derivative), at most ``limit``, in the order met walking back from ``value``."""
    names: list[str] = []
    seen, stack = set(), [value.grad_fn]
    while stack and len(names) < limit:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            name = type(node).__name__.removesuffix("Backward")
            if name not in names:
                names.append(name)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return names


def shifted(theta: Sequence[torch.Tensor], directions: Sequence[torch.Tensor], step: float) -> list[torch.Tensor]:
    """New tensors ``theta + step * direction`` (out of place)."""
    return [torch.add(t, d, alpha=step) for t, d in zip(theta, directions)]


def check_fd_parameters(model: nn.Module, params: Sequence[str] | str | None = None) -> None:
    """One-line errors for what finite differences cannot perturb: no trainable parameter (all frozen or
    integer), or a selected parameter that is not floating point."""
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        kinds = "integer or frozen" if any(not p.is_floating_point() for _, p in named) else "frozen"
        raise ValueError(f"hvp_mode='finite-difference' perturbs trainable floating-point parameters, and "
                         f"{type(model).__name__} has none (all {len(named)} are {kinds}): set requires_grad=True "
                         "on the parameters to measure")
    for n, p in trainable:
        if not p.is_floating_point():  # pragma: no cover - torch refuses requires_grad on integer tensors
            raise ValueError(f"hvp_mode='finite-difference' cannot perturb parameter {n} of dtype {p.dtype}")


@contextlib.contextmanager
def perturbed(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
              step: float) -> Iterator[None]:
    """Parameters set in place to ``saved + step * direction`` inside the block, and copied back from
    ``saved`` (bit-exact) on the way out, also on an error."""
    try:
        with torch.no_grad():
            for p, s, d in zip(params, saved, directions):
                p.copy_(s)
                p.add_(d, alpha=step)
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
