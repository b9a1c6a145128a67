r"""The loss Hessian :math:`H = \sum_b \frac{n_b}{N} \nabla^2_\theta L_b(\theta)`: its per-batch functions."""
from __future__ import annotations

import torch

from .. import finite_difference as fd
from ._autograd import accumulate, flatten_rows, grad, grad_rows, unflatten_rows
from .base import CurvatureOperator
from .parallel import over_all_data


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`H = \sum_b \frac{n_b}{N} \nabla^2 L_b` of the loss w.r.t. the selected parameters."""

    def _build_graph(self, batch):
        params = self.fn.params
        loss = self._loss(self.fn(params, batch.inputs), batch)
        return loss, torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)

    def _apply_graphs(self, graphs, v, retain):
        vs = self.fn.unflatten(v)
        acc = None
        for weight, grads in graphs:
            part = self.fn.flatten(grad(grads, self.fn.params, vs, retain_graph=retain))
            acc = accumulate(acc, part, weight)
        return acc

    def _apply_graphs_batched(self, graphs, rows):
        vs = unflatten_rows(self.fn, rows)
        acc = None
        for weight, grads in graphs:
            part = flatten_rows(self.fn, grad_rows(grads, self.fn.params, vs), rows.shape[0])
            acc = accumulate(acc, part, weight)
        return acc

    def _forward_product(self, v):
        vs = self.fn.unflatten(v)
        primals = tuple(p.detach() for p in self.fn.params)
        acc = torch.zeros_like(v)
        for batch in self.batches:
            def loss_of(ps, batch=batch):
                return self._loss(self.fn(ps, batch.inputs), batch)
            hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (vs,))[1]
            acc.add_(self.fn.flatten(hv), alpha=self._weight(batch.size))
        return acc

    def _fd_product(self, v, step_scale=1.0):
        """``(g(theta + eps v) - g(theta - eps v)) / (2 eps)``, the gradients at new parameter tensors."""
        eps = self._fd_step(v) * step_scale
        if eps == 0.0:
            return torch.zeros_like(v)
        theta, vs = [p.detach() for p in self.fn.params], self.fn.unflatten(v)

        def gradient_at(step: float) -> torch.Tensor:
            ps = [t.requires_grad_(True) for t in fd.shifted(theta, vs, step)]
            acc = None
            for batch in self.batches:
                loss = self._loss(self.fn(ps, batch.inputs), batch)
                acc = accumulate(acc, self.fn.flatten(torch.autograd.grad(loss, ps, allow_unused=True)),
                                 self._weight(batch.size))
            return acc

        return fd.central_difference(gradient_at, eps)

    @over_all_data
    def gradient(self) -> torch.Tensor:
        """The full-data gradient as a flat vector (one backward per batch; over all ranks' data on a
        data-parallel operator)."""
        self._sync()
        acc = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with torch.enable_grad(), self.fn.deterministic(), self.modes.context():
            for batch in self.batches:
                loss = self._loss(self.fn(self.fn.params, batch.inputs), batch)
                g = torch.autograd.grad(loss, self.fn.params, allow_unused=True)
                acc.add_(self.fn.flatten(g), alpha=self._weight(batch.size))
        return acc

    @over_all_data
    def loss(self) -> float:
        """The full-data loss at the current parameters (over all ranks' data on a data-parallel operator)."""
        self._sync()
        total = 0.0
        with torch.no_grad(), self.fn.deterministic(), self.modes.context():
            for batch in self.batches:
                total += self._weight(batch.size) * float(self._loss(self.fn(self.fn.params, batch.inputs), batch))
        return total
