"""Empty batches and meta tensors, on every backend that runs on this machine.

Empty (``B = 0``, or ``T = 0`` for linear): an empty output of the right shape and, for every
input, a zero gradient of its shape (not None), as ``F.linear``/``F.conv2d`` give; no kernel is
launched (the shared glue, ``modweights._autograd.run``). Meta: outputs and gradients are meta
tensors of the right shapes, whatever backend is asked for, and layers built on the meta device
can be materialised.

Backends: ``reference`` and ``torch``; ``triton`` under ``TRITON_INTERPRET=1`` (set by conftest
without a GPU); ``cuda`` through its host emulation (``csrc/emu``, needs g++) on CPU tensors,
or on the GPU where there is one (the ``gpu``-marked tests carry the same cases there).
"""
from __future__ import annotations

import pytest
import torch

import modweights
from modweights import functional as MF
from modweights import nn as mnn
from conftest import skip_unavailable

BACKENDS = ["reference", "torch", "triton", "cuda"]
CONV_BACKENDS = ["reference", "torch", "triton"]  # the cuda backend has no conv2d (it says so)


@pytest.fixture
def device_for(request, switch):
    """``device_for(backend)``: the device whose tensors ``backend`` runs here (cuda: the host
    emulation on CPU tensors unless a GPU is present); skips a backend this machine cannot run."""
    def get(backend):
        if backend == "cuda" and not modweights.available_backends("cuda")["cuda"].available:
            switch(cuda_emulation_library=request.getfixturevalue("cuda_emulation_library"))
            return torch.device("cpu")
        dev = torch.device("cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu")
        st = modweights.available_backends(dev)[backend]
        if not st.available:
            skip_unavailable(f"{backend} is not available here: {st.reason}")
        return dev
    return get


def _leaves(shapes: dict, device) -> dict:
    return {n: (None if s is None else torch.randn(*s, device=device).requires_grad_()) for n, s in shapes.items()}


def _assert_zero_grads(ins: dict, context: str):
    for n, t in ins.items():
        if t is None:
            continue
        assert t.grad is not None, f"{context}: `{n}` got no gradient (expected zeros)"
        assert t.grad.shape == t.shape, f"{context}: grad of `{n}` has shape {tuple(t.grad.shape)}"
        assert torch.count_nonzero(t.grad) == 0, f"{context}: grad of `{n}` is not zero"


# (x, coeffs, styles) shapes with I = 5, K = 3; per-token conditioning with T = 0 is the case
# that crashed the triton backward (read with per-sample strides)
LINEAR_EMPTY = {
    "B0-sample": ((0, 4, 5), (0, 3), (0, 5)),
    "B0-token": ((0, 4, 5), (0, 4, 3), (0, 4, 5)),
    "B0-2d": ((0, 5), (0, 3), (0, 5)),
    "T0-sample": ((2, 0, 5), (2, 3), (2, 5)),
    "T0-token": ((2, 0, 5), (2, 0, 3), (2, 0, 5)),
    "T0-token-coeffs": ((2, 0, 5), (2, 0, 3), None),
    "T0-token-styles": ((2, 0, 5), (2, 3), (2, 0, 5)),
}


