"""``sharpscope spectrum`` and ``sharpscope inspect``: offline jobs over run files, and what a run holds."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .h5file import RunFileError
from .jobs import SpectrumSettings, run_spectrum_job
from .quantities import QUANTITIES
from .spectra import ForeignSpectraError, SpectraFile, spectra_path
from .store import open_run


def _spectrum(args: argparse.Namespace) -> int:
    quantities = [q.strip() for q in args.what.split(",") if q.strip()]
    settings = SpectrumSettings(k=args.k, tol=args.tol, seed=args.seed, trace_matvecs=args.trace_matvecs,
                                density_probes=args.density_probes, density_steps=args.density_steps,
                                device=args.device,
                                batchnorm=args.batchnorm)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    report = run_spectrum_job(args.runs, quantities, settings, executor=args.executor, steps=steps,
                              loss=args.loss, progress=not args.quiet, allow_factories=args.allow_factory)
    print(f"computed {report.computed} checkpoint(s), wrote {report.written} result(s), "
          f"skipped {report.skipped} already stored"
          + (f", {report.not_applicable} not applicable (no optimizer state yet, or every lr 0)" if report.not_applicable else ""))
    for path, step, message in report.failures:
        print(f"FAILED {path} step {step}: {message}")
    for note in report.notes:
        print(f"note: {note}")
    return 1 if report.failures else 0


def _format(version: int, checksummed: bool) -> str:
    return f"v{version}, " + ("checksummed rows" if checksummed else "no checksums")


def _describe_batch(batch) -> dict | None:
    """Kind and shapes of the stored batch (JSON)."""
    if batch is None:
        return None
    if isinstance(batch, dict):
        return {"kind": "mapping", "tensors": {k: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                                               for k, t in batch.items()}}
    inputs, targets = batch
    return {"kind": "tuple", "inputs": [list(t.shape) for t in inputs],
            "targets": None if targets is None else list(targets.shape)}


def _optimizer_line(opt) -> str:
    """The meta's optimizer description, or what is wrong with it (the meta is the caller's JSON)."""
    if opt is None:
        return "None"
    if isinstance(opt, dict) and isinstance(opt.get("class"), str):
        groups = opt.get("param_groups")
        return opt["class"] + (f", {len(groups)} param group(s)" if isinstance(groups, list) else "")
    return f"{json.dumps(opt)[:60]} (not an optimizer description: expected an object with 'class' and 'param_groups')"


def _results_info(run_path: Path, run_id: str | None, verify: bool) -> tuple[dict | None, list[str]]:
    """What the run's spectra file holds (if it belongs to the run), and its problems (``--verify``: every
    row's checksum and run id)."""
    results = spectra_path(run_path)
    if not results.exists():
        return None, []
    try:
        with SpectraFile(results, run_id=run_id) as sf:
            counts: dict[str, int] = {}
            for _, quantity, _ in sf.keys():  # reads every row: checksums and run ids verified
                counts[quantity] = counts.get(quantity, 0) + 1
            return {"file": str(results), "format": _format(sf.version, sf.checksummed),
                    "rows": dict(sorted(counts.items()))}, []
    except ForeignSpectraError as err:
        note = f"{err} (the next spectrum job moves it aside)"
        return {"file": str(results), "foreign": note}, [note] if verify else []
    except RunFileError as err:
        return {"file": str(results), "damaged": str(err)}, [str(err)] if verify else []


def _inspect(args: argparse.Namespace) -> int:
    with open_run(args.run) as run:
        steps = run.steps
        provenance = run.provenance
        info = {
            "file": str(run.path), "id": run.id, "format": _format(run.version, run.checksummed),
            "versions": run.versions, "meta": run.meta, "axes": run.axes,
            "config_digest": provenance.get("config_digest") if provenance else None,
            "checkpoints": len(steps), "steps": steps if len(steps) <= 20 else steps[:10] + ["..."] + steps[-5:],
            "incomplete_checkpoints": run.incomplete,
            "tensors": {kind: sum(1 for s in run.specs if s.kind == kind) for kind in ("param", "buffer", "optim")},
            "parameters": sum(int(math.prod(s.shape)) for s in run.specs if s.kind == "param"),
        }
        if args.verify:
            info["problems"] = run.verify()
        try:
            info["batch"] = _describe_batch(run.batch())
        except RunFileError as err:
            info["batch"] = {"kind": "damaged", "problem": str(err)}
            if not args.verify:
                info.setdefault("problems", []).append(str(err))
        run_id = run.id
    info["results"], problems = _results_info(Path(args.run), run_id, args.verify)
    if args.verify:
        info["problems"] += problems
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info, args.verify)
    return 1 if info.get("problems") else 0


