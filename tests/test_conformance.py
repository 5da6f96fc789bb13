"""Every modweights layer held to the protocol of its ``torch.nn`` twin (``nn.Linear`` /
``nn.Conv1d`` / ``nn.Conv2d``), in the spirit of PyTorch's ModuleInfo tests: the one table of
layers (tests/conftest.py), and one test per protocol point, run over
the table and, where the layer's output depends on it, over the backends that run here
(``reference``, ``torch``, and ``triton`` under its interpreter, tiny shapes).

The protocol (what docs/layers.md promises): in-place ops on the output then backward;
channels_last and contiguous inputs give the output format ``nn.Conv2d`` gives;
``model.to(memory_format=...)`` and ``.to(dtype)``; unbatched inputs; ``torch.fx`` symbolic
tracing (the layers are leaves); gradient checkpointing (both ``use_reentrant`` modes) under
``condition`` with the un-checkpointed gradients, also with a second latent set at backward;
meta init + ``to_empty`` + ``reset_parameters`` (the distribution of construction);
deepcopy and pickle; empty batches; forward-mode AD; ``torch.compile`` (slow-marked);
input errors that name the layer and the argument; numpy integers for the geometry.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import pickle
import weakref
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import modweights
from modweights import nn as MN
from modweights.convert import condition, convert, set_backend

from conftest import CONVERTED, LAYER_VARIANTS, LAYERS, LayerCase

BACKENDS = ["reference", "torch", "triton"]
CL = torch.channels_last


@dataclass(frozen=True)
class Spec:
    """A layer of the one table (tests/conftest.py: ``LAYERS``, some ``LAYER_VARIANTS``,
    ``CONVERTED``) under its name: ``case`` builds it and draws its inputs."""

    name: str
    case: LayerCase

    def __getattr__(self, attr):  # make, x, args, twin, latent, plain, conv: the case's
        return getattr(self.case, attr)


#: every layer class, the variants whose protocol differs (no bias, a router input, stride),
#: and the layers ``convert`` makes
SPECS = ([Spec(n, c) for n, c in LAYERS.items()]
         + [Spec(n, LAYER_VARIANTS[n]) for n in ("MixtureLinear-nobias", "MixtureConv2d-nobias", "MixtureConv2d-cond")]
         + [Spec(n, c) for n, c in CONVERTED.items()])
IDS = [s.name for s in SPECS]
BY_NAME = {s.name: s for s in SPECS}
CONV2D = [s for s in SPECS if s.twin == "conv2d"]
LATENT = [s for s in SPECS if s.latent]
MODULATED = (MN.ModulatedLinear, MN.ModulatedConv1d, MN.ModulatedConv2d)


def _backend(layer: nn.Module, backend: str) -> nn.Module:
    if backend == "triton" and not modweights.available_backends("cpu")["triton"].available:
        pytest.skip("triton does not run here (needs TRITON_INTERPRET=1 without a GPU)")
    set_backend(layer, backend)
    return layer


def _grid(specs):
    """``(spec, backend)`` parameters: every spec on reference and torch, the layers built by
    their constructor on triton too (interpreted: slow; a converted layer runs the same ops)."""
    return [pytest.param(s, b, id=f"{s.name}-{b}")
            for s in specs for b in BACKENDS if b != "triton" or s.name in LAYERS]


def _call(spec: Spec, layer, x, args, w=None):
    """``layer(x, *args)``, inside ``condition(layer, w)`` for a layer that reads a latent."""
    with condition(layer, w) if spec.latent else contextlib.nullcontext():
        return layer(x, *args)


def _case(spec: Spec, B: int = 2):
    """``(x, args, w)`` for one call (``w`` None without a latent)."""
    return spec.x(B), spec.args(B), (torch.randn(B, spec.latent) if spec.latent else None)


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("spec,backend", _grid(SPECS))
def test_inplace_op_on_output_then_backward(spec, backend):
    """``nn.ReLU(inplace=True)`` / ``mul_`` after the layer, then backward (as after nn.Conv2d)."""
    layer = _backend(spec.make(), backend)
    x, args, w = _case(spec)
    x.requires_grad_()
    y = _call(spec, layer, x, args, w)
    y.mul_(2).relu_()  # what nn.ReLU(inplace=True) after a doubling does; fine after nn.Conv2d
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("spec,backend", _grid(CONV2D))
def test_memory_format_like_conv2d(spec, backend):
    """Contiguous and channels_last inputs, before and after ``model.to(memory_format=
    channels_last)``: the output's format is ``nn.Conv2d``'s, its values unchanged."""
    layer = _backend(spec.make(), backend)
    x, args, w = _case(spec)
    twin = nn.Conv2d(x.shape[1], 4, 3, padding=1)
    ref = _call(spec, layer, x, args, w)
    for convert_layer in (False, True):
        if convert_layer:
            layer.to(memory_format=CL)
            twin.to(memory_format=CL)
            assert layer.weight.shape == spec.make().weight.shape  # the bank keeps its shape
        for xin in (x, x.contiguous(memory_format=CL)):
            y = _call(spec, layer, xin, args, w)
            want_cl = twin(xin).is_contiguous(memory_format=CL)
            assert y.is_contiguous(memory_format=CL) == want_cl, (convert_layer, xin.stride())
            torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_to_dtype_and_state_dict_across_memory_format(spec):
    """``.to(float64)`` converts every parameter and the output; a channels_last model's state
    dict has the same keys and shapes and loads into a contiguous one."""
    layer = spec.make()
    x, args, w = _case(spec)
    ref = _call(spec, layer, x, args, w)
    d = copy.deepcopy(layer).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in d.parameters())
    y = _call(spec, d, x.double(), [a.double() for a in args], None if w is None else w.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.float(), ref, rtol=1e-4, atol=1e-5)
    if spec.twin == "conv2d":
        cl = copy.deepcopy(layer).to(memory_format=CL)
        fresh = spec.make()
        fresh.load_state_dict(cl.state_dict())
        torch.testing.assert_close(_call(spec, fresh, x, args, w), ref)


@pytest.mark.parametrize("spec,backend", _grid(SPECS))
def test_unbatched_input(spec, backend):
    """``(I, H, W)`` / ``(I, L)`` / ``(I,)`` as ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.Linear`` take it, with 1-D conditioning:
    the batched output's sample 0 without the batch dimension."""
    layer = _backend(spec.make(), backend)
    x, args, w = _case(spec, B=1)
    xu = x[0] if spec.conv else x[0, 0]
    y = _call(spec, layer, xu, [a[0] for a in args], w)
    ref = _call(spec, layer, x if spec.conv else x[:, 0], args, w)[0]
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("spec,backend", _grid(SPECS))
def test_empty_batch(spec, backend):
    """B = 0: an empty output of the twin's shape and zero gradients."""
    layer = _backend(spec.make(), backend)
    x, args, w = _case(spec, B=0)
    x.requires_grad_()
    y = _call(spec, layer, x, args, w)
    assert y.shape[0] == 0 and y.shape[1:] == _call(spec, layer, *_case(spec, B=1)).shape[1:]
    y.sum().backward()
    assert x.grad is not None and not x.grad.any()
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


