"""``sharpscope spectrum`` and ``sharpscope inspect``: offline jobs over run files, and what a run holds.

The parsers are built without torch (``sharpscope --help`` answers at once): the commands import the jobs, the
run files and their readers when they run. The choices and defaults the parsers show are checked against the
code that uses them (``tests/test_cli_help.py``)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .executors import EXECUTORS

# :data:`sharpscope.runs.quantities.QUANTITIES` and the :class:`~sharpscope.runs.jobs.SpectrumSettings` defaults,
# written out so that the parser needs no torch
QUANTITY_NAMES = ("hessian", "precond", "ggn", "ntk", "trace", "density", "layers", "alignment")
SETTINGS_DEFAULTS = {"k": 5, "tol": 1e-6, "seed": 0, "trace_matvecs": 99, "density_probes": 10, "density_steps": 80,
                     "batchnorm": "batch", "device": "cpu"}
ONLINE_LOGS = ("sharpness", "sharpness_preconditioned", "eos_ratio")  # the Recorder's online sharpness logs


def _spectrum(args: argparse.Namespace) -> int:
    from .jobs import SpectrumSettings, run_spectrum_job

    quantities = [q.strip() for q in args.what.split(",") if q.strip()]
    settings = SpectrumSettings(k=args.k, tol=args.tol, seed=args.seed, trace_matvecs=args.trace_matvecs,
                                density_probes=args.density_probes, density_steps=args.density_steps,
                                device=args.device,
                                batchnorm=args.batchnorm)
    steps = _steps(args.steps)
    report = run_spectrum_job(args.runs, quantities, settings, executor=args.executor, steps=steps,
                              loss=args.loss, progress=not args.quiet, allow_factories=args.allow_factory)
    print(f"computed {report.computed} checkpoint(s), wrote {report.written} result(s), "
          f"skipped {report.skipped} already stored"
          + (f", {report.not_applicable} not applicable (no optimizer state yet, or every lr 0)" if report.not_applicable else ""))
    for line in report.failure_lines():
        print(line)
    for note in report.notes:
        print(f"note: {note}")
    return 1 if report.failures else 0


def _steps(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected comma-separated checkpoint steps, e.g. --steps 0,100,200") from None


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


def _results_info(run_path: Path, run_id: str | None, verify: bool) -> tuple[dict | None, list[str], list[dict]]:
    """What the run's spectra file holds (if it belongs to the run), its problems (``--verify``: every row's
    checksum and run id) and its rows (for ``--results``)."""
    from .h5file import RunFileError
    from .spectra import ForeignSpectraError, SpectraFile, spectra_path

    results = spectra_path(run_path)
    if not results.exists():
        return None, [], []
    try:
        with SpectraFile(results, run_id=run_id) as sf:
            rows = sf.rows()  # reads every row: checksums and run ids verified
            file_format = _format(sf.version, sf.checksummed)
    except ForeignSpectraError as err:
        note = f"{err} (the next spectrum job moves it aside)"
        return {"file": str(results), "foreign": note}, [note] if verify else [], []
    except RunFileError as err:
        return {"file": str(results), "damaged": str(err)}, [str(err)] if verify else [], []
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["quantity"]] = counts.get(row["quantity"], 0) + 1
    return {"file": str(results), "format": file_format, "rows": dict(sorted(counts.items()))}, [], rows


def _inspect(args: argparse.Namespace) -> int:
    from .h5file import RunFileError
    from .store import open_run

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
        online = _online_logs(run) if args.results else {}
        run_id = run.id
    info["results"], problems, rows = _results_info(Path(args.run), run_id, args.verify)
    if args.verify:
        info["problems"] += problems
    if args.results:
        info["stored_values"] = [_jsonable(row) for row in rows]
        info["online_sharpness"] = {name: [[step, _number(v)] for step, v in zip(*log)] for name, log in online.items()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info, args.verify)
        if args.results:
            for line in _value_tables(rows) + _online_table(online):
                print(line)
    return 1 if info.get("problems") else 0


# -- inspect --results --------------------------------------------------------------------------------------------
def _online_logs(run) -> dict[str, tuple[list[int], list[float]]]:
    """The Recorder's online sharpness logs that hold entries, by name: ``(steps, values)``."""
    logs = {}
    for name in ONLINE_LOGS:
        try:
            steps, values = run.scalars(name)
        except KeyError:  # an older file, or a log the Recorder did not create
            continue
        if len(steps):
            logs[name] = ([int(s) for s in steps], [float(v) for v in values])
    return logs


