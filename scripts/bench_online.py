"""What online sharpness costs in a training loop, and how accurate it is (docs/bench-notes.md, "Online tracking").

For each problem, one interleaved run (``--reps`` rounds of: the plain loop, the loop with a ``Recorder``
that measures nothing (its own overhead), the loop with ``Recorder(sharpness_every=K)``, with ``--before``
the same with main 67ee995's measurement (the first solve from a random vector instead of the gradient),
and with ``--legacy`` the measurement as main 53faba8 made it -- a new operator per measurement,
``lanczos(k=1, tol=1e-4)`` warm-started, default basis) prints the median time ratio to the plain loop,
products per measurement (median, first, mean) and, from one more untimed tracked run, the largest relative
error of the logged values against a converged solve (``lanczos(tol=1e-8)`` on a float64 copy) at the same
checkpoints. Every variant runs once untimed first (imports, allocator, thread pool).

Problems: ``mlp`` (the issue's bench: a 64-512-512-10 tanh MLP, SGD, full batch 1024, sharpness batch 256),
``cnn_adam`` (alias ``cnn``: a ReLU CNN with Adam, batch 256, sharpness batch 128), ``gpt2_hf`` (alias
``gpt2``: a tiny GPT-2 from ``transformers.GPT2Config`` trained by a Hugging Face ``Trainer``, tracked
through ``ss.huggingface_callback``; nothing downloaded).

    PYTHONPATH=. python scripts/bench_online.py --problems mlp,cnn_adam,gpt2_hf --reps 3 --before --legacy
"""
from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import sharpscope as ss
from sharpscope.online import OnlineSharpness
from sharpscope.runs.capture import Recorder

# the timer of the runs: wall time (default), or with --clock cpu this process's CPU time, steadier on a shared
# machine (with --threads 1: a thread waiting for a core counts nothing)
CLOCK = [time.perf_counter]


