"""The autograd glue shared by every non-reference backend (written once).

A backend supplies ``<op>_forward(x, bank, coeffs, styles, bias, cfg) -> (y, d)`` and
``<op>_backward(g, x, bank, coeffs, styles, bias, d, y, cfg, needs) -> 5 grads``. The glue
saves the inputs, the demodulation coefficients ``d`` (``(B, O)``-sized), and, with
demodulation only, the output ``y`` (from which the backward recovers the
pre-demodulation output ``z = (y - bias) / d`` for ``dd = sum_t g * z``). Never a
per-sample weight. With demodulation under autograd, :func:`run` adds the bias outside the op
(any dtype), so that the saved ``y`` is bias-free and ``z`` does not cancel against a large
bias, and the saved ``y`` is never the tensor the user gets (in-place ops on it stay legal).

Two wrappers over one glue (:class:`_Glue`: the backend's forward and the gradient rule),
so both run the same forward and the same gradients:

- eager calls go through an ``autograd.Function``, one class per (op, backend, config),
  cached (:func:`function_for`): the cheapest dispatch (a custom op's Python dispatch costs
  about twice as much per call, which small problems feel);
- under ``torch.compile`` (and export) calls go through a PyTorch custom op
  ``torch.ops.modweights.<op>_<backend>`` (:func:`custom_op`), registered once per
  (op, backend), at import for ``torch`` and ``cuda`` (so that a saved exported program loads in
  a fresh process; ``triton`` on first use), with ``torch.library.custom_op`` + ``register_fake`` +
  ``register_autograd`` + a decomposition to dense aten ops for torch.export (:func:`dense`): one opaque node whose output shapes come from the fake
  implementation and whose backward AOTAutograd traces from the registered formula. That
  is what lets ``torch.compile(fullgraph=True)`` trace a model of these layers.
  tests/test_compile.py checks the ops with ``torch.library.opcheck`` and compiled models
  against eager.

Custom-op schemas (non-tensor configuration as schema arguments, so one op serves every
configuration)::

    modweights::mod_linear_<b>(Tensor x, Tensor bank, Tensor? coeffs, Tensor? styles, Tensor? bias,
                               bool demodulate, float eps) -> (Tensor y, Tensor d)
    modweights::mod_conv2d_<b>(... the same ..., int[] stride, int[] padding, int[] dilation,
                               int groups) -> (Tensor y, Tensor d)

In the op, ``d`` is an empty tensor where the backend returned None (no demodulation; a
schema has no optional outputs), marked non-differentiable, and reaches the backend's
backward as that empty tensor. The fake implementation is the backend's
``<op>_forward_fake`` when it has one (a kernel launcher cannot run on fake tensors), else
its ``<op>_forward`` itself (right for backends written in PyTorch ops, like ``torch``). The
ops' implementations are opaque to dynamo, so a backend calls its kernel launchers directly
(no custom op of its own: ``triton`` and ``cuda`` launch from plain functions).

Backward. A backend with ``DIFFERENTIABLE_BACKWARD = True`` (``torch``) has its backward
called directly, so AOTAutograd traces it into the compiled backward and double backward
works in eager. For any other backend the custom op's backward calls a second op,
``modweights::<op>_backward_<b>`` (empty tensors for gradients not needed), whose fake
implementation is the backend's ``<op>_backward_fake`` when it has one (same arguments and
results as ``<op>_backward``; for gradients whose layout differs from their input's, as
``triton``'s channels-last conv ``dx``), else contiguous tensors of the inputs' shapes; and when a
graph is being built (``create_graph=True``) either wrapper hands over to the `torch`
backend's differentiable backward, which recomputes ``z`` and ``d`` from the inputs.

Empty problems (``B = 0``, or ``T = 0`` for linear: an output with no element) reach no backend:
:func:`run` hands them to the ``reference`` backend's PyTorch ops (the empty output, and zero
gradients through autograd), and the custom ops, which are public, answer them the same way
without calling the backend (zero gradients from their backward). So the fast backends' kernels
and plans may assume at least one row.

Backend choice under ``torch.compile``: :func:`resolve` runs the registry's selection once,
when the graph is traced, and bakes the result in. The :func:`modweights.use_backend` context
and a layer's ``backend`` attribute are guarded (changing them recompiles);
``MODWEIGHTS_BACKEND`` is read at trace time only. A size that is symbolic in the trace (a
dynamic batch or sequence length) reaches the selection as ``None`` (unknown), so one graph
serves every value of it; ``auto`` then applies no measured-table entry that needs it.
"""
from __future__ import annotations

