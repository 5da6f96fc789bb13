"""mod_conv1d (the op registered in modweights/ops/mod_conv1d.py, run as conv2d with a unit
height): the reference against torch.nn.functional.conv1d, every backend's output and every
gradient against the reference, the public wrappers, the layers and the 1-D argument checks."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from modweights import ops
from modweights import functional as MF
from modweights import testing as T
from modweights.nn import MixtureConv1d, ModulatedConv1d

from conftest import require_backend, torch_matches_reference_test

CASES = T.op_cases("mod_conv1d")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# the shared torch-vs-reference test (conftest.py), over the conv1d cases and the conv2d plans it runs
test_torch_matches_reference = torch_matches_reference_test(CASES, ("grouped", "stacked"))


def test_registered_and_lowered():
    spec = ops.get("mod_conv1d")
    assert spec.lowers_to == "mod_conv2d" and "mod_conv1d" not in ops.kernel_ops()
    assert [c.op for c in CASES] == ["mod_conv1d"] * len(CASES)


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 2), (3, 1, 1, 4)])
def test_reference_is_conv1d(stride, padding, dilation, groups):
    """A plain K = 1 bank with a (K, O) bias row is exactly F.conv1d, per geometry."""
    x = torch.randn(2, 4, 11, dtype=torch.float64)
    w = torch.randn(8, 4 // groups, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    for backend in ("reference", "torch"):
        torch.testing.assert_close(MF.mod_conv1d(x, w[None], bias=b, backend=backend, **kw), F.conv1d(x, w, b, **kw))


def test_mixture_is_conv1d_of_mixed_filter():
    x, bank, a = torch.randn(3, 5, 9, dtype=torch.float64), torch.randn(4, 6, 5, 3, dtype=torch.float64), torch.rand(
        3, 4, dtype=torch.float64)
    y = MF.mixture_conv1d(x, bank, a, padding=1, backend="reference")
    want = torch.stack([F.conv1d(x[b:b + 1], torch.einsum("k,koil->oil", a[b], bank), padding=1)[0] for b in range(3)])
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_gradcheck(case):
    assert T.gradcheck(case, "reference")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_public_ops_match_general_op(case):
    """Every public op that expresses the case (modulated_conv1d / mixture_conv1d) gives the
    general op's output and gradients, on the torch backend."""
    want = T.run_case(case, "reference", torch.float64)
    for api in T.public_ops(case):
        T.assert_match(T.run_case(case, "torch", torch.float64, api=api), want, torch.float64, f"{case.id} {api}")


def test_torch_gradgradcheck():
    assert T.gradcheck(CASES[-1], "torch", order=2)


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=[c.id for c in CASES[:3] + CASES[4:]])
def test_triton_matches_reference(case):
    """The triton backend (its conv2d kernels with a unit height), output and every gradient,
    float32 (under the interpreter on a CPU; CASES[3] is a grouped conv the kernels do not take)."""
    require_backend("triton", DEVICE)
    T.assert_matches_reference(case, "triton", torch.float32, device=DEVICE)


@pytest.mark.parametrize("bad,exc,match", [
    ({"x": torch.randn(2, 4, 1, 9)}, ValueError, r"mod_conv1d: `x` must have shape \(B, I, L\)"),
    ({"bank": torch.randn(1, 6, 4, 1, 3)}, ValueError, r"mod_conv1d: `bank` must have shape \(K, O, I // groups, k\)"),
    ({"stride": (1, 2)}, TypeError, "mod_conv1d: `stride` must be an int"),
    ({"padding": -1}, ValueError, "mod_conv1d: `padding` must be >= 0"),
    ({"bias": torch.randn(5)}, ValueError, "mod_conv1d: `bias`"),
    ({"x": torch.randn(2, 4, 1), "padding": 0}, ValueError, "mod_conv1d: the output would be empty"),
])
def test_bad_input_names_the_op_and_argument(bad, exc, match):
    args = {"x": torch.randn(2, 4, 9), "bank": torch.randn(1, 6, 4, 3), "bias": None, "stride": 1, "padding": 1}
    args.update(bad)
    with pytest.raises(exc, match=match):
        MF.mod_conv1d(args.pop("x"), args.pop("bank"), **args)


def test_empty_batch():
    x = torch.randn(0, 4, 9, requires_grad=True)
    bank = torch.randn(2, 6, 4, 3, requires_grad=True)
    y = MF.mixture_conv1d(x, bank, torch.rand(0, 2), padding=1, backend="torch")
    assert y.shape == (0, 6, 9)
    y.sum().backward()
    assert torch.equal(bank.grad, torch.zeros_like(bank))


