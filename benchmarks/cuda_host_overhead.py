"""Host time per call of the `cuda` backend, measured on the CPU through the host emulation.

The kernels are the emulation's (``csrc/emu``) with ``MW_EMU_NO_KERNELS=1``: every launch
is checked and dropped, so what is timed is the host side alone: the registry and
availability, validation, allocation, the binding call, the C++ checks and plans. Results
are garbage in that mode; this measures time, never values.

    python benchmarks/cuda_host_overhead.py [--reps N] [--build-dir DIR]

Prints one line per path (microseconds of this thread's CPU time per call, best of 7
repeats of N calls):
``backend forward`` (``cuda.mod_linear_forward`` with canonical inputs, what the autograd glue
calls), ``public forward`` (``mod_linear(..., backend="cuda")`` under ``no_grad``) and
``public forward+backward`` (the same with autograd, all five gradients).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _emu_build(out: Path) -> str:
    spec = importlib.util.spec_from_file_location("_mw_build_emu", ROOT / "csrc" / "emu" / "build_emu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.build(out, opt="-O2"))


def _per_call_us(fn, reps: int) -> float:
    for _ in range(max(10, reps // 10)):
        fn()
    times = []
    for _ in range(7):
        # CPU time of this thread (launches are dropped, so all the work is on it): time spent
        # descheduled on a shared machine does not count
        t0 = time.thread_time()
        for _ in range(reps):
            fn()
        times.append((time.thread_time() - t0) / reps * 1e6)
    return min(times)  # best of 7: the least disturbed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--build-dir", default=None, help="where to build the emulation (default: a temporary folder)")
    args = ap.parse_args(argv)
    os.environ["MW_EMU_NO_KERNELS"] = "1"  # before the emulation loads
    from modweights import _switches as switches

    build_dir = Path(args.build_dir or tempfile.mkdtemp(prefix="mw_emu_overhead_"))
    with switches.override(cuda_emulation_library=_emu_build(build_dir)):
        return _time(args)


def _time(args) -> int:
    """Print the host time per call of the cuda backend's entry points (the emulation set)."""
    import torch

    from modweights import functional as MF
    from modweights._checks import ModLinearConfig
    from modweights.backends import cuda as CB

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    B, T, I, O, K = 2, 8, 16, 16, 2  # T > DECODE_ROWS: the per-sample kernels
    x = torch.randn(B, T, I, generator=g)
    bank = torch.randn(K, O, I, generator=g)
    a = torch.rand(B, K, generator=g)
    s = torch.rand(B, I, generator=g) + 0.5
    bias = torch.randn(K, O, generator=g)
    cfg = ModLinearConfig(True, 1e-8)
    leaves = [t.clone().requires_grad_() for t in (x, bank, a, s, bias)]

    def public_fwd():
        with torch.no_grad():
            MF.mod_linear(x, bank, a, s, bias=bias, demodulate=True, backend="cuda")

    def public_fwd_bwd():
        xl, bl, al, sl, bil = leaves
        y = MF.mod_linear(xl, bl, al, sl, bias=bil, demodulate=True, backend="cuda")
        torch.autograd.grad(y.sum(), leaves)

    rows = [
        ("backend forward", lambda: CB.mod_linear_forward(x, bank, a, s, bias, cfg)),
        ("public forward", public_fwd),
        ("public forward+backward", public_fwd_bwd),
    ]
    print(f"cuda backend host time per call (host emulation, kernels dropped), B={B} T={T} I={I} O={O} K={K}, "
          f"demod, styles, bank bias; torch {torch.__version__}, {args.reps} calls x 7")
    for name, fn in rows:
        print(f"  {name:26s} {_per_call_us(fn, args.reps):8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
