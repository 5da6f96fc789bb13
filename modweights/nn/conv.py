"""Conv layers: ModulatedConv2d (StyleGAN2) and MixtureConv2d (CondConv / DynamicConv)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .. import functional as MF
from ._init import init_bank_
from .routers import Router


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution: ``y = conv2d(x, d * W * s) + bias``, ``s = affine(w)``.

    Args:
        in_channels: I. out_channels: O. kernel_size: int or pair. style_features: size of ``w``.
        demodulate: normalise each output filter over ``(i, kh, kw)``.
        stride, padding, dilation: as ``nn.Conv2d``. bias: learn an ``(O,)`` bias.

    Shapes: ``forward(x (B, I, H, W), w (B, style_features)) -> (B, O, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, style_features: int, *,
                 demodulate: bool = True, stride=1, padding=0, dilation=1, bias: bool = True, eps: float = 1e-8,
                 backend: str | None = None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.style_features, self.demodulate, self.eps, self.backend = style_features, demodulate, eps, backend
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))  # like nn.Conv2d
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        init_bank_(self.weight.data.unsqueeze(0), self.bias)
        self.affine = nn.Linear(style_features, in_channels)
        nn.init.ones_(self.affine.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return MF.modulated_conv2d(x, self.weight, self.affine(w), demodulate=self.demodulate, bias=self.bias,
                                   stride=self.stride, padding=self.padding, dilation=self.dilation, eps=self.eps,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"style_features={self.style_features}, demodulate={self.demodulate}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")


class MixtureConv2d(nn.Module):
    """CondConv / DynamicConv: a convolution whose filter is a per-sample mixture of K experts.

    ``y = conv2d(x, sum_k alpha_k W_k) + sum_k alpha_k b_k``, ``alpha = router(avgpool(x))``.

    Args:
        in_channels: I. out_channels: O. kernel_size: int or pair. num_experts: K.
        stride, padding, dilation, groups: as ``nn.Conv2d``.
        bias: a per-expert ``(K, O)`` bias, mixed like the filters.
        routing: ``"sigmoid"`` (CondConv) or ``"softmax"`` (DynamicConv; anneal ``temperature``).

    Shapes: ``forward(x (B, I, H, W), routing_weights=None) -> (B, O, H', W')``;
    ``routing_weights`` is ``(B, K)``; without it the layer's router reads the globally
    average-pooled input.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_experts: int, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, routing: str = "sigmoid",
                 temperature: float = 1.0, backend: str | None = None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MixtureConv2d: `num_experts` must be >= 1; got {num_experts}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"MixtureConv2d: `groups` = {groups} must divide in_channels = {in_channels} "
                             f"and out_channels = {out_channels}")
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.num_experts, self.groups, self.backend = num_experts, groups, backend
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        init_bank_(self.weight, self.bias)
        self.router = Router(in_channels, num_experts, routing, temperature)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, K)`` routing weights the layer computes from ``x`` when none are given."""
        return self.router(x.mean((2, 3)))

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if routing_weights is None:
            routing_weights = self.coefficients(x)
        return MF.mixture_conv2d(x, self.weight, routing_weights, bias=self.bias, stride=self.stride,
                                 padding=self.padding, dilation=self.dilation, groups=self.groups,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")
