"""Embedded data sets (no downloads) and the batching used by sweeps.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits, 1,797 samples, 64 features in [0, 1],
  10 classes (cross-entropy).
* ``teacher_student``: Gaussian inputs labelled by a fixed random teacher (a tanh MLP of width 64),
  for regression (``task="regression"``, MSE targets) or classification (argmax of the teacher).

* ``cifar10``: CIFAR-10 read from a folder the user already has (torchvision's layout,
  ``ROOT/cifar-10-batches-py/``; nothing is downloaded and torchvision is not needed), for the larger
  probe variants.

Users' own data plug in as any ``(inputs, targets)`` tensors or DataLoader.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["digits", "teacher_student", "cifar10", "load", "DATASETS"]


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


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cifar10(root: str | Path, *, train: bool = True, limit: int | None = None, flatten: bool = False,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (the python version, as torchvision's ``CIFAR10(root)``
    stores it): ``x`` (N, 3, 32, 32) normalised per channel (or (N, 3072) with ``flatten``), ``y`` (N,)
    class indices; the first ``limit`` samples when given."""
    folder = Path(root).expanduser() / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (expected torchvision's CIFAR-10 layout; "
                                f"sharpscope does not download data sets)")
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        if limit is not None and sum(len(y) for y in ys) >= limit:
            break
    x = torch.from_numpy(np.concatenate(xs)[:limit]).to(dtype) / 255.0
    x = (x - torch.tensor(_CIFAR_MEAN, dtype=dtype)[:, None, None]) / torch.tensor(_CIFAR_STD, dtype=dtype)[:, None, None]
    y = torch.from_numpy(np.concatenate(ys)[:limit])
    return (x.flatten(1) if flatten else x), y


DATASETS = {"digits": digits, "teacher-student": teacher_student, "cifar10": cifar10}


def load(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set by name (``"digits"``, ``"teacher-student"`` or ``"cifar10"``) with its keyword arguments."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)} (or pass your own tensors)")
    return DATASETS[name](**kwargs)
