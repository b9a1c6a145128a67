"""Sharded Krylov vectors under FSDP2 (sharpscope/sharded_vectors.py, sharpscope/vector_space.py): gloo on the
CPU, 1, 2 and 4 processes (torch.multiprocessing.spawn), each world started once for the module. The R-rank
results must equal the one-process ones: eigenvalues to 1e-10 in float64 on a tanh MLP whose layers split
unevenly (a rank holds no row of the last layer with 4 ranks), estimators for the same seed, and the basis
memory per rank about 1/R of the one-process basis; with HSDP (a 2 x 2 ("replicate", "shard") mesh on 4
processes, data shards x model shards) the same eigenvalues and 1/2 of the basis per rank."""
from __future__ import annotations

import datetime
import json
import math
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.vector_space import BLOCK, ShardedSpace, tall_skinny_q

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

CE = nn.CrossEntropyLoss()
K = 3


def make_model() -> nn.Module:
    """A smooth (tanh) MLP whose rows split unevenly over 2 and 4 ranks (10, 7 and 3 rows)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def make_batch(n: int = 21):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# -- one rank -------------------------------------------------------------------------------------
def _scenario(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, (x, y) = make_model(), make_batch()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rows = np.array_split(np.arange(len(y)), world)[rank]  # uneven data shards too (21 samples)
    H = ss.shard_vectors(ss.hessian_operator(model, CE, (x[rows], y[rows]), distributed=True))
    out: dict = {"local": H.local_size, "n": H.shape[0]}
    res = ss.lanczos(H, k=K, tol=1e-7, return_eigenvectors=True, progress=False)
    vectors = H.gather(res.eigenvectors)
    out["lanczos"] = [res.eigenvalues.tolist(), res.all_converged, res.basis_bytes, res.basis_size,
                      tuple(res.eigenvectors.shape)]
    out["vectors"] = vectors.T.tolist()
    numpy = ss.lanczos(H, k=1, tol=1e-7, backend="numpy", progress=False)
    out["numpy"] = numpy.eigenvalues.tolist()
    warm = ss.lanczos(H, k=1, tol=1e-7, v0=H.shard(vectors[:, 0]), progress=False)
    out["warm"] = [warm.eigenvalues.tolist(), warm.num_matvecs]
    tr = ss.hutchinson_trace(H, num_probes=4, seed=3)
    pp = ss.hutchpp_trace(H, num_matvecs=9, seed=3)
    dens = ss.spectral_density(H, num_probes=2, num_steps=6, seed=3)
    out["trace"] = [tr.estimate, tr.samples.tolist(), pp.estimate]
    out["slq"] = [np.concatenate(dens.nodes).tolist(), np.concatenate(dens.weights).tolist()]
    probe = H.vector_space.rademacher(1, torch.Generator().manual_seed(3), torch.float64, torch.device("cpu"))[0]
    out["probe"] = H.gather(probe).tolist()
    out["errors"] = [_error(lambda: H.matvec(torch.zeros(H.shape[0], dtype=torch.float64))),
                     _error(lambda: ss.lanczos(H, k=1, block_size=2)),
                     _error(lambda: H.gather(res.eigenvectors, max_bytes=8)),
                     _error(lambda: ss.lanczos(H, k=1, v0=torch.ones(H.local_size + 1, dtype=torch.float64)))]
    out["exact"] = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.parameters(), H.base.params))
    return out


def _hsdp_model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _hsdp_scenario(rank: int, world: int) -> dict:
    """Data shards x model shards: a 2 x 2 ("replicate", "shard") mesh, every rank its own uneven data shard; then
    each replica's shard group holding one data shard (the ranks of a row the same rows), then bad layouts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model, (x, y) = _hsdp_model(mesh), make_batch()
    rows = np.array_split(np.arange(len(y)), world)[rank]
    H = ss.shard_vectors(ss.hessian_operator(model, CE, (x[rows], y[rows]), distributed=True))
    res = ss.lanczos(H, k=K, tol=1e-7, return_eigenvectors=True, progress=False)
    out: dict = {"local": H.local_size, "coords": mesh.get_coordinate(), "repr": repr(H)}
    out["lanczos"] = [res.eigenvalues.tolist(), res.all_converged, res.basis_bytes, res.basis_size]
    out["shard_vectors"] = res.eigenvectors.T.tolist()  # this rank's shard, to compare bits with its replica
    out["vectors"] = H.gather(res.eigenvectors).T.tolist()
    tr = ss.hutchinson_trace(H, num_probes=4, seed=3)
    out["trace"] = [tr.estimate, tr.samples.tolist()]
    whole = ss.lanczos(H.base, k=1, tol=1e-7, progress=False)  # the full-vector operator on the same mesh
    out["whole"] = whole.eigenvalues.tolist()
    # one data shard per replica: the two ranks of a mesh row hold the same rows; the mean over the four ranks'
    # samples is then the mean over the union of the two shards
    rows = np.array_split(np.arange(len(y)), 2)[mesh.get_local_rank("replicate")]
    per_replica = ss.shard_vectors(ss.hessian_operator(model, CE, (x[rows], y[rows]), distributed=True))
    out["per_replica"] = ss.lanczos(per_replica, k=1, tol=1e-7, progress=False).eigenvalues.tolist()
    out["exact"] = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(model.parameters(), H.base.params))
    # a 1-D mesh of each row: with distributed= the row's group, the Hessian of the row's two data shards
    sub = _hsdp_model(mesh["shard"])
    mine = np.array_split(np.arange(len(y)), world)[rank]
    row = ss.shard_vectors(ss.hessian_operator(sub, CE, (x[mine], y[mine]), distributed=mesh["shard"].get_group()))
    out["row"] = ss.lanczos(row, k=1, tol=1e-7, progress=False).eigenvalues.tolist()
    both = np.concatenate(np.array_split(np.arange(len(y)), world)[2 * out["coords"][0]:2 * out["coords"][0] + 2])
    out["row_dense"] = torch.linalg.eigvalsh(ss.dense_hessian(make_model(), CE, (x[both], y[both])))[-1].item()
    # bad layouts, each refused with one line naming the fix
    batch = (x[rows], y[rows])  # sub under a 4-rank distributed= group: its backward averages over 2 ranks
    cube = make_model()  # a 3-D mesh
    mesh3 = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("a", "b", "c"))
    for module in cube:
        for name, p in list(module.named_parameters(recurse=False)):
            placed = distribute_tensor(p.detach(), mesh3, (Replicate(), Replicate(), Shard(0)))
            setattr(module, name, nn.Parameter(placed))
    partial = make_model()  # the last layer left unsharded, no root fully_shard: a plain parameter
    from torch.distributed.fsdp import fully_shard
    fully_shard(partial[0], mesh=mesh)
    out["errors"] = [_error(lambda m=m: ss.hessian_operator(m, CE, batch, distributed=True))
                     for m in (sub, cube, partial)]
    return out


