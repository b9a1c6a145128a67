"""The public constructors: ``hessian_operator``, ``ggn_operator``, ``ntk_operator`` (a model, a loss, data and
options in; an operator out), data-parallel (:class:`~.parallel.DataParallel`) or sharded where asked."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .. import finite_difference as fd
from ..closures import BatchLoss
from ..distributed import (
    RankGroup,
    is_fsdp_model,
    local_sample_count,
    loss_description,
    model_signature,
    model_values,
    resolve_group,
    unwrap_model,
)
from ..functional import BatchNormMode, ModelFunction
from .base import CurvatureOperator
from .fisher import FisherKind, FisherOperator
from .ggn import GGNOperator
from .hessian import HessianOperator
from .modes import FD, HvpMode
from .ntk import NTKOperator
from .parallel import DataParallel
from .sharded import ShardedHessianOperator


def _model_function(model: nn.Module, loss_fn: Any, params: Sequence[str] | str | None, batchnorm: BatchNormMode,
                    hvp_mode: str, who: str, outputs: bool = False) -> ModelFunction:
    """The model as a function of its parameters: its forward pass, or a loss closure's loss (``outputs``:
    the closure's outputs, refused for a bare closure). Finite differences need floating, trainable parameters."""
    if hvp_mode == FD:
        fd.check_fd_parameters(model, params)
    if not isinstance(loss_fn, BatchLoss):
        return ModelFunction(model, params, batchnorm)
    if outputs:
        loss_fn.require_outputs(who)
    return ModelFunction(model, params, batchnorm, call=loss_fn.outputs if outputs else loss_fn.loss)


def _make(group: RankGroup | None, what: str, build: Callable[..., CurvatureOperator]) -> CurvatureOperator:
    """``build()`` on one process; with a process group, ``build(DataParallel(group))`` on every rank, agreed
    (parameters, sample counts, errors: :meth:`~sharpscope.distributed.RankGroup.agree_on_operator`): each
    product is the local one times ``N_local / N`` summed over the ranks."""
    if group is None:
        return build()
    parallel = DataParallel(group)

    def local():
        op = build(parallel)
        signature = (model_signature(list(zip(op.fn.names, op.fn.params))), model_values(op.fn.names, op.fn.params),
                     loss_description(op.loss_fn))
        return op, signature, local_sample_count(op.batches)

    op, total = group.agree_on_operator(local, what)
    parallel.agreed(op, total)
    return op


def _curvature(cls: type, name: str, model: nn.Module, loss_fn: Any, data: Any, params, hvp_mode: str,
               batchnorm: str, graph_memory_budget: int | None, batched: bool | None, distributed: Any, *,
               outputs: bool = False, **extra: Any) -> CurvatureOperator:
    """The body of the curvature factories: an FSDP2 model to :func:`_sharded`, else ``cls`` on this process's
    data (``outputs``: its function gives the model's outputs, not the loss), data parallel over ``distributed``."""
    group = resolve_group(distributed)
    model = unwrap_model(model)
    if is_fsdp_model(model):
        return _sharded(model, loss_fn, data, group, params, hvp_mode, batchnorm, name)

    def build(parallel=None):
        fn = _model_function(model, loss_fn, params, batchnorm, hvp_mode, name, outputs=outputs)
        return cls(fn, loss_fn, data, fn.dim, hvp_mode, graph_memory_budget, batched=batched, parallel=parallel,
                   **extra)
    return _make(group, name, build)