import functools

import torch

from . import backends
from . import ops
from ._checks import ModConv2dConfig, ModLinearConfig, check_needs
from .backends import reference as _reference  # empty problems run here (see run); imported, so dynamo need not

_NS = "modweights"
_SCHEMA_IN = "Tensor x, Tensor bank, Tensor? coeffs, Tensor? styles, Tensor? bias, bool demodulate, float eps"

# backend modules resolved while tracing (see :func:`resolve`); a plain dict that dynamo reads
_LOADED: dict[str, object] = {}


def _cfg_args(cfg) -> tuple:
    """The schema's non-tensor arguments for ``cfg`` (the op's spec says which)."""
    return _SPEC_OF_CONFIG[type(cfg)].cfg_args(cfg)


def _cfg(op: str, args):
    """Rebuild the config from the schema's non-tensor arguments."""
    return ops.get(op).cfg_from_args(args)


def _own(y):
    """``y`` as a tensor of its own when a backend returned a view of a buffer it allocated
    (a squeezed GEMM result, a reshaped launcher output): autograd forbids in-place ops on a
    view created inside a custom Function (``y.mul_()``, ``nn.ReLU(inplace=True)`` would fail
    in backward). ``detach()`` gives the same storage without the view relation: no copy. The
    buffer is the backend's own, so nothing else sees the aliasing."""
    return y.detach() if y._base is not None else y


class _Glue:
    """One (op, backend) pair: its forward and its gradient rule, shared by the custom op
    and by :func:`function_for`."""

    def __init__(self, op: str, backend_name: str):
        impl = backends.load(backend_name)
        self.op, self.name = op, backend_name
        self.fwd = getattr(impl, f"{op}_forward")
        self.bwd = getattr(impl, f"{op}_backward")
        self.fake_fwd = getattr(impl, f"{op}_forward_fake", self.fwd)
        self.fake_bwd = getattr(impl, f"{op}_backward_fake", None)
        self.fallback_bwd = getattr(backends.load("torch"), f"{op}_backward")
        self.differentiable = getattr(impl, "DIFFERENTIABLE_BACKWARD", False)
        self.bwd_op = None  # set by custom_op for backends whose backward is a kernel

    def grads(self, g, x, bank, coeffs, styles, bias, d, y, needs, cfg_args, via_op: bool):
        """The 5 input gradients (None where not needed). ``via_op``: a kernel backward runs
        through its custom op (an opaque node for AOTAutograd), else it is called directly."""
        cfg = _cfg(self.op, cfg_args)
        if self.differentiable:
            return tuple(self.bwd(g, x, bank, coeffs, styles, bias, d, y, cfg, needs))
        if torch.is_grad_enabled():  # create_graph=True: the differentiable composite
            return tuple(self.fallback_bwd(g, x, bank, coeffs, styles, bias, d, y, cfg, needs))
        if not via_op:
            return tuple(self.bwd(g, x, bank, coeffs, styles, bias, d, y, cfg, needs))
        out = self.bwd_op(g, x, bank, coeffs, styles, bias, d, y, list(needs), *cfg_args)
        return tuple(t if n else None for t, n in zip(out, needs))


