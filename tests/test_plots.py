"""Figures: drawn from plain data, saved as PNG and PDF, with the elements a reader needs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sharpscope.analysis import plots  # noqa: E402

WIDTHS = [64, 128, 256, 512]


def _traj():
    steps = np.arange(50)
    return {w: (steps, 2.0 * (1 - np.exp(-steps / 10)) * (1 + 1 / w)) for w in WIDTHS}


def test_trajectories_with_threshold_and_rescaled_steps(tmp_path):
    fig = plots.trajectories(_traj(), threshold=2.0, path=tmp_path / "t.png")
    ax = fig.axes[0]
    assert len(ax.lines) == len(WIDTHS) + 1  # one curve per width + the EoS line
    assert ax.lines[-1].get_ydata()[0] == 2.0
    # up to 8 sizes: a legend outside the axes (it was a colorbar: issue 22 asks for distinguishable
    # colours with markers and a legend), one colour and one marker per width
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "width" and len(fig.axes) == 1
    assert [t.get_text() for t in legend.get_texts()] == ["64", "128", "256", "512", "EoS threshold 2"]
    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1  # right of the data, never over it
    colors = [ax.lines[i].get_color() for i in range(len(WIDTHS))]
    assert len({tuple(c) for c in colors}) == len(WIDTHS)
    assert len({ax.lines[i].get_marker() for i in range(len(WIDTHS))}) == len(WIDTHS)
    assert (tmp_path / "t.png").stat().st_size > 5000
    fig = plots.trajectories(_traj(), rescale_steps={w: w / 64 for w in WIDTHS}, path=tmp_path / "t.pdf")
    assert fig.axes[0].get_xlabel() == "rescaled step"
    assert fig.axes[0].lines[-1].get_xdata()[-1] == pytest.approx(49 * 512 / 64)
    assert (tmp_path / "t.pdf").read_bytes()[:4] == b"%PDF"


def test_log_axis_when_values_span_decades(tmp_path):
    data = {w: (np.arange(5), np.full(5, float(w) ** 2)) for w in WIDTHS}
    assert plots.trajectories(data).axes[0].get_yscale() == "log"
    assert plots.trajectories(_traj()).axes[0].get_yscale() == "linear"


def test_lr_sweep_marks_optima_and_diverged_runs(tmp_path):
    lrs = [2.0 ** -k for k in range(8, 0, -1)]
    losses = {w: {lr: (np.log2(lr) + 4) ** 2 + 1 for lr in lrs} for w in WIDTHS}
    losses[512][lrs[-1]] = float("nan")
    fig = plots.lr_sweep(losses, optima={w: 2.0 ** -4 for w in WIDTHS}, path=tmp_path / "lr.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(crosses) == 1 and crosses[0].get_xdata()[0] == lrs[-1]
    assert sum(1 for line in ax.lines if line.get_linestyle() == ":") == len(WIDTHS)


def test_spread_density_and_heatmap(tmp_path):
    fig = plots.spread(np.arange(10), np.linspace(0.5, 0.01, 10), threshold=0.05, path=tmp_path / "s.png")
    assert fig.axes[0].get_yscale() == "log"
    grid = np.linspace(-1, 5, 200)
    dens = {w: (grid, np.exp(-(grid - np.log2(w) / 4) ** 2)) for w in WIDTHS}
    fig = plots.density_overlay(dens, path=tmp_path / "d.pdf")
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == len(WIDTHS)
    values = np.outer([1.0, 10.0, 100.0], np.linspace(1, 2, 6))
    fig = plots.layer_heatmap(["0", "2", "4"], list(range(0, 60, 10)), values, path=tmp_path / "h.png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "2", "4"]
    assert all((tmp_path / f).exists() for f in ("s.png", "d.pdf", "h.png"))


def test_bad_inputs():
    with pytest.raises(ValueError, match="no trajectories"):
        plots.trajectories({})
    with pytest.raises(ValueError, match="width 64: 3 steps but 2 values"):
        plots.trajectories({64: ([0, 1, 2], [1.0, 2.0])})
    with pytest.raises(ValueError, match="shape \\(layers, steps\\) = \\(2, 3\\)"):
        plots.layer_heatmap(["a", "b"], [0, 1, 2], np.zeros((3, 2)))
    with pytest.raises(ValueError, match=".png or .pdf"):
        plots.spread([0, 1], [1.0, 2.0], path="figure.jpg")
    with pytest.raises(ValueError, match="learning rates must be positive"):
        plots.lr_sweep({64: {0.0: 1.0}})