class LegacyOnline(OnlineSharpness):
    """The measurement as main 53faba8 made it: a new operator at every measurement (its determinism check,
    graph and first-product derivative check each time), ``tol=1e-4``, the default basis."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, tol=1e-4, max_basis=None, **kwargs)

    def measure(self, step: int):
        self.operator = None
        return super().measure(step)

    def _gradient(self, op):
        return None  # main 53faba8 started from a random vector


class MainOnline(OnlineSharpness):
    """The measurement as main 67ee995 made it: this one, with the first solve from a random vector."""

    def _gradient(self, op):
        return None


ONLINE = {"online": None, "before": MainOnline, "legacy": LegacyOnline}


def converged(model, opt, loss_fn, batch) -> float:
    """The reference: ``lanczos(tol=1e-8)`` on a float64 copy of the model, its optimizer state and the batch
    (float32 products cannot reach a 1e-8 residual)."""
    twin = copy.deepcopy(model).double()
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(twin.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[names[id(p)]] for p in g["params"]]}
              for g in opt.param_groups]
    accepted = inspect.signature(type(opt)).parameters  # torch's AdamW keeps a default its constructor refuses
    twin_opt = type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in accepted})  # the reference lr of D
    twin_opt.load_state_dict(opt.state_dict())  # casts the state to float64
    if isinstance(batch, dict):
        batch = dict(batch)
    else:
        batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    P = ss.preconditioned_hessian_operator(twin, loss_fn, batch, twin_opt)
    return float(ss.lanczos(P, k=1, tol=1e-8).eigenvalues[0])


# -- problems: (model, optimizer, one training step, sharpness batch, loss) ---------------------------
def mlp(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(1024, 64), torch.randint(0, 10, (1024,))
    return model, opt, (x, y), (x[:256], y[:256]), nn.CrossEntropyLoss()


def cnn(seed: int):
    torch.manual_seed(seed)
    model = ss.CNN(width=16, depth=2, in_channels=3, num_classes=10, image_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,))
    return model, opt, (x, y), (x[:128], y[:128]), nn.CrossEntropyLoss()


def train(problem, seed: int, steps: int, every: int | None, variant: str | None = None, reference: bool = False):
    """One run; returns (seconds, Recorder or None, [(step, logged, converged)]). ``every`` None with a ``variant``:
    a Recorder that measures nothing; ``variant`` "online", "before" or "legacy" picks the measurement
    (:data:`ONLINE`). With ``reference``, the model and optimizer state are copied at each measured step (a few
    ms) and the converged values computed after the timed loop, on copies."""
    model, opt, data, sbatch, loss_fn = problem(seed)
    snapshots = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)  # a run file without a model factory: not rebuilt here
        rec = None
        start = CLOCK[0]()
        if variant is not None:
            rec = Recorder(Path(tmp) / "run.h5", model, opt, batch=sbatch, schedule="on_demand", loss_fn=loss_fn,
                           sharpness_every=every)
            if every is not None and ONLINE[variant] is not None:
                rec.online = ONLINE[variant](model, loss_fn, sbatch, opt, warn=rec._warn_once)
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(data[0]), data[1])
            loss.backward()
            opt.step()
            if rec is not None:
                rec.step(loss=loss.detach())
                if reference and every and rec.step_count % every == 0 and rec.sharpness_log:
                    snapshots.append((rec.step_count, rec.sharpness_log[-1][1], copy.deepcopy(model),
                                      copy.deepcopy(opt.state_dict())))
        seconds = CLOCK[0]() - start
        if rec is not None:
            rec.close()
        errors = []
        for step, logged, twin, state in snapshots:
            accepted = inspect.signature(type(opt)).parameters
            twin_opt = type(opt)(twin.parameters(), **{k: v for k, v in opt.defaults.items() if k in accepted})
            twin_opt.load_state_dict(state)
            errors.append((step, logged, converged(twin, twin_opt, loss_fn, sbatch)))
    return seconds, rec, errors


# -- GPT-2 through the Hugging Face Trainer ----------------------------------------------------------------
def gpt2_run(seed: int, steps: int, every: int | None, variant: str | None = None, reference: bool = False):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (64, 32), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(32, dtype=torch.long), "labels": ids[i]}
            for i in range(64)]
    sbatch = {k: torch.stack([r[k] for r in rows[:8]]) for k in rows[0]}
    errors = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        args = transformers.TrainingArguments(output_dir=str(Path(tmp) / "hf"), per_device_train_batch_size=16,
                                              max_steps=steps, logging_steps=10**6, save_strategy="no", report_to="none",
                                              use_cpu=True, learning_rate=1e-3, lr_scheduler_type="constant",
                                              disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        callback = None
        if variant is not None:
            callback = ss.huggingface_callback(str(Path(tmp) / "lm.h5"), batch=sbatch, schedule="on_demand",
                                               sharpness_every=every)
            callback.attach(trainer)
            if every is not None and (ONLINE[variant] is not None or reference):
                _instrument(callback, ONLINE[variant], reference, errors)
        start = CLOCK[0]()
        trainer.train()
        seconds = CLOCK[0]() - start
    return seconds, callback.recorder if callback is not None else None, errors


def _instrument(callback, kind, reference: bool, errors: list) -> None:
    """Swap in another measurement (``kind``, a class) and/or record a converged reference after each one."""
    begin, end = callback.on_train_begin, callback.on_step_end

    def on_train_begin(*a, **k):
        out = begin(*a, **k)
        rec = callback.recorder
        if kind is not None:
            rec.online = kind(rec.model, rec.loss_fn, rec.batch, rec.optimizer, warn=rec._warn_once)
        return out

    def on_step_end(*a, **k):
        out = end(*a, **k)
        rec = callback.recorder
        if reference and rec.sharpness_log and rec.sharpness_log[-1][0] == rec.step_count:
            errors.append((rec.step_count, rec.sharpness_log[-1][1], converged(rec.model, rec.optimizer, rec.loss_fn, rec.batch)))
        return out

    callback.on_train_begin, callback.on_step_end = on_train_begin, on_step_end


PROBLEMS = {"mlp": lambda *a, **k: train(mlp, *a, **k), "cnn_adam": lambda *a, **k: train(cnn, *a, **k),
            "gpt2_hf": gpt2_run}
ALIASES = {"cnn": "cnn_adam", "gpt2": "gpt2_hf"}


def bench(name: str, reps: int, steps: int, every: int, before: bool, legacy: bool, errors: bool = True) -> None:
    run = PROBLEMS[name]
    variants = {"plain": dict(every=None), "recorder": dict(every=None, variant="online"),
                "online": dict(every=every, variant="online")}
    if before:
        variants["before"] = dict(every=every, variant="before")
    if legacy:
        variants["legacy"] = dict(every=every, variant="legacy")
    times = {v: [] for v in variants}
    recs, refs = {}, {}
    for kw in variants.values():  # warm-up: imports (lanczos, scipy), allocator, thread pool
        run(0, min(steps, every), **kw)
    for rep in range(reps):
        for v, kw in variants.items():
            # the last round also copies the state at each measured step (the mlp and cnn; GPT-2 replays the run)
            reference = errors and rep == reps - 1 and kw["every"] is not None and name != "gpt2_hf"
            seconds, rec, ref = run(0, steps, **kw, reference=reference)
            times[v].append(seconds)
            recs[v], refs[v] = rec, ref
            print(f"  round {rep}: {v} {seconds:.2f} s", flush=True)
    clock = "CPU time" if CLOCK[0] is time.process_time else "wall time"
    print(f"\n[{name}] {steps} steps, sharpness_every={every}, {reps} interleaved rounds, "
          f"{torch.get_num_threads()} threads, {clock}")
    print(f"  plain: median {statistics.median(times['plain']):.2f} s  ({', '.join(f'{t:.2f}' for t in times['plain'])})")
    for v, kw in variants.items():
        if v == "plain":
            continue
        ratios = [t / p for t, p in zip(times[v], times["plain"])]
        line = (f"  {v}: median {statistics.median(times[v]):.2f} s, ratio {statistics.median(ratios):.3f}x "
                f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})")
        if kw["every"] is not None:
            cost = recs[v].online_cost
            ref = (refs[v] or run(0, steps, **kw, reference=True)[2]) if errors else []
            rel = [abs(a - b) / abs(b) for _, a, b in ref]
            err = max(rel, default=float("nan"))
            mid = statistics.median(rel) if rel else float("nan")
            first = next((m.start for m in recs[v].online.history if m.skipped is None), "none")
            line += (f"; products per measurement median {cost.products_median:g}, first {cost.products_first} "
                     f"(from {first}), "
                     f"mean {cost.products_total / max(cost.measurements, 1):.2f}; "
                     f"{cost.seconds / cost.measurements * 1e3:.0f} ms (wall) per measurement; max relative error vs "
                     f"lanczos(tol=1e-8) {err:.1e} (median {mid:.1e}) over {len(ref)} checkpoints")
        print(line, flush=True)


def breakdown(name: str, repeats: int = 5) -> None:
    """Where a measurement's fixed cost goes, on one operator reused across solves (medians of ``repeats``):
    a forward pass of the sharpness batch (no graph), the first product of a solve (the determinism check's two
    evaluations, the gradient graph, the product) and a later product of the same solve (the second backward)."""
    model, opt, data, sbatch, loss_fn = {"mlp": mlp, "cnn_adam": cnn}[name](0)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        opt.step()
    P = ss.preconditioned_hessian_operator(model, loss_fn, sbatch, opt)
    v = torch.randn(P.shape[0])
    P @ v  # the derivative check, once per operator
    fwd, first, later = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            loss_fn(model(sbatch[0]), sbatch[1])
        fwd.append(time.perf_counter() - t)
        with P.pinned():
            t = time.perf_counter()
            P @ v
            first.append(time.perf_counter() - t)
            t = time.perf_counter()
            P @ v
            later.append(time.perf_counter() - t)
    f, a, b = (statistics.median(x) * 1e3 for x in (fwd, first, later))
    print(f"\n[{name} breakdown] forward {f:.1f} ms; first product of a solve {a:.1f} ms; later product {b:.1f} ms; "
          f"fixed cost per solve {a - b:.1f} ms = {(a - b) / b:.1f} products (determinism check ~ 2 forwards = "
          f"{2 * f:.1f} ms; the rest the gradient graph)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="mlp", help="comma-separated: mlp, cnn_adam, gpt2_hf (default mlp)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--every", type=int, default=10, help="sharpness_every (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time the runs by wall time (default) or by this process's CPU time (a loaded machine)")
    parser.add_argument("--before", action="store_true", help="also time main 67ee995's measurement (A/B)")
    parser.add_argument("--legacy", action="store_true", help="also time main 53faba8's measurement (A/B)")
    parser.add_argument("--no-errors", action="store_true", help="skip the converged reference solves")
    parser.add_argument("--breakdown", action="store_true", help="only the fixed cost per measurement (mlp, cnn)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    for name in args.problems.split(","):
        name = ALIASES.get(name.strip(), name.strip())
        if args.breakdown:
            breakdown(name)
            continue
        bench(name, args.reps, args.steps, args.every, args.before, args.legacy, not args.no_errors)


if __name__ == "__main__":
    main()
