"""One rank of the 2-process gloo tests (tests/test_distributed.py): runs the named scenarios in order and
writes their outcomes to OUT/rank<r>.json. Usage: python _dist_worker.py RANK WORLD PORT OUT SCENARIO..."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this worktree's sharpscope, and the tests' models

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import sharpscope as ss  # noqa: E402
from conftest import make_data, make_mlp  # noqa: E402

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss()
RANK = WORLD = 0


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def shards(x, y):
    """Uneven shards: rank 0 the first 8 samples, rank 1 the other 13 (as two batches of 6 and 7)."""
    if RANK == 0:
        return (x[:8], y[:8])
    return [(x[8:14], y[8:14]), (x[14:], y[14:])]


def top(op, k, **kw):
    return ss.lanczos(op, k=k, **kw)


# -- scenarios ------------------------------------------------------------------------------------
def s_operators(out):
    model, (x, y) = make_mlp(0), make_data("mlp", 0, n=21)
    data = shards(x, y)
    H = ss.hessian_operator(model, CE, data, distributed=True)
    res = top(H, 5, return_eigenvectors=True)
    ref = top(ss.hessian_operator(model, CE, (x, y)), 5)
    out["hessian"] = [res.eigenvalues.tolist(), ref.eigenvalues.tolist(), res.all_converged]
    out["hessian_digest"] = digest(res.eigenvalues, res.residuals, res.eigenvectors)
    out["samples"] = [H.num_samples, H.global_num_samples]
    G = ss.ggn_operator(model, CE, data, distributed=True)
    out["ggn"] = [top(G, 3).eigenvalues.tolist(), top(ss.ggn_operator(model, CE, (x, y)), 3).eigenvalues.tolist()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    P = ss.preconditioned_hessian_operator(model, CE, data, opt, distributed=True)
    Pref = ss.preconditioned_hessian_operator(model, CE, (x, y), opt)
    out["precond"] = [top(P, 2).eigenvalues.tolist(), top(Pref, 2).eigenvalues.tolist()]
    Hs = ss.hessian_operator(model, CE, (x, y))
    hutch, hutch_ref = ss.hutchinson_trace(H, 8, seed=3), ss.hutchinson_trace(Hs, 8, seed=3)
    hpp, hpp_ref = ss.hutchpp_trace(H, 12, seed=3), ss.hutchpp_trace(Hs, 12, seed=3)
    slq, slq_ref = ss.spectral_density(H, 2, 6, seed=3), ss.spectral_density(Hs, 2, 6, seed=3)
    out["trace"] = [[hutch.estimate, hpp.estimate, slq.moment(1)], [hutch_ref.estimate, hpp_ref.estimate,
                                                                     slq_ref.moment(1)]]
    out["estimates_digest"] = digest(torch.as_tensor(hutch.samples), torch.as_tensor(hpp.samples),
                                     *[torch.as_tensor(a) for a in slq.nodes + slq.weights])
    out["gradient_loss"] = [float((H.gradient() - Hs.gradient()).abs().max()), H.loss() - Hs.loss()]
    out["symmetric"] = H.check_symmetry().passed
    block = top(H, 3, block_size=2)
    out["block"] = [block.eigenvalues.tolist(), ref.eigenvalues[:3].tolist()]
    fd = ss.hessian_operator(model, CE, data, distributed=True, hvp_mode="finite-difference")
    out["fd"] = [top(fd, 5).eigenvalues.tolist(), ref.eigenvalues.tolist()]
    start = time.perf_counter()
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        H.matvec(v)
    out["seconds_per_product"] = (time.perf_counter() - start) / 3


def s_closure(out):
    """A loss closure over dict batches, with fractional batch weights (half the sample count)."""
    model, (x, y) = make_mlp(0), make_data("mlp", 0, n=21)
    loss = ss.batch_loss(lambda m, b: CE(m(b["x"]), b["y"]), weight=lambda b: 0.5 * b["x"].shape[0])
    mine = shards(x, y)
    data = [{"x": a, "y": b} for a, b in (mine if isinstance(mine, list) else [mine])]
    H = ss.hessian_operator(model, loss, data, distributed=True)
    ref = ss.hessian_operator(model, loss, {"x": x, "y": y})
    out["closure"] = [top(H, 3).eigenvalues.tolist(), top(ref, 3).eigenvalues.tolist(), H.global_num_samples]


def s_ddp(out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, (x, y) = make_mlp(1), make_data("mlp", 1, n=21)
    ddp = DDP(model)
    res = top(ss.hessian_operator(ddp, CE, shards(x, y), distributed=dist.group.WORLD), 3)
    out["ddp"] = [res.eigenvalues.tolist(), top(ss.hessian_operator(model, CE, (x, y)), 3).eigenvalues.tolist()]


def _expect(out, key, fn):
    start = time.perf_counter()
    try:
        fn()
        out[key] = None
    except Exception as err:  # noqa: BLE001 - the outcome is the test's subject
        out[key] = [type(err).__name__, str(err), time.perf_counter() - start]


def s_failures(out):
    model, (x, y) = make_mlp(2), make_data("mlp", 2, n=21)

    def loss_fn(outputs, targets):
        if RANK == 1:
            raise ValueError("rank-one boom")
        return CE(outputs, targets)

    _expect(out, "raise", lambda: top(ss.hessian_operator(model, loss_fn, shards(x, y), distributed=True), 2))

    class AlwaysDropout(nn.Module):
        def forward(self, z):
            return nn.functional.dropout(z, 0.5, training=RANK == 1)

    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), AlwaysDropout(), nn.Linear(12, 4)).double()
    _expect(out, "stochastic", lambda: top(ss.hessian_operator(noisy, CE, shards(x, y), distributed=True), 2))
    other = make_mlp(2) if RANK == 0 else nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 12), nn.Tanh(),
                                                        nn.Linear(12, 4)).double()
    _expect(out, "shapes", lambda: ss.hessian_operator(other, CE, shards(x, y), distributed=True))
    _expect(out, "empty", lambda: ss.ggn_operator(model, CE, shards(x, y) if RANK == 0 else [], distributed=True))
    _expect(out, "empty_batch", lambda: ss.hessian_operator(model, CE, (x[:0], y[:0]) if RANK == 1 else (x, y),
                                                            distributed=True))
    _expect(out, "ntk", lambda: ss.ntk_operator(model, x, distributed=True))
    H = ss.hessian_operator(model, CE, shards(x, y), distributed=True)
    ss.lanczos(H, k=1)

    def stale():
        def step(*_):
            if RANK == 1:
                with torch.no_grad():
                    model[0].bias.add_(0.01)
        ss.lanczos(H, k=2, callback=step)
    _expect(out, "stale", stale)
    _expect(out, "after", lambda: top(ss.hessian_operator(make_mlp(2), CE, shards(x, y), distributed=True), 1))


def s_recorder(out):
    model, (x, y) = make_mlp(3), make_data("mlp", 3, n=21)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = Path(sys.argv[4]) / "run.h5"
    with ss.Recorder(path, model, opt, batch=(x, y), every=2, loss_fn=CE, sharpness_every=2) as rec:
        for _ in range(4):
            opt.zero_grad()
            CE(model(x), y).backward()
            opt.step()
            rec.step()
        out["recorder"] = [rec.writer is not None, rec.step_count, len(rec.sharpness_log)]


def s_fsdp(out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, (x, y) = make_mlp(4), make_data("mlp", 4, n=21)
    ref = top(ss.hessian_operator(model, CE, (x, y)), 3)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    before = [p.to_local().clone() for p in model.parameters()]
    H = ss.hessian_operator(model, CE, shards(x, y), distributed=True)
    res = top(H, 3, return_eigenvectors=True)
    out["fsdp"] = [res.eigenvalues.tolist(), ref.eigenvalues.tolist(), type(H).__name__, H.num_matvecs]
    out["fsdp_digest"] = digest(res.eigenvalues, res.eigenvectors)
    out["fsdp_exact"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    out["fsdp_grads"] = all(p.grad is None for p in model.parameters())
    _expect(out, "fsdp_ggn", lambda: ss.ggn_operator(model, CE, shards(x, y), distributed=True))


def s_timeout(out):
    group = dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=3))
    model, (x, y) = make_mlp(5), make_data("mlp", 5, n=21)
    H = ss.hessian_operator(model, CE, shards(x, y), distributed=group)
    if RANK == 0:
        _expect(out, "timeout", lambda: top(H, 2))
    else:
        time.sleep(6)  # never multiplies: rank 0's all_reduce must time out, not hang


SCENARIOS = {name[2:]: fn for name, fn in globals().items() if name.startswith("s_")}


def main() -> None:
    global RANK, WORLD
    RANK, WORLD, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=RANK, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    for name in sys.argv[5:]:
        out: dict = {}
        try:
            SCENARIOS[name](out)
        except Exception:  # noqa: BLE001 - reported to the test
            out["crash"] = traceback.format_exc()
        results[name] = out
        (outdir / f"rank{RANK}.json").write_text(json.dumps(results))
        if name != "timeout":
            dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # a timed-out group may not shut down cleanly


if __name__ == "__main__":
    main()
