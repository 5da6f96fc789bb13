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
    triton_launcher = "mod_linear"

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
        from ..testing import Case
        L = "mod_linear"
        return [
            # StyleGAN2 modulated linear (K = 1), demod on/off, 2-D and 3-D input
            Case(L, B=3, T=5, I=17, O=7, K=1, styles="sample", demodulate=True),
            Case(L, B=3, T=5, I=17, O=7, K=1, styles="sample", demodulate=False, bias="shared"),
            Case(L, B=4, T=0, I=33, O=5, K=1, styles="sample", demodulate=True, bias="shared"),
            # plain (K = 1, no conditioning) and scalar coefficient (K = 1 with coeffs)
            Case(L, B=2, T=3, I=5, O=7, K=1, bias="shared"),
            # (with demodulation a K = 1 coefficient cancels: its gradient is ~0 up to eps, so those
            # cases are checked in float64 only, in tests/test_torch_mod_linear.py)
            Case(L, B=2, T=3, I=5, O=7, K=1, coeffs="sample", styles="sample", demodulate=False, bias="bank"),
            # mixture per sample (CondConv / SMEAR), bias forms
            Case(L, B=3, T=5, I=17, O=7, K=3, coeffs="sample"),
            Case(L, B=3, T=5, I=17, O=7, K=3, coeffs="sample", bias="bank"),
            Case(L, B=5, T=0, I=7, O=17, K=4, coeffs="sample", bias="shared"),
            Case(L, B=1, T=1, I=5, O=3, K=2, coeffs="sample", bias="bank"),
            # both, with demod (GigaGAN)
            Case(L, B=3, T=5, I=17, O=7, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
            Case(L, B=3, T=5, I=17, O=7, K=3, coeffs="sample", styles="sample", demodulate=False),
            # per token
            Case(L, B=2, T=7, I=9, O=5, K=3, coeffs="token", bias="bank"),
            Case(L, B=2, T=7, I=9, O=5, K=1, styles="token", demodulate=True, bias="shared"),
            Case(L, B=2, T=7, I=9, O=5, K=3, coeffs="token", styles="token", demodulate=True),
            Case(L, B=2, T=7, I=9, O=5, K=3, coeffs="token", styles="sample", demodulate=False, bias="bank"),
            Case(L, B=2, T=7, I=9, O=5, K=3, coeffs="sample", styles="token", demodulate=True),
            Case(L, B=2, T=7, I=9, O=5, K=1, coeffs="token", styles="sample", demodulate=False, bias="bank"),
        ]

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

    def aot_test_cases(self) -> list:
        from ..testing import Case
        L = self.name
        return [
            Case(L, B=4, T=300, I=1000, O=520, K=1, styles="sample", demodulate=True, bias="shared"),
            Case(L, B=16, T=49, I=512, O=384, K=8, coeffs="sample", bias="bank"),
            Case(L, B=4, T=200, I=384, O=640, K=4, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
            Case(L, B=2, T=257, I=320, O=200, K=4, coeffs="token", bias="bank"),
            Case(L, B=2, T=130, I=256, O=192, K=3, coeffs="token", styles="token", demodulate=True),
            Case(L, B=64, T=1, I=1024, O=2048, K=4, coeffs="sample"),
        ]

    def sanitizer_cases(self, dry: bool) -> list:
        """The GPU check's sanitizer cases (``modweights.benchmarking.gpu_check``): tails in every
        dimension and every conditioning mode the op's kernels have, sized for the GPU tiles
        (64-256); tiny ones for ``dry`` runs (the interpreter)."""
        from ..testing import Case
        L = self.name
        if dry:
            return [Case(L, B=2, T=5, I=9, O=7, K=2, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
                    Case(L, B=2, T=3, I=9, O=7, K=2, coeffs="token", styles="token", demodulate=True)]
        return [
            Case(L, B=2, T=37, I=72, O=40, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
            Case(L, B=2, T=5, I=17, O=9, K=1, styles="sample", demodulate=True, bias="shared"),
            Case(L, B=2, T=9, I=40, O=36, K=40, coeffs="sample", styles="sample", demodulate=True),
            Case(L, B=5, T=0, I=70, O=33, K=4, coeffs="sample", bias="shared"),
            Case(L, B=2, T=70, I=72, O=136, K=3, coeffs="token", styles="token", demodulate=True, bias="bank"),
            Case(L, B=3, T=45, I=67, O=65, K=2, coeffs="token", styles="sample", demodulate=True, bias="shared"),
        ]

    def sweep_cases(self, dry: bool) -> list:
        from ..testing import Case
        L = self.name
        if dry:
            return [("mix", Case(L, B=2, T=5, I=9, O=7, K=2, coeffs="sample", styles="sample",
                                 demodulate=True, bias="bank"), True),
                    ("token", Case(L, B=2, T=3, I=9, O=7, K=2, coeffs="token", bias="shared"), None)]
        return [
            ("mix-rows", Case(L, B=2, T=300, I=264, O=272, K=3, coeffs="sample", styles="sample",
                              demodulate=True, bias="bank"), True),
            ("stacked", Case(L, B=7, T=45, I=200, O=136, K=4, coeffs="sample", styles="sample",
                             demodulate=True, bias="shared"), False),
            ("token", Case(L, B=2, T=150, I=264, O=136, K=3, coeffs="token", styles="token",
                           demodulate=True, bias="bank"), None),
            ("token-2", Case(L, B=3, T=97, I=140, O=272, K=2, coeffs="token", bias="shared"), None),
        ]

    # the Triton kernels' counts (modweights.aot.counts), per launch at its default tiles
    def gemm_dims(self, case) -> tuple[int, int, int]:
        return case.B * max(case.T, 1), case.O, case.I

    def kernel_work(self, case, launch) -> tuple[float, float, str]:
        name, f, meta = launch.name, launch.flags, launch.default[0]
        K = case.K
        kmix = K if f.get("HAS_COEFFS") else 1
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

    def kernel_operand_bytes(self, case, launch, eb: int = 2) -> float:
        name, f, meta = launch.name, launch.flags, launch.default[0]
        K = case.K if f.get("HAS_COEFFS") else 1
        cd = lambda a, b: math.ceil(a / b)  # noqa: E731
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


SPEC = register(ModLinearSpec())
