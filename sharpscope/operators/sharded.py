r"""The Hessian of an FSDP2-sharded model by central differences of its gradients (:mod:`sharpscope.finite_difference`),
following the model and checking determinism with the same code as the other operators (:mod:`.following`).

Meshes (:func:`mesh_layout`): FSDP2 shards over a 1-D mesh (``fully_shard``), or over a 2-D
``("replicate", "shard")`` mesh (HSDP: each parameter ``(Replicate(), Shard(0))``, a full copy of the sharded
model on each row of the mesh). Either way the model's backward averages the gradient over every rank of the
mesh (a reduce-scatter over the shard dimension, then for HSDP an all-reduce over the replicate dimension),
so data shards x model shards need no extra collective: every rank of the mesh holds its own data, and the
operator is the sample-weighted mean over all of them, as for every data-parallel operator
(:mod:`sharpscope.distributed`). The operator's process group (``distributed=``) must therefore be the mesh's
ranks: a 1-D mesh inside a larger data-parallel group would average over the mesh only (a silent partial
mean), and is refused with one line naming the 2-D mesh that expresses it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..distributed import RankGroup
from ..finite_difference import FD_RANDOM_HINT, central_difference, check_fd_parameters, fd_step, perturbed
from ..functional import _select, as_batches, check_loss, deterministic_mode, loss_reduction_weight, running_stats_kept
from ..linop import NotSymmetricError, SymmetricOperator
from .following import ModelWatch, check_same_evaluation, parameter_norm, shard_fingerprint

HSDP_HINT = ("shard data x model over a 2-D mesh (HSDP): mesh = init_device_mesh(device, (replicas, shards), "
             "mesh_dim_names=('replicate', 'shard')); fully_shard(module, mesh=mesh)")


@dataclass(frozen=True)
class MeshLayout:
    """Where this rank sits in the FSDP2 mesh: ``shards`` ranks split each parameter (this one holds split
    ``shard_rank``), ``replicas`` copies of the sharded model (this rank is in copy ``replica_rank``); the
    mesh has ``shards * replicas`` ranks, the operator's process group."""

    shards: int
    shard_rank: int
    replicas: int
    replica_rank: int
    ndim: int


