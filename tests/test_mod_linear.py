"""mod_linear: the torch backend matches the reference (whose gradcheck is in test_reference.py)."""
import pytest
import torch

from modweights import functional as MF
from modweights import testing as T
from modweights.backends import torch_backend

from conftest import torch_matches_reference_test

test_torch_matches_reference = torch_matches_reference_test(T.op_cases("mod_linear"), ("form", "stacked"))


@pytest.mark.parametrize("coeffs", ["sample", "token"])
def test_scalar_coefficient_with_demod_float64(coeffs):
    """K = 1 with a coefficient and demodulation: the coefficient cancels (its gradient is
    ~0 up to eps), so only float64 resolves it; checked here, not in the shared cases."""
    case = T.Case("mod_linear", B=2, T=5, I=7, O=3, K=1, coeffs=coeffs, styles="sample", demodulate=True, bias="bank")
    expected = T.run_case(case, "reference", torch.float64)
    actual = T.run_case(case, "torch", torch.float64)
    T.assert_match(actual, expected, torch.float64, case.id)


GG = [
    T.Case("mod_linear", B=2, T=3, I=4, O=3, K=1, styles="sample", demodulate=True, bias="shared"),
    T.Case("mod_linear", B=2, T=3, I=4, O=3, K=2, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case("mod_linear", B=2, T=3, I=4, O=3, K=2, coeffs="token", bias="bank"),
    T.Case("mod_linear", B=2, T=3, I=4, O=3, K=1, styles="token", demodulate=True),
]


@pytest.mark.parametrize("case", GG, ids=[c.id for c in GG])
def test_torch_gradgradcheck(case):
    """Double backward through the torch backend (StyleGAN2's path-length regulariser)."""
    assert T.gradcheck(case, "torch", order=2)


def test_non_contiguous_inputs():
    case = T.Case("mod_linear", B=3, T=5, I=6, O=4, K=3, coeffs="sample", styles="token", demodulate=True, bias="bank")
    t = T.make_inputs(case, torch.float64)
    # same values through transposed / strided views
    nc = {
        "x": t["x"].transpose(1, 2).contiguous().transpose(1, 2),
        "bank": t["bank"].transpose(1, 2).contiguous().transpose(1, 2),
        "coeffs": t["coeffs"].t().contiguous().t(),
        "styles": torch.stack([t["styles"], t["styles"]], -1)[..., 0],
        "bias": t["bias"].t().contiguous().t(),
    }
    assert not nc["x"].is_contiguous() and not nc["styles"].is_contiguous()
    leaves_a = {k: v.clone().requires_grad_() for k, v in t.items()}
    leaves_b = {k: v.requires_grad_() for k, v in nc.items()}
    ya = T.call(case, leaves_a, "reference")
    yb = T.call(case, leaves_b, "torch")
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, list(leaves_a.values()), g)
    gb = torch.autograd.grad(yb, list(leaves_b.values()), g.expand_as(yb))
    torch.testing.assert_close(yb, ya)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a)


