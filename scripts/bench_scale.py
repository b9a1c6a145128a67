#!/usr/bin/env python
"""Peak memory, products and time of top-1 and top-5 Hessian eigenvalues on GPT-2 configs of growing size.

Each config runs in its own subprocess, so that its peak RSS is its own:

* the model is ``transformers.GPT2LMHeadModel`` built locally from a ``GPT2Config`` (random weights, seed 0,
  dropout off, ``n_positions=64``; nothing is downloaded), the loss ``ss.hf.causal_lm_loss()`` on one batch of
  4 x 64 random tokens (seed 1), the operator ``ss.hessian_operator`` (``hvp_mode="auto"``), built once per
  process and shared by its solves (its derivative check runs at the first product of the first solve);
* before the solves, the steady-state product time (median of ``--product-samples`` products inside one
  ``H.pinned()`` block, after one untimed product);
* each case (k, basis) is one ``ss.lanczos(H, k, tol=--tol, basis=...)``, where ``old`` is the default basis
  before issue 24 (``max(2k + 20, 60)`` vectors, capped by 1/8 of the RAM as it was), ``default`` today's
  (``2k + 8``), ``host`` and ``device-bf16`` those storages with their defaults: products, wall time, the basis's
  vectors and bytes as the result reports them (``res.basis_size``, ``res.basis_bytes``), and the peak RSS
  of the process during the solve (``VmHWM`` reset to the current RSS before it, so it is the solve's peak
  with the model, data and operator already resident) and its rise over the RSS before the solve;
* ``--reference`` adds a tight solve on the first config (the largest k, ``tol=--reference-tol``, a basis of
  40, float32): the eigenvalues every case of that config is compared with (its residuals are printed, so
  what the reference itself certifies is visible);
* ``--ab REV`` runs the default-basis cases also from ``git archive REV`` (extracted under bench-output/), in
  their own processes, interleaved per config: before/after products, time and peak RSS in one run.

* ``--fsdp 2,4`` also runs each config under FSDP2 with sharded Krylov vectors, on R gloo processes per listed R
  (1 allowed: the same path on one rank): every rank builds the same model (in ``--fsdp-dtype``, default float64:
  in float32 the finite-difference products of a model this size fail the Lanczos symmetry probe, whose
  tolerance is capped at ``0.05/sqrt(n)``), calls ``fully_shard`` on each transformer block and on the root,
  takes its rows of the batch (``tensor_split`` over the 4 sequences) and the criterion :func:`shifted_ce` (the
  same next-token cross-entropy as ``ss.hf.causal_lm_loss()``; FSDP2 models take a criterion, not a loss
  closure), and runs ``ss.lanczos(ss.shard_vectors(H), k, tol=--tol)`` per k with the default basis. Products
  are finite differences (double backward through FSDP2 fails in torch 2.13). Per rank: the vector entries,
  ``res.basis_bytes``, the solve's peak RSS and its rise (``VmHWM`` reset as above), products, wall time and the
  product time (median of ``--product-samples``); the table gives the per-rank maxima and the top eigenvalue's
  relative difference to the one-process solve of the same config and k.

The cost model checked against these points (docs/performance.md, "Memory and the Krylov basis"): a solve's time
is about products x the product time plus the solve's set-up (one gradient graph per solve); the basis holds
``basis_size + 1`` vectors of ``n`` parameters at 4 bytes (float32) or 2 (bfloat16, plus two float32 working vectors).

On a CPU the bfloat16 basis is a memory measurement, not a speed one (bfloat16 arithmetic on a CPU is slow).

Run:   python scripts/bench_scale.py [--configs 26M,81M,124M] [--k 1,5] [--bases old,default,host,device-bf16]
                                     [--tol 1e-3] [--reference] [--ab REV] [--json PATH]
       python scripts/bench_scale.py --configs 26M --k 1 --bases default --fsdp 2     (one process and FSDP2 on 2)
Smoke: python scripts/bench_scale.py --configs tiny --reference    (seconds)
       python scripts/bench_scale.py --configs tiny --vocab 64 --k 1 --bases default --fsdp 2 (tests/test_bench_scale.py)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the sibling proc_memory, also when a test loads this file by path
from proc_memory import reset_peak, status_kib  # noqa: E402

OUT = ROOT / "bench-output"
# name: (layers, width); heads = width / 64 (GPT-2's head size), vocabulary 50257, 64 positions
CONFIGS = {"tiny": (1, 64), "26M": (4, 384), "81M": (6, 768), "124M": (12, 768)}
BATCH, TOKENS = 4, 64
REFERENCE_BASIS = 40


def build(config: str, vocab: int | None = None, device: str = "cpu"):
    """``(model, batch)`` of a config: random GPT-2 weights (seed 0), 4 x 64 random tokens (seed 1)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width = CONFIGS[config]
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), n_positions=TOKENS,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                     **({"vocab_size": vocab} if vocab else {}))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return model.to(device), {key: t.to(device) for key, t in batch.items()}


