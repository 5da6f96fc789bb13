"""Deployment: torch.export with a dynamic batch (and sequence length) for every layer and
conditioning mode, run_decompositions() to core aten, a saved program loading in a fresh
process, ONNX through the dynamo and the TorchScript exporters (run in onnxruntime), and
AOTInductor on the CPU. Outputs are compared with eager at sizes other than the traced ones.
"""
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

import modweights
from modweights import functional as MF
from modweights import nn as MN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # fp32: relative to the output's largest element


def _rel(out, ref) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


class Fn(nn.Module):
    """A functional op with parameters: bank, and the conditioning from small linears of the
    latent ``w`` (per sample ``(B, F)`` or per token ``(B, T, F)``)."""

    def __init__(self, op, K, I, O, coeffs, styles, demodulate, bias, conv=None):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        shape = (K, O, I, 3, 3) if op == "conv" else (K, O, I)
        self.bank = nn.Parameter(torch.randn(*shape, generator=g) / I)
        self.bias = nn.Parameter(torch.randn(K, O, generator=g)) if bias else None
        self.to_a = nn.Linear(4, K) if coeffs else None
        self.to_s = nn.Linear(4, I) if styles else None
        self.op, self.demodulate, self.conv = op, demodulate, conv or {}

    def forward(self, x, w):
        a = None if self.to_a is None else self.to_a(w).softmax(-1)
        s = None if self.to_s is None else self.to_s(w)
        if self.op == "conv":
            return MF.mod_conv2d(x, self.bank, a, s, demodulate=self.demodulate, bias=self.bias, **self.conv)
        return MF.mod_linear(x, self.bank, a, s, demodulate=self.demodulate, bias=self.bias)


def _lin(B, T, I, wt=None):
    g = torch.Generator().manual_seed(B * 100 + T)
    x = torch.randn(B, T, I, generator=g)
    return (x, torch.randn(B, *((T,) if wt else ()), 4, generator=g))


def _img(B, I, H=6):
    g = torch.Generator().manual_seed(B)
    return (torch.randn(B, I, H, H, generator=g), torch.randn(B, 4, generator=g))


# name -> (model, inputs(B, T) -> tuple, dynamic axes per input, whether T is dynamic)
def cases():
    torch.manual_seed(0)
    return {
        "modulated_linear": (MN.ModulatedLinear(6, 8, 4), lambda B, T: _lin(B, T, 6), True),
        "modulated_linear_nodemod": (MN.ModulatedLinear(6, 8, 4, demodulate=False), lambda B, T: _lin(B, T, 6), True),
        "mixture_linear": (MN.MixtureLinear(8, 5, 3, routing_mode="noncausal_unpadded_mean"),
                           lambda B, T: _lin(B, T, 8)[:1], True),
        "mixture_linear_per_token": (MN.MixtureLinear(8, 5, 3, routing_mode="token"),
                                     lambda B, T: _lin(B, T, 8)[:1], True),
        "mixture_linear_prefix_mean": (MN.MixtureLinear(8, 5, 3, routing_mode="prefix_mean"),
                                       lambda B, T: _lin(B, T, 8)[:1], True),
        "mixture_linear_cond": (MN.MixtureLinear(8, 5, 3, routing_features=4, routing_mode="cond"),
                                lambda B, T: _lin(B, T, 8), True),
        "mixture_linear_segment": (MN.MixtureLinear(8, 5, 3, routing_mode="segment", segment_length=4),
                                   lambda B, T: _lin(B, 8, 8)[:1], False),
        "mixture_linear_2d": (MN.MixtureLinear(8, 5, 4), lambda B, T: (_lin(B, 1, 8)[0][:, 0],), False),
        "mod_linear_demod_K3": (Fn("lin", 3, 8, 6, True, True, True, True), lambda B, T: _lin(B, T, 8), True),
        "mod_linear_token_styles": (Fn("lin", 3, 8, 6, True, True, True, False), lambda B, T: _lin(B, T, 8, True), True),
        "mod_linear_token_coeffs_demod": (Fn("lin", 2, 8, 6, True, False, True, True),
                                          lambda B, T: _lin(B, T, 8, True), True),
        "modulated_conv2d": (MN.ModulatedConv2d(3, 4, 3, 4, padding=1), lambda B, T: _img(B, 3), False),
        "mixture_conv2d": (MN.MixtureConv2d(4, 4, 3, 2, padding=1, stride=2, bias=True),
                           lambda B, T: _img(B, 4)[:1], False),
        "mixture_conv2d_groups": (MN.MixtureConv2d(4, 6, 3, 3, padding="same", groups=2),
                                  lambda B, T: _img(B, 4)[:1], False),
        "mixture_conv2d_strided_dilated": (MN.MixtureConv2d(4, 8, 3, 4, padding=2, stride=2, dilation=2),
                                           lambda B, T: _img(B, 4, H=8)[:1], False),
        "mod_conv2d_demod_K3": (Fn("conv", 3, 3, 5, True, True, True, True, {"padding": 1}),
                                lambda B, T: _img(B, 3), False),
    }


