"""Layers: shapes, backends agree, state_dict round-trip, training reduces a loss."""
import io

import pytest
import torch

import modweights
from modweights import nn as MN

LAYERS = {
    "ModulatedLinear": (lambda: MN.ModulatedLinear(6, 5, 4), lambda: (torch.randn(3, 7, 6), torch.randn(3, 4)), (3, 7, 5)),
    "ModulatedLinear-2d": (lambda: MN.ModulatedLinear(6, 5, 4, demodulate=False), lambda: (torch.randn(3, 6), torch.randn(3, 4)), (3, 5)),
    "MixtureLinear": (lambda: MN.MixtureLinear(6, 5, 3), lambda: (torch.randn(3, 7, 6),), (3, 7, 5)),
    "MixtureLinear-token": (lambda: MN.MixtureLinear(6, 5, 3, routing_mode="token", routing="sigmoid"), lambda: (torch.randn(3, 7, 6),), (3, 7, 5)),
    "MixtureLinear-cond": (lambda: MN.MixtureLinear(6, 5, 3, routing_features=2), lambda: (torch.randn(3, 7, 6), torch.randn(3, 2)), (3, 7, 5)),
    "ModulatedConv2d": (lambda: MN.ModulatedConv2d(4, 5, 3, 6, padding=1), lambda: (torch.randn(2, 4, 6, 6), torch.randn(2, 6)), (2, 5, 6, 6)),
    "MixtureConv2d": (lambda: MN.MixtureConv2d(4, 6, 3, 3, padding=1, stride=2, bias=True), lambda: (torch.randn(2, 4, 7, 7),), (2, 6, 4, 4)),
    "MixtureConv2d-depthwise": (lambda: MN.MixtureConv2d(4, 4, 3, 2, padding=1, groups=4, routing="softmax"), lambda: (torch.randn(2, 4, 5, 5),), (2, 4, 5, 5)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_shapes_and_backends_agree(name):
    make, inputs, shape = LAYERS[name]
    layer = make().double()
    args = [a.double() for a in inputs()]
    outs = {}
    for backend in ("reference", "torch"):
        layer.backend = backend
        layer.zero_grad()
        y = layer(*args)
        assert y.shape == shape
        y.square().sum().backward()
        outs[backend] = (y.detach(), [p.grad.clone() for p in layer.parameters()])
    torch.testing.assert_close(outs["torch"][0], outs["reference"][0])
    for a, b in zip(outs["torch"][1], outs["reference"][1]):
        torch.testing.assert_close(a, b)
    assert "backend='torch'" in repr(layer)


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_round_trip(name):
    make, inputs, _ = LAYERS[name]
    a, b = make(), make()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    args = inputs()
    torch.testing.assert_close(a(*args), b(*args))


@pytest.mark.parametrize("name", list(LAYERS))
def test_training_reduces_loss(name):
    make, inputs, _ = LAYERS[name]
    torch.manual_seed(1)
    layer = make()
    args = inputs()
    target = torch.randn_like(layer(*args))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(*args) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_use_backend_reaches_layers():
    layer = MN.MixtureLinear(4, 3, 2)
    x = torch.randn(2, 5, 4)
    with modweights.use_backend("reference"):
        y1 = layer(x)
    torch.testing.assert_close(layer(x), y1)


def test_modulated_layer_starts_as_dense():
    """Styles start at 1 (affine bias 1, weight 0 for this check): no demod == the plain linear."""
    layer = MN.ModulatedLinear(6, 5, 4, demodulate=False)
    torch.nn.init.zeros_(layer.affine.weight)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x, torch.randn(3, 4)), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_router_arguments():
    with pytest.raises(ValueError, match="routing"):
        MN.MixtureLinear(4, 3, 2, routing="relu")
    with pytest.raises(ValueError, match="temperature"):
        MN.MixtureConv2d(4, 3, 3, 2, temperature=0.0)
    with pytest.raises(ValueError, match="groups"):
        MN.MixtureConv2d(4, 3, 3, 2, groups=2)