@functools.lru_cache(maxsize=None)
def _glue(op: str, backend_name: str) -> _Glue:
    """Register the custom op(s) for (op, backend) once; return their glue."""
    glue = _Glue(op, backend_name)
    extra = ops.get(op).schema_extra

    def _forward_with(f, x, bank, coeffs, styles, bias, *cfg_args):
        cfg = _cfg(op, cfg_args)
        if is_empty(op, x):  # the ops are public: an empty batch never reaches a backend (see run)
            return getattr(_reference, op)(x, bank, coeffs, styles, bias, cfg), x.new_empty(0)
        y, d = f(x, bank, coeffs, styles, bias, cfg)
        return _own(y), (x.new_empty(0) if d is None else d)

    def _empty_grads(new, x, bank, coeffs, styles, bias, needs):
        # an empty output: every gradient is a sum over no rows
        return tuple(new(t) if (n and t is not None) else x.new_empty(0)
                     for t, n in zip((x, bank, coeffs, styles, bias), needs))

    fwd_def = torch.library.custom_op(
        f"{_NS}::{op}_{backend_name}", functools.partial(_forward_with, glue.fwd), mutates_args=(),
        schema=f"({_SCHEMA_IN}{extra}) -> (Tensor, Tensor)")
    fwd_def.register_fake(functools.partial(_forward_with, glue.fake_fwd))

    if not glue.differentiable:
        def _backward(g, x, bank, coeffs, styles, bias, d, y, needs, *cfg_args):
            needs = check_needs(f"{op}_backward_{backend_name}", needs)
            if is_empty(op, x):
                return _empty_grads(torch.zeros_like, x, bank, coeffs, styles, bias, needs)
            grads = glue.bwd(g, x, bank, coeffs, styles, bias, d, y, _cfg(op, cfg_args), needs)
            return tuple(x.new_empty(0) if t is None else t for t in grads)

        def _backward_fake(g, x, bank, coeffs, styles, bias, d, y, needs, *cfg_args):
            needs = check_needs(f"{op}_backward_{backend_name}", needs)
            if is_empty(op, x):
                return _empty_grads(torch.empty_like, x, bank, coeffs, styles, bias, needs)
            if glue.fake_bwd is not None:
                grads = glue.fake_bwd(g, x, bank, coeffs, styles, bias, d, y, _cfg(op, cfg_args), needs)
                return tuple(x.new_empty(0) if t is None else t for t in grads)
            return tuple(t.new_empty(t.shape) if (n and t is not None) else x.new_empty(0)
                         for t, n in zip((x, bank, coeffs, styles, bias), needs))

        bwd_def = torch.library.custom_op(
            f"{_NS}::{op}_backward_{backend_name}", _backward, mutates_args=(),
            schema=(f"(Tensor g, Tensor x, Tensor bank, Tensor? coeffs, Tensor? styles, Tensor? bias, "
                    f"Tensor? d, Tensor? y, bool[] needs, bool demodulate, float eps{extra}) "
                    f"-> (Tensor, Tensor, Tensor, Tensor, Tensor)"))
        bwd_def.register_fake(_backward_fake)
        glue.bwd_op = bwd_def._opoverload

    def setup_context(ctx, inputs, output):
        x, bank, coeffs, styles, bias, *cfg_args = inputs
        y, d = output
        ctx.cfg_args = tuple(cfg_args)
        ctx.mark_non_differentiable(d)
        ctx.save_for_backward(*saved_for_backward((x, bank, coeffs, styles, bias), y, d, bool(cfg_args[0])))

    def backward(ctx, g, _gd):
        x, bank, coeffs, styles, bias, d, y = ctx.saved_tensors
        grads = glue.grads(g, x, bank, coeffs, styles, bias, d, y,
                           tuple(ctx.needs_input_grad[:5]), ctx.cfg_args, via_op=True)
        return (*grads, *([None] * len(ctx.cfg_args)))

    fwd_def.register_autograd(backward, setup_context=setup_context)
    glue.opoverload = fwd_def._opoverload
    # the op's decomposition, which ExportedProgram.run_decompositions() applies (it lowers every op
    # with a CompositeImplicitAutograd kernel): eager calls, torch.compile and export keep the op
    glue.opoverload.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(
        functools.partial(_decomposition, op, glue.opoverload))
    return glue


def dense(op: str, x, bank, coeffs, styles, bias, *cfg_args):
    """``(y, d)`` of ``op`` in dense PyTorch ops: the `torch` backend's forward (scale the input,
    one GEMM / conv against the weight or the stacked bank, scale the output; ``d`` from
    ``s^2 @ (W^2)^T``), whose plan, under symbolic sizes, depends on the static sizes only
    (:func:`modweights.backends.torch_backend._known`). The decomposition of every
    ``modweights::<op>_<backend>`` op, and what torch.jit tracing records (:func:`run`)."""
    y, d = getattr(backends.load("torch"), f"{op}_forward")(x, bank, coeffs, styles, bias, _cfg(op, cfg_args))
    return y, (x.new_empty(0) if d is None else d)


def _decomposition(op: str, opoverload, *args):
    """The ops' CompositeImplicitAutograd kernel (a Python one: eager calls never reach it).
    torch.compile's tracing would apply it too (AOTAutograd decomposes an op with such a kernel
    and no kernel for its device key), tracing the dense form in place of the backend's kernels:
    there, NotImplemented keeps the op (and Inductor gets a fallback for it,
    :func:`_inductor_fallback`). Under torch.export (run_decompositions, the ONNX exporter,
    AOTInductor) it is :func:`dense`."""
    if not torch.compiler.is_exporting():
        _inductor_fallback(opoverload)
        return NotImplemented
    return dense(op, *args)


