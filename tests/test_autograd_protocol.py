"""The ops and layers under the autograd protocols of ``torch.nn`` (issue 23, items 1, 3 and 7),
on every backend each concerns: reference and torch on the CPU, triton under the interpreter
(tiny shapes), cuda (linear only) under its host emulation.

* In-place ops on an output (``y.mul_()``, ``nn.ReLU(inplace=True)``) leave the backward
  intact: an op's output is never a view of a backend's buffer, and with demodulation the
  tensor returned is never the one saved for the backward.
* Forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``hessian``, ``torch.autograd.forward_ad``)
  agrees with the reference and with central finite differences in float64.
* An empty sequence through ``MixtureLinear`` gives zero (not NaN) gradients.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.func import hessian, jacfwd, jvp

import modweights
from modweights import functional as MF
from modweights.nn import ROUTING_MODES, MixtureConv2d, MixtureLinear, masked_mean

NAMES = ("x", "bank", "coeffs", "styles", "bias")
LINEAR_BACKENDS = ["reference", "torch", "triton", "cuda"]
CONV_BACKENDS = ["reference", "torch", "triton"]  # the cuda backend has no conv2d


def _dtype(backend):
    # float64 where the backend takes it; the Triton and cuda kernels take float32 at most
    return torch.float32 if backend in ("triton", "cuda") else torch.float64


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-10


def _close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: error {err:.3g} relative to {scale:.3g}"


def _linear_inputs(coeffs="sample", styles="sample", bias=True, K=3, dtype=torch.float64, x2d=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, I, O = 2, 3, 8, 5
    f = dict(generator=g, dtype=torch.float64)
    x = torch.randn((B, I) if x2d else (B, T, I), **f)
    ct = (B, K) if coeffs == "sample" or x2d else (B, T, K)
    st = (B, I) if styles == "sample" or x2d else (B, T, I)
    return {k: (None if v is None else v.to(dtype)) for k, v in dict(
        x=x, bank=torch.randn(K, O, I, **f) / 3, coeffs=torch.softmax(torch.randn(ct, **f), -1),
        styles=None if styles == "none" else torch.rand(st, **f) + 0.5,
        bias=torch.randn(K, O, **f) if bias else None).items()}


def _conv_inputs(bias=True, K=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = dict(generator=g, dtype=torch.float64)
    B, I, O = 2, 3, 4
    return {k: (None if v is None else v.to(dtype)) for k, v in dict(
        x=torch.randn(B, I, 5, 5, **f), bank=torch.randn(K, O, I, 3, 3, **f) / 3,
        coeffs=torch.softmax(torch.randn(B, K, **f), -1), styles=torch.rand(B, I, **f) + 0.5,
        bias=torch.randn(O, **f) if bias else None).items()}


def _op(op, backend, demodulate, names):
    """The op as a function of the tensors named by ``names`` (the others given as keywords)."""
    fn = MF.mod_linear if op == "linear" else MF.mod_conv2d
    conv = {} if op == "linear" else dict(padding=1)

    def f(*ts, **rest):
        t = dict(rest, **dict(zip(names, ts)))
        return fn(t["x"], t["bank"], t.get("coeffs"), t.get("styles"), bias=t.get("bias"), demodulate=demodulate,
                  backend=backend, **conv)
    return f


# ============================================================================= item 1: in-place ops


@pytest.mark.parametrize("x2d", [False, True], ids=["3d", "2d"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_inplace_mul_after_mixture_linear(backend, x2d, on_backend):
    """``mixture_linear(x, bank, coeffs)`` (K > 1, no bias) then ``.mul_(2)``: the backward runs
    and gives twice the gradients of the op alone."""
    inp = _linear_inputs(styles="none", bias=False, dtype=_dtype(backend), x2d=x2d)
    leaves = [inp[k].clone().requires_grad_() for k in ("x", "bank", "coeffs")]
    y = MF.mixture_linear(*leaves, backend=backend)
    y.mul_(2)
    got = torch.autograd.grad(y.sum(), leaves)
    leaves2 = [t.detach().clone().requires_grad_() for t in leaves]
    want = torch.autograd.grad((2 * MF.mixture_linear(*leaves2, backend="reference")).sum(), leaves2)
    for name, a, b in zip(("x", "bank", "coeffs"), got, want):
        _close(a, b, _tol(_dtype(backend)), f"{backend} d{name}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_inplace_relu_after_mixture_conv2d(backend, on_backend):
    """``nn.Sequential(MixtureConv2d(3, 8, 3, 4, padding=1), nn.ReLU(inplace=True))``: the
    backward runs and matches the same model with an out-of-place ReLU."""
    dtype = _dtype(backend)
    torch.manual_seed(0)
    conv = MixtureConv2d(3, 8, 3, 4, padding=1, backend=backend).to(dtype)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    grads = []
    for inplace in (True, False):
        conv.zero_grad()
        nn.Sequential(conv, nn.ReLU(inplace=inplace))(x).square().sum().backward()
        grads.append([p.grad.clone() for p in conv.parameters()])
    for (name, _), a, b in zip(conv.named_parameters(), *grads):
        _close(a, b, 1e-12, f"{backend} {name}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("op,backend", [("linear", b) for b in LINEAR_BACKENDS] + [("conv", b) for b in CONV_BACKENDS])
def test_inplace_after_demodulated_op(op, backend, bias, on_backend):
    """With demodulation the backward reads the output it saved: the tensor returned must not be
    that one, or ``relu_`` on it fails in backward ("modified by an inplace operation")."""
    dtype = _dtype(backend)
    inp = (_linear_inputs if op == "linear" else _conv_inputs)(bias=bias, dtype=dtype)
    names = [k for k in NAMES if inp[k] is not None]
    f = _op(op, backend, True, names)
    grads = []
    for inplace in (True, False):
        leaves = [inp[k].clone().requires_grad_() for k in names]
        y = f(*leaves)
        y = torch.relu_(y) if inplace else torch.relu(y)
        grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for name, a, b in zip(names, *grads):
        _close(a, b, 1e-12, f"{backend} {op} d{name}")


# ============================================================================= item 3: forward-mode AD


LINEAR_JVP = [("sample", "sample", False), ("sample", "sample", True), ("token", "token", True),
              ("token", "none", False), ("sample", "token", True)]
JVP_CASES = ([("linear", b, c) for b in ("torch", "triton", "cuda") for c in LINEAR_JVP]
             + [("conv", b, (None, None, dm)) for b in ("torch", "triton") for dm in (False, True)])


def _jvp_inputs(op, case, dtype):
    coeffs, styles, demod = case
    if op == "linear":
        return _linear_inputs(coeffs, styles, dtype=dtype), demod
    return _conv_inputs(dtype=dtype), demod


@pytest.mark.parametrize("op,backend,case", JVP_CASES, ids=[f"{o}-{b}-{'-'.join(map(str, c))}" for o, b, c in JVP_CASES])
def test_jvp_matches_reference(op, backend, case, on_backend):
    """``torch.func.jvp`` with a tangent for every input, and ``torch.autograd.forward_ad``'s
    dual tensors, give the reference's tangent."""
    dtype = _dtype(backend)
    inp, demod = _jvp_inputs(op, case, dtype)
    names = [k for k in NAMES if inp[k] is not None]
    primals = tuple(inp[k] for k in names)
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in primals)
    y, t = jvp(_op(op, backend, demod, names), primals, tangents)
    y0, t0 = jvp(_op(op, "reference", demod, names), primals, tangents)
    _close(y, y0, _tol(dtype), f"{backend} y")
    _close(t, t0, _tol(dtype), f"{backend} tangent (torch.func.jvp)")
    with fwAD.dual_level():
        out = _op(op, backend, demod, names)(*(fwAD.make_dual(p, v) for p, v in zip(primals, tangents)))
        t_fw = fwAD.unpack_dual(out).tangent
    _close(t_fw, t0, _tol(dtype), f"{backend} tangent (forward_ad)")


