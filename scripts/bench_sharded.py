"""Per-rank memory of the Lanczos basis with sharded Krylov vectors (ss.shard_vectors) under FSDP2, gloo on CPUs.

For each world size R (default 1, 2, 4) the script spawns R processes; each builds the same tanh MLP (default
1024-3072-3072-10, 12.6M parameters, float64), shards it with fully_shard, takes its data shard and runs
``ss.lanczos(H, k=1, max_basis=B, max_matvecs=B + 4)`` (one thick restart, so every basis row is written), and
reports per rank: the basis bytes (``res.basis_bytes``), the peak RSS of the process (``ru_maxrss``), the RSS
before the solve, the products and the wall time of the solve. ``--full`` adds the full-vector operator
(``ShardedHessianOperator`` as ``hessian_operator`` returns it) with R ranks, for comparison.

    python scripts/bench_sharded.py                      # R = 1, 2, 4
    python scripts/bench_sharded.py --full 2             # and the full-vector basis at R = 2

Prints one JSON line per rank and a table of the per-rank maxima. GPUs (NCCL): not measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the sibling proc_memory, also when a test loads this file by path
from proc_memory import rss_bytes  # noqa: E402

sys.path.insert(0, str(ROOT))


def _worker(rank: int, world: int, port: int, outdir: str, args: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import sharpscope as ss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    d_in, h, out = args["d_in"], args["hidden"], 10
    dtype = getattr(torch, args["dtype"])
    model = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, out)).to(dtype)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args["batch"], d_in, generator=g, dtype=dtype)
    y = torch.randint(0, out, (args["batch"],), generator=g)
    rows = torch.arange(args["batch"]).tensor_split(world)[rank]
    H = ss.hessian_operator(model, nn.CrossEntropyLoss(), (x[rows], y[rows]), distributed=True)
    if args["mode"] == "sharded":
        H = ss.shard_vectors(H)
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    res = ss.lanczos(H, k=1, tol=1e-3, max_basis=args["basis"], max_matvecs=args["basis"] + 4, progress=False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {"mode": args["mode"], "world": world, "rank": rank, "n": H.shape[0],
              "local": getattr(H, "local_size", H.shape[0]), "basis_size": res.basis_size,
              "basis_bytes": res.basis_bytes, "rss_before_solve": rss_before, "peak_rss": peak,
              "num_matvecs": res.num_matvecs, "solve_s": round(wall, 2), "top": float(res.eigenvalues[0])}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args: dict) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, _free_port(), tmp, args), nprocs=world, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--basis", type=int, default=20, help="max_basis (vectors)")
    p.add_argument("--full", type=int, metavar="R", help="also the full-vector operator with R ranks")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="float64 (default, the 1e-10 agreement of the tests) or float32 (finite-difference "
                        "products agree across world sizes to about 1e-5 relative on the default MLP)")
    a = p.parse_args()
    args = {"hidden": a.hidden, "d_in": a.d_in, "batch": a.batch, "basis": a.basis, "dtype": a.dtype}
    runs = [("sharded", w) for w in a.worlds] + ([("full", a.full)] if a.full else [])
    rows = []
    for mode, world in runs:
        records = run(world, dict(args, mode=mode))
        for r in records:
            print(json.dumps(r), flush=True)
        rows.append(records)
    print(f"\n{'mode':8} {'R':>2} {'n':>10} {'local (max)':>11} {'basis MB/rank':>13} {'peak RSS MB/rank':>16} "
          f"{'RSS before MB':>13} {'products':>8} {'solve s':>7} {'top':>10}")
    for records in rows:
        top = max(records, key=lambda r: r["basis_bytes"])
        print(f"{top['mode']:8} {top['world']:>2} {top['n']:>10} {max(r['local'] for r in records):>11} "
              f"{top['basis_bytes'] / 2**20:>13.1f} {max(r['peak_rss'] for r in records) / 2**20:>16.0f} "
              f"{max(r['rss_before_solve'] for r in records) / 2**20:>13.0f} {top['num_matvecs']:>8} "
              f"{max(r['solve_s'] for r in records):>7.1f} {top['top']:>10.6g}")


if __name__ == "__main__":
    main()
