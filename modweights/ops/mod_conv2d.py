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

    def cfg_from_args(self, args):
        demod, eps, stride, padding, dilation, groups = args
        return ModConv2dConfig(bool(demod), float(eps), tuple(stride), tuple(padding), tuple(dilation), int(groups))

    def bias_view(self, b):
        return b[..., None, None] if b.dim() == 2 else b[:, None, None]  # over H', W'

    # test cases
    def cases(self) -> list:
        from ..testing import _mod_conv2d_cases
        return _mod_conv2d_cases()

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


SPEC = register(ModConv2dSpec())
