"""The torch backend's plans are counted for memory as well as time: no plan holds more than
materialising the per-sample weights and one bmm (the ``naive-bmm`` baseline of the bench)."""
from __future__ import annotations

import pytest
import torch

from modweights import testing as T
from modweights.backends import torch_backend
from modweights.benchmarking import WORKLOADS
from modweights.benchmarking import impls as I
from modweights.benchmarking import runner


def test_stacked_is_not_chosen_where_it_would_hold_more_than_the_formed_weights():
    # few rows per sample (cheap in time for stacked) but few input features and many experts:
    # K partial outputs per row (4 * 32 * 8 * 512) outweigh the formed weights (2 * 8 * 512 * 16)
    B, T_, I_, O, K = 8, 4, 16, 512, 8
    mem = torch_backend.plan_memory(B * T_, B, O, I_, K)
    assert mem["stacked"] > mem["form"]
    assert torch_backend.mod_linear_plan(B, T_, I_, O, K, False, False) == "form"
    # where stacked is the smaller one too, the count of time still decides (decode)
    assert torch_backend.mod_linear_plan(8, 1, 512, 512, 4, False, False) == "stacked"


def test_conv_stacked_is_not_chosen_where_it_would_hold_more_than_the_formed_filters():
    # one output pixel per sample and K = 8 maps of 512 channels against 1x1 filters of 4 inputs
    assert torch_backend.mod_conv2d_plan(4, 4, 512, 8, 1, 1, 1, 1, False) == "grouped"


def test_torch_backend_peak_memory_is_at_most_materialise_and_bmm():
    """Measured as the bench measures it, a training step of the CPU mixture linear workload
    (16 x 256 rows, 512 -> 512, K = 4): the torch backend's formed-weights plan frees the
    weights before forming their gradient."""
    device = torch.device("cpu")
    wl = WORKLOADS["cpu-mixlinear"]
    inputs = T.make_inputs(wl.case, torch.float32, device, 0)
    timer = runner.Timer(device)
    peak = {}
    for impl in ("torch", "naive-bmm"):
        f, b = I.prepare(impl, wl, inputs).training_step()
        peak[impl], method = timer.peak_bytes(lambda: b(f()))
        if peak[impl] is None:
            pytest.skip("this torch's profiler records no memory events")
    assert peak["torch"] <= peak["naive-bmm"], peak
