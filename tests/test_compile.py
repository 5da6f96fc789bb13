"""torch.compile(fullgraph=True) over models of our layers on every backend available on the
CPU: outputs and gradients match eager; the registered custom ops pass torch.library.opcheck.

Most tests compile with ``backend="aot_eager"``: it runs everything of ours that compile
touches (dynamo tracing the layers, the ops' fake implementations, AOTAutograd tracing the
registered backward) without Inductor's C++ build, which costs tens of seconds on 2 cores.
One test runs Inductor end to end.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import modweights
from modweights import _autograd, backends
from modweights import nn as MN
from modweights import testing as T

CPU_BACKENDS = [n for n, s in modweights.available_backends("cpu").items() if s.available]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    # Inductor's pool of compile workers takes ~30 s to start on 2 cores; compile in-process
    with torch._inductor.config.patch(compile_threads=1):
        yield
    torch._dynamo.reset()


class Net(nn.Module):
    """Every layer type: modulated (demodulated) and mixture linears, per-sample and per-token
    routing, modulated and mixture convs with stride, padding and a bias bank."""

    def __init__(self, conv: bool = True):
        super().__init__()
        self.mod = MN.ModulatedLinear(6, 8, 4)
        self.mix = MN.MixtureLinear(8, 5, 3)
        self.tok = MN.MixtureLinear(5, 5, 2, routing_mode="token", routing="sigmoid")
        self.conv = conv
        if conv:
            self.mconv = MN.ModulatedConv2d(3, 4, 3, 4, padding=1)
            self.xconv = MN.MixtureConv2d(4, 4, 3, 2, padding=1, stride=2, bias=True)

    def forward(self, x, w, img):
        out = self.tok(torch.tanh(self.mix(self.mod(x, w)))).square().mean()
        if self.conv:
            out = out + self.xconv(self.mconv(img, w)).square().mean()
        return out


def _supports(name: str, op: str) -> bool:
    """Whether backend ``name`` implements ``op`` for the (float32, 3x3, ungrouped) layers here."""
    problem = dict(dtype=torch.float32, per_token=True) if op == "mod_linear" else dict(
        dtype=torch.float32, groups=1, kernel_size=(3, 3), in_channels=4, out_channels=4)
    return backends.load(name).supports(op, **problem)[0]


def _run(model, inputs):
    """Output and the gradients of every parameter and input."""
    model.zero_grad()
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = model(*leaves)
    out.backward()
    return [out.detach()] + [p.grad for p in model.parameters()] + [t.grad for t in leaves]


def _inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 7, 6, generator=g), torch.randn(B, 4, generator=g), torch.randn(B, 3, 6, 6, generator=g))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_compiled_model_matches_eager(name):
    """fullgraph=True on every layer type; then a second batch size, which makes dynamo
    retrace with a symbolic batch (automatic dynamic shapes): the checks, the backend choice
    and the ops' fake implementations must take it."""
    torch.manual_seed(0)
    model = Net(conv=_supports(name, "mod_conv2d"))
    modweights.set_backend(model, name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for B in (2, 3):
        inputs = _inputs(B)
        for a, e in zip(_run(compiled, inputs), _run(model, inputs)):
            torch.testing.assert_close(a, e)
    assert counter.frame_count == 2  # static shapes, then a dynamic batch


# the backends with custom ops (reference is traced as plain PyTorch ops; ~14 s more on 2 cores)
DYNAMIC = [(n, how) for how in ("automatic", "mark_dynamic", "dynamic=True") for n in CPU_BACKENDS if n != "reference"]


@pytest.mark.parametrize("name,how", DYNAMIC, ids=[f"{n}-{h}" for n, h in DYNAMIC])
def test_dynamic_sequence_length(name, how):
    """fullgraph=True with a symbolic sequence length T (a second T retraces with it, or
    mark_dynamic / dynamic=True ask for it from the start), then a symbolic batch too: the
    trace-time backend choice must not take a symbolic size for a constant, and no further
    shape may recompile. Linear layers only (T is theirs); modulated with demodulation,
    per-sample and per-token mixtures."""
    torch.manual_seed(0)
    model = Net(conv=False)
    modweights.set_backend(model, name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True if how == "dynamic=True" else None)
    # T >= 7 throughout: the torch backend chooses its formulation by counting (a guard on T),
    # and these shapes keep it on one side, so a recompile here means T was specialised
    shapes = [(2, 7), (3, 9), (4, 8)] if how == "automatic" else [(2, 7), (3, 9)]
    frames = []
    for B, T_ in shapes:
        g = torch.Generator().manual_seed(B * 10 + T_)
        x, w = torch.randn(B, T_, 6, generator=g), torch.randn(B, 4, generator=g)
        results = []
        for m in (compiled, model):
            m.zero_grad()
            xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(xl, 0)
                torch._dynamo.mark_dynamic(xl, 1)
                torch._dynamo.mark_dynamic(wl, 0)
            out = m(xl, wl, None)
            out.backward()
            results.append([out.detach(), xl.grad, wl.grad] + [p.grad.clone() for p in model.parameters()])
        for a, e in zip(*results):
            torch.testing.assert_close(a, e)
        frames.append(counter.frame_count)
    # automatic dynamic: static first, then one retrace with symbolic T and B stays valid for
    # the third shape; otherwise one trace serves every shape (a restart within the first
    # compile, as dynamo's float specialisation does under dynamic=True, counts once per graph)
    if how == "automatic":
        assert frames[1] == frames[2] == frames[0] + 1, frames
    else:
        assert frames[1] == frames[0], frames


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.mod = MN.ModulatedLinear(6, 5, 4)
        self.xconv = MN.MixtureConv2d(3, 4, 3, 2, padding=1, bias=True)

    def forward(self, x, w, img):
        return self.mod(x, w).square().mean() + self.xconv(img).square().mean()


def test_inductor_matches_eager():
    """Inductor end to end (the default backend of torch.compile) on a small model: its C++
    build dominates the cost, ~20 s on 2 cores."""
    torch.manual_seed(0)
    model = Small()
    modweights.set_backend(model, "torch")
    inputs = _inputs()
    eager = _run(model, inputs)
    compiled = _run(torch.compile(model, fullgraph=True), inputs)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_converted_conditioned_model_compiles_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), nn.Flatten(2),
                          nn.Linear(25, 6))
    modweights.convert(model, "modulated", style_features=4)
    for m in (model[0], model[2]):
        nn.init.normal_(m.affine.weight)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 5, 5)
    for seed in (1, 2):
        w = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        with modweights.condition(model, w):
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1  # a new latent of the same shape is an input, not a constant


