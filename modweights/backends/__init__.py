"""Backend registry: which implementation runs an op.

Names: ``reference`` (oracle, forms every weight), ``torch`` (pure PyTorch, closed-form
backward, the CPU default), ``triton`` (fused kernels; CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``cuda`` (the compiled extension), and ``auto``.

Selection order: the ``backend=`` argument, then the innermost :func:`use_backend`
context, then the ``MODWEIGHTS_BACKEND`` environment variable, then ``auto``. A name that
is not one of the above is a ``ValueError``; a backend that is unavailable for the tensors'
device, or that does not implement the op asked for, is a ``RuntimeError`` saying why.
There is no silent fallback: only ``auto`` chooses. Meta tensors are the exception that
computes nothing: any backend name infers shapes through the ``torch`` backend's ops (the
``reference``'s for ``reference``), so models can be built and traced on the meta device.

``auto``: ``torch``, except on a CUDA device where an entry of the auto table for this
device, op, shape class and dtype (:func:`modweights.backends.auto_table.lookup`: the
``MODWEIGHTS_AUTO_TABLE`` file, then the packaged table) says a fused backend was measured
to beat ``torch``, and that backend is available and supports the problem. No kernel runs by
default where it was never measured to win. :func:`auto_choice` says which backend ``auto``
takes for a call and why (``modweights verify`` and ``modweights bench`` print it).

A backend module provides ``NAME``, ``availability(device) -> (bool, reason)``,
``supports(op, **problem) -> (bool, reason)`` and either ``DIRECT = True`` with
``mod_linear``/``mod_conv2d`` (differentiable as written) or the four explicit pieces
``mod_linear_forward``, ``mod_linear_backward``, ``mod_conv2d_forward``, ``mod_conv2d_backward``
that the shared autograd glue in ``modweights._autograd`` wraps.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import NamedTuple

import torch

NAMES = ("reference", "torch", "triton", "cuda")
#: the ops a backend runs, named by their stem (``functional.mod_linear`` / ``mod_conv2d``)
OPS = ("mod_linear", "mod_conv2d")
_CHOICES = NAMES + ("auto",)
_MODULES = {
    "reference": "modweights.backends.reference",
    "torch": "modweights.backends.torch_backend",
    "triton": "modweights.backends.triton",
    "cuda": "modweights.backends.cuda",
}
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("modweights_backend", default=None)
# Dynamo before torch 2.14 cannot trace ContextVar.get (torch 2.11 refuses it under
# fullgraph). There, a traced call reads this process-wide mirror of the innermost context
# instead: a module global, so Dynamo guards on it and a change of context recompiles. The
# mirror is not per thread: under torch.compile on torch < 2.14, threads that use different
# use_backend contexts at the same time may see each other's (docs/versions.md, Known).
_CONTEXTVAR_TRACEABLE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
_current_mirror: str | None = None


class BackendStatus(NamedTuple):
    """Whether a backend can run on a device, and why (not)."""

    available: bool
    reason: str


def check_name(name) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"unknown modweights backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def check_op(op) -> str:
    """``op`` if it names one of :data:`OPS`, else a ValueError naming them (the key was once
    ``linear`` / ``conv2d``: an old spelling is refused, not resolved as an op no table knows)."""
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"unknown modweights op {op!r}; choose one of {', '.join(OPS)}")
    return op


def load(name: str):
    """The backend module, or raise RuntimeError if this build has none."""
    check_name(name)
    if name == "auto":
        raise ValueError("'auto' is a policy, not a backend module")
    try:
        return importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == _MODULES[name]:
            raise RuntimeError(f"the {name!r} backend is not part of this version of modweights") from None
        raise


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def status(name: str, device=None) -> BackendStatus:
    """Availability of one backend for tensors on ``device`` (default: cuda if present, else cpu)."""
    device = torch.device(device) if device is not None else _default_device()
    try:
        mod = load(name)
    except RuntimeError as e:
        return BackendStatus(False, str(e))
    ok, reason = mod.availability(device)
    return BackendStatus(bool(ok), reason)


def available_backends(device=None) -> dict[str, BackendStatus]:
    """Map each backend name to ``BackendStatus(available, reason)`` for ``device``."""
    return {name: status(name, device) for name in NAMES}


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (unless an op's
    ``backend=`` argument says otherwise)."""
    global _current_mirror
    check_name(name)
    token, outer = _current.set(name), _current_mirror
    _current_mirror = name
    try:
        yield
    finally:
        _current.reset(token)
        _current_mirror = outer