def _number(x: float) -> float | None:
    """A float for JSON (NaN and infinities as null: JSON has no such numbers)."""
    return float(x) if math.isfinite(x) else None


def _jsonable(row: dict) -> dict:
    info = {k: v for k, v in row["info"].items() if k != "run_id"}
    return {"quantity": row["quantity"], "settings": row["settings"], "step": row["step"],
            "values": [_number(v) for v in row["values"]], "residuals": [_number(v) for v in row["residuals"]],
            "num_matvecs": row["num_matvecs"], "seconds": row["seconds"], "info": info}


def _numbers(values: Any, limit: int = 6) -> str:
    """``a, b, c`` in 6 significant digits, at most ``limit`` of them (then how many more)."""
    shown = ", ".join(f"{float(v):.6g}" for v in list(values)[:limit])
    return shown + (f", ... (+{len(values) - limit})" if len(values) > limit else "")


def _row_cells(kind: str, row: dict) -> list[str]:
    """A result row as table cells, by the quantity's kind (:mod:`.quantities`)."""
    values, residuals, info = row["values"], row["residuals"], row["info"]
    if not len(values):
        return ["not applicable: " + str(info.get("not_applicable", "no values stored"))]
    if kind == "eigenvalues":
        converged = info.get("converged")
        cells = [_numbers(values), f"{max(abs(r) for r in residuals):.2e}" if len(residuals) else "-",
                 f"{sum(bool(c) for c in converged)}/{len(converged)}" if isinstance(converged, list) else "-"]
        if "threshold" in info:
            cells.append(f"{float(info['threshold']):.6g}")
        return cells
    if kind == "trace":
        return [f"{float(values[0]):.6g}", f"{float(residuals[0]):.3g}" if len(residuals) else "-"]
    if kind == "density":
        probes = info.get("nodes_per_probe") or []
        return [f"{len(values)} nodes, {len(probes)} probe(s)", f"[{min(values):.6g}, {max(values):.6g}]"]
    if kind == "alignment":
        return [_numbers(values), _numbers(residuals)]
    return [_numbers(values)]


_HEADERS = {"eigenvalues": ["values (top first)", "max residual", "converged"], "trace": ["estimate", "stderr"],
            "density": ["nodes", "support"], "layers": ["top eigenvalue per layer"],
            "alignment": ["update alignment per layer", "weight alignment per layer"], "values": ["values"]}


def _table(header: list[str], rows: list[list[str]], indent: str = "    ") -> list[str]:
    """Left-aligned columns; the first column (the step) right-aligned. A row of two cells where the header has
    more (a note: not applicable) spans the row and sets no column's width."""
    full = [r for r in [header, *rows] if len(r) == len(header)]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]
    widths[0] = max(len(r[0]) for r in [header, *rows])
    lines = []
    for r in [header, *rows]:
        cells = [r[0].rjust(widths[0])] + ([r[1]] if len(r) < len(header) else
                                           [c.ljust(w) for c, w in zip(r[1:], widths[1:])])
        lines.append(indent + "  ".join(cells).rstrip())
    return lines


def _value_tables(rows: list[dict]) -> list[str]:
    """The stored results, one table per quantity and settings: step, value(s), residuals and convergence
    (where the kind stores them), products."""
    from .quantities import REGISTRY

    if not rows:
        return ["stored values: none"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["quantity"], json.dumps(row["settings"], sort_keys=True)), []).append(row)
    lines = ["stored values:"]
    for (quantity, settings), members in groups.items():
        kind = REGISTRY[quantity].kind if quantity in REGISTRY else "values"  # a quantity of a newer version
        lines.append(f"  {quantity}  {settings}")
        header = ["step", *_HEADERS[kind], "products"]
        if kind == "eigenvalues" and any("threshold" in r["info"] for r in members):
            header.insert(-1, "threshold")
        if kind in ("layers", "alignment") and members[0]["info"].get("layers"):
            lines.append(f"    layers: {', '.join(members[0]['info']['layers'])}")
        table = []
        for row in sorted(members, key=lambda r: r["step"]):
            cells = _row_cells(kind, row)
            if len(cells) == 1 and not len(row["values"]):  # not applicable: one cell spanning the row
                table.append([str(row["step"]), cells[0]])
                continue
            cells += [""] * (len(header) - 2 - len(cells))
            table.append([str(row["step"]), *cells, str(row["num_matvecs"])])
        lines += _table(header, table)
    return lines


