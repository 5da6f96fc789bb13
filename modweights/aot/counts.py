"""The count sheet: per workload W1-W7 and per kernel launch, the work and the predicted time on
an H100/H200 (``python -m modweights.aot.counts`` writes ``docs/count_sheet.md``).

The launches and their default tiles come from the launchers themselves (the same recording
the AOT report compiles, :func:`modweights.aot.specs.launches`). Per launch:

* ``MMA``: tensor-core FLOPs of its dots (padded row tiles included);
* ``mix``: CUDA-core FMAs of the bank mixture and the weight-side folds (float32);
* ``bytes``: every tensor argument read or written once (the compulsory HBM traffic; re-reads
  served by L2 are not counted);
* predicted time ``max(MMA / 790 TFLOP/s, bytes / 4.3 TB/s) + mix / 33.5 T FMA/s`` (the mixing
  counted as if it did not overlap the MMA: an upper bound; the overlapped bound, with ``max``
  instead of ``+``, is given beside it).

These are predictions, not measurements: no GPU has run these kernels yet.
"""
from __future__ import annotations

import argparse
import math
import os

from ..benchmarking.workloads import dense_flops, forward_bytes
from . import workload_problems
from .specs import config_label, launches

#: bf16 dense tensor-core rate, HBM bandwidth (H100 SXM / H200 class) and float32 FMA rate
MMA_RATE = 790e12
HBM_RATE = 4.3e12
FMA_RATE = 33.5e12

#: the performance goal of each GPU workload (fwd+bwd against the dense op of the same shape unless said)
GOALS = {
    "W1": "<= 1.10x dense", "W2a": "<= 1.20x dense, >= 1.3x faster than materialise+bmm",
    "W2b": "<= 2.5x dense, >= 3x faster than materialise+bmm", "W3": "<= 1.10x K dense GEMMs",
    "W4": "<= 1.25x dense conv, >= 2x faster than grouped conv", "W5": "<= 1.5x dense conv, >= 2x faster than timm",
    "W6-1": ">= 80% of HBM bandwidth", "W6-8": ">= 80% of HBM bandwidth", "W6-64": ">= 80% of HBM bandwidth",
    "W7": "<= 1.35x dense conv",
}


def _tensor_bytes(launch) -> int:
    import torch
    seen, total = set(), 0
    for a in launch.args:
        if isinstance(a, torch.Tensor) and id(a) not in seen and a.numel() > 1:
            seen.add(id(a))
            total += a.numel() * a.element_size()
    return total


def _dense_operand_bytes(case, eb: int = 2) -> float:
    """Operand bytes of one dense GEMM (or implicit-GEMM conv) of the shape at 128x256 tiles: the
    yardstick of each launch's operand bytes (the op spec's ``kernel_operand_bytes``)."""
    M, N, Kd = case.spec.gemm_dims(case)
    return math.ceil(M / 128) * math.ceil(N / 256) * (128 + 256) * Kd * eb


def _t(mma, nbytes, mix) -> tuple[float, float]:
    floor = max(mma / MMA_RATE, nbytes / HBM_RATE)
    return floor + mix / FMA_RATE, max(floor, mix / FMA_RATE)


