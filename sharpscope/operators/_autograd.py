"""Autograd pieces the product strategies share: graph-size accounting, ``autograd.grad`` over partial graphs,
block (row) layouts, the loss-output Hessian and reverse-mode Jacobian products of one batch."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .._memory import memory_budget
from ..functional import ModelFunction


def default_graph_memory_budget(device: torch.device) -> int:
    """Bytes the cached gradient graphs may use: half the free GPU memory, or 1/4 of host RAM."""
    return memory_budget(device, gpu_free=0.5, host=0.25)


class SavedBytes:
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


def is_unsupported_derivative(err: Exception) -> bool:
    """Whether ``err`` says an op lacks the derivative a product needs (the fallback ladder's trigger)."""
    msg = str(err)
    return any(s in msg for s in ("derivative for", "not implemented", "does not support",
                                  "forward AD", "double backward", "twice"))


def grad(outputs: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor],
         grad_outputs: Sequence[torch.Tensor], retain_graph: bool) -> tuple[torch.Tensor | None, ...]:
    """``autograd.grad`` that skips outputs not connected to the graph (their contribution is zero)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return tuple(None for _ in inputs)
    outs, gos = zip(*pairs)
    return torch.autograd.grad(outs, inputs, gos, retain_graph=retain_graph, allow_unused=True)


def grad_rows(outputs: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor],
              grad_rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """:func:`grad` for a block of cotangents at once (leading dimension: the block), the graph retained."""
    pairs = [(o, g) for o, g in zip(outputs, grad_rows) if o is not None and o.requires_grad]
    if not pairs:
        return tuple(None for _ in inputs)
    outs, gos = zip(*pairs)
    return torch.autograd.grad(outs, inputs, gos, retain_graph=True, allow_unused=True, is_grads_batched=True)


def unflatten_rows(fn: ModelFunction, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of an ``(m, dim)`` block as per-parameter ``(m, *shape)`` tensors."""
    m = rows.shape[0]
    return tuple(t.reshape(m, *s) for t, s in zip(torch.split(rows, fn.numels, dim=1), fn.shapes))


def flatten_rows(fn: ModelFunction, parts: Sequence[torch.Tensor | None], m: int) -> torch.Tensor:
    """Per-parameter ``(m, *shape)`` tensors (None read as zeros) as one ``(m, dim)`` block."""
    return torch.cat([torch.zeros(m, n, dtype=fn.dtype, device=fn.device) if t is None else t.reshape(m, -1)
                      for t, n in zip(parts, fn.numels)], dim=1)


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


def loss_output_hvp_rows(loss_fn: Callable, outputs: torch.Tensor, targets: Any, U: torch.Tensor) -> torch.Tensor:
    """:func:`loss_output_hvp` for a block ``U`` of shape ``(m, *outputs.shape)``."""
    with torch.enable_grad():
        o = outputs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(o, targets), o, create_graph=True)
        if not g.requires_grad:
            return torch.zeros_like(U)
        (hu,) = torch.autograd.grad(g, o, U, allow_unused=True, is_grads_batched=True)
    return torch.zeros_like(U) if hu is None else hu


def accumulate(acc: torch.Tensor | None, part: torch.Tensor, weight: float) -> torch.Tensor:
    """``acc + weight * part``, reusing ``part`` as the accumulator on the first call (no extra pass)."""
    if acc is None:
        return part if weight == 1.0 else part.mul_(weight)
    return acc.add_(part, alpha=weight)


class JacobianGraph:
    """Reverse-mode J v and J^T u for one batch: outputs with their graph, plus the double-vjp trick
    ``J v = d/du <J^T u, v>`` through a dummy cotangent ``u``."""

    def __init__(self, fn: ModelFunction, inputs) -> None:
        self.fn = fn
        self.outputs = fn(fn.params, inputs)
        self.dummy = torch.zeros_like(self.outputs, requires_grad=True)
        self.vjp_of_dummy = torch.autograd.grad(self.outputs, fn.params, self.dummy,
                                                create_graph=True, allow_unused=True)

    def jvp(self, vs) -> torch.Tensor:
        (jv,) = grad(self.vjp_of_dummy, [self.dummy], vs, retain_graph=True)
        return torch.zeros_like(self.outputs) if jv is None else jv

    def vjp(self, u: torch.Tensor):
        return torch.autograd.grad(self.outputs, self.fn.params, u, retain_graph=True, allow_unused=True)

    def jvp_rows(self, vs) -> torch.Tensor:
        """:meth:`jvp` for a block (per-parameter ``(m, *shape)`` tangents); ``(m, *outputs.shape)``."""
        (jv,) = grad_rows(self.vjp_of_dummy, [self.dummy], vs)
        m = vs[0].shape[0]
        return self.outputs.new_zeros((m, *self.outputs.shape)) if jv is None else jv

    def vjp_rows(self, U: torch.Tensor):
        """:meth:`vjp` for a block of cotangents ``(m, *outputs.shape)``."""
        return torch.autograd.grad(self.outputs, self.fn.params, U, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