CASES = cases()
TRACED, NEW = (7, 5), [(1, 2), (6, 9)]  # the traced batch (no channel count of CASES) and length; sizes to run at


def _dyn(inputs, dyn_t):
    """dynamic_shapes: the batch of every input, and the length of the 3-D ones when dyn_t."""
    B, T = Dim("B", min=1, max=1024), Dim("T", min=2, max=4096)
    return tuple({0: B, **({1: T} if dyn_t and t.dim() == 3 else {})} for t in inputs)


def _export(name):
    model, make, dyn_t = CASES[name]
    args = make(*TRACED)
    return model.eval(), make, torch.export.export(model, args, dynamic_shapes=_dyn(args, dyn_t))


def _targets(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", list(CASES))
def test_export_dynamic_sizes_match_eager(name):
    """One exported program serves other batch sizes and lengths (no guard from the backend's
    choice of formulation or from the shape checks); run_decompositions() leaves only aten ops
    and no convolution whose groups are the batch."""
    model, make, ep = _export(name)
    dec = ep.run_decompositions()
    assert not [t for t in _targets(dec) if "modweights" in str(t)]
    for n in dec.graph.nodes:
        if n.target == torch.ops.aten.convolution.default:
            assert isinstance(n.args[-1], int) and n.args[-1] != TRACED[0], n.args  # static groups (the layer's, or the channels of an unfold), never B
    for B, T in NEW:
        inputs = make(B, T)
        with torch.no_grad():
            ref = model(*inputs)
            assert _rel(ep.module()(*inputs), ref) <= RTOL
            assert _rel(dec.module()(*inputs), ref) <= RTOL


def test_export_uses_the_custom_op_and_registers_it_at_import():
    """The exported graph names our op (one node per layer, kept for backends that can run it)
    and the op exists as soon as modweights is imported."""
    _, _, ep = _export("mixture_linear")
    assert torch.ops.modweights.mod_linear_torch.default in _targets(ep)
    code = "import torch, modweights; torch.ops.modweights.mod_linear_torch.default; " \
           "torch.ops.modweights.mod_conv2d_torch.default; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.strip() == "ok", out.stderr


_LOAD = """
import sys, torch, modweights
ep = torch.export.load(sys.argv[1])
inputs, ref = torch.load(sys.argv[2])
out = ep.module()(*inputs)
print(float((out - ref).abs().max() / ref.abs().max()))
"""


def test_saved_program_loads_in_a_fresh_process(tmp_path):
    """torch.export.save, then torch.export.load in a new process that imports modweights
    (the ops are registered at import, not on first use), run at a new batch size."""
    for name in ("modulated_conv2d", "mixture_linear_per_token"):
        model, make, ep = _export(name)
        torch.export.save(ep, tmp_path / f"{name}.pt2")
        inputs = make(*NEW[1])
        with torch.no_grad():
            torch.save((inputs, model(*inputs)), tmp_path / f"{name}.io")
        out = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / f"{name}.pt2"), str(tmp_path / f"{name}.io")],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert out.returncode == 0, out.stderr[-2000:]
        assert float(out.stdout.strip()) <= RTOL


def test_conv_formulations_under_export():
    """The exported convs take the formulation the per-sample count names (never grouped)."""
    from modweights.backends import torch_backend
    assert torch_backend.mod_conv2d_plan(None, 4, 8, 4, 3, 3, 1, 16, False) == "im2col"  # strided_dilated
    assert torch_backend.mod_conv2d_plan(None, 4, 4, 2, 3, 3, 1, 9, False) == "stacked"  # mixture_conv2d


def test_plans_under_symbolic_sizes_read_static_sizes_only():
    """The torch backend's plans with a dynamic batch / length (None): never 'grouped' in a
    conv forward; linear per sample counted per sample at a static T."""
    from modweights.backends import torch_backend
    assert torch_backend.mod_conv2d_plan(None, 8, 8, 4, 3, 3, 1, 64, False) == "im2col"  # many pixels per sample
    assert torch_backend.mod_conv2d_plan(None, 8, 8, 2, 3, 3, 1, 1, True) == "stacked"  # one pixel: K convs are cheaper
    assert torch_backend.mod_conv2d_plan(None, 8, 8, 4, 3, 3, 1, None, False) == "stacked"  # image size dynamic too
    assert torch_backend.mod_conv2d_plan(8, 8, 8, 4, 3, 3, 1, 64, True) == "grouped"  # eager: unchanged
    assert torch_backend.mod_linear_plan(None, None, 512, 512, 4, True, False) == "stacked"  # per token
    assert torch_backend.mod_linear_plan(None, None, 512, 512, 4, False, False) == "form"  # per sample, T dynamic
    # T static, B dynamic: the per-sample count gives what any concrete B gives
    for T in (1, 256):
        assert (torch_backend.mod_linear_plan(None, T, 512, 512, 4, False, False)
                == torch_backend.mod_linear_plan(7, T, 512, 512, 4, False, False))


