"""Benchmarks of the modulated-GEMM ops: workloads, implementations, timing and reports.

One definition shared by ``modweights bench`` (:mod:`modweights.cli`) and the
pytest-benchmark suite in ``benchmarks/``:

- :mod:`.workloads`: W1-W7 (GPU) and the ``cpu-*`` workloads, as :class:`Workload`;
- :mod:`.impls`: the implementations timed on them (the modweights backends, the dense op,
  the naive reference, timm's CondConv2d, StyleGAN2's two modconv paths, torch.compile);
- :mod:`.runner`: timing (median with warm-up and device sync), peak memory, the sweep;
- :mod:`.report`: the terminal table, JSON, CSV, PNG plots;
- :mod:`.auto_table`: the measurements behind ``auto`` (per shape class, from a sweep or bench results);
- :mod:`.kernel_sweep`: every autotuning candidate of every Triton kernel launched and checked;
- :mod:`.gpu_check`: the Python side of ``benchmarks/gpu_check.sh`` (env, sanitizer cases, summary).
"""
from .impls import BASELINES, Prepared, Skip, all_impls, applies, backend_impls, prepare
from .runner import PASSES, Settings, Sweep, Timer, run
from .workloads import WORKLOADS, Workload, default_names, dense_flops, select

__all__ = [
    "BASELINES", "PASSES", "WORKLOADS", "Prepared", "Settings", "Skip", "Sweep", "Timer", "Workload",
    "all_impls", "applies", "backend_impls", "default_names", "dense_flops", "prepare", "run", "select",
]
