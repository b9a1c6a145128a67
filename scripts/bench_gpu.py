"""Check and time sharpscope's CUDA kernels and the end-to-end Lanczos on a GPU.

Sections (each runs even when an earlier one failed; the exit status is 1 if any failed):

1. checks: every kernel against its NumPy reference on fresh random inputs each repeat, outputs
   poisoned first; scale_store bit for bit on the special values (selfcheck.check_scale_store).
2. copy: the device's device-to-device copy bandwidth (CuPy copy of 1 GiB, read + write).
3. kernels: the fused orthogonalization pass (update_project: w -= Q^T h, then Q w and ||w||^2) on a
   60 x 11.2M basis, float32 and bfloat16, against torch doing the same work in two passes over Q
   (Q @ w, w -= Q^T h, ||w||^2, what the torch backend runs); bandwidth against the copy's.
4. end to end: lanczos(H, k=5) with backend torch and cupy, basis device and device-bf16, on the
   14.7M-parameter MLP 3072-2048-2048-2048-10 (batch 2048) and a ResNet-18-like CNN (11.0M, 3x32x32,
   batch 256), all in this run; engine overhead = (total - #HVPs x HVP time) / (#HVPs x HVP time).
5. verdict: the targets of docs/perf-gpu.md (fused pass >= 70% of copy; cupy >= 10% faster than torch
   end to end on one of the two models) and what backend="auto" should do on this device.

``--markdown PATH`` writes the tables (device and date included) for docs/perf-gpu.md (see
scripts/gpu_check.sh and scripts/update_perf_gpu.py). ``--dry-run`` needs no GPU: it builds the
inputs with NumPy, checks the NumPy references through the same code and writes the same tables with
every GPU figure "not measured" (CPU tests run it).

    python scripts/bench_gpu.py [--rows 60] [--n 11200000] [--repeats 20] [--markdown PATH] [--dry-run]
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NOT_MEASURED = "not measured"
MODELS = ("mlp-14.7M", "resnet18-like")
CONFIGS = (("torch", "device"), ("torch", "device-bf16"), ("cupy", "device"), ("cupy", "device-bf16"))
TARGET_COPY_FRACTION = 0.70  # fused pass, float32 basis
TARGET_SPEEDUP = 1.10  # cupy against torch end to end (torch time / cupy time), basis="device"


# -- inputs (NumPy or CuPy) ----------------------------------------------------------------------

def random_basis(xp, rows: int, n: int, storage: str = "float32", seed: int = 0):
    """A random ``(rows, n)`` basis with rows of norm ~1, float32 (or its bfloat16 bits), in ``xp``.

    Under NumPy 2 / CuPy 14 (NEP 50) a float32 array divided by a NumPy float64 scalar such as
    ``np.sqrt(n)`` is float64, which the kernels refuse: the scale is applied as a float32 and the
    result cast explicitly."""
    from sharpscope.lanczos.backends.bf16 import float32_to_bf16_bits

    Q = _standard_normal(xp, (rows, n), seed) * xp.float32(1.0 / np.sqrt(n))
    Q = Q.astype(xp.float32, copy=False)
    return float32_to_bf16_bits(Q, xp=xp) if storage in ("bf16", "bfloat16") else Q


def random_vector(xp, n: int, seed: int = 1):
    return _standard_normal(xp, (n,), seed).astype(xp.float32, copy=False)


def _standard_normal(xp, shape, seed):
    if xp is np:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    xp.random.seed(seed)
    return xp.random.standard_normal(shape, dtype=xp.float32)


# -- results and their tables ---------------------------------------------------------------------

def empty_results() -> dict:
    """Every figure of the tables, ``None`` until measured."""
    return {
        "device": None, "date": time.strftime("%Y-%m-%d"), "versions": None, "errors": {},
        "checks": {"references": None, "special values": None},
        "copy_bw": None, "rows": None, "n": None,
        "kernels": {key: None for key in ("cupy-f32", "cupy-bf16", "torch-f32")},
        "hvp_ms": {model: None for model in MODELS},
        "params": {model: None for model in MODELS},
        "e2e": {(model, backend, basis): None for model in MODELS for backend, basis in CONFIGS},
    }


def _fmt(value, spec: str, suffix: str = "") -> str:
    return NOT_MEASURED if value is None else f"{value:{spec}}{suffix}"


def _speedup(results: dict, model: str, basis: str = "device"):
    torch_run, cupy_run = results["e2e"][(model, "torch", basis)], results["e2e"][(model, "cupy", basis)]
    if torch_run is None or cupy_run is None:
        return None
    return torch_run["time"] / cupy_run["time"]


def _fraction(results: dict, key: str):
    run, bw = results["kernels"][key], results["copy_bw"]
    return None if run is None or bw is None else run["bytes"] / run["time"] / bw


def verdict(results: dict) -> dict:
    """The targets: ``{"copy": bool|None, "speedup": bool|None, "auto_cupy": bool|None}``."""
    fraction = _fraction(results, "cupy-f32")
    speedups = [s for s in (_speedup(results, model) for model in MODELS) if s is not None]
    copy_ok = None if fraction is None else fraction >= TARGET_COPY_FRACTION
    speed_ok = None if not speedups else max(speedups) >= TARGET_SPEEDUP
    auto = None if copy_ok is None or speed_ok is None else (copy_ok and speed_ok)
    return {"copy": copy_ok, "speedup": speed_ok, "auto_cupy": auto}


def _yes_no(flag) -> str:
    return NOT_MEASURED if flag is None else ("yes" if flag else "no")


def render_markdown(results: dict) -> str:
    """The tables of docs/perf-gpu.md for one run; every figure not measured reads "not measured"."""
    r = results
    lines = [f"Device: {r['device'] or 'none'}; date: {r['date']}; "
             f"{r['versions'] or 'versions: ' + NOT_MEASURED}.", ""]
    if r["errors"]:
        lines += ["Sections that failed: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()) + ".", ""]
    lines += ["| check | result |", "|---|---|"]
    for name, label in (("references", "every kernel against its NumPy reference (fresh random inputs, "
                                        "poisoned outputs)"),
                        ("special values", "scale_store bit for bit on the special values, every scale")):
        value = r["checks"][name]
        lines.append(f"| {label} | {NOT_MEASURED if value is None else value} |")
    rows, n = r["rows"], r["n"]
    shape = f"{rows} x {n / 1e6:.1f}M" if rows and n else "60 x 11.2M"
    lines += ["", "| step | time | bandwidth | of copy |", "|---|---|---|---|",
              f"| device-to-device copy, 1 GiB | {_fmt(r['copy_bw'] and 2 * 2 ** 30 / r['copy_bw'] * 1e3, '.3f', ' ms')} "
              f"| {_fmt(r['copy_bw'] and r['copy_bw'] / 1e9, '.0f', ' GB/s')} "
              f"| {'100%' if r['copy_bw'] else NOT_MEASURED} |"]
    for key, label in (("cupy-f32", f"cupy fused update_project, float32 basis {shape}"),
                       ("cupy-bf16", f"cupy fused update_project, bfloat16 basis {shape}"),
                       ("torch-f32", f"torch, same work (Q @ w, w -= Q^T h, ‖w‖²: 2 passes), float32 {shape}")):
        run = r["kernels"][key]
        t = None if run is None else run["time"] * 1e3
        bw = None if run is None else run["bytes"] / run["time"] / 1e9
        lines.append(f"| {label} | {_fmt(t, '.3f', ' ms')} | {_fmt(bw, '.0f', ' GB/s')} | "
                     f"{_fmt(_fraction(r, key), '.0%')} |")
    lines += ["", "| lanczos(H, k=5): model, backend, basis | #HVPs | time | one HVP | engine overhead "
              "| top eigenvalue |", "|---|---|---|---|---|---|"]
    for model in MODELS:
        params = r["params"][model]
        name = model if params is None else f"{model} ({params / 1e6:.1f}M parameters)"
        for backend, basis in CONFIGS:
            run = r["e2e"][(model, backend, basis)]
            hvp = r["hvp_ms"][model]
            over = None if run is None or hvp is None else (
                (run["time"] - run["hvps"] * hvp / 1e3) / (run["hvps"] * hvp / 1e3))
            lines.append(f"| {name}, {backend}, {basis} | {_fmt(run and run['hvps'], 'd')} | "
                         f"{_fmt(run and run['time'], '.3f', ' s')} | {_fmt(hvp, '.2f', ' ms')} | "
                         f"{_fmt(over, '.1%')} | {_fmt(run and run['top'], '.6g')} |")
    v = verdict(r)
    lines += ["", "| target | measured | met |", "|---|---|---|",
              f"| fused pass, float32 basis, >= {TARGET_COPY_FRACTION:.0%} of copy bandwidth | "
              f"{_fmt(_fraction(r, 'cupy-f32'), '.0%')} | {_yes_no(v['copy'])} |"]
    for model in MODELS:
        s = _speedup(r, model)
        lines.append(f"| cupy >= {TARGET_SPEEDUP - 1:.0%} faster than torch end to end, {model}, basis device | "
                     f"{_fmt(s, '.2f', 'x')} | {_yes_no(None if s is None else s >= TARGET_SPEEDUP)} |")
    auto = v["auto_cupy"]
    advice = (NOT_MEASURED if auto is None else
              "cupy: add this device's name to AUTO_CUPY_DEVICES" if auto else "torch (the default)")
    lines.append(f"| what backend=\"auto\" should use on this device | {advice} | {_yes_no(auto)} |")
    return "\n".join(lines) + "\n"


# -- GPU measurements ------------------------------------------------------------------------------

def _need_gpu():
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA build of torch and a GPU (or --dry-run)")
    try:
        import cupy
    except Exception as exc:
        cupy = None
        print(f"CuPy is not importable ({type(exc).__name__}: {exc}): the cupy figures stay not measured")
    return cupy, torch


def _timed(cp, fn, repeats):
    fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(times))


def _timed_torch(torch, fn, repeats):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def copy_bandwidth(cp, nbytes=1 << 30, repeats=20):
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    a = cp.empty(nbytes // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    t = _timed(cp, lambda: b.__setitem__(Ellipsis, a), repeats)
    return 2 * nbytes / t


def check_kernels(xp, K, rows, n, repeats=3):
    """Every kernel of ``K`` against the NumPy references on fresh inputs (``xp=numpy`` with the
    references as ``K``: the dry run); raises AssertionError on a mismatch."""
    from sharpscope.lanczos.backends import reference

    def host(a):
        return a.get() if hasattr(a, "get") else np.asarray(a)

    for rep in range(repeats):
        for storage in ("float32", "bf16"):
            Q = random_basis(np, rows, n, storage, seed=10 * rep)
            w = random_vector(np, n, seed=10 * rep + 1)
            h = random_vector(np, rows, seed=10 * rep + 2)
            assert Q.dtype == (np.uint16 if storage == "bf16" else np.float32) and w.dtype == np.float32
            Qd, hd = xp.asarray(Q), xp.asarray(h)
            tol = dict(rtol=1e-4, atol=1e-5 * np.sqrt(n))
            np.testing.assert_allclose(host(K.project(Qd, xp.asarray(w))), reference.project(Q, w), **tol)
            wr, wd = w.copy(), xp.asarray(w.copy())
            reference.update(Q, wr, h)
            K.update(Qd, wd, hd)
            np.testing.assert_allclose(host(wd), wr, **tol)
            wr, wd = w.copy(), xp.asarray(w.copy())
            h2r, sqr = reference.update_project(Q, wr, h)
            h2, sq = K.update_project(Qd, wd, hd)
            np.testing.assert_allclose(host(h2), h2r, **tol)
            np.testing.assert_allclose(float(sq), float(sqr), rtol=1e-4)
            out = xp.full(n, np.nan, dtype=np.float32)
            out32 = xp.full(n, np.nan, dtype=np.float32)
            outb = xp.full(n, 0xFFFF, dtype=np.uint16)  # a NaN pattern in bfloat16
            K.scale_store(xp.asarray(w), 0.5, out)
            K.scale_store(xp.asarray(w), 0.5, outb, out32)
            ref, refb = np.empty(n, np.float32), np.empty(n, np.uint16)
            reference.scale_store(w, 0.5, ref)
            reference.scale_store(w, 0.5, refb)
            np.testing.assert_array_equal(host(out).view(np.uint32), ref.view(np.uint32))
            np.testing.assert_array_equal(host(out32).view(np.uint32), ref.view(np.uint32))
            np.testing.assert_array_equal(host(outb), refb)
    return f"passed ({repeats} fresh random inputs, {rows} x {n})"


def check_special_values(xp, K):
    from sharpscope.lanczos.backends.selfcheck import SPECIAL_BITS, SPECIAL_SCALES, check_scale_store

    check_scale_store(K, xp, random_vector(np, 4099, seed=7))
    return f"passed ({SPECIAL_BITS.size} special values + 4099 random, {len(SPECIAL_SCALES)} scales)"


def time_orthogonalization(cp, torch, K, rows, n, repeats, results):
    """One fused CGS pass (update_project), bytes = Q once + w read and written; torch's two passes."""
    for storage, key in (("float32", "cupy-f32"), ("bf16", "cupy-bf16")):
        Q = random_basis(cp, rows, n, storage)
        w = random_vector(cp, n)
        h = cp.zeros(rows, dtype=cp.float32)
        assert Q.dtype == (cp.uint16 if storage == "bf16" else cp.float32), Q.dtype
        t = _timed(cp, lambda Q=Q, w=w, h=h: K.update_project(Q, w, h), repeats)
        results["kernels"][key] = {"time": t, "bytes": Q.nbytes + 2 * w.nbytes}
        Q = w = h = None  # free the basis before the next storage
        cp.get_default_memory_pool().free_all_blocks()
    Qt = torch.randn(rows, n, device="cuda") / n ** 0.5
    wt = torch.randn(n, device="cuda")

    def torch_pass(Qt=Qt, wt=wt):
        c = torch.mv(Qt, wt)
        wt.sub_(torch.mv(Qt.T, c))
        return torch.dot(wt, wt)

    t = _timed_torch(torch, torch_pass, repeats)
    results["kernels"]["torch-f32"] = {"time": t, "bytes": 2 * Qt.numel() * 4 + 3 * wt.numel() * 4}
    del torch_pass
    Qt = None


