"""The `triton` backend's conv2d pieces (wired into :mod:`modweights.backends.triton`).

Provides what the backend contract asks of a backend for ``conv2d``:

``supports_mod_conv2d(**problem) -> (bool, reason)``
    groups == 1 and depthwise (groups == in_channels == out_channels); float16, bfloat16,
    float32. Other groups: not implemented (``auto`` then takes the torch backend).
``mod_conv2d_forward(x, bank, coeffs, styles, bias, cfg) -> (y, d or None)``
``mod_conv2d_backward(g, x, bank, coeffs, styles, bias, d, y, cfg, needs) -> 5 grads (None where not needed)``
``mod_conv2d_forward_fake``, ``mod_conv2d_backward_fake``
    the same results for fake tensors (the glue's custom ops' fake implementations).

The kernels (implicit GEMM; styles in the input-tile load, the bank mixture in the
filter-tile load, demodulation in the epilogue; a one-pass weight-side backward producing
dW_k, ds_b and dalpha_b) and their launchers live in ``modweights.triton_kernels.mod_conv2d``;
the functions here call the launchers directly. ``torch.compile`` sees them through the shared
glue's custom ops (``torch.ops.modweights.mod_conv2d_triton`` and ``mod_conv2d_backward_triton``, see
:mod:`modweights._autograd`), whose implementations dynamo does not trace;
:func:`mod_conv2d_forward_fake` is the forward op's fake implementation.

``d`` is float32 ``(B, O)`` (None without demodulation); the launcher returns an empty tensor
for each gradient not asked for and :func:`mod_conv2d_backward` turns it into None. Double
backward is the shared glue's business: under ``create_graph=True`` it runs the torch
backend's differentiable backward instead of these kernels.
"""
from __future__ import annotations

import torch

from ..._checks import ModConv2dConfig, conv2d_out_hw

try:  # triton is optional: without it the backend reports itself unavailable
    from ...triton_kernels import mod_conv2d as _MC
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _MC = None
    _IMPORT_ERROR = e

__all__ = ["supports_mod_conv2d", "mod_conv2d_forward", "mod_conv2d_backward", "mod_conv2d_forward_fake",
           "mod_conv2d_backward_fake"]


def supports_mod_conv2d(**problem) -> tuple[bool, str]:
    """Whether the triton conv2d kernels implement ``problem`` (the registry's keys: ``dtype``,
    ``groups``, ``kernel_size``, ``in_channels``, ``out_channels``), and why not."""
    if _MC is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    return _MC.supports(**problem)


def _out_shape(x, bank, stride, padding, dilation):
    B, _, H, W = x.shape
    O, kh, kw = bank.shape[1], bank.shape[3], bank.shape[4]
    return (B, O, *conv2d_out_hw(H, W, kh, kw, stride, padding, dilation))


def _geo(cfg: ModConv2dConfig):
    return tuple(cfg.stride), tuple(cfg.padding), tuple(cfg.dilation), cfg.groups


def mod_conv2d_forward(x, bank, coeffs, styles, bias, cfg: ModConv2dConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, O, HO, WO), d (B, O) float32 or None)."""
    y, d = _MC.forward(x, bank, coeffs, styles, bias, cfg.demodulate, cfg.eps, *_geo(cfg))
    return y, (d if cfg.demodulate else None)


def mod_conv2d_forward_fake(x, bank, coeffs, styles, bias, cfg: ModConv2dConfig):
    """Shapes of :func:`mod_conv2d_forward` for fake tensors (no launch)."""
    y = _MC.new_output(x, _out_shape(x, bank, cfg.stride, cfg.padding, cfg.dilation))
    d = x.new_empty((x.shape[0], bank.shape[1]), dtype=torch.float32) if cfg.demodulate else None
    return y, d


def mod_conv2d_backward_fake(g, x, bank, coeffs, styles, bias, d, y, cfg: ModConv2dConfig, needs):
    """Shapes and layouts of :func:`mod_conv2d_backward` for fake tensors (no launch): ``dx`` in x's
    memory format, like the launcher's."""
    dx = _MC.new_output(x, tuple(x.shape)) if needs[0] else None
    rest = tuple(t.new_empty(t.shape) if (n and t is not None) else None
                 for t, n in zip((bank, coeffs, styles, bias), needs[1:]))
    return (dx, *rest)


def mod_conv2d_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: ModConv2dConfig, needs):
    """(dx, dbank, dcoeffs, dstyles, dbias), None for each gradient not in ``needs``."""
    BO = (x.shape[0], bank.shape[1])
    if not cfg.demodulate or (d is not None and d.numel() == 0):
        d = None  # (the glue may hand over an empty tensor for "none")
    elif d is not None and (d.dtype != torch.float32 or tuple(d.shape) != BO):  # ours is float32 (B, O)
        d = d.to(torch.float32).expand(BO).contiguous()
    grads = _MC.backward(g, x, bank, coeffs, styles, bias, d, y if cfg.demodulate else None, cfg.demodulate,
                         cfg.eps, *_geo(cfg), needs)
    present = (True, True, coeffs is not None, styles is not None, bias is not None)
    return tuple(gr if (n and p) else None for gr, n, p in zip(grads, needs, present))