SCENARIOS = {"fsdp": _scenario, "hsdp": _hsdp_scenario}


def _error(call) -> str:
    try:
        call()
    except (ValueError, TypeError) as err:
        return str(err)
    return "no error"


def _worker(rank: int, world: int, port: int, outdir: str, scenario: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out = SCENARIOS[scenario](rank, world)
    except Exception:  # noqa: BLE001 - reported to the test
        out = {"crash": traceback.format_exc()}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, tmp: Path, scenario: str = "fsdp") -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, _free_port(), str(tmp), scenario), nprocs=world, join=True)
    outs = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    for r, o in enumerate(outs):
        assert "crash" not in o, f"rank {r}/{world} crashed:\n{o['crash']}"
    return outs


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return _run(1, tmp_path_factory.mktemp("r1"))[0]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _run(2, tmp_path_factory.mktemp("r2"))


@pytest.fixture(scope="module")
def dense_top():
    model, batch = make_model(), make_batch()
    return torch.linalg.eigvalsh(ss.dense_hessian(model, CE, batch)).flip(0)[:K].tolist()


def _close(a, b, rel):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)) <= rel


def _check_world(outs: list[dict], one: dict, dense_top: list[float]) -> None:
    world = len(outs)
    ref_vals, _, ref_bytes, ref_size, _ = one["lanczos"]
    assert one["lanczos"][1] and _close(ref_vals, dense_top, 1e-9)  # finite differences against the exact spectrum
    for r, o in enumerate(outs):
        vals, converged, nbytes, size, shape = o["lanczos"]
        assert converged and _close(vals, ref_vals, 1e-10), (r, vals, ref_vals)
        assert _close(o["numpy"], ref_vals[:1], 1e-10)
        assert _close(o["warm"][0], ref_vals[:1], 1e-10)
        # the basis: this rank's rows only, the same number of rows as one process
        assert size == ref_size and shape == [o["local"], K]
        assert nbytes == (size + 1) * o["local"] * 8
    assert sum(o["local"] for o in outs) == one["n"]
    assert sum(o["lanczos"][2] for o in outs) == ref_bytes  # the shards add up to the one-process basis
    assert max(o["lanczos"][2] for o in outs) <= 1.25 * ref_bytes / world  # about 1/R on every rank
    for o in outs:
        assert outs[0]["lanczos"][0] == o["lanczos"][0]  # the same bits on every rank
        for v, ref in zip(o["vectors"], one["vectors"]):  # gathered eigenvectors, up to sign
            v, ref = np.array(v), np.array(ref)
            assert min(np.abs(v - ref).max(), np.abs(v + ref).max()) < 1e-6
        assert o["probe"] == one["probe"]  # R ranks draw the global vector one rank draws
        # a sample z^T H z is off by at most ||H_fd - H|| ||z||^2, and finite differences in float64 keep
        # ||H_fd - H|| below 1e-10 ||H||: the estimates agree to that scale
        scale = 1e-10 * dense_top[0] * one["n"]
        assert np.allclose(o["trace"][1], one["trace"][1], rtol=0, atol=scale)
        assert abs(o["trace"][0] - one["trace"][0]) <= scale and abs(o["trace"][2] - one["trace"][2]) <= scale
        assert _close(o["slq"][0], one["slq"][0], 1e-8) and np.allclose(o["slq"][1], one["slq"][1], atol=1e-8)
        assert o["exact"]  # the parameter shards restored bit-exactly
        wrong_length, block, too_big, v0 = o["errors"]
        assert "this rank's shard" in wrong_length and "block_size=1" in block and "keep them sharded" in too_big
        assert "this rank's shard" in v0
        assert all("\n" not in e for e in o["errors"])


