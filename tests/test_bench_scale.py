"""scripts/bench_scale.py's FSDP2 path (``--fsdp``): a tiny GPT-2 config on one process and on 2 gloo processes with
sharded Krylov vectors. The sharded solve must find the one-process top eigenvalue (float64 finite differences
against float32 autograd, tol 1e-3: agreement to 1e-3), hold half the vector entries per rank, and report
per-rank basis bytes of exactly ``(basis_size + 1)`` local rows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_fsdp_rows_match_one_process(tmp_path):
    out = tmp_path / "scale.json"
    text = _bench().main(["--configs", "tiny", "--vocab", "64", "--k", "1", "--bases", "default", "--fsdp", "2",
                          "--product-samples", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    one = data["results"][0]["cases"][0]
    (fsdp,) = data["fsdp"]
    ranks = fsdp["ranks"]
    assert fsdp["world"] == 2 and len(ranks) == 2 and fsdp["params"] == data["results"][0]["params"]
    assert sum(r["local"] for r in ranks) == fsdp["params"]
    for r in ranks:
        case = r["cases"][0]
        assert abs(r["local"] - fsdp["params"] / 2) <= 0.05 * fsdp["params"]
        assert case["basis_bytes"] == (case["basis_size"] + 1) * r["local"] * 8  # float64 rows of the shard
        assert case["converged"] == [True] and case["peak_rss_gib"] > 0
        assert abs(case["eigenvalues"][0] - one["eigenvalues"][0]) <= 1e-3 * abs(one["eigenvalues"][0])
        assert case["eigenvalues"] == ranks[0]["cases"][0]["eigenvalues"]
    assert "| tiny | 0.1M | float64 | 2 | 1 |" in text
