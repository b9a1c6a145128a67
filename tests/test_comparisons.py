"""Comparisons: which runs are compared, and what cannot be (different probes or batches, missing
quantities, loops without losses, blown-up runs)."""
from __future__ import annotations

import json

from conftest import probe_text, report_metrics, sweep_runs
from sharpscope.sweep import run_sweep

PROBE = probe_text("mini", widths=(16, 32, 64), lrs=(0.1, 0.2, 0.4), steps=8, every=4)


def test_depth_axis_is_compared_and_seeds_are_averaged(tmp_path):
    text = probe_text("deep", widths=(16,), lrs=(0.1,)).replace(
        "kwargs = { depth = 1,", "kwargs = { residual = true,").replace(
        "base_width = 16", "base_width = 16\ndepths = [1, 2, 4]").replace(
        'data = "digits"', 'data = "digits"\ndepth_scaling = true\nseeds = [0, 1]')
    probe = tmp_path / "deep.toml"
    probe.write_text(text)
    result = run_sweep(probe, tmp_path / "out", progress=False)
    assert len(result.runs) == 6 and "-w16-d4-lr0.1-s1" in result.runs[-1].name
    from sharpscope.runs.store import open_run
    with open_run(result.runs[-1]) as run:
        assert run.meta["parameterization"]["depth"]["branch_multiplier"] == 0.5  # 1/sqrt(4)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (group,) = metrics["groups"]
    assert group["axis"] == "depth" and group["sizes"] == [1, 2, 4] and group["fixed"] == {"width": 16}
    assert group["seeds"] == {"1.0": 2, "2.0": 2, "4.0": 2}
    # two seeds per depth: the verdict carries a 90% interval over them (issue 25); with 2 seeds it may straddle
    # the threshold ('undetermined', code 'straddles'), but the check applies: never 'not-analysed'
    precond = group["quantities"]["precond"]
    assert precond["seeds_paired"] == 2 and len(precond["spread_summary_interval"]) == 2
    assert precond["code"] in ("interval", "straddles"), precond["reason"]
    assert metrics["transfer"][0]["axis"] == "depth"
    assert "precond across depths" in (tmp_path / "out" / "report.md").read_text()


def test_runs_of_different_probes_or_batches_are_not_compared(tmp_path):
    a = sweep_runs(tmp_path, "a", widths=(16,), quantities=("precond", "hessian"))
    b = sweep_runs(tmp_path, "b", widths=(32,))
    metrics = report_metrics(tmp_path, a + b)
    assert metrics["groups"][0]["quantities"]["precond"] == {
        "verdict": "undetermined", "reason": "runs come from different probes (a, b)", "code": "not-analysed"}
    assert any("different probes (a, b); not compared" in p for p in metrics["problems"])
    # same probe name, other probe batch (another probe_size)
    other = probe_text("a", widths=(32,)).replace("probe_size = 64", "probe_size = 32")
    (tmp_path / "a2.toml").write_text(other)
    c = run_sweep(tmp_path / "a2.toml", tmp_path / "a2", progress=False).runs
    metrics = report_metrics(tmp_path, a + c, "r2")
    assert "2 different probe batches" in metrics["groups"][0]["quantities"]["precond"]["reason"]


def test_a_quantity_missing_for_some_widths_is_named(tmp_path):
    a = sweep_runs(tmp_path, "q", widths=(16,), quantities=("precond", "hessian"))
    (tmp_path / "q2.toml").write_text(probe_text("q", widths=(32, 64)))
    b = run_sweep(tmp_path / "q2.toml", tmp_path / "q2", progress=False).runs
    metrics = report_metrics(tmp_path, a + b)
    quantities = metrics["groups"][0]["quantities"]
    assert quantities["hessian"]["reason"] == "only 1 width(s) measured"
    assert quantities["precond"]["verdict"] != "undetermined"
    assert any("hessian measured for widths 16 but not for 32, 64" in p for p in metrics["problems"])


