"""The `triton` backend: fused Triton kernels for ``mod_linear`` and ``mod_conv2d``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter: slow, for tests). The kernels and their launchers live in
:mod:`modweights.triton_kernels.mod_linear`; this module registers them as PyTorch custom
ops, so that ``torch.compile(fullgraph=True)`` traces through the shared autograd glue
(:mod:`modweights._autograd`) without breaking the graph:

``torch.ops.modweights.triton_mod_linear_fwd(x, bank, coeffs?, styles?, bias?, demodulate, eps) -> (y, d)``
``torch.ops.modweights.triton_mod_linear_bwd(g, x, bank, coeffs?, styles?, bias?, d, y?, demodulate, eps, needs) -> 5 grads``

Each gradient not asked for (``needs``) comes back as an empty tensor (custom ops cannot
return None); :func:`linear_backward` turns those into None.

Formulations (details and FLOP counts in ``triton_kernels/mod_linear.py``):

* per sample: styles folded into the A-tile (x) load, the K-bank mixture into the B-tile
  (weight) load (or stacked across samples when rows per sample are few), demodulation
  and bias in the epilogue; backward: a pre-pass for ``dd_b``/``dbias``, a dx kernel, and one
  fused weight kernel producing dW_k for every k, ds_b and dalpha_b in one pass over (g, x).
* per token: the stacked formulation (coefficients folded into the A tile against the bank
  as ``(O, K*I)``), row norms from squared operands in the same kernel; K dense GEMMs.

Nothing of size ``B x O x I`` is ever allocated. Reductions across programs are atomic-free
and reduced in a fixed order when ``torch.are_deterministic_algorithms_enabled()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import LinearConfig
from ._triton_conv2d import conv2d_backward, conv2d_forward, conv2d_forward_fake, supports_conv2d  # noqa: F401

NAME = "triton"
DIRECT = False
DIFFERENTIABLE_BACKWARD = False

try:  # triton is an optional dependency: without it this backend reports itself unavailable
    from ..triton_kernels import mod_linear as _ML
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _ML = None
    _IMPORT_ERROR = e


def availability(device) -> tuple[bool, str]:
    """(available, reason) for tensors on ``device``."""
    if _ML is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "needs a CUDA device or TRITON_INTERPRET=1; no CUDA device is available"
        if _ML.INTERPRETED:
            return False, ("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 when "
                           "modweights' triton backend was imported): they take CPU tensors only")
        return True, "fused Triton kernels on CUDA"
    if device.type == "cpu" and _ML.INTERPRETED:
        return True, "TRITON_INTERPRET=1: the Triton kernels run on CPU tensors under the interpreter (slow; for tests)"
    return False, "needs a CUDA device or TRITON_INTERPRET=1"


def supports(op: str, **problem) -> tuple[bool, str]:
    if op == "linear":
        dtype = problem.get("dtype")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"the triton kernels take float16, bfloat16 or float32 inputs; got {dtype}"
        return True, ""
    if op == "conv2d":
        return supports_conv2d(**problem)
    return False, f"unknown op {op!r}"


# ----------------------------------------------------------------------------- custom ops

if _ML is not None:

    @torch.library.custom_op("modweights::triton_mod_linear_fwd", mutates_args=())
    def _linear_fwd_op(x: torch.Tensor, bank: torch.Tensor, coeffs: Optional[torch.Tensor],
                       styles: Optional[torch.Tensor], bias: Optional[torch.Tensor], demodulate: bool,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (B, T, O), d float32) of mod_linear; see triton_kernels.mod_linear.forward."""
        return _ML.forward(x, bank, coeffs, styles, bias, demodulate, eps)

    @_linear_fwd_op.register_fake
    def _(x, bank, coeffs, styles, bias, demodulate, eps):
        B, T, _ = x.shape
        O = bank.shape[1]
        dshape = _ML.d_shape(x.shape, bank.shape, 0 if coeffs is None else coeffs.dim(),
                             0 if styles is None else styles.dim(), demodulate)
        return x.new_empty((B, T, O)), x.new_empty(dshape, dtype=torch.float32)

    @torch.library.custom_op("modweights::triton_mod_linear_bwd", mutates_args=())
    def _linear_bwd_op(g: torch.Tensor, x: torch.Tensor, bank: torch.Tensor, coeffs: Optional[torch.Tensor],
                       styles: Optional[torch.Tensor], bias: Optional[torch.Tensor], d: torch.Tensor,
                       y: Optional[torch.Tensor], demodulate: bool, eps: float,
                       needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
        """(dx, dbank, dcoeffs, dstyles, dbias); an empty tensor for each gradient not needed."""
        return _ML.backward(g, x, bank, coeffs, styles, bias, d, y, demodulate, eps, needs)

    @_linear_bwd_op.register_fake
    def _(g, x, bank, coeffs, styles, bias, d, y, demodulate, eps, needs):
        def like(t, need):
            if t is None or not need:
                return x.new_empty((0,))
            return t.new_empty(t.shape)
        return tuple(like(t, n) for t, n in zip((x, bank, coeffs, styles, bias), needs))


def _need(needs):
    if len(needs) != 5:
        raise ValueError(f"linear_backward: `needs` must hold 5 bools (x, bank, coeffs, styles, bias); got {needs!r}")
    return [bool(n) for n in needs]


def linear_forward(x, bank, coeffs, styles, bias, cfg: LinearConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, T, O), d float32: empty without demodulation)."""
    return torch.ops.modweights.triton_mod_linear_fwd(x, bank, coeffs, styles, bias, cfg.demodulate, cfg.eps)


def linear_forward_fake(x, bank, coeffs, styles, bias, cfg: LinearConfig):
    """Shapes of :func:`linear_forward`'s results without running it (fake tensors)."""
    B, T, _ = x.shape
    dshape = _ML.d_shape(x.shape, bank.shape, 0 if coeffs is None else coeffs.dim(),
                         0 if styles is None else styles.dim(), cfg.demodulate)
    return x.new_empty((B, T, bank.shape[1])), x.new_empty(dshape, dtype=torch.float32)


def linear_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: LinearConfig, needs):
    """(dx, dbank, dcoeffs, dstyles, dbias), None for each gradient not in ``needs``."""
    needs = _need(needs)
    grads = torch.ops.modweights.triton_mod_linear_bwd(g, x, bank, coeffs, styles, bias, d,
                                                       y if cfg.demodulate else None, cfg.demodulate,
                                                       cfg.eps, needs)
    present = (True, True, coeffs is not None, styles is not None, bias is not None)
    return tuple(gr if (n and p) else None for gr, n, p in zip(grads, needs, present))

