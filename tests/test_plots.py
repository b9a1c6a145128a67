"""Figures: drawn from plain data, saved as PNG and PDF, with the elements a reader needs."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sharpscope.analysis import plots  # noqa: E402

WIDTHS = [64, 128, 256, 512]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


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


def test_more_than_eight_sizes_get_a_colorbar_instead_of_a_legend():
    sizes = [2 ** k for k in range(3, 13)]  # 10 widths: colours stay ordered along a colormap
    data = {w: (np.arange(5), np.full(5, 1.0 + 1 / w)) for w in sizes}
    fig = plots.trajectories(data, threshold=1.0)
    assert fig.axes[1].get_ylabel() == "width"  # the colorbar
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["EoS threshold 1"]
    styles = plots.size_styles(sizes[:8])
    assert styles.discrete and len(set(styles.colors.values())) == len(set(styles.markers.values())) == 8
    assert "x" not in styles.markers.values()  # the lr sweep's mark of a diverged run


@pytest.mark.parametrize("threshold, side, scale", [(3.8e4, "above", 1.0), (1e-4, "below", 0.1)])
def test_a_threshold_far_off_the_data_is_an_annotation_not_a_line(threshold, side, scale):
    # the case (CNN + Adam: 38/lr = 3.8e4 over sharpness ~1e2-1e3, a linear axis) and a threshold
    # decades below curves on a log axis
    steps = np.arange(0, 60, 10)
    data = {8: (steps, scale * (300 + 20 * steps) ** (1 if scale == 1 else 1.5)), 16: (steps, scale * (500 + 25 * steps))}
    ax = plots.trajectories(data, threshold=threshold).axes[0]
    lo, hi = (min(float(np.min(v)) for _, v in data.values()), max(float(np.max(v)) for _, v in data.values()))
    assert len(ax.lines) == 2 and ax.get_ylim()[1] < 2 * hi and ax.get_ylim()[0] > lo / 2  # the curves fill the axes
    (note,) = ax.texts
    assert f"EoS threshold {plots.g(threshold)} {side} the axes" in note.get_text()
    assert note.get_position()[1] >= 1.0  # above the plotting area: over no curve
    near = plots.trajectories(data, threshold=1500.0).axes[0]  # among the data: a line, as before
    assert len(near.lines) == 3 and near.lines[-1].get_ydata()[0] == 1500.0 and not near.texts
    assert plots.threshold_is_far(3.8e4, [100, 1000], log=False) and not plots.threshold_is_far(3.0, [3.5, 4.2], log=False)
    assert not plots.threshold_is_far(4.0, [3.0, 150.0], log=True)  # the quickstart's SP: 2/lr inside the range


def test_the_spread_plot_shades_the_verdict_window_and_draws_its_median():
    steps = np.arange(0, 101, 10)
    values = np.array([0.09, 0.07, 0.38, 0.14, 0.03, 0.03, 0.05, 0.08, 0.22, 0.06, 0.04])  # the quickstart's muP
    ax = plots.spread(steps, values, threshold=0.1, window=(30, 100), summary=0.051).axes[0]
    (shade,) = [p for p in ax.patches if p.get_label() == "verdict window"]
    assert shade.get_x() == 30 and shade.get_x() + shade.get_width() == 100
    (median,) = [ln for ln in ax.lines if ln.get_label().startswith("window median")]
    assert list(median.get_xdata()) == [30, 100] and list(median.get_ydata()) == [0.051, 0.051]
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert names == ["verdict window", "spread per step", "threshold 0.1", "window median 0.051"]


def test_bands_shade_intervals_around_the_curves():
    steps = np.arange(10)
    data = {64: (steps, np.ones(10)), 128: (steps, 2 * np.ones(10))}
    ax = plots.trajectories(data, bands={64: (0.9 * np.ones(10), 1.1 * np.ones(10))}).axes[0]
    (band,) = ax.collections
    assert band.get_paths()[0].vertices[:, 1].min() == pytest.approx(0.9)


def test_one_run_along_training_with_online_sharpness_and_loss(tmp_path):
    steps = np.arange(0, 61, 10)
    fig = plots.run_curves({"preconditioned sharpness": (steps, 1e3 + 10 * steps), "sharpness": (steps, 0.3 + steps / 50)},
                           thresholds={"preconditioned sharpness": 3.8e4},
                           online={"online preconditioned sharpness (Recorder)": (steps[1:], 1e3 + 10 * steps[1:])},
                           loss=(np.arange(61), np.linspace(2.3, 0.5, 61)), path=tmp_path / "run.png")
    ax, loss = fig.axes[:2]
    assert loss.get_ylabel() == "training loss" and len(loss.lines) == 1
    assert [ln.get_linestyle() for ln in ax.lines[:3]] == ["-", "-", "--"]
    assert ax.get_yscale() == "log" and (tmp_path / "run.png").exists()
    assert len(plots.run_curves({"sharpness": (steps, steps + 1.0)}, loss=(steps, np.full(7, np.nan))).axes) == 1
