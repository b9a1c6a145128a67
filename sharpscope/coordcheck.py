r"""Coordinate check: does every layer's activation scale stay width-independent during training?

For each width n the model is put into the chosen parameterization (:func:`sharpscope.param.parametrize`),
trained for ``steps`` optimizer steps on one fixed synthetic batch, and after every step t the RMS
size of each followed layer's output, :math:`\mathrm{RMS}(h_t) = \sqrt{\mathrm{mean}(h_t^2)}`, and of
its change since initialization, :math:`\mathrm{RMS}(h_t - h_0)`, are recorded on that batch. Under
muP both are flat in n (Yang et al. 2022, "Tensor Programs V", Sec. 7 and microsoft/mup's coord
check); under SP at a fixed lr the change of the output logits grows with width (slope ~1 on
log-log axes, as the readout update adds n aligned terms).

Results are a long table of ``(width, seed, step, layer, quantity, value)`` records plus the
least-squares slope of :math:`\log(\text{mean over seeds})` against :math:`\log n` for every
(step, layer, quantity). What it proves: the first ``steps`` updates have the intended width
scaling. What it cannot: that the optimum lr transfers (a 3-step check is known to pass on setups
whose transfer fails; run at least 5 steps, and check transfer itself with an lr sweep).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - PyTorch's own convention

from .models import build_model
from .optim import build_optimizer
from .param import parametrize
from .progress import progress_bar

__all__ = ["coord_check", "CoordCheckResult", "plot_coord_check", "fit_slopes", "run_cli"]

COORD_STATISTICS = ("act_rms", "delta_rms")  # per layer: RMS activation, and its change since init


@dataclass(frozen=True)
class CoordCheckResult:
    """Long-format records, fitted log-log slopes and the settings that produced them."""

    records: list[dict]
    slopes: list[dict]
    settings: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["layer"] for r in self.records))

    @property
    def widths(self) -> list[int]:
        return sorted({r["width"] for r in self.records})

    @property
    def steps(self) -> list[int]:
        return sorted({r["step"] for r in self.records})

    def slope(self, layer: str = "output", quantity: str = "delta_rms", step: int | None = None) -> float:
        """Fitted d log(value) / d log(width) (default: the last step); NaN where undefined."""
        step = self.steps[-1] if step is None else step
        for s in self.slopes:
            if (s["layer"], s["quantity"], s["step"]) == (layer, quantity, step):
                return float("nan") if s["slope"] is None else s["slope"]
        raise KeyError(f"no slope for layer={layer!r}, quantity={quantity!r}, step={step}; "
                       f"layers: {self.layers}, steps: {self.steps}")

    def values(self, layer: str, quantity: str, step: int) -> dict[int, float]:
        """Mean over seeds per width."""
        by_width: dict[int, list[float]] = {}
        for r in self.records:
            if (r["layer"], r["quantity"], r["step"]) == (layer, quantity, step):
                by_width.setdefault(r["width"], []).append(np.nan if r["value"] is None else r["value"])
        return {w: float(np.mean(v)) for w, v in sorted(by_width.items())}

    def to_json(self) -> dict:
        return {"settings": self.settings, "slopes": self.slopes, "records": self.records}


def fit_slopes(records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Least-squares slope of log(mean over seeds) vs log(width) per (step, layer, quantity).

    ``None`` (valid JSON) where a value is zero, negative or undefined (e.g. the change at step 0).
    """
    keys = list(dict.fromkeys((r["step"], r["layer"], r["quantity"]) for r in records))
    grouped: dict[tuple, dict[int, list[float]]] = {k: {} for k in keys}
    for r in records:
        value = np.nan if r["value"] is None else r["value"]
        grouped[(r["step"], r["layer"], r["quantity"])].setdefault(r["width"], []).append(value)
    out = []
    for (step, layer, quantity), by_width in grouped.items():
        widths = np.array(sorted(by_width), dtype=float)
        means = np.array([np.mean(by_width[int(w)]) for w in widths])
        ok = len(widths) >= 2 and bool(np.all(np.isfinite(means)) and np.all(means > 0))
        slope = float(np.polyfit(np.log(widths), np.log(means), 1)[0]) if ok else None
        out.append({"step": step, "layer": layer, "quantity": quantity, "slope": slope})
    return out


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def _followed_layers(model: nn.Module) -> dict[str, nn.Module]:
    if hasattr(model, "coord_layers"):
        return dict(model.coord_layers())
    leaves = {n: m for n, m in model.named_modules()
              if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))}
    if not leaves:
        raise ValueError(f"{type(model).__name__} has no layers with parameters to follow")
    return leaves


