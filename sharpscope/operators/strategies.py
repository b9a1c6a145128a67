"""Product strategies: how an operator's per-batch functions become a product of one vector or of a block.

Each strategy has two methods, ``product(op, v)`` and ``rows(op, rows, batched)`` (a block as rows, batched or
one row at a time), over the per-batch functions an operator supplies:

* ``op._graph_groups()`` -- the gradient (or Jacobian) graphs a reverse product applies, one group at a time,
  and ``op._apply_graphs(graphs, v)`` / ``op._apply_graphs_batched(graphs, rows)``;
* ``op._forward_product(v)`` / ``op._forward_batched(rows)`` -- forward-over-reverse (``torch.func``);
* ``op._fd_product(v, step_scale)`` -- central differences of first derivatives;
* ``op._cached_graphs()`` -- every batch's graph, kept for the solve when it fits the memory budget.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from .modes import FD


def _apply_rows(op: Any, graphs: list, rows: torch.Tensor, batched: bool) -> torch.Tensor:
    if batched:
        return op._apply_graphs_batched(graphs, rows)
    return torch.stack([op._apply_graphs(graphs, r, retain=True) for r in rows])


def _over_groups(op: Any, apply) -> torch.Tensor:
    """``sum_groups apply(group)``, one group's graphs alive at a time."""
    acc = None
    for group in op._graph_groups():
        part = apply(group)
        acc = part if acc is None else acc.add_(part)
        del group, part
    return acc


class Reverse:
    """Double backward (Pearlmutter 1994): each product builds the graphs and backpropagates through them; a
    block shares each data batch's graph among its columns (one forward and first backward per block)."""

    def product(self, op: Any, v: torch.Tensor) -> torch.Tensor:
        return _over_groups(op, lambda graphs: op._apply_graphs(graphs, v, retain=True))

    def rows(self, op: Any, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        return _over_groups(op, lambda graphs: _apply_rows(op, graphs, rows, batched))


class Forward:
    """Forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``; a batched block by ``torch.func.vmap``."""

    def product(self, op: Any, v: torch.Tensor) -> torch.Tensor:
        return op._forward_product(v)

    def rows(self, op: Any, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        if batched:
            return op._forward_batched(rows)
        return torch.stack([op._forward_product(r) for r in rows])


class Cached:
    """The graphs of every batch built once per solve; each product is the second backward only (PyHessian's
    trick). Graphs over the budget leave this state (:meth:`~sharpscope.operators.modes.ModeLadder.cache_refused`)."""

    def product(self, op: Any, v: torch.Tensor) -> torch.Tensor:
        graphs = op._cached_graphs()
        if graphs is None:
            op.modes.cache_refused()
            return op._product(v)
        return op._apply_graphs(graphs, v, retain=True)

    def rows(self, op: Any, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        graphs = op._cached_graphs()
        if graphs is None:
            op.modes.cache_refused()
            return op._rows_product(rows, batched)
        return _apply_rows(op, graphs, rows, batched)


class FiniteDifferences:
    """Central differences of gradients (of outputs for Jacobian products): first derivatives only; a block
    one column at a time."""

    def product(self, op: Any, v: torch.Tensor) -> torch.Tensor:
        return op._fd_product(v)

    def rows(self, op: Any, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        return torch.stack([op._fd_product(r) for r in rows])


class Measuring:
    """Auto without cached graphs: the products alternate reverse and forward (a warm-up pair, then a timed
    pair; every result is a real product) and the ladder keeps the faster."""

    def product(self, op: Any, v: torch.Tensor) -> torch.Tensor:
        mode = op.modes.trial_mode()
        start = time.perf_counter()
        out = STRATEGIES[mode].product(op, v)
        if op.device.type == "cuda":
            torch.cuda.synchronize(op.device)
        op.modes.record_trial(time.perf_counter() - start)
        return out

    def rows(self, op: Any, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        return torch.stack([op._product(r) for r in rows])


STRATEGIES = {"reverse": Reverse(), "forward": Forward(), "cached": Cached(), FD: FiniteDifferences(),
              "measuring": Measuring()}
