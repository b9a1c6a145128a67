"""What :func:`sharpscope.lanczos` returns: the Ritz pairs with their certificates and the solve's cost."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import LanczosConfig
from .ritz import Ritz

__all__ = ["LanczosResult", "make_result"]


@dataclass(frozen=True)
class LanczosResult:
    """Eigenvalues (float64, ordered by ``which``: descending for LA/LM, ascending for SA), Ritz
    residual norms ``||A y - theta y||``, a per-value ``converged`` mask, the eigenvectors as
    columns ``(n, k)`` when asked for, the cost (``num_matvecs`` counts every operator product,
    each column of a block included), the basis (``basis_size``: vectors kept before a thick restart;
    ``basis_bytes``: the most bytes the basis held on this rank, its tensors' storage) and what the
    operator's derivative check found (``derivative_check``: ``"passed"``, ``"inconclusive"``,
    ``"switched"`` to finite differences or ``"unchecked"``;
    :attr:`sharpscope.linop.SymmetricOperator.derivative_check`)."""

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    num_restarts: int
    num_reorthogonalizations: int
    eigenvectors: torch.Tensor | None = None
    which: str = "LA"
    derivative_check: str = "unchecked"
    basis_size: int = 0
    basis_bytes: int = 0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())


def make_result(ritz: Ritz, idx: np.ndarray, cfg: LanczosConfig, vectors: torch.Tensor | None,
                **counts: int) -> LanczosResult:
    """The :class:`LanczosResult` of the Ritz pairs ``idx``."""
    return LanczosResult(
        eigenvalues=torch.as_tensor(ritz.theta[idx].copy(), dtype=torch.float64),
        residuals=torch.as_tensor(ritz.residuals[idx].copy(), dtype=torch.float64),
        converged=torch.as_tensor(ritz.converged(cfg.tol, idx)),
        eigenvectors=vectors, which=cfg.which, basis_size=cfg.max_basis, **counts)