def saved_for_backward(inputs: tuple, y, d, demodulate: bool) -> tuple:
    """What both autograd paths (the custom op's ``setup_context`` and the Function's) save for
    the backward, one rule: the five inputs ``(x, bank, coeffs, styles, bias)``, then ``d`` and
    ``y`` with demodulation (the backward recovers ``z = (y - bias) / d`` from them; never a
    per-sample weight), None for both without it (nothing of the output is kept alive)."""
    return (*inputs, d if demodulate else None, y if demodulate else None)


def custom_op(op: str, backend_name: str):
    """The custom op (an ``OpOverload``) that runs ``op`` (one of :func:`modweights.ops.kernel_ops`) on a
    non-DIRECT backend, registered on the first call. Returns ``(y, d)``."""
    return _glue(op, backend_name).opoverload


@functools.lru_cache(maxsize=None)
def function_for(op: str, backend_name: str, cfg) -> type[torch.autograd.Function]:
    """One autograd.Function class per (op, backend, config), with the same forward and
    gradients as the custom op; only tensors go through ``apply``."""
    glue = _glue(op, backend_name)
    cfg_args = _cfg_args(cfg)

    class ModGemm(torch.autograd.Function):
        # forward and setup_context apart (not forward(ctx, ...)): what torch.func (grad, jvp,
        # vmap) needs of a Function. ``d`` is a second output, marked non-differentiable, so
        # setup_context can save it; an empty tensor where the backend returns None.
        # vmap: a backend written in PyTorch ops (DIFFERENTIABLE_BACKWARD, as ``torch``) lets
        # functorch derive the rule by running forward and backward under vmap; a kernel
        # backend cannot, and says so (:meth:`vmap`).
        generate_vmap_rule = glue.differentiable

        @staticmethod
        def forward(x, bank, coeffs, styles, bias):
            y, d = glue.fwd(x, bank, coeffs, styles, bias, cfg)
            return _own(y), (x.new_empty(0) if d is None else d)

        @staticmethod
        def setup_context(ctx, inputs, output):
            y, d = output
            ctx.mark_non_differentiable(d)
            ctx.save_for_backward(*saved_for_backward(inputs, y, d, cfg.demodulate))
            ctx.save_for_forward(*inputs)

        @staticmethod
        def jvp(ctx, *tangents):
            # forward-mode AD (torch.func.jvp / jacfwd / hessian, autograd.forward_ad)
            return tangent(op, cfg, ctx.saved_tensors, tangents), None

        @staticmethod
        def backward(ctx, g, _gd):
            x, bank, coeffs, styles, bias, d, y = ctx.saved_tensors
            return glue.grads(g, x, bank, coeffs, styles, bias, d, y, tuple(ctx.needs_input_grad[:5]), cfg_args,
                              via_op=False)

    if not glue.differentiable:
        @staticmethod
        def vmap(info, in_dims, *args):
            raise RuntimeError(f"modweights: torch.func.vmap over a {op} on the {backend_name!r} backend is not "
                               "supported (its kernels take whole batches); use backend='torch', or fold the "
                               "vmapped dimension into the batch dimension B")

        ModGemm.vmap = vmap

    ModGemm.__name__ = ModGemm.__qualname__ = f"ModGemm_{op}_{backend_name}"
    return ModGemm