def requested(backend=None) -> str:
    """The backend name in force for a call: argument, context, environment, then 'auto'."""
    if backend is not None:
        return check_name(backend)
    if not _CONTEXTVAR_TRACEABLE and torch.compiler.is_compiling():
        ctx = _current_mirror
    else:
        ctx = _current.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("MODWEIGHTS_BACKEND", "").strip()  # " torch " from a shell script is "torch"
    if env:
        try:
            return check_name(env)
        except ValueError as e:
            raise ValueError(f"MODWEIGHTS_BACKEND: {e}") from None
    return "auto"


def auto_choice(op: str, device, problem: dict) -> tuple[str, str]:
    """The backend ``auto`` runs ``op`` on for tensors on ``device``, and why.

    Args:
        op: ``"mod_linear"`` or ``"mod_conv2d"``.
        device: the tensors' device.
        problem: the keywords :func:`resolve` receives (``dtype``, ``rows``, ``per_token``, ...).

    Returns:
        ``(name, reason)``: ``name`` is ``"torch"`` unless a measurement in the auto table
        says another backend wins here and that backend can run the problem.
    """
    check_op(op)
    device = torch.device(device)
    if device.type != "cuda":
        return "torch", (f"{device.type} tensors: the torch backend (the fused kernels run off CUDA only "
                         "under the Triton interpreter, a test tool)")
    from .auto_table import lookup

    entry, key = lookup(op, device, problem)
    if entry is None:
        return "torch", f"no measurement says a fused backend wins: {key}"
    best, m = entry["backend"], entry["measured"]
    times = {k[:-3]: v for k, v in m.items() if k.endswith("_ms") and isinstance(v, (int, float))}
    said = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
    where = f"{m.get('workload', '?')}, {m.get('pass', '?')}, {m.get('date', '?')}"
    if best == "torch":
        return "torch", f"measured fastest for {key}: {said} ({where})"
    st = status(best, device)
    if not st.available:
        return "torch", f"the table's {best} (measured fastest for {key}) is unavailable: {st.reason}"
    ok, reason = load(best).supports(op, **problem)
    if not ok:
        return "torch", f"the table's {best} (measured fastest for {key}) cannot run this {op}: {reason}"
    return best, f"measured fastest for {key}: {said} ({where})"


def _auto(op: str, device: torch.device, problem: dict):
    return load(auto_choice(op, device, problem)[0])


def resolve(backend, op: str, device: torch.device, **problem):
    """The backend module that runs ``op`` ('mod_linear' or 'mod_conv2d') for tensors on ``device``."""
    check_op(op)
    name = requested(backend)
    if device.type == "meta":
        # Meta tensors carry shapes only and no kernel runs, so no backend's availability
        # matters: every op infers its shapes through PyTorch ops (the reference's when asked for,
        # else the torch backend's, whose outputs have the shapes of every backend's).
        return load("reference" if name == "reference" else "torch")
    if name == "auto":
        return _auto(op, device, problem)
    st = status(name, device)
    if not st.available:
        raise RuntimeError(f"modweights backend {name!r} is not available for {device} tensors: {st.reason}")
    mod = load(name)
    ok, reason = mod.supports(op, **problem)
    if not ok:
        raise RuntimeError(f"modweights backend {name!r} cannot run this {op}: {reason}")
    return mod