def test_expanded_upstream_gradient():
    """y.sum().backward() hands the backward a stride-0 gradient."""
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "torch"):
        MF.modulated_linear(x, w, s, backend=backend).sum().backward()
    # each backend accumulated once: compare by recomputing separately
    grads = []
    for backend in ("reference", "torch"):
        x.grad = w.grad = s.grad = None
        MF.modulated_linear(x, w, s, backend=backend).sum().backward()
        grads.append((x.grad.clone(), w.grad.clone(), s.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


def test_wrappers_match_general_op():
    x = torch.randn(2, 3, 5)
    w = torch.randn(4, 5)
    s = torch.rand(2, 5) + 0.5
    bank = torch.randn(3, 4, 5)
    a = torch.rand(2, 3)
    torch.testing.assert_close(MF.modulated_linear(x, w, s), MF.mod_linear(x, w[None], None, s, demodulate=True))
    torch.testing.assert_close(MF.mixture_linear(x, bank, a), MF.mod_linear(x, bank, a))
    # 2-D input gives (B, O)
    assert MF.mixture_linear(x[:, 0], bank, a).shape == (2, 4)


def test_plan_counts():
    """The torch backend's formulation follows the count, not a fixed rule."""
    assert torch_backend.mod_linear_plan(16, 256, 512, 512, 4, False, False) == "form"  # many rows per sample
    assert torch_backend.mod_linear_plan(64, 1, 4096, 4096, 4, False, False) == "stacked"  # decode: one row each
    assert torch_backend.mod_linear_plan(2, 8192, 4096, 4096, 4, True, False) == "stacked"  # per token
    assert torch_backend.mod_linear_plan(16, 256, 512, 512, 1, False, True) == "stacked"  # K = 1: scale-GEMM-scale


# ---------------------------------------------------------------- demodulation with K > 1
# The torch backend's stacked path demodulates a mixture through the bank's pairwise
# products (never a per-row weight); each formulation forced, against the float64 reference.

DEMOD_MIX = [
    T.Case("mod_linear", B=B, T=Tn, I=9, O=5, K=K, coeffs=coeffs, styles=styles, demodulate=True, bias=bias)
    for K in (2, 3, 5)
    for coeffs, Tn in (("sample", 6), ("token", 6), ("sample", 0))
    for styles in ("none", "sample", "token")
    for bias, B in (("none", 3), ("shared", 2), ("bank", 1))
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("plan", ["stacked", "form"])
@pytest.mark.parametrize("case", DEMOD_MIX, ids=[c.id + f"K{c.K}" for c in DEMOD_MIX])
def test_torch_demod_mixture_matches_reference(case, plan, dtype, switch):
    switch(torch_plan=plan)
    counted = torch_backend.mod_linear_plan(case.B, max(case.T, 1), case.I, case.O, case.K, case.coeffs == "token", True)
    assert counted == plan
    T.assert_matches_reference(case, "torch", dtype)


GG_PAIRS = [
    T.Case("mod_linear", B=2, T=3, I=4, O=3, K=3, coeffs="token", styles="sample", demodulate=True, bias="bank"),
    T.Case("mod_linear", B=2, T=3, I=4, O=3, K=2, coeffs="sample", styles="token", demodulate=True, bias="shared"),
    T.Case("mod_linear", B=2, T=3, I=4, O=3, K=2, coeffs="token", demodulate=True),
]


@pytest.mark.parametrize("case", GG_PAIRS, ids=[c.id for c in GG_PAIRS])
def test_torch_gradgradcheck_demod_pairs(case, switch):
    """Double backward through the pair-product demodulation (stacked path forced)."""
    switch(torch_plan="stacked")
    assert T.gradcheck(case, "torch", order=2)


def test_demod_mixture_plan_counts():
    """Demodulation with K > 1: per-token coefficients never form a per-row weight; per
    sample the count decides."""
    for K in (2, 4, 8, 16):
        for styles in (True, False):
            assert torch_backend.mod_linear_plan(2, 4096, 1024, 1024, K, True, True, has_styles=styles) == "stacked"
            assert torch_backend.mod_linear_plan(1, 2, 64, 64, K, True, True, has_styles=styles) == "stacked"
    assert torch_backend.mod_linear_plan(16, 256, 512, 512, 4, False, True) == "form"  # many rows per sample
    assert torch_backend.mod_linear_plan(64, 1, 4096, 4096, 4, False, True) == "stacked"  # decode: one row each
    assert torch_backend.mod_linear_plan(64, 1, 4096, 4096, 4, False, True, has_styles=False) == "stacked"


def _max_alloc_numel(fn):
    """Largest single tensor allocation (in elements of the result dtype) made by ``fn`` on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    Watch.biggest = max(Watch.biggest, o.numel())
            return out

    with Watch():
        fn()
    return Watch.biggest


@pytest.mark.parametrize("styles", ["none", "sample", "token"])
def test_demod_per_token_mixture_forms_no_per_row_weight(styles, switch):
    """Per-token coefficients with demodulation: no tensor of B*T*O*I elements in forward or
    backward (the counted plan, not forced); the exact demodulation terms form the mixed rows
    in chunks of at most DEMOD_CHUNK_ELEMS elements (here 4 rows)."""
    case = T.Case("mod_linear", B=2, T=24, I=32, O=16, K=3, coeffs="token", styles=styles, demodulate=True, bias="bank")
    B, Tn, I, O, K = case.B, case.T, case.I, case.O, case.K
    switch(torch_demod_chunk_elems=4 * O * I)
    assert torch_backend.mod_linear_plan(B, Tn, I, O, K, True, True, has_styles=styles != "none",
                          per_token_styles=styles == "token") == "stacked"
    biggest = _max_alloc_numel(lambda: T.run_case(case, "torch", torch.float32))
    assert biggest < B * Tn * O * I, biggest
    # the watch does see the formed weight when the form path is forced
    switch(torch_plan="form")
    assert _max_alloc_numel(lambda: T.run_case(case, "torch", torch.float32)) >= B * Tn * O * I


@pytest.mark.parametrize("coeffs,styles", [("sample", "sample"), ("none", "sample"), ("sample", "none")])
def test_reference_per_sample_forms_no_per_row_weight(coeffs, styles):
    """The oracle with per-sample conditioning forms one (O, I) weight per sample, never one per
    row (it once broadcast (B, 1, O, I) over T): forward and backward, demodulated."""
    case = T.Case("mod_linear", B=2, T=64, I=16, O=24, K=3 if coeffs != "none" else 1, coeffs=coeffs, styles=styles,
                  demodulate=True, bias="shared")
    B, Tn, I, O, K = case.B, case.T, case.I, case.O, case.K
    biggest = _max_alloc_numel(lambda: T.run_case(case, "reference", torch.float64))
    assert biggest <= max(B * Tn * max(I, O), B * K * O * I), biggest
    # the watch does see a per-row weight where the conditioning is per token
    tok = T.Case("mod_linear", B=B, T=Tn, I=I, O=O, K=K, coeffs=coeffs, styles="token", demodulate=True)
    assert _max_alloc_numel(lambda: T.run_case(tok, "reference", torch.float64)) >= B * Tn * O * I
