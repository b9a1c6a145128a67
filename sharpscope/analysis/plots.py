"""Figures from plain data: one function per figure, each usable on its own, drawing on a new figure or the
given ``ax``; plots know nothing of torch, run files or verdicts.

Every function takes plain data (dicts keyed by size of ``(steps, values)`` arrays, or ``{lr: loss}`` maps),
returns the figure, and saves it when ``path`` is given (the suffix picks PNG or PDF). What the eye must
read is drawn so that it can:

* **sizes** (widths, depths, any compared value): up to :data:`MAX_DISCRETE` of them get a colour each from
  a colour-blind-safe palette (Okabe & Ito 2008) and a marker each, named in a legend; past that a
  sequential colormap with a colorbar (dark = small, light = large);
* **legends** sit outside the axes, so they never cover a curve;
* **thresholds** (the edge of stability) are a dashed line where they lie near the data; one so far off that
  the line would squash the curves into less than half of the axes (:func:`threshold_is_far`) is written as
  an annotation above the axes instead, with an arrow saying on which side it lies;
* **the verdict window** of a spread plot (the steps whose median decides the verdict) is shaded, with that
  median drawn across it;
* **uncertainty**: ``bands`` (per size ``(low, high)`` arrays) and ``band`` (for a spread) are drawn as
  shaded areas where an analysis provides intervals.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["trajectories", "spread", "lr_sweep", "density_overlay", "layer_heatmap", "alignment_exponents",
           "run_curves", "save", "g", "size_styles", "SizeStyles", "size_handles", "threshold_is_far", "draw_threshold",
           "legend_outside", "spans_decades", "MAX_DISCRETE"]

Trajectories = Mapping[float, tuple[Sequence[float], Sequence[float]]]
Bands = Mapping[float, tuple[Sequence[float], Sequence[float]]]

# Okabe & Ito's colour-blind-safe palette ("Color universal design", 2008), ordered so that the first four
# differ most in hue (blue, vermillion, green, purple; orange comes after vermillion's neighbour is taken),
# yellow (unreadable on white) replaced by brown; one marker per colour, so sizes stay apart in grey print too
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B")
MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h")
MAX_DISCRETE = len(PALETTE)
FAR_STRETCH = 2.0  # a threshold line that would stretch the y axis to more than twice the data's span is far
THRESHOLD_COLOR = "0.25"


def g(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, exponents short: 38000 -> ``3.8e4``, 0.0012 -> ``0.0012``."""
    text = f"{x:.{digits}g}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _plt():
    import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves

    return plt


@dataclass(frozen=True)
class SizeStyles:
    """How the sizes of a figure are told apart: ``colors`` and ``markers`` per size (no markers, and a
    ``mappable`` for a colorbar, past :data:`MAX_DISCRETE` sizes)."""

    sizes: tuple[float, ...]
    colors: dict
    markers: dict
    mappable: Any = None

    @property
    def discrete(self) -> bool:
        return self.mappable is None

    def line(self, size: float, index: int = 0, points: int = 0) -> dict:
        """``ax.plot`` keywords for ``size``'s curve: its colour, and its marker on at most ~12 of
        ``points`` points, offset per size so that markers of close curves do not sit on each other."""
        kw: dict[str, Any] = {"color": self.colors[size]}
        if self.discrete:
            every = max(1, points // 12)
            kw.update(marker=self.markers[size], ms=5, markevery=(index % every, every))
        return kw


def size_styles(sizes: Sequence[float], cmap: str = "viridis") -> SizeStyles:
    """Colours (and markers) for ``sizes``; a colormap on a log scale past :data:`MAX_DISCRETE` sizes (a
    linear one when a value is 0 or negative, e.g. a weight decay of 0; its too-light end cut off, so every
    curve shows on white)."""
    import matplotlib as mpl

    ws = tuple(sorted({float(w) for w in sizes}))
    if not ws:
        raise ValueError("nothing to plot: no widths")
    if len(ws) <= MAX_DISCRETE:
        return SizeStyles(ws, {w: PALETTE[i] for i, w in enumerate(ws)}, {w: MARKERS[i] for i, w in enumerate(ws)})
    lo, hi = ws[0], ws[-1]
    norm = mpl.colors.LogNorm(vmin=lo, vmax=hi) if lo > 0 else mpl.colors.Normalize(vmin=lo, vmax=hi)
    cm = mpl.colors.LinearSegmentedColormap.from_list(f"{cmap}-cut", mpl.colormaps[cmap](np.linspace(0.0, 0.85, 256)))
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=cm)
    return SizeStyles(ws, {w: cm(norm(w)) for w in ws}, {}, mappable)