def resnet18_like(torch):
    from torch import nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU())

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(8, 64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        layers.append(block(cin, cout, stride))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def build_problem(torch, model_name: str):
    """``(model, (x, y))`` on CUDA for one of :data:`MODELS`."""
    from torch import nn

    torch.manual_seed(0)
    if model_name == "mlp-14.7M":
        model = nn.Sequential(nn.Linear(3072, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                              nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        x = torch.randn(2048, 3072, device="cuda")
        y = torch.randint(0, 10, (2048,), device="cuda")
    else:
        model = resnet18_like(torch)
        x = torch.randn(256, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (256,), device="cuda")
    return model.cuda(), (x, y)


def time_end_to_end(torch, model_name: str, results: dict, repeats: int = 3) -> None:
    from torch import nn

    import sharpscope as ss

    model, data = build_problem(torch, model_name)
    H = ss.hessian_operator(model, nn.CrossEntropyLoss(), data)
    results["params"][model_name] = H.shape[0]
    v = torch.randn(H.shape[0], device="cuda")
    with H.pinned():  # one solve: the cached graph built once, as inside lanczos
        H.matvec(v)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            H.matvec(v)
        torch.cuda.synchronize()
    results["hvp_ms"][model_name] = (time.perf_counter() - t0) / 5 * 1e3
    for backend, basis in CONFIGS:
        try:
            ss.lanczos(H, k=5, backend=backend, basis=basis)  # warm-up (kernel load, allocator)
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res = ss.lanczos(H, k=5, backend=backend, basis=basis)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            results["e2e"][(model_name, backend, basis)] = {
                "time": float(np.median(times)), "hvps": int(res.num_matvecs), "top": float(res.eigenvalues[0])}
        except Exception as exc:  # e.g. backend="cupy" unavailable: the row stays not measured
            results["errors"][f"{model_name} {backend} {basis}"] = _one_line(exc)
    del H, model
    torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    from sharpscope.lanczos.backends import one_line

    return one_line(exc)


def _section(results: dict, name: str, fn) -> bool:
    print(f"== {name}", flush=True)
    try:
        fn()
        return True
    except BaseException as exc:  # noqa: BLE001 - every section runs; the failure is reported
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        results["errors"][name] = _one_line(exc)
        return False


def run_gpu(args, results: dict) -> bool:
    cp, torch = _need_gpu()
    from sharpscope.lanczos.backends import cupy_status

    name = torch.cuda.get_device_name()
    results["device"] = name
    results["rows"], results["n"] = args.rows, args.n
    versions = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    if cp is not None:
        rt = cp.cuda.runtime.runtimeGetVersion()
        versions += f", CuPy {cp.__version__} (CUDA {rt // 1000}.{rt % 1000 // 10})"
    results["versions"] = versions
    print(f"device: {name}  date: {results['date']}  {versions}")
    ok = True
    missing = cupy_status() if cp is not None else "CuPy is not importable"
    K = None
    if missing is None:
        from sharpscope.lanczos.backends.kernels import load_kernels

        K = load_kernels()
    else:
        print(f"the cupy backend is unavailable: {missing}")
        results["errors"]["cupy"] = missing
        ok = False

    def checks():
        if K is None:
            raise RuntimeError(missing)
        results["checks"]["references"] = check_kernels(cp, K, rows=37, n=100_003)
        results["checks"]["special values"] = check_special_values(cp, K)

    def copy():
        if cp is None:
            raise RuntimeError("CuPy is not importable")
        results["copy_bw"] = copy_bandwidth(cp)

    def kernels():
        if K is None:
            raise RuntimeError(missing)
        time_orthogonalization(cp, torch, K, args.rows, args.n, args.repeats, results)

    ok &= _section(results, "checks", checks)
    ok &= _section(results, "copy bandwidth", copy)
    ok &= _section(results, "fused pass", kernels)
    for model_name in MODELS:
        ok &= _section(results, f"end to end, {model_name}", lambda m=model_name: time_end_to_end(torch, m, results))
    return ok and not results["errors"]


def run_dry(args, results: dict) -> bool:
    """No GPU: the inputs and the checks through the NumPy references; every GPU figure stays None."""
    from sharpscope.lanczos.backends import reference

    results["device"] = "none (dry run on the CPU: every GPU figure not measured)"
    results["rows"], results["n"] = args.rows, args.n
    ok = True

    def inputs():
        for storage, dtype in (("float32", np.float32), ("bf16", np.uint16)):
            Q = random_basis(np, 3, 1001, storage)
            assert Q.dtype == dtype, f"random_basis gave {Q.dtype} for {storage}"

    def checks():
        check_kernels(np, reference, rows=37, n=1003, repeats=1)
        check_special_values(np, reference)

    ok &= _section(results, "inputs (NumPy)", inputs)
    ok &= _section(results, "checks of the references (NumPy)", checks)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60, help="basis rows for the kernel timings")
    parser.add_argument("--n", type=int, default=11_200_000, help="vector length (ResNet-18: ~11.2M)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--markdown", type=Path, help="write the tables for docs/perf-gpu.md here")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: NumPy inputs and checks only")
    args = parser.parse_args(argv)
    results = empty_results()
    ok = (run_dry if args.dry_run else run_gpu)(args, results)
    text = render_markdown(results)
    print()
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