def test_two_ranks_equal_one_process(one, two, dense_top):
    _check_world(two, one, dense_top)


@pytest.mark.slow
def test_four_ranks_equal_one_process(one, tmp_path, dense_top):
    _check_world(_run(4, tmp_path), one, dense_top)


def test_hsdp_data_shards_times_model_shards_equal_one_process(one, two, tmp_path, dense_top):
    outs = _run(4, tmp_path, "hsdp")
    ref_vals, _, ref_bytes, ref_size, _ = one["lanczos"]
    for r, o in enumerate(outs):
        vals, converged, nbytes, size = o["lanczos"]
        assert converged and _close(vals, ref_vals, 1e-10), (r, vals, ref_vals)
        assert vals == outs[0]["lanczos"][0]  # the same bits on every rank
        assert _close(o["whole"], ref_vals[:1], 1e-10) and _close(o["per_replica"], ref_vals[:1], 1e-10)
        # shard dimension 2: each rank holds what a rank of the 2-process run holds, half the basis
        replica, shard = o["coords"]
        assert o["local"] == two[shard]["local"] and size == ref_size
        assert nbytes == (size + 1) * o["local"] * 8 == two[shard]["lanczos"][2]
        assert f"shard={shard}/2, replica={replica}/2" in o["repr"]
        for v, ref in zip(o["vectors"], one["vectors"]):
            v, ref = np.array(v), np.array(ref)
            assert min(np.abs(v - ref).max(), np.abs(v + ref).max()) < 1e-6
        scale = 1e-10 * dense_top[0] * one["n"]
        assert np.allclose(o["trace"][1], one["trace"][1], rtol=0, atol=scale)
        assert o["exact"] and _close(o["row"], [o["row_dense"]], 1e-9)
        sub, cube, partial = o["errors"]
        assert "mesh holds ranks [0, 1]" in sub or "mesh holds ranks [2, 3]" in sub
        assert "init_device_mesh" in sub and "3-D mesh" in cube and "init_device_mesh" in cube
        assert "plain tensor" in partial and "fully_shard" in partial
        assert all("\n" not in e for e in o["errors"])
    by_coords = {tuple(o["coords"]): o for o in outs}
    assert sum(by_coords[(0, s)]["lanczos"][2] for s in range(2)) == ref_bytes  # one replica's shards: the basis
    for s in range(2):  # the replicas' shards stay bit-identical
        assert by_coords[(0, s)]["shard_vectors"] == by_coords[(1, s)]["shard_vectors"]
        assert by_coords[(0, s)]["trace"] == by_coords[(1, s)]["trace"]