def sheet(names=None) -> str:
    lines = ["# Count sheet: W1-W7 on an H100/H200 (predictions)", "",
             "**These are predictions, not measurements**: counted from the launches the launchers make at "
             "their default tiles (`MODWEIGHTS_TRITON_AUTOTUNE=0`), with 790 TFLOP/s (bf16 tensor cores), "
             "4.3 TB/s (HBM) and 33.5 T FMA/s (float32 CUDA cores). No GPU has run these kernels yet. "
             "Regenerate with `python -m modweights.aot.counts`; the compiler's facts for the same launches "
             "are in `benchmarks/results/aot_report.md`.", "",
             "Per kernel: MMA = tensor-core GFLOP (row tiles padded), mix = CUDA-core GFMA (bank mixture, "
             "weight-side folds), MB = each tensor argument once; time = max(MMA, bytes) + mix "
             "(serial, an upper bound) and with the mixing overlapped (max of the three).", ""]
    summary = ["| workload | shape | dense fwd+bwd (us) | predicted fwd+bwd (us), serial / overlapped | ratio | "
               "against the goal's measure | goal |", "|---|---|---|---|---|---|---|"]
    detail = ["| workload | pass | kernel | tile | MMA GFLOP | mix GFMA | MB | operand GB (dense GEMM) | "
              "us (serial / overlapped) | tile: why |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in workload_problems(names):
        case = p.case
        kc = case.spec.canonical_case(case)  # the case the kernels run: its op's spec counts their work
        eb = 2
        dense = dense_flops(case)
        dense_t = 3 * max(dense / MMA_RATE, forward_bytes(case, eb) / HBM_RATE)
        tot_s = tot_o = fwd_s = 0.0
        for pass_, launch in launches(p):
            mma, mix, why = kc.spec.kernel_work(kc, launch)
            nbytes = _tensor_bytes(launch)
            ts, to = _t(mma, nbytes, mix)
            tot_s, tot_o = tot_s + ts, tot_o + to
            ob = kc.spec.kernel_operand_bytes(kc, launch)
            ops = f"{ob / 1e9:.1f} ({_dense_operand_bytes(kc) / 1e9:.1f})" if ob else "-"
            fwd_s += ts if pass_ == "fwd" else 0.0
            detail.append(f"| {p.name} | {pass_} | {launch.name.strip('_').replace('_kernel', '')} | "
                          f"{config_label(launch.default)} | {mma / 1e9:.1f} | {mix / 1e9:.2f} | {nbytes / 1e6:.0f} | "
                          f"{ops} | {ts * 1e6:.0f} / {to * 1e6:.0f} | {why} |")
        goal = GOALS.get(p.name, "")
        if p.name.startswith("W6"):
            measure = f"forward at {100 * forward_bytes(case, eb) / HBM_RATE / fwd_s:.0f}% of HBM bandwidth (serial)"
        elif case.coeffs == "token":
            measure = f"{tot_s / dense_t / case.K:.2f}x K dense GEMMs (serial)"
        else:
            measure = f"{tot_s / dense_t:.2f}x dense (serial)"
        summary.append(f"| {p.name} | {case.id} | {dense_t * 1e6:.0f} | {tot_s * 1e6:.0f} / {tot_o * 1e6:.0f} | "
                       f"{tot_s / dense_t:.2f}x / {tot_o / dense_t:.2f}x | {measure} | {goal} |")
    notes = ["", "Notes:", "",
             "- The dense reference is 3 GEMMs (or convolutions) of the workload's shape at the same rates; "
             "W3's goal is against K dense GEMMs, W6's against HBM bandwidth (its time is the bank read).",
             "- The weight-side kernels keep K float32 accumulators per output element in registers: at K = 8 "
             "the largest spill-free wgmma tile is 64x32 (linear and conv, under Triton 3.8 and 3.6), so (gz, x) "
             "are re-read from L2 once per output tile: the operand GB column counts that traffic against one "
             "dense GEMM of the shape at 128x256 tiles (about 4x at W2a, 2x at W1's 128x64). It is not in the "
             "predicted times (L2 bandwidth is not modelled): at W2a it may bound the weight side.",
             "- Mixing in the B-tile load costs `K * BLOCK_N * BLOCK_R` FMAs per step against "
             "`BLOCK_T * BLOCK_N * BLOCK_R` MMA MACs: float32 FMAs run at ~1/12 of the bf16 MAC rate, so "
             "with K = 8 and 128-row tiles the mixing takes ~0.74x the MMA time of the step, hidden only if it "
             "overlaps the asynchronous wgmma of the previous step (the pipelined loops allow it; the serial "
             "column assumes it does not). Tall row tiles (256) halve it where they fit without spilling.",
             "- The same mixing re-reads the K bank tiles once per row tile: at W2a the forward and dx load "
             "~39 GB of operands (6x the dense GEMM's), served by L2 only while the programs in flight share "
             "an O-tile column of the bank. Predicted times assume L2 keeps up; if it does not, the mixing "
             "layouts are L2-bound at K = 8 before they are MMA- or CUDA-core-bound."]
    return "\n".join(lines + summary + [""] + detail + notes) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modweights.aot.counts")
    ap.add_argument("--out", default="docs/count_sheet.md")
    a = ap.parse_args(argv)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(sheet())
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
