#!/usr/bin/env python
"""Top-5 Hessian eigenvalues: sharpscope against PyHessian, hessian-eigenthings, curvlinops and scipy eigsh.

Everything is measured in ONE run on the same machine (issue 2, "Performance"):

* The problem (model after 5 SGD steps + its batch) is built once by this process and saved to
  bench-output/, so every tool sees bit-identical float32 parameters and data.
* The reference is scipy ``eigsh(which="LA", k=5, tol=1e-10)`` on a float64 copy of the model and
  data, driven by a plain float64 autograd HVP written here (independent of sharpscope), with its
  Ritz residuals checked; it is cached in bench-output/ keyed by a hash of the problem.
* A calibration subprocess times single HVPs (median of ``--hvp-samples``): the raw full
  double-backward HVP (forward, grad with create_graph, second grad) -- the unit of the
  "time / raw HVP" column --, a retained-graph HVP (second grad only), a gradient, and each of
  sharpscope's ``hvp_mode`` values through its operator.
* Every tool runs in its own fresh subprocess on the float32 problem, so that its peak memory is
  its own: peak RSS (VmHWM, reset after loading the problem and one untimed warm-up gradient) and
  its rise over the RSS at that point. It runs twice there: the first ("cold") run pays one-time
  set-up (lazy imports, first-call kernel set-up) and gives the memory; the second ("warm") run
  gives the time used in every ratio. Wall time covers operator/object construction plus the
  eigensolve, and nothing else.

How HVPs are counted (each exact: one count = one Hessian-vector product):

* sharpscope, and scipy eigsh on ``H.to_scipy()``: the operator's ``_matvec`` is wrapped on the
  instance with a counter of our own (every product, matvec or matmat, goes through it); it is
  checked against ``H.num_matvecs`` and ``res.num_matvecs``.
* PyHessian: ``pyhessian.hessian.hessian_vector_product`` (the module global its ``eigenvalues``
  calls, one ``torch.autograd.grad`` over the retained gradient graph per call) is replaced by a
  counting wrapper. Its constructor's one gradient (``backward(create_graph=True)``) is not an HVP.
* hessian-eigenthings: its ``HessianOperator.matvec`` is wrapped on the instance (one full
  double-backward HVP on the single batch per call).
* curvlinops: ``HessianLinearOperator._matmat_batch`` is replaced on the class for the run by a wrapper
  counting its matrix's columns (one column = one HVP, forward-over-reverse ``jvp(grad)`` under
  ``vmap``), so the products of its default determinism check at construction count too; it is
  driven by scipy ``eigsh`` on ``op.to_scipy(float32)`` with the same settings and start vector as
  the ``scipy-eigsh`` row (a peer: its own operator, not sharpscope's).

A/B against another revision (``--ab REV``): the sharpscope tools (and the scipy rows on its operator) run
also from ``git archive REV``
(extracted into bench-output/ab-REV/), each in its own process like every tool, interleaved round-robin
with the working tree's, so that the machine's drifts hit both alike; the run ends with the ratios
(HVPs, time, engine overhead; working tree over REV). Workers import sharpscope from this checkout (or
from the extracted revision), never from wherever the environment's editable install points.

Set-up:  ./scripts/bench_setup.sh   (installs the peers with --no-deps: torch stays the CPU build)
Run:     .venv/bin/python scripts/bench_eigs.py [--problem mlp|cnn|all] [--quick] [--repeats N] [--ab REV]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the sibling proc_memory, also when a test loads this file by path
from proc_memory import reset_peak, status_kib  # noqa: E402

OUT = ROOT / "bench-output"
K = 5
REFERENCE_TOL = 1e-10
BASELINE = "pyhessian-tol1e-4"  # the peer the ratios are taken against (issue 2)


# =============================================================================================
# problems
# =============================================================================================
def problem_spec(name: str, quick: bool) -> dict:
    """Sizes of a problem; ``quick`` shrinks it for a smoke run."""
    if name == "mlp":  # 3072-512-512-10: 1.84M parameters
        return {"name": name, "quick": quick, "d_in": 3072, "hidden": 128 if quick else 512,
                "batch": 64 if quick else 512}
    if name == "cnn":
        return {"name": name, "quick": quick, "channels": [8, 16] if quick else [16, 32],
                "batch": 64 if quick else 256}
    raise ValueError(f"unknown problem {name!r}")


def build_model(spec: dict) -> nn.Module:
    """The architecture of a problem. No BatchNorm or dropout anywhere, so PyHessian's forced
    ``model.eval()`` changes nothing and every tool sees the same Hessian."""
    if spec["name"] == "mlp":
        d, h = spec["d_in"], spec["hidden"]
        return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    c1, c2 = spec["channels"]
    return nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(c2 * 8 * 8, 10))


def make_problem(spec: dict) -> dict:
    """Model after 5 SGD steps (lr 0.1) on one fixed random batch, from seed 0."""
    torch.manual_seed(0)
    model = build_model(spec)
    shape = (spec["d_in"],) if spec["name"] == "mlp" else (3, 32, 32)
    x = torch.randn(spec["batch"], *shape)
    y = torch.randint(0, 10, (spec["batch"],))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for t in [*state.values(), x, y]:
        digest.update(t.numpy().tobytes())
    return {"spec": spec, "state": state, "x": x, "y": y, "key": digest.hexdigest()[:12],
            "num_params": sum(v.numel() for v in state.values())}


def load_problem(path: Path, dtype: torch.dtype = torch.float32):
    """(model, loss_fn, (x, y)) from a saved problem, in ``dtype``; parameters need grad, no .grad."""
    saved = torch.load(path, weights_only=True)
    model = build_model(saved["spec"])
    model.load_state_dict(saved["state"])
    model.to(dtype)
    return model, nn.CrossEntropyLoss(), (saved["x"].to(dtype), saved["y"])


def problem_path(spec: dict) -> Path:
    return OUT / f"problem-{spec['name']}{'-quick' if spec['quick'] else ''}.pt"


def save_problem(problem: dict) -> Path:
    """Save atomically (write, then rename): a concurrent run may be reading the same file."""
    path = problem_path(problem["spec"])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: problem[k] for k in ("spec", "state", "x", "y")}, tmp)
    os.replace(tmp, path)
    return path


# =============================================================================================
# plain autograd HVPs (independent of every tool): the time unit and the reference's operator
# =============================================================================================
def full_hvp(model, loss_fn, data, params, v_split):
    """One raw HVP by double backward: forward, gradient with create_graph, second gradient."""
    x, y = data
    g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    return torch.autograd.grad(g, params, v_split)


def retained_graph_hvp_fn(model, loss_fn, data, params):
    """HVP closure on a gradient graph built once (PyHessian's / sharpscope "cached"'s way)."""
    x, y = data
    g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    return lambda v_split: torch.autograd.grad(g, params, v_split, retain_graph=True)


def median_time(fn: Callable[[], object], samples: int, spreads: dict | None = None, key: str = "") -> float:
    """Median wall time of ``fn`` over ``samples`` calls, after one untimed warm-up call; the
    quartile ratio q3/q1 of the samples goes to ``spreads[key]`` (a noisy machine shows there)."""
    fn()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if spreads is not None and len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4)
        spreads[key] = q3 / q1 if q1 > 0 else float("inf")
    return statistics.median(times)


# =============================================================================================
# the tools: each returns ToolOutput; the caller times it and measures memory
# =============================================================================================
@dataclass
class ToolOutput:
    eigenvalues: list[float]  # top-K, descending
    hvps: int
    hvp_kind: str  # which single-HVP time the engine overhead is measured against
    hvp_seconds: float  # wall time spent inside the counted HVP calls
    info: dict = field(default_factory=dict)


class Counter:
    """Wraps an HVP function: counts the calls and the wall time spent inside them."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls, self.seconds = fn, 0, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def _count_operator_products(H) -> Counter:
    """Count sharpscope operator products ourselves: wrap ``_matvec`` on the instance (every
    ``matvec``, and so every ``matmat`` column and ``to_scipy()`` product, goes through it)."""
    H._matvec = Counter(H._matvec)
    return H._matvec


