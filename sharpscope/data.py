"""Embedded data sets (no downloads) and the batching used by sweeps.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, 1,797 samples, 64 features in [0, 1],
  10 classes (cross-entropy).
* ``teacher_student``: Gaussian inputs labelled by a fixed random teacher (a tanh MLP of width 64),
  for regression (``task="regression"``, MSE targets) or classification (argmax of the teacher).

Users' own data plug in as any ``(inputs, targets)`` tensors or DataLoader.
"""
from __future__ import annotations

import torch

__all__ = ["digits", "teacher_student", "load", "DATASETS"]


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: ``x`` (1797, 64) scaled to [0, 1], ``y`` (1797,) class indices."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.data, dtype=dtype) / 16.0, torch.as_tensor(d.target, dtype=torch.long)


def teacher_student(n: int = 1024, d_in: int = 32, d_out: int = 10, *, task: str = "classification",
                    seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``N(0, I)`` labelled by a fixed random tanh teacher ``d_in -> 64 -> d_out``."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if n < 1 or d_in < 1 or d_out < 1:
        raise ValueError(f"n, d_in and d_out must be positive, got {n}, {d_in}, {d_out}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    w1 = torch.randn(d_in, 64, generator=g, dtype=torch.float64) / d_in ** 0.5
    w2 = torch.randn(64, d_out, generator=g, dtype=torch.float64) / 8.0
    out = torch.tanh(x @ w1) @ w2
    y = out.argmax(dim=1) if task == "classification" else out.to(dtype)
    return x.to(dtype), y


DATASETS = {"digits": digits, "teacher-student": teacher_student}


def load(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A bundled data set by name (``"digits"`` or ``"teacher-student"``) with its keyword arguments."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; bundled: {', '.join(DATASETS)} (or pass your own tensors)")
    return DATASETS[name](**kwargs)
