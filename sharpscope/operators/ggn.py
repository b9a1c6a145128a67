r"""The generalized Gauss-Newton matrix :math:`G = \sum_b \frac{n_b}{N} J_b^\top (\nabla_f^2 \ell_b) J_b`: its
per-batch functions."""
from __future__ import annotations

import torch

from ..functional import ModelFunction
from ._autograd import JacobianGraph, flatten_rows, loss_output_hvp, loss_output_hvp_rows, unflatten_rows
from .base import CurvatureOperator


class GGNOperator(CurvatureOperator):
    r"""Generalized Gauss-Newton :math:`G = \sum_b \frac{n_b}{N} J_b^\top (\nabla_f^2 \ell_b) J_b`.

    The loss Hessian w.r.t. the outputs is applied exactly for any twice-differentiable loss
    (MSE: :math:`\frac{2}{N C} I`; cross-entropy: :math:`\frac1N(\mathrm{diag}(p) - p p^\top)` per sample).
    With a loss closure, ``f`` is ``closure.outputs`` and the loss ``closure.loss_of_outputs``.
    """

    _closure_part = "outputs"

    def _output_curvature(self, outputs: torch.Tensor, targets, u: torch.Tensor) -> torch.Tensor:
        """The curvature on the outputs times ``u``: the loss Hessian w.r.t. the outputs (other operators of
        the form ``J^T C J``, the Fisher, override this and :meth:`_output_curvature_rows`)."""
        return loss_output_hvp(self.loss_fn, outputs, targets, u)

    def _output_curvature_rows(self, outputs: torch.Tensor, targets, U: torch.Tensor) -> torch.Tensor:
        """:meth:`_output_curvature` for a block ``U`` of shape ``(m, *outputs.shape)``."""
        return loss_output_hvp_rows(self.loss_fn, outputs, targets, U)

    def _check_deterministic(self, first: tuple[list, bool] | None = None) -> None:
        super()._check_deterministic(first)
        if self.closure is not None and self.closure.fn is not None:
            self._check_same_loss()

    def _check_same_loss(self) -> None:
        """A closure given as ``fn`` and as ``outputs``/``loss_of_outputs`` must describe one loss (the
        Hessian uses the first, the GGN the second): compared on the first batch, to 1e-4 relative (a
        loss computed in float32 inside a float64 model, as Hugging Face's, differs at rounding)."""
        batch = next(iter(self.batches))
        whole_fn = ModelFunction(self.fn.model, self.fn.selection, self.fn.batchnorm, call=self.closure.fn)
        with torch.no_grad(), self.fn.deterministic(), self.modes.context():
            split = float(self._loss(self.fn(self.fn.params, batch.inputs), batch))
            whole = float(whole_fn(whole_fn.params, batch.inputs))
        if not abs(split - whole) <= 1e-4 * max(abs(split), abs(whole), 1e-30):
            raise ValueError(f"GGNOperator: fn(model, batch) = {whole:.8g} but loss_of_outputs(outputs(model, batch), "
                             f"batch) = {split:.8g} on batch 0: the two must describe the same loss")

    def _build_graph(self, batch):
        graph = JacobianGraph(self.fn, batch.inputs)
        loss = self._loss(graph.outputs, batch)  # also validates targets and loss on the first batch
        return loss, (graph, batch.targets)

    def _apply_graphs(self, graphs, v, retain):
        vs = self.fn.unflatten(v)
        acc = torch.zeros_like(v)
        for weight, (graph, targets) in graphs:
            hjv = self._output_curvature(graph.outputs, targets, graph.jvp(vs))
            acc.add_(self.fn.flatten(graph.vjp(hjv)), alpha=weight)
        return acc

    def _apply_graphs_batched(self, graphs, rows):
        vs = unflatten_rows(self.fn, rows)
        acc = torch.zeros_like(rows)
        for weight, (graph, targets) in graphs:
            hjv = self._output_curvature_rows(graph.outputs, targets, graph.jvp_rows(vs))
            acc.add_(flatten_rows(self.fn, graph.vjp_rows(hjv), rows.shape[0]), alpha=weight)
        return acc

    def _forward_product(self, v):
        vs = self.fn.unflatten(v)
        primals = tuple(p.detach() for p in self.fn.params)
        acc = torch.zeros_like(v)
        for batch in self.batches:
            def f(ps, batch=batch):
                return self.fn(ps, batch.inputs)
            outputs, jv = torch.func.jvp(f, (primals,), (vs,))
            if not self._checked:
                self._loss(outputs, batch)
            hjv = self._output_curvature(outputs, batch.targets, jv)
            _, vjp_fn = torch.func.vjp(f, primals)
            acc.add_(self.fn.flatten(vjp_fn(hjv)[0]), alpha=self._weight(batch.size))
        return acc

    def _fd_product(self, v, step_scale=1.0):
        """``J^T H_L J v`` with ``J v`` by central differences of the outputs, ``J^T u`` by one backward."""
        eps = self._fd_step(v) * step_scale
        if eps == 0.0:
            return torch.zeros_like(v)
        vs, acc = self.fn.unflatten(v), torch.zeros_like(v)
        for batch in self.batches:
            jv = self._fd_outputs_jvp(vs, eps, batch)
            outputs = self.fn(self.fn.params, batch.inputs)
            if not self._checked:
                self._loss(outputs, batch)
            hjv = self._output_curvature(outputs, batch.targets, jv)
            jt = torch.autograd.grad(outputs, self.fn.params, hjv, allow_unused=True)
            acc.add_(self.fn.flatten(jt), alpha=self._weight(batch.size))
        return acc

    def _forward_batched(self, rows):
        primals = tuple(p.detach() for p in self.fn.params)

        def product(v):  # the loss-output Hessian by torch.func too (vmap forbids requires_grad_)
            vs, acc = self.fn.unflatten(v), torch.zeros_like(v)
            for batch in self.batches:
                def f(ps, batch=batch):
                    return self.fn(ps, batch.inputs)

                def loss_grad(o, batch=batch):
                    return torch.func.grad(lambda out: self.loss_fn(out, batch.targets))(o)
                outputs, jv = torch.func.jvp(f, (primals,), (vs,))
                hjv = torch.func.jvp(loss_grad, (outputs,), (jv,))[1]
                _, vjp_fn = torch.func.vjp(f, primals)
                acc = acc + self._weight(batch.size) * self.fn.flatten(vjp_fn(hjv)[0])
            return acc

        return torch.func.vmap(product)(rows)
