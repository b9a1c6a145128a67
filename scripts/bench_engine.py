#!/usr/bin/env python
"""The GPU-ready engine's targets (issue 13) measured on one device, as a markdown table.

For each model (MLP 3072-512-512-10, batch 512, 1.84M parameters; MLP 3072-2048-2048-2048-10, batch 2048,
14.7M; a ResNet-18-like CNN with GroupNorm, 3x32x32, batch 256 -- the one of scripts/bench_gpu.py), after
5 SGD steps from seed 0, on the Hessian operator with the defaults (hvp_mode="auto": the cached graph):

* engine overhead of ``ss.lanczos(H, k=5)`` = its time / (#HVPs x the steady-state time of one
  product), the solve run on an operator that has solved once (its mode settled; each solve builds its
  cached graph at its first product), the median of ``--repeats``; one product's time is the median of 20
  (after warm-up);
* host reads per Lanczos step: every way a tensor's value reaches the host (``tolist``, ``item``,
  ``float()``, ...) counted between consecutive products, the maximum over the steps that needed no
  reorthogonalization; on CUDA also the synchronizations torch's sync debug mode reports;

and on the 1.84M MLP:

* Hutch++ with 99 products and SLQ with 10 probes x 80 steps on an operator with ``batched=True``
  against ``batched=False`` (one product at a time), as a speed-up;
* block Lanczos, ``block_size=4``, top-5 against single-vector Lanczos, time ratio, in the same run
  (an operator with the default ``batched=None`` whose product path was measured on a 16-column block
  first: blocks of 4 are too narrow to measure on);
* ``matmat`` time per vector at 1, 4 and 16 columns, batched and one at a time (for the record).

Every target row shows the target, the value measured on this device and PASS/FAIL -- or "not measured"
when the run is not the one the target is for (the GPU targets need ``--device cuda`` at full size).

Usage:  python scripts/bench_engine.py --device cuda --markdown OUT/engine.md
        python scripts/bench_engine.py --device cpu --small         (a smoke run: tiny models, seconds)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import sharpscope as ss  # noqa: E402

CE = nn.CrossEntropyLoss()
K = 5


# =============================================================================================
# models (the ResNet-18-like CNN is scripts/bench_gpu.py's, with a width for the smoke run)
# =============================================================================================
def resnet18_like(width: int = 64, groups: int = 8) -> nn.Module:
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU())

    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.GroupNorm(groups, width), nn.ReLU()]
    cin = width
    for mult, stride in ((1, 1), (1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 1)):
        layers.append(block(cin, width * mult, stride))
        cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def mlp(dims: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@dataclass(frozen=True)
class Problem:
    name: str
    label: str
    build: object
    input_shape: tuple
    batch: int


def problems(small: bool) -> dict[str, Problem]:
    if small:
        return {"mlp-1.84M": Problem("mlp-1.84M", "MLP 64-32-32-10 (small stand-in for 3072-512-512-10)",
                                     lambda: mlp([64, 32, 32, 10]), (64,), 32),
                "mlp-14.7M": Problem("mlp-14.7M", "MLP 64-32-32-32-10 (small stand-in for 3072-2048x3-10)",
                                     lambda: mlp([64, 32, 32, 32, 10]), (64,), 48),
                "resnet18": Problem("resnet18", "ResNet-18-like, width 2, 3x8x8 (small stand-in)",
                                    lambda: resnet18_like(2, 2), (3, 8, 8), 4)}
    return {"mlp-1.84M": Problem("mlp-1.84M", "MLP 3072-512-512-10, batch 512", lambda: mlp([3072, 512, 512, 10]),
                                 (3072,), 512),
            "mlp-14.7M": Problem("mlp-14.7M", "MLP 3072-2048-2048-2048-10, batch 2048",
                                 lambda: mlp([3072, 2048, 2048, 2048, 10]), (3072,), 2048),
            "resnet18": Problem("resnet18", "ResNet-18-like CNN (GroupNorm), 3x32x32, batch 256",
                                lambda: resnet18_like(), (3, 32, 32), 256)}


def make(problem: Problem, device: torch.device):
    """Model after 5 SGD steps (lr 0.1) on one random batch from seed 0, and that batch, on ``device``."""
    torch.manual_seed(0)
    model = problem.build().to(device)
    x = torch.randn(problem.batch, *problem.input_shape, device=device)
    y = torch.randint(0, 10, (problem.batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        CE(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, (x, y)


# =============================================================================================
# timing
# =============================================================================================
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int):
    """Median wall time of ``fn()`` over ``repeats`` calls (synchronized), and the last result."""
    times, out = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def product_time(H, device: torch.device, samples: int = 20) -> float:
    v = torch.randn(H.shape[0], device=device, generator=None)
    with H.pinned():  # one solve: the steady-state product (a cached graph is built once per solve)
        H.matvec(v)
        return timed(lambda: H.matvec(v), device, samples)[0]


_READS = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__")


def reads_per_step(H) -> tuple[int, float | None]:
    """Host reads between consecutive products of one ``lanczos(H, k=5)``: the maximum over the steps
    without a reorthogonalization; and, on CUDA, synchronizations per product (sync debug mode)."""
    from sharpscope.lanczos.backends.base import KrylovBasis
    from sharpscope.lanczos.backends.torch_basis import TorchBasis

    events: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _READS}
    orthogonalize, reorthogonalize, product = KrylovBasis.orthogonalize, TorchBasis.reorthogonalize, H._matvec
    for name, original in saved.items():
        def counted(self, *args, _original=original, **kwargs):
            events.append("read")
            return _original(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)
    KrylovBasis.orthogonalize = lambda self, *a, **kw: (events.append("reorth"), orthogonalize(self, *a, **kw))[1]
    TorchBasis.reorthogonalize = lambda self, *a, **kw: (events.append("reorth"), reorthogonalize(self, *a, **kw))[1]
    H._matvec = lambda v: (events.append("product"), product(v))[1]
    try:
        res = ss.lanczos(H, k=K)
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        KrylovBasis.orthogonalize, TorchBasis.reorthogonalize = orthogonalize, reorthogonalize
        del H._matvec
    # the first product of a solve carries the solve's set-up (the determinism check, the cached graph, built
    # once per solve): its reads are per solve, not per step
    steps = " ".join(events).split("product")[2:]
    plain = [s.split().count("read") for s in steps if "reorth" not in s]
    syncs = None
    if H.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                res = ss.lanczos(H, k=K)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught) / res.num_matvecs
    return max(plain) if plain else -1, syncs


# =============================================================================================
# measurements
# =============================================================================================
@dataclass
class Lanczos:
    model: str
    params: int
    hvps: int
    seconds: float
    product_ms: float
    overhead: float
    reorths: int
    reads: int
    syncs: float | None
    top: list = field(default_factory=list)


def measure_lanczos(problem: Problem, device: torch.device, repeats: int) -> Lanczos:
    model, data = make(problem, device)
    H = ss.hessian_operator(model, CE, data)
    ss.lanczos(H, k=K)  # settles hvp_mode (and the first-product derivative check)
    seconds, res = timed(lambda: ss.lanczos(H, k=K), device, repeats)
    hvp = product_time(H, device)
    reads, syncs = reads_per_step(H)
    return Lanczos(problem.label, H.shape[0], res.num_matvecs, seconds, hvp * 1e3,
                   seconds / (res.num_matvecs * hvp), res.num_reorthogonalizations, reads, syncs,
                   [round(x, 6) for x in res.eigenvalues.tolist()])


def measure_batching(problem: Problem, device: torch.device, repeats: int, small: bool) -> dict:
    model, data = make(problem, device)
    ops = {b: ss.hessian_operator(model, CE, data, batched=b) for b in (True, False)}
    out: dict = {"per_vector_ms": {}}
    for b, H in ops.items():
        H.matmat(torch.randn(H.shape[0], 4, device=device))  # cached graph, modes settled
        for width in (1, 4, 16):
            V = torch.randn(H.shape[0], width, device=device)
            out["per_vector_ms"][(b, width)] = timed(lambda H=H, V=V: H.matmat(V), device, max(repeats, 3))[0] / width * 1e3
    probes, steps = (3, 8) if small else (10, 80)
    out["slq_shape"] = (probes, steps)
    for b, H in ops.items():
        out[("hutchpp", b)] = timed(lambda H=H: ss.hutchpp_trace(H, 99), device, repeats)[0]
        out[("slq", b)] = timed(lambda H=H: ss.spectral_density(H, probes, steps), device, repeats)[0]
    H = ss.hessian_operator(model, CE, data)
    H.matmat(torch.randn(H.shape[0], 16, device=device))  # batched=None measures on this 16-column block
    single = timed(lambda: ss.lanczos(H, k=K), device, 1)[1]  # warm-up
    ss.lanczos(H, k=K, block_size=4)
    out["single"] = timed(lambda: ss.lanczos(H, k=K), device, repeats)
    out["block"] = timed(lambda: ss.lanczos(H, k=K, block_size=4), device, repeats)
    out["block_choice"] = H.matmat_choice
    out["agree"] = float(((out["block"][1].eigenvalues - single.eigenvalues).abs()
                          / single.eigenvalues.abs().max()).max())
    return out


# =============================================================================================
# report
# =============================================================================================
def status(value: float, target: float, at_most: bool, applies: bool) -> str:
    if not applies:
        return "not measured (target is for one GPU at full size)"
    return "PASS" if (value <= target if at_most else value >= target) else "FAIL"


def target_rows(runs: dict[str, Lanczos], batching: dict, gpu_run: bool) -> list[list[str]]:
    rows = []
    for key, target in (("mlp-14.7M", 1.10), ("mlp-1.84M", 1.25), ("resnet18", 1.05)):
        r = runs[key]
        rows.append([f"engine overhead, lanczos k=5, {r.model}", f"<= {target:.2f}", f"{r.overhead:.3f}",
                     status(r.overhead, target, True, gpu_run)])
    reads = max(r.reads for r in runs.values())
    rows.append(["host reads per Lanczos step without reorthogonalization (max, all models)", "<= 1",
                 str(reads), "PASS" if 0 <= reads <= 1 else "FAIL"])
    syncs = [r.syncs for r in runs.values() if r.syncs is not None]
    rows.append(["CUDA synchronizations per product (sync debug mode, max over models)", "~1",
                 f"{max(syncs):.2f}" if syncs else "-", "measured" if syncs else "not measured (needs CUDA)"])
    probes, steps = batching["slq_shape"]
    for name, key, target in (("Hutch++ (99 products)", "hutchpp", 3.0),
                              (f"SLQ ({probes} probes x {steps} steps)", "slq", 2.0)):
        speed = batching[(key, False)] / batching[(key, True)]
        rows.append([f"{name} batched speed-up over one product at a time, 1.84M MLP", f">= {target:.0f}x",
                     f"{speed:.2f}x", status(speed, target, False, gpu_run)])
    ratio = batching["block"][0] / batching["single"][0]
    rows.append(["block Lanczos (block_size=4) top-5 time / single-vector time, 1.84M MLP", "<= 0.60",
                 f"{ratio:.2f}", status(ratio, 0.6, True, gpu_run)])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def report(args, device: torch.device, runs: dict[str, Lanczos], batching: dict) -> str:
    gpu_run = device.type == "cuda" and not args.small
    sizes = "small stand-ins (--small): the GPU targets are not measured by this run" if args.small else "full"
    slq = f"SLQ {batching['slq_shape']}: batched {batching[('slq', True)]:.3f} s"
    lines = ["# sharpscope engine benchmark (issue 13)", "",
             f"- device: {describe(device)}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; sharpscope {ss.__version__}; python "
             f"{platform.python_version()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"- command: python {' '.join(sys.argv)}",
             f"- sizes: {sizes}",
             "", "## Targets", "",
             table(["target", "threshold", "measured here", "status"], target_rows(runs, batching, gpu_run)),
             "", "## Lanczos, top-5 (warm operator: cached graph), median of "
             f"{args.repeats}", "",
             table(["model", "parameters", "#HVPs", "time s", "one product ms", "overhead", "reorthogonalizations",
                    "top-5"],
                   [[r.model, f"{r.params:,}", str(r.hvps), f"{r.seconds:.3f}", f"{r.product_ms:.2f}",
                     f"{r.overhead:.3f}", str(r.reorths), str(r.top)] for r in runs.values()]),
             "", f"## Products of a block, {problems(args.small)['mlp-1.84M'].label} (ms per vector)", "",
             table(["columns", "batched=True", "batched=False"],
                   [[str(w), f"{batching['per_vector_ms'][(True, w)]:.3f}",
                     f"{batching['per_vector_ms'][(False, w)]:.3f}"] for w in (1, 4, 16)]),
             "", f"Hutch++ 99 products: batched {batching[('hutchpp', True)]:.3f} s, one at a time "
             f"{batching[('hutchpp', False)]:.3f} s; {slq}, "
             f"one at a time {batching[('slq', False)]:.3f} s; single-vector Lanczos "
             f"{batching['single'][0]:.3f} s ({batching['single'][1].num_matvecs} HVPs), block_size=4 "
             f"{batching['block'][0]:.3f} s ({batching['block'][1].num_matvecs} HVPs, matmat choice "
             f"{batching['block_choice']}, eigenvalues agree to {batching['agree']:.1e} relative).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny stand-in models (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median "
                        "(default 3; 1 with --small)")
    parser.add_argument("--markdown", type=Path, help="also write the report there")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.small else 3
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    todo = problems(args.small)
    runs = {}
    for key, problem in todo.items():
        print(f"[bench_engine] lanczos on {problem.label} ...", file=sys.stderr, flush=True)
        runs[key] = measure_lanczos(problem, device, args.repeats)
    print("[bench_engine] batched products on the 1.84M MLP ...", file=sys.stderr, flush=True)
    batching = measure_batching(todo["mlp-1.84M"], device, args.repeats, args.small)
    text = report(args, device, runs, batching)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return text


if __name__ == "__main__":
    main()