def mesh_layout(params: Sequence[torch.Tensor], names: Sequence[str], group: RankGroup) -> MeshLayout:
    """The mesh of the measured parameters (module docstring), checked: every one a DTensor on one mesh of 1 or 2
    dimensions (a 2-D mesh replicating along dim 0, as HSDP does), whose ranks are the process group's. One-line
    errors naming the fix otherwise."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mesh = None
    for name, p in zip(names, params):
        if not isinstance(p, DTensor):
            raise ValueError(f"parameter {name} is a plain tensor in an FSDP2 model: its gradient is not averaged "
                             "over the ranks; call fully_shard on the module that holds it (or on the root module)")
        if mesh is None:
            mesh, first = p.device_mesh, name
        elif p.device_mesh != mesh:
            raise ValueError(f"parameters {first} and {name} are sharded over different meshes ({mesh} and "
                             f"{p.device_mesh}): fully_shard every module with one mesh")
        kinds = tuple("replicate" if pl.is_replicate() else "shard" if pl.is_shard() else "other" for pl in p.placements)
        if kinds not in (("shard",), ("replicate", "shard")):
            raise ValueError(f"parameter {name} is a DTensor on a {mesh.ndim}-D mesh with placements "
                             f"{tuple(p.placements)}: sharpscope measures FSDP2's layouts, a 1-D mesh (FSDP) or a 2-D "
                             f"mesh replicated along dim 0 and sharded along dim 1 (HSDP); {HSDP_HINT}")
    assert mesh is not None  # params is not empty (check_fd_parameters)
    mesh_ranks = sorted(int(r) for r in mesh.mesh.flatten().tolist())
    group_ranks = sorted(dist.get_process_group_ranks(group.group))
    if mesh_ranks != group_ranks:
        raise ValueError(f"the FSDP2 mesh holds ranks {_ranks(mesh_ranks)} but distributed= holds {_ranks(group_ranks)}: "
                         "the model's backward averages over the mesh only; pass distributed= the mesh's ranks "
                         f"(mesh.get_group() for a 1-D mesh), or {HSDP_HINT}")
    two = mesh.ndim == 2
    last = mesh.ndim - 1
    return MeshLayout(shards=mesh.size(last), shard_rank=mesh.get_local_rank(last),
                      replicas=mesh.size(0) if two else 1, replica_rank=mesh.get_local_rank(0) if two else 0,
                      ndim=mesh.ndim)


def _ranks(ranks: list[int]) -> str:
    return f"{ranks}" if len(ranks) <= 8 else f"[{ranks[0]}, ..., {ranks[-1]}] ({len(ranks)})"


class ShardedHessianOperator(SymmetricOperator):
    r"""The Hessian of a model sharded with FSDP2 (``fully_shard``), by central differences of its gradients.

    Built by ``ss.hessian_operator(fsdp_model, loss_fn, shard, distributed=True)``; the data-parallel
    semantics of :mod:`sharpscope.distributed` (each rank its own shard, the sample-weighted mean over all
    ranks' samples). Each product perturbs the sharded parameters in place (each rank its own shard of
    ``theta +- eps v``, cut locally by ``distribute_tensor(..., src_data_rank=None)``), runs the model's own
    forward and backward over the local data (FSDP all-gathers the parameters and reduce-scatters the
    gradients, averaging over ranks: each batch's loss is weighted by ``world * n_b / N``), gathers the
    gradient (``full_tensor``), and restores the parameters bit-exactly; ``.grad`` and BatchNorm buffers
    are restored too.

    The mesh: 1-D (FSDP) or 2-D ``("replicate", "shard")`` (HSDP), its ranks the process group's
    (:func:`mesh_layout`; module docstring); with HSDP each rank holds its own data too.

    Memory: vectors are full-size on every rank (the Lanczos basis holds ``max_basis`` of them, and each
    product gathers the full gradient twice), so the operator fits models whose full parameter vector,
    times the basis size, fits one device, although the model itself is sharded.
    """

    hvp_mode = "finite-difference"

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any, group: RankGroup, *,
                 params: Sequence[str] | str | None = None, batchnorm: str = "batch") -> None:
        if batchnorm not in ("batch", "eval"):
            raise ValueError(f"batchnorm must be 'batch' or 'eval', got {batchnorm!r}")
        check_fd_parameters(model, params)
        selected = _select(model, params)
        self.model, self.loss_fn, self.group, self.batchnorm = model, loss_fn, group, batchnorm
        self.names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.layout = mesh_layout(self.params, self.names, group)  # every one a DTensor
        super().__init__(sum(self.numels), self.params[0].dtype, self.params[0].to_local().device)
        self.batches = as_batches(data, self.device)
        self._all_params = [p for p in model.parameters() if p.requires_grad]
        self._deterministic_checked = False
        self._watch = ModelWatch(lambda: shard_fingerprint(self.model))
        self.num_samples = sum(b.size for b in self.batches)
        self.global_num_samples: float | None = None
        self._steps = 0

    def agreed(self, total: float, steps: int) -> None:
        """The ranks agreed: ``total`` samples in all, ``steps`` batch steps per product (the largest local
        count: FSDP needs every rank to run as many forwards and backwards)."""
        self.global_num_samples, self._steps = total, steps

    # -- staleness -----------------------------------------------------------------------------
    def _sync(self) -> None:
        change = self._watch.change()
        if change is None:
            return
        if self._pins:
            raise ModelWatch.stale(type(self).__name__, change)
        self._watch.refresh()
        self._deterministic_checked = False

    def same_on_all_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.broadcast(x)

    def _after_asymmetry(self, error: NotSymmetricError, num_matvecs: int) -> bool:
        coarse = ""
        if torch.finfo(self.dtype).bits <= 32:  # measured: a 26M-parameter GPT-2 in float32 missed by 6%
            coarse = (f"; or, in {str(self.dtype).replace('torch.', '')}, central differences too coarse for the "
                      f"symmetry test at n={self.shape[0]} (it allows about 0.05/sqrt(n) of ||A||): measure in float64")
        raise NotSymmetricError(f"{type(self).__name__}: {str(error).split(': either')[0]}: {FD_RANDOM_HINT}"
                                f"{coarse}") from error

    # -- evaluation ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _deterministic(self) -> Iterator[None]:
        """Deterministic mode, BatchNorm's running statistics restored afterwards (the sharded model runs
        its own forward, which updates them in training mode)."""
        with deterministic_mode(self.model, self.batchnorm), running_stats_kept(self.model):
            yield

    def _batch_steps(self) -> Iterator[tuple[Any, float]]:
        """``(batch, weight)`` for ``self._steps`` steps: the local batches, then the first one again with
        weight 0 (every rank runs as many forwards and backwards)."""
        batches = list(self.batches)
        world = self.group.size
        for i in range(self._steps):
            if i < len(batches):
                b = batches[i]
                yield b, world * loss_reduction_weight(self.loss_fn, b.size, self.global_num_samples)
            else:
                yield batches[0], 0.0

    def _local_loss(self, batch) -> torch.Tensor:
        loss = self.loss_fn(self.model(*batch.inputs), batch.targets)
        check_loss(loss, "on a batch of this rank")
        return loss

    def _gradient(self) -> torch.Tensor:
        """The full gradient of the global loss at the model's current parameters (every rank: the same)."""
        grads = [p.grad for p in self._all_params]
        for p in self._all_params:
            p.grad = None
        try:
            with torch.enable_grad():
                for batch, weight in self._batch_steps():
                    (self._local_loss(batch) * weight).backward()
            parts = []
            for p, n in zip(self.params, self.numels):
                g = p.grad
                if g is None:
                    parts.append(torch.zeros(n, dtype=self.dtype, device=self.device))
                else:
                    parts.append(g.full_tensor().reshape(-1))
            return torch.cat(parts)
        finally:
            for p, g in zip(self._all_params, grads):
                p.grad = g

    def parameter_norm(self) -> float:
        """``||theta||_2`` of the measured parameters in float64: local shards' squares summed over the process
        group (one ``all_reduce``), each replica's copy counted once (HSDP holds ``layout.replicas`` copies)."""
        return parameter_norm(self.params, lambda sq: self.group.all_sum(sq) / self.layout.replicas)

    def _check_deterministic(self) -> None:
        """Two evaluations of every batch step agree to rounding (:func:`~.following.check_same_evaluation`),
        the outcome agreed across ranks."""
        error = None
        with torch.no_grad():
            first = [self._local_loss(b).detach() for b, _ in self._batch_steps()]
            second = [self._local_loss(b).detach() for b, _ in self._batch_steps()]
        try:
            for i, (a, b) in enumerate(zip(first, second)):
                check_same_evaluation(type(self).__name__, i, a, b, "loss", self.dtype)
        except Exception as err:  # noqa: BLE001 - agreed on every rank
            error = err
        self.group.agree(error)
        self._deterministic_checked = True

    def _directions(self, v: torch.Tensor) -> list[torch.Tensor]:
        """This rank's shards of ``v``, laid out like the sharded parameters (no communication)."""
        from torch.distributed.tensor import distribute_tensor

        return [distribute_tensor(part.view(p.shape), p.device_mesh, p.placements, src_data_rank=None)
                for p, part in zip(self.params, torch.split(v, self.numels))]

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        try:
            with self._deterministic():
                out = self._product(v)
        finally:
            self._watch.refresh()  # our own writes, restored bit-exactly (and flags): not a change
        error = None if bool(torch.isfinite(out).all()) else FloatingPointError(
            "the finite-difference product is NaN or inf: check the data, loss and model")
        self.group.agree(error)
        return out

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        if not self._deterministic_checked:
            self._check_deterministic()
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        eps = fd_step(self.dtype, self.parameter_norm(), norm)  # a collective: every product
        directions = self._directions(v)
        saved = [p.detach().clone() for p in self.params]

        def gradient_at(step: float) -> torch.Tensor:
            with perturbed(self.params, saved, directions, step):
                return self._gradient()

        return central_difference(gradient_at, eps)
