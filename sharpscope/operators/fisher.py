r"""The Fisher information as a curvature operator: the GGN's form :math:`\sum_b \frac{n_b}{N} J_b^\top C_b J_b`
with the output curvature :math:`C_b` replaced by outer products of output gradients. Only those per-batch
functions live here; everything else (data, modes, caches, checks) is the GGN's.

With the batch loss the mean of per-sample losses over the first dimension,
:math:`\ell = \frac1B \sum_i \ell_i`, the per-sample gradients are :math:`g_i = B J_i^\top q_i` with
:math:`q = \nabla_f \ell`, so the Fisher of the batch, :math:`\frac1B \sum_i g_i g_i^\top`, is
:math:`J^\top C J` with :math:`(C u)_i = B\, q_i \langle q_i, u_i \rangle`.

* ``kind="empirical"``: :math:`q` from the data's labels (Kunstner, Balles and Hennig 2019 on what it is not).
* ``kind="mc"``: the true Fisher by Monte Carlo, :math:`q_{im} = (p_i - e_{\hat y_{im}}) / B` for
  cross-entropy, with :math:`M` labels :math:`\hat y_{im} \sim \mathrm{softmax}(f_i)` per sample. The labels
  come from uniforms drawn once per batch from a seeded generator (inverse CDF at the current
  probabilities), as curvlinops' ``FisherMCLinearOperator`` draws them once: every product of a solve sees the
  same labels, so the determinism check holds. :math:`\mathbb{E}[q q^\top] = (\mathrm{diag}\,p - p p^\top)/B^2`,
  so it converges to the GGN of cross-entropy as :math:`M` grows (Martens 2020, section 9.2).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .ggn import GGNOperator

FisherKind = Literal["empirical", "mc"]


class FisherOperator(GGNOperator):
    """The empirical Fisher or the Monte-Carlo (true) Fisher (module docstring); built by
    :func:`~sharpscope.operators.fisher_operator`."""

    def __init__(self, *args, kind: FisherKind = "empirical", mc_samples: int = 1, seed: int = 0, **kwargs) -> None:
        if kind not in ("empirical", "mc"):
            raise ValueError(f"fisher_operator: kind must be 'empirical' or 'mc', got {kind!r}")
        if kind == "mc" and not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"fisher_operator: mc_samples must be a positive integer, got {mc_samples!r}")
        self.kind, self.mc_samples, self.seed = kind, mc_samples, seed
        super().__init__(*args, **kwargs)
        if kind == "mc" and not isinstance(self.loss_fn, nn.CrossEntropyLoss):
            raise ValueError("fisher_operator(kind='mc') samples labels from the model's softmax: it needs "
                             f"nn.CrossEntropyLoss, got {type(self.loss_fn).__name__}; use kind='empirical'")

    def _factors(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        """``q`` per draw, shape ``(M, *outputs.shape)`` (``M = 1`` for the empirical Fisher)."""
        o = outputs.detach()
        if o.ndim < 2:
            raise ValueError(f"FisherOperator: outputs of shape {tuple(o.shape)}; the Fisher needs one row of "
                             "outputs per sample, shape (batch, ...)")
        if self.kind == "empirical":
            with torch.enable_grad():
                leaf = o.requires_grad_(True)
                (q,) = torch.autograd.grad(self.loss_fn(leaf, targets), leaf)
            return q.unsqueeze(0)
        if o.ndim != 2:
            raise ValueError(f"FisherOperator(kind='mc'): outputs of shape {tuple(o.shape)}; sampling labels needs "
                             "logits of shape (batch, classes)")
        p = torch.softmax(o.double(), dim=1)
        u = self._uniforms(targets, o.shape[0]).to(p.device)
        cdf = p.cumsum(dim=1)
        labels = torch.searchsorted(cdf, u.T.contiguous()).T.clamp_(max=o.shape[1] - 1)  # (M, B)
        q = (p.unsqueeze(0) - nn.functional.one_hot(labels, o.shape[1]).to(p.dtype)) / o.shape[0]
        return q.to(o.dtype)

    def _uniforms(self, targets, size: int) -> torch.Tensor:
        """``(M, size)`` uniforms of the batch holding ``targets``, from a generator seeded by ``seed`` and the
        batch's position in the data: the same on every product, solve and rebuild."""
        position = next((k for k, b in enumerate(self.batches) if b.targets is targets), 0)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
        return torch.rand(self.mc_samples, size, generator=gen, dtype=torch.float64)

    def _apply(self, q: torch.Tensor, u: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``(C u)_i = (B / M) sum_m q_mi <q_mi, u_i>`` for ``u`` of shape ``(..., *outputs.shape)``."""
        dims = tuple(range(-(q.ndim - 2), 0))  # a sample's output dimensions
        lead = u.ndim - (q.ndim - 1)  # block rows in front of u
        qs = q.reshape(q.shape[0], *([1] * lead), *q.shape[1:])
        inner = (qs * u.unsqueeze(0)).sum(dim=dims, keepdim=True)
        return (qs * inner).sum(dim=0) * (batch_size / q.shape[0])

    def _output_curvature(self, outputs: torch.Tensor, targets, u: torch.Tensor) -> torch.Tensor:
        return self._apply(self._factors(outputs, targets), u, outputs.shape[0])

    def _output_curvature_rows(self, outputs: torch.Tensor, targets, U: torch.Tensor) -> torch.Tensor:
        return self._apply(self._factors(outputs, targets), U, outputs.shape[0])

    def _forward_batched(self, rows: torch.Tensor) -> torch.Tensor:
        """No vmap form (labels and factors are not functions of the vector): one column at a time."""
        return torch.stack([self._forward_product(r) for r in rows])