# ----------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("spec,backend", _grid([BY_NAME["ModulatedLinear"], BY_NAME["MixtureConv2d"], BY_NAME["MixtureConv1d"]]))
def test_forward_ad_jvp(spec, backend):
    """``torch.func.jvp`` through the layer (as through nn.Linear / nn.Conv2d) equals the
    reference backend's, which runs plain PyTorch ops."""
    layer = _backend(spec.make(), backend)
    x, args, w = _case(spec)
    v = torch.randn_like(x)
    _, got = torch.func.jvp(lambda t: _call(spec, layer, t, args, w), (x,), (v,))
    set_backend(layer, "reference")
    _, want = torch.func.jvp(lambda t: _call(spec, layer, t, args, w), (x,), (v,))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _TwoRegions(nn.Module):
    """``layer`` applied in two checkpointed regions (to x and to x / 2) and summed."""

    def __init__(self, spec: Spec, layer, args, reentrant):
        super().__init__()
        self.spec, self.layer, self.args, self.reentrant = spec, layer, args, reentrant

    def forward(self, x):
        def region(t):
            return self.layer(t, *self.args).tanh()

        if self.reentrant is None:
            return region(x) + region(x / 2)
        return (checkpoint(region, x, use_reentrant=self.reentrant)
                + checkpoint(region, x / 2, use_reentrant=self.reentrant))


