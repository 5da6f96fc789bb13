"""``modweights bench``: timings that cannot contradict each other, and a table that reads well.

The implementations here are fakes whose forward and backward sleep (``time.sleep``), so the
tests are about the runner and the report, not about any backend's speed.
"""
from __future__ import annotations

import time

import pytest
import torch

from modweights import cli
from modweights.benchmarking import WORKLOADS
from modweights.benchmarking import impls as I
from modweights.benchmarking import report, runner


class _Sleep(torch.autograd.Function):
    """y = 2 x; the forward sleeps ``fwd_s`` seconds, the backward ``bwd_s()`` seconds."""

    @staticmethod
    def forward(ctx, x, fwd_s, bwd_s):
        time.sleep(fwd_s)
        ctx.bwd_s = bwd_s
        return x * 2

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd_s())
        return g * 2, None, None


@pytest.fixture
def sleeping_impls(monkeypatch):
    """Every implementation is a fake: forward 1 ms; the backward starts at 8 ms and gets faster
    with every call (a machine whose load falls during the run)."""
    calls = {"n": 0}

    def bwd_s():
        calls["n"] += 1
        return max(0.2, 8.0 - 0.4 * calls["n"]) * 1e-3

    def fake_prepare(impl, wl, inputs, compile_timeout=None):
        x = inputs["x"].detach().requires_grad_(True)
        return I.Prepared(lambda: _Sleep.apply(x, 1e-3, bwd_s), [x])

    monkeypatch.setattr(I, "prepare", fake_prepare)
    return calls


def _sweep(workloads=("cpu-condconv",), impls=("dense", "torch"), reps=8):
    settings = runner.Settings(device=torch.device("cpu"), impls=list(impls), warmup=1, reps=reps,
                               compile=False, tiny=True)
    return runner.run([WORKLOADS[w] for w in workloads], settings)


def test_bwd_never_exceeds_the_training_step(sleeping_impls):
    """bwd and fwd+bwd come from the same steps: bwd's median, p20 and p80 are each below
    fwd+bwd's, even when the machine speeds up during the run (timed in separate runs, the
    earlier bwd pass would be the slower one)."""
    sweep = _sweep()
    by = {(r["impl"], r["pass"]): r for r in sweep.records}
    for impl in ("dense", "torch"):
        b, s = by[impl, "bwd"], by[impl, "fwd+bwd"]
        assert b["status"] == s["status"] == "ok"
        assert b["reps"] == s["reps"] == 8
        for q in ("median_ms", "p20_ms", "p80_ms", "min_ms"):
            assert b[q] < s[q], (impl, q, b[q], s[q])
        # the step is the backward plus a forward of about 1 ms
        assert s["median_ms"] - b["median_ms"] >= 0.9


def test_a_large_spread_is_flagged(sleeping_impls):
    sweep = _sweep(impls=("dense",))
    recs = [r for r in sweep.records if r["status"] == "ok"]
    for r in recs:
        r["p20_ms"], r["p80_ms"] = 1.0, 1.2
    calm = report.format_table(sweep)
    recs[0]["p20_ms"], recs[0]["p80_ms"] = 1.0, 3.0
    busy = report.format_table(sweep)
    rows = lambda text: [l for l in text.splitlines() if l.startswith("  dense")]  # noqa: E731
    assert not [l for l in rows(calm) if l.rstrip().endswith("!")]
    assert len([l for l in rows(busy) if "!" in l]) == 1
    assert "p80/p20 > 1.5" in busy


@pytest.mark.parametrize("ms, text", [(0.00085, "0.85 us"), (0.85, "850 us"), (12.34, "12.3 ms"),
                                      (2100.0, "2.1 s"), (None, "-")])
def test_times_read_in_their_own_unit(ms, text):
    assert report.fmt_time(ms) == text


@pytest.mark.parametrize("value, text", [(4.2e11, "420 GFLOP/s"), (1.5e12, "1.5 TFLOP/s"),
                                         (5e5, "500 kFLOP/s"), (2.5e8, "250 MFLOP/s")])
def test_rates_scale_from_cpu_to_gpu(value, text):
    assert report.fmt_rate(value, "FLOP/s") == text


def test_the_table_has_no_tiny_tflops_and_one_line_per_skipped_impl(sleeping_impls):
    sweep = _sweep(workloads=("cpu-condconv", "cpu-modconv"), impls=("dense", "torch", "naive-bmm", "timm-condconv"),
                   reps=2)
    text = report.format_table(sweep)
    # every number in its own unit: no 0.0005 TFLOP/s, no 0.0 GB/s on a CPU
    assert "0.000" not in text and " 0.0 " not in text, text
    naive = [l for l in text.splitlines() if l.strip().startswith("naive-bmm:")]
    timm = [l for l in text.splitlines() if l.strip().startswith("timm-condconv:")]
    assert len(naive) == 1 and "linear only" in naive[0]
    # skipped on one workload only: the line says which
    assert len(timm) == 1 and "(cpu-modconv)" in timm[0]
    # ours and plain PyTorch are named as such
    assert "modweights (torch backend)" in text and "dense: plain PyTorch" in text


def test_bench_help_names_every_pass(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for p in runner.PASSES:
        assert p in out.rsplit("--passes", 1)[1].split("--compile", 1)[0]
    assert f"--quick {cli.QUICK_REPS}" in out


def test_ratio_plot_anchors_bars_at_1x_with_error_bars_and_marks_skips(sleeping_impls, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from modweights.benchmarking import plots

    sweep = _sweep(workloads=("cpu-condconv", "cpu-modconv"), impls=("dense", "torch", "timm-condconv"), reps=3)
    runner._fill_ratios(sweep.records)
    ax = Figure().subplots()
    plots._panel(ax, sweep, "fwd+bwd", ["torch", "timm-condconv"], "ratio_to_dense", 1.0, "x")
    bars = [b for b in ax.patches if b.get_width() > 0]
    assert len(bars) == 3  # torch on both workloads, timm-condconv on cpu-condconv only
    assert all(b.get_y() == 1.0 for b in bars)  # anchored at 1x, not at the bottom of the axis
    assert len(ax.collections) == 3  # one p20-p80 error bar per bar
    assert [t.get_text() for t in ax.texts] == ["n/a"]  # timm-condconv does not apply to cpu-modconv
    assert "1x" in [t.get_text() for t in ax.get_yticklabels()]
    assert ax.get_yscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["modweights (torch backend)", "timm-condconv"]
    paths = plots.write_plots(sweep, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["ratio_to_dense.png", "memory.png"]
