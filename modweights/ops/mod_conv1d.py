"""The ``mod_conv1d`` op spec: ``x (B, I, L)``, ``bank (K, O, I // groups, k)``, per-sample
conditioning; output ``(B, O, L')``.

It lowers to ``mod_conv2d`` with a unit height (``x (B, I, 1, L)``, ``bank (K, O, I // g, 1, k)``,
stride ``(1, s)``, padding ``(0, p)``, dilation ``(1, d)``): every backend that runs conv2d runs it,
with the conv2d kernels, and autograd's views carry the gradients back to the 1-D shapes. Only
the shape checks of ``x`` and ``bank`` and the 1-D geometry are its own (:func:`lower`); the
conditioning, bias and output-size rules are conv2d's, with the messages naming this op.
"""
from __future__ import annotations

import dataclasses

from .._checks import _check_tensor, _expect
from . import register
from ._spec import OpSpec
from .mod_conv2d import SPEC as _CONV2D


def _single(op: str, name: str, v, minimum: int) -> int:
    if isinstance(v, (tuple, list)) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: `{name}` must be an int (or a 1-tuple of one); got {v!r}")
    if v < minimum:
        raise ValueError(f"{op}: `{name}` must be >= {minimum}; got {v}")
    return int(v)


def lower(op: str, x, bank, stride, padding, dilation):
    """Check the 1-D arguments of ``op`` and return them as conv2d's with a unit height:
    ``(x (B, I, 1, L), bank (K, O, I // g, 1, k), stride, padding, dilation)`` (pairs)."""
    _check_tensor(op, "x", x)
    _check_tensor(op, "bank", bank)
    _expect(x.dim() == 3, op, "x", "(B, I, L)", x)
    _expect(bank.dim() == 4, op, "bank", "(K, O, I // groups, k)", bank)
    s, p, d = (_single(op, "stride", stride, 1), _single(op, "padding", padding, 0),
               _single(op, "dilation", dilation, 1))
    return x.unsqueeze(2), bank.unsqueeze(3), (1, s), (0, p), (1, d)


class ModConv1dSpec(OpSpec):
    name = "mod_conv1d"
    lowers_to = "mod_conv2d"
    wrappers = ("modulated_conv1d", "mixture_conv1d")

    def canonical_case(self, case):
        return self.lower_case(case)

    def lower_case(self, case):
        """The conv2d case this case runs as (unit height)."""
        c = case.conv
        conv = {"stride": (1, c.get("stride", 1)), "padding": (0, c.get("padding", 0)),
                "dilation": (1, c.get("dilation", 1)), "groups": c.get("groups", 1)}
        return dataclasses.replace(case, op=self.lowers_to, H=1, kernel=(1, case.kernel[-1]), conv=conv)

    # test cases
    def cases(self) -> list:
        from ..testing import Case
        C = self.name
        return [
            Case(C, B=2, I=5, O=7, K=1, W=9, kernel=(3,), styles="sample", demodulate=True, conv={"padding": 1}),
            Case(C, B=2, I=5, O=7, K=1, W=9, kernel=(3,), styles="sample", bias="shared",
                 conv={"stride": 2, "padding": 1}),
            Case(C, B=3, I=4, O=6, K=3, W=8, kernel=(3,), coeffs="sample", bias="bank", conv={"padding": 2,
                                                                                              "dilation": 2}),
            Case(C, B=2, I=4, O=4, K=2, W=7, kernel=(5,), coeffs="sample", bias="shared",
                 conv={"groups": 4, "padding": 2}),
            Case(C, B=2, I=5, O=7, K=3, W=6, kernel=(3,), coeffs="sample", styles="sample", demodulate=True,
                 bias="bank", conv={"padding": 1}),
        ]

    def case_shape(self, case) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(case.conv.items()))
        return f"B{case.B}I{case.I}O{case.O}L{case.W}k{case.kernel[-1]}" + (f"[{extra}]" if extra else "")

    def make_x_bank(self, case, rnd) -> tuple:
        x, bank, rows = _CONV2D.make_x_bank(self.lower_case(case), rnd)
        return x.squeeze(2), bank.squeeze(3), rows

    def problem_kwargs(self, case, dtype) -> dict:
        return _CONV2D.problem_kwargs(self.lower_case(case), dtype)

    # benchmarks: those of the conv2d it runs as
    def dense_flops(self, case) -> int:
        return _CONV2D.dense_flops(self.lower_case(case))

    def dense(self, case, x, w):
        import torch.nn.functional as F
        return F.conv1d(x, w, None, **case.conv)

    def weight_io_elems(self, case) -> int:
        return _CONV2D.weight_io_elems(self.lower_case(case))

    def shape_str(self, case, cond: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in sorted(case.conv.items()))
        return f"B{case.B} {case.I}->{case.O} k{case.kernel[-1]} L{case.W}{extra} K{case.K} {cond}"

    def tiny(self, case):
        return dataclasses.replace(case, B=min(case.B, 2), I=min(case.I, 16), O=min(case.O, 16), W=min(case.W, 16))


SPEC = register(ModConv1dSpec())
