"""Layers: shapes, backends agree, state_dict round-trip, training reduces a loss."""

import pytest
import torch

import modweights
from modweights import nn as MN

from conftest import LAYER_VARIANTS
from conftest import LAYERS as LAYER_TABLE

# every layer class and more configurations of some (one table: tests/conftest.py)
LAYERS = {**LAYER_TABLE, **LAYER_VARIANTS}


@pytest.mark.parametrize("name", list(LAYERS))
def test_shapes_and_backends_agree(name):
    make, inputs, shape = LAYERS[name].make, LAYERS[name].inputs, LAYERS[name].out
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
def test_training_reduces_loss(name):
    make, inputs = LAYERS[name].make, LAYERS[name].inputs
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
