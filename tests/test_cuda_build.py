"""The CUDA kernels without a GPU: scripts/check_cuda.sh compiles them (nvcc), the bit-exact store is
free of flushing or canonicalizing intrinsics (source and PTX), its integer algorithm, compiled from
cuda/common.cuh for the host, agrees bit for bit with the NumPy reference; and the GPU scripts' CPU
parts: scripts/gpu_check.sh's dry run, scripts/update_perf_gpu.py, scripts/bench_gpu.py's inputs and
tables."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_cuda.sh"
CUDA = ROOT / "cuda"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++, c++, clang++) on PATH")


def _script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_nvcc
def test_every_kernel_compiles():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("orthogonalize.cu", "normalize.cu"):
        assert f"ok: {name}" in out.stdout


@needs_nvcc
def test_a_broken_kernel_fails(tmp_path):
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "FAILED" in out.stderr


# -- the bit-exact store --------------------------------------------------------------------------------

def _code_without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def test_the_kernels_use_no_flushing_or_canonicalizing_intrinsics():
    from sharpscope.lanczos.backends.kernels import NVRTC_OPTIONS

    forbidden = ("__float2bfloat16", "__floats2bfloat162", "__float22bfloat162", "__fmul_r", "__fmaf_r",
                 "__fdividef", "__frcp", "cuda_bf16.h", "ftz", "fast-math", "fast_math", "fmad=true")
    for path in sorted(CUDA.glob("*.cu*")):
        code = _code_without_comments(path.read_text())
        for name in forbidden:
            assert name not in code, f"{path.name} uses {name}"
    for option in NVRTC_OPTIONS:
        assert not any(flag in option for flag in ("ftz", "fast-math", "fast_math")), option
    common = _code_without_comments((CUDA / "common.cuh").read_text())
    assert '"mul.rn.f32 %0, %1, %2;"' in common  # the product as explicit PTX, immune to -ftz=true
    store = _code_without_comments((CUDA / "normalize.cu").read_text())
    assert store.count("ss_scale_bits(") == 2 and "ss_bf16_from_bits(" in store
    for name in ("scale_store_f32", "scale_store_bf16"):  # no float arithmetic of their own
        body = store[store.index(name):]
        body = body[:body.index("\n}") + 2]
        assert not re.search(r"[\w\]]\s*\*\s*s\b", body), body


@needs_nvcc
def test_the_stores_ptx_has_no_flushing_instruction_under_cupys_ftz(tmp_path):
    """CuPy compiles every RawModule with -ftz=true: the scale_store kernels must still hold no .ftz
    instruction and multiply with mul.rn.f32 (the reductions may flush; they are checked to a
    tolerance)."""
    from sharpscope.lanczos.backends.kernels import NVRTC_OPTIONS, kernel_source

    texts = {}
    for name in ("normalize.cu", "orthogonalize.cu"):  # as the loader hands them to NVRTC: inlined
        source, ptx = tmp_path / name, tmp_path / f"{name}.ptx"
        source.write_text(kernel_source(name))
        options = [option.replace("--std=", "-std=") for option in NVRTC_OPTIONS]
        out = subprocess.run([NVCC, *options, "-ptx", "-ftz=true", "-arch=sm_90", "-o", str(ptx), str(source)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        texts[name] = re.sub(r"//[^\n]*", "", ptx.read_text())
    assert "update_project_bf16" in texts["orthogonalize.cu"]
    text = texts["normalize.cu"]
    entries = re.split(r"\.visible \.entry ", text)[1:]
    bodies = {entry.split("(", 1)[0]: entry for entry in entries}
    assert set(bodies) == {"sumsq_partial", "scale_store_f32", "scale_store_bf16"}
    assert ".ftz" in bodies["sumsq_partial"]  # the flag does reach the compiler
    for name in ("scale_store_f32", "scale_store_bf16"):
        assert ".ftz" not in bodies[name] and not re.search(r"cvt\.[\w.]*bf16", bodies[name]), name
        assert "mul.rn.f32" in bodies[name], name


HARNESS = r"""
#include <cstdio>
#include <cstdint>
#include <vector>
#include "common.cuh"
// stdin: n, k, n float32 inputs, k float32 scales; stdout: per scale n uint32 (ss_scale_bits) and
// n uint16 (ss_bf16_from_bits of them)
int main() {
    uint32_t n, k;
    if (fread(&n, 4, 1, stdin) != 1 || fread(&k, 4, 1, stdin) != 1) return 1;
    std::vector<float> x(n), s(k);
    if (fread(x.data(), 4, n, stdin) != n || fread(s.data(), 4, k, stdin) != k) return 1;
    std::vector<uint32_t> q(n);
    std::vector<uint16_t> b(n);
    for (uint32_t j = 0; j < k; ++j) {
        for (uint32_t i = 0; i < n; ++i) { q[i] = ss_scale_bits(x[i], s[j]); b[i] = ss_bf16_from_bits(q[i]); }
        fwrite(q.data(), 4, n, stdout);
        fwrite(b.data(), 2, n, stdout);
    }
    return 0;
}
"""


@needs_cxx
def test_the_kernels_integer_algorithm_matches_the_reference_bit_for_bit(tmp_path):
    """cuda/common.cuh's ss_scale_bits and ss_bf16_from_bits, compiled for the host (the CPU's IEEE
    product, with NaN products replaced by the GPU's canonical 0x7FFFFFFF), against bf16.py's
    scale_bits and float32_to_bf16_bits: every bfloat16 upper half with 8 lower halves (ties, near-ties,
    NaN payloads, subnormals), the special values, at every special scale."""
    from sharpscope.lanczos.backends.bf16 import float32_to_bf16_bits, scale_bits
    from sharpscope.lanczos.backends.selfcheck import H200_INPUTS, SPECIAL_BITS, SPECIAL_SCALES

    source, exe = tmp_path / "harness.cpp", tmp_path / "harness"
    source.write_text(HARNESS)
    out = subprocess.run([CXX, "-std=c++17", "-O2", "-I", str(CUDA), "-o", str(exe), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    lower = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xBFFF, 0xC000, 0xFFFF], dtype=np.uint32)
    x = np.concatenate([(upper[:, None] | lower[None, :]).ravel(), SPECIAL_BITS,
                        H200_INPUTS.view(np.uint32)]).view(np.float32)
    scales = np.array(SPECIAL_SCALES, dtype=np.float32)
    stdin = np.array([x.size, scales.size], np.uint32).tobytes() + x.tobytes() + scales.tobytes()
    run = subprocess.run([str(exe)], input=stdin, capture_output=True, timeout=300)
    assert run.returncode == 0
    data, offset, n = run.stdout, 0, x.size
    for scale in scales:
        got_q = np.frombuffer(data, np.uint32, n, offset)
        got_b = np.frombuffer(data, np.uint16, n, offset + 4 * n)
        offset += 6 * n
        want_q = scale_bits(x, float(scale))
        want_b = float32_to_bf16_bits(want_q.view(np.float32))
        bad = np.flatnonzero(got_q != want_q)
        assert bad.size == 0, (scale, hex(int(x.view(np.uint32)[bad[0]])), hex(int(got_q[bad[0]])),
                               hex(int(want_q[bad[0]])))
        bad = np.flatnonzero(got_b != want_b)
        assert bad.size == 0, (scale, hex(int(x.view(np.uint32)[bad[0]])), hex(int(got_b[bad[0]])),
                               hex(int(want_b[bad[0]])))
    assert offset == len(data)


def test_the_staged_row_limits_match_the_kernel_source():
    from sharpscope.lanczos.backends.kernels import staged_rows

    assert (staged_rows(4), staged_rows(2)) == (93, 185)
    text = (CUDA / "orthogonalize.cu").read_text()
    assert "up to 93 float32 or 185 bfloat16 rows" in text
    assert "#define TPB_UP 128" in text and "#define ROWCHUNK 32" in text and "#define TPB 256" in text


def test_a_basis_dtype_the_kernels_do_not_take_is_one_line():
    from sharpscope.lanczos.backends.kernels import basis_kind

    assert basis_kind(np.float32) == "f32" and basis_kind(np.uint16) == "bf16"
    with pytest.raises(TypeError, match=r"^sharpscope's CUDA kernels take a float32 basis or bfloat16 bits "
                                        r"\(uint16\), got float64; convert with \.astype\(numpy\.float32\)$"):
        basis_kind(np.float64)


# -- scripts/bench_gpu.py on the CPU ---------------------------------------------------------------

def test_bench_gpu_builds_float32_inputs_where_numpy_2_promotes_to_float64():
    bench = _script_module("bench_gpu")
    n = 1001
    promoted = np.ones(3, dtype=np.float32) / np.sqrt(n)  # what crashed bench_gpu.py under CuPy 14
    if int(np.__version__.split(".")[0]) >= 2:
        assert promoted.dtype == np.float64  # NEP 50: a NumPy float64 scalar is not "weak"
    Q = bench.random_basis(np, 5, n, "float32")
    assert Q.dtype == np.float32 and Q.shape == (5, n)
    assert abs(float(np.linalg.norm(Q, axis=1).mean()) - 1.0) < 0.1
    assert bench.random_basis(np, 5, n, "bf16").dtype == np.uint16
    assert bench.random_vector(np, n).dtype == np.float32


def test_bench_gpu_tables_and_verdict():
    bench = _script_module("bench_gpu")
    empty = bench.render_markdown(bench.empty_results())
    _assert_not_measured(empty)
    r = bench.empty_results()
    r.update(device="NVIDIA H200", versions="torch 2.11.0 (CUDA 13.0)", copy_bw=4.2e12, rows=60, n=11_200_000)
    r["kernels"].update({"cupy-f32": {"time": 1.813e-3, "bytes": 2.78e9}, "cupy-bf16": None,
                         "torch-f32": {"time": 1.485e-3, "bytes": 5.5e9}})
    for model in bench.MODELS:
        r["hvp_ms"][model] = 5.7
        r["e2e"][(model, "torch", "device")] = {"time": 0.350, "hvps": 30, "top": 1.26}
        r["e2e"][(model, "cupy", "device")] = {"time": 0.362, "hvps": 30, "top": 1.26}
    text = bench.render_markdown(r)
    assert "| cupy fused update_project, float32 basis 60 x 11.2M | 1.813 ms | 1533 GB/s | 37% |" in text
    assert "0.97x | no |" in text and 'backend="auto" should use on this device | torch (the default) | no |' in text
    assert bench.verdict(r) == {"copy": False, "speedup": False, "auto_cupy": False}
    r["kernels"]["cupy-f32"]["time"] = 0.8e-3
    r["e2e"][("mlp-14.7M", "cupy", "device")]["time"] = 0.30
    assert bench.verdict(r) == {"copy": True, "speedup": True, "auto_cupy": True}
    assert "add this device's name to AUTO_CUPY_DEVICES" in bench.render_markdown(r)
    for block in re.split(r"\n(?!\|)", text):  # a cell never breaks its table (no stray pipes)
        lines = [line for line in block.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in lines}) <= 1, lines


# -- scripts/gpu_check.sh and scripts/update_perf_gpu.py -------------------------------------------

def _assert_not_measured(text: str) -> None:
    """Every figure cell (all but the first column, header rows aside) of every table reads "not measured"."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    assert len(rows) > 20
    for row in rows:
        if row[0] in ("tests", "check", "step", "target") or row[0].startswith("lanczos(H, k=5)"):
            continue
        assert all(cell.startswith("not measured") for cell in row[1:]), row


