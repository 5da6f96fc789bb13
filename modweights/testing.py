"""Test cases, tolerances and the comparison helper, shared by the test suite,
``modweights verify`` and the benchmarks (one definition, imported everywhere).

A case is one configuration of an op (mode, sizes, flags). :func:`make_inputs` builds fresh
random inputs for it (never zeros); :func:`run_case` runs it on a backend and returns the
output and every gradient; :func:`compare` reports the worst relative error.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from . import ops

#: worst error relative to the largest reference magnitude, by dtype
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

GRAD_NAMES = ("x", "bank", "coeffs", "styles", "bias")


@dataclass(frozen=True)
class Case:
    """One op configuration. ``coeffs``/``styles``: 'none' | 'sample' | 'token'; ``bias``:
    'none' | 'shared' | 'bank'. ``T = 0`` means a 2-D linear input."""

    op: str  # a registered op (modweights.ops.SPECS)
    B: int
    I: int
    O: int
    K: int
    T: int = 0
    coeffs: str = "none"
    styles: str = "none"
    demodulate: bool = False
    bias: str = "none"
    # conv only (conv1d: ``W`` is the length, ``kernel`` a 1-tuple)
    H: int = 0
    W: int = 0
    kernel: tuple = (3, 3)
    conv: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def mode(self) -> str:
        parts = []
        if self.coeffs != "none":
            parts.append(f"mix{self.K}" + ("/tok" if self.coeffs == "token" else ""))
        if self.styles != "none":
            parts.append("mod" + ("/tok" if self.styles == "token" else ""))
        if self.demodulate:
            parts.append("demod")
        if self.bias != "none":
            parts.append(f"bias={self.bias}")
        return "+".join(parts) or "plain"

    @property
    def spec(self) -> ops.OpSpec:
        return ops.get(self.op)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.mode}-{self.spec.case_shape(self)}"


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Fresh random inputs for ``case`` (built in float64 on the CPU, then cast and moved)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(device=device, dtype=dtype)

    B, I, O, K = case.B, case.I, case.O, case.K
    x, bank, rows = case.spec.make_x_bank(case, rnd)
    coeffs = styles = bias = None
    if case.coeffs != "none":
        shape = (B, K) if case.coeffs == "sample" else (*rows, K)
        coeffs = rnd(*shape, scale=0.5, offset=0.5)
    if case.styles != "none":
        shape = (B, I) if case.styles == "sample" else (*rows, I)
        styles = rnd(*shape, scale=0.5, offset=1.0)
    if case.bias == "shared":
        bias = rnd(O)
    elif case.bias == "bank":
        bias = rnd(K, O)
    return {"x": x, "bank": bank, "coeffs": coeffs, "styles": styles, "bias": bias}


def public_ops(case: Case) -> list[str]:
    """The public ops that can express ``case``: the general op first, then the named
    wrapper (``modulated_*`` / ``mixture_*``) whose signature covers it, if any."""
    return case.spec.public_ops(case)


def call(case: Case, inputs: dict, backend: str, api: str | None = None):
    """Run ``case`` on ``backend`` through the general op, or through the public op named
    ``api`` (one of :func:`public_ops`; a single weight is passed as ``bank[0]``, so its
    gradient still lands on ``bank``)."""
    if api is not None and api not in public_ops(case):
        raise ValueError(f"case {case.id} cannot be run through {api!r}; choose one of {public_ops(case)}")
    return case.spec.call(case, inputs, backend, api or case.op)


def run_case(case: Case, backend: str, dtype=torch.float32, device="cpu", seed: int = 0,
             grads: bool = True, compute_dtype=None, api: str | None = None) -> dict:
    """Output and every input gradient of ``case`` on ``backend``.

    Inputs are drawn in ``dtype``; with ``compute_dtype`` (e.g. float64 for the reference)
    the same values are upcast before the call, so a low-precision backend is judged
    against an exact answer for identical inputs. The upstream gradient is random (not
    ones), so every term of the backward is exercised. Returns a dict with key ``"y"`` and,
    when ``grads``, ``"d<name>"`` for each present input. ``api`` runs a named public op
    instead of the general one (see :func:`call`).
    """
    inputs = make_inputs(case, dtype, device, seed)
    if compute_dtype is not None:
        inputs = {k: None if v is None else v.to(compute_dtype) for k, v in inputs.items()}
        dtype = compute_dtype
    leaves = {k: v.detach().requires_grad_(grads) for k, v in inputs.items() if v is not None}
    full = {k: leaves.get(k) for k in GRAD_NAMES}
    y = call(case, full, backend, api)
    out = {"y": y.detach()}
    if grads:
        gen = torch.Generator().manual_seed(seed + 1)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        gs = torch.autograd.grad(y, list(leaves.values()), gy)
        out.update({f"d{k}": gv for k, gv in zip(leaves, gs)})
    return out


def differentiable_call(case: Case, backend: str, dtype=torch.float64, seed: int = 0):
    """``(f, args)`` for ``torch.autograd.gradcheck``/``gradgradcheck``: ``f(*args)`` runs ``case``
    on ``backend`` with ``args`` the present inputs (x, bank, coeffs, styles, bias), all
    requiring grad."""
    t = {k: (None if v is None else v.requires_grad_()) for k, v in make_inputs(case, dtype, seed=seed).items()}
    names = [k for k in GRAD_NAMES if t[k] is not None]

    def f(*args):
        full = dict(t)
        full.update(zip(names, args))
        return call(case, full, backend)

    return f, [t[k] for k in names]


@dataclass
class Comparison:
    name: str
    worst: float  # max |a - e| / max |e|
    where: tuple
    tolerance: float
    nonfinite: str = ""

    @property
    def ok(self) -> bool:
        return not self.nonfinite and self.worst <= self.tolerance

    def __str__(self) -> str:
        if self.nonfinite:
            return f"{self.name}: {self.nonfinite}"
        return (f"{self.name}: worst relative error {self.worst:.3g} at index {self.where} "
                f"(tolerance {self.tolerance:.3g})")


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> Comparison:
    """Worst error relative to the largest magnitude of ``expected``; NaN/inf disagreements named."""
    if actual is None or expected is None:
        if actual is None and expected is None:
            return Comparison(name, 0.0, (), tolerance)
        return Comparison(name, math.inf, (), tolerance, nonfinite="one side has no gradient (None)")
    if actual.shape != expected.shape:
        return Comparison(name, math.inf, (), tolerance,
                          nonfinite=f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    if not torch.equal(fa, fe):
        idx = tuple(int(i) for i in torch.nonzero(fa != fe)[0])
        return Comparison(name, math.inf, idx, tolerance,
                          nonfinite=f"non-finite values disagree at {idx}: {a[idx].item()} vs {e[idx].item()}")
    diff = (a - e).abs().where(fe, torch.zeros((), dtype=torch.float64))
    scale = e.abs().where(fe, torch.zeros((), dtype=torch.float64)).max().item() if e.numel() else 0.0
    if diff.numel() == 0:
        return Comparison(name, 0.0, (), tolerance)
    flat = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    worst = diff.max().item() / max(scale, 1e-30)
    return Comparison(name, worst, where, tolerance)


def compare_results(actual: dict, expected: dict, dtype) -> list[Comparison]:
    tol = TOLERANCE[dtype]
    return [compare(k, actual.get(k), expected[k], tol) for k in expected]


def assert_match(actual: dict, expected: dict, dtype, context: str = "") -> None:
    """Raise AssertionError listing every output/gradient outside tolerance."""
    bad = [str(c) for c in compare_results(actual, expected, dtype) if not c.ok]
    if bad:
        raise AssertionError(f"{context}\n  " + "\n  ".join(bad))


def assert_matches_reference(case: Case, backend: str, dtype=torch.float32, device="cpu", context: str = "") -> None:
    """Every output and gradient of ``case`` on ``backend`` against the reference run on the
    same inputs upcast to float64 (:func:`run_case`), within ``TOLERANCE[dtype]``."""
    expected = run_case(case, "reference", dtype, device=device, compute_dtype=torch.float64)
    actual = run_case(case, backend, dtype, device=device)
    assert_match(actual, expected, dtype, f"{case.id} {context}".rstrip())


def gradcheck(case: Case, backend: str = "reference", order: int = 1) -> bool:
    """float64 ``torch.autograd.gradcheck`` (``order=1``) or ``gradgradcheck`` (``order=2``) of
    ``case`` on ``backend``, at the tolerances every test uses (it raises on a mismatch)."""
    check = {1: torch.autograd.gradcheck, 2: torch.autograd.gradgradcheck}[order]
    f, args = differentiable_call(case, backend)
    return check(f, args, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def with_plans(cases: list[Case], plans: tuple[str, ...]) -> list[tuple[Case, str | None]]:
    """``(case, plan)`` pairs for the torch backend's switch ``torch_plan``: every case with the counted
    plan (``None``), and each mixture without demodulation (where both formulations exist) with
    each of ``plans`` forced."""
    return [(c, None) for c in cases] + [(c, p) for c in cases if c.K > 1 and not c.demodulate for p in plans]


# ----------------------------------------------------------------------------- case lists

#: ``small=False``: channel and token counts times this (odd, so tails stay odd; an integer, so
#: group counts still divide the channels), spatial sizes times ``MEDIUM_SPATIAL``
MEDIUM_CHANNELS = 5
MEDIUM_SPATIAL = 3


def scale_case(case: Case, factor: int = MEDIUM_CHANNELS, spatial: int = MEDIUM_SPATIAL) -> Case:
    """``case`` with channels and tokens times ``factor`` and ``H``, ``W`` times ``spatial``
    (the batch, K and the conv geometry stay as they are)."""
    return dataclasses.replace(
        case, I=case.I * factor, O=case.O * factor, T=case.T * factor,
        H=case.H * spatial, W=case.W * spatial,
    )


def op_cases(op: str, small: bool = True) -> list[Case]:
    """Every mode of ``op`` at small odd sizes (its spec's :meth:`~modweights.ops.OpSpec.cases`);
    ``small=False``: the same cases with channels, tokens and spatial sizes scaled by :func:`scale_case`."""
    cases = ops.get(op).cases()
    return cases if small else [scale_case(c) for c in cases]