def old_default(n: int, k: int, device: str = "cpu", itemsize: int = 4) -> int:
    """The default basis before issue 24: ``max(2k + 20, 60)`` vectors, at most what 1/8 of the RAM (1/4 of a
    GPU's free memory) holds (``max_basis + 1`` rows of ``n`` entries)."""
    from sharpscope._memory import memory_budget

    fits = memory_budget(device, gpu_free=0.25, host=0.125) // (n * itemsize) - 1
    return min(max(2 * k + 20, 60), max(k + 2, fits), n)


def _solve_kwargs(case: dict, supported: set[str], n: int, device: str) -> dict:
    kwargs = {"k": case["k"], "tol": case["tol"]}
    if case.get("label") == "old":
        kwargs["max_basis"] = old_default(n, case["k"], device)
    for name in ("basis", "max_basis", "max_memory", "max_matvecs"):
        if case.get(name) is not None:
            kwargs[name] = case[name]
    if "progress" in supported:
        kwargs["progress"] = False
    return kwargs


def worker(config: str, cases: list[dict], samples: int, vocab: int | None, device: str = "cpu") -> dict:
    """One config in this process: the product time, then each case's solve (module docstring)."""
    import inspect

    import torch

    import sharpscope as ss
    import sharpscope.hf  # noqa: F401 - ss.hf

    model, batch = build(config, vocab, device)
    cuda = device.startswith("cuda")
    H = ss.hessian_operator(model, ss.hf.causal_lm_loss(), [batch])
    supported = set(inspect.signature(ss.lanczos).parameters)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    with H.pinned():
        start = time.perf_counter()
        H.matvec(v)
        _sync(cuda)
        first = time.perf_counter() - start
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            H.matvec(v)
            _sync(cuda)
            times.append(time.perf_counter() - start)
    out = {"config": config, "params": H.shape[0], "hvp_mode": H.hvp_mode, "first_product_s": first,
           "product_s": statistics.median(times), "product_samples": times, "cases": []}
    for case in cases:
        before = status_kib("VmRSS")
        reset = reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            cuda_before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        res = ss.lanczos(H, **_solve_kwargs(case, supported, H.shape[0], device))
        _sync(cuda)
        seconds = time.perf_counter() - start
        out["cases"].append({**case, "seconds": seconds, "num_matvecs": res.num_matvecs,
                             "restarts": res.num_restarts, "eigenvalues": res.eigenvalues.tolist(),
                             "residuals": res.residuals.tolist(), "converged": res.converged.tolist(),
                             "basis_size": getattr(res, "basis_size", None),
                             "basis_bytes": getattr(res, "basis_bytes", None),
                             "rss_before_gib": before / 2**20, "peak_rss_gib": status_kib("VmHWM") / 2**20,
                             "peak_reset": reset,
                             **({"cuda_before_gib": cuda_before / 2**30,
                                 "peak_cuda_gib": torch.cuda.max_memory_allocated(device) / 2**30} if cuda else {})})
        print(f"[{config}] {json.dumps(out['cases'][-1])}", file=sys.stderr, flush=True)  # as each solve ends
    return out


