"""Drop-in for timm's ``CondConv2d``: :func:`swap_condconv` and :class:`TimmCondConv2d`.

timm's CondConv2d (EfficientNet-CondConv, ``efficientnet_cc_*``) forms each sample's filter
``routing_weights @ weight`` (``B x O*I/g*kh*kw`` in memory) and runs one grouped conv over
the batch. :class:`TimmCondConv2d` computes the same ``y = conv2d(x, sum_k r_bk W_k) +
sum_k r_bk b_k`` through :func:`modweights.functional.mixture_conv2d`, which picks its
formulation by counting (and, on the GPU, the fused kernels that never form the filters).

The swap keeps timm's parameters: the same ``nn.Parameter`` objects (``weight`` stored flat
as ``(num_experts, O * I/groups * kh * kw)``, ``bias`` as ``(num_experts, O)``), viewed as the
bank ``(K, O, I/groups, kh, kw)`` in ``forward``. So ``state_dict`` keys and values, optimizer
state and weight tying are untouched, and a checkpoint loads into either model.

timm is imported here, not by ``modweights`` itself: it is an optional dependency.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import timm.layers
from timm.layers import CondConv2d

from .. import functional as MF
from ..nn._init import init_bank_
from ..nn._layer import leaf_forward
from ..nn.conv import MixtureConv2d

__all__ = ["TimmCondConv2d", "swap_condconv"]


def _pad_same(x, kernel_size, stride, dilation):
    """TensorFlow 'SAME' padding (what timm's dynamic padding does): pad so that the output has
    ``ceil(n / stride)`` pixels, the odd pixel of padding after. Computed per call from x's size."""
    pads = []
    for n, k, s, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


class TimmCondConv2d(MixtureConv2d):
    """A :class:`~modweights.nn.MixtureConv2d` over the parameters of a timm ``CondConv2d``.

    ``forward(x (B, I, H, W), routing_weights (B, K)) -> (B, O, H', W')``, as timm's:
    ``y = conv2d(x, sum_k r[b, k] W_k) + sum_k r[b, k] bias_k`` with timm's stride, padding
    (including its dynamic TF-'SAME' padding), dilation and groups.

    Parameters (shared with the timm module it was built from, never copied):
        weight: ``(K, O * I/groups * kh * kw)``, timm's flat layout; the bank is its view
            ``(K, O, I/groups, kh, kw)``.
        bias: ``(K, O)`` or None.

    There is no router: timm's blocks compute the routing weights and pass them in, so
    ``routing_weights`` is required (MixtureConv2d's own router would add parameters and
    change the state_dict). Its second positional argument is therefore timm's: the mixing
    coefficients (``coeffs`` of :class:`~modweights.nn.MixtureConv2d`, which takes the
    router's input ``cond`` there); ``coeffs=`` is accepted as a keyword too.
    """

    def __init__(self, source: CondConv2d, backend: str | None = None):
        if not isinstance(source, CondConv2d):
            raise TypeError(f"TimmCondConv2d: `source` must be a timm.layers.CondConv2d; got {type(source).__name__}")
        # Not MixtureConv2d.__init__: it allocates a bank and a router that timm's layer does
        # not have. The attributes it sets are set here, from timm's layer.
        nn.Module.__init__(self)
        self.in_channels, self.out_channels = source.in_channels, source.out_channels
        self.kernel_size = tuple(source.kernel_size)
        self.stride, self.padding = tuple(source.stride), tuple(source.padding)
        self.dilation, self.groups = tuple(source.dilation), source.groups
        self.num_experts, self.dynamic_padding = source.num_experts, bool(source.dynamic_padding)
        self.weight_shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        self.backend = backend
        self.weight = source.weight  # the same Parameter object
        if source.bias is not None:
            self.bias = source.bias
        else:
            self.register_parameter("bias", None)
        self.train(source.training)

    @classmethod
    def from_timm(cls, source: CondConv2d, backend: str | None = None) -> "TimmCondConv2d":
        """The adapter for one timm ``CondConv2d`` (shares its parameters)."""
        return cls(source, backend)

    @property
    def bank(self) -> torch.Tensor:
        """The weight viewed as ``(K, O, I/groups, kh, kw)`` (a view: gradients reach ``weight``)."""
        return self.weight.view(self.num_experts, *self.weight_shape)

    def reset_parameters(self) -> None:
        """Re-initialise as timm's ``CondConv2d`` does (each expert as ``nn.Conv2d``'s weight and bias)."""
        init_bank_(self.bank, self.bias)

    def coefficients(self, x, cond=None):
        raise TypeError("TimmCondConv2d has no router: pass `routing_weights` (B, K), as timm's blocks do")

    @leaf_forward
    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None, *,
                coeffs: torch.Tensor | None = None) -> torch.Tensor:
        if routing_weights is not None and coeffs is not None:
            raise ValueError("TimmCondConv2d: give `routing_weights` or `coeffs` (the same thing), not both")
        routing_weights = coeffs if routing_weights is None else routing_weights
        if routing_weights is None:
            self.coefficients(x)
        if self.dynamic_padding:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
            padding = 0
        else:
            padding = self.padding
        return MF.mixture_conv2d(x, self.bank, routing_weights, bias=self.bias, stride=self.stride,
                                 padding=padding, dilation=self.dilation, groups=self.groups,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        pad = "same (dynamic)" if self.dynamic_padding else self.padding
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_experts={self.num_experts}, stride={self.stride}, padding={pad}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"backend={self.backend!r}, timm_layout=True")


# FX feature extraction in timm must not trace into the checks of our forward (timm does the
# same for its CondConv2d).
_register = getattr(timm.layers, "register_notrace_module", None)
if _register is not None:
    _register(TimmCondConv2d)


def swap_condconv(model: nn.Module, *, backend: str | None = None) -> int:
    """Replace every timm ``CondConv2d`` inside ``model`` by a :class:`TimmCondConv2d`, in place.

    The replacements share the original parameter tensors (same objects, same state_dict
    keys) and keep each module's training mode. A module reachable from several parents is
    replaced by one adapter everywhere.

    Args:
        model: any ``nn.Module`` (e.g. ``timm.create_model("efficientnet_cc_b0_4e")``).
        backend: modweights backend for the adapters (None = the usual selection).

    Returns:
        The number of distinct CondConv2d modules replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_condconv: `model` must be an nn.Module; got {type(model).__name__}")
    if isinstance(model, CondConv2d):
        raise TypeError("swap_condconv: `model` is itself a CondConv2d and cannot be replaced in place; "
                        "use TimmCondConv2d.from_timm(model)")
    done: dict[int, TimmCondConv2d] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CondConv2d):
                if id(child) not in done:
                    done[id(child)] = TimmCondConv2d(child, backend)
                setattr(parent, name, done[id(child)])
    return len(done)