def _sharded(model: nn.Module, loss_fn: Callable, data: Any, group: RankGroup | None, params, hvp_mode: str,
             batchnorm: str, what: str) -> ShardedHessianOperator:
    """The Hessian of an FSDP2-sharded model: finite differences on every rank (:mod:`sharpscope.finite_difference`)."""
    if what != "hessian_operator":
        raise ValueError(f"{what} does not support FSDP2-sharded models (fully_shard): only hessian_operator does, "
                         "by finite differences")
    if group is None:
        raise ValueError("the model is sharded with FSDP2 (fully_shard): pass distributed=True (or its process group)")
    if hvp_mode not in ("auto", FD):
        raise ValueError(f"an FSDP2-sharded model is multiplied by finite differences only: hvp_mode='auto' or "
                         f"'finite-difference', got {hvp_mode!r}")
    if isinstance(loss_fn, BatchLoss):
        raise ValueError("an FSDP2-sharded model takes a criterion loss_fn(outputs, targets) and (inputs, targets) "
                         "batches, not a loss closure (ss.batch_loss)")

    def local():
        op = ShardedHessianOperator(model, loss_fn, data, group, params=params, batchnorm=batchnorm)
        count = local_sample_count(op.batches)
        return op, (model_signature(list(zip(op.names, op.params))), None, loss_description(loss_fn)), count

    op, total = group.agree_on_operator(local, what)
    op.agreed(total, max(group.gather(len(list(op.batches)))))
    return op


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
        hvp_mode: ``"auto"``, ``"cached"``, ``"reverse"``, ``"forward"`` or ``"finite-difference"``
            (:mod:`sharpscope.operators`).
        batchnorm: ``"batch"`` (batch statistics, running stats untouched) or ``"eval"``.
        graph_memory_budget: bytes cached graphs may take (default: 1/4 of RAM, 1/2 of free GPU memory);
            batched products are cut into chunks that fit what the cached graphs leave of it.
        batched: how :meth:`~sharpscope.linop.SymmetricOperator.matmat` multiplies a block: ``None``
            (measured on the first block of 8 or more columns), ``True`` (batched) or ``False`` (one
            column at a time); :mod:`sharpscope.operators`.
        distributed: ``True`` (the default process group) or a ``ProcessGroup``: ``data`` is this rank's
            shard and the operator is the sample-weighted mean over all ranks' samples
            (:mod:`sharpscope.distributed`); every rank must call. A model sharded with FSDP2 needs it and
            is multiplied by finite differences (:class:`~sharpscope.operators.ShardedHessianOperator`).

    Example:
        >>> import torch, sharpscope as ss
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> H = ss.hessian_operator(model, torch.nn.MSELoss(), (x, y))
        >>> H.shape
        (8, 8)
    """
    return _curvature(HessianOperator, "hessian_operator", model, loss_fn, data, params, hvp_mode, batchnorm,
                      graph_memory_budget, batched, distributed)


def ggn_operator(model: nn.Module, loss_fn: Callable, data: Any, *,
                 params: Sequence[str] | str | None = None, hvp_mode: HvpMode = "auto",
                 batchnorm: BatchNormMode = "batch", graph_memory_budget: int | None = None,
                 batched: bool | None = None, distributed: Any = None) -> GGNOperator:
    """The generalized Gauss-Newton matrix ``J^T H_L J`` (same arguments as :func:`hessian_operator`;
    in ``"finite-difference"`` mode ``J v`` is a central difference of the outputs). A loss closure must
    give the outputs apart from the loss: ``ss.batch_loss(outputs=..., loss_of_outputs=...)``."""
    return _curvature(GGNOperator, "ggn_operator", model, loss_fn, data, params, hvp_mode, batchnorm,
                      graph_memory_budget, batched, distributed, outputs=True)


def fisher_operator(model: nn.Module, loss_fn: Callable, data: Any, *, kind: FisherKind = "empirical",
                    mc_samples: int = 1, seed: int = 0, params: Sequence[str] | str | None = None,
                    hvp_mode: HvpMode = "auto", batchnorm: BatchNormMode = "batch",
                    graph_memory_budget: int | None = None, batched: bool | None = None,
                    distributed: Any = None) -> FisherOperator:
    """The Fisher information ``J^T C J`` (:mod:`sharpscope.operators.fisher`): ``kind="empirical"`` (outer
    products of the per-sample gradients of the data's loss) or ``kind="mc"`` (the true Fisher of
    cross-entropy by Monte Carlo: ``mc_samples`` labels per sample from the model's softmax, drawn once per
    batch from ``seed``; it converges to :func:`ggn_operator` as ``mc_samples`` grows). The loss must be the
    mean of per-sample losses over the batch's first dimension (``reduction="mean"``). Other arguments as
    :func:`ggn_operator`."""
    return _curvature(FisherOperator, "fisher_operator", model, loss_fn, data, params, hvp_mode, batchnorm,
                      graph_memory_budget, batched, distributed, outputs=True, kind=kind, mc_samples=mc_samples,
                      seed=seed)


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
    if distributed is not None and distributed is not False:
        raise ValueError("ntk_operator has no data-parallel form: the NTK is a matrix over the outputs of all samples "
                         "(its dimension is theirs), so it does not split into per-rank sums; gather the inputs on one "
                         "rank and build it there without distributed=")
    model = unwrap_model(model)
    closure, inputs = _ntk_closure(inputs, data)
    fn = _model_function(model, closure, params, batchnorm, hvp_mode, "ntk_operator", outputs=True)
    return NTKOperator(fn, inputs, hvp_mode, graph_memory_budget, batched=batched, closure=closure)


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