def shifted_ce(outputs, labels):
    """Next-token cross-entropy of a causal LM's outputs (logits ``0..T-2`` predict ``labels[:, 1:]``), the mean
    over the batch's tokens: ``ss.hf.causal_lm_loss()`` as a criterion ``loss_fn(outputs, targets)``."""
    import torch.nn.functional as F

    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def fsdp_rank(rank: int, world: int, port: int, outdir: str, config: str, cases: list[dict], samples: int,
              vocab: int | None, dtype: str) -> None:
    """One rank of an FSDP2 run (module docstring): writes ``rank{rank}.json`` under ``outdir``."""
    import datetime

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import sharpscope as ss

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    try:
        model, batch = build(config, vocab)
        model = model.to(getattr(torch, dtype))
        model.config.use_cache = False
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids = batch["input_ids"].tensor_split(world)[rank]
        H = ss.shard_vectors(ss.hessian_operator(model, shifted_ce, (ids, ids), distributed=True))
        v = H.vector_space.random_rows(1, torch.Generator().manual_seed(2), H.dtype, H.device)[0]
        times = []
        with H.pinned():
            for i in range(samples + 1):  # the first one untimed (the determinism check runs there)
                start = time.perf_counter()
                H.matvec(v)
                if i:
                    times.append(time.perf_counter() - start)
        out = {"config": config, "world": world, "rank": rank, "params": H.shape[0], "local": H.local_size,
               "dtype": dtype, "product_s": statistics.median(times), "product_samples": times, "cases": []}
        for case in cases:
            before = status_kib("VmRSS")
            reset = reset_peak()
            start = time.perf_counter()
            res = ss.lanczos(H, k=case["k"], tol=case["tol"], progress=False)
            seconds = time.perf_counter() - start
            out["cases"].append({**case, "seconds": seconds, "num_matvecs": res.num_matvecs,
                                 "eigenvalues": res.eigenvalues.tolist(), "converged": res.converged.tolist(),
                                 "basis_size": res.basis_size, "basis_bytes": res.basis_bytes,
                                 "rss_before_gib": before / 2**20, "peak_rss_gib": status_kib("VmHWM") / 2**20,
                                 "peak_reset": reset})
            if rank == 0:
                print(f"[{config} fsdp R={world}] {json.dumps(out['cases'][-1])}", file=sys.stderr, flush=True)
    except Exception as err:  # noqa: BLE001 - reported by the parent
        out = {"error": f"{type(err).__name__}: {err}"}
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def fsdp_worker(config: str, world: int, cases: list[dict], samples: int, vocab: int | None, dtype: str) -> dict:
    """``world`` gloo ranks of :func:`fsdp_rank` (spawned: each its own process and peak RSS); their records."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fsdp_rank, args=(world, port, tmp, config, cases, samples, vocab, dtype), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    errors = [f"rank {r}: {o['error']}" for r, o in enumerate(ranks) if "error" in o]
    if errors:
        raise RuntimeError(f"FSDP2 run of {config} on {world} ranks failed: {errors[0]}")
    return {"config": config, "world": world, "params": ranks[0]["params"], "dtype": dtype, "ranks": ranks}


def run_fsdp(config: str, world: int, cases: list[dict], samples: int, vocab: int | None, dtype: str) -> dict:
    """:func:`fsdp_worker` in a fresh process (this checkout's sharpscope)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fsdp-worker", config, "--world", str(world),
           "--cases", json.dumps(cases), "--product-samples", str(samples), "--fsdp-dtype", dtype] + \
        (["--vocab", str(vocab)] if vocab else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"FSDP2 worker {config} on {world} ranks failed (exit status {proc.returncode}; its "
                           "stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fsdp_table(fsdp: list[dict], results: list[dict]) -> str:
    """One markdown row per FSDP2 solve: per-rank maxima, and the top eigenvalue against one process."""
    lines = ["| config | params | dtype | R | k | entries per rank (max) | basis MiB per rank (max) | peak RSS GiB per "
             "rank (max; rise) | products | time s | product s | top eigenvalue | rel. diff to one process |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in fsdp:
        ranks = f["ranks"]
        for i, case in enumerate(ranks[0]["cases"]):
            cs = [r["cases"][i] for r in ranks]
            one = next((c for r in results if r["config"] == f["config"] and r["source"] == "current"
                        for c in r["cases"] if c["k"] == case["k"] and c["label"] in ("default", "reference")), None)
            top = case["eigenvalues"][0]
            diff = "-" if one is None else f"{abs(top - one['eigenvalues'][0]) / abs(one['eigenvalues'][0]):.1e}"
            peak = max(c["peak_rss_gib"] for c in cs)
            rise = max(c["peak_rss_gib"] - c["rss_before_gib"] for c in cs)
            lines.append(
                f"| {f['config']} | {f['params'] / 1e6:.1f}M | {f['dtype']} | {f['world']} | {case['k']} "
                f"| {max(r['local'] for r in ranks)} | {max(c['basis_bytes'] for c in cs) / 2**20:.0f} "
                f"| {peak:.2f} (+{rise:.2f}) | {case['num_matvecs']} | {max(c['seconds'] for c in cs):.1f} "
                f"| {max(r['product_s'] for r in ranks):.2f} | {top:.8g} | {diff} |")
    return "\n".join(lines)


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def extract_revision(rev: str) -> Path:
    """``git archive REV sharpscope`` extracted under bench-output/ab-REV/ (once); the directory to import from."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    dest = OUT / f"ab-{commit}"
    if not (dest / "sharpscope" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "sharpscope"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_worker(config: str, cases: list[dict], src: Path, samples: int, vocab: int | None,
               device: str = "cpu") -> dict:
    """:func:`worker` in a fresh process that imports sharpscope from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--cases", json.dumps(cases),
           "--product-samples", str(samples), "--device", device] + (["--vocab", str(vocab)] if vocab else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=str(src))  # stderr: as it runs
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config} from {src} failed (exit status {proc.returncode}; its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args) -> list[tuple[str, str, list[dict]]]:
    """``(config, source, cases)`` in the order they run: per config, this checkout's cases, then REV's."""
    ks = [int(k) for k in args.k.split(",")]
    bases = args.bases.split(",")
    runs = []
    for i, config in enumerate(args.configs.split(",")):
        cases = [{"k": k, "tol": args.tol, "basis": None if b in ("default", "old") else b, "label": b}
                 for k in ks for b in bases]
        if args.reference and i == 0:
            cases.append({"k": max(ks), "tol": args.reference_tol, "max_basis": REFERENCE_BASIS,
                          "max_matvecs": args.reference_matvecs, "label": "reference"})
        runs.append((config, "current", cases))
        if args.ab:
            runs.append((config, args.ab, [c for c in cases if c["label"] == "default"]))
    return runs