@pytest.mark.skipif(shutil.which("timeout") is None, reason="coreutils timeout not on PATH")
def test_gpu_check_dry_run_writes_every_file_with_every_gpu_figure_not_measured(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "SHARPSCOPE_GPU_CHECK_DRY": "1"}
    env.pop("OUT", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("gpu_check.log", "perf-gpu-tables.md", "bench_gpu.md", "device.txt"):
        assert (out / name).is_file(), name
    log = (out / "gpu_check.log").read_text()
    assert "== device" in log and "== gpu-marked tests (collected only)" in log and "--dry-run" in log
    assert "every step passed" in log
    tables = (out / "perf-gpu-tables.md").read_text()
    assert "device: none (dry run on the CPU), date: 20" in tables
    collected = re.search(r"(\d+)/\d+ tests collected", tables)
    assert collected and int(collected.group(1)) >= 50  # the gpu-marked grid collects
    _assert_not_measured(tables[tables.index("### gpu-marked tests"):])
    assert "not measured: scripts/bench_engine.py" in tables or "not measured: dry run" in tables
    assert "scripts/update_perf_gpu.py" in run.stdout


def test_gpu_check_rejects_an_unknown_option(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2 and "unknown option --fast" in run.stderr


def test_update_perf_gpu_folds_the_tables_between_the_markers(tmp_path):
    up = _script_module("update_perf_gpu")
    doc = tmp_path / "perf-gpu.md"
    doc.write_text(f"# title\n\nintro\n\n{up.BEGIN}\nold tables\n{up.END}\n\n## after\n")
    tables = tmp_path / "perf-gpu-tables.md"
    tables.write_text("Run of gpu_check.sh. device: NVIDIA H200, date: 2026-12-01.\n\n| a | b |\n|---|---|\n")
    assert up.main([str(tables), str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith(f"{up.END}\n\n## after\n")
    assert "old tables" not in text and "NVIDIA H200, date: 2026-12-01" in text
    assert up.main([str(tables), str(doc)]) == 0 and doc.read_text() == text  # idempotent
    doc.write_text("# no markers\n")
    assert up.main([str(tables), str(doc)]) == 1 and doc.read_text() == "# no markers\n"
    assert up.main([str(tmp_path / "missing.md"), str(doc)]) == 1
    with pytest.raises(ValueError, match="comes before"):
        up.fold(f"{up.END}\n{up.BEGIN}\n", "x")


def test_the_perf_doc_has_the_markers_and_the_h200_figures():
    up = _script_module("update_perf_gpu")
    text = (ROOT / "docs" / "perf-gpu.md").read_text()
    assert text.count(up.BEGIN) == 1 and text.count(up.END) == 1
    for figure in ("1.81 ms", "1.15 ms", "1.49 ms", "0.362 s", "0.350 s", "4.2 TB/s", "2026-11-28"):
        assert figure in text, figure
    assert "../shared" not in text and "/work/" not in text
