r"""Sharded Krylov vectors for FSDP2 models: each rank holds only its shard of every vector.

``ss.shard_vectors(H)`` takes the Hessian of a model sharded with FSDP2
(``ss.hessian_operator(fsdp_model, loss_fn, shard, distributed=True)``, a
:class:`~sharpscope.operators.ShardedHessianOperator`) and returns the same operator on sharded
vectors, :class:`ShardedVectorOperator`. ``fully_shard`` parameters are ``Shard(0)`` DTensors: rank
:math:`r` holds rows ``[r c, (r + 1) c)`` of each parameter, :math:`c = \lceil d_0 / R \rceil` (the last ranks
fewer, possibly none). A vector's shard on rank :math:`r` is the flat concatenation of its local rows of every
parameter, in the parameter order of the full vector, i.e. contiguous segments of the global vector
(:class:`~sharpscope.vector_space.ShardedSpace`). Then

* products take and return shards: :math:`(Hv)_r` from :math:`v_r` with no gather. Each product is central
  differences of the gradient (:mod:`sharpscope.finite_difference`): each rank adds
  :math:`\pm\varepsilon v_r` to its own parameter shards, the model's forward and backward run (FSDP
  all-gathers the parameters and reduce-scatters the gradients), and the product's shard is read from the
  local gradient shards; :math:`\|v\|` and :math:`\|\theta\|` for the step are all-reduced;
* :func:`sharpscope.lanczos` and the estimators keep their bases and probes as shards and take every inner
  product as local partial sums plus one ``all_reduce`` per pass (:mod:`sharpscope.lanczos.backends.base`);
  the small projected problems are solved on every rank from identical (all-reduced) scalars, and the
  final scalars are broadcast from rank 0 as for data-parallel operators;
* eigenvectors come back sharded (``res.eigenvectors`` is this rank's ``(n_local, k)`` shard);
  :meth:`ShardedVectorOperator.gather` assembles full vectors where they fit, :meth:`ShardedVectorOperator.shard`
  cuts a full vector (a warm start ``v0``) to this rank's shard.

Data shards x model shards (HSDP): on a 2-D ``("replicate", "shard")`` mesh of :math:`D \times R` ranks,
the parameters are ``(Replicate(), Shard(0))``: each row of the mesh holds a copy of the sharded model, and
every rank its own data. :math:`R` is then the shard dimension: rank :math:`(d, r)` holds shard :math:`r`, the
same shard as its replicas :math:`(d', r)`. The model's backward averages the gradient over all
:math:`D R` ranks, so a product needs nothing more; inner products are all-reduced over every rank and divided
by :math:`D` (:class:`~sharpscope.vector_space.ShardedSpace`), which keeps the copies bit-identical and the
small problems identical on every rank. A 1-D mesh inside a larger ``distributed=`` group is refused
(:func:`~sharpscope.operators.sharded.mesh_layout`).

Memory per rank: the basis is ``max_basis + 1`` rows of the local length, about :math:`1/R` of the
one-process basis (``res.basis_bytes``); a product holds two shards of the gradient and the saved parameter
shards. Products are finite differences: double backward through FSDP2 is not available in torch 2.13
(``autograd.grad(create_graph=True)`` through the all-gather reports the sharded parameters as "not used in
the graph"; docs/scale-out.md says what it would take).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._memory import memory_budget
from .finite_difference import central_difference, fd_step, perturbed
from .linop import SymmetricOperator
from .operators import ShardedHessianOperator
from .vector_space import ShardedSpace

__all__ = ["ShardedVectorOperator", "shard_vectors", "shard_layout"]


def shard_vectors(op: ShardedHessianOperator) -> "ShardedVectorOperator":
    """``op`` (the Hessian of an FSDP2 model) on sharded vectors: each rank holds its shard of every vector
    (module docstring). Every rank must call it."""
    if isinstance(op, ShardedVectorOperator):
        return op
    if not isinstance(op, ShardedHessianOperator):
        raise TypeError(f"shard_vectors takes the Hessian of an FSDP2-sharded model (ss.hessian_operator(fsdp_model, "
                        f"loss_fn, shard, distributed=True)), got {type(op).__name__}: a data-parallel operator's "
                        "vectors are whole on every rank")
    return ShardedVectorOperator(op)


def shard_layout(params: Sequence[torch.Tensor], names: Sequence[str], size: int,
                 rank: int) -> list[tuple[int, int]]:
    """``(global_start, length)`` of this rank's rows of each parameter in the flat global vector: ``Shard(0)``
    rows ``[rank c, (rank + 1) c)`` of ``size`` shards, ``c = ceil(d_0 / size)`` (FSDP2's ``torch.chunk``
    split), checked against the local shard's shape; one-line errors for parameters that are not sharded along
    dim 0 (``(Shard(0),)`` on a 1-D mesh, ``(Replicate(), Shard(0))`` on HSDP's 2-D mesh)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    segments, offset = [], 0
    for name, p in zip(names, params):
        expected = (Shard(0),) if isinstance(p, DTensor) and p.device_mesh.ndim == 1 else (Replicate(), Shard(0))
        if not isinstance(p, DTensor) or tuple(p.placements) != expected:
            what = type(p).__name__ if not isinstance(p, DTensor) else f"placements {tuple(p.placements)}"
            raise ValueError(f"sharded vectors need every measured parameter sharded along dim 0 (fully_shard's "
                             f"default: Shard(0) on a 1-D mesh, (Replicate(), Shard(0)) on HSDP's 2-D mesh), but "
                             f"{name} has {what}: call fully_shard on the root module too and without "
                             "shard_placement_fn, or measure with the full-vector operator")
        rows = p.shape[0] if p.dim() else 1
        per_row = p.numel() // max(rows, 1)
        chunk = -(-rows // size)
        first = min(rank * chunk, rows)
        count = max(min(chunk, rows - first), 0)
        local = p.to_local()
        if local.numel() != count * per_row:
            raise ValueError(f"parameter {name}: this rank's shard has {local.numel()} entries where FSDP2's dim-0 "
                             f"split gives {count * per_row}: an unexpected sharding; measure with the full-vector "
                             "operator")
        segments.append((offset + first * per_row, count * per_row))
        offset += p.numel()
    return segments


class ShardedVectorOperator(SymmetricOperator):
    """The Hessian of an FSDP2 model on sharded vectors (module docstring). ``shape`` is the global
    ``(n, n)``; vectors are this rank's shards, of length ``vector_space.local_size``."""

    def __init__(self, base: ShardedHessianOperator) -> None:
        super().__init__(base.shape[0], base.dtype, base.device)
        self.base = base
        layout = base.layout
        segments = shard_layout(base.params, base.names, layout.shards, layout.shard_rank)
        self.vector_space = ShardedSpace(base.group, base.shape[0], segments, shards=layout.shards,
                                         shard_rank=layout.shard_rank, replicas=layout.replicas,
                                         replica_rank=layout.replica_rank)
        self.local_size = self.vector_space.local_size
        self.hvp_mode = base.hvp_mode

    def __repr__(self) -> str:
        space = self.vector_space
        copies = f", replica={space.replica_rank}/{space.replicas}" if space.replicas > 1 else ""
        return (f"ShardedVectorOperator(n={self.shape[0]}, local={self.local_size}, shard={space.shard_rank}/"
                f"{space.shards}{copies}, dtype={self.dtype})")

    # -- one solve, staleness and results: the wrapped operator's ---------------------------------
    def _dependencies(self) -> tuple[SymmetricOperator, ...]:
        return (self.base,)

    def _sync(self) -> None:
        self.base._sync()

    def _check_vector(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v)
        if v.ndim != 1 or v.shape[0] != self.local_size:
            raise ValueError(f"matvec expects this rank's shard, a vector of length {self.local_size} (of "
                             f"n={self.shape[0]}), got shape {tuple(v.shape)}: ss.shard_vectors(H).shard(v) cuts a "
                             "full vector")
        return v.to(dtype=self.dtype, device=self.device)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for this rank's rows ``(n_local, m)`` of a block, one column at a time."""
        if not isinstance(V, torch.Tensor):
            V = torch.as_tensor(V)
        if V.ndim != 2 or V.shape[0] != self.local_size:
            raise ValueError(f"matmat expects this rank's rows, an ({self.local_size}, m) matrix, got shape "
                             f"{tuple(V.shape)}")
        if V.shape[1] == 0:
            return torch.empty(self.local_size, 0, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def to_dense(self, max_dim: int = 20_000) -> torch.Tensor:
        raise ValueError("to_dense() is not available on sharded vectors: measure the unsharded model, or gather "
                         "products of shards with .gather()")

    def to_scipy(self):
        raise ValueError("to_scipy() is not available on sharded vectors: scipy's solvers hold whole vectors; use "
                         "ss.lanczos, which keeps them sharded")

    # -- the product ------------------------------------------------------------------------------
    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        base = self.base
        try:
            with base._deterministic():
                out = self._product(v)
        finally:
            base._watch.refresh()  # our own writes, restored bit-exactly: not a change
        error = None if bool(torch.isfinite(out).all()) else FloatingPointError(
            "the finite-difference product is NaN or inf: check the data, loss and model")
        base.group.agree(error)
        return out

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        base = self.base
        if not base._deterministic_checked:
            base._check_deterministic()
        norm = float(self.vector_space.norm(v))
        if norm == 0.0:
            return torch.zeros_like(v)
        eps = fd_step(base.dtype, base.parameter_norm(), norm)  # a collective
        directions = self._directions(v)
        saved = [p.detach().clone() for p in base.params]

        def gradient_at(step: float) -> torch.Tensor:
            with perturbed(base.params, saved, directions, step):
                return self._local_gradient()

        return central_difference(gradient_at, eps)

    def _directions(self, v: torch.Tensor) -> list[torch.Tensor]:
        """``v``'s pieces as DTensors laid out like the sharded parameters (no communication)."""
        from torch.distributed.tensor import DTensor

        out = []
        lengths = [n for _, n in self.vector_space.segments]
        for p, part in zip(self.base.params, torch.split(v, lengths)):
            local = p.to_local()
            out.append(DTensor.from_local(part.view(local.shape), p.device_mesh, p.placements, run_check=False,
                                          shape=p.shape, stride=p.stride()))
        return out

    def _local_gradient(self) -> torch.Tensor:
        """This rank's shard of the gradient of the global loss at the current parameters (no gather)."""
        base = self.base
        grads = [p.grad for p in base._all_params]
        for p in base._all_params:
            p.grad = None
        try:
            with torch.enable_grad():
                for batch, weight in base._batch_steps():
                    (base._local_loss(batch) * weight).backward()
            parts = []
            for p, (_, n) in zip(base.params, self.vector_space.segments):
                g = p.grad
                parts.append(torch.zeros(n, dtype=self.dtype, device=self.device) if g is None
                             else g.to_local().reshape(-1).to(self.dtype))
            return torch.cat(parts)
        finally:
            for p, g in zip(base._all_params, grads):
                p.grad = g

    # -- whole vectors ----------------------------------------------------------------------------
    def gather(self, shards: torch.Tensor, max_bytes: int | None = None) -> torch.Tensor:
        """Full vectors from this rank's shards (``(n_local,)`` or ``(n_local, k)``), on every rank: one
        ``all_reduce`` of a zero-filled ``(n, k)`` buffer (exact: each entry is added to zeros). Refused with a
        one-line error when ``n k`` entries exceed ``max_bytes`` (default: 1/8 of the RAM, 1/4 of a GPU's free
        memory)."""
        space = self.vector_space
        single = shards.ndim == 1
        X = shards.reshape(-1, 1) if single else shards
        if X.shape[0] != space.local_size:
            raise ValueError(f"gather expects this rank's shard ({space.local_size} rows), got shape {tuple(shards.shape)}")
        need = space.size * X.shape[1] * X.element_size()
        limit = memory_budget(X.device, gpu_free=0.25, host=0.125) if max_bytes is None else int(max_bytes)
        if need > limit:
            raise ValueError(f"gathering {X.shape[1]} full vector(s) of {space.size} entries needs {need} bytes on every "
                             f"rank, above {limit}: keep them sharded, or gather fewer columns at a time")
        full = space.assemble(X)
        return full[:, 0] if single else full

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full vector (``(n,)`` or ``(n, k)``), e.g. a warm start ``v0``."""
        space = self.vector_space
        if full.shape[0] != space.size:
            raise ValueError(f"shard expects a full vector of length {space.size}, got shape {tuple(full.shape)}")
        pieces = [full[start:start + length] for start, length in space.segments]
        return torch.cat(pieces) if pieces else full[:0]