def size_handles(styles: SizeStyles) -> list:
    """Legend handles, one per size (label ``"64"``), in size order."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=styles.colors[w], marker=styles.markers.get(w), ms=5, lw=1.6, label=f"{w:g}")
            for w in styles.sizes]


def legend_outside(ax, handles: list, title: str | None = None, styles: SizeStyles | None = None) -> None:
    """The legend to the right of ``ax``, outside the data (below the axes when a colorbar takes the right)."""
    if not handles:
        return
    if styles is not None and not styles.discrete:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=9, frameon=False,
                  ncol=min(len(handles), 3), title=title)
    else:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=9,
                  frameon=False, title=title, title_fontsize=9)


def _axes(ax, figsize=(6.4, 4.0)):
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.figure
    return fig, ax


def spans_decades(values: np.ndarray) -> bool:
    """All finite values positive and their largest over their smallest above 30: a log axis reads better."""
    values = np.asarray(values, dtype=float)
    v = np.abs(values[np.isfinite(values) & (values != 0)])
    return v.size > 1 and bool(np.all(values[np.isfinite(values)] > 0)) and v.max() / v.min() > 30



def _colorbar(fig, ax, styles: SizeStyles, label: str) -> None:
    bar = fig.colorbar(styles.mappable, ax=ax, label=label, pad=0.02)
    bar.set_ticks(styles.sizes, labels=[f"{w:g}" for w in styles.sizes])
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


def threshold_is_far(threshold: float, values: Sequence[float], log: bool) -> bool:
    """Whether a line at ``threshold`` would squash the curves: drawing it would stretch the y range to more
    than :data:`FAR_STRETCH` times the data's span (in decades on a log axis). The span counts at least a
    quarter of the data's magnitude (0.3 decade on a log axis), so that flat curves near their threshold
    still get the line."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if log:
        v = v[v > 0]
    if v.size == 0 or not np.isfinite(threshold) or (log and threshold <= 0):
        return False
    if log:
        v, t = np.log10(v), float(np.log10(threshold))
        span = max(float(v.max() - v.min()), 0.3)
    else:
        t = float(threshold)
        span = max(float(v.max() - v.min()), 0.25 * float(np.abs(v).max()))
    if span == 0:
        return t != v.max()
    return max(float(v.max()), t) - min(float(v.min()), t) > FAR_STRETCH * span


def draw_threshold(ax, threshold: float, values: Sequence[float], *, label: str = "EoS threshold",
                   far: bool | None = None, color: str = THRESHOLD_COLOR):
    """A dashed line at ``threshold`` (returned, for the legend), or -- when it lies far off the data
    (:func:`threshold_is_far`, or ``far``) -- an annotation above the axes naming it and its side (returns
    None). Call after the curves and the y scale are set."""
    log = ax.get_yscale() == "log"
    if far is None:
        far = threshold_is_far(threshold, values, log)
    if not far:
        return ax.axhline(threshold, color=color, ls="--", lw=1.1, label=f"{label} {g(threshold)}")
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    above = v.size == 0 or threshold > v.max()
    ratio = (threshold / v.max() if above else v.min() / threshold) if v.size and v.min() > 0 and threshold > 0 else None
    times = f", {g(ratio, 2)}x the {'largest' if above else 'smallest'} value" if ratio else ""
    ax.annotate(f"{label} {g(threshold)} {'above' if above else 'below'} the axes{times} {'↑' if above else '↓'}",
                xy=(1.0, 1.0), xycoords="axes fraction", xytext=(0, 4), textcoords="offset points",
                ha="right", va="bottom", fontsize=9.5, color=color)
    return None


