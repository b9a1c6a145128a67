r"""The vector space a solver works in: where a vector's entries live and how inner products are summed.

:func:`sharpscope.lanczos` and the estimators hold their vectors (Krylov bases, probes) as 1-D tensors and
take every inner product and norm through a space, :func:`space_of` ``(op)``:

* :class:`LocalSpace` (every operator by default): the whole vector in this process; the reduction is
  the identity and random vectors are drawn whole (by the solver's generator, then
  :func:`~sharpscope.linop.same_on_all_ranks`: rank 0's on every rank of a data-parallel operator).
* :class:`ShardedSpace` (an operator with a ``vector_space`` attribute: ``ss.shard_vectors(H)`` on an FSDP2
  model, :mod:`sharpscope.sharded_vectors`): each rank holds its *shard*, a set of contiguous segments
  of the global vector. An inner product is the local partial sum plus one ``all_reduce`` of the partial
  sums (callers batch the scalars of one step into one tensor, one collective):

  .. math::  \langle u, v \rangle = \sum_r \langle u_r, v_r \rangle .

  The ``all_reduce`` hands every rank the same bits, so every scalar a solver decides on (``alpha``,
  ``beta``, the Ritz problem, convergence) is identical on every rank and the ranks take the same steps.
  With ``replicas`` copies of every shard (HSDP: each row of a ``("replicate", "shard")`` mesh holds the whole
  vector), the ``all_reduce`` runs over all ranks and the sum is divided by ``replicas``: one collective, the
  same bits on every rank by construction. The copies stay bit-identical, since everything that updates them
  is: the products (the model's backward all-reduces the gradient shards over the replicas), these scalars,
  and the random draws below.
  Random vectors are drawn per shard by a rank-independent scheme (:meth:`ShardedSpace.random_rows`): the
  global vector is cut into blocks of :data:`BLOCK` entries, block ``b`` drawn by its own generator seeded
  from ``(base, b)``, ``base`` drawn from the solver's generator (the same on every rank). A rank draws only
  the blocks its segments touch, and R ranks hold the shards of the same global vector as one rank.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .linop import same_on_all_ranks

__all__ = ["LocalSpace", "ShardedSpace", "space_of", "BLOCK", "tall_skinny_q"]

BLOCK = 4096  # entries of the global vector drawn by one seeded generator (sharded draws)
_MASK = (1 << 64) - 1


def space_of(op: Any) -> "LocalSpace | ShardedSpace":
    """The operator's ``vector_space`` where it has one (a sharded operator), else a :class:`LocalSpace`."""
    space = getattr(op, "vector_space", None)
    return space if space is not None else LocalSpace(op)


