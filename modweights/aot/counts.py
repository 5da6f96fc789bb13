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

from ..benchmarking.workloads import dense_flops, forward_bytes, out_hw
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


def _work(case, name: str, launch) -> tuple[float, float, str]:
    """(MMA FLOPs, CUDA-core FMAs, why) of one launch at its default tiles."""
    f, meta = launch.flags, launch.default[0]
    K = case.K
    kmix = K if f.get("HAS_COEFFS") else 1
    if case.op == "mod_linear":
        B, T, I, O = case.B, max(case.T, 1), case.I, case.O
        rows = B * T
        if name in ("_mod_linear_fwd_kernel", "_mod_linear_bwd_dx_kernel"):
            bt = meta["BLOCK_T"]
            if f.get("MIX_B"):
                tiles = B * math.ceil(T / bt)
                mma = 2 * tiles * bt * O * I
                mix = tiles * O * I * (K if f.get("HAS_COEFFS") else 0)
                why = (f"mixture in the B-tile load ({f.get('BLOCK_K', 1)} bank tiles per stage: short reduction "
                       f"block); {bt}-row tiles amortise the mixing" if f.get("HAS_COEFFS") else "dense GEMM tile")
            else:
                mma = 2 * math.ceil(rows / bt) * bt * O * I * kmix
                mix = 0
                why = "stacked: coefficients scale the A tile, one dot per expert" if kmix > 1 else "dense GEMM tile"
                if bt <= 32:
                    why = "few rows: one pass over the bank, many programs"
            return mma, mix, why
        if name == "_mod_linear_bwd_weight_kernel":
            return 2 * rows * O * I, 3 * B * kmix * O * I, (
                f"{kmix} float32 accumulators per output element in registers: the largest spill-free wgmma tile")
        if name == "_mod_linear_bwd_weight_token_kernel":
            return 2 * rows * O * I * K, 0, "stacked GEMM, one expert per program"
        if name == "_mod_linear_demod_kernel":
            return 0, 2 * case.B * kmix * O * I, "pre-pass: the mixed rows formed tile by tile"
        return 0, 0, "bandwidth-bound pre-pass"
    # conv2d
    kh, kw = case.kernel
    R = case.I * kh * kw
    ho, wo = out_hw(case)
    P = ho * wo
    if name in ("_mod_conv2d_fwd_kernel", "_mod_conv2d_bwd_dx_kernel"):
        bp = meta.get("BLOCK_P", meta.get("BLOCK_Q"))
        px = P if name == "_mod_conv2d_fwd_kernel" else case.H * case.W
        tiles = case.B * math.ceil(px / bp)
        mix = tiles * case.O * R * K if f.get("HAS_COEFFS") else 0
        why = (f"mixture in the filter-tile load ({f.get('BLOCK_K', 1)} bank tiles per stage): short reduction "
               f"block, {bp}-pixel tiles" if f.get("HAS_COEFFS") else "implicit-GEMM tile")
        return 2 * tiles * bp * case.O * R, mix, why
    if name == "_mod_conv2d_bwd_weight_kernel":
        return 2 * case.B * P * case.O * R, 3 * case.B * kmix * case.O * R, (
            f"{kmix} float32 accumulators per output element in registers")
    if name == "_mod_conv2d_demod_kernel":
        return 0, 2 * case.B * kmix * case.O * R, "pre-pass: the mixed filter rows tile by tile"
    return 0, 0, "bandwidth-bound pre-pass"


def _operand_bytes(case, name: str, launch, eb: int = 2) -> float:
    """Operand bytes the programs load at the chosen tiles (each program its A and B tiles over the
    whole reduction): what L2 serves beyond the compulsory HBM bytes. The dense GEMM of the same
    shape at 128x256 tiles is the yardstick (:func:`_dense_operand_bytes`)."""
    f, meta = launch.flags, launch.default[0]
    K = case.K if f.get("HAS_COEFFS") else 1
    cd = lambda a, b: math.ceil(a / b)  # noqa: E731
    if case.op == "mod_linear":
        B, T, I, O = case.B, max(case.T, 1), case.I, case.O
        R = B * T
        if name in ("_mod_linear_fwd_kernel", "_mod_linear_bwd_dx_kernel"):
            bt = meta["BLOCK_T"]
            n, red = (O, I) if name == "_mod_linear_fwd_kernel" else (I, O)
            bn = meta["BLOCK_O"] if name == "_mod_linear_fwd_kernel" else meta["BLOCK_I"]
            n_r = B * cd(T, bt) if f.get("MIX_B") else cd(R, bt)
            per = (bt + K * bn) * red if f.get("MIX_B") else K * (bt + bn) * red
            return n_r * cd(n, bn) * per * eb
        if name == "_mod_linear_bwd_weight_kernel":
            bo, bi = meta["BLOCK_O"], meta["BLOCK_I"]
            return cd(O, bo) * cd(I, bi) * (R * (bo + bi) + B * K * bo * bi) * eb
        if name == "_mod_linear_bwd_weight_token_kernel":
            bo, bi = meta["BLOCK_O"], meta["BLOCK_I"]
            return cd(O, bo) * cd(I, bi) * case.K * R * (bo + bi) * eb
        return 0.0
    kh, kw = case.kernel
    ho, wo = out_hw(case)
    P, Q, taps = ho * wo, case.H * case.W, kh * kw
    if name == "_mod_conv2d_fwd_kernel":
        bp, bo = meta["BLOCK_P"], meta["BLOCK_O"]
        return case.B * cd(P, bp) * cd(case.O, bo) * (bp + K * bo) * case.I * taps * eb
    if name == "_mod_conv2d_bwd_dx_kernel":
        bq, bi = meta["BLOCK_Q"], meta["BLOCK_I"]
        return case.B * cd(Q, bq) * cd(case.I, bi) * (bq + K * bi) * case.O * taps * eb
    if name == "_mod_conv2d_bwd_weight_kernel":
        bo, bi = meta["BLOCK_O"], meta["BLOCK_I"]
        return cd(case.O, bo) * cd(case.I, bi) * taps * case.B * (P * (bo + bi) + K * bo * bi) * eb
    return 0.0


def _dense_operand_bytes(case, eb: int = 2) -> float:
    """The same count for one dense GEMM (or implicit-GEMM conv) of the shape at 128x256 tiles."""
    if case.op == "mod_linear":
        M, N, Kd = case.B * max(case.T, 1), case.O, case.I
    else:
        kh, kw = case.kernel
        ho, wo = out_hw(case)
        M, N, Kd = case.B * ho * wo, case.O, case.I * kh * kw
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
        eb = 2
        dense = dense_flops(case)
        dense_t = 3 * max(dense / MMA_RATE, forward_bytes(case, eb) / HBM_RATE)
        tot_s = tot_o = fwd_s = 0.0
        for pass_, launch in launches(p):
            mma, mix, why = _work(case, launch.name, launch)
            nbytes = _tensor_bytes(launch)
            ts, to = _t(mma, nbytes, mix)
            tot_s, tot_o = tot_s + ts, tot_o + to
            ob = _operand_bytes(case, launch.name, launch)
            ops = f"{ob / 1e9:.1f} ({_dense_operand_bytes(case) / 1e9:.1f})" if ob else "-"
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
