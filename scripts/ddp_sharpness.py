#!/usr/bin/env python
"""Sharpness of a DDP-trained model over several processes, checked against one process.

    torchrun --nproc_per_node 2 scripts/ddp_sharpness.py            # CPUs: gloo
    torchrun --nproc_per_node 4 scripts/ddp_sharpness.py --dtype float32   # GPUs: NCCL (not tested on GPU)

Every rank loads scikit-learn's bundled digits (1,797 samples, no download) and keeps its own shard
(``np.array_split``: shards of different sizes when the ranks do not divide 1,797), trains the digits MLP
(64-128-128-10, tanh) with DDP and full-batch SGD for ``--steps`` steps, then measures the top-``k``
Hessian eigenvalues with ``ss.hessian_operator(ddp_model, loss, shard, distributed=True)``: every rank
runs ``ss.lanczos`` and gets the same result. Rank 0 then measures the same model on the whole data in
one process (the other ranks wait) and prints both, their relative difference and the time per product
(the median of ``--products`` products, after warm-up), and with ``--fd`` the same by finite differences
(``hvp_mode="finite-difference"``). ``--json PATH`` writes the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import sharpscope as ss  # noqa: E402
from sharpscope.data import digits  # noqa: E402
from sharpscope.demo import digits_mlp  # noqa: E402


def per_product(op, n: int) -> float:
    """Median seconds of one product (after two warm-up products)."""
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(op.dtype)
    v = v.to(op.device)
    times = []
    with op.pinned():  # one solve: products of the operator's mode, set up once (a cached graph)
        for i in range(n + 2):
            if op.device.type == "cuda":
                torch.cuda.synchronize(op.device)
            start = time.perf_counter()
            op.matvec(v)
            if op.device.type == "cuda":
                torch.cuda.synchronize(op.device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(op, k: int, products: int) -> dict:
    start = time.perf_counter()
    res = ss.lanczos(op, k=k)
    seconds = time.perf_counter() - start
    return {"eigenvalues": res.eigenvalues.tolist(), "converged": res.all_converged, "num_matvecs": res.num_matvecs,
            "solve_s": seconds, "product_s": per_product(op, products)}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--products", type=int, default=10, help="products timed (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--fd", action="store_true", help="also measure hvp_mode='finite-difference'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    x, y = digits(dtype)
    parts = np.array_split(np.arange(len(y)), world)
    mine = torch.as_tensor(parts[rank])
    shard = (x[mine].to(device), y[mine].to(device))
    torch.manual_seed(0)
    model = digits_mlp().to(device=device, dtype=dtype)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    for _ in range(args.steps):  # DDP averages the shards' gradients: equal weights per rank
        opt.zero_grad()
        loss_fn(ddp(shard[0]), shard[1]).backward()
        opt.step()

    out: dict = {"world": world, "backend": dist.get_backend(), "shards": [len(p) for p in parts],
                 "dtype": args.dtype, "parameters": sum(p.numel() for p in model.parameters())}
    H = ss.hessian_operator(ddp, loss_fn, shard, distributed=True)
    out["distributed"] = measure(H, args.k, args.products)
    if args.fd:
        Hfd = ss.hessian_operator(ddp, loss_fn, shard, distributed=True, hvp_mode="finite-difference")
        out["distributed_fd"] = measure(Hfd, args.k, args.products)
    if rank == 0:
        whole = (x.to(device), y.to(device))
        out["single"] = measure(ss.hessian_operator(model, loss_fn, whole), args.k, args.products)
        if args.fd:
            out["single_fd"] = measure(ss.hessian_operator(model, loss_fn, whole, hvp_mode="finite-difference"),
                                       args.k, args.products)
    dist.barrier()
    if rank == 0:
        report(out, args)
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()
    return out if rank == 0 else None


def report(out: dict, args) -> None:
    ref = torch.tensor(out["single"]["eigenvalues"], dtype=torch.float64)
    print(f"digits MLP ({out['parameters']} parameters, {args.dtype}), {args.steps} DDP steps at lr {args.lr}; "
          f"{out['world']} ranks ({out['backend']}), shards {out['shards']}")
    print(f"2/lr = {2 / args.lr:.4g}")
    print("| run | top eigenvalues | max rel. diff to one process | products | solve s | s per product |")
    print("|---|---|---|---|---|---|")
    for key in ("single", "distributed", "single_fd", "distributed_fd"):
        if key not in out:
            continue
        r = out[key]
        vals = torch.tensor(r["eigenvalues"], dtype=torch.float64)
        diff = float(((vals - ref).abs() / ref.abs()).max())
        print(f"| {key} | {', '.join(f'{v:.8g}' for v in r['eigenvalues'])} | {diff:.2e} | {r['num_matvecs']} | "
              f"{r['solve_s']:.3f} | {r['product_s'] * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