def _capture(model: nn.Module, layers: Mapping[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(
        name, (out[0] if isinstance(out, tuple) else out).detach().clone())) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _loss(model: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if hasattr(model, "auxiliary_loss"):
        loss = loss + model.auxiliary_loss()
    return loss


def _model_builder(model: str | Callable[[int], nn.Module], model_kwargs: Mapping[str, Any] | None
                   ) -> Callable[[int], nn.Module]:
    if callable(model) and not isinstance(model, str):
        return model
    kwargs = dict(model_kwargs or {})
    if "width" in kwargs:
        raise ValueError("model_kwargs must not contain 'width': the coord check sets it")
    return lambda width: build_model(model, {**kwargs, "width": width})


def _check_inputs(widths: Sequence[int], steps: int, seeds: Sequence[int], batch_size: int) -> list[int]:
    widths = sorted({int(w) for w in widths})
    if len(widths) < 2 or widths[0] <= 0:
        raise ValueError(f"need at least two distinct positive widths, got {list(widths)}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer (5 or more recommended), got {steps!r}")
    if not seeds:
        raise ValueError("need at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return widths


def coord_check(model: str | Callable[[int], nn.Module] = "mlp", *, widths: Sequence[int] = (64, 128, 256, 512, 1024),
                parameterization: str = "mup", optimizer: str = "adam", lr: float = 1e-2, steps: int = 5,
                base_width: int | None = None, model_kwargs: Mapping[str, Any] | None = None,
                seeds: Sequence[int] = (0,), batch_size: int = 32,
                data: tuple[torch.Tensor, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
                optimizer_kwargs: Mapping[str, Any] | None = None, progress: bool = False,
                **parametrize_kwargs: Any) -> CoordCheckResult:
    """Train every width ``steps`` steps and record each followed layer's RMS size and change.

    Args:
        model: a family name (``"mlp"``, ``"cnn"``, ``"transformer"``, ``"moe"``), a ``"module:function"``
            factory taking ``width=`` (plus ``model_kwargs``), or a callable ``width -> nn.Module``.
        widths: at least two widths; ``base_width`` defaults to the smallest.
        parameterization, optimizer, lr: as in :func:`sharpscope.param.parametrize` (``lr`` = base lr).
        data: ``(inputs, targets)`` for cross-entropy; default ``model.example_batch(batch_size)``.
        parametrize_kwargs: passed on (``lr_scaling=``, ``depth_scaling=``, ``roles=`` ...).

    Returns:
        :class:`CoordCheckResult` with records for steps 0..steps (step t = after t updates).
    """
    widths = _check_inputs(widths, steps, seeds, batch_size)
    build = _model_builder(model, model_kwargs)
    base_width = base_width or widths[0]
    with torch.device("meta"):
        base_model, delta_model = build(base_width), build(2 * widths[-1] + base_width)
    records: list[dict] = []
    bar = progress_bar(len(widths) * len(seeds), "coord check", progress, leave=False)
    for seed in seeds:
        for width in widths:
            records += _run_one(build, width, seed, base_model, delta_model, parameterization, optimizer, lr,
                                steps, batch_size, data, dtype, dict(optimizer_kwargs or {}), parametrize_kwargs)
            bar.update(1)
    bar.close()
    settings = {"model": model if isinstance(model, str) else getattr(model, "__name__", repr(model)),
                "model_kwargs": dict(model_kwargs or {}), "widths": widths, "base_width": base_width,
                "parameterization": parameterization, "optimizer": optimizer, "lr": lr, "steps": steps,
                "seeds": list(seeds), "batch_size": batch_size, "dtype": str(dtype).replace("torch.", ""),
                **{k: v for k, v in parametrize_kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}}
    return CoordCheckResult(records, fit_slopes(records), settings)


def _run_one(build, width, seed, base_model, delta_model, parameterization, optimizer, lr, steps, batch_size,
             data, dtype, optimizer_kwargs, parametrize_kwargs) -> list[dict]:
    net = build(width).to(dtype)
    groups = parametrize(net, parameterization, optimizer=optimizer, lr=lr, base_model=base_model,
                         delta_model=delta_model, seed=seed, **parametrize_kwargs)
    opt = build_optimizer(groups, **optimizer_kwargs)
    x, y = data if data is not None else _example(net, batch_size, seed)
    x = x.to(dtype) if x.is_floating_point() else x
    layers = _followed_layers(net)
    first = _capture(net, layers, x)
    out = []
    for step in range(steps + 1):
        now = first if step == 0 else _capture(net, layers, x)
        for name, h in now.items():
            out.append({"width": width, "seed": seed, "step": step, "layer": name, "quantity": "act_rms",
                        "value": _rms(h)})
            delta = _rms(h - first[name]) if h.shape == first[name].shape else None
            out.append({"width": width, "seed": seed, "step": step, "layer": name, "quantity": "delta_rms",
                        "value": delta})
        if step < steps:
            opt.zero_grad()
            _loss(net, net(x), y).backward()
            opt.step()
    return out


def _example(net: nn.Module, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not hasattr(net, "example_batch"):
        raise ValueError(f"{type(net).__name__} has no example_batch(): pass data=(inputs, targets)")
    return net.example_batch(batch_size, torch.Generator().manual_seed(10_000 + seed))


def plot_coord_check(result: CoordCheckResult, path: str | Path | None = None, *,
                     steps: Sequence[int] | None = None, title: str | None = None):
    """Log-log RMS (activations and their change since init) vs width, one column per step.

    Returns the matplotlib figure; saved to ``path`` (PNG/PDF by suffix) when given.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = list(steps) if steps is not None else _default_steps(result.steps)
    fig, axes = plt.subplots(len(COORD_STATISTICS), len(steps), figsize=(3.4 * len(steps), 6.2), squeeze=False,
                             sharex=True)
    for row, quantity in enumerate(COORD_STATISTICS):
        for col, step in enumerate(steps):
            ax = axes[row][col]
            for i, layer in enumerate(result.layers):
                vals = result.values(layer, quantity, step)
                w, v = np.array(list(vals)), np.array(list(vals.values()))
                ok = np.isfinite(v) & (v > 0)
                if ok.any():
                    slope = _safe_slope(result, layer, quantity, step)
                    ax.loglog(w[ok], v[ok], "o-", color=f"C{i % 10}", ms=3, lw=1.2,
                              label=f"{layer} ({slope:+.2f})")
            ax.set_title(f"{'RMS(h)' if quantity == 'act_rms' else 'RMS(h - h0)'}, step {step}", fontsize=9)
            if row == len(COORD_STATISTICS) - 1:
                ax.set_xlabel("width")
            ax.set_xticks(result.widths, [str(w) for w in result.widths], fontsize=7)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if ax.lines:
                ax.legend(fontsize=6, loc="best", title="layer (slope)", title_fontsize=6)
    s = result.settings
    fig.suptitle(title or f"coord check: {s.get('parameterization')} / {s.get('optimizer')}, lr {s.get('lr')}, "
                          f"{s.get('model')}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _safe_slope(result: CoordCheckResult, layer: str, quantity: str, step: int) -> float:
    try:
        return result.slope(layer, quantity, step)
    except KeyError:
        return float("nan")


def _default_steps(available: Sequence[int]) -> list[int]:
    last = available[-1]
    if last <= 3:
        return list(range(1, last + 1)) or [0]
    return sorted({1, math.ceil(last / 3), math.ceil(2 * last / 3), last})


# -- command line ------------------------------------------------------------------------------------
def run_cli(args: argparse.Namespace) -> int:
    """``sharpscope coordcheck``: one PNG per parameterization and coordcheck.json under --out."""
    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--kwargs is not valid JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--kwargs must be a JSON object")
    if args.steps < 5:
        print(f"note: {args.steps} steps; a coord check needs at least 5 to catch known failures")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in [p.strip() for p in args.param.split(",") if p.strip()]:
        res = coord_check(args.model, widths=args.widths, parameterization=name, optimizer=args.optimizer,
                          lr=args.lr, steps=args.steps, base_width=args.base_width, model_kwargs=kwargs,
                          seeds=list(range(args.seeds)), batch_size=args.batch_size, progress=not args.quiet,
                          lr_scaling=args.lr_scaling, depth_scaling=args.depth_scaling)
        png = out / f"coordcheck_{name}.png"
        plot_coord_check(res, png)
        results.append(res.to_json())
        print(f"{name:>4} / {args.optimizer}: slope of log RMS(logits - logits0) vs log width at step "
              f"{res.steps[-1]}: {res.slope('output', 'delta_rms'):+.3f}   ({png})")
    (out / "coordcheck.json").write_text(json.dumps({"results": results}, indent=1, allow_nan=False))
    print(f"saved {out / 'coordcheck.json'}")
    return 0
