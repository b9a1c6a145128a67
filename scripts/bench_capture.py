#!/usr/bin/env python
"""Capture overhead: the digits MLP trained with and without a Recorder capturing every 100 steps.

Prints the median wall time of each (alternating runs in one process), the overhead ratio, and the
bytes per checkpoint on disk.  Run: .venv/bin/python scripts/bench_capture.py [--steps 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import sharpscope as ss
from sharpscope.demo import digits_data, digits_mlp


def train(steps: int, path: Path | None, every: int, batch: int, optimizer: str) -> tuple[float, float]:
    """Wall time of the loop, and the part of it spent inside ``Recorder.step``."""
    torch.manual_seed(0)
    x, y = digits_data()
    model = digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    rec = ss.Recorder(path, model, opt, batch=(x[:256], y[:256]), every=every, loss_fn=loss_fn,
                      meta={"model_factory": "sharpscope.demo:digits_mlp"}) if path else None
    g = torch.Generator().manual_seed(0)
    in_recorder = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if rec is not None:
            t = time.perf_counter()
            rec.step(loss=loss)
            in_recorder += time.perf_counter() - t
    total = time.perf_counter() - start
    if rec is not None:
        rec.close()
    return total, in_recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the medians as one JSON line (last)")
    args = parser.parse_args()
    plain, captured = [], []
    with tempfile.TemporaryDirectory() as tmp:
        train(50, None, args.every, args.batch, args.optimizer)  # warm-up
        for r in range(args.repeats):
            plain.append(train(args.steps, None, args.every, args.batch, args.optimizer)[0])
            path = Path(tmp) / f"run{r}.h5"
            captured.append(train(args.steps, path, args.every, args.batch, args.optimizer))
        with ss.open_run(path) as run:
            n = len(run.steps)
            params = sum(t.numel() for t in run.params(run.steps[-1]).values())
        size = path.stat().st_size
    t0 = statistics.median(plain)
    t1 = statistics.median(t for t, _ in captured)
    inside = statistics.median(r for _, r in captured)
    print(f"digits MLP ({params:,} parameters), {args.optimizer}, batch {args.batch}, {args.steps} steps, "
          f"capture every {args.every} ({n} checkpoints incl. step 0), {torch.get_num_threads()} threads")
    print(f"  training alone      {t0:.3f} s  (median of {args.repeats}: {', '.join(f'{t:.3f}' for t in plain)})")
    print(f"  with Recorder       {t1:.3f} s  (median of {args.repeats}: {', '.join(f'{t:.3f}' for t, _ in captured)})")
    print(f"  overhead            {100 * (t1 / t0 - 1):+.1f} % (difference of medians: noisy on a shared machine)")
    print(f"  time in Recorder    {inside:.3f} s = {100 * inside / (t1 - inside):.1f} % of the training time "
          f"({1e3 * inside / (n - 1):.1f} ms per checkpoint)")
    print(f"  file                {size / 1e6:.2f} MB, {size / n / 1e3:.0f} kB per checkpoint "
          f"(params + Adam state = {params * 4 * (3 if args.optimizer == 'adam' else 1) / 1e3:.0f} kB raw)")
    if args.json:
        print(json.dumps({"plain_seconds": t0, "recorded_seconds": t1, "recorder_seconds": inside,
                          "ms_per_checkpoint": 1e3 * inside / (n - 1)}))


if __name__ == "__main__":
    main()