def _title(ax, title: str, annotated: bool) -> None:
    # left-aligned, and lifted above the threshold annotation where there is one
    ax.set_title(title, loc="left", fontsize=11, pad=16 if annotated else 6)


def trajectories(data: Trajectories, *, quantity: str = "sharpness", threshold: float | None = None,
                 size_label: str = "width", rescale_steps: Mapping[float, float] | None = None,
                 logy: bool | None = None, ax=None, path: str | Path | None = None, title: str | None = None,
                 step_label: str | None = None, legend: bool = True, styles: SizeStyles | None = None,
                 bands: Bands | None = None, threshold_label: str = "EoS threshold", far: bool | None = None):
    """One curve per size of ``quantity`` against step, with the edge-of-stability line at ``threshold``
    (an annotation when it lies far off the data; ``far`` forces the choice).

    ``rescale_steps`` maps each size to a factor its steps are multiplied by (e.g. tokens per step, or lr
    ratios for "steps rescaled" views); the x label then reads ``step_label`` (default "rescaled step").
    ``bands``: per size ``(low, high)`` on the same steps, shaded (intervals). ``styles``: shared colours
    when several panels show the same sizes; ``legend=False`` leaves the legend to the caller.
    """
    if not data:
        raise ValueError("nothing to plot: no trajectories")
    fig, ax = _axes(ax)
    styles = styles or size_styles(list(data))
    all_values = []
    for i, w in enumerate(sorted(data)):
        steps, values = (np.asarray(a, dtype=float) for a in data[w])
        if steps.shape != values.shape:
            raise ValueError(f"{size_label} {w:g}: {steps.size} steps but {values.size} values")
        if rescale_steps is not None:
            steps = steps * float(rescale_steps[w])
        if bands is not None and w in bands:
            low, high = (np.asarray(a, dtype=float) for a in bands[w])
            ax.fill_between(steps, low, high, color=styles.colors[w], alpha=0.18, lw=0)
        ax.plot(steps, values, lw=1.6, label=f"{w:g}", **styles.line(w, i, steps.size))
        all_values.append(values)
    values = np.concatenate(all_values)
    if logy if logy is not None else spans_decades(values):
        ax.set_yscale("log")
    line = draw_threshold(ax, threshold, values, label=threshold_label, far=far) if threshold is not None else None
    ax.set_xlabel(step_label if step_label is not None else ("rescaled step" if rescale_steps is not None else "step"))
    ax.set_ylabel(quantity)
    _title(ax, f"{quantity} per {size_label}" if title is None else title, threshold is not None and line is None)
    if legend:
        if styles.discrete:
            legend_outside(ax, size_handles(styles) + ([line] if line is not None else []), size_label)
        else:
            _colorbar(fig, ax, styles, size_label)
            legend_outside(ax, [line] if line is not None else [], styles=styles)
    save(fig, path)
    return fig