# ----------------------------------------------------------------------------- ONNX

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _ort_run(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return torch.from_numpy(sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def _axes(inputs, dyn_t):
    return {f"in{i}": ({0: "B", 1: "T"} if dyn_t and t.dim() == 3 else {0: "B"}) for i, t in enumerate(inputs)}


class _Top(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        return self.layer(*args)


ONNX_CASES = ["modulated_linear", "mixture_linear", "mixture_linear_per_token", "mixture_linear_prefix_mean",
              "mixture_linear_cond", "mod_linear_demod_K3",
              "modulated_conv2d", "mixture_conv2d", "mod_conv2d_demod_K3"]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_export_runs_in_onnxruntime_at_new_sizes(name, dynamo, tmp_path):
    """torch.onnx.export through the dynamo exporter (dynamic_shapes) and the TorchScript one
    (dynamic_axes): the graph computes the layer's output (not the demodulation coefficients)
    at other batch sizes and lengths."""
    model, make, dyn_t = CASES[name]
    model.eval()
    args = make(*TRACED)
    names = [f"in{i}" for i in range(len(args))]
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            ds = tuple({k: Dim.AUTO for k in a} for a in _axes(args, dyn_t).values())
            torch.onnx.export(model, args, dynamo=True, dynamic_shapes=ds, input_names=names,
                              output_names=["y"]).save(str(path))
        else:  # the TorchScript exporter passes defaults of keyword-only arguments (coeffs=) positionally
            # to the model it is given (torch.onnx.utils._decide_input_format): a layer goes inside a model
            torch.onnx.export(_Top(model), args, str(path), dynamo=False, input_names=names, output_names=["y"],
                              dynamic_axes={**_axes(args, dyn_t), "y": {0: "B"}})
    import onnx
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == names  # every input reaches the graph
    assert not [n for n in graph.node if n.domain not in ("", "ai.onnx") and "modweights" in n.op_type]
    for node in graph.node:
        if node.op_type == "Conv":
            group = [a.i for a in node.attribute if a.name == "group"]
            assert group != [TRACED[0]], group  # never the batch
    for B, T in NEW:
        inputs = make(B, T)
        with torch.no_grad():
            assert _rel(_ort_run(path, inputs), model(*inputs)) <= RTOL


def test_onnx_float16_in_onnxruntime(tmp_path):
    """A half-precision ModulatedConv2d exported (dynamo) and run by onnxruntime's CPU kernels at
    a new batch, against float32 eager."""
    torch.manual_seed(0)
    model = MN.ModulatedConv2d(3, 4, 3, 4, padding=1).eval()
    x, w = _img(3, 3)
    path = tmp_path / "h.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.half(), (x.half(), w.half()), dynamo=True,
                          dynamic_shapes=({0: Dim.AUTO}, {0: Dim.AUTO})).save(str(path))
    x, w = _img(5, 3)
    out = _ort_run(path, (x.half(), w.half()))
    with torch.no_grad():
        ref = model.float()(x, w)
    assert out.dtype == torch.float16 and _rel(out, ref) <= 2e-3


# ----------------------------------------------------------------------------- AOTInductor

_AOTI_LOAD = """
import sys, torch
if sys.argv[3] == "1":
    import modweights
runner = torch._inductor.aoti_load_package(sys.argv[1])
inputs, ref = torch.load(sys.argv[2])
out = runner(*inputs)
print(float((out - ref).abs().max() / ref.abs().max()))
"""


@pytest.mark.slow
def test_aoti_package_loads_in_a_fresh_process(tmp_path):
    """AOTInductor on the CPU: the decomposed program compiles to a package that runs at a new
    batch in a fresh process without importing modweights (a C++ deployment sees aten ops only);
    the undecomposed one (our op kept as a fallback kernel) loads where modweights is imported.
    About 1-2 minutes on 2 cores (two C++ builds)."""
    from torch._inductor import aoti_compile_and_package

    model, make, ep = _export("modulated_conv2d")
    inputs = make(*NEW[1])
    with torch.no_grad():
        torch.save((inputs, model(*inputs)), tmp_path / "io")
    with torch._inductor.config.patch(compile_threads=1):
        for decomposed, path in ((True, tmp_path / "dec.pt2"), (False, tmp_path / "op.pt2")):
            aoti_compile_and_package(ep.run_decompositions() if decomposed else ep, package_path=str(path))
            out = subprocess.run([sys.executable, "-c", _AOTI_LOAD, str(path), str(tmp_path / "io"),
                                  "0" if decomposed else "1"],
                                 capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
            assert out.returncode == 0, out.stderr[-2000:]
            assert float(out.stdout.strip().splitlines()[-1]) <= RTOL
