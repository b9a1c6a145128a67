#!/usr/bin/env python
"""An offline spectrum job's cost: record a digits-MLP run, measure it, then re-run the job on it.

Trains the digits MLP (64-128-128-10, tanh, Adam) for ``--steps`` steps with a Recorder capturing every
``--every`` steps, then times ``run_spectrum_job`` (top-``k`` Hessian at every checkpoint: reading and
verifying the checkpoints, rebuilding the model, the solves, writing the spectra file) and a second run
of the same job, which finds every result stored and only reads (the resume cost). Prints one JSON line
of medians over ``--repeats`` fresh runs, for ``scripts/ab_compare.py``:

    .venv/bin/python scripts/ab_compare.py --base REV --repeats 5 -- \\
        .venv/bin/python scripts/bench_spectrum_job.py --repeats 1
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import sharpscope as ss
from sharpscope.demo import digits_data, digits_mlp
from sharpscope.runs.jobs import SpectrumSettings, run_spectrum_job

# the stored batch's keyword: batch= since run-file format v2, probe= before (for A/B runs against old commits)
BATCH = "batch" if "batch" in inspect.signature(ss.Recorder).parameters else "probe"


def record(path: Path, steps: int, every: int) -> float:
    """Train with a Recorder; return the wall time."""
    torch.manual_seed(0)
    x, y = digits_data()
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    with ss.Recorder(path, model, opt, **{BATCH: (x[:256], y[:256])}, every=every, loss_fn=loss_fn,
                     meta={"model_factory": "sharpscope.demo:digits_mlp"}) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(x[:256]), y[:256])
            loss.backward()
            opt.step()
            rec.step(loss=loss)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads measure the contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "run.h5"
            rec_s = record(path, args.steps, args.every)
            settings = SpectrumSettings(k=args.k)
            t = time.perf_counter()
            run_spectrum_job([str(path)], ("hessian",), settings, progress=False)
            job_s = time.perf_counter() - t
            t = time.perf_counter()
            report = run_spectrum_job([str(path)], ("hessian",), settings, progress=False)
            resume_s = time.perf_counter() - t
            assert report.computed == 0, "the second job recomputed stored results"
            rows.append((rec_s, job_s, resume_s))
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"record {med[0]:.3f} s, spectrum job {med[1]:.3f} s, re-run with everything stored {med[2]:.3f} s")
    print(json.dumps({"record_s": med[0], "spectrum_job_s": med[1], "resume_s": med[2]}))


if __name__ == "__main__":
    main()
