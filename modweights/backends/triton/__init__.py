"""The `triton` backend: fused Triton kernels for ``mod_linear`` and ``mod_conv2d``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter: slow, for tests). The kernels and their launchers live in
:mod:`modweights.triton_kernels.mod_linear` (and ``mod_conv2d``); one module per op here
(:mod:`.mod_linear`, :mod:`.mod_conv2d`) calls the launchers directly, like the ``cuda``
backend; this one holds what the backend contract asks of the backend as a whole
(availability, ``supports``, the autotuning bound). ``torch.compile`` sees them through the shared
glue's custom ops (``torch.ops.modweights.mod_linear_triton`` and ``mod_linear_backward_triton``, see
:mod:`modweights._autograd`): a custom op's implementation is opaque to dynamo, so the
launchers and their autotuners are never traced, and the op's fake implementation is
:func:`.mod_linear.mod_linear_forward_fake`.

The launchers return an empty tensor for each gradient not asked for (``needs``);
:func:`mod_linear_backward` turns those into None.

Formulations (details and FLOP counts in ``triton_kernels/mod_linear_layout.py``):

* per sample: styles folded into the A-tile (x) load, the K-bank mixture into the B-tile
  (weight) load (or stacked across samples when rows per sample are few), demodulation
  and bias in the epilogue; backward: a pre-pass for ``dd_b``/``dbias``, a dx kernel, and one
  fused weight kernel producing dW_k for every k, ds_b and dalpha_b in one pass over (g, x).
* per token: the stacked formulation (coefficients folded into the A tile against the bank
  as ``(O, K*I)``), row norms from squared operands in the same kernel; K dense GEMMs.

Nothing of size ``B x O x I`` is ever allocated. Reductions across programs (ds, da, dW over
sample splits): with ``torch.are_deterministic_algorithms_enabled()`` each program adds, with
``tl.atomic_add``, into its own slice of a partial buffer (one writer per slice: no contention,
no order dependence) and the launcher sums the slices in a fixed order; otherwise they add
into one shared float32 buffer (order-dependent rounding). The conv2d kernels use no atomics.
"""
from __future__ import annotations

import os
import sys

import torch

from .. import supports_of
# one module per op (the backend contract's functions of each op, re-exported here)
from .mod_conv2d import (  # noqa: F401
    mod_conv2d_backward, mod_conv2d_backward_fake, mod_conv2d_forward, mod_conv2d_forward_fake, supports_mod_conv2d)
from .mod_linear import (  # noqa: F401
    mod_linear_backward, mod_linear_forward, mod_linear_forward_fake, supports_mod_linear)

NAME = "triton"
DIRECT = False
DIFFERENTIABLE_BACKWARD = False

try:  # triton is an optional dependency: without it this backend reports itself unavailable
    from ...triton_kernels import mod_linear_launch as _MLA  # INTERPRETED and the autotuned kernels
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _MLA = None
    _IMPORT_ERROR = e


#: ``MODWEIGHTS_TRITON_AUTOTUNE_MAX=N``: autotune over at most the first N candidates of each
#: kernel's list (the GPU check's bench stage bounds its compile time with it); unset: all
AUTOTUNE_MAX_ENV = "MODWEIGHTS_TRITON_AUTOTUNE_MAX"


def bound_autotune(n: int) -> int:
    """Keep the first ``n`` candidate configurations of every autotuned kernel (linear and
    conv2d); returns how many autotuners were shortened. Changes nothing under the interpreter."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"bound_autotune: n must be a positive integer; got {n!r}")
    if _MLA is None:
        return 0
    from ...triton_kernels import _launch  # both ops' launchers registered their kernels (imported above)

    changed = 0
    for k in _launch.tuned_kernels():
        v = k.tuned
        if v is not None and len(v.configs) > n:
            v.configs = v.configs[:n]
            v.cache.clear()
            changed += 1
    return changed


def _bound_from_env() -> None:
    text = os.environ.get(AUTOTUNE_MAX_ENV, "")
    if not text or _MLA is None:
        return
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{AUTOTUNE_MAX_ENV} must be a positive integer; got {text!r}")
    bound_autotune(n)


_bound_from_env()


def availability(device) -> tuple[bool, str]:
    """(available, reason) for tensors on ``device``."""
    if _MLA is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "needs a CUDA device or TRITON_INTERPRET=1; no CUDA device is available"
        if _MLA.INTERPRETED:
            return False, ("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 when "
                           "modweights' triton backend was imported): they take CPU tensors only")
        return True, "fused Triton kernels on CUDA"
    if device.type == "cpu" and _MLA.INTERPRETED:
        return True, "TRITON_INTERPRET=1: the Triton kernels run on CPU tensors under the interpreter (slow; for tests)"
    return False, "needs a CUDA device or TRITON_INTERPRET=1"


def supports(op: str, **problem) -> tuple[bool, str]:
    return supports_of(sys.modules[__name__], op, problem)
