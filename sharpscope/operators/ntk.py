r"""The empirical NTK :math:`K = J J^\top` on the stacked outputs of the batches: its per-batch functions."""
from __future__ import annotations

from typing import Any

import torch

from ..closures import BatchLoss, closure_batches
from ..functional import ModelFunction, as_batches
from ._autograd import JacobianGraph, flatten_rows, unflatten_rows
from .base import CurvatureOperator
from .modes import HvpMode


class NTKOperator(CurvatureOperator):
    r"""Empirical NTK Gram matrix :math:`K = J J^\top` on the stacked outputs of the batches.

    ``K u = J (J^\top u)``: one vector-Jacobian and one Jacobian-vector product per batch. The
    operator's dimension is the total number of output entries (samples x outputs).
    """

    _closure_part = "outputs"
    _closure_weighs = False
    _fixed_dimension = False  # its dimension is the outputs' count, checked by _after_rebuild
    _value_name = "first output"

    def __init__(self, fn: ModelFunction, inputs: Any, hvp_mode: HvpMode,
                 graph_memory_budget: int | None, *, batched: bool | None = None,
                 closure: BatchLoss | None = None) -> None:
        if closure is not None:
            batches: Any = closure_batches(inputs, fn.device, None, closure, weigh=False)
        else:
            batches = as_batches(inputs, fn.device, with_targets=False)
        with torch.no_grad(), fn.deterministic():
            self.output_shapes = [fn(fn.params, b.inputs).shape for b in batches]
        n = sum(int(torch.Size(s).numel()) for s in self.output_shapes)
        super().__init__(fn, closure, inputs, n, hvp_mode, graph_memory_budget, with_targets=False, batched=batched)
        self._sizes = [int(torch.Size(s).numel()) for s in self.output_shapes]

    def _after_rebuild(self) -> None:
        with torch.no_grad(), self.fn.deterministic():
            self._check_shapes([self.fn(self.fn.params, b.inputs).shape for b in self.batches])

    def _check_shapes(self, shapes: list) -> None:
        if shapes != self.output_shapes:
            raise ValueError(f"NTKOperator: the model's outputs changed shape ({self.output_shapes[0]} -> "
                             f"{shapes[0]}): the operator's dimension cannot change; build a new operator")

    def _check_first(self, values: list[torch.Tensor]) -> None:  # each solve: the outputs' shapes (a swapped submodule)
        self._check_shapes([v.shape for v in values])

    def _weight(self, size: int) -> float:
        return 1.0

    def _value(self, batch) -> torch.Tensor:
        return self.fn(self.fn.params, batch.inputs)

    def _build_graph(self, batch):
        graph = JacobianGraph(self.fn, batch.inputs)
        return graph.outputs, graph

    def _graph_groups(self):  # both passes need every batch's graph: one group of all
        built = [self._build_graph(b) for b in self.batches]
        yield [(1.0, graph) for _, graph in built]
        self._record_pass([value.detach() for value, _ in built], built[0][0].requires_grad)

    def _split(self, u: torch.Tensor):
        return [part.view(shape) for part, shape in zip(torch.split(u, self._sizes), self.output_shapes)]

    def _apply_graphs(self, graphs, u, retain):
        graphs = [g for _, g in graphs]
        w = torch.zeros(self.fn.dim, dtype=self.dtype, device=self.device)
        for graph, ub in zip(graphs, self._split(u)):
            w.add_(self.fn.flatten(graph.vjp(ub)))
        ws = self.fn.unflatten(w)
        return torch.cat([graph.jvp(ws).reshape(-1) for graph in graphs])

    def _apply_graphs_batched(self, graphs, rows):
        graphs = [g for _, g in graphs]
        m = rows.shape[0]
        W = torch.zeros(m, self.fn.dim, dtype=self.dtype, device=self.device)
        for graph, part, shape in zip(graphs, torch.split(rows, self._sizes, dim=1), self.output_shapes):
            W.add_(flatten_rows(self.fn, graph.vjp_rows(part.reshape(m, *shape)), m))
        ws = unflatten_rows(self.fn, W)
        return torch.cat([graph.jvp_rows(ws).reshape(m, -1) for graph in graphs], dim=1)

    def _forward_product(self, u):
        primals = tuple(p.detach() for p in self.fn.params)
        w = torch.zeros(self.fn.dim, dtype=self.dtype, device=self.device)
        fs = []
        for batch, ub in zip(self.batches, self._split(u)):
            def f(ps, batch=batch):
                return self.fn(ps, batch.inputs)
            fs.append(f)
            _, vjp_fn = torch.func.vjp(f, primals)
            w.add_(self.fn.flatten(vjp_fn(ub)[0]))
        ws = self.fn.unflatten(w)
        return torch.cat([torch.func.jvp(f, (primals,), (ws,))[1].reshape(-1) for f in fs])

    def _fd_product(self, u, step_scale=1.0):
        """``J (J^T u)``: ``J^T u`` by one backward per batch, ``J w`` by central differences of the outputs."""
        w = torch.zeros(self.fn.dim, dtype=self.dtype, device=self.device)
        for batch, ub in zip(self.batches, self._split(u)):
            outputs = self.fn(self.fn.params, batch.inputs)
            w.add_(self.fn.flatten(torch.autograd.grad(outputs, self.fn.params, ub, allow_unused=True)))
        eps = self._fd_step(w) * step_scale
        if eps == 0.0:
            return torch.zeros_like(u)
        ws = self.fn.unflatten(w)
        return torch.cat([self._fd_outputs_jvp(ws, eps, batch).reshape(-1) for batch in self.batches])

    def _forward_batched(self, rows):
        primals = tuple(p.detach() for p in self.fn.params)
        fs = [lambda ps, batch=batch: self.fn(ps, batch.inputs) for batch in self.batches]

        def product(u):  # out of place: vmap cannot add a batched tensor into an unbatched one
            w = sum(self.fn.flatten(torch.func.vjp(f, primals)[1](ub)[0]) for f, ub in zip(fs, self._split(u)))
            ws = self.fn.unflatten(w)
            return torch.cat([torch.func.jvp(f, (primals,), (ws,))[1].reshape(-1) for f in fs])

        return torch.func.vmap(product)(rows)