def tool_sharpscope(model, loss_fn, data, **lanczos_kwargs) -> ToolOutput:
    """``ss.lanczos(H, k=5, **lanczos_kwargs)`` on ``ss.hessian_operator`` with hvp_mode="auto"."""
    import sharpscope as ss

    H = ss.hessian_operator(model, loss_fn, data)
    count = _count_operator_products(H)
    res = ss.lanczos(H, k=K, **lanczos_kwargs)
    counts = {count.calls, H.num_matvecs, res.num_matvecs}
    return ToolOutput(eigenvalues=sorted(res.eigenvalues.double().tolist(), reverse=True), hvps=count.calls,
                      hvp_kind=f"sharpscope-{H.hvp_mode}", hvp_seconds=count.seconds,
                      info={"hvp_mode": H.hvp_mode, "converged": bool(res.converged.all()),
                            "restarts": res.num_restarts, "count_mismatch": len(counts) > 1,
                            "reported_num_matvecs": res.num_matvecs})


def tool_pyhessian(model, loss_fn, data, tol: float) -> ToolOutput:
    """PyHessian's deflated power iteration: ``hessian(...).eigenvalues(maxIter=100, tol, top_n=5)``."""
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)
    original = ph.hessian_vector_product
    ph.hessian_vector_product = count = Counter(original)
    try:
        torch.manual_seed(0)  # its start vectors come from the global RNG
        comp = ph.hessian(model, loss_fn, data=data, cuda=False)  # does a backward(create_graph=True)
        eigs, _ = comp.eigenvalues(maxIter=100, tol=tol, top_n=K)
    finally:
        ph.hessian_vector_product = original
    return ToolOutput(eigenvalues=sorted((float(e) for e in eigs), reverse=True), hvps=count.calls,
                      hvp_kind="retained-graph", hvp_seconds=count.seconds)


