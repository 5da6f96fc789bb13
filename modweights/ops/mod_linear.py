"""The ``mod_linear`` op spec: ``x (B, T, I)`` or ``(B, I)``, ``bank (K, O, I)``, per-sample or
per-token conditioning; output ``(B, T, O)``."""
from __future__ import annotations

import math

from .._checks import ModLinearConfig
from . import register
from ._spec import OpSpec


class ModLinearSpec(OpSpec):
    name = "mod_linear"
    config = ModLinearConfig
    wrappers = ("modulated_linear", "mixture_linear")
    triton_launcher = "mod_linear_launch"

    auto_classes = ("decode", "per-token", "per-sample-many-rows", "per-sample-few-rows")

    def auto_class(self, problem: dict) -> str | None:
        from ..backends.auto_table import MANY_ROWS
        rows = problem.get("rows")  # rows per sample T (1 for a 2-D input); None when symbolic
        if not isinstance(rows, int) or isinstance(rows, bool):
            return None
        if rows <= 1:
            return "decode"
        if problem.get("per_token"):
            return "per-token"
        return "per-sample-many-rows" if rows >= MANY_ROWS else "per-sample-few-rows"

    def is_empty(self, x) -> bool:
        return x.shape[0] == 0 or x.shape[1] == 0  # B = 0 or T = 0

    def bias_view(self, b):
        return b.unsqueeze(1) if b.dim() == 2 else b  # a per-sample (B, O) over the T rows

    # test cases
    def cases(self) -> list:
        from ..testing import _mod_linear_cases
        return _mod_linear_cases()

    def canonical_case(self, case):
        import dataclasses
        return dataclasses.replace(case, T=max(case.T, 1))  # a 2-D input as (B, 1, I)

    def case_shape(self, case) -> str:
        return f"B{case.B}" + (f"T{case.T}" if case.T else "") + f"I{case.I}O{case.O}"

    def make_x_bank(self, case, rnd) -> tuple:
        B, I = case.B, case.I
        x = rnd(B, case.T, I) if case.T else rnd(B, I)
        bank = rnd(case.K, case.O, I, scale=1.0 / math.sqrt(I))
        return x, bank, ((B, case.T) if case.T else (B,))

    def problem_kwargs(self, case, dtype) -> dict:
        return {"dtype": dtype, "per_token": case.coeffs == "token" or case.styles == "token",
                "rows": max(case.T, 1)}

    # benchmarks
    def dense_flops(self, case) -> int:
        return 2 * case.B * max(case.T, 1) * case.O * case.I

    def dense(self, case, x, w):
        import torch.nn.functional as F
        return F.linear(x, w)

    def formed_weight_elems(self, case) -> int:
        return case.B * max(case.T, 1) * case.O * case.I  # matmul expands (B, 1, O, I) @ (B, T, I, 1)

    def weight_io_elems(self, case) -> int:
        return case.K * case.O * case.I + case.B * max(case.T, 1) * (case.I + case.O)

    def shape_str(self, case, cond: str) -> str:
        rows = f"B{case.B}xT{case.T}" if case.T else f"B{case.B}"
        return f"{rows} {case.I}->{case.O} K{case.K} {cond}"

    def tiny(self, case):
        import dataclasses
        return dataclasses.replace(case, B=min(case.B, 2), T=min(case.T, 8), I=min(case.I, 16), O=min(case.O, 16))


SPEC = register(ModLinearSpec())
