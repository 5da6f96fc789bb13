"""The layers and ops as torch.nn users expect them: torch.func transforms, factory arguments,
string padding, arguments checked when a layer is built, and the backend variable as a shell
writes it."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modweights
from modweights import backends
from modweights import functional as MF
from modweights import nn as MN

LAYERS = {
    "ModulatedLinear": lambda **kw: MN.ModulatedLinear(6, 5, 4, **kw),
    "MixtureLinear": lambda **kw: MN.MixtureLinear(6, 5, 3, **kw),
    "ModulatedConv2d": lambda **kw: MN.ModulatedConv2d(4, 5, 3, 6, **kw),
    "MixtureConv2d": lambda **kw: MN.MixtureConv2d(4, 6, 3, 2, **kw),
}
DEMOD_LAYERS = ["ModulatedLinear", "ModulatedConv2d"]


# ----------------------------------------------------------------------------- torch.func


def _linear_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=g, dtype=dtype)
    W, s, b = (torch.randn(6, 5, generator=g, dtype=dtype), torch.randn(3, 5, generator=g, dtype=dtype),
               torch.randn(6, generator=g, dtype=dtype))
    return x, W, s, b


@pytest.mark.parametrize("demodulate", [True, False], ids=["demod", "plain"])
def test_torch_func_grad_on_the_torch_backend(demodulate):
    """torch.func.grad needs the Function's setup_context (forward without ctx)."""
    x, W, s, b = _linear_inputs()

    def loss(W, s, backend):
        return MF.modulated_linear(x, W, s, bias=b, demodulate=demodulate, backend=backend).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1))(W, s, "torch")
    want = torch.func.grad(loss, argnums=(0, 1))(W, s, "reference")
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_torch_func_grad_of_a_conv_on_the_torch_backend():
    g = torch.Generator().manual_seed(4)
    x, bank, a = (torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64),
                  torch.randn(2, 4, 3, 3, 3, generator=g, dtype=torch.float64),
                  torch.rand(2, 2, generator=g, dtype=torch.float64))

    def loss(bank, a, backend):
        return MF.mixture_conv2d(x, bank, a, padding=1, backend=backend).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1))(bank, a, "torch")
    want = torch.func.grad(loss, argnums=(0, 1))(bank, a, "reference")
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v)


def test_torch_func_vmap_on_the_torch_backend():
    """vmap over an extra leading dimension: the rule is generated from the PyTorch ops."""
    x, W, _, b = _linear_inputs()
    styles = torch.randn(4, 3, 5, dtype=torch.float64)  # 4 sets of styles for the same input
    got = torch.func.vmap(lambda s: MF.modulated_linear(x, W, s, bias=b, backend="torch"))(styles)
    want = torch.stack([MF.modulated_linear(x, W, s, bias=b, backend="reference") for s in styles])
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not backends.status("triton", "cpu").available, reason="needs triton (TRITON_INTERPRET=1)")
def test_torch_func_on_a_kernel_backend():
    """grad runs the kernels (forward and backward on plain tensors); vmap cannot, and says so."""
    x, W, s, b = (t.float() for t in _linear_inputs())

    def loss(W, s, backend):
        return MF.modulated_linear(x, W, s, bias=b, backend=backend).square().sum()

    for a, e in zip(torch.func.grad(loss, argnums=(0, 1))(W, s, "triton"),
                    torch.func.grad(loss, argnums=(0, 1))(W, s, "reference")):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="vmap over a mod_linear on the 'triton' backend is not supported"):
        torch.func.vmap(lambda s: MF.modulated_linear(x, W, s, backend="triton"))(torch.randn(2, 3, 5))


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("eps", [np.float64(1e-6), np.float32(1e-6), 0, 1e-6], ids=["np64", "np32", "int", "float"])
def test_eps_accepts_any_real_number(eps):
    x, W, s, b = _linear_inputs()
    y = MF.modulated_linear(x, W, s, eps=eps, backend="torch")
    torch.testing.assert_close(y, MF.modulated_linear(x, W, s, eps=float(eps), backend="reference"))
    MN.ModulatedLinear(5, 6, 3, eps=eps)


# a number out of range is a ValueError, a value that is not a real number a TypeError (_checks' policy)
@pytest.mark.parametrize("eps,exc", [(math.inf, ValueError), (-math.inf, ValueError), (math.nan, ValueError),
                                     (-1e-3, ValueError), ("1e-8", TypeError), (True, TypeError)])
def test_eps_must_be_finite_and_non_negative(eps, exc):
    x, W, s, _ = _linear_inputs()
    with pytest.raises(exc, match="`eps` must be a finite non-negative number"):
        MF.modulated_linear(x, W, s, eps=eps)
    for name in DEMOD_LAYERS:
        with pytest.raises(exc, match=rf"{name}: `eps` must be a finite non-negative number"):
            LAYERS[name](eps=eps)


@pytest.mark.parametrize("demodulate", ["no", 1, None, np.bool_(True)], ids=["str", "int", "None", "np-bool"])
def test_demodulate_must_be_a_bool(demodulate):
    x, W, s, _ = _linear_inputs()
    with pytest.raises(TypeError, match="`demodulate` must be a bool"):
        MF.modulated_linear(x, W, s, demodulate=demodulate)
    with pytest.raises(TypeError, match="`demodulate` must be a bool"):
        MF.mod_conv2d(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 3, 3), styles=torch.rand(1, 2),
                      demodulate=demodulate)
    for name in DEMOD_LAYERS:
        with pytest.raises(TypeError, match=rf"{name}: `demodulate` must be a bool"):
            LAYERS[name](demodulate=demodulate)


