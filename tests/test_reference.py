"""The oracle is right: float64 ``gradcheck`` of the reference backend on every shared case of
every registered op (every other backend is judged against it)."""
import pytest

from modweights import ops
from modweights import testing as T

CASES = [c for op in ops.SPECS for c in T.op_cases(op)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_gradcheck(case):
    assert T.gradcheck(case, "reference")
