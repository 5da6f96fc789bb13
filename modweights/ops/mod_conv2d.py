"""The ``mod_conv2d`` op spec: ``x (B, I, H, W)``, ``bank (K, O, I // groups, kh, kw)``,
per-sample conditioning; output ``(B, O, H', W')``."""
from __future__ import annotations

import dataclasses
import math

from .._checks import ModConv2dConfig, conv2d_out_hw
from . import register
from ._spec import OpSpec


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class ModConv2dSpec(OpSpec):
    name = "mod_conv2d"
    config = ModConv2dConfig
    schema_extra = ", int[] stride, int[] padding, int[] dilation, int groups"
    wrappers = ("modulated_conv2d", "mixture_conv2d")
    triton_launcher = "mod_conv2d"

    def cfg_args(self, cfg) -> tuple:
        return (cfg.demodulate, cfg.eps, list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups)

    def launcher_args(self, case) -> tuple:
        c = case.conv
        return (_pair(c.get("stride", 1)), _pair(c.get("padding", 0)), _pair(c.get("dilation", 1)),
                c.get("groups", 1))

    def cfg_from_args(self, args):
        demod, eps, stride, padding, dilation, groups = args
        return ModConv2dConfig(bool(demod), float(eps), tuple(stride), tuple(padding), tuple(dilation), int(groups))

    def bias_view(self, b):
        return b[..., None, None] if b.dim() == 2 else b[:, None, None]  # over H', W'

    # test cases
    def cases(self) -> list:
        from ..testing import Case
        C = "mod_conv2d"
        return [
            Case(C, B=2, I=5, O=7, K=1, H=7, W=6, styles="sample", demodulate=True, conv={"padding": 1}),
            Case(C, B=2, I=5, O=7, K=1, H=7, W=6, styles="sample", demodulate=False, bias="shared",
                 conv={"stride": 2, "padding": 1}),
            Case(C, B=3, I=4, O=6, K=3, H=6, W=5, coeffs="sample", conv={"padding": 1}),
            Case(C, B=3, I=4, O=6, K=3, H=6, W=5, coeffs="sample", bias="bank",
                 conv={"padding": (1, 2), "stride": (2, 1)}),
            Case(C, B=2, I=4, O=6, K=2, H=7, W=7, coeffs="sample", bias="shared",
                 conv={"groups": 2, "padding": 2, "dilation": 2}),
            Case(C, B=2, I=4, O=4, K=3, H=6, W=6, coeffs="sample", conv={"groups": 4, "padding": 1}),
            Case(C, B=2, I=5, O=7, K=3, H=6, W=5, coeffs="sample", styles="sample", demodulate=True,
                 bias="bank", conv={"padding": 1}),
            Case(C, B=1, I=3, O=5, K=1, H=5, W=5, kernel=(1, 1)),
            Case(C, B=2, I=3, O=5, K=1, H=6, W=6, kernel=(1, 3), coeffs="sample", styles="sample",
                 demodulate=False, conv={"padding": (0, 1)}),
            Case(C, B=2, I=3, O=4, K=2, H=5, W=5, kernel=(3, 3), coeffs="sample", styles="sample",
                 demodulate=False, conv={"padding": 1}),
        ]

    def case_shape(self, case) -> str:
        kh, kw = case.kernel
        extra = ",".join(f"{k}={v}" for k, v in sorted(case.conv.items()))
        return f"B{case.B}I{case.I}O{case.O}H{case.H}W{case.W}k{kh}x{kw}" + (f"[{extra}]" if extra else "")

    def make_x_bank(self, case, rnd) -> tuple:
        groups = case.conv.get("groups", 1)
        kh, kw = case.kernel
        x = rnd(case.B, case.I, case.H, case.W)
        bank = rnd(case.K, case.O, case.I // groups, kh, kw, scale=1.0 / math.sqrt(case.I // groups * kh * kw))
        return x, bank, (case.B,)

    def problem_kwargs(self, case, dtype) -> dict:
        # the channel counts too, as mod_conv2d passes them: a backend may implement a grouped conv
        # only for some of them (triton: depthwise, groups == in_channels == out_channels)
        return {"dtype": dtype, "groups": case.conv.get("groups", 1), "kernel_size": tuple(case.kernel),
                "in_channels": case.I, "out_channels": case.O}

    # benchmarks
    def out_hw(self, case) -> tuple[int, int]:
        """Output spatial size of ``case`` (as :func:`torch.nn.functional.conv2d`)."""
        c = case.conv
        return conv2d_out_hw(case.H, case.W, *case.kernel, _pair(c.get("stride", 1)), _pair(c.get("padding", 0)),
                             _pair(c.get("dilation", 1)))

    def dense_flops(self, case) -> int:
        ho, wo = self.out_hw(case)
        kh, kw = case.kernel
        return 2 * case.B * case.O * (case.I // case.conv.get("groups", 1)) * kh * kw * ho * wo

    def dense(self, case, x, w):
        import torch.nn.functional as F
        return F.conv2d(x, w, None, **case.conv)

    def weight_io_elems(self, case) -> int:
        kh, kw = case.kernel
        ho, wo = self.out_hw(case)
        return (case.K * case.O * (case.I // case.conv.get("groups", 1)) * kh * kw
                + case.B * (case.I * case.H * case.W + case.O * ho * wo))

    def shape_str(self, case, cond: str) -> str:
        kh, kw = case.kernel
        extra = "".join(f" {k}={v}" for k, v in sorted(case.conv.items()))
        return f"B{case.B} {case.I}->{case.O} {kh}x{kw} {case.H}x{case.W}{extra} K{case.K} {cond}"

    def tiny(self, case):
        return dataclasses.replace(case, B=min(case.B, 2), I=min(case.I, 16), O=min(case.O, 16),
                                   H=min(case.H, 8), W=min(case.W, 8))

    def aot_test_cases(self) -> list:
        from ..testing import Case
        C = self.name
        return [
            Case(C, B=4, I=96, O=80, K=4, H=19, W=23, coeffs="sample", styles="sample", demodulate=True,
                 bias="bank", conv={"padding": 1}),
            Case(C, B=8, I=64, O=128, K=1, H=32, W=32, styles="sample", demodulate=True,
                 conv={"padding": 1, "stride": 2}),
        ]

    def sanitizer_cases(self, dry: bool) -> list:
        """The GPU check's sanitizer cases (``modweights.benchmarking.gpu_check``): tails in every
        dimension and every conditioning mode the op's kernels have, sized for the GPU tiles
        (64-256); tiny ones for ``dry`` runs (the interpreter)."""
        from ..testing import Case
        C = self.name
        if dry:
            return [Case(C, B=2, I=5, O=6, K=2, H=5, W=4, coeffs="sample", styles="sample", demodulate=True,
                         bias="bank", conv={"padding": 1})]
        return [
            Case(C, B=2, I=40, O=72, K=3, H=11, W=9, coeffs="sample", styles="sample", demodulate=True, bias="bank",
                 conv={"padding": 1}),
            Case(C, B=3, I=24, O=40, K=2, H=9, W=10, coeffs="sample", bias="shared",
                 conv={"padding": 2, "dilation": 2, "stride": 2}),
            Case(C, B=2, I=32, O=32, K=2, H=9, W=9, coeffs="sample", demodulate=True,
                 conv={"groups": 32, "padding": 1}),
        ]

    def sweep_cases(self, dry: bool) -> list:
        from ..testing import Case
        C = self.name
        if dry:
            return [("conv", Case(C, B=2, I=5, O=6, K=2, H=5, W=4, coeffs="sample", styles="sample",
                                  demodulate=True, bias="bank", conv={"padding": 1}), None)]
        return [
            ("conv3x3", Case(C, B=2, I=136, O=264, K=3, H=17, W=19, coeffs="sample", styles="sample",
                             demodulate=True, bias="bank", conv={"padding": 1}), None),
            ("conv-dil", Case(C, B=3, I=72, O=130, K=2, H=15, W=18, coeffs="sample", bias="shared",
                              conv={"padding": 2, "dilation": 2}), None),
        ]

    # the Triton kernels' counts (modweights.aot.counts), per launch at its default tiles
    def gemm_dims(self, case) -> tuple[int, int, int]:
        kh, kw = case.kernel
        ho, wo = self.out_hw(case)
        return case.B * ho * wo, case.O, case.I * kh * kw

    def kernel_work(self, case, launch) -> tuple[float, float, str]:
        name, f, meta = launch.name, launch.flags, launch.default[0]
        K = case.K
        kmix = K if f.get("HAS_COEFFS") else 1
        kh, kw = case.kernel
        R = case.I * kh * kw
        ho, wo = self.out_hw(case)
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

    def kernel_operand_bytes(self, case, launch, eb: int = 2) -> float:
        name, f, meta = launch.name, launch.flags, launch.default[0]
        K = case.K if f.get("HAS_COEFFS") else 1
        cd = lambda a, b: math.ceil(a / b)  # noqa: E731
        kh, kw = case.kernel
        ho, wo = self.out_hw(case)
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


SPEC = register(ModConv2dSpec())
