"""What every modweights layer shares with its ``torch.nn`` twin: its name in error messages,
its input checks, FX tracing as a leaf, and the unbatched inputs of the conv layers."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.fx import Proxy

from .._checks import check_layer_tensor


def fx_leaf(module: nn.Module, *args, **kwargs):
    """Under ``torch.fx`` symbolic tracing (an argument is a ``Proxy``): a ``call_module`` node
    for ``module``, so that the layer appears in the graph as ``nn.Conv2d`` does (a leaf; its
    input checks and data-dependent routing need real tensors). Else None: run the forward.

    This is what ``Tracer.call_module`` does for a leaf module; doing it here makes the layers
    leaves for every tracer (``torch.fx.symbolic_trace``, torchvision's
    ``create_feature_extractor``, HF's tracer) without registering them with each."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Proxy):
            while args and args[-1] is None:
                args = args[:-1]
            tracer = a.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(module), args,
                                       {k: v for k, v in kwargs.items() if v is not None})
    return None


def leaf_forward(forward):
    """Decorate a layer's ``forward`` so that under ``torch.fx`` symbolic tracing it is one
    ``call_module`` node (:func:`fx_leaf`), and otherwise runs as written."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        traced = fx_leaf(self, *args, **kwargs)
        return forward(self, *args, **kwargs) if traced is None else traced
    return wrapper


class LayerMixin:
    """Input checks of a layer, named after it (and, for a converted layer, its place in the model)."""

    def _label(self) -> str:
        name = getattr(self, "_mw_name", "")
        return f"{type(self).__name__} {name!r}" if name else type(self).__name__

    def _check_cond(self, name: str, t: torch.Tensor, size: int, what: str, B: int, unbatched: bool) -> torch.Tensor:
        """A per-sample conditioning input (``w``, ``cond``, ``coeffs``): ``(B, size)``; for an
        unbatched ``x`` also ``(size,)``, returned as ``(1, size)``."""
        if unbatched and isinstance(t, torch.Tensor) and t.dim() == 1:
            t = t.unsqueeze(0)
        def expected():
            return f"({size},) or (1, {size}) ({what})" if unbatched else f"(B, {size}) = ({B}, {size}) ({what})"

        check_layer_tensor(self._label(), name, t, (2,), -1, size, expected, batch=B)
        return t

    def _cond_or_coeffs(self, cond, coeffs) -> None:
        """A mixture layer takes the router's input ``cond`` or the mixing coefficients ``coeffs``."""
        if cond is not None and coeffs is not None:
            raise ValueError(f"{self._label()}: give `cond` (the router's input) or `coeffs` (mixing coefficients "
                             "that bypass the router), not both")

    def _sample_coeffs(self, x: torch.Tensor, cond, coeffs, unbatched: bool) -> torch.Tensor:
        """A conv mixture layer's ``(B, K)`` coefficients for the batched ``x``: ``coeffs``
        (checked), else the router's for ``cond`` (checked) or, without it, for the input."""
        B = x.shape[0]
        if coeffs is not None:
            return self._check_cond("coeffs", coeffs, self.num_experts, "num_experts", B, unbatched)
        if cond is not None:
            cond = self._check_cond("cond", cond, self.routing_features, "routing_features", B, unbatched)
        return self.coefficients(x, cond)  # the input before any padding


class ConvMixin(LayerMixin):
    """The conv layers' input: ``(B, I, H, W)`` or, as ``nn.Conv2d`` takes, unbatched ``(I, H, W)``."""

    def _batched_x(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``x`` as ``(B, I, H, W)``, and whether it was unbatched."""
        I = self.in_channels
        check_layer_tensor(self._label(), "x", x, (3, 4), -3, I,
                           lambda: f"(B, {I}, H, W) or ({I}, H, W) (in_channels = {I})")
        return (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the op takes it (padding the op's symmetric padding cannot express)."""
        return self._same(x)

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=...) converts every 4-D and 5-D tensor, and refuses a 4-D
        # format on the 5-D bank (K, O, I/g, kh, kw). The bank is K stacked conv weights: it is
        # converted as the 4-D (K * O, I/g, kh, kw) stack (channels_last like nn.Conv2d's
        # weight) and viewed back, so every other conversion (device, dtype, to_empty) is unchanged.
        if recurse:
            for module in self.children():
                module._apply(fn)

        def per_expert(t):
            return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2]) if t.dim() == 5 else fn(t)

        return super()._apply(per_expert, recurse=False)
