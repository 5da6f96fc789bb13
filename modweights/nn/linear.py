"""Linear layers: ModulatedLinear (StyleGAN2-style) and MixtureLinear (CondConv / SMEAR)."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as MF
from .._checks import check_layer_tensor
from ._args import layer_args
from ._init import init_bank_
from ._layer import LayerMixin, fx_leaf
from .routers import Router


class ModulatedLinear(LayerMixin, nn.Module):
    """Linear layer modulated by a latent: ``y = d * ((W * s) @ x) + bias``, ``s = affine(w)``.

    Args:
        in_features: I. out_features: O. style_features: size of the latent ``w``.
        demodulate: normalise each output row of ``W * s`` (StyleGAN2).
        bias: learn an ``(O,)`` bias. eps: added inside the demodulation's rsqrt (finite, >= 0).
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, T, I) or (B, I), w (B, style_features)) -> (B, T, O) or (B, O)``;
    unbatched, as ``nn.Linear``: ``x (I,)`` with ``w (style_features,)`` -> ``(O,)``.
    The affine's bias starts at 1, so the layer starts as the plain linear (as StyleGAN2).
    """

    def __init__(self, in_features: int, out_features: int, style_features: int, *, demodulate: bool = True,
                 bias: bool = True, eps: float = 1e-8, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        layer_args("ModulatedLinear", backend=backend, eps=eps, demodulate=demodulate)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.style_features = in_features, out_features, style_features
        self.demodulate, self.eps, self.backend = demodulate, eps, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))  # like nn.Linear
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        init_bank_(self.weight.data.unsqueeze(0), self.bias)  # then the affine: the draws of reset_parameters
        self.affine = nn.Linear(style_features, in_features, **factory)
        nn.init.ones_(self.affine.bias)

    def reset_parameters(self) -> None:
        """Re-initialise as at construction (the same draws under the same seed): weight and
        bias as ``nn.Linear``'s, the style affine as ``nn.Linear``'s with its bias at 1."""
        init_bank_(self.weight.data.unsqueeze(0), self.bias)
        self.affine.reset_parameters()
        nn.init.ones_(self.affine.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        traced = fx_leaf(self, x, w)
        if traced is not None:
            return traced
        I = self.in_features
        check_layer_tensor(self._label(), "x", x, (1, 2, 3), -1, I,
                           lambda: f"(B, T, {I}), (B, {I}) or ({I},) (in_features = {I})")
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
        w = self._check_cond("w", w, self.style_features, "style_features", x.shape[0], unbatched)
        y = MF.modulated_linear(x, self.weight, self.affine(w), demodulate=self.demodulate, bias=self.bias,
                                eps=self.eps, backend=self.backend)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"style_features={self.style_features}, demodulate={self.demodulate}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class MixtureLinear(LayerMixin, nn.Module):
    """Linear layer whose weight is a mixture of K experts chosen by the input.

    ``y = (sum_k alpha_k W_k) @ x + sum_k alpha_k b_k``, ``alpha = router(cond)``.

    Args:
        in_features: I. out_features: O. num_experts: K.
        routing_features: size of ``cond`` when it is given to ``forward``; default I.
        per_token: route each token on its own (``alpha`` is ``(B, T, K)``) instead of once
            per sample from the mean over tokens (SMEAR / CondConv).
        routing: ``"softmax"`` or ``"sigmoid"``. temperature: divides the router logits.
        bias: a per-expert ``(K, O)`` bias, mixed like the weights.
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, T, I) or (B, I), cond=None) -> (B, T, O) or (B, O)``; ``cond`` is
    ``(B, routing_features)`` or, with ``per_token``, ``(B, T, routing_features)``. Without
    ``cond`` the router reads the input (its token mean per sample, or each token).
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, *, routing_features: int | None = None,
                 per_token: bool = False, routing: str = "softmax", temperature: float = 1.0, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MixtureLinear: `num_experts` must be >= 1; got {num_experts}")
        layer_args("MixtureLinear", backend=backend)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.per_token, self.backend = per_token, backend
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        init_bank_(self.weight, self.bias)  # then the router: the draws of reset_parameters
        self.router = Router(routing_features or in_features, num_experts, routing, temperature, **factory)

    def reset_parameters(self) -> None:
        """Re-initialise as at construction (the same draws under the same seed): every expert
        as ``nn.Linear``'s weight and bias, the router as ``nn.Linear``."""
        init_bank_(self.weight, self.bias)
        self.router.reset_parameters()

    def coefficients(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The mixing coefficients ``(B, K)`` or ``(B, T, K)`` the layer would use."""
        if cond is None:
            cond = x.mean(1) if (x.dim() == 3 and not self.per_token) else x
        return self.router(cond)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        traced = fx_leaf(self, x, cond)
        if traced is not None:
            return traced
        return MF.mixture_linear(x, self.weight, self.coefficients(x, cond), bias=self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, per_token={self.per_token}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