def relative_errors(case: dict, reference: dict | None) -> float | None:
    if reference is None:
        return None
    ref = reference["eigenvalues"]
    vals = case["eigenvalues"]
    return max(abs(a - b) / abs(ref[0]) for a, b in zip(vals, ref))


def table(results: list[dict]) -> str:
    """One markdown row per solve."""
    lines = ["| config | params | source | k | basis | basis vectors | basis MiB | peak RSS GiB (rise) [; GPU peak allocated] | products "
             "| time s | product s | time / (products x product) | top eigenvalue | max rel. diff (to reference, else old) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = next((c for c in r["cases"] if c["label"] == "reference"), None)
        ref = ref or next((c for q in results if q["config"] == r["config"] for c in q["cases"]
                           if c["label"] == "reference"), None)
        for c in r["cases"]:
            # against the tight reference, else against the old default's solve of the same k
            base = ref or next((o for o in r["cases"] if o["label"] == "old" and o["k"] == c["k"]), None)
            err = relative_errors(c, base) if c["label"] not in ("reference",) and base is not c else None
            mib = "-" if c["basis_bytes"] is None else f"{c['basis_bytes'] / 2**20:.0f}"
            ratio = c["seconds"] / (c["num_matvecs"] * r["product_s"])
            peak = f"{c['peak_rss_gib']:.2f} (+{c['peak_rss_gib'] - c['rss_before_gib']:.2f})"
            if "peak_cuda_gib" in c:
                peak += f"; GPU {c['peak_cuda_gib']:.2f} (+{c['peak_cuda_gib'] - c['cuda_before_gib']:.2f})"
            lines.append(
                f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['source']} | {c['k']} | {c['label']} "
                f"| {c['basis_size'] if c['basis_size'] is not None else '-'} | {mib} "
                f"| {peak} | {c['num_matvecs']} "
                f"| {c['seconds']:.1f} | {r['product_s']:.2f} | {ratio:.2f} | {c['eigenvalues'][0]:.6g} "
                f"| {'-' if err is None else f'{err:.1e}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="26M,81M,124M", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--k", default="1,5", help="comma-separated k values (default 1,5)")
    p.add_argument("--bases", default="old,default,host,device-bf16",
                   help="comma-separated basis= values, 'default' for today's default basis, 'old' for the one "
                        "before issue 24 (default: old,default,host,device-bf16)")
    p.add_argument("--tol", type=float, default=1e-3, help="Ritz-residual tolerance of the cases (default 1e-3)")
    p.add_argument("--reference", action="store_true", help="a tight solve on the first config (accuracy column)")
    p.add_argument("--reference-tol", type=float, default=1e-5, help="its tolerance (default 1e-5)")
    p.add_argument("--reference-matvecs", type=int, default=120, help="its product cap (default 120)")
    p.add_argument("--ab", metavar="REV", help="also run the default-basis cases from git revision REV")
    p.add_argument("--product-samples", type=int, default=3, help="timed products per config (default 3)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default GPT-2's 50257)")
    p.add_argument("--device", default="cpu", help="where the model and the solves run (default cpu)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the header and table here")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default bench-output/)")
    p.add_argument("--fsdp", default="", help="also run FSDP2 with sharded vectors on these comma-separated "
                                               "numbers of gloo processes, e.g. 2,4 (default: none)")
    p.add_argument("--fsdp-dtype", default="float64", choices=["float64", "float32"],
                   help="the FSDP2 runs' dtype (default float64: module docstring)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-worker", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cases", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fsdp_worker:
        result = fsdp_worker(args.fsdp_worker, args.world, json.loads(args.cases), args.product_samples, args.vocab,
                             args.fsdp_dtype)
        print(json.dumps(result))
        return ""
    if args.worker:
        result = worker(args.worker, json.loads(args.cases), args.product_samples, args.vocab, args.device)
        print(json.dumps(result))
        return ""
    import torch

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    header = (f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {where}; torch {torch.__version__} "
              f"({torch.get_num_threads()} threads); load "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; tol {args.tol}")
    print(header, flush=True)
    results = []
    for config, source, cases in plan(args):
        src = ROOT if source == "current" else extract_revision(source)
        print(f"[{config}] {source}: {len(cases)} solves ...", flush=True)
        result = run_worker(config, cases, src, args.product_samples, args.vocab, args.device)
        result["source"] = source
        results.append(result)
    fsdp = []
    worlds = [int(w) for w in args.fsdp.split(",") if w.strip()]
    for config in args.configs.split(",") if worlds else []:
        cases = [{"k": int(k), "tol": args.tol, "label": "fsdp"} for k in args.k.split(",")]
        for world in worlds:
            print(f"[{config}] FSDP2 on {world} rank(s): {len(cases)} solves ...", flush=True)
            fsdp.append(run_fsdp(config, world, cases, args.product_samples, args.vocab, args.fsdp_dtype))
    text = header + "\n\n" + table(results) + ("\n\n" + fsdp_table(fsdp, results) if fsdp else "")
    print("\n" + text.split("\n\n", 1)[1])
    path = args.json or OUT / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header, "results": results, "fsdp": fsdp}, indent=1))
    print(f"\nwritten: {path}")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
