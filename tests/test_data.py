"""Data sets: the bundled ones and CIFAR-10 read from a user's folder (a fake one here)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from conftest import probe_text
from sharpscope.data import cifar10, load
from sharpscope.sweep import run_sweep


def _fake_cifar(root, n_per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n_per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def test_cifar10_reads_torchvisions_layout(tmp_path):
    root = _fake_cifar(tmp_path)
    x, y = cifar10(root)
    assert x.shape == (100, 3, 32, 32) and y.shape == (100,) and y.dtype == torch.long
    raw = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    pixel = raw[b"data"][0].reshape(3, 32, 32)[1, 2, 3] / 255.0
    assert x[0, 1, 2, 3].item() == pytest.approx((pixel - 0.4822) / 0.2435, rel=1e-5)
    x, y = load("cifar10", root=str(root), train=False, flatten=True, limit=7)
    assert x.shape == (7, 3072) and y.tolist() == pickle.loads(
        (root / "cifar-10-batches-py" / "test_batch").read_bytes())[b"labels"][:7]
    with pytest.raises(FileNotFoundError, match="missing data_batch_1.*does not download"):
        cifar10(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load("mnist")


def test_a_probe_trains_on_cifar10_from_a_folder(tmp_path):
    root = _fake_cifar(tmp_path / "data", n_per_batch=8)
    text = probe_text("c10", widths=(8, 16), steps=2, every=1).replace(
        "in_features = 64", "in_features = 3072").replace(
        'data = "digits"', f'data = "cifar10"\ndata_kwargs = {{ root = "{root}", flatten = true }}')
    (tmp_path / "c10.toml").write_text(text)
    result = run_sweep(tmp_path / "c10.toml", tmp_path / "out", progress=False)
    assert result.trained == 2 and not result.spectra.failures
