"""Comparison figures across widths (or depths): one function per figure, each usable on its own.

Every function takes plain data (dicts keyed by width of ``(steps, values)`` arrays, or
``{lr: loss}`` maps), draws on a new figure (or the given ``ax``), returns the figure, and saves it
when ``path`` is given (the suffix picks PNG or PDF). Widths are coloured along a sequential
colormap with a colorbar, so the eye reads "dark = small, light = large" whatever the number of
widths. Plots know nothing of torch or of run files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["trajectories", "spread", "lr_sweep", "density_overlay", "layer_heatmap", "alignment_exponents", "save"]

Trajectories = Mapping[float, tuple[Sequence[float], Sequence[float]]]


def _plt():
    import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves

    return plt


def _width_colors(widths: Sequence[float], cmap: str = "viridis"):
    """A colour per width on a log scale of ``cmap`` (a linear one when a value is 0 or negative, e.g. a
    weight decay of 0; the too-light end cut off, so every curve shows on white), plus the matching
    ScalarMappable for the colorbar."""
    import matplotlib as mpl

    ws = np.asarray(sorted(widths), dtype=float)
    if len(ws) == 0:
        raise ValueError("nothing to plot: no widths")
    lo, hi = ws.min(), ws.max()
    top = hi if hi > lo else lo + max(abs(lo), 1.0) * 1e-4
    norm = mpl.colors.LogNorm(vmin=lo, vmax=top) if lo > 0 else mpl.colors.Normalize(vmin=lo, vmax=top)
    cm = mpl.colors.LinearSegmentedColormap.from_list(f"{cmap}-cut", mpl.colormaps[cmap](np.linspace(0.0, 0.85, 256)))
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=cm)
    mappable.widths = ws
    return {w: cm(norm(w)) for w in ws}, mappable


def _axes(ax, figsize=(6.4, 4.0)):
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    return fig, ax


def _spans_decades(values: np.ndarray) -> bool:
    v = np.abs(values[np.isfinite(values) & (values != 0)])
    return v.size > 1 and np.all(values[np.isfinite(values)] > 0) and v.max() / v.min() > 30


def _colorbar(fig, ax, mappable, label: str) -> None:
    bar = fig.colorbar(mappable, ax=ax, label=label, pad=0.02)
    bar.set_ticks(mappable.widths, labels=[f"{w:g}" for w in mappable.widths])
    bar.minorticks_off()


def save(fig, path: str | Path | None) -> None:
    """Save ``fig`` to ``path`` (PNG or PDF by suffix)."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf"):
        raise ValueError(f"figures are saved as .png or .pdf, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def trajectories(data: Trajectories, *, quantity: str = "sharpness", threshold: float | None = None,
                 size_label: str = "width", rescale_steps: Mapping[float, float] | None = None,
                 logy: bool | None = None, ax=None, path: str | Path | None = None, title: str | None = None,
                 step_label: str | None = None):
    """One curve per width of ``quantity`` against step, with the edge-of-stability line at ``threshold``.

    ``rescale_steps`` maps each width to a factor its steps are multiplied by (e.g. tokens per step,
    or lr ratios for "steps rescaled" views); the x label then reads ``step_label`` (default
    "rescaled step").
    """
    if not data:
        raise ValueError("nothing to plot: no trajectories")
    fig, ax = _axes(ax)
    colors, mappable = _width_colors(list(data))
    all_values = []
    for w in sorted(data):
        steps, values = (np.asarray(a, dtype=float) for a in data[w])
        if steps.shape != values.shape:
            raise ValueError(f"{size_label} {w:g}: {steps.size} steps but {values.size} values")
        if rescale_steps is not None:
            steps = steps * float(rescale_steps[w])
        ax.plot(steps, values, color=colors[w], lw=1.4, label=f"{w:g}")
        all_values.append(values)
    if threshold is not None:
        ax.axhline(threshold, color="0.3", ls="--", lw=1, label=f"EoS threshold {threshold:.4g}")
    values = np.concatenate(all_values)
    if logy if logy is not None else _spans_decades(values):
        ax.set_yscale("log")
    ax.set_xlabel(step_label or ("rescaled step" if rescale_steps is not None else "step"))
    ax.set_ylabel(quantity)
    ax.set_title(title or f"{quantity} per {size_label}")
    if threshold is not None:
        ax.legend(handles=[ax.lines[-1]], loc="best", fontsize=8)
    _colorbar(fig, ax, mappable, size_label)
    save(fig, path)
    return fig


