"""1-D conv layers: ModulatedConv1d and MixtureConv1d (CondConv / ODConv-style dynamic filters
over sequences), on :func:`modweights.functional.mod_conv1d` (a conv2d with a unit height on
every backend). Conventions as the 2-D layers: ``MixtureConv1d.forward(x, cond=None, *,
coeffs=None)``, softmax routing and a bias by default."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as MF
from .._checks import check_layer_tensor
from ._args import layer_args
from ._init import init_bank_, modulated_params_, reset_modulated_
from ._layer import LayerMixin, leaf_forward
from .routers import Router


def _int(cls: str, name: str, v, minimum: int) -> int:
    if isinstance(v, (tuple, list)) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{cls}: `{name}` must be an int >= {minimum} (or a 1-tuple of one); got {v!r}")
    return int(v)


class _Conv1dArgs(LayerMixin):
    """Geometry shared by the 1-D layers: ints (1-tuples accepted, as ``nn.Conv1d``), and
    ``padding`` an int, ``'valid'`` or ``'same'`` (``'same'`` with an even total pads the input
    first, the extra element on the right, as ``nn.Conv1d``); the input ``(B, I, L)`` or, as
    ``nn.Conv1d`` takes, unbatched ``(I, L)``."""

    def _batched_x(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``x`` as ``(B, I, L)``, and whether it was unbatched."""
        I = self.in_channels
        check_layer_tensor(self._label(), "x", x, (2, 3), -2, I,
                           lambda: f"(B, {I}, L) or ({I}, L) (in_channels = {I})")
        return (x.unsqueeze(0), True) if x.dim() == 2 else (x, False)

    _pre_pad: tuple | None = None

    def _geometry(self, cls, in_channels, out_channels, kernel_size, stride, padding, dilation, groups=1):
        self.in_channels = _int(cls, "in_channels", in_channels, 1)
        self.out_channels = _int(cls, "out_channels", out_channels, 1)
        self.kernel_size = (_int(cls, "kernel_size", kernel_size, 1),)
        self.stride, self.dilation = (_int(cls, "stride", stride, 1),), (_int(cls, "dilation", dilation, 1),)
        self.groups = _int(cls, "groups", groups, 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{cls}: `groups` = {self.groups} must divide in_channels = {self.in_channels} "
                             f"and out_channels = {self.out_channels}")
        self.padding = padding
        if padding == "valid":
            self._op_padding = 0
        elif padding == "same":
            if self.stride[0] != 1:
                raise ValueError(f"{cls}: padding='same' needs stride 1 (as nn.Conv1d); got stride={stride!r}")
            total = self.dilation[0] * (self.kernel_size[0] - 1)
            self._op_padding = total // 2
            if total % 2:
                self._op_padding, self._pre_pad = 0, (total // 2, total - total // 2)
        else:
            self._op_padding = _int(cls, "padding", padding, 0)
            self.padding = (self._op_padding,)

    def _conv_kwargs(self) -> dict:
        return {"stride": self.stride[0], "padding": self._op_padding,
                "dilation": self.dilation[0], "backend": self.backend}

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._pre_pad is None else F.pad(x, self._pre_pad)

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")


class ModulatedConv1d(_Conv1dArgs, nn.Module):
    """Modulated 1-D convolution: ``y = conv1d(x, d * W * s) + bias``, ``s = affine(w)``.

    Args:
        in_channels: I. out_channels: O. kernel_size: k. style_features: size of ``w``.
        demodulate: normalise each output filter over ``(i, k)``.
        stride, padding, dilation: as ``nn.Conv1d`` (``padding`` also ``'same'`` or ``'valid'``).
        bias: learn an ``(O,)`` bias. eps: added inside the demodulation's rsqrt.
        backend: a backend name, or None (follow the context). device, dtype: of the parameters.

    Shapes: ``forward(x (B, I, L), w (B, style_features)) -> (B, O, L')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, style_features: int, *,
                 demodulate: bool = True, stride=1, padding=0, dilation=1, bias: bool = True, eps: float = 1e-8,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        cls = "ModulatedConv1d"
        layer_args(cls, backend=backend, eps=eps, demodulate=demodulate)
        self._geometry(cls, in_channels, out_channels, kernel_size, stride, padding, dilation)
        factory = {"device": device, "dtype": dtype}
        self.style_features = _int(cls, "style_features", style_features, 1)
        self.demodulate, self.eps, self.backend = demodulate, eps, backend
        modulated_params_(self, (self.out_channels, self.in_channels, *self.kernel_size), self.in_channels,
                          self.style_features, bias, factory)

    def reset_parameters(self) -> None:
        """The weight and bias as ``nn.Conv1d``'s, the style affine as ``nn.Linear``'s with its bias at 1."""
        reset_modulated_(self)

    @leaf_forward
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x, unbatched = self._batched_x(x)
        w = self._check_cond("w", w, self.style_features, "style_features", x.shape[0], unbatched)
        y = MF.modulated_conv1d(self._pad_input(x), self.weight, self.affine(w), demodulate=self.demodulate,
                                bias=self.bias, eps=self.eps, **self._conv_kwargs())
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, style_features={self.style_features}, demodulate={self.demodulate}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class MixtureConv1d(_Conv1dArgs, nn.Module):
    """A 1-D convolution whose filter is a per-sample mixture of K experts (CondConv / DynamicConv
    over sequences): ``y = conv1d(x, sum_k alpha_k W_k) + sum_k alpha_k b_k``, ``alpha = router(cond)``.

    Args:
        in_channels: I. out_channels: O. kernel_size: k. num_experts: K.
        stride, padding, dilation, groups: as ``nn.Conv1d`` (``padding`` also ``'same'`` or ``'valid'``).
        routing_features: size of ``cond`` when given to ``forward``; default I.
        routing: ``"softmax"`` (DynamicConv) or ``"sigmoid"`` (CondConv). temperature: divides the logits.
        bias: a per-expert ``(K, O)`` bias, mixed like the filters.
        backend: a backend name, or None (follow the context). device, dtype: of the parameters.

    Shapes: ``forward(x (B, I, L), cond=None, *, coeffs=None) -> (B, O, L')``. ``cond
    (B, routing_features)`` is the router's input; without it the router reads the input averaged
    over ``L``. ``coeffs (B, K)`` bypass the router (giving both is a ValueError).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_experts: int, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, routing_features: int | None = None, bias: bool = True,
                 routing: str = "softmax", temperature: float = 1.0, backend: str | None = None, device=None,
                 dtype=None):
        super().__init__()
        cls = "MixtureConv1d"
        layer_args(cls, backend=backend)
        self._geometry(cls, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.num_experts = _int(cls, "num_experts", num_experts, 1)
        self.routing_features = (self.in_channels if routing_features is None
                                 else _int(cls, "routing_features", routing_features, 1))
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.out_channels, self.in_channels // self.groups,
                                               *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(self.num_experts, self.out_channels, **factory)) if bias else None
        init_bank_(self.weight, self.bias)  # then the router: the draws of reset_parameters
        self.router = Router(self.routing_features, self.num_experts, routing, temperature, **factory)

    def reset_parameters(self) -> None:
        """Every expert as ``nn.Conv1d``'s weight and bias, the router as ``nn.Linear``."""
        init_bank_(self.weight, self.bias)
        self.router.reset_parameters()

    def coefficients(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(B, K)`` mixing coefficients for ``cond``, or without it for ``x (B, I, L)`` averaged over L."""
        return self.router(x.mean(2) if cond is None else cond)

    @leaf_forward
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                coeffs: torch.Tensor | None = None) -> torch.Tensor:
        self._cond_or_coeffs(cond, coeffs)
        x, unbatched = self._batched_x(x)
        coeffs = self._sample_coeffs(x, cond, coeffs, unbatched)
        y = MF.mixture_conv1d(self._pad_input(x), self.weight, coeffs, bias=self.bias, groups=self.groups,
                              **self._conv_kwargs())
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, num_experts={self.num_experts}, groups={self.groups}, "
                f"routing_features={self.routing_features}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")