# -- in one process -------------------------------------------------------------------------------
class _Group:
    """A stand-in process group for the one-process tests: the sum over ranks is ``total``."""

    def __init__(self, rank: int, size: int, total: float) -> None:
        self.rank, self.size, self.total = rank, size, total

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.total], dtype=t.dtype)


@pytest.mark.parametrize("cuts", [[0, 5000, 9000], [0, 1, 4096, 4097, 9000], [0, 9000, 9000]])
def test_random_draws_do_not_depend_on_the_split(cuts):
    n = 9000
    whole = ShardedSpace(_Group(0, 1, n), n, [(0, n)])
    full = whole.random_rows(2, torch.Generator().manual_seed(5), torch.float64, torch.device("cpu"))
    signs = whole.rademacher(1, torch.Generator().manual_seed(5), torch.float32, torch.device("cpu"))
    pieces, signs_parts = [], []
    for r, (a, b) in enumerate(zip(cuts, cuts[1:] + [n])):
        if a == b:
            continue
        space = ShardedSpace(_Group(r, len(cuts), n), n, [(a, b - a)])
        pieces.append(space.random_rows(2, torch.Generator().manual_seed(5), torch.float64, torch.device("cpu")))
        signs_parts.append(space.rademacher(1, torch.Generator().manual_seed(5), torch.float32, torch.device("cpu")))
    assert torch.equal(torch.cat(pieces, dim=1), full)
    assert torch.equal(torch.cat(signs_parts, dim=1), signs)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(full.mean())) < 0.05 and abs(float(full.std()) - 1) < 0.05
    assert BLOCK < n  # the draw spans several blocks


@pytest.mark.parametrize("rows", [[7, 5, 0], [2, 2, 9]])
def test_tall_skinny_q(rows):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(sum(rows), 4, generator=g, dtype=torch.float64)
    blocks = torch.split(M, rows)
    stacked = torch.zeros(len(rows) * 4, 4, dtype=torch.float64)
    for r, b in enumerate(blocks):
        R = torch.linalg.qr(b)[1]
        stacked[4 * r: 4 * r + R.shape[0]] = R
    Q = torch.cat([tall_skinny_q(b, r, len(rows), lambda _: stacked) for r, b in enumerate(blocks)])
    assert torch.allclose(Q.T @ Q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q @ (Q.T @ M), M, atol=1e-12)  # the same column space


def test_shard_vectors_refuses_a_whole_vector_operator():
    model, batch = make_model(), make_batch()
    with pytest.raises(TypeError, match="FSDP2-sharded model"):
        ss.shard_vectors(ss.hessian_operator(model, CE, batch))
    assert math.isfinite(ss.lanczos(ss.hessian_operator(model, CE, batch), k=1).eigenvalues[0].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_fsdp_asymmetry_in_float32_names_float64(dtype):
    """A symmetry failure of finite-difference products says, in float32, that they may be too coarse at this n."""
    from types import SimpleNamespace

    from sharpscope.linop import NotSymmetricError
    from sharpscope.operators import ShardedHessianOperator

    op = SimpleNamespace(dtype=dtype, shape=(10 ** 7, 10 ** 7))
    error = NotSymmetricError("the operator is not symmetric: q.A p = 1 but p.A q = 2 (step 1): either ...")
    with pytest.raises(NotSymmetricError) as info:
        ShardedHessianOperator._after_asymmetry(op, error, 3)
    text = str(info.value)
    assert "products are random" in text and "\n" not in text
    assert ("measure in float64" in text) == (dtype == torch.float32)

