"""The `triton` backend's mod_linear (wired into :mod:`modweights.backends.triton`): what the
backend contract asks of a backend for ``mod_linear``, calling the launchers of
:mod:`modweights.triton_kernels.mod_linear` directly (the formulations: the package's docstring)."""
from __future__ import annotations

import torch

from ..._checks import ModLinearConfig

try:  # triton is optional: without it the backend reports itself unavailable (the package)
    from ...triton_kernels import mod_linear as _ML
    from ...triton_kernels import mod_linear_layout as _MLL  # d_shape
except ImportError:  # pragma: no cover - depends on the environment
    _ML = _MLL = None

__all__ = ["supports_mod_linear", "mod_linear_forward", "mod_linear_forward_fake", "mod_linear_backward"]


def supports_mod_linear(**problem) -> tuple[bool, str]:
    dtype = problem.get("dtype")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"the triton kernels take float16, bfloat16 or float32 inputs; got {dtype}"
    return True, ""


def mod_linear_forward(x, bank, coeffs, styles, bias, cfg: ModLinearConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, T, O), d float32: empty without demodulation)."""
    return _ML.forward(x, bank, coeffs, styles, bias, cfg.demodulate, cfg.eps)


def mod_linear_forward_fake(x, bank, coeffs, styles, bias, cfg: ModLinearConfig):
    """Shapes of :func:`mod_linear_forward`'s results without running it (fake tensors)."""
    B, T, _ = x.shape
    dshape = _MLL.d_shape(x.shape, bank.shape, 0 if coeffs is None else coeffs.dim(),
                          0 if styles is None else styles.dim(), cfg.demodulate)
    return x.new_empty((B, T, bank.shape[1])), x.new_empty(dshape, dtype=torch.float32)


def mod_linear_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: ModLinearConfig, needs):
    """(dx, dbank, dcoeffs, dstyles, dbias), None for each gradient not in ``needs``."""
    grads = _ML.backward(g, x, bank, coeffs, styles, bias, d, y if cfg.demodulate else None, cfg.demodulate,
                         cfg.eps, needs)
    present = (True, True, coeffs is not None, styles is not None, bias is not None)
    return tuple(gr if (n and p) else None for gr, n, p in zip(grads, needs, present))