@pytest.mark.parametrize("demod", [True, False], ids=["demod", "nodemod"])
@pytest.mark.parametrize("shapes", LINEAR_EMPTY.values(), ids=LINEAR_EMPTY.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_linear(backend, shapes, demod, device_for):
    dev = device_for(backend)
    xs, cs, ss = shapes
    ins = _leaves({"x": xs, "bank": (3, 6, 5), "coeffs": cs, "styles": ss, "bias": (3, 6)}, dev)
    y = MF.mod_linear(ins["x"], ins["bank"], ins["coeffs"], ins["styles"], demodulate=demod, bias=ins["bias"],
                      backend=backend)
    assert y.shape == (*xs[:-1], 6) and y.dtype == ins["x"].dtype and y.device == ins["x"].device
    y.sum().backward()
    _assert_zero_grads(ins, f"{backend} {shapes}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_linear_wrappers_and_layer(backend, device_for):
    """Empty inputs through the layer and the wrappers: MixtureLinear with (0, T, I) (its backward
    once failed on torch), and a per-token mixture with T = 0 (the triton backward once crashed)."""
    dev = device_for(backend)
    layer = mnn.MixtureLinear(5, 6, 3, routing_features=4).to(dev)
    layer.backend = backend
    x = torch.randn(0, 7, 5, device=dev, requires_grad=True)
    y = layer(x, torch.randn(0, 4, device=dev))
    assert y.shape == (0, 7, 6)
    y.sum().backward()
    _assert_zero_grads({"x": x, **dict(layer.named_parameters())}, f"MixtureLinear {backend}")

    x, bank = torch.randn(3, 0, 5, device=dev, requires_grad=True), torch.randn(2, 6, 5, device=dev, requires_grad=True)
    coeffs = torch.rand(3, 0, 2, device=dev, requires_grad=True)
    y = MF.mixture_linear(x, bank, coeffs, backend=backend)
    assert y.shape == (3, 0, 6)
    y.sum().backward()
    _assert_zero_grads({"x": x, "bank": bank, "coeffs": coeffs}, f"mixture_linear T=0 {backend}")


CONV_EMPTY = {  # bank (K, O, I // groups, kh, kw); styles only with groups == 1
    "modmix-demod": (dict(), (3, 4, 3, 3, 3), True, True),
    "mixture": (dict(), (3, 4, 3, 3, 3), False, False),
    "strided": (dict(stride=2, padding=1, dilation=2), (3, 4, 3, 3, 3), True, True),
    "depthwise": (dict(groups=3, padding=1), (3, 3, 1, 3, 3), False, False),
}


@pytest.mark.parametrize("case", CONV_EMPTY.values(), ids=CONV_EMPTY.keys())
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_empty_conv2d(backend, case, device_for):
    geo, bank_shape, styles, demod = case
    dev = device_for(backend)
    ins = _leaves({"x": (0, 3, 9, 8), "bank": bank_shape, "coeffs": (0, 3), "styles": (0, 3) if styles else None,
                   "bias": (3, bank_shape[1])}, dev)
    y = MF.mod_conv2d(ins["x"], ins["bank"], ins["coeffs"], ins["styles"], demodulate=demod, bias=ins["bias"],
                      backend=backend, **geo)
    expected = torch.nn.functional.conv2d(torch.empty(0, 3, 9, 8), torch.empty(bank_shape[1:]),
                                          **{k: v for k, v in geo.items()}).shape
    assert y.shape == expected
    y.sum().backward()
    _assert_zero_grads(ins, f"{backend} conv {geo}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_empty_conv2d_layer(backend, device_for):
    """MixtureConv2d with B = 0 (the torch backend's grouped conv had 0 groups)."""
    dev = device_for(backend)
    layer = mnn.MixtureConv2d(3, 4, 3, 2, padding=1, bias=True).to(dev)
    layer.backend = backend
    x = torch.randn(0, 3, 6, 6, device=dev, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4, 6, 6)
    y.sum().backward()
    _assert_zero_grads({"x": x, **dict(layer.named_parameters())}, f"MixtureConv2d {backend}")


def test_empty_double_backward():
    """create_graph through an empty batch (StyleGAN2's path-length regulariser on an empty batch)."""
    x = torch.randn(0, 4, 5, requires_grad=True)
    w, s = torch.randn(6, 5, requires_grad=True), torch.rand(0, 5, requires_grad=True)
    y = MF.modulated_linear(x, w, s, backend="torch")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gx.sum() + y.sum()).backward()
    assert gx.shape == x.shape and torch.count_nonzero(w.grad) == 0 and w.grad.shape == w.shape


@pytest.mark.parametrize("op", ["linear-T0-token", "conv2d-B0"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_under_compile(backend, op, device_for):
    """torch.compile(fullgraph=True) traces an empty batch: the glue's empty path is traceable."""
    dev = device_for(backend)
    torch._dynamo.reset()
    if op.startswith("mod_linear"):
        ins = _leaves({"x": (2, 0, 5), "bank": (3, 6, 5), "coeffs": (2, 0, 3), "styles": (2, 0, 5)}, dev)
        f = torch.compile(lambda x, bank, coeffs, styles: MF.mod_linear(
            x, bank, coeffs, styles, demodulate=True, backend=backend), fullgraph=True)
        expected = (2, 0, 6)
    else:
        ins = _leaves({"x": (0, 3, 6, 6), "bank": (2, 4, 3, 3, 3), "coeffs": (0, 2), "styles": (0, 3)}, dev)
        f = torch.compile(lambda x, bank, coeffs, styles: MF.mod_conv2d(
            x, bank, coeffs, styles, demodulate=True, padding=1, backend=backend), fullgraph=True)
        expected = (0, 4, 6, 6)
    y = f(**ins)
    assert y.shape == expected
    y.sum().backward()
    _assert_zero_grads(ins, f"compiled {backend} {op}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_empty_custom_ops_called_directly(backend, device_for):
    """The glue's custom ops are public (torch.ops.modweights.*): their forward and backward
    take an empty batch too, T = 0 per token included, and agree with their fake."""
    dev = device_for(backend)
    from modweights import _autograd

    fwd = _autograd.custom_op("mod_linear", backend)
    bwd = getattr(torch.ops.modweights, f"mod_linear_backward_{backend}").default
    for xs, cs in (((2, 0, 5), (2, 0, 3)), ((0, 4, 5), (0, 3))):
        x, bank, c, s, b = (torch.randn(*sh, device=dev) for sh in (xs, (3, 6, 5), cs, (*xs[:-1], 5), (3, 6)))
        y, d = fwd(x, bank, c, s, b, True, 1e-8)
        assert y.shape == (*xs[:2], 6)
        grads = bwd(torch.ones_like(y), x, bank, c, s, b, d, y, [True] * 5, True, 1e-8)
        for gr, t in zip(grads, (x, bank, c, s, b)):
            assert gr.shape == t.shape and torch.count_nonzero(gr) == 0
        torch.library.opcheck(fwd, (x, bank, c, s, b, True, 1e-8), test_utils=("test_schema", "test_faketensor"))


def test_triton_launcher_reads_an_empty_token_axis_per_token(device_for):
    """(B, 0, C) conditioning is per token for the triton launchers (it was taken as per sample,
    so a kernel indexed the empty buffer with (B, C) strides), and the forward's ``d`` has the
    shape its fake implementation gives; (B, 1, C) stays per sample (the same memory as (B, C))."""
    dev = device_for("triton")
    from modweights.triton_kernels import mod_linear as ML
    from modweights.triton_kernels import mod_linear_layout as MLL

    x, bank, c = torch.randn(2, 0, 5, device=dev), torch.randn(3, 6, 5, device=dev), torch.rand(2, 0, 3, device=dev)
    assert MLL.layout(x, bank, c, None, True).coeffs == "token"
    y, d = ML.forward(x, bank, c, None, None, True, 1e-8)
    assert y.shape == (2, 0, 6) and tuple(d.shape) == MLL.d_shape(x.shape, bank.shape, 3, 0, True) == (2, 0, 6)
    assert MLL.layout(x[:, :1].new_ones(2, 1, 5), bank, c.new_ones(2, 1, 3), None, True).coeffs == "sample"


def test_zero_size_images_are_refused():
    """Only the batch may be empty: an empty image or no channels is a ValueError naming x
    (F.conv2d refuses the first, and gives a 0-channel output for the second)."""
    bank = torch.randn(2, 4, 3, 3, 3)
    for x in (torch.randn(1, 3, 0, 8), torch.randn(1, 3, 8, 0)):
        with pytest.raises(ValueError, match=r"`x` must have I, H, W >= 1"):
            MF.mod_conv2d(x, bank, torch.rand(1, 2), padding=2)
    with pytest.raises(ValueError, match=r"`x` must have I, H, W >= 1"):
        MF.mod_conv2d(torch.randn(1, 0, 8, 8), torch.randn(2, 4, 0, 3, 3), torch.rand(1, 2))
    with pytest.raises(ValueError, match=r"the output would be empty"):  # kernel larger than the image
        MF.mod_conv2d(torch.randn(1, 3, 2, 2), bank, torch.rand(1, 2))


# ----------------------------------------------------------------------------- meta

META_LINEAR = {  # (x, coeffs, styles)
    "sample": ((2, 5, 8), (2, 3), (2, 8)),
    "token": ((2, 5, 8), (2, 5, 3), (2, 5, 8)),
    "2d": ((4, 8), (4, 3), None),
}


@pytest.mark.parametrize("shapes", META_LINEAR.values(), ids=META_LINEAR.keys())
@pytest.mark.parametrize("backend", [None, "auto", *BACKENDS])
def test_meta_linear(backend, shapes):
    """Any backend name, available here or not: meta tensors run no kernel."""
    xs, cs, ss = shapes
    ins = _leaves({"x": xs, "bank": (3, 6, 8), "coeffs": cs, "styles": ss, "bias": (3, 6)}, "meta")
    y = MF.mod_linear(ins["x"], ins["bank"], ins["coeffs"], ins["styles"], demodulate=True, bias=ins["bias"],
                      backend=backend)
    assert y.device.type == "meta" and y.shape == (*xs[:-1], 6) and y.dtype == torch.float32
    y.sum().backward()
    for n, t in ins.items():
        if t is not None:
            assert t.grad is not None and t.grad.device.type == "meta" and t.grad.shape == t.shape, n


@pytest.mark.parametrize("backend", [None, *CONV_BACKENDS])
def test_meta_conv2d(backend):
    ins = _leaves({"x": (2, 4, 9, 9), "bank": (3, 6, 4, 3, 3), "coeffs": (2, 3), "styles": (2, 4), "bias": (6,)},
                  "meta")
    y = MF.mod_conv2d(ins["x"], ins["bank"], ins["coeffs"], ins["styles"], demodulate=True, bias=ins["bias"],
                      stride=2, padding=1, backend=backend)
    assert y.device.type == "meta" and y.shape == (2, 6, 5, 5)
    y.sum().backward()
    assert all(t.grad.device.type == "meta" and t.grad.shape == t.shape for t in ins.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on another device: the meta op still runs
        assert MF.mod_conv2d(ins["x"], ins["bank"], ins["coeffs"], padding=1, backend=backend).dtype == torch.float32


def test_meta_model_materialised():
    """A model built on the meta device, its shapes inferred there, then materialised on the CPU
    with a state_dict: the same outputs as the model built on the CPU."""
    def build():
        return torch.nn.Sequential(mnn.MixtureConv2d(3, 8, 3, 4, padding=1), torch.nn.Flatten(1),
                                   torch.nn.Unflatten(1, (8, 36)), mnn.MixtureLinear(36, 5, 3))

    ref = build()
    with torch.device("meta"):
        model = build()
    x = torch.randn(2, 3, 6, 6)
    assert model(x.to("meta")).shape == ref(x).shape == (2, 8, 5)
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    torch.testing.assert_close(model(x), ref(x))