class LocalSpace:
    """The whole vector in this process (the default): the identity reduction; random vectors drawn whole
    and shared from rank 0 through the operator (:func:`~sharpscope.linop.same_on_all_ranks`)."""

    sharded = False

    def __init__(self, op: Any) -> None:
        self.op = op
        self.size = self.local_size = int(op.shape[0])

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The global sum of per-process partial sums: here the partial sum itself."""
        return partial

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        """``||v||`` as a 0-d tensor (no host synchronization)."""
        return v.norm()

    def column_norms(self, V: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.linalg.vector_norm(V, dim=dim, keepdim=True)

    def share_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors (random draws, eigenvectors) as rank 0 holds them, on every rank of a data-parallel operator."""
        return same_on_all_ranks(self.op, x)

    def random_rows(self, rows: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``rows`` standard normal rows of length ``n`` drawn by ``gen`` (on its device), moved to ``device``."""
        v = torch.randn(rows, self.size, generator=gen, dtype=dtype, device=gen.device)
        return self.share_vectors(v if v.device == torch.device(device) else v.to(device))

    def rademacher(self, rows: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``rows`` Rademacher rows drawn on the CPU by ``gen`` (the same numbers on every device for a seed)."""
        z = torch.randint(0, 2, (rows, self.size), generator=gen, dtype=torch.int8)
        return self.share_vectors((2 * z - 1).to(device=device).to(dtype=dtype))

    def orthonormalize(self, M: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis of the columns of ``M`` (``(n, c)``; reduced QR)."""
        return torch.linalg.qr(M)[0]


class ShardedSpace:
    """Vectors held in shards (module docstring): this rank's entries are the global entries of
    ``segments`` (``(global_start, length)`` pairs, in order), concatenated.

    Args:
        group: the :class:`~sharpscope.distributed.RankGroup` whose ranks hold the shards.
        size: the global dimension.
        segments: this rank's segments of the global vector.
        shards, shard_rank: how many distinct shards there are and which one this rank holds (default: one per
            rank of ``group``, this rank's own).
        replicas, replica_rank: how many ranks hold each shard (``group.size == shards * replicas``) and
            which copy this is (HSDP's replicate dimension; default 1, 0).
    """

    sharded = True

    def __init__(self, group, size: int, segments: Sequence[tuple[int, int]], *, shards: int | None = None,
                 shard_rank: int | None = None, replicas: int = 1, replica_rank: int = 0) -> None:
        self.group, self.size = group, int(size)
        self.shards = group.size if shards is None else int(shards)
        self.shard_rank = group.rank if shard_rank is None else int(shard_rank)
        self.replicas, self.replica_rank = int(replicas), int(replica_rank)
        if self.shards * self.replicas != group.size:
            raise ValueError(f"{self.shards} shards x {self.replicas} replicas do not make the process group's "
                             f"{group.size} ranks")
        self.segments = [(int(a), int(n)) for a, n in segments]
        self.local_size = sum(n for _, n in self.segments)
        counts = self.reduce(torch.tensor([float(self.local_size)], dtype=torch.float64))
        if round(float(counts[0])) != self.size:
            raise ValueError(f"the ranks' shards hold {round(float(counts[0]))} entries in all, not the operator's "
                             f"dimension {self.size}: every parameter must be sharded over the operator's process group")

    # -- inner products ------------------------------------------------------------------------
    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """``sum_r partial_r`` over the shards: one ``all_reduce`` over every rank (every rank gets the same
        bits), divided by ``replicas`` (each shard's partial sum arrives once per copy); float32 and wider kept."""
        if self.group.size == 1:
            return partial
        work = partial if torch.finfo(partial.dtype).bits >= 32 else partial.float()
        total = self.group.all_sum(work.contiguous())
        if self.replicas > 1:
            total = total / self.replicas
        return total.to(partial.dtype)

    def assemble(self, X: torch.Tensor) -> torch.Tensor:
        """The full rows ``(size, m)`` from this rank's ``(local_size, m)``, on every rank: one ``all_reduce`` of a
        zero-filled buffer that copy 0 of each shard fills (exact: each entry is added to zeros)."""
        full = torch.zeros(self.size, X.shape[1], dtype=X.dtype, device=X.device)
        if self.replica_rank == 0:
            at = 0
            for start, length in self.segments:
                full[start:start + length] = X[at:at + length]
                at += length
        return full if self.group.size == 1 else self.group.all_sum(full)

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        """``||v||`` as a 0-d tensor (one ``all_reduce``)."""
        return self.reduce(torch.dot(v, v).reshape(1)).clamp_min(0).sqrt()[0]

    def column_norms(self, V: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Norms of ``V``'s columns (``dim=0``) or rows (``dim=1``), keepdim (one ``all_reduce``)."""
        return self.reduce((V * V).sum(dim=dim, keepdim=True)).clamp_min(0).sqrt()

    def share_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Each rank keeps its own shard (the steps that made it are identical on every rank)."""
        return x

    # -- random vectors, the same global vector for any number of ranks ---------------------------
    def _bases(self, rows: int, gen: torch.Generator) -> list[int]:
        draw = torch.randint(0, 2 ** 62, (rows,), generator=gen, dtype=torch.int64, device=gen.device)
        return [int(b) for b in draw.cpu().tolist()]

    def _draw(self, base: int, draw_block) -> torch.Tensor:
        """This rank's entries of the global vector whose block ``b`` is ``draw_block(generator(base, b))``."""
        parts = []
        for start, length in self.segments:
            end = start + length
            for b in range(start // BLOCK, (end - 1) // BLOCK + 1 if length else start // BLOCK):
                lo, hi = max(start, b * BLOCK), min(end, (b + 1) * BLOCK)
                values = draw_block(torch.Generator().manual_seed(_block_seed(base, b)))
                parts.append(values[lo - b * BLOCK: hi - b * BLOCK])
        return torch.cat(parts) if parts else torch.empty(0)

    def random_rows(self, rows: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``rows`` standard normal rows: this rank's shards of global vectors drawn block by block (module
        docstring), in ``dtype`` on ``device``."""
        out = torch.empty(rows, self.local_size, dtype=dtype, device=device)
        for i, base in enumerate(self._bases(rows, gen)):
            out[i] = self._draw(base, lambda g: torch.randn(BLOCK, generator=g, dtype=dtype)).to(dtype)
        return out

    def rademacher(self, rows: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``rows`` Rademacher rows, drawn per shard like :meth:`random_rows`."""
        out = torch.empty(rows, self.local_size, dtype=dtype, device=device)
        for i, base in enumerate(self._bases(rows, gen)):
            bits = self._draw(base, lambda g: torch.randint(0, 2, (BLOCK,), generator=g, dtype=torch.int8))
            out[i] = (2 * bits.to(torch.int8) - 1).to(dtype)
        return out

    def orthonormalize(self, M: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis of the columns of the sharded ``M`` (:func:`tall_skinny_q`, one ``all_reduce``)."""
        return tall_skinny_q(M, self.shard_rank, self.shards, self.reduce)


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers that scatters neighbouring inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _block_seed(base: int, block: int) -> int:
    """The seed of block ``block`` of a vector drawn from ``base`` (below 2^63: ``manual_seed`` takes it)."""
    return _mix(base ^ _mix(block)) >> 1


def tall_skinny_q(M: torch.Tensor, rank: int, size: int, reduce) -> torch.Tensor:
    r"""The orthonormal ``Q`` of a tall matrix split by rows over ``size`` ranks (TSQR; Demmel, Grigori,
    Hoemmen & Langou 2012): each rank factors its rows, :math:`M_r = Q_r R_r`; the ``c x c`` factors are
    stacked (one ``reduce`` of a zero-padded ``(size c, c)`` matrix: the shards' sum) and factored once more,
    :math:`[R_0; \dots] = \hat Q \hat R`, identically on every rank; this rank's rows of ``Q`` are
    :math:`Q_r \hat Q_r`. Rows fewer than ``c`` (or none) on a rank are padded with zeros."""
    rows, c = M.shape
    Qr, R = torch.linalg.qr(M)
    pad_r = torch.zeros(c, c, dtype=M.dtype, device=M.device)
    pad_r[: R.shape[0]] = R
    pad_q = torch.zeros(rows, c, dtype=M.dtype, device=M.device)
    pad_q[:, : Qr.shape[1]] = Qr
    stacked = torch.zeros(size * c, c, dtype=M.dtype, device=M.device)
    stacked[rank * c:(rank + 1) * c] = pad_r
    Qhat = torch.linalg.qr(reduce(stacked))[0]
    return pad_q @ Qhat[rank * c:(rank + 1) * c]