def _online_table(online: dict[str, tuple[list[int], list[float]]]) -> list[str]:
    """The online sharpness logs (``Recorder(sharpness_every=...)``) side by side, one row per logged step."""
    if not online:
        return ["online sharpness: none logged (Recorder(sharpness_every=N) logs it during training)"]
    names = list(online)
    by_step: dict[int, dict[str, float]] = {}
    for name, (steps, values) in online.items():
        for step, value in zip(steps, values):
            by_step.setdefault(step, {})[name] = value
    rows = [[str(step), *(f"{by_step[step][n]:.6g}" if n in by_step[step] else "-" for n in names)]
            for step in sorted(by_step)]
    return ["online sharpness (logged during training):", *_table(["step", *names], rows)]


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
    """Register ``sharpscope spectrum`` and ``sharpscope inspect`` (no torch needed)."""
    d = SETTINGS_DEFAULTS
    p = subparsers.add_parser(
        "spectrum", help="measure spectra at the checkpoints of run files",
        description="Offline spectrum jobs: rebuild each run's model from its meta, load every checkpoint and "
                    f"measure the quantities on the stored batch. Quantities: {', '.join(QUANTITY_NAMES)}. Results "
                    "go to RUN.spectra.h5; results already stored (same step, quantity and settings) are skipped "
                    "on re-runs. A run's model factory must be trusted: sharpscope's own, registered, or allowed "
                    "with --allow-factory (docs/trust.md).")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN.h5",
                   help="run files written by a Recorder (RUN.spectra.h5 files among them are skipped)")
    p.add_argument("--what", default="hessian", metavar="Q[,Q...]",
                   help=f"comma-separated quantities, from: {', '.join(QUANTITY_NAMES)}")
    p.add_argument("--k", type=int, default=d["k"], help="top eigenvalues per operator (hessian, precond, ggn, ntk)")
    p.add_argument("--tol", type=float, default=d["tol"],
                   help="Lanczos tolerance: an eigenvalue counts as converged when its Ritz residual is below tol "
                        "times its size")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="seed of the random start and probe vectors (Lanczos, Hutch++, SLQ); results under another "
                        "seed are stored beside these")
    p.add_argument("--trace-matvecs", type=int, default=d["trace_matvecs"],
                   help="Hessian-vector products per Hutch++ trace estimate (trace)")
    p.add_argument("--density-probes", type=int, default=d["density_probes"],
                   help="random probe vectors of the spectral density (density, stochastic Lanczos quadrature)")
    p.add_argument("--density-steps", type=int, default=d["density_steps"],
                   help="Lanczos steps per density probe, i.e. quadrature nodes per probe (density)")
    p.add_argument("--batchnorm", choices=["batch", "eval"], default=d["batchnorm"],
                   help="BatchNorm during the products: 'batch' normalizes with the stored batch's own statistics "
                        "(the training loss), 'eval' with the running statistics stored in the checkpoint")
    p.add_argument("--device", default=d["device"],
                   help="where the products run: cpu, cuda, cuda:N or auto (CUDA when available); runs captured on "
                        "any device")
    p.add_argument("--steps", metavar="S[,S...]",
                   help="comma-separated checkpoint steps (default: every complete checkpoint)")
    p.add_argument("--loss", help="override the run's loss: a torch.nn loss name (CrossEntropyLoss) or a trusted "
                                  "'module:function' (default: the loss the run recorded)")
    p.add_argument("--executor", default="local",
                   help=f"where the tasks run: {EXECUTORS} (docs/scale-out.md)")
    p.add_argument("--allow-factory", action="append", default=[], metavar="PATTERN",
                   help="trust model factories, losses and optimizers matching 'module:function', 'module:*' or "
                        "'package.*:*' (e.g. 'mypkg.models:*'); repeatable. A module that nothing installed "
                        "provides is looked for in the current folder too. Without it only sharpscope's own, "
                        "torch's and registered names are imported (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_spectrum)

    q = subparsers.add_parser("inspect", help="what a run file holds", description="Show a run file's format, "
                              "meta, axes, batch, checkpoints (and incomplete ones) and stored results; with "
                              "--results, the stored values and the online sharpness log.")
    q.add_argument("run", type=Path, metavar="RUN.h5", help="the run file a Recorder wrote")
    q.add_argument("--results", action="store_true",
                   help="also print the stored values, one table per quantity (step, values, Ritz residual and "
                        "convergence where stored, products), and the online sharpness logged during training")
    q.add_argument("--json", action="store_true", help="machine-readable output (with --results: the values too)")
    q.add_argument("--verify", action="store_true",
                   help="read and check everything stored: every checkpoint's checksums (v2), the batch (its "
                        "checksums and the provenance digest), the provenance digests and every result row (its "
                        "checksum and run id); exit status 1 if anything is damaged")
    q.set_defaults(func=_inspect)