def tangent(op: str, cfg, primals, tangents):
    """The forward-mode tangent of ``y`` for the op's ``primals`` ``(x, bank, coeffs, styles,
    bias)`` and their ``tangents`` (None where an input has none), on any backend.

    ``y`` is a sum of products of the inputs (and, with demodulation, of ``rsqrt`` of a sum of
    squares), so its tangent is the same products with one factor replaced by its tangent: the
    ``torch`` backend's forward, written in differentiable PyTorch ops on any device, gives
    them through ``torch.func.jvp`` (the inputs without a tangent held constant). Cost: about
    two forwards of the ``torch`` backend, on top of the backend's own forward.
    """
    fwd = getattr(backends.load("torch"), f"{op}_forward")
    idx = [i for i, t in enumerate(tangents) if t is not None and primals[i] is not None]

    def f(*moving):
        args = list(primals)
        for i, t in zip(idx, moving):
            args[i] = t
        return fwd(*args, cfg)[0]

    if not idx:
        return None
    moving = tuple(primals[i] for i in idx)
    if torch._C._functorch.maybe_current_level() is not None:  # under torch.func (jvp, jacfwd, hessian)
        return torch.func.jvp(f, moving, tuple(tangents[i] for i in idx))[1]
    # torch.autograd.forward_ad: its dual level is open (it cannot nest, so torch.func.jvp
    # would refuse) and forward grad mode is off inside a Function's jvp; dual tensors of the
    # open level, with forward grad mode on for this computation, give the tangent
    from torch.autograd.forward_ad import _set_fwd_grad_enabled, make_dual, unpack_dual

    with _set_fwd_grad_enabled(True):
        y = f(*(make_dual(p.detach(), tangents[i]) for p, i in zip(moving, idx)))
        return unpack_dual(y).tangent


def _resolve_while_tracing(name: str, op: str, device: torch.device, problem: tuple) -> str:
    # Called once per trace with constant arguments; dynamo bakes the returned name in. The
    # registry imports modules and asks backends about the device, which dynamo cannot trace.
    impl = backends.resolve(name, op, device, **dict(problem))
    _LOADED[impl.NAME] = impl
    if not getattr(impl, "DIRECT", False):
        custom_op(op, impl.NAME)  # registered now, so the traced graph can name it
    return impl.NAME


def _inductor_fallback(opoverload) -> None:
    """Inductor runs the op as a fallback kernel (the backend's). Its decomposition table
    (core aten's, which collects every op with a CompositeImplicitAutograd kernel) holds our
    ops' export decomposition, which refuses outside torch.export (:func:`_decomposition`); an
    op both in that table and without a lowering fails Inductor's implicit fallback ("both a
    fallback and a decomp"), so the fallback is registered here, overriding the table, when the
    decomposition is asked for and Inductor is loaded (importing it costs seconds)."""
    import sys
    if "torch._inductor.lowering" not in sys.modules:
        return
    from torch._inductor import lowering
    if opoverload in lowering.lowerings:
        return
    from torch._library.utils import get_layout_constraint_tag
    lowering.make_fallback(opoverload, warn=False, override_decomp=True,
                           layout_constraint=lowering.tag_to_layout_constraint(
                               get_layout_constraint_tag(opoverload, with_default=True)))


# Equivalent to decorating with torch.compiler.assume_constant_result, which only sets this
# attribute but imports torch._dynamo (~3 s) to do so; importing modweights must stay cheap.
# tests/test_compile.py checks that the decorator still sets exactly this attribute.
_resolve_while_tracing._dynamo_marked_constant = True


def _constant(v):
    # A size that is symbolic (a dynamic batch or sequence length, mark_dynamic, or a bank
    # passed as an input under dynamic shapes) cannot be a trace-time constant: the backend's
    # supports() and auto's shape class see None for it. Dynamo reports a SymInt as an int to
    # isinstance(), so the test is has_static_value, which dynamo evaluates without a guard
    # (imported here: symbolic_shapes costs ~0.3 s to import, and dynamo has loaded it by now).
    from torch.fx.experimental.symbolic_shapes import has_static_value

    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) and not has_static_value(v):
        return None
    if isinstance(v, (tuple, list)):
        return tuple(_constant(e) for e in v)
    return v


def resolve(backend, op: str, device: torch.device, **problem):
    """The backend module that runs ``op``: :func:`modweights.backends.resolve`, and under
    ``torch.compile`` the same choice made once at trace time."""
    if not torch.compiler.is_compiling():
        return backends.resolve(backend, op, device, **problem)
    # requested() is traceable: dynamo guards on the use_backend context it reads
    problem = tuple(sorted((k, _constant(v)) for k, v in problem.items()))
    name = _resolve_while_tracing(backends.requested(backend), op, device, problem)
    return _LOADED[name]


def is_empty(op: str, x) -> bool:
    """Whether the output of ``op`` on canonical ``x`` has no element (the op spec's rule:
    ``B = 0``, or ``T = 0`` for linear; the checks keep the other output sizes >= 1)."""
    return ops.get(op).is_empty(x)