def _print_info(info: dict, verify: bool) -> None:
    print(f"{info['file']}  (sharpscope {info['versions'].get('sharpscope')}, torch {info['versions'].get('torch')})")
    print(f"  id:          {info['id'] or 'none (an older file: its spectra are matched by path)'}")
    print(f"  format:      {info['format']}")
    meta = info["meta"]
    kwargs = meta.get("model_kwargs")
    print(f"  model:       {meta.get('model_factory') or meta.get('model_class')} {json.dumps(kwargs if kwargs else {})}")
    print(f"  loss:        {meta.get('loss')}")
    print(f"  optimizer:   {_optimizer_line(meta.get('optimizer'))}")
    if info["axes"]:
        print(f"  axes:        {json.dumps(info['axes'], sort_keys=True)}")
    if info["config_digest"]:
        print(f"  config:      {info['config_digest']}")
    print(f"  parameters:  {info['parameters']:,} in {info['tensors']['param']} tensors; "
          f"{info['tensors']['buffer']} buffers; {info['tensors']['optim']} optimizer-state tensors")
    batch = info["batch"]
    if batch is None:
        print("  batch:       none")
    elif batch["kind"] == "damaged":
        print(f"  batch:       DAMAGED: {batch['problem']}")
    elif batch["kind"] == "mapping":
        print(f"  batch:       {', '.join(f'{k} {v[0]} {v[1]}' for k, v in batch['tensors'].items())}")
    else:
        print(f"  batch:       inputs {batch['inputs']}, targets {batch['targets']}")
    print(f"  checkpoints: {info['checkpoints']} complete, steps {info['steps']}")
    if info["incomplete_checkpoints"]:
        print(f"  incomplete:  {info['incomplete_checkpoints']} (being written, or lost in a crash)")
    for problem in info.get("problems", []):
        print(f"  DAMAGED:     {problem}")
    if verify and not info["problems"]:
        print("  verified:    every checkpoint reads back intact"
              + ("" if info["format"].endswith("checksummed rows") else " (no checksums: only unreadable rows would show)"))
    results = info["results"]
    if results is None:
        print("  results:     none (run sharpscope spectrum)")
    elif "rows" in results:
        print(f"  results:     {results['rows']} ({results['format']})")
    else:
        print(f"  results:     {results.get('foreign') or results.get('damaged')}")


def add_parser(subparsers) -> None:
    """Register ``sharpscope spectrum`` and ``sharpscope inspect``."""
    p = subparsers.add_parser("spectrum", help="measure spectra at the checkpoints of run files",
                              description=f"Offline spectrum jobs. Quantities: {', '.join(QUANTITIES)}. "
                                          "Results go to RUN.spectra.h5; finished ones are skipped on re-runs.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN.h5")
    p.add_argument("--what", default="hessian", help="comma-separated quantities (default: hessian)")
    p.add_argument("--k", type=int, default=5, help="eigenvalues per operator (default 5)")
    p.add_argument("--tol", type=float, default=1e-6, help="Lanczos relative residual tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace-matvecs", type=int, default=99, help="Hutch++ products for trace (default 99)")
    p.add_argument("--density-probes", type=int, default=10)
    p.add_argument("--density-steps", type=int, default=80)
    p.add_argument("--batchnorm", choices=["batch", "eval"], default="batch")
    p.add_argument("--device", default="cpu", help="where the products run: cpu (default), cuda, cuda:N or auto "
                                                   "(CUDA when available); runs captured on any device")
    p.add_argument("--steps", help="comma-separated checkpoint steps (default: all)")
    p.add_argument("--loss", help="override the run's loss (torch.nn name or module:function)")
    p.add_argument("--executor", default="local",
                   help="local (default), process:N, dask-local:N (a LocalCluster) or dask://HOST:PORT")
    p.add_argument("--allow-factory", action="append", default=[], metavar="PATTERN",
                   help="trust model factories, losses and optimizers matching this 'module:attr' glob "
                        "(e.g. 'mypkg.models:*'); repeatable. Without it only sharpscope's own, torch's and "
                        "registered names are imported from run files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_spectrum)

    q = subparsers.add_parser("inspect", help="what a run file holds", description="Show a run file's format, "
                              "meta, axes, batch, checkpoints (and incomplete ones) and stored results.")
    q.add_argument("run", type=Path, metavar="RUN.h5")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--verify", action="store_true",
                   help="read and check everything stored: every checkpoint's checksums (v2), the batch (its "
                        "checksums and the provenance digest), the provenance digests and every result row (its "
                        "checksum and run id); exit status 1 if anything is damaged")
    q.set_defaults(func=_inspect)
