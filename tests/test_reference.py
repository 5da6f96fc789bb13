"""The oracle is right: float64 ``gradcheck`` of the reference backend on every shared case of
both ops (every other backend is judged against it)."""
import pytest

from modweights import testing as T

CASES = T.mod_linear_cases() + T.mod_conv2d_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_gradcheck(case):
    assert T.gradcheck(case, "reference")
