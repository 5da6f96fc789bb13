"""mod_conv2d: the torch backend matches the reference (whose gradcheck is in test_reference.py)."""
import pytest
import torch

from modweights import functional as MF
from modweights import testing as T

from conftest import torch_matches_reference_test

# the same test as tests/test_mod_linear.py's (one definition, in conftest.py), over the conv cases and plans
test_torch_matches_reference = torch_matches_reference_test(T.op_cases("mod_conv2d"), ("grouped", "stacked"))


def test_scalar_coefficient_with_demod_float64():
    case = T.Case("mod_conv2d", B=2, I=3, O=4, K=1, H=5, W=5, coeffs="sample", styles="sample", demodulate=True,
                  bias="bank", conv={"padding": 1})
    T.assert_match(T.run_case(case, "torch", torch.float64), T.run_case(case, "reference", torch.float64),
                   torch.float64, case.id)


GG = [
    T.Case("mod_conv2d", B=2, I=2, O=3, K=1, H=4, W=4, styles="sample", demodulate=True, conv={"padding": 1}),
    T.Case("mod_conv2d", B=2, I=2, O=2, K=2, H=4, W=4, coeffs="sample", styles="sample", demodulate=True,
           bias="bank", conv={"padding": 1}),
    T.Case("mod_conv2d", B=2, I=2, O=2, K=2, H=4, W=4, coeffs="sample", conv={"stride": 2, "padding": 1}),
]


@pytest.mark.parametrize("case", GG, ids=[c.id for c in GG])
def test_torch_gradgradcheck(case):
    assert T.gradcheck(case, "torch", order=2)


def test_channels_last_and_non_contiguous():
    case = T.Case("mod_conv2d", B=2, I=4, O=6, K=3, H=6, W=5, coeffs="sample", bias="bank", conv={"padding": 1})
    t = T.make_inputs(case, torch.float64)
    y_ref = T.call(case, t, "reference")
    t2 = dict(t, x=t["x"].to(memory_format=torch.channels_last), coeffs=t["coeffs"].t().contiguous().t())
    torch.testing.assert_close(T.call(case, t2, "torch"), y_ref)


def test_wrappers_match_general_op():
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    s = torch.rand(2, 3) + 0.5
    bank = torch.randn(2, 4, 3, 3, 3)
    a = torch.rand(2, 2)
    torch.testing.assert_close(MF.modulated_conv2d(x, w, s, padding=1),
                               MF.mod_conv2d(x, w[None], None, s, demodulate=True, padding=1))
    torch.testing.assert_close(MF.mixture_conv2d(x, bank, a, stride=2), MF.mod_conv2d(x, bank, a, stride=2))
