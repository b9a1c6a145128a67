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
as it now is (new parameters, dtype, device). In each solve an operator evaluates the data twice before its
first product is returned (the product's own forward pass is the first evaluation where it evaluates every batch)
and refuses a forward pass that is not deterministic (:class:`~sharpscope.linop.StochasticForwardError`):
a cached graph would otherwise freeze one dropout mask or one noise draw into a symmetric, wrong matrix.
What only chooses how to compute (the timed reverse/forward choice, batching, graph sizes) is kept across
solves: a stale choice costs time, never correctness. docs/operators-semantics.md has the whole contract.

The package: :mod:`.base` (data, loss closures, following the model, determinism), :mod:`.modes` (the request and
the runtime state, the auto selector and fallback ladder), :mod:`.strategies` (the product strategies),
:mod:`.products` (fallbacks and the derivative check), :mod:`.batching` (block products), :mod:`.parallel`
(one process or data-parallel), :mod:`.following` (staleness and determinism, shared with :mod:`.sharded`),
one module of per-batch functions per operator (:mod:`.hessian`, :mod:`.ggn`, :mod:`.ntk`, :mod:`.fisher`) and
:mod:`.factories` (the public constructors).
"""

from __future__ import annotations

from ._autograd import default_graph_memory_budget, loss_output_hvp
from .base import CurvatureOperator
from .factories import fisher_operator, ggn_operator, hessian_operator, ntk_operator
from .fisher import FisherOperator
from .ggn import GGNOperator
from .hessian import HessianOperator
from .modes import HvpMode, ProductMode
from .ntk import NTKOperator
from .parallel import DataParallel, SingleProcess
from .products import SWITCH_WITHIN
from .sharded import ShardedHessianOperator

__all__ = ["hessian_operator", "ggn_operator", "ntk_operator", "fisher_operator", "HessianOperator", "GGNOperator",
           "FisherOperator",
           "NTKOperator", "CurvatureOperator", "ShardedHessianOperator", "loss_output_hvp", "HvpMode", "ProductMode",
           "DataParallel", "SingleProcess", "SWITCH_WITHIN", "default_graph_memory_budget"]
