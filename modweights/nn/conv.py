"""Conv layers: ModulatedConv2d (StyleGAN2) and MixtureConv2d (CondConv / DynamicConv)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from ._args import conv_geometry, conv_padding, int_arg, layer_args
from ._init import init_bank_, modulated_params_, reset_modulated_
from ._layer import ConvMixin, leaf_forward
from .routers import Router


class _Padding:
    """``padding`` as ``nn.Conv2d`` takes it, ``'same'`` and ``'valid'`` included: the layer
    keeps a string as given (numbers as a pair) in ``padding`` and passes the op a symmetric
    one; ``'same'`` with an even kernel zero-pads the input first (``F.pad``, the extra pixel
    right/bottom)."""

    # class defaults: a layer pickled before string padding existed has only `padding` (numbers)
    _op_padding = None
    _same_pad: tuple | None = None

    def _set_padding(self, cls: str, padding) -> None:
        self._op_padding, self._same_pad = conv_padding(cls, padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding if isinstance(padding, str) else self._op_padding

    def _same(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._same_pad is None else F.pad(x, self._same_pad)

    def _op_pad(self):
        return self.padding if self._op_padding is None else self._op_padding


class ModulatedConv2d(ConvMixin, _Padding, nn.Module):
    """StyleGAN2 modulated convolution: ``y = conv2d(x, d * W * s) + bias``, ``s = affine(w)``.

    Args:
        in_channels: I. out_channels: O. kernel_size: int or pair. style_features: size of ``w``.
        demodulate: normalise each output filter over ``(i, kh, kw)``.
        stride, padding, dilation: as ``nn.Conv2d`` (``padding`` also ``'same'`` or ``'valid'``;
            any integer type, numpy's included, normalised to Python ints when built).
        bias: learn an ``(O,)`` bias. eps: added inside the demodulation's rsqrt (finite, >= 0).
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, I, H, W), w (B, style_features)) -> (B, O, H', W')``; unbatched,
    as ``nn.Conv2d``: ``x (I, H, W)`` with ``w (style_features,)`` -> ``(O, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, style_features: int, *,
                 demodulate: bool = True, stride=1, padding=0, dilation=1, bias: bool = True, eps: float = 1e-8,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        cls = "ModulatedConv2d"
        layer_args(cls, backend=backend, eps=eps, demodulate=demodulate)
        geo = conv_geometry(cls, in_channels, out_channels, kernel_size, stride, dilation)
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.kernel_size = geo["in_channels"], geo["out_channels"], geo["kernel_size"]
        self.style_features = int_arg(cls, "style_features", style_features, 1)
        self.demodulate, self.eps, self.backend = demodulate, eps, backend
        self.stride, self.dilation = geo["stride"], geo["dilation"]
        self._set_padding(cls, padding)
        modulated_params_(self, (self.out_channels, self.in_channels, *self.kernel_size), self.in_channels,
                          self.style_features, bias, factory)

    def reset_parameters(self) -> None:
        """Re-initialise as at construction (the same draws under the same seed): the weight
        and bias as ``nn.Conv2d``'s, the style affine as ``nn.Linear``'s with its bias at 1 (the
        styles start near 1)."""
        reset_modulated_(self)

    @leaf_forward
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, unbatched = self._batched_x(x)
        w = self._check_cond("w", w, self.style_features, "style_features", x.shape[0], unbatched)
        y = MF.modulated_conv2d(self._pad_input(x), self.weight, self.affine(w), demodulate=self.demodulate,
                                bias=self.bias, stride=self.stride, padding=self._op_pad(),
                                dilation=self.dilation, eps=self.eps, backend=self.backend)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"style_features={self.style_features}, demodulate={self.demodulate}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")