def test_backend_choice_is_guarded():
    """Under compile the backend is chosen at trace time; the use_backend context and the
    layer's backend attribute are guarded, so changing them recompiles instead of running
    the stale choice."""
    layer = MN.MixtureLinear(5, 4, 3)
    x = torch.randn(2, 3, 5)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    with modweights.use_backend("reference"):
        y_ref = compiled(x)
    with modweights.use_backend("torch"):
        y_torch = compiled(x)
    assert counter.frame_count == 2
    torch.testing.assert_close(y_torch, y_ref)
    modweights.set_backend(layer, "reference")
    with modweights.use_backend("torch"):
        torch.testing.assert_close(compiled(x), y_ref)
    assert counter.frame_count == 3


def test_switch_read_in_traced_code_is_guarded():
    """A test-only switch (modweights/_switches.py) read inside code dynamo traces: the torch
    backend's forward reads ``torch_plan``. Each setting compiles once (dynamo guards on the
    value read), a setting seen before reuses its graph, and each graph matches eager."""
    from modweights import _switches as switches
    from modweights._checks import ModLinearConfig
    from modweights.backends import torch_backend

    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(2, 5, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    coeffs, cfg = torch.softmax(torch.randn(2, 3, generator=g), -1), ModLinearConfig(False, 1e-8)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(torch_backend.mod_linear_forward, fullgraph=True, backend=counter)
    for plan, frames in (("stacked", 1), ("form", 2), ("stacked", 2)):
        with switches.override(torch_plan=plan):
            assert torch_backend.mod_linear_plan(2, 5, 6, 4, 3, False, False) == plan
            torch.testing.assert_close(compiled(x, bank, coeffs, None, None, cfg)[0],
                                       torch_backend.mod_linear_forward(x, bank, coeffs, None, None, cfg)[0])
        assert counter.frame_count == frames, plan


# ----------------------------------------------------------------------------- opcheck

# opcheck traces each op with dynamic shapes (seconds per case on 2 cores): a few cases that
# cover the schema's branches (demodulation or not, per-token, both bias forms, conv geometry)
OPCHECK_CASES = [
    T.Case("mod_linear", B=3, T=5, I=7, O=4, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case("mod_linear", B=2, T=5, I=6, O=4, K=3, coeffs="token", bias="shared"),
    T.Case("mod_conv2d", B=2, I=3, O=4, K=1, H=5, W=5, styles="sample", demodulate=True, bias="shared",
           conv={"padding": 1}),
    T.Case("mod_conv2d", B=2, I=4, O=4, K=2, H=5, W=6, coeffs="sample", bias="bank",
           conv={"stride": 2, "padding": (1, 0), "groups": 2}),
]
# the mixture conv's dynamic-shape trace alone takes ~20 s on 2 cores: it runs with static
# shapes (and the compiled-model tests trace it too); dynamic shapes run on the other cases
STATIC_ONLY = {OPCHECK_CASES[3].id}
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
STATIC_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")
REGISTERED = [name for name in CPU_BACKENDS if not getattr(backends.load(name), "DIRECT", False)]
# the torch backend on every case; a kernel backend (slow under Triton's interpreter, and its own
# kernels' ops are opchecked in its test file) on the first case it supports
OPCHECKS = []
for _n in REGISTERED:
    _cases = [c for c in OPCHECK_CASES if _supports(_n, c.op)]
    OPCHECKS += [(_n, c) for c in (_cases if _n == "torch" else _cases[:1])]


@pytest.mark.parametrize("name,case", OPCHECKS, ids=[f"{n}-{c.id}" for n, c in OPCHECKS])
def test_opcheck(name, case):
    t = T.make_inputs(case, torch.float32)
    if case.op == "mod_linear" and t["x"].dim() == 2:
        t["x"] = t["x"].unsqueeze(1)  # the ops take canonical (B, T, I)
    tensors = [None if t[k] is None else t[k].requires_grad_() for k in T.GRAD_NAMES]
    if case.op == "mod_linear":
        cfg = (case.demodulate, 1e-8)
    else:
        c = case.conv
        pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
        cfg = (case.demodulate, 1e-8, pair(c.get("stride", 1)), pair(c.get("padding", 0)),
               pair(c.get("dilation", 1)), c.get("groups", 1))
    op = _autograd.custom_op(case.op, name)
    utils = STATIC_UTILS if case.id in STATIC_ONLY else ALL_UTILS
    torch.library.opcheck(op, (*tensors, *cfg), test_utils=utils)
    glue = _autograd._glue(case.op, name)
    if glue.bwd_op is not None:  # a kernel backend's backward op
        y, d = op(*tensors, *cfg)
        g = torch.randn_like(y)
        saved_y = y.detach() if case.demodulate else None
        needs = [x is not None for x in tensors]
        torch.library.opcheck(glue.bwd_op, (g, *[None if x is None else x.detach() for x in tensors],
                                            d.detach(), saved_y, needs, *cfg), test_utils=utils)


def test_constant_marker_matches_torch_decorator():
    """_autograd marks its trace-time resolver the way torch.compiler.assume_constant_result
    does (without importing dynamo at import time); catch a torch change here."""
    from modweights import _autograd

    def f():
        return 0

    marked = torch.compiler.assume_constant_result(f)
    assert vars(marked) == {"_dynamo_marked_constant": True}
    assert _autograd._resolve_while_tracing._dynamo_marked_constant is True


def test_autocast_compiles_fullgraph():
    """The ops' autocast handling traces with fullgraph=True (torch 2.11's Dynamo cannot trace
    torch.amp.is_autocast_available, which it used to call): under autocast the compiled op
    casts to the autocast dtype as eager does, and entering or leaving autocast is guarded
    (a recompile, never a stale graph)."""
    import modweights.functional as MF
    g = torch.Generator().manual_seed(3)
    x, bank, a = torch.randn(2, 5, 6, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(2, 3, generator=g)
    counter = CompileCounterWithBackend("aot_eager")
    op = torch.compile(lambda *t: MF.mixture_linear(*t, backend="reference"), fullgraph=True, backend=counter)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x, bank, a)
        y_eager = MF.mixture_linear(x, bank, a, backend="reference")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_eager)
    y32 = op(x, bank, a)  # autocast off: the autocast state is guarded, so this recompiles
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, MF.mixture_linear(x, bank, a, backend="reference"))
    assert counter.frame_count == 2