def test_layers_match_functional_and_grads_flow():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 10)
    m = MixtureConv1d(4, 6, 3, 3, padding="same")
    c = torch.softmax(torch.randn(3, 3), -1)
    torch.testing.assert_close(m(x, coeffs=c), MF.mixture_conv1d(x, m.weight, c, bias=m.bias, padding=1))
    assert m(x).shape == (3, 6, 10) and m(x, torch.randn(3, 4)).shape == (3, 6, 10)
    with pytest.raises(ValueError, match="not both"):
        m(x, torch.randn(3, 4), coeffs=c)
    even = MixtureConv1d(4, 6, 4, 2, padding="same", bias=False)  # an even kernel pads its extra element right
    one_hot = torch.tensor([[1.0, 0.0]]).expand(3, 2)
    torch.testing.assert_close(even(x, coeffs=one_hot), F.conv1d(x, even.weight[0].detach(), padding="same"))
    mod = ModulatedConv1d(4, 6, 3, 5, stride=2, padding=1)
    w = torch.randn(3, 5)
    y = mod(x, w)
    torch.testing.assert_close(y, MF.modulated_conv1d(x, mod.weight, mod.affine(w), bias=mod.bias, stride=2,
                                                      padding=1))
    y.sum().backward()
    assert all(p.grad is not None for p in mod.parameters())


@pytest.mark.parametrize("kwargs,match", [({"kernel_size": 0}, "kernel_size"), ({"groups": 3}, "groups"),
                                          ({"padding": "full"}, "padding"), ({"padding": "same", "stride": 2}, "same")])
def test_layer_bad_args(kwargs, match):
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "num_experts": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MixtureConv1d(**args)


@pytest.mark.parametrize("padding,mode,k", [(1, "zeros", 3), ("same", "zeros", 4), (2, "reflect", 3),
                                            ("same", "circular", 4), ("valid", "replicate", 3)])
@pytest.mark.parametrize("to", ["mixture", "modulated"])
def test_convert_conv1d_equal_at_conversion(padding, mode, k, to):
    """convert replaces nn.Conv1d (any padding and padding mode, stride, unbatched input) by the
    1-D layers, equal to it at conversion, and the converted model trains (every new parameter
    gets a gradient)."""
    from modweights.convert import condition, convert

    model = torch.nn.Sequential(torch.nn.Conv1d(4, 6, k, padding=padding, padding_mode=mode), torch.nn.ReLU(),
                                torch.nn.Conv1d(6, 5, 3, stride=2))
    x = torch.randn(2, 4, 12)
    want = model(x)
    new = copy.deepcopy(model)
    report = convert(new, to, **({} if to == "mixture" else {"style_features": 3}))
    assert [r.old_type for r in report.replaced] == ["Conv1d", "Conv1d"]
    assert isinstance(new[0], MixtureConv1d if to == "mixture" else ModulatedConv1d)
    w = torch.randn(2, 3)
    with condition(new, w) if to == "modulated" else contextlib.nullcontext():
        y = new(x)
    torch.testing.assert_close(y, want)
    with condition(new, w[:1]) if to == "modulated" else contextlib.nullcontext():
        torch.testing.assert_close(new(x[0]), want[0])  # nn.Conv1d's unbatched (I, L)
    y.square().mean().backward()
    assert all(p.grad is not None for p in new[0].parameters() if p.requires_grad)


def test_layers_take_unbatched_input_and_name_themselves_in_errors():
    m = MixtureConv1d(4, 6, 3, 2, padding=1)
    x = torch.randn(4, 9)
    torch.testing.assert_close(m(x), m(x[None])[0])
    mod = ModulatedConv1d(4, 6, 3, 5)
    w = torch.randn(5)
    torch.testing.assert_close(mod(x, w), mod(x[None], w[None])[0])
    with pytest.raises(ValueError, match=r"MixtureConv1d: `x` must have shape \(B, 4, L\) or \(4, L\)"):
        m(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="ModulatedConv1d: `w` must have shape"):
        mod(torch.randn(2, 4, 9), torch.randn(2, 4))
    with pytest.raises(ValueError, match="MixtureConv1d: `coeffs` must have shape"):
        m(torch.randn(2, 4, 9), coeffs=torch.rand(2, 3))