class MixtureConv2d(ConvMixin, _Padding, nn.Module):
    """CondConv / DynamicConv: a convolution whose filter is a per-sample mixture of K experts.

    ``y = conv2d(x, sum_k alpha_k W_k) + sum_k alpha_k b_k``, ``alpha = router(cond)``.

    Args:
        in_channels: I. out_channels: O. kernel_size: int or pair. num_experts: K.
        stride, padding, dilation, groups: as ``nn.Conv2d`` (``padding`` also ``'same'`` or
            ``'valid'``; any integer type, numpy's included, normalised when built).
        routing_features: size of ``cond`` when it is given to ``forward``; default I.
        routing: ``"softmax"`` (DynamicConv; anneal ``temperature``) or ``"sigmoid"`` (CondConv).
        temperature: divides the router logits.
        bias: a per-expert ``(K, O)`` bias, mixed like the filters.
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, I, H, W), cond=None, *, coeffs=None) -> (B, O, H', W')``.
    ``cond (B, routing_features)`` is the router's input; without it the router reads the
    globally average-pooled input. ``coeffs (B, K)`` are explicit mixing coefficients that
    bypass the router (giving both is a ValueError). Unbatched, as ``nn.Conv2d``:
    ``x (I, H, W)`` (with ``cond``/``coeffs`` 1-D) -> ``(O, H', W')``. ``routing_weights=`` is a
    deprecated alias of ``coeffs=``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_experts: int, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, routing_features: int | None = None, bias: bool = True,
                 routing: str = "softmax", temperature: float = 1.0, backend: str | None = None, device=None,
                 dtype=None):
        super().__init__()
        cls = "MixtureConv2d"
        self.num_experts = int_arg(cls, "num_experts", num_experts, 1)
        geo = conv_geometry(cls, in_channels, out_channels, kernel_size, stride, dilation, groups)
        layer_args(cls, backend=backend)
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.kernel_size = geo["in_channels"], geo["out_channels"], geo["kernel_size"]
        self.groups, self.backend = geo["groups"], backend
        self.routing_features = (self.in_channels if routing_features is None
                                 else int_arg(cls, "routing_features", routing_features, 1))
        self.stride, self.dilation = geo["stride"], geo["dilation"]
        self._set_padding(cls, padding)
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.out_channels, self.in_channels // self.groups,
                                               *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(self.num_experts, self.out_channels, **factory)) if bias else None
        init_bank_(self.weight, self.bias)  # then the router: the draws of reset_parameters
        self.router = Router(self.routing_features, self.num_experts, routing, temperature, **factory)

    def __setstate__(self, state: dict) -> None:
        # a layer pickled before `routing_features` existed: its router's input size
        super().__setstate__(state)
        if "routing_features" not in self.__dict__ and "router" in self._modules:
            self.routing_features = self.router.fc.in_features

    def reset_parameters(self) -> None:
        """Re-initialise as at construction (the same draws under the same seed): every expert
        as ``nn.Conv2d``'s weight and bias, the router as ``nn.Linear``."""
        init_bank_(self.weight, self.bias)
        self.router.reset_parameters()

    def coefficients(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(B, K)`` mixing coefficients the router gives for ``cond``, or without it for
        the average-pooled ``x (B, I, H, W)``."""
        return self.router(x.mean((2, 3)) if cond is None else cond)

    @leaf_forward
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *, coeffs: torch.Tensor | None = None,
                routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        coeffs = self._coeffs_arg(coeffs, routing_weights)
        self._cond_or_coeffs(cond, coeffs)
        x, unbatched = self._batched_x(x)
        coeffs = self._sample_coeffs(x, cond, coeffs, unbatched)
        y = MF.mixture_conv2d(self._pad_input(x), self.weight, coeffs, bias=self.bias, stride=self.stride,
                              padding=self._op_pad(), dilation=self.dilation, groups=self.groups,
                              backend=self.backend)
        return y.squeeze(0) if unbatched else y

    def _coeffs_arg(self, coeffs, routing_weights):
        if routing_weights is None:
            return coeffs
        warnings.warn(f"{type(self).__name__}: `routing_weights=` is deprecated; pass the mixing coefficients as "
                      "`coeffs=` (the second positional argument is now `cond`, the router's input)",
                      DeprecationWarning, stacklevel=3)
        if coeffs is not None:
            raise ValueError(f"{self._label()}: give `coeffs` or its deprecated alias `routing_weights`, not both")
        return routing_weights

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, routing_features={self.routing_features}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
