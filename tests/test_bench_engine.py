"""scripts/bench_engine.py in its CPU smoke mode: every target row is there, the GPU targets say
"not measured", and the one-host-read-per-step target is measured (and met) on the CPU too."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_engine_smoke_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "scripts" / "bench_engine.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "engine.md"
    start = time.process_time()  # CPU time: wall time on a shared machine measures the other jobs
    text = bench.main(["--device", "cpu", "--small", "--markdown", str(out)])
    assert time.process_time() - start < 30
    assert out.read_text() == text
    targets = [line for line in text.splitlines() if line.startswith("| ") and ("<=" in line or ">=" in line)]
    assert len(targets) == 7, targets
    gpu = [line for line in targets if "overhead" in line or "speed-up" in line or "block Lanczos" in line]
    assert len(gpu) == 6 and all("not measured" in line for line in gpu)
    reads = next(line for line in targets if "host reads per Lanczos step" in line)
    assert reads.rstrip(" |").endswith("PASS")
    assert "- device: CPU" in text and "- date: " in text and "small stand-ins" in text