def test_a_loop_without_losses_is_measured_and_left_out_of_lr_transfer(tmp_path):
    import torch

    import sharpscope as ss
    from sharpscope.models import MLP
    from sharpscope.runs.jobs import run_spectrum_job

    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    runs = []
    for width in (8, 16):
        torch.manual_seed(0)
        model = MLP(width=width, in_features=8, out_features=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = tmp_path / f"w{width}.h5"
        with ss.Recorder(path, model, opt, batch=(x, y), every=2, loss_fn=torch.nn.CrossEntropyLoss(),
                         meta={"model_factory": "sharpscope.models:MLP",
                               "model_kwargs": {"width": width, "in_features": 8, "out_features": 4},
                               "width": width, "lr": 0.1}) as rec:
            for _ in range(4):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                rec.step()  # no loss passed: unknown, not diverged
        runs.append(path)
    job = run_spectrum_job(runs, ["hessian"], progress=False)
    assert job.diverged == 0 and job.computed == 6
    metrics = report_metrics(tmp_path, runs)
    assert metrics["groups"][0]["quantities"]["hessian"]["verdict"] != "undetermined"
    assert any("w8.h5: records no training loss" in p for p in metrics["problems"])
    assert metrics["transfer"][0]["verdict"] == "undetermined"


def test_blown_up_runs_count_as_diverged_in_the_lr_transfer():
    from sharpscope.analysis.comparisons import RunSummary, analyze

    def run(width, lr, final):
        return RunSummary(f"w{width}-lr{lr}.h5", "mup", "sgd", lr, width, final, initial_loss=2.3)

    grid = {0.25: 0.9, 0.5: 0.6, 1.0: 0.7, 2.0: 40.0}  # lr 2 blew up: finite, far above the initial 2.3
    metrics = analyze([run(w, lr, loss) for w in (16, 32) for lr, loss in grid.items()])
    (transfer,) = metrics["transfer"]
    assert transfer["n_diverged"] == {16: 1, 32: 1}
    assert any("2 run(s) ended above twice their initial loss (width@lr: 16@2, 32@2)" in p for p in metrics["problems"])
    assert 0.5 < transfer["lr_opt"][16] < 1.0  # the optimum from the finite bracket 0.25, 0.5, 1


def test_seeds_give_the_verdicts_intervals_and_the_page_shows_them(tmp_path):
    """Issue 25: with several seeds per size the analysis passes the seeds on (intervals, codes, seeds
    suggested); one seed per size reads 'no interval (1 seed)'; the page names the method."""
    import math

    from sharpscope.analysis.comparisons import RunSummary, analyze_in_detail
    from sharpscope.analysis.findings import findings
    from sharpscope.analysis.page import method_note, verdict_rows

    steps = [0, 10, 20, 30, 40]

    def run(width, lr, seed, noise):
        loss = 0.1 * (math.log2(lr) + 3 + 0.05 * noise) ** 2 + 0.5
        s = RunSummary(f"w{width}-lr{lr}-s{seed}.h5", "mup", "sgd", lr, width, loss, seed=seed, initial_loss=2.3)
        s.trajectories["hessian"] = (steps, [4.0 * (1 + 0.01 * noise) * (1 + 0.3 * width ** -0.5)] * len(steps))
        s.thresholds["hessian"] = 4.0
        return s

    lrs = (0.03125, 0.0625, 0.125, 0.25, 0.5)
    seeded = [run(w, lr, seed, noise) for w in (16, 64, 256) for lr in lrs
              for seed, noise in zip((0, 1, 2), (-1.0, 0.2, 0.9))]
    analysis = analyze_in_detail(seeded)
    transfer = analysis.metrics["transfer"][0]
    assert transfer["seeds_paired"] == 3 and transfer["interval"] == "90% bonferroni-t / mapped"
    assert transfer["verdict"] == "transfers" and transfer["code"] == "interval", transfer["reason"]
    assert transfer["shift_range_octaves_interval"][1] <= 0.5
    group = analysis.metrics["groups"][0]
    hessian = group["quantities"]["hessian"]
    assert hessian["seeds_paired"] == 3 and hessian["spread_summary_interval"][0] <= hessian["spread_summary"]
    eos = hessian["edge_of_stability"]["16.0"]
    assert eos["seeds"] == 3 and eos["tail_ratio_interval"][0] < eos["tail_ratio"] < eos["tail_ratio_interval"][1]
    assert analysis.groups[0].quantities["hessian"].bands  # the figures' seed range
    assert analysis.metrics["uncertainty"]["level"] == 0.9 and "straddles" in analysis.metrics["uncertainty"]["codes"]
    rows = verdict_rows(findings(analysis.metrics), interval=True)
    assert any("(90%, 3 seeds)" in cell for row in rows for cell in row) and "Student t" in method_note(findings(analysis.metrics))
    single = analyze_in_detail([r for r in seeded if r.seed == 0]).metrics
    assert single["transfer"][0]["code"] == "no-interval" and single["transfer"][0]["interval"] == "no interval"
    items = findings(single)
    assert all(row[4] == "no interval (1 seed)" for row in verdict_rows(items, interval=True))
    assert "'no interval (1 seed)'" in method_note(items)


def test_sizes_that_share_only_the_initial_checkpoint_are_not_analysed():
    """A fixed sample budget across batch sizes (issue 25): the horizons differ, the runs share step 0 only; a
    super-consistency verdict there would compare untrained models."""
    from sharpscope.analysis.comparisons import RunSummary, analyze

    def run(batch, steps):
        s = RunSummary(f"b{batch}.h5", "mup", "adamw", 0.01, 128, 0.5, initial_loss=2.0, axes={"batch_size": batch})
        s.trajectories["hessian"] = ([0, steps], [3.0, 1.0 + batch / 100])
        return s

    metrics = analyze([run(32, 1200), run(128, 300), run(512, 75)], compare="batch_size")
    entry = metrics["groups"][0]["quantities"]["hessian"]
    assert entry["code"] == "not-analysed" and "initial" in entry["not_analysed"], entry
