r"""Data-parallel operators over ``torch.distributed``: the process group, guarded collectives, agreement.

``ss.hessian_operator(model, loss_fn, shard, distributed=True)`` (likewise :func:`~sharpscope.ggn_operator`
and :func:`~sharpscope.preconditioned_hessian_operator`) is the sample-weighted mean over every rank's
samples: with rank :math:`r` holding :math:`N_r` samples and :math:`N = \sum_r N_r`,

.. math::  H = \sum_r \tfrac{N_r}{N} H_r ,

where :math:`H_r` is the operator of rank :math:`r`'s shard (itself a sample-weighted mean over its
batches; a loss with ``reduction="sum"`` gives the sum over every sample instead). Each product is the
local product scaled by :math:`N_r / N` and summed by one ``all_reduce``; :math:`N` is agreed at
construction. Shards may differ in size; a rank with no data is refused.

What every rank sees. An ``all_reduce`` hands every rank the same bits (each element is reduced once and
copied), so the solvers see bit-identical products and, on homogeneous hardware, take identical steps.
The random vectors they draw (Lanczos start vectors and fresh directions, probe blocks, the symmetry
check's pair) go through :meth:`~sharpscope.linop.SymmetricOperator.same_on_all_ranks`, which broadcasts
them from rank 0, and so do the final results (eigenvalues, residuals, convergence flags, eigenvectors,
trace samples, quadrature nodes and weights): the results are identical on every rank by construction,
not by luck.

Failures. Every collective here agrees on success first: a product's ``all_reduce`` carries one more
entry, a failure flag (an exception on that rank, or a NaN/inf product); when the reduced flag is set,
the ranks exchange their one-line messages (``all_gather_object``) and every rank raises the first failing
rank's message, as the same exception class where it is a builtin or a sharpscope error, else
:class:`DistributedError`. Construction agrees the same way on the parameter names, shapes and dtypes,
on the parameters' values and the loss (below), on the sample counts and on errors. A rank that stops calling
(an error outside sharpscope's calls, a rank that never reaches the solve) is caught by the process
group's timeout (``init_process_group(timeout=...)``; torch's default is 30 minutes for gloo, 10 for
NCCL), turned into a :class:`DistributedError`. With NCCL, torch's watchdog may instead abort the process
on a timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``).

Same model, same loss. Shapes are not enough: two ranks with the same shapes and different weights would
give an eigenvalue of neither model. At construction and at the start of every solve the ranks compare the
parameters' dot products with two seeded random vectors (:func:`model_values`; a sum or a norm would miss two
entries swapped) and a description of the loss, its reduction included (:func:`loss_description`); a
difference is one ``ValueError`` on every rank, naming the first differing rank. Cost: two passes over the
parameters and one ``all_gather_object`` per solve.

Backends: gloo (CPU tensors; tested with 2 processes) and NCCL (CUDA tensors; the same code, moved to
the current CUDA device: call ``torch.cuda.set_device(local_rank)`` first; not tested on GPU).
A ``DistributedDataParallel`` model is unwrapped (``model.module``): products are taken on the module
itself, whose parameters DDP keeps identical on every rank. Models sharded with FSDP2
(``fully_shard``) are multiplied by finite differences (:mod:`sharpscope.finite_difference`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .linop import NotSymmetricError, StaleOperatorError, StochasticForwardError

__all__ = ["DistributedError", "RankGroup", "resolve_group", "unwrap_model", "is_fsdp_model", "one_line",
           "model_values", "loss_description"]


class DistributedError(RuntimeError):
    """A rank failed (its message names which), a collective timed out, or the ranks disagree."""


# exceptions re-raised as the same class on every rank (others become DistributedError)
_SAME_CLASS = {cls.__name__: cls for cls in (ValueError, TypeError, RuntimeError, FloatingPointError,
                                              NotImplementedError, IndexError, NotSymmetricError,
                                              StochasticForwardError, StaleOperatorError, DistributedError)}


_SAME_MODEL = "every rank needs the same model; DDP keeps it so, or broadcast rank 0's parameters"


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(distributed: Any) -> "RankGroup | None":
    """``None``/``False``: one process. ``True``: the default process group. A ``ProcessGroup``: that group.
    One-line errors for a missing or uninitialized process group."""
    if distributed is None or distributed is False:
        return None
    dist = _dist()
    if not dist.is_available():
        raise ValueError("distributed= needs torch.distributed, which this torch build lacks")
    if distributed is not True and not isinstance(distributed, dist.ProcessGroup):
        raise TypeError(f"distributed must be None, False, True or a torch.distributed ProcessGroup, "
                        f"got {type(distributed).__name__}")
    if not dist.is_initialized():
        raise ValueError("distributed=True needs an initialized process group: call "
                         "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
    return RankGroup(dist.group.WORLD if distributed is True else distributed)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (or ``DataParallel``); other models as they are."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether ``model`` holds parameters sharded with FSDP2 (``fully_shard``: DTensor parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _timeout_of(group, device: torch.device | None) -> float | None:
    """The process group's collective timeout in seconds, where torch exposes it (informational)."""
    try:
        backend = group._get_backend(device or torch.device("cpu"))
        return backend.options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - private API; only used in messages
        return None