def spread(steps: Sequence[float], values: Sequence[float], *, quantity: str = "relative spread across widths",
           threshold: float | None = None, window: tuple[float, float] | None = None, summary: float | None = None,
           band: tuple[Sequence[float], Sequence[float]] | None = None, logy: bool | None = None, ax=None,
           path: str | Path | None = None, title: str | None = None, legend: bool = True,
           step_label: str = "step"):
    """A per-step summary curve (e.g. the relative spread across widths), with an optional threshold line;
    ``window`` (first, last step) shades the steps a verdict summarizes and ``summary`` (their median)
    is drawn across them; ``band`` (low, high per step) shades an interval."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if steps.shape != values.shape or steps.size == 0:
        raise ValueError(f"need matching non-empty steps and values, got {steps.size} and {values.size}")
    fig, ax = _axes(ax)
    handles = []
    if window is not None:
        handles.append(ax.axvspan(window[0], window[1], color="#56B4E9", alpha=0.15, lw=0, label="verdict window"))
    if band is not None:
        ax.fill_between(steps, *(np.asarray(b, dtype=float) for b in band), color="0.5", alpha=0.2, lw=0)
    handles += ax.plot(steps, values, color="0.45", lw=1.3, marker="o", ms=3, label="spread per step")
    if logy if logy is not None else spans_decades(values):
        ax.set_yscale("log")
    if threshold is not None:
        handles.append(ax.axhline(threshold, color="#D55E00", ls="--", lw=1.1, label=f"threshold {threshold:g}"))
    if window is not None and summary is not None and np.isfinite(summary):
        handles += ax.plot([window[0], window[1]], [summary, summary], color="0.05", lw=3, solid_capstyle="butt",
                           label=f"window median {summary:.2g}")
    ax.set_xlabel(step_label)
    ax.set_ylabel(quantity)
    _title(ax, quantity if title is None else title, False)
    if legend:
        legend_outside(ax, handles)
    save(fig, path)
    return fig


def lr_sweep(losses: Mapping[float, Mapping[float, float]], *, optima: Mapping[float, float] | None = None,
             size_label: str = "width", ax=None, path: str | Path | None = None, title: str | None = None):
    """Final training loss against learning rate (log2 axis) per size; diverged runs (NaN/inf) drawn
    as crosses at the top of the axes; the optimum of each size marked when ``optima`` is given."""
    if not losses:
        raise ValueError("nothing to plot: no widths")
    fig, ax = _axes(ax)
    styles = size_styles(list(losses))
    finite_max = max((v for curve in losses.values() for v in curve.values() if np.isfinite(v)), default=1.0)
    for w in sorted(losses):
        lrs = np.array(sorted(losses[w]), dtype=float)
        if np.any(lrs <= 0):
            raise ValueError(f"{size_label} {w:g}: learning rates must be positive")
        vals = np.array([losses[w][lr] for lr in sorted(losses[w])], dtype=float)
        ok = np.isfinite(vals)
        ax.plot(lrs[ok], vals[ok], color=styles.colors[w], marker=styles.markers.get(w, "o"), ms=4.5, lw=1.4)
        if (~ok).any():
            ax.plot(lrs[~ok], np.full((~ok).sum(), finite_max * 1.05), "x", color=styles.colors[w], ms=7, mew=2)
        if optima is not None and w in optima:
            ax.axvline(optima[w], color=styles.colors[w], ls=":", lw=1.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    _title(ax, title or f"loss vs learning rate per {size_label} (x: diverged)", False)
    if styles.discrete:
        legend_outside(ax, size_handles(styles), size_label)
    else:
        _colorbar(fig, ax, styles, size_label)
    save(fig, path)
    return fig


def density_overlay(densities: Mapping[float, tuple[Sequence[float], Sequence[float]]], *,
                    size_label: str = "width", ax=None, path: str | Path | None = None, title: str | None = None):
    """Spectral densities (``(grid, pdf)`` per size) overlaid on a log density axis."""
    if not densities:
        raise ValueError("nothing to plot: no densities")
    fig, ax = _axes(ax)
    styles = size_styles(list(densities))
    peak = 0.0
    for w in sorted(densities):
        grid, pdf = (np.asarray(a, dtype=float) for a in densities[w])
        ax.plot(grid, np.maximum(pdf, 1e-12), color=styles.colors[w], lw=1.3)
        peak = max(peak, float(np.nanmax(pdf)))
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(peak * 1e-8, 1e-12))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    _title(ax, title or f"Hessian spectral density per {size_label}", False)
    if styles.discrete:
        from matplotlib.lines import Line2D

        legend_outside(ax, [Line2D([], [], color=styles.colors[w], lw=1.6, label=f"{w:g}") for w in styles.sizes],
                       size_label)
    else:
        _colorbar(fig, ax, styles, size_label)
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
    norm = mpl.colors.LogNorm() if spans_decades(values.ravel()) else None
    im = ax.imshow(values, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(layers)), list(layers), fontsize=8)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int)
    ax.set_xticks(ticks, [f"{steps[i]:g}" for i in ticks], fontsize=8)
    ax.set_xlabel("step")
    _title(ax, title or f"per-layer {quantity}", False)
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
        ax.plot(steps, [by_step[s] for s in steps], marker=MARKERS[i % len(MARKERS)], ms=4, lw=1.5,
                color=PALETTE[i % len(PALETTE)], label=layer)
    ax.axhline(1.0, color="k", ls="--", lw=1, label="full (1)")
    ax.axhline(0.5, color="k", ls=":", lw=1, label="none (1/2)")
    ax.axhspan(none_at_most, full_at_least, color="0.9", zorder=0, label="between")
    ax.set_xlabel("step")
    ax.set_ylabel("exponent of ||dW x|| / (RMS dW RMS x) vs fan-in")
    _title(ax, title or "alignment exponent per layer", False)
    legend_outside(ax, ax.get_legend_handles_labels()[0])
    save(fig, path)
    return fig


def _loss_panel(ax, loss: tuple[Sequence[float], Sequence[float]]) -> None:
    """The training loss against the step; where it stops being finite, a dotted line says so."""
    steps, vals = (np.asarray(a, dtype=float) for a in loss)
    ok = np.isfinite(vals)
    ax.plot(steps[ok], vals[ok], color="0.2", lw=1.4, marker="o" if ok.sum() <= 30 else None, ms=3.5)
    bad = steps[~ok & (steps > 0)]
    if bad.size and ok[steps > 0].any():  # not the NaN of a loop that passed no loss at step 0
        ax.axvline(bad[0], color="#D55E00", ls=":", lw=1.2)
        ax.annotate(f"not finite from step {bad[0]:g}", xy=(bad[0], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -12), textcoords="offset points", fontsize=8.5, color="#D55E00")
    if spans_decades(vals[ok]):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    _title(ax, "training loss", False)


def run_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               thresholds: Mapping[str, float] | None = None, online: Mapping[str, tuple[Sequence[float],
                                                                                            Sequence[float]]] | None = None,
               loss: tuple[Sequence[float], Sequence[float]] | None = None, quantity: str = "top eigenvalue",
               title: str | None = None, path: str | Path | None = None):
    """One run along training: each measured quantity (``curves``: label -> (steps, values)) against the
    step with its threshold (``thresholds``: label -> value; a line, or an annotation when far off; one per
    value), the online sharpness the training loop logged (``online``: label -> (steps, values), dashed),
    and the training loss (``loss``, where any is finite) in a second panel."""
    if not curves and not online:
        raise ValueError("nothing to plot: no curves")
    plt = _plt()
    finite_loss = loss is not None and bool(np.isfinite(np.asarray(loss[1], dtype=float)).any())
    panels = 2 if finite_loss else 1
    fig, axes = plt.subplots(1, panels, figsize=(10.6 if panels == 2 else 6.4, 4.6), squeeze=False, layout="constrained",
                             width_ratios=[3, 2] if panels == 2 else None)
    ax = axes[0][0]
    handles, values = [], []
    for i, (label, (steps, vals)) in enumerate(curves.items()):
        vals = np.asarray(vals, dtype=float)
        handles += ax.plot(steps, vals, color=PALETTE[i % len(PALETTE)], marker=MARKERS[i % len(MARKERS)],
                           ms=5, lw=1.6, label=label)
        values.append(vals)
    for i, (label, (steps, vals)) in enumerate((online or {}).items(), start=len(curves)):
        vals = np.asarray(vals, dtype=float)
        # wide and translucent under the stored curves: the online value often equals a stored one
        handles += ax.plot(steps, vals, color=PALETTE[i % len(PALETTE)], ls="--", lw=3.2, alpha=0.55, zorder=1,
                           label=label)
        values.append(vals)
    values = np.concatenate(values) if values else np.zeros(0)
    if spans_decades(values):
        ax.set_yscale("log")
    annotated = False
    first: dict[float, str] = {}
    for label, t in (thresholds or {}).items():
        first.setdefault(t, label)
    for t, label in sorted(first.items()):
        line = draw_threshold(ax, t, values, label=f"EoS threshold of the {label}:")
        handles += [line] if line is not None else []
        annotated = annotated or line is None
    ax.set_xlabel("step")
    ax.set_ylabel(quantity)
    _title(ax, title or f"{quantity} along training", annotated)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False)
    if panels == 2:
        _loss_panel(axes[0][1], loss)
    save(fig, path)
    return fig