@pytest.mark.parametrize("demod", [False, True], ids=["plain", "demod"])
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_jacfwd_matches_finite_differences(op, demod):
    """float64, torch backend: ``jacfwd`` with respect to x and the coefficients against central
    differences, and against ``jacrev`` (the backward)."""
    inp = _linear_inputs("token", "sample") if op == "linear" else _conv_inputs()
    names = [k for k in NAMES if inp[k] is not None]
    f = _op(op, "torch", demod, names)
    primals = tuple(inp[k] for k in names)
    jx, ja = jacfwd(f, argnums=(0, 2))(*primals)
    rx, ra = torch.func.jacrev(f, argnums=(0, 2))(*primals)
    _close(jx, rx, 1e-10, "jacfwd vs jacrev, x")
    _close(ja, ra, 1e-10, "jacfwd vs jacrev, coeffs")
    h = 1e-6
    for argnum, jac in ((0, jx), (2, ja)):
        p = primals[argnum]
        direction = torch.randn(p.shape, dtype=torch.float64)
        plus = list(primals)
        minus = list(primals)
        plus[argnum], minus[argnum] = p + h * direction, p - h * direction
        fd = (f(*plus) - f(*minus)) / (2 * h)
        lin = (jac.reshape(fd.numel(), -1) @ direction.reshape(-1)).reshape(fd.shape)
        _close(lin, fd, 1e-7, f"jacfwd vs finite differences, argument {names[argnum]}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hessian_of_a_loss(backend, on_backend):
    """``hessian`` (forward over reverse) of a scalar loss in the coefficients, demodulated."""
    dtype = _dtype(backend)
    inp = _linear_inputs(dtype=dtype)

    def loss(be):
        return lambda c: MF.mod_linear(inp["x"], inp["bank"], c, inp["styles"], bias=inp["bias"],
                                       demodulate=True, backend=be).square().sum()
    _close(hessian(loss(backend))(inp["coeffs"]), hessian(loss("reference"))(inp["coeffs"]), _tol(dtype) * 10,
           f"{backend} hessian")


# ============================================================================= item 7: empty sequence


@pytest.mark.parametrize("mode", ROUTING_MODES)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_mixture_linear_empty_sequence_zero_grads(backend, mode, on_backend):
    """``(2, 0, 4)`` through ``MixtureLinear``, in every routing mode: an empty output, and
    gradients for every parameter (router included) that are zeros, not NaN (the token mean
    of nothing) and not a crash (no segment to cut); the same inside ``decoding`` (the
    stateful modes' running state), where an empty call leaves the state as it was."""
    torch.manual_seed(0)
    m = MixtureLinear(4, 6, 3, routing_mode=mode, backend=backend,
                      segment_length=2 if mode == "segment" else None)
    cond = torch.randn(2, 4) if mode == "cond" else None
    x = torch.randn(2, 0, 4, requires_grad=True)
    y = m(x, cond)
    assert y.shape == (2, 0, 6)
    assert m.coefficients(x, cond).shape in ((2, 3), (2, 0, 3))
    y.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), f"{name}: {p.grad}"
    assert x.grad.shape == x.shape
    if mode in ("noncausal_unpadded_mean",):  # each call pools its own tokens: no stream to continue
        return
    seq = torch.randn(2, 3, 4)
    with torch.no_grad(), modweights.decoding(m):
        first = m(seq[:, :1], cond)
        assert m(x.detach(), cond).shape == (2, 0, 6)  # an empty call in the middle of a stream
        rest = m(seq[:, 1:], cond)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([first, rest], 1), m(seq, cond))


