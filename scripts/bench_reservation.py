"""How much HDF5 allocates per row beyond the row's own chunks and heap data: the figure behind
``sharpscope.runs.space.METADATA_ALLOWANCE`` (and the close-time growth behind ``STANDING_RESERVE``).

Appends rows of random sizes to a spectra file and checkpoints of three model sizes to run files, and
reports the largest growth of the file beyond ``bytes_needed`` less the allowance (what the allowance must
cover), and how much closing a file grew it. The reservation itself is on, as in use.

    PYTHONPATH=. python scripts/bench_reservation.py
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from sharpscope.runs.space import METADATA_ALLOWANCE
from sharpscope.runs.spectra import SpectraFile
from sharpscope.runs.store import RunWriter, TensorSpec


def spectra_rows(folder: Path, rows: int = 700) -> tuple[int, int]:
    rng = np.random.default_rng(0)
    path = folder / "x.spectra.h5"
    worst = 0
    with SpectraFile(path, "a") as sf:
        for i in range(rows):
            n = int(rng.choice([1, 5, 100, 800, 5000]))
            row = {"step": i, "quantity": "density", "settings": json.dumps({"n": n}), "values": rng.random(n),
                   "residuals": rng.random(n), "num_matvecs": 1, "seconds": 0.1,
                   "info": json.dumps({"x": "y" * int(rng.integers(0, 300))})}
            need = sf._table.bytes_needed({**row, "checksum": 0}) - METADATA_ALLOWANCE
            before = os.path.getsize(path)
            sf.append(row)
            worst = max(worst, os.path.getsize(path) - before - need)
        size = os.path.getsize(path)
    return worst, os.path.getsize(path) - size


def checkpoints(folder: Path, sizes: list[int], rows: int) -> tuple[int, int]:
    path = folder / f"run-{sizes[0]}.h5"
    specs = [TensorSpec(f"t{i}", "param", f"p{i}", (n,), "float32") for i, n in enumerate(sizes)]
    writer = RunWriter(path, {}, specs, lr_groups=2)
    worst = 0
    for step in range(rows):
        tensors = {s.id: torch.randn(s.shape) for s in specs}
        flat = {name: np.zeros(total, dtype=writer._grp[name].dtype) for name, total in writer._totals.items()}
        need = writer._table.bytes_needed({"step": step, "loss": 0.0, "time": 0.0, "lr": np.zeros(2), **flat,
                                           "checksum": np.zeros(len(specs), dtype=np.uint32)}) - METADATA_ALLOWANCE
        before = os.path.getsize(path)
        writer.append(step, tensors, lrs=[0.1, 0.1])
        worst = max(worst, os.path.getsize(path) - before - need)
    size = os.path.getsize(path)
    writer.close()
    return worst, os.path.getsize(path) - size


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("| file | rows | most bytes a row allocated beyond its chunks and heap data | growth on close |")
        print("|---|---|---|---|")
        worst, close = spectra_rows(folder)
        print(f"| spectra (values of 1-5,000 elements) | 700 | {worst:,} | {close} |")
        for sizes, rows in (([10, 3], 1500), ([1000, 64, 7], 1500), ([200000], 60)):
            worst, close = checkpoints(folder, sizes, rows)
            print(f"| run, tensors of {sizes} float32 | {rows} | {worst:,} | {close} |")
        print(f"\nallowance per row: {METADATA_ALLOWANCE:,} bytes")


if __name__ == "__main__":
    main()
