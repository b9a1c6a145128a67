"""Check and time sharpscope's CUDA kernels and the end-to-end Lanczos on a GPU.

Checks: every kernel against its NumPy reference (sharpscope/backends/reference.py) on fresh random
inputs each repeat, output buffers poisoned with NaN before each call. Timings: the fused
orthogonalization pass (float32 and bfloat16 basis) as achieved bandwidth against the device's
measured copy bandwidth (CuPy device-to-device copy), and lanczos(k=5) on a ResNet-18-like CNN
(3x32x32, batch 256) with the torch backend vs the cupy backend, float32 vs bfloat16 basis, with the
engine's overhead = (total - #HVPs x HVP time) / (#HVPs x HVP time). Results go to docs/perf-gpu.md.

    python scripts/bench_gpu.py [--rows 60] [--repeats 20]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _need_gpu():
    from sharpscope.lanczos.backends import cupy_status

    missing = cupy_status()
    if missing is not None:
        sys.exit(f"bench_gpu.py needs a CUDA GPU and CuPy: {missing}")
    import cupy
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA build of torch for the end-to-end runs")
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


def copy_bandwidth(cp, nbytes=1 << 30, repeats=20):
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    a = cp.empty(nbytes // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    t = _timed(cp, lambda: b.__setitem__(Ellipsis, a), repeats)
    return 2 * nbytes / t


def check_kernels(cp, K, rows, n, repeats=3):
    from sharpscope.lanczos.backends import reference
    from sharpscope.lanczos.backends.bf16 import float32_to_bf16_bits

    for rep in range(repeats):
        rng = np.random.default_rng(rep)
        for storage in ("float32", "bf16"):
            Q32 = (rng.standard_normal((rows, n)) / np.sqrt(n)).astype(np.float32)
            Q = float32_to_bf16_bits(Q32) if storage == "bf16" else Q32
            w = rng.standard_normal(n).astype(np.float32)
            h = rng.standard_normal(rows).astype(np.float32)
            Qd, hd = cp.asarray(Q), cp.asarray(h)
            tol = dict(rtol=1e-4, atol=1e-5 * np.sqrt(n))
            np.testing.assert_allclose(K.project(Qd, cp.asarray(w)).get(), reference.project(Q, w), **tol)
            wr, wd = w.copy(), cp.asarray(w)
            reference.update(Q, wr, h)
            K.update(Qd, wd, hd)
            np.testing.assert_allclose(wd.get(), wr, **tol)
            wr, wd = w.copy(), cp.asarray(w)
            h2r, sqr = reference.update_project(Q, wr, h)
            h2, sq = K.update_project(Qd, wd, hd)
            np.testing.assert_allclose(h2.get(), h2r, **tol)
            np.testing.assert_allclose(float(sq), float(sqr), rtol=1e-4)
            out = cp.full(n, np.nan, dtype=cp.float32)
            out32 = cp.full(n, np.nan, dtype=cp.float32)
            outb = cp.full(n, 0xFFFF, dtype=cp.uint16)  # a NaN pattern in bfloat16
            K.scale_store(cp.asarray(w), 0.5, out)
            K.scale_store(cp.asarray(w), 0.5, outb, out32)
            ref, refb = np.empty(n, np.float32), np.empty(n, np.uint16)
            reference.scale_store(w, 0.5, ref)
            reference.scale_store(w, 0.5, refb)
            np.testing.assert_array_equal(out.get(), ref)
            np.testing.assert_array_equal(out32.get(), ref)
            np.testing.assert_array_equal(outb.get(), refb)
    print(f"kernels match their NumPy references ({repeats} fresh random inputs, poisoned outputs)")


def time_orthogonalization(cp, K, rows, n, repeats, bandwidth):
    """One fused CGS pass (update_project): bytes = Q once + w read and written."""
    from sharpscope.lanczos.backends.bf16 import float32_to_bf16_bits

    result = {}
    for storage in ("float32", "bf16"):
        Q = cp.random.standard_normal((rows, n), dtype=cp.float32) / np.sqrt(n)
        if storage == "bf16":
            Q = float32_to_bf16_bits(Q, xp=cp)
        w = cp.random.standard_normal(n, dtype=cp.float32)
        h = cp.zeros(rows, dtype=cp.float32)
        t = _timed(cp, lambda: K.update_project(Q, w, h), repeats)
        nbytes = Q.nbytes + 2 * w.nbytes
        result[storage] = t
        print(f"| fused update+projection, {storage} basis, {rows} x {n} | {t * 1e3:.3f} ms | "
              f"{nbytes / t / 1e9:.0f} GB/s | {nbytes / t / bandwidth:.0%} of copy |")
    print(f"| bf16 speed-up over float32 | {result['float32'] / result['bf16']:.2f}x | | |")


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


def time_end_to_end(torch, repeats=3):
    import sharpscope as ss
    from torch import nn

    torch.manual_seed(0)
    model = resnet18_like(torch).cuda()
    x = torch.randn(256, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    H = ss.hessian_operator(model, nn.CrossEntropyLoss(), (x, y))
    v = torch.randn(H.shape[0], device="cuda")
    H.matvec(v)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        H.matvec(v)
    torch.cuda.synchronize()
    hvp = (time.perf_counter() - t0) / 5
    print(f"\nmodel: {H.shape[0]:,} parameters, batch 256, one HVP {hvp * 1e3:.1f} ms\n")
    print("| backend | basis | #HVPs | time (s) | engine overhead | top eigenvalue |")
    print("|---|---|---|---|---|---|")
    for backend, basis in (("torch", "device"), ("torch", "device-bf16"), ("cupy", "device"), ("cupy", "device-bf16")):
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = ss.lanczos(H, k=5, backend=backend, basis=basis)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        over = (t - res.num_matvecs * hvp) / (res.num_matvecs * hvp)
        print(f"| {backend} | {basis} | {res.num_matvecs} | {t:.2f} | {over:.1%} | {res.eigenvalues[0]:.6g} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60, help="basis rows for the kernel timings")
    parser.add_argument("--n", type=int, default=11_200_000, help="vector length (ResNet-18: ~11.2M)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    cp, torch = _need_gpu()
    from sharpscope.lanczos.backends.kernels import load_kernels

    K = load_kernels()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"device: {props['name'].decode()}  date: {time.strftime('%Y-%m-%d')}")
    check_kernels(cp, K, rows=37, n=100_003)
    bw = copy_bandwidth(cp)
    print(f"measured device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s\n")
    print("| step | time | achieved | vs copy |\n|---|---|---|---|")
    time_orthogonalization(cp, K, args.rows, args.n, args.repeats, bw)
    time_end_to_end(torch)


if __name__ == "__main__":
    main()