def _grads(spec, reentrant, second_latent, mapped):
    """Gradients of (x, w, parameters) of a loss through two checkpointed regions, the
    forward under ``condition(model, w)``, the backward after the block or (``second_latent``)
    inside ``condition(model, w2)``; ``mapped``: w is computed from a leaf (a mapping network)."""
    torch.manual_seed(0)
    layer = spec.make()
    x = spec.x(2).requires_grad_()
    args = spec.args(2)
    leaf = torch.randn(2, spec.latent or 1, requires_grad=True)
    w = leaf * 1.5 if mapped else leaf
    model = _TwoRegions(spec, layer, args, reentrant)
    with condition(model, w) if spec.latent else contextlib.nullcontext():
        loss = model(x).pow(2).sum()
    with condition(model, torch.randn(2, spec.latent)) if second_latent and spec.latent else contextlib.nullcontext():
        loss.backward()
    return [x.grad, leaf.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.filterwarnings("ignore:.*requires_grad=True:UserWarning")  # a reentrant region without grad inputs
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("spec,second_latent",
                         [pytest.param(s, False, id=s.name) for s in SPECS]
                         + [pytest.param(s, True, id=f"{s.name}-second-latent") for s in LATENT])
def test_checkpoint_under_condition(spec, reentrant, second_latent):
    """Gradient checkpointing, both modes: the gradients equal the un-checkpointed ones, when
    the backward runs after the ``condition`` block (the recomputation used to raise "reads
    a latent and none is set") and inside another ``condition`` block (it used to recompute
    with that other latent: silently wrong gradients)."""
    want = _grads(spec, None, False, mapped=False)
    got = _grads(spec, reentrant, second_latent, mapped=False)
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("spec", LATENT, ids=[s.name for s in LATENT])
def test_checkpoint_latent_from_mapping_network(spec):
    """Non-reentrant checkpointing with a latent computed from a leaf (a mapping network),
    backward inside a second ``condition`` block: the leaf's gradient is the un-checkpointed one."""
    want = _grads(spec, None, False, mapped=True)
    got = _grads(spec, False, True, mapped=True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_records_live_with_the_graph(reentrant):
    """What a checkpointed forward records lives as long as its graph: once the output is
    gone the latent is freed; without checkpointing nothing is recorded at all."""
    spec = LATENT[-1]
    layer = spec.make()
    w = torch.randn(2, spec.latent, requires_grad=True)
    ref = weakref.ref(w)
    x = spec.x(2).requires_grad_()
    with condition(layer, w):
        y = checkpoint(layer, x, use_reentrant=reentrant)
        for _ in range(3):
            layer(x)  # not checkpointed: nothing kept
    del w
    gc.collect()
    assert ref() is not None  # the graph of y still needs it for its recomputation
    y.sum().backward()
    del y
    gc.collect()
    assert ref() is None


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_hf_gradient_checkpointing_under_condition():
    """HF ``gradient_checkpointing_enable()`` (non-reentrant by default, and reentrant) on a
    tiny BERT whose feed-forward linears are modulated by a latent: the gradients of the
    un-checkpointed model, with the backward after the ``condition`` block."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)
    convert(base, to="modulated", style_features=3, include=["*intermediate.dense"])
    for name, p in base.named_parameters():
        if "affine.weight" in name:
            nn.init.normal_(p)
    ids = torch.randint(0, 20, (2, 5))
    results = []
    for kwargs in (None, {"use_reentrant": False}, {"use_reentrant": True}):
        model = copy.deepcopy(base).train()
        if kwargs is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        w = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with condition(model, w):
            loss = model(ids).last_hidden_state.pow(2).sum()
        loss.backward()
        results.append([w.grad] + [p.grad for p in model.parameters()])
    for got in results[1:]:
        for g, r in zip(got, results[0]):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- module protocol


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_fx_symbolic_trace(spec):
    """``torch.fx.symbolic_trace`` of a model holding the layer: the layer is a leaf
    (``call_module``), and the traced module computes what the model does."""
    layer = spec.make()
    x, args, w = _case(spec)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, cond=None):  # cond: the layer's second argument, where it takes one
            return (self.layer(x) if cond is None else self.layer(x, cond)).relu()

    model = Model()
    gm = torch.fx.symbolic_trace(model, concrete_args=None if args else {"cond": None})
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["layer"]
    with condition(gm, w) if spec.latent else contextlib.nullcontext():
        got = gm(x, *args)
    torch.testing.assert_close(got, _call(spec, model, x, args, w))


def test_fx_feature_extractor_on_converted_resnet18():
    """torchvision's ``create_feature_extractor`` on a converted resnet18 (it used to fail:
    "got Proxy")."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=4).eval()
    convert(net, to="mixture", num_experts=2, include=["layer1.*", "conv1"])
    fe = create_feature_extractor(net, {"layer1": "feat", "fc": "out"})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = fe(x)
        torch.testing.assert_close(got["out"], net(x))
    assert got["feat"].shape == (1, 64, 8, 8)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_meta_init_to_empty_reset_parameters(spec):
    """FSDP's meta init: built on the meta device, ``to_empty``, ``reset_parameters``: the
    layer works, and (for a layer built by its constructor) ``reset_parameters`` under a seed
    gives exactly what construction under that seed gives."""
    with torch.device("meta"):
        layer = spec.make() if spec.plain else copy.deepcopy(spec.make()).to("meta")
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    torch.manual_seed(7)
    layer.reset_parameters()
    x, args, w = _case(spec)
    assert torch.isfinite(_call(spec, layer, x, args, w)).all()
    if spec.plain:
        torch.manual_seed(7)
        fresh = spec.make()
        for (n, p), q in zip(layer.named_parameters(), fresh.parameters()):
            torch.testing.assert_close(p, q, msg=n)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_deepcopy_and_pickle(spec):
    """A deep copy and a pickled copy compute exactly what the layer does and share no storage
    with it. (The state_dict round trip through torch.save: tests/test_state.py.)"""
    layer = spec.make()
    x, args, w = _case(spec)
    ref = _call(spec, layer, x, args, w)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(_call(spec, clone, x, args, w), ref, rtol=0, atol=0)
        with torch.no_grad():
            for p in clone.parameters():
                p.add_(1.0)
        assert all(not torch.equal(p, q) for p, q in zip(layer.parameters(), clone.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("spec", [BY_NAME["MixtureConv2d"], BY_NAME["Converted-mixture-conv-latent"]], ids=lambda s: s.name)
def test_torch_compile(spec):
    """``torch.compile(fullgraph=True)`` (aot_eager) matches eager, under ``condition`` too."""
    layer = spec.make()
    x, args, w = _case(spec)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(_call(spec, compiled, x, args, w), _call(spec, layer, x, args, w))
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- construction and errors


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_input_errors_name_layer_and_argument(spec):
    """A wrong-sized input: a ValueError naming the layer and the argument, before any op."""
    layer = spec.make()
    x, args, w = _case(spec)
    bad_x = {"linear": torch.randn(2, 2, 7), "conv1d": torch.randn(2, 2, 9), "conv2d": torch.randn(2, 2, 5, 5)}[spec.twin]
    label = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{label}.*`x` must have shape"):
        _call(spec, layer, bad_x, args, w)
    if args:
        name = "w" if isinstance(layer, MODULATED) else "cond"
        with pytest.raises(ValueError, match=rf"{label}.*`{name}` must have shape"):
            _call(spec, layer, x, [torch.randn(2, args[0].shape[1] + 1)], w)
    if spec.latent and isinstance(layer, MODULATED):
        with pytest.raises(ValueError, match=rf"{label} '0': `w` must have shape"):
            layer(x, torch.randn(2, spec.latent + 1))


def test_mixture_conv2d_conditioning_convention():
    """``forward(x, cond=None, *, coeffs=None)``: cond feeds the router, coeffs bypass it,
    both is an error, ``routing_weights=`` a deprecated alias of ``coeffs=``; defaults softmax
    routing and a bias (as nn.Conv2d)."""
    layer = MN.MixtureConv2d(3, 4, 3, 2, routing_features=6)
    assert layer.router.routing == "softmax" and layer.bias is not None
    x, cond, coeffs = torch.randn(2, 3, 5, 5), torch.randn(2, 6), torch.rand(2, 2)
    torch.testing.assert_close(layer(x, cond), layer(x, coeffs=layer.router(cond)))
    with pytest.raises(ValueError, match="not both"):
        layer(x, cond, coeffs=coeffs)
    with pytest.warns(DeprecationWarning, match="routing_weights"):
        y = layer(x, routing_weights=coeffs)
    torch.testing.assert_close(y, layer(x, coeffs=coeffs))
    with pytest.raises(ValueError, match=r"MixtureConv2d: `coeffs` must have shape \(B, 2\)"):
        layer(x, coeffs=torch.rand(2, 3))


def test_unbatched_mixture_conv2d_from_issue():
    assert MN.MixtureConv2d(3, 4, 3, 2)(torch.randn(3, 6, 6)).shape == (4, 4, 4)


@pytest.mark.parametrize("cls", ["ModulatedConv2d", "MixtureConv2d"])
def test_numpy_integer_geometry(cls):
    """numpy integers (as nn.Conv2d takes them) become Python ints at construction; a float
    or a bool is refused there, naming the argument."""
    make = {"ModulatedConv2d": lambda **kw: MN.ModulatedConv2d(np.int64(4), 4, np.int64(3), 5, **kw),
            "MixtureConv2d": lambda **kw: MN.MixtureConv2d(np.int64(4), 4, np.int64(3), 2,
                                                           groups=np.int64(2), **kw)}[cls]
    layer = make(stride=np.int64(2), padding=np.int32(1), dilation=(np.int64(1), 1))
    assert layer.stride == (2, 2) and layer.padding == (1, 1) and layer.kernel_size == (3, 3)
    assert all(type(v) is int for v in (*layer.stride, *layer.padding, *layer.dilation, layer.in_channels))
    args = [torch.randn(2, 5)] if cls == "ModulatedConv2d" else []
    assert layer(torch.randn(2, 4, 6, 6), *args).shape == (2, 4, 3, 3)
    with pytest.raises(TypeError, match=rf"{cls}: `stride` must be an int"):
        make(stride=2.0)
    with pytest.raises(ValueError, match=rf"{cls}: `stride` must be >= 1"):
        make(stride=0)


def test_mixture_conv2d_pickled_before_routing_features():
    """A MixtureConv2d pickled before ``routing_features`` existed gets its router's input size."""
    layer = MN.MixtureConv2d(3, 4, 3, 2)
    del layer.routing_features
    loaded = pickle.loads(pickle.dumps(layer))
    assert loaded.routing_features == 3
    loaded(torch.randn(1, 3, 5, 5), torch.randn(1, 3))
