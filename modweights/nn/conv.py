"""Conv layers: ModulatedConv2d (StyleGAN2) and MixtureConv2d (CondConv / DynamicConv)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .. import functional as MF
from ._args import conv_padding, layer_args
from ._init import init_bank_
from .routers import Router


class _Padding:
    """``padding`` as ``nn.Conv2d`` takes it, ``'same'`` and ``'valid'`` included: the layer
    keeps what it was given in ``padding`` and passes the op a symmetric one; ``'same'`` with
    an even kernel zero-pads the input first (``F.pad``, the extra pixel right/bottom)."""

    # class defaults: a layer pickled before string padding existed has only `padding` (numbers)
    _op_padding = None
    _same_pad: tuple | None = None

    def _set_padding(self, cls: str, padding) -> None:
        self.padding = padding
        self._op_padding, self._same_pad = conv_padding(cls, padding, self.kernel_size, self.stride, self.dilation)

    def _same(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._same_pad is None else F.pad(x, self._same_pad)

    def _op_pad(self):
        return self.padding if self._op_padding is None else self._op_padding


class ModulatedConv2d(_Padding, nn.Module):
    """StyleGAN2 modulated convolution: ``y = conv2d(x, d * W * s) + bias``, ``s = affine(w)``.

    Args:
        in_channels: I. out_channels: O. kernel_size: int or pair. style_features: size of ``w``.
        demodulate: normalise each output filter over ``(i, kh, kw)``.
        stride, padding, dilation: as ``nn.Conv2d`` (``padding`` also ``'same'`` or ``'valid'``).
        bias: learn an ``(O,)`` bias. eps: added inside the demodulation's rsqrt (finite, >= 0).
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, I, H, W), w (B, style_features)) -> (B, O, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, style_features: int, *,
                 demodulate: bool = True, stride=1, padding=0, dilation=1, bias: bool = True, eps: float = 1e-8,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        layer_args("ModulatedConv2d", backend=backend, eps=eps, demodulate=demodulate)
        factory = {"device": device, "dtype": dtype}
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.style_features, self.demodulate, self.eps, self.backend = style_features, demodulate, eps, backend
        self.stride, self.dilation = stride, dilation
        self._set_padding("ModulatedConv2d", padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw, **factory))  # like nn.Conv2d
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        init_bank_(self.weight.data.unsqueeze(0), self.bias)
        self.affine = nn.Linear(style_features, in_channels, **factory)
        nn.init.ones_(self.affine.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return MF.modulated_conv2d(self._same(x), self.weight, self.affine(w), demodulate=self.demodulate,
                                   bias=self.bias, stride=self.stride, padding=self._op_pad(),
                                   dilation=self.dilation, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"style_features={self.style_features}, demodulate={self.demodulate}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")


class MixtureConv2d(_Padding, nn.Module):
    """CondConv / DynamicConv: a convolution whose filter is a per-sample mixture of K experts.

    ``y = conv2d(x, sum_k alpha_k W_k) + sum_k alpha_k b_k``, ``alpha = router(avgpool(x))``.

    Args:
        in_channels: I. out_channels: O. kernel_size: int or pair. num_experts: K.
        stride, padding, dilation, groups: as ``nn.Conv2d`` (``padding`` also ``'same'`` or ``'valid'``).
        bias: a per-expert ``(K, O)`` bias, mixed like the filters.
        routing: ``"sigmoid"`` (CondConv) or ``"softmax"`` (DynamicConv; anneal ``temperature``).
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, I, H, W), routing_weights=None) -> (B, O, H', W')``;
    ``routing_weights`` is ``(B, K)``; without it the layer's router reads the globally
    average-pooled input.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_experts: int, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, routing: str = "sigmoid",
                 temperature: float = 1.0, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MixtureConv2d: `num_experts` must be >= 1; got {num_experts}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"MixtureConv2d: `groups` = {groups} must divide in_channels = {in_channels} "
                             f"and out_channels = {out_channels}")
        layer_args("MixtureConv2d", backend=backend)
        factory = {"device": device, "dtype": dtype}
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.num_experts, self.groups, self.backend = num_experts, groups, backend
        self.stride, self.dilation = stride, dilation
        self._set_padding("MixtureConv2d", padding)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kh, kw, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        init_bank_(self.weight, self.bias)
        self.router = Router(in_channels, num_experts, routing, temperature, **factory)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, K)`` routing weights the layer computes from ``x`` when none are given."""
        return self.router(x.mean((2, 3)))

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if routing_weights is None:
            routing_weights = self.coefficients(x)
        return MF.mixture_conv2d(self._same(x), self.weight, routing_weights, bias=self.bias, stride=self.stride,
                                 padding=self._op_pad(), dilation=self.dilation, groups=self.groups,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")