@pytest.mark.parametrize("name", list(LAYERS))
def test_unknown_backend_is_refused_at_construction(name):
    with pytest.raises(ValueError, match=rf"{name}: `backend`: unknown modweights backend 'bogus'"):
        LAYERS[name](backend="bogus")
    assert LAYERS[name](backend="torch").backend == "torch"


def test_backend_variable_is_stripped(monkeypatch):
    monkeypatch.setenv("MODWEIGHTS_BACKEND", " torch \n")
    assert backends.requested() == "torch"
    monkeypatch.setenv("MODWEIGHTS_BACKEND", "  ")
    assert backends.requested() == "auto"  # blank is unset
    monkeypatch.setenv("MODWEIGHTS_BACKEND", " bogus ")
    with pytest.raises(ValueError, match="MODWEIGHTS_BACKEND: unknown modweights backend 'bogus'"):
        backends.requested()


# ----------------------------------------------------------------------------- factory arguments


@pytest.mark.parametrize("name", list(LAYERS))
def test_device_and_dtype_factory_arguments(name):
    layer = LAYERS[name](dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    meta = LAYERS[name](device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.float16)}
    # the same state keys and shapes as a default-built layer, and it runs in its dtype
    default = LAYERS[name]()
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
    conv = "Conv" in name
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64) if conv else torch.randn(2, 3, 6, dtype=torch.float64)
    args = (x, torch.randn(2, 6 if conv else 4, dtype=torch.float64)) if "Modulated" in name else (x,)
    y = layer(*args)
    assert y.dtype == torch.float64
    # built on meta, it infers the output shape from meta inputs (build there, materialise later)
    y_meta = meta(*[a.to("meta", torch.float16) for a in args])
    assert y_meta.is_meta and y_meta.shape == y.shape


# ----------------------------------------------------------------------------- string padding

PAD_CASES = [  # kernel, dilation, padding
    ((3, 3), 1, "same"),
    ((4, 4), 1, "same"),  # an odd total: the extra pixel right/bottom
    ((2, 3), (2, 1), "same"),
    ((3, 3), 1, "valid"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels
@pytest.mark.parametrize("kernel,dilation,padding", PAD_CASES, ids=[f"{k}-{d}-{p}" for k, d, p in PAD_CASES])
@pytest.mark.parametrize("kind", ["mixture", "modulated"])
def test_string_padding_like_nn_conv2d(kind, kernel, dilation, padding):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    if kind == "mixture":
        layer = MN.MixtureConv2d(3, 4, kernel, 1, padding=padding, dilation=dilation, bias=True).double()
        y = layer(x, coeffs=torch.ones(2, 1, dtype=torch.float64))  # K = 1, coefficient 1: the plain conv
        weight, bias = layer.weight[0], layer.bias[0]
    else:
        layer = MN.ModulatedConv2d(3, 4, kernel, 5, padding=padding, dilation=dilation, demodulate=False).double()
        torch.nn.init.zeros_(layer.affine.weight)  # styles = 1
        y = layer(x, torch.randn(2, 5, dtype=torch.float64))
        weight, bias = layer.weight, layer.bias
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, padding=padding, dilation=dilation))
    as_conv = torch.nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation).padding  # numbers as a pair
    assert layer.padding == as_conv and f"padding={as_conv}" in repr(layer)


@pytest.mark.parametrize("name", ["ModulatedConv2d", "MixtureConv2d"])
def test_string_padding_errors(name):
    with pytest.raises(ValueError, match=rf"{name}: padding='same' needs stride 1"):
        LAYERS[name](padding="same", stride=2)
    with pytest.raises(ValueError, match=rf"{name}: `padding` must be an int, a pair of ints, 'valid' or 'same'"):
        LAYERS[name](padding="full")


def test_same_padding_layer_compiles():
    """fullgraph over a layer whose even kernel pre-pads the input."""
    torch.manual_seed(0)
    layer = MN.MixtureConv2d(3, 4, 4, 2, padding="same")
    x = torch.randn(2, 3, 6, 6)
    torch._dynamo.reset()
    try:
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))
    finally:
        torch._dynamo.reset()
    assert modweights.nn.MixtureConv2d is MN.MixtureConv2d


def test_mixture_linear_checks_cond_and_coeffs_against_its_sizes():
    """``cond`` must match routing_features and ``coeffs`` num_experts, with x's batch (and,
    per token, its length): a ValueError naming the layer and the argument, not a matmul error."""
    layer = MN.MixtureLinear(4, 5, 3, routing_features=6)
    x = torch.randn(2, 7, 4)
    for name, bad in [("cond", {"cond": torch.randn(2, 5)}), ("cond", {"cond": torch.randn(3, 6)}),
                      ("coeffs", {"coeffs": torch.rand(2, 4)}), ("coeffs", {"coeffs": torch.rand(2, 6, 3)})]:
        with pytest.raises(ValueError, match=rf"MixtureLinear: `{name}` must have shape"):
            layer(x, **bad)
    assert layer(x, torch.randn(2, 7, 6)).shape == (2, 7, 5)
    # unbatched, as nn.Linear: (I,) with 1-D conditioning is sample 0 of the batched call
    c = torch.rand(1, 3)
    torch.testing.assert_close(layer(x[0, 0], coeffs=c[0]), layer(x[:1, 0], coeffs=c)[0])