def _bias_term(op: str, coeffs, bias):
    """The bias broadcastable to the op's canonical output (the op spec's ``bias_view``)."""
    if bias.dim() == 2:  # (K, O): mixed like the weights, or the one row without coefficients
        b = bias[0] if coeffs is None else coeffs @ bias  # (O,) | (B, O) | (B, T, O)
    else:
        b = bias
    return ops.get(op).bias_view(b)


def _tracks_grad(*tensors) -> bool:
    """Whether autograd records this call (a backward may follow)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run(op: str, impl, x, bank, coeffs, styles, bias, cfg):
    """Run ``op`` on backend module ``impl`` with canonical, checked inputs; returns ``y``.

    An empty problem (:func:`is_empty`) runs on the ``reference`` backend whatever ``impl`` is:
    there is nothing to compute, and the fast backends' kernels and plans are written for at least
    one row (a sample split of a batch of 0, views of 0 elements, launch grids of 0). The
    reference's PyTorch ops give the empty output, and autograd zero gradients for every input
    (double backward and ``torch.compile`` too), as ``F.linear`` / ``F.conv2d`` do. ``impl`` was
    resolved first, so asking for an unavailable backend is still the error it always is.

    Demodulation when autograd records the call (docs/numerics.md): the op runs without the bias
    and the bias is added here (differentiably), in every dtype. The backward recovers
    ``z = (y - bias) / d`` from the output it saved; with ``|bias| >> |d z|`` the rounding of
    ``y`` (``eps * |bias|``) would cancel into ``z`` (bias 30 with ``|y - bias|`` ~ 1e-3 loses
    ~3 digits in float32; bfloat16 ~12 % per element), so the op saves its bias-free output
    instead: whether it cancels depends on the numbers, not on the dtype. The saved output is
    then never the tensor returned, so in-place ops on the result (``nn.ReLU(inplace=True)``)
    leave the backward intact; without a bias the result is a copy of the saved output for the
    same reason. Cost, in this case only: one output-sized elementwise pass (the bias add or
    the copy) and one more output-sized tensor kept for the backward. Without autograd
    (inference) the bias stays in the fused epilogue and nothing is copied.
    """
    if is_empty(op, x):
        impl = _reference
    if getattr(impl, "DIRECT", False):
        return getattr(impl, op)(x, bank, coeffs, styles, bias, cfg)
    if cfg.demodulate and _tracks_grad(x, bank, coeffs, styles, bias):
        y = _call(op, impl, x, bank, coeffs, styles, None, cfg)
        return y.clone() if bias is None else y + _bias_term(op, coeffs, bias)
    return _call(op, impl, x, bank, coeffs, styles, bias, cfg)


def _call(op: str, impl, x, bank, coeffs, styles, bias, cfg):
    """``y`` of ``op`` on the non-DIRECT backend ``impl``: the custom op or the Function."""
    if torch.jit.is_tracing():
        # torch.jit.trace (and the TorchScript ONNX exporter) records aten ops, not a custom op
        # or an autograd.Function's Python: trace the dense form, which reads no batch size
        return dense(op, x, bank, coeffs, styles, bias, *_cfg_args(cfg))[0]
    if torch.compiler.is_compiling():
        # the custom op: one opaque node with a fake implementation, traceable by dynamo
        # (registered by _resolve_while_tracing, so looked up by name, not by a cached call)
        opfn = getattr(getattr(torch.ops.modweights, f"{op}_{impl.NAME}"), "default")
        return opfn(x, bank, coeffs, styles, bias, *_cfg_args(cfg))[0]
    # eager: the autograd.Function over the same glue; a custom op's Python dispatch costs
    # about twice the Function's per call, which small problems feel
    return function_for(op, impl.NAME, cfg).apply(x, bank, coeffs, styles, bias)[0]


# the spec of each config class, for the Function path's schema arguments
_SPEC_OF_CONFIG = {s.config: s for s in ops.SPECS.values() if s.lowers_to is None}

# Registered at import, not on first use: a program saved by torch.export (or an AOTInductor
# package) names these ops, and loads in a fresh process once modweights is imported. The
# `triton` backend's ops register when that backend is first loaded (it imports Triton, ~0.2 s).
for _op in backends.OPS:
    for _name in ("torch", "cuda"):
        _glue(_op, _name)

__all__ = ["custom_op", "function_for", "is_empty", "resolve", "run", "ModLinearConfig", "ModConv2dConfig"]