def tool_eigenthings(model, loss_fn, data, **lanczos_kwargs) -> ToolOutput:
    """hessian-eigenthings v1 ``lanczos(HessianOperator(...), k=5, **lanczos_kwargs)``."""
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [data], he.supervised_loss(loss_fn))
    op.matvec = count = Counter(op.matvec)  # instance attribute: lanczos calls operator.matvec
    res = he.lanczos(op, k=K, **lanczos_kwargs)
    return ToolOutput(eigenvalues=sorted(res.eigenvalues.double().tolist(), reverse=True), hvps=count.calls,
                      hvp_kind="raw-double-backward", hvp_seconds=count.seconds,
                      info={"converged": int(res.converged.sum()), "iterations": res.iterations})


def tool_curvlinops(model, loss_fn, data, tol: float) -> ToolOutput:
    """curvlinops ``HessianLinearOperator`` (defaults: determinism check on) + scipy ``eigsh(which="LA")``
    on ``op.to_scipy(float32)``, the start vector of the scipy-eigsh row."""
    import curvlinops
    from scipy.sparse.linalg import eigsh

    cls = curvlinops.HessianLinearOperator
    original = cls._matmat_batch
    count = Counter(original)
    columns = {"n": 0}

    def counted(self, X, y, M):
        columns["n"] += int(M[0].shape[-1])
        return count(self, X, y, M)

    cls._matmat_batch = counted
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        op = cls(model, loss_fn, params, [data])
        checked = columns["n"]  # the products of its determinism check
        v0 = np.random.default_rng(0).standard_normal(op.shape[0]).astype(np.float32)
        vals = eigsh(op.to_scipy(np.float32), k=K, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    finally:
        cls._matmat_batch = original
    return ToolOutput(eigenvalues=sorted(vals.astype(np.float64).tolist(), reverse=True), hvps=columns["n"],
                      hvp_kind="curvlinops", hvp_seconds=count.seconds,
                      info={"construction_hvps": checked})


def tool_scipy_eigsh(model, loss_fn, data, tol: float, pinned: bool = False) -> ToolOutput:
    """scipy ``eigsh(which="LA")`` (ARPACK) on sharpscope's operator via ``H.to_scipy()``; ``pinned``: inside
    ``with H.pinned():``, one solve whose products share the cached graph (without it each product of
    ``to_scipy()`` is a solve of its own and rebuilds it).

    The LinearOperator has the model's dtype, so for a float32 model ARPACK runs in single precision.
    """
    from contextlib import nullcontext

    from scipy.sparse.linalg import eigsh

    import sharpscope as ss

    H = ss.hessian_operator(model, loss_fn, data)
    count = _count_operator_products(H)
    v0 = np.random.default_rng(0).standard_normal(H.shape[0]).astype(np.float32)
    with H.pinned() if pinned else nullcontext():
        vals = eigsh(H.to_scipy(), k=K, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return ToolOutput(eigenvalues=sorted(vals.astype(np.float64).tolist(), reverse=True), hvps=count.calls,
                      hvp_kind=f"sharpscope-{H.hvp_mode}", hvp_seconds=count.seconds,
                      info={"hvp_mode": H.hvp_mode, "count_mismatch": count.calls != H.num_matvecs,
                            "reported_num_matvecs": H.num_matvecs})


@dataclass(frozen=True)
class Tool:
    name: str
    settings: str  # what is shown in the table
    run: Callable[..., ToolOutput]
    kwargs: dict


TOOLS = [
    Tool("sharpscope", "lanczos(H, k=5) defaults (tol 1e-6)", tool_sharpscope, {}),
    Tool("sharpscope-tol1e-3", "lanczos(H, k=5, tol=1e-3)", tool_sharpscope, {"tol": 1e-3}),
    Tool("sharpscope-full-reorth", "lanczos(H, k=5, reorth='full')", tool_sharpscope, {"reorth": "full"}),
    Tool("pyhessian", "defaults: maxIter=100, tol=1e-3", tool_pyhessian, {"tol": 1e-3}),
    Tool("pyhessian-tol1e-4", "maxIter=100, tol=1e-4", tool_pyhessian, {"tol": 1e-4}),
    Tool("eigenthings", "lanczos(op, k=5) defaults (max_iter=2k, LM)", tool_eigenthings, {}),
    Tool("eigenthings-LA-50", "lanczos(op, k=5, which='LA', max_iter=50)", tool_eigenthings,
         {"which": "LA", "max_iter": 50}),
    Tool("scipy-eigsh-tol1e-4", "eigsh(H.to_scipy(), LA, tol=1e-4)", tool_scipy_eigsh, {"tol": 1e-4}),
    Tool("scipy-eigsh-pinned-tol1e-4", "with H.pinned(): eigsh(H.to_scipy(), LA, tol=1e-4)", tool_scipy_eigsh,
         {"tol": 1e-4, "pinned": True}),
    Tool("curvlinops-eigsh-tol1e-4", "eigsh(HessianLinearOperator(...).to_scipy(), LA, tol=1e-4)", tool_curvlinops,
         {"tol": 1e-4}),
]
TOOL_BY_NAME = {t.name: t for t in TOOLS}


def tool_of(name: str) -> Tool:
    """The tool of a run name (``"sharpscope@REV"`` is the sharpscope tool run from revision REV)."""
    return TOOL_BY_NAME[name.split("@")[0]]


def extract_revision(rev: str) -> Path:
    """``git archive REV`` extracted under bench-output/ab-REV/ (once); the directory to import from."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    dest = OUT / f"ab-{commit}"
    if not (dest / "sharpscope" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "sharpscope"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


# =============================================================================================
# subprocess workers
# =============================================================================================
def worker_tool(name: str, path: Path) -> dict:
    """Run one tool on the saved problem in this (fresh) process; JSON-able result."""
    tool = tool_of(name)
    model, loss_fn, data = load_problem(path)
    if tool.run is tool_pyhessian:  # import outside the measured region, like every other tool
        import pyhessian.hessian  # noqa: F401
    elif tool.run is tool_eigenthings:
        import hessian_eigenthings  # noqa: F401
    elif tool.run is tool_curvlinops:
        import curvlinops  # noqa: F401
        import scipy.sparse.linalg  # noqa: F401
    else:
        import scipy.sparse.linalg  # noqa: F401

        import sharpscope  # noqa: F401
    # one untimed gradient first, for every tool alike: first-call set-up of torch's kernels and
    # thread pools then lies in the baseline, not in the tool's time and memory
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(loss_fn(model(data[0]), data[1]), params)
    del params
    baseline = status_kib("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    cold = tool.run(model, loss_fn, data, **tool.kwargs)
    cold_seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")  # memory of the first (cold) run only
    _reset_model(model)
    start = time.perf_counter()
    warm = tool.run(model, loss_fn, data, **tool.kwargs)
    seconds = time.perf_counter() - start
    _reset_model(model)
    return {"tool": name, "seconds": seconds, "cold_seconds": cold_seconds, "peak_rss_mib": peak / 1024,
            "extra_rss_mib": (peak - baseline) / 1024, "peak_reset": reset,
            "cold_equals_warm": cold.hvps == warm.hvps and cold.eigenvalues == warm.eigenvalues, **asdict(warm)}


def _reset_model(model: nn.Module) -> None:
    """Undo what a tool left on the model: PyHessian leaves graph-carrying ``.grad`` (a second
    ``backward(create_graph=True)`` would add to it and double the Hessian) and eval mode."""
    for p in model.parameters():
        p.grad = None
    model.train()


def worker_calibrate(path: Path, samples: int) -> dict:
    """Median single-HVP times: raw double backward, retained graph, gradient, sharpscope modes."""
    model, loss_fn, data = load_problem(path)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    v_split = [torch.randn(p.shape, generator=gen) for p in params]
    x, y = data
    spreads: dict[str, float] = {}

    def timed(key: str, fn: Callable[[], object]) -> None:
        out[key] = median_time(fn, samples, spreads, key)

    out: dict = {}
    timed("raw-double-backward", lambda: full_hvp(model, loss_fn, data, params, v_split))
    timed("gradient", lambda: torch.autograd.grad(loss_fn(model(x), y), params))
    hvp = retained_graph_hvp_fn(model, loss_fn, data, params)
    timed("retained-graph", lambda hvp=hvp: hvp(v_split))
    hvp = None
    try:
        import sharpscope as ss

        v = torch.cat([t.reshape(-1) for t in v_split])
        for mode in ("reverse", "forward", "cached"):
            H = ss.hessian_operator(model, loss_fn, data, hvp_mode=mode)
            with H.pinned():  # one solve: the warm-up call builds the cache, which serves the block
                timed(f"sharpscope-{mode}", lambda H=H: H.matvec(v))
            if H.hvp_mode != mode:
                out[f"sharpscope-{mode}-fell-back-to"] = H.hvp_mode
            H = None
    except Exception as err:  # noqa: BLE001 - reported, the peers are still measured
        out["sharpscope_error"] = f"{type(err).__name__}: {err}"
    try:  # one curvlinops HVP (its operator's product on one vector), the unit of its overhead
        import curvlinops

        op = curvlinops.HessianLinearOperator(model, loss_fn, params, [data], check_deterministic=False)
        v = torch.cat([t.reshape(-1) for t in v_split])
        timed("curvlinops", lambda op=op: op @ v)
    except ImportError:
        pass
    except Exception as err:  # noqa: BLE001 - reported, the others are still measured
        out["curvlinops_error"] = f"{type(err).__name__}: {err}"
    out["spreads"] = spreads
    return out


def run_worker(args: list[str]) -> dict:
    """Run ``args`` as ``python bench_eigs.py --worker ...`` in a fresh process; its JSON or an error."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# =============================================================================================
# reference
# =============================================================================================
def reference(problem: dict, path: Path, log: Callable[[str], None]) -> dict:
    """Top-K of the float64 problem by eigsh(LA, tol=1e-10) on a float64 autograd HVP; cached."""
    spec = problem["spec"]
    cache = OUT / f"reference-{spec['name']}{'-quick' if spec['quick'] else ''}-{problem['key']}.json"
    if cache.exists():
        return {**json.loads(cache.read_text()), "cached": True}
    from scipy.sparse.linalg import LinearOperator, eigsh

    log(f"computing the float64 reference for {spec['name']} (cached afterwards in {cache.name}) ...")
    model, loss_fn, data = load_problem(path, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    hvp = retained_graph_hvp_fn(model, loss_fn, data, params)
    count = {"n": 0}

    def matvec(v: np.ndarray) -> np.ndarray:
        count["n"] += 1
        flat = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        parts = [t.view_as(p) for t, p in zip(torch.split(flat, sizes), params)]
        return torch.cat([h.reshape(-1) for h in hvp(parts)]).numpy()

    op = LinearOperator((n, n), matvec=matvec, rmatvec=matvec, dtype=np.float64)
    start = time.perf_counter()
    vals, vecs = eigsh(op, k=K, which="LA", tol=REFERENCE_TOL, v0=np.random.default_rng(1).standard_normal(n))
    seconds = time.perf_counter() - start
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    residuals = [float(np.linalg.norm(matvec(vecs[:, i]) - vals[i] * vecs[:, i]) / abs(vals[i]))
                 for i in range(K)]
    ref = {"eigenvalues": vals.tolist(), "relative_residuals": residuals, "hvps": count["n"] - K,
           "seconds": seconds, "num_params": n, "key": problem["key"], "spec": spec}
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(ref, indent=1))
    os.replace(tmp, cache)
    return {**ref, "cached": False}


# =============================================================================================
# report
# =============================================================================================
@dataclass
class Row:
    tool: str
    settings: str
    hvps: int | None = None
    seconds: float | None = None  # warm run (second in its process), median over repeats
    cold_seconds: float | None = None  # first run in a fresh process, median over repeats
    hvp_units: float | None = None  # seconds / raw double-backward HVP
    overhead: float | None = None  # seconds / (hvps x single-HVP time of the tool's own HVP kind)
    overhead_basis: str = ""
    outside_seconds: float | None = None  # warm time not spent inside the counted HVP calls
    peak_mib: float | None = None
    extra_mib: float | None = None
    error: float | None = None  # max relative error of the top-K against the reference
    hvp_ratio: float | None = None  # vs BASELINE
    time_ratio: float | None = None
    eigenvalues: list[float] = field(default_factory=list)
    note: str = ""


def make_rows(runs: dict[str, list[dict]], calib: dict, ref: dict) -> list[Row]:
    ref_vals = np.array(ref["eigenvalues"])
    raw = calib.get("raw-double-backward")
    rows = []
    for name, results in runs.items():
        tool = tool_of(name)
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows.append(Row(name, tool.settings, note=f"failed: {results[0]['error']}"))
            continue
        first = ok[0]
        seconds = statistics.median(r["seconds"] for r in ok)
        cold_seconds = statistics.median(r["cold_seconds"] for r in ok)
        hvps = first["hvps"]
        vals = np.array(first["eigenvalues"])
        error = float(np.max(np.abs(vals - ref_vals) / np.abs(ref_vals))) if len(vals) == K else None
        notes = []
        if any(r["hvps"] != hvps or r["eigenvalues"] != first["eigenvalues"] or not r["cold_equals_warm"]
               for r in ok):
            notes.append("NOT deterministic (cold vs warm run or across repeats)")
        info = first.get("info", {})
        if info.get("count_mismatch"):
            notes.append(f"HVP count mismatch (tool reports {info.get('reported_num_matvecs')})")
        if "converged" in info and info["converged"] is not True:
            notes.append(f"converged: {info['converged']}")
        if not all(r["peak_reset"] for r in ok):
            notes.append("peak RSS includes set-up (VmHWM not resettable)")
        if "hvp_mode" in info:
            notes.append(f"mode {info['hvp_mode']}")
        if info.get("construction_hvps"):
            notes.append(f"{info['construction_hvps']} HVPs in its determinism check")
        unit = calib.get(first["hvp_kind"])
        settings = tool.settings + (f" [{name.split('@')[1]}]" if "@" in name else "")
        rows.append(Row(name, settings, hvps=hvps, seconds=seconds, cold_seconds=cold_seconds,
                        hvp_units=seconds / raw if raw else None,
                        overhead=seconds / (hvps * unit) if unit and hvps else None,
                        overhead_basis=first["hvp_kind"],
                        outside_seconds=statistics.median(r["seconds"] - r["hvp_seconds"] for r in ok),
                        peak_mib=max(r["peak_rss_mib"] for r in ok),
                        extra_mib=max(r["extra_rss_mib"] for r in ok), error=error,
                        eigenvalues=first["eigenvalues"], note="; ".join(notes)))
    base = next((r for r in rows if r.tool == BASELINE and r.hvps), None)
    for row in rows:
        if base and row.hvps is not None:
            row.hvp_ratio = row.hvps / base.hvps
            row.time_ratio = row.seconds / base.seconds
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


COLUMNS = ["tool", "settings", "#HVPs", "time s", "cold s", "time/raw HVP", "overhead", "outside HVPs s", "peak RSS MiB", "+RSS MiB",
           "max rel err", f"HVPs/{BASELINE}", f"time/{BASELINE}", "notes"]


def row_cells(row: Row) -> list[str]:
    return [row.tool, row.settings, _fmt(row.hvps, "d"), _fmt(row.seconds, ".2f"),
            _fmt(row.cold_seconds, ".2f"), _fmt(row.hvp_units, ".1f"),
            _fmt(row.overhead, ".2f"), _fmt(row.outside_seconds, ".2f"), _fmt(row.peak_mib, ".0f"), _fmt(row.extra_mib, ".0f"),
            _fmt(row.error, ".1e"), _fmt(row.hvp_ratio, ".3f"), _fmt(row.time_ratio, ".3f"), row.note]


def text_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 or i == len(COLUMNS) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def details(rows: list[Row], calib: dict, ref: dict) -> list[str]:
    """Lines under a table: reference, HVP timings, mode choice, targets, eigenvalues per tool."""
    ms = {k: v * 1e3 for k, v in calib.items() if isinstance(v, float)}
    out = [f"reference: eigsh(LA, tol={REFERENCE_TOL:g}) float64, {ref['num_params']:,} parameters, "
           f"{ref['hvps']} HVPs, {ref['seconds']:.1f} s{' (cached)' if ref.get('cached') else ''}; "
           f"top-{K} {np.round(ref['eigenvalues'], 6).tolist()}; "
           f"max relative Ritz residual {max(ref['relative_residuals']):.1e}",
           "single HVP, median of the calibration samples (ms): "
           + ", ".join(f"{k} {v:.1f}" for k, v in ms.items())]
    noisy = {k: v for k, v in calib.get("spreads", {}).items() if v > 1.25}
    if "sharpscope-reverse" in calib and not 0.8 <= calib["sharpscope-reverse"] / calib["raw-double-backward"] <= 1.25:
        noisy["sharpscope-reverse / raw-double-backward (same computation)"] = (
            calib["sharpscope-reverse"] / calib["raw-double-backward"])
    if noisy:
        out.append("WARNING: timings look noisy (machine busy?): "
                   + ", ".join(f"{k} {v:.2f}" for k, v in noisy.items()) + " (q3/q1 of the samples or ratio)")
    if "sharpscope_error" in calib:
        out.append(f"sharpscope modes not timed: {calib['sharpscope_error']}")
    if "curvlinops_error" in calib:
        out.append(f"curvlinops HVP not timed: {calib['curvlinops_error']}")
    modes = {m: calib[f"sharpscope-{m}"] for m in ("reverse", "forward", "cached") if f"sharpscope-{m}" in calib}
    ss_row = next((r for r in rows if r.tool == "sharpscope" and r.hvps), None)
    if modes and ss_row:
        chosen = ss_row.overhead_basis.removeprefix("sharpscope-")
        fastest = min(modes, key=modes.get)
        ratio = modes[chosen] / modes[fastest]
        out.append(f"sharpscope hvp_mode='auto' chose '{chosen}': {ratio:.2f} x the fastest mode '{fastest}' "
                   f"({'within' if ratio <= 1.1 else 'NOT within'} 1.1x); forward/reverse = "
                   f"{modes['forward'] / modes['reverse']:.2f}")
        checks = [("error <= 1e-3", ss_row.error is not None and ss_row.error <= 1e-3),
                  ("#HVPs <= 1/5 of baseline", ss_row.hvp_ratio is not None and ss_row.hvp_ratio <= 0.2),
                  ("time <= 1/4 of baseline", ss_row.time_ratio is not None and ss_row.time_ratio <= 0.25),
                  ("engine overhead <= 1.15", ss_row.overhead is not None and ss_row.overhead <= 1.15),
                  ("mode within 1.1x of fastest", ratio <= 1.1)]
        out.append(f"issue-2 targets for `sharpscope` (defaults) vs {BASELINE}: "
                   + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks))
    out.append("eigenvalues found:")
    out += [f"  {r.tool}: {np.round(r.eigenvalues, 6).tolist()}" for r in rows if r.eigenvalues]
    return out


def ab_lines(rows: list[Row]) -> list[str]:
    """A/B ratios of the tools run both from the working tree and from ``--ab REV``."""
    by_name = {r.tool: r for r in rows}
    out = []
    for row in rows:
        if "@" not in row.tool or row.tool.split("@")[0] not in by_name:
            continue
        new, old = by_name[row.tool.split("@")[0]], row
        if not (new.hvps and old.hvps):
            continue
        def inside(r: Row) -> float:  # the run's own overhead: time over the time inside its products
            return r.seconds / (r.seconds - r.outside_seconds) if r.outside_seconds is not None else float("nan")

        out.append(f"A/B {new.tool} (working tree) vs {old.tool}: HVPs {old.hvps} -> {new.hvps}; time "
                   f"{old.seconds:.3f} -> {new.seconds:.3f} s (ratio {new.seconds / old.seconds:.3f}); overhead "
                   f"{_fmt(old.overhead, '.3f')} -> {_fmt(new.overhead, '.3f')}; time outside the products "
                   f"{_fmt(old.outside_seconds, '.3f')} -> {_fmt(new.outside_seconds, '.3f')} s; time / time inside "
                   f"the products {inside(old):.3f} -> {inside(new):.3f}; max rel err "
                   f"{_fmt(old.error, '.1e')} -> {_fmt(new.error, '.1e')}")
    return out


def ab_paired(runs: dict[str, list[dict]]) -> list[str]:
    """The spread of the A/B: per repeat round, the working tree's warm time over REV's (run i against run i)."""
    out = []
    for name, base in runs.items():
        if "@" not in name or name.split("@")[0] not in runs:
            continue
        pairs = [c["seconds"] / b["seconds"] for b, c in zip(base, runs[name.split("@")[0]])
                 if "error" not in b and "error" not in c and b["seconds"]]
        if pairs:
            out.append(f"A/B {name.split('@')[0]} paired warm-time ratios over {len(pairs)} rounds: median "
                       f"{statistics.median(pairs):.3f} [{min(pairs):.3f}, {max(pairs):.3f}]")
    return out


LEGEND = [
    "time: wall seconds of object construction + eigensolve, warm: the second of two identical runs in",
    "  one fresh process per tool (median over repeats); cold s: the first run, paying one-time set-up",
    "  (lazy imports, first-call kernel set-up); all ratios and overheads use the warm time;",
    "  time/raw HVP: in units of one full double-backward HVP (forward + grad(create_graph) + grad);",
    "  overhead: time / (#HVPs x median single-HVP time of the tool's own kind of HVP: sharpscope and scipy",
    "  -> the mode sharpscope used, PyHessian -> retained-graph HVP, eigenthings -> raw double backward,",
    "  curvlinops -> its own operator's product);",
    "  outside HVPs s: warm time not spent inside the counted HVP calls (solver, set-up; the first",
    "  product of a cached-graph operator builds the graph and counts as inside);",
    "  peak RSS: VmHWM of the tool's process during the cold run (reset after loading the problem and",
    "  one warm-up gradient); +RSS: that peak - the RSS before the tool ran;",
    "  max rel err: max_i |lambda_i - ref_i| / |ref_i| over the top-5 sorted descending.",
]


def header(argv: list[str], threads: int) -> str:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "\n".join([
        f"command: {' '.join(['python', *argv])}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; host CPU: {cpu}, {os.cpu_count()} cores; "
        f"torch {torch.__version__} with {threads} threads; python {platform.python_version()}; "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"numpy {np.__version__}, scipy {version('scipy')}, sharpscope {version('sharpscope')}, "
        f"PyHessian {version('pyhessian')}, hessian-eigenthings {version('hessian-eigenthings')}, "
        f"curvlinops {version('curvlinops-for-pytorch')}",
    ])


# =============================================================================================
# main
# =============================================================================================
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=["mlp", "cnn", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="small problems (hidden 128 / batch 64), a smoke run")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool (fresh process each); median time")
    parser.add_argument("--hvp-samples", type=int, default=7, help="timed single HVPs per calibration median")
    parser.add_argument("--tools", default=",".join(t.name for t in TOOLS),
                        help="comma-separated subset of: " + ", ".join(t.name for t in TOOLS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process (default: torch's)")
    parser.add_argument("--reference-only", action="store_true",
                        help="only compute (or show) the cached float64 reference of each problem")
    parser.add_argument("--ab", metavar="REV", help="also run the sharpscope tools from git revision REV, "
                        "interleaved, and print the A/B ratios (see the module docstring)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: "calibrate" or a tool name
    parser.add_argument("--problem-file", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)  # internal: where a worker imports sharpscope from
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        sys.path.insert(0, args.src or str(ROOT))
        path = Path(args.problem_file)
        result = worker_calibrate(path, args.hvp_samples) if args.worker == "calibrate" else worker_tool(args.worker, path)
        print(json.dumps(result))
        return

    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOL_BY_NAME]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; choose from {list(TOOL_BY_NAME)}")
    if args.repeats < 1 or args.hvp_samples < 1:
        parser.error("--repeats and --hvp-samples must be >= 1")
    OUT.mkdir(exist_ok=True)
    passthrough = ["--threads", str(args.threads)] if args.threads else []
    sources = {t: ["--src", str(ROOT)] for t in tools}
    if args.ab:
        base = extract_revision(args.ab)
        rev = base.name.removeprefix("ab-")
        for t in [t for t in tools if tool_of(t).run in (tool_sharpscope, tool_scipy_eigsh)]:
            sources[f"{t}@{rev}"] = ["--src", str(base)]
        tools = list(sources)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    top = header(sys.argv, torch.get_num_threads())
    print(top + "\n")
    sections = [top.replace("\n", "  \n")]
    for name in ["mlp", "cnn"] if args.problem == "all" else [args.problem]:
        problem = make_problem(problem_spec(name, args.quick))
        path = save_problem(problem)
        ref = reference(problem, path, log)
        if args.reference_only:
            print("\n".join(details([], {}, ref)[:1]))
            continue
        log(f"[{name}] calibrating single-HVP times ...")
        calib = run_worker(["--worker", "calibrate", "--problem-file", str(path),
                            "--hvp-samples", str(args.hvp_samples), *passthrough])
        if "error" in calib:
            raise SystemExit(f"calibration failed: {calib['error']}")
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for rep in range(args.repeats):  # round-robin, so slow drifts of the machine hit every tool alike
            for t in tools:
                log(f"[{name}] repeat {rep + 1}/{args.repeats}: {t} ...")
                runs[t].append(run_worker(["--worker", t, "--problem-file", str(path), *sources[t], *passthrough]))
        rows = make_rows(runs, calib, ref)
        spec = problem["spec"]
        title = (f"problem {name}{' (quick)' if args.quick else ''}: {spec}, {problem['num_params']:,} parameters, "
                 f"top-{K} eigenvalues (LA), median of {args.repeats} run(s)")
        extra = details(rows, calib, ref) + ab_lines(rows) + ab_paired(runs)
        print(title + "\n" + text_table(rows) + "\n" + "\n".join(extra + LEGEND) + "\n", flush=True)
        sections.append(f"### {title}\n\n{markdown_table(rows)}\n\n" + "\n".join(f"- {ln}" for ln in extra if
                                                                               not ln.startswith("  "))
                        + "\n\n```\n" + "\n".join(ln.strip() for ln in extra if ln.startswith("  ")) + "\n```\n\n"
                        + "\n".join(LEGEND))
    if args.reference_only:
        return
    md = OUT / "bench_eigs.md"
    md.write_text("\n\n".join(sections) + "\n")
    print(f"markdown written to {md.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
