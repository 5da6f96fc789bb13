"""pytest-benchmark suite over the shared workloads (:mod:`modweights.benchmarking`).

Parametrised over workload x implementation x pass, with the same definitions and setups as
``modweights bench``. Implementations that do not apply (unavailable backend, a peer that
has no such op, the memory limit) are skipped with the reason.

Run::

    pytest benchmarks/bench_workloads.py                       # the device's default workloads
    MODWEIGHTS_BENCH_WORKLOADS=cpu-condconv,cpu-mixlinear pytest benchmarks/bench_workloads.py
    MODWEIGHTS_BENCH_TINY=1 pytest benchmarks/bench_workloads.py --benchmark-disable   # CI: seconds

(The file is named ``bench_*.py``, so pass its path: the project's pytest settings collect
``tests/`` only.) ``MODWEIGHTS_BENCH_TINY=1`` shrinks every workload to a few thousand FLOPs:
it checks that every setup runs, forward and backward, never how fast. ``MODWEIGHTS_BENCH_COMPILE=1``
adds ``torch.compile`` of the reference (minutes of compilation on a CPU). float32 dots are exact
on every implementation, the dense op included, as in ``modweights bench``
(:func:`modweights.benchmarking.runner.fp32_precision`); ``MODWEIGHTS_BENCH_TF32=1`` runs them all
in TF32.
"""
from __future__ import annotations

import os

import pytest
import torch

from modweights import testing as T
from modweights.benchmarking import PASSES, Skip, Timer, all_impls, applies, prepare, select
from modweights.benchmarking.runner import DTYPES, PASS_FLOPS, fp32_precision

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = os.environ.get("MODWEIGHTS_BENCH_TINY") == "1"
COMPILE = os.environ.get("MODWEIGHTS_BENCH_COMPILE") == "1"
TF32 = os.environ.get("MODWEIGHTS_BENCH_TF32") == "1"
_names = [n for n in os.environ.get("MODWEIGHTS_BENCH_WORKLOADS", "").split(",") if n]
WORKLOADS = [w.tiny() if TINY else w for w in select(_names or None, DEVICE)]

_inputs_cache: dict = {}


def _inputs(wl, dtype):
    # one set of inputs per workload, shared by its implementations (the big ones take seconds to draw)
    key = (wl.name, dtype)
    if key not in _inputs_cache:
        _inputs_cache.clear()
        _inputs_cache[key] = T.make_inputs(wl.case, dtype, DEVICE, seed=0)
    return _inputs_cache[key]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", all_impls())
@pytest.mark.parametrize("wl", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_workload(benchmark, wl, impl, pass_):
    with fp32_precision(TF32) as precision:  # the same float32 dots for every impl, dense included
        _bench(benchmark, wl, impl, pass_, precision)


def _bench(benchmark, wl, impl, pass_, precision):
    dname = wl.dtype_for(DEVICE)
    dtype = DTYPES[dname]
    try:
        applies(impl, wl, DEVICE, dtype, compile_enabled=COMPILE)
        prep = prepare(impl, wl, _inputs(wl, dtype), compile_timeout=240.0)
    except Skip as e:
        pytest.skip(str(e))
    fn = prep.pass_fn(pass_)
    timer = Timer(DEVICE)

    def synced():
        fn()
        timer.sync()  # pytest-benchmark's clock is the host's: wait for the device

    flops = wl.flops * PASS_FLOPS[pass_]
    benchmark.extra_info.update(workload=wl.name, impl=impl, pass_=pass_, dtype=dname, device=str(DEVICE),
                                shape=wl.shape, flops=flops, tiny=TINY,
                                fp32_precision=precision if dname == "float32" else None)
    benchmark.pedantic(synced, rounds=3 if TINY else 10, warmup_rounds=1)