def test_empty_sequence_pooling_under_use_backend():
    """The same through the context's backend choice (the layer's ``backend`` unset), and the
    pooling itself: ``masked_mean`` of no token is zeros, with or without a mask."""
    torch.manual_seed(0)
    m = MixtureLinear(4, 6, 3, routing_mode="noncausal_unpadded_mean")
    with modweights.use_backend("torch"):
        m(torch.randn(2, 0, 4)).sum().backward()
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in m.parameters())
    empty = torch.randn(2, 0, 4)
    assert torch.equal(masked_mean(empty), torch.zeros(2, 4))
    assert torch.equal(masked_mean(empty, torch.ones(2, 0)), torch.zeros(2, 4))


@pytest.mark.parametrize("demodulate", [False, True], ids=["plain", "demod"])
def test_both_autograd_paths_save_the_same(demodulate):
    """The custom op (torch.compile / export) and the autograd.Function (eager) save the same
    tensors for the backward (one rule, ``_autograd.saved_for_backward``): the five inputs, and
    ``d`` and ``y`` only with demodulation (the custom op once kept ``d`` without it)."""
    from conftest import require_backend
    from modweights import _autograd
    from modweights._checks import ModLinearConfig

    require_backend("triton", torch.device("cpu"))
    torch.manual_seed(0)
    x, bank, c, s, b = (torch.randn(*sh, requires_grad=True) for sh in ((2, 3, 5), (3, 4, 5), (2, 3), (2, 5), (3, 4)))

    def saved(run):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run()
        y.sum().backward()
        return shapes

    via_op = saved(lambda: _autograd.custom_op("mod_linear", "triton")(x, bank, c, s, b, demodulate, 1e-8)[0])
    fn = _autograd.function_for("mod_linear", "triton", ModLinearConfig(demodulate, 1e-8))
    via_fn = saved(lambda: fn.apply(x, bank, c, s, b)[0])
    inputs = [(2, 3, 5), (3, 4, 5), (2, 3), (2, 5), (3, 4)]
    assert via_op == via_fn
    assert via_op[:5] == inputs and len(via_op) == (7 if demodulate else 5)
