"""State and numerics around the layers: state_dict / torch.save / torch.load(weights_only=True)
round-trips, deepcopy, autocast (bf16 on CPU; fp16 and bf16 on GPU), deterministic mode."""
import io
import os

import pytest
import torch
from torch import nn

import modweights
from modweights import functional as MF
from modweights import testing as T

from conftest import LAYERS as LAYER_TABLE

# cuBLAS is deterministic only with a fixed workspace; it must be set before cuBLAS first runs,
# and collection imports this module before any test runs
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CPU_BACKENDS = [n for n, s in modweights.available_backends("cpu").items() if s.available]
# Triton's interpreter computes bf16 dot products wrongly (docs/environment.md), so the CPU autocast
# tests run the PyTorch backends; the GPU tests below run every backend
CPU_AUTOCAST_BACKENDS = [n for n in CPU_BACKENDS if n in ("reference", "torch")]


class Conditioned(nn.Module):
    """A converted model called with its latent: ``forward(x, w)`` = ``condition(model, w)``."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(4, 5, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
                                   nn.Flatten(2), nn.Linear(36, 7))
        modweights.convert(self.model, "modulated", style_features=6)
        for m in (self.model[0], self.model[3]):
            nn.init.normal_(m.affine.weight, std=0.3)

    def forward(self, x, w):
        with modweights.condition(self.model, w):
            return self.model(x)


def _converted_mixture():
    m = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.Flatten(2), nn.Linear(36, 7))
    modweights.convert(m, "mixture", num_experts=3)
    return m


# every layer class (tests/conftest.py), and converted models of them
LAYERS = {**{n: (c.make, c.inputs) for n, c in LAYER_TABLE.items()},
          "converted-modulated": (Conditioned, lambda: (torch.randn(2, 4, 6, 6), torch.randn(2, 6))),
          "converted-mixture": (_converted_mixture, lambda: (torch.randn(2, 4, 6, 6),))}


def _make(name, seed=0):
    torch.manual_seed(seed)
    make, inputs = LAYERS[name]
    return make(), inputs()


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_dict_round_trip_through_torch_save(name):
    a, args = _make(name, seed=0)
    b, _ = _make(name, seed=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(b(*args), a(*args), rtol=0, atol=0)


def test_pretrained_linear_state_dict_loads_into_a_converted_modulated_layer():
    """A modulated conversion keeps the layer's keys: a checkpoint of the original model loads
    (strict=False), and only the new style affine is missing."""
    src = nn.Sequential(nn.Linear(4, 3))
    dst = nn.Sequential(nn.Linear(4, 3))
    modweights.convert(dst, "modulated", style_features=2)
    result = dst.load_state_dict(src.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["0.affine.bias", "0.affine.weight"] and not result.unexpected_keys
    assert torch.equal(dst[0].weight, src[0].weight)


# ----------------------------------------------------------------------------- autocast


def _check_autocast(model, args, device, dtype):
    """Under autocast the output is in the autocast dtype and close to the float32 output;
    a backward outside autocast gives float32 parameters float32 gradients."""
    y32 = model(*args)
    with torch.autocast(device, dtype=dtype):
        y = model(*args)
    assert y.dtype == dtype
    T.assert_match({"y": y}, {"y": y32.detach()}, dtype, f"autocast {dtype}")
    model.zero_grad()
    y.float().square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("backend", CPU_AUTOCAST_BACKENDS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_autocast_bf16_cpu(name, backend):
    model, args = _make(name)
    modweights.set_backend(model, backend)
    _check_autocast(model, args, "cpu", torch.bfloat16)


def test_autocast_casts_the_functional_ops():
    x, bank, a = torch.randn(2, 3, 5), torch.randn(3, 4, 5), torch.rand(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MF.mixture_linear(x, bank, a).dtype == torch.bfloat16
        # float64 is left alone, as autocast leaves it for F.linear
        assert MF.mixture_linear(x.double(), bank.double(), a.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        with pytest.raises(TypeError, match="`bank` has dtype torch.bfloat16 but `x` has torch.float32"):
            MF.mixture_linear(x, bank.bfloat16(), a)  # without autocast, mixed dtypes stay an error


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_autocast_gpu(name, dtype):
    for backend, st in modweights.available_backends("cuda").items():
        if not st.available:
            continue
        model, args = _make(name)
        model, args = model.cuda(), tuple(a.cuda() for a in args)
        modweights.set_backend(model, backend)
        try:
            _check_autocast(model, args, "cuda", dtype)
        except RuntimeError as e:
            if "cannot run this" not in str(e):  # a backend that does not implement an op says so
                raise


# ----------------------------------------------------------------------------- determinism


@pytest.fixture
def deterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


def _grads(name, backend, device):
    model, args = _make(name)
    model = model.to(device)
    args = tuple(a.to(device).requires_grad_() for a in args)
    modweights.set_backend(model, backend)
    y = model(*args)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device))
    return [y.detach()] + [p.grad for p in model.parameters()] + [a.grad for a in args]


def _assert_bitwise_equal_runs(name, backend, device):
    try:
        first = _grads(name, backend, device)
    except RuntimeError as e:
        if "cannot run this" in str(e):
            pytest.skip(str(e))
        raise
    second = _grads(name, backend, device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


DET_LAYERS = list(LAYER_TABLE)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", DET_LAYERS)
def test_deterministic_cpu(name, backend, deterministic):
    _assert_bitwise_equal_runs(name, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", DET_LAYERS)
def test_deterministic_gpu(name, deterministic):
    for backend, st in modweights.available_backends("cuda").items():
        if st.available:
            try:
                _assert_bitwise_equal_runs(name, backend, "cuda")
            except pytest.skip.Exception:
                continue