class RankGroup:
    """A process group and the guarded collectives the operators and solvers use on it."""

    def __init__(self, group) -> None:
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self.root = dist.get_global_rank(group, 0)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if "nccl" in self.backend and torch.cuda.is_available() else None)

    def __repr__(self) -> str:
        return f"RankGroup(rank={self.rank}, size={self.size}, backend={self.backend!r})"

    # -- plumbing ---------------------------------------------------------------------------------
    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where the backend can move it: the current CUDA device for NCCL, anywhere for gloo."""
        if self.device is not None and t.device != self.device:
            return t.to(self.device)
        return t

    @contextlib.contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        """Collective errors (a timeout, a peer that died) as one-line DistributedErrors."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as err:
            limit = _timeout_of(self.group, self.device)
            within = f" (process-group timeout {limit:.0f} s)" if limit else ""
            raise DistributedError(f"rank {self.rank}/{self.size}: {what} failed{within}: another rank stopped "
                                   f"calling or died ({one_line(err)})") from err

    def _raise_first(self, local: tuple[str, str] | None, cause: BaseException | None) -> None:
        """Exchange the one-line messages of the failing ranks; every rank raises the first one."""
        dist = _dist()
        messages: list[Any] = [None] * self.size
        with self._timed("exchanging a failure message"):
            dist.all_gather_object(messages, local, group=self.group)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if not failed:  # pragma: no cover - the flag said a rank failed
            raise DistributedError(f"rank {self.rank}/{self.size}: a rank flagged a failure without a message")
        rank, (name, text) = failed[0]
        cls = _SAME_CLASS.get(name, DistributedError)
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise cls(f"rank {rank}/{self.size}: {text}{more}") from cause

    # -- guarded collectives -----------------------------------------------------------------------
    def sum_products(self, compute: Callable[[], torch.Tensor], weight: float, shape: tuple[int, ...],
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``sum_r weight_r * compute_r()`` on every rank, in one ``all_reduce`` that also carries a failure
        flag: an exception or a NaN/inf result on any rank makes every rank raise its message."""
        dist = _dist()
        error: BaseException | None = None
        numel = math.prod(shape)
        work = torch.float32 if torch.finfo(dtype).bits < 32 else dtype  # half precision summed in float32
        try:
            out = compute()
            flat = out.detach().reshape(-1).to(work)
            bad = torch.isfinite(flat).logical_not().any().to(work).reshape(1)
            payload = torch.cat([flat * weight, bad])
        except Exception as err:  # noqa: BLE001 - every error is reported to every rank
            error = err
            payload = torch.zeros(numel + 1, dtype=work, device=device)
            payload[-1] = 1.0
        payload = self._to_comm(payload)
        with self._timed("the all_reduce of a product"):
            dist.all_reduce(payload, group=self.group)
        flags = float(payload[-1])
        if flags != 0.0:
            if error is not None:
                local = (type(error).__name__, one_line(error))
            elif float(bad) != 0.0:
                local = ("FloatingPointError", "the local product is NaN or inf: check this rank's data, loss and "
                         "model (its loss or curvature is not finite there)")
            else:
                local = None
            self._raise_first(local, error)
        return payload[:-1].to(device=device, dtype=dtype).view(shape)

    def agree(self, error: BaseException | None) -> None:
        """Every rank raises the first failing rank's message when any rank passes an error (one flag
        ``all_reduce``; the messages are exchanged only on failure)."""
        dist = _dist()
        flag = self._to_comm(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64))
        with self._timed("agreeing on success"):
            dist.all_reduce(flag, group=self.group)
        if float(flag[0]) != 0.0:
            self._raise_first(None if error is None else (type(error).__name__, one_line(error)), error)

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """A block every rank runs: an exception inside it on any rank makes every rank raise its message."""
        error = None
        try:
            yield
        except Exception as err:  # noqa: BLE001
            error = err
        self.agree(error)

    def gather(self, obj: Any) -> list[Any]:
        """``all_gather_object`` (small picklable values: counts, shapes, messages)."""
        dist = _dist()
        out: list[Any] = [None] * self.size
        with self._timed("all_gather_object"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as rank 0 of the group holds it (same shape and dtype on every rank)."""
        dist = _dist()
        if self.size == 1:
            return t
        buf = self._to_comm(t.detach().clone().contiguous())
        with self._timed("a broadcast from rank 0"):
            dist.broadcast(buf, src=self.root, group=self.group)
        return buf.to(t.device)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Plain ``all_reduce`` sum of ``t`` (out of place), for values every rank computed without error."""
        dist = _dist()
        buf = self._to_comm(t.detach().clone())
        with self._timed("an all_reduce"):
            dist.all_reduce(buf, group=self.group)
        return buf.to(t.device)

    # -- construction ------------------------------------------------------------------------------
    def agree_on_operator(self, build: Callable[[], tuple[Any, tuple, float]], what: str) -> tuple[Any, float]:
        """Run ``build() -> (operator, (signature, values, loss), local sample count)`` on every rank and agree:
        an error on any rank, ranks whose signatures (parameter names, shapes, dtypes), parameter values
        (:func:`model_values`; None: not compared) or loss descriptions differ from rank 0's, or a rank without
        samples make every rank raise the same one-line error. Returns ``(operator, N)``, ``N`` the total
        sample count."""
        op, signature, count, error = None, None, None, None
        try:
            op, signature, count = build()
        except Exception as err:  # noqa: BLE001
            error = err
        if error is None:  # a closure's batch weights may be fractional (token counts are whole)
            count = int(count) if float(count).is_integer() else float(count)
        infos = self.gather(None if error is not None else (signature, count))
        if any(i is None for i in infos):
            self._raise_first(None if error is None else (type(error).__name__, one_line(error)), error)
        mismatch = _first_mismatch([i[0][0] for i in infos])
        if mismatch is not None:
            raise ValueError(f"{what}: the ranks hold different models ({mismatch}): every rank needs the same "
                             "model (DDP keeps it so)")
        _check_same_values(what, [(i[0][1], i[0][2]) for i in infos], self.size)
        empty = [r for r, i in enumerate(infos) if i[1] == 0]
        if empty:
            raise ValueError(f"{what}: rank {empty[0]}/{self.size} holds no data: every rank needs a non-empty "
                             "shard (give each rank at least one sample, or use a group without that rank)")
        return op, sum(i[1] for i in infos)

    def agree_on_values(self, what: str, values: tuple[float, ...] | None, loss: str, skip: bool = False, *,
                        subject: str = "parameter values", fix: str = _SAME_MODEL) -> None:
        """Every rank raises the same one-line ``ValueError`` when a rank's values (:func:`model_values` of the
        parameters, or of what ``subject`` names) or loss description differ from rank 0's (at the start of
        each solve). ``skip``: this rank holds an error that the next product reports to every rank; no
        comparison then (the collective still runs on every rank)."""
        infos = self.gather(None if skip else (values, loss))
        if any(i is None for i in infos):
            return
        _check_same_values(what, infos, self.size, subject, fix)


def _first_mismatch(signatures: list[list]) -> str | None:
    """The first difference between rank 0's signature and another rank's, in words."""
    ref = signatures[0]
    for rank, sig in enumerate(signatures[1:], start=1):
        if sig == ref:
            continue
        if len(sig) != len(ref):
            return f"rank 0 has {len(ref)} parameters, rank {rank} has {len(sig)}"
        for a, b in zip(ref, sig):
            if a != b:
                return (f"rank 0's parameter {a[0]} has shape {tuple(a[1])} {a[2]}, rank {rank}'s parameter {b[0]} "
                        f"has shape {tuple(b[1])} {b[2]}")
    return None


def _check_same_values(what: str, infos: list[tuple[Any, str]], size: int, subject: str = "parameter values",
                       fix: str = _SAME_MODEL) -> None:
    """Refuse ranks whose ``(model_values, loss_description)`` differ from rank 0's (values compared to
    1e-12 of their scale: the same parameters give the same bits on the same hardware)."""
    ref_values, ref_loss = infos[0]
    for rank, (values, loss) in enumerate(infos[1:], start=1):
        if values is not None and ref_values is not None:
            dots, scale = values[:2], max(values[2], ref_values[2])
            if any(abs(a - b) > 1e-12 * scale for a, b in zip(dots, ref_values[:2])):
                raise ValueError(f"{what}: rank {rank}/{size}'s {subject} differ from rank 0's (their dot products with "
                                 f"two seeded random vectors: {dots[0]:.17g}, {dots[1]:.17g} vs {ref_values[0]:.17g}, "
                                 f"{ref_values[1]:.17g}): {fix}")
        if loss != ref_loss:
            raise ValueError(f"{what}: rank {rank}/{size}'s loss is {loss}, rank 0's is {ref_loss}: every rank needs "
                             "the same loss, its reduction included")


def model_values(names: Sequence[str], params: Sequence[torch.Tensor], seed: int = 0) -> tuple[float, float, float]:
    r"""``(<theta, r_1>, <theta, r_2>, scale)``: the flat parameters' dot products with two random vectors
    drawn by generators seeded ``seed`` and ``seed + 1`` on the parameters' device (the same numbers on every
    rank of one device type), accumulated in float64, and ``scale`` = :math:`\sum_i |\theta_i| (|r_{1,i}| +
    |r_{2,i}|)` to judge a difference by. Two entries swapped change the dot products unless the vectors'
    entries there happen to be equal; a sum or a norm would not see it. One pass per vector, drawn parameter
    by parameter (memory: the largest parameter)."""
    if not params:
        return (0.0, 0.0, 0.0)
    device = params[0].device
    gens = [_generator(device, seed + i) for i in range(2)]
    dots = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(2)]
    scale = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        t = p.detach().reshape(-1).to(torch.float64)
        for i, gen in enumerate(gens):
            r = torch.randn(t.numel(), generator=gen, dtype=torch.float32, device=device).to(torch.float64)
            prod = t * r
            dots[i] += prod.sum()
            scale += prod.abs().sum()
    out = torch.stack([*dots, scale]).cpu().tolist()
    return (out[0], out[1], out[2])


def _generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # pragma: no cover - a device type without its own generator
        return torch.Generator().manual_seed(seed)


def loss_description(loss_fn: Any) -> str:
    """What must agree between ranks about the loss, in words: its class or function, its reduction, its
    public settings (``ignore_index``, ``label_smoothing``, ...) and its tensors (a class ``weight``: shape,
    dtype and :func:`model_values`); for a loss closure (``ss.batch_loss``) its name and functions."""
    from .closures import BatchLoss

    if isinstance(loss_fn, BatchLoss):
        parts = [f"{k}={_callable_name(f)}" for k, f in (("fn", loss_fn.fn), ("outputs", loss_fn.outputs),
                 ("loss_of_outputs", loss_fn.loss_of_outputs), ("weight", loss_fn.weight)) if f is not None]
        return f"batch_loss({', '.join(([f'name={loss_fn.name!r}'] if loss_fn.name else []) + parts)})"
    settings = [f"reduction={getattr(loss_fn, 'reduction', 'mean')!r}"]
    if isinstance(loss_fn, nn.Module):
        tensors = dict(loss_fn.named_buffers())
        for key, value in sorted(vars(loss_fn).items()):
            if key.startswith("_") or key in ("training", "reduction"):
                continue
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif value is None or isinstance(value, (bool, int, float, str)):
                settings.append(f"{key}={value!r}")
        for key, t in sorted(tensors.items()):
            dots = model_values([key], [t])
            settings.append(f"{key}=tensor{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} ({dots[0]:.17g}, "
                            f"{dots[1]:.17g})")
    return f"{_callable_name(loss_fn)}({', '.join(settings)})"


def _callable_name(f: Any) -> str:
    if isinstance(f, functools.partial):
        return f"partial({_callable_name(f.func)}, {', '.join(map(repr, f.args))})"
    target = f if hasattr(f, "__qualname__") else type(f)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(f).__name__)}"


def model_signature(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str]]:
    """What must agree between ranks: each selected parameter's name, shape and dtype."""
    return [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in named]


def local_sample_count(batches) -> int:
    """The samples of a rank's shard; 0 for no data (an empty list, an empty batch)."""
    try:
        return batches.total_size()
    except ValueError as err:
        if "empty" in str(err):
            return 0
        raise