def spread(steps: Sequence[float], values: Sequence[float], *, quantity: str = "relative spread across widths",
           threshold: float | None = None, ax=None, path: str | Path | None = None, title: str | None = None):
    """A per-step summary curve (e.g. the relative spread across widths), with an optional threshold line."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.shape != values.shape or steps.size == 0:
        raise ValueError(f"need matching non-empty steps and values, got {steps.size} and {values.size}")
    fig, ax = _axes(ax)
    ax.plot(steps, values, color="C0", lw=1.5)
    if threshold is not None:
        ax.axhline(threshold, color="C3", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.legend(fontsize=8)
    if _spans_decades(values):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(quantity)
    ax.set_title(title or quantity)
    save(fig, path)
    return fig


def lr_sweep(losses: Mapping[float, Mapping[float, float]], *, optima: Mapping[float, float] | None = None,
             size_label: str = "width", ax=None, path: str | Path | None = None, title: str | None = None):
    """Final training loss against learning rate (log2 axis) per width; diverged runs (NaN/inf) drawn
    as crosses at the top of the axes; the optimum of each width marked when ``optima`` is given."""
    if not losses:
        raise ValueError("nothing to plot: no widths")
    fig, ax = _axes(ax)
    colors, mappable = _width_colors(list(losses))
    finite_max = max((v for curve in losses.values() for v in curve.values() if np.isfinite(v)), default=1.0)
    for w in sorted(losses):
        lrs = np.array(sorted(losses[w]), dtype=float)
        if np.any(lrs <= 0):
            raise ValueError(f"{size_label} {w:g}: learning rates must be positive")
        vals = np.array([losses[w][lr] for lr in sorted(losses[w])], dtype=float)
        ok = np.isfinite(vals)
        ax.plot(lrs[ok], vals[ok], "o-", color=colors[w], ms=3.5, lw=1.3)
        if (~ok).any():
            ax.plot(lrs[~ok], np.full((~ok).sum(), finite_max * 1.05), "x", color=colors[w], ms=6)
        if optima is not None and w in optima:
            ax.axvline(optima[w], color=colors[w], ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or f"loss vs learning rate per {size_label} (x: diverged)")
    _colorbar(fig, ax, mappable, size_label)
    save(fig, path)
    return fig


def density_overlay(densities: Mapping[float, tuple[Sequence[float], Sequence[float]]], *,
                    size_label: str = "width", ax=None, path: str | Path | None = None, title: str | None = None):
    """Spectral densities (``(grid, pdf)`` per width) overlaid on a log density axis."""
    if not densities:
        raise ValueError("nothing to plot: no densities")
    fig, ax = _axes(ax)
    colors, mappable = _width_colors(list(densities))
    peak = 0.0
    for w in sorted(densities):
        grid, pdf = (np.asarray(a, dtype=float) for a in densities[w])
        ax.plot(grid, np.maximum(pdf, 1e-12), color=colors[w], lw=1.2)
        peak = max(peak, float(np.nanmax(pdf)))
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(peak * 1e-8, 1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"Hessian spectral density per {size_label}")
    _colorbar(fig, ax, mappable, size_label)
    save(fig, path)
    return fig


def layer_heatmap(layers: Sequence[str], steps: Sequence[float], values: np.ndarray, *,
                  quantity: str = "top eigenvalue", ax=None, path: str | Path | None = None,
                  title: str | None = None):
    """Per-layer sharpness as a (layer x step) heatmap, log colour scale when positive and spanning decades."""
    import matplotlib as mpl

    values = np.asarray(values, dtype=float)
    if values.shape != (len(layers), len(steps)):
        raise ValueError(f"values must have shape (layers, steps) = ({len(layers)}, {len(steps)}), got {values.shape}")
    fig, ax = _axes(ax, figsize=(max(5.0, 0.35 * len(steps) + 3), max(2.5, 0.35 * len(layers) + 1.5)))
    norm = mpl.colors.LogNorm() if _spans_decades(values.ravel()) else None
    im = ax.imshow(values, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(layers)), list(layers), fontsize=8)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int)
    ax.set_xticks(ticks, [f"{steps[i]:g}" for i in ticks], fontsize=8)
    ax.set_xlabel("step")
    ax.set_title(title or f"per-layer {quantity}")
    fig.colorbar(im, ax=ax, label=quantity, pad=0.02)
    save(fig, path)
    return fig


def alignment_exponents(exponents: Mapping[str, Mapping[float, float]], *, full_at_least: float = 0.85,
                        none_at_most: float = 0.65, ax=None, path: str | Path | None = None,
                        title: str | None = None):
    """Per layer (one line each), the fitted alignment exponent against the step, with the no-alignment
    (1/2) and full-alignment (1) predictions and the regime thresholds as horizontal lines."""
    fig, ax = _axes(ax)
    for i, (layer, by_step) in enumerate(exponents.items()):
        steps = sorted(by_step)
        ax.plot(steps, [by_step[s] for s in steps], marker="o", ms=3, lw=1.5, color=f"C{i % 10}", label=layer)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="full (1)")
    ax.axhline(0.5, color="k", ls=":", lw=1, label="none (1/2)")
    ax.axhspan(none_at_most, full_at_least, color="0.9", zorder=0, label="between")
    ax.set_xlabel("step")
    ax.set_ylabel("exponent of ||dW x|| / (RMS dW RMS x) vs fan-in")
    ax.set_title(title or "alignment exponent per layer")
    ax.legend(fontsize=8)
    save(fig, path)
    return fig
