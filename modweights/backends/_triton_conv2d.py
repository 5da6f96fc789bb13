"""The `triton` backend's conv2d pieces (wired into :mod:`modweights.backends.triton`).

Provides what the backend contract asks of a backend for ``conv2d``:

``supports_conv2d(**problem) -> (bool, reason)``
    groups == 1 and depthwise (groups == in_channels == out_channels); float16, bfloat16,
    float32. Other groups: not implemented (``auto`` then takes the torch backend).
``conv2d_forward(x, bank, coeffs, styles, bias, cfg) -> (y, d or None)``
``conv2d_backward(g, x, bank, coeffs, styles, bias, d, y, cfg, needs) -> 5 grads (None where not needed)``

The kernels (implicit GEMM; styles in the input-tile load, the bank mixture in the
filter-tile load, demodulation in the epilogue; a one-pass weight-side backward producing
dW_k, ds_b and dalpha_b) live in ``modweights.triton_kernels.mod_conv2d`` and are
registered here as PyTorch custom ops, so ``torch.compile`` sees one opaque node each::

    torch.ops.modweights.triton_mod_conv2d_fwd(x, bank, coeffs?, styles?, bias?, demodulate, eps,
                                               stride, padding, dilation, groups) -> (y, d)
    torch.ops.modweights.triton_mod_conv2d_bwd(g, x, bank, coeffs?, styles?, bias?, d?, y?, demodulate,
                                               eps, stride, padding, dilation, groups, needs) -> 5 grads

``d`` is float32 ``(B, O)`` (empty without demodulation); each gradient not asked for comes
back empty (custom ops cannot return None) and :func:`conv2d_backward` turns it into None.
Double backward is the shared glue's business: under ``create_graph=True`` it runs the
torch backend's differentiable backward instead of these kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import Conv2dConfig

try:  # triton is optional: without it the backend reports itself unavailable
    from ..triton_kernels import mod_conv2d as _MC
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _MC = None
    _IMPORT_ERROR = e

__all__ = ["supports_conv2d", "conv2d_forward", "conv2d_backward", "conv2d_forward_fake"]


def supports_conv2d(**problem) -> tuple[bool, str]:
    """Whether the triton conv2d kernels implement ``problem`` (the registry's keys: ``dtype``,
    ``groups``, ``kernel_size``, ``in_channels``, ``out_channels``), and why not."""
    if _MC is None:
        return False, f"triton is not importable ({_IMPORT_ERROR})"
    return _MC.supports(**problem)


def _out_shape(x, bank, stride, padding, dilation):
    B, _, H, W = x.shape
    O, kh, kw = bank.shape[1], bank.shape[3], bank.shape[4]
    return (B, O, *_MC.out_size(H, W, kh, kw, stride, padding, dilation))


if _MC is not None:

    @torch.library.custom_op("modweights::triton_mod_conv2d_fwd", mutates_args=())
    def _conv2d_fwd_op(x: torch.Tensor, bank: torch.Tensor, coeffs: Optional[torch.Tensor],
                       styles: Optional[torch.Tensor], bias: Optional[torch.Tensor], demodulate: bool, eps: float,
                       stride: list[int], padding: list[int], dilation: list[int],
                       groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (B, O, HO, WO), d (B, O) float32 or empty); see triton_kernels.mod_conv2d.forward."""
        return _MC.forward(x, bank, coeffs, styles, bias, demodulate, eps, tuple(stride), tuple(padding),
                           tuple(dilation), groups)

    @_conv2d_fwd_op.register_fake
    def _(x, bank, coeffs, styles, bias, demodulate, eps, stride, padding, dilation, groups):
        y = _MC.new_output(x, _out_shape(x, bank, stride, padding, dilation))
        d = x.new_empty((x.shape[0], bank.shape[1]) if demodulate else (0,), dtype=torch.float32)
        return y, d

    @torch.library.custom_op("modweights::triton_mod_conv2d_bwd", mutates_args=())
    def _conv2d_bwd_op(g: torch.Tensor, x: torch.Tensor, bank: torch.Tensor, coeffs: Optional[torch.Tensor],
                       styles: Optional[torch.Tensor], bias: Optional[torch.Tensor], d: Optional[torch.Tensor],
                       y: Optional[torch.Tensor], demodulate: bool, eps: float, stride: list[int],
                       padding: list[int], dilation: list[int], groups: int,
                       needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
        """(dx, dbank, dcoeffs, dstyles, dbias); an empty tensor for each gradient not needed."""
        return _MC.backward(g, x, bank, coeffs, styles, bias, d, y, demodulate, eps, tuple(stride),
                            tuple(padding), tuple(dilation), groups, needs)

    @_conv2d_bwd_op.register_fake
    def _(g, x, bank, coeffs, styles, bias, d, y, demodulate, eps, stride, padding, dilation, groups, needs):
        present = (x, bank, coeffs, styles, bias)
        out = []
        for t, n in zip(present, needs):
            if t is None or not n:
                out.append(x.new_empty((0,)))
            elif t is x:
                out.append(_MC.new_output(x, tuple(x.shape)))
            else:
                out.append(t.new_empty(t.shape))
        return tuple(out)


def _geo(cfg: Conv2dConfig):
    return list(cfg.stride), list(cfg.padding), list(cfg.dilation), cfg.groups


def conv2d_forward(x, bank, coeffs, styles, bias, cfg: Conv2dConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, O, HO, WO), d (B, O) float32 or None)."""
    y, d = torch.ops.modweights.triton_mod_conv2d_fwd(x, bank, coeffs, styles, bias, cfg.demodulate, cfg.eps,
                                                      *_geo(cfg))
    return y, (d if cfg.demodulate else None)


def conv2d_forward_fake(x, bank, coeffs, styles, bias, cfg: Conv2dConfig):
    """Shapes of :func:`conv2d_forward` for fake tensors (no launch)."""
    y = _MC.new_output(x, _out_shape(x, bank, cfg.stride, cfg.padding, cfg.dilation))
    d = x.new_empty((x.shape[0], bank.shape[1]), dtype=torch.float32) if cfg.demodulate else None
    return y, d


def conv2d_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: Conv2dConfig, needs):
    """(dx, dbank, dcoeffs, dstyles, dbias), None for each gradient not in ``needs``."""
    needs = [bool(n) for n in needs]
    if len(needs) != 5:
        raise ValueError(f"conv2d_backward: `needs` must hold 5 bools (x, bank, coeffs, styles, bias); got {needs!r}")
    BO = (x.shape[0], bank.shape[1])
    if not cfg.demodulate or (d is not None and d.numel() == 0):
        d = None  # (the glue may hand over an empty tensor for "none")
    elif d is not None and (d.dtype != torch.float32 or tuple(d.shape) != BO):  # ours is float32 (B, O)
        d = d.to(torch.float32).expand(BO).contiguous()
    grads = torch.ops.modweights.triton_mod_conv2d_bwd(g, x, bank, coeffs, styles, bias, d,
                                                       y if cfg.demodulate else None, cfg.demodulate, cfg.eps,
                                                       *_geo(cfg), needs)
    present = (True, True, coeffs is not None, styles is not None, bias is not None)
    return tuple(gr if (n and p) else None for gr, n, p in zip(grads, needs, present))
