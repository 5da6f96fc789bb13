"""The layers :func:`modweights.convert.convert` puts in place of ``nn.Linear`` / ``nn.Conv2d``
(importable from :mod:`modweights.convert` too): the modweights layers, plus the input shapes
and padding modes of the layers they replace, and the latent set by
:func:`modweights.convert.condition`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _recompute
from .nn import MixtureConv1d, MixtureConv2d, MixtureLinear, ModulatedConv1d, ModulatedConv2d, ModulatedLinear
from .nn._layer import leaf_forward


class _Converted:
    """Mixin of the converted layers: the name they had when converted (for error messages),
    the latent set by :func:`condition`, and whether they read one."""

    _mw_name: str = ""
    _mw_latent: torch.Tensor | None = None
    reads_latent: bool = False

    def _latent(self, w):
        """``w`` if given, else the latent from :func:`condition` (under checkpointing, the
        one the recomputed forward read: :mod:`modweights._recompute`)."""
        if w is not None:
            return w
        latent = _recompute.latent(self, self._mw_latent)
        if latent is None:
            raise RuntimeError(
                f"{type(self).__name__} {self._mw_name!r} reads a latent (style_features="
                f"{self.style_features}) and none is set: call the model inside "
                "`with modweights.condition(model, w):`, or pass w to the layer (a checkpointed "
                "block recomputed in backward uses the latent of its forward)")
        return latent


def _rows(x: torch.Tensor, sample_dim: int = 0):
    """``(*, I)`` -> ``(B, T, I)`` or ``(B, I)`` for the ops, and the inverse for the output.

    ``sample_dim`` 1 is a time-major layer (inside an ``nn.Transformer*`` with
    ``batch_first=False``): ``(T, B, I)`` is transposed to ``(B, T, I)``, and its unbatched
    ``(T, I)`` is one sample."""
    if sample_dim == 1 and x.dim() == 3:
        return x.transpose(0, 1), lambda y: y.transpose(0, 1)
    if sample_dim == 1 and x.dim() == 2:
        return x.unsqueeze(0), lambda y: y.squeeze(0)
    if x.dim() == 1:
        return x.unsqueeze(0), lambda y: y.squeeze(0)
    if x.dim() <= 3:
        return x, lambda y: y
    lead = x.shape[:-1]
    return x.reshape(x.shape[0], -1, x.shape[-1]), lambda y: y.reshape(*lead, y.shape[-1])


class ConvertedMixtureLinear(_Converted, MixtureLinear):
    """A :class:`~modweights.nn.MixtureLinear` made by :func:`convert` from an ``nn.Linear``
    (or a GPT-2 ``Conv1D``).

    Shapes: ``forward(x (*, I), cond=None, *, coeffs=None) -> (*, O)``; dimension
    ``sample_dim`` (0, or 1 for a time-major transformer layer) is the sample. With
    ``style_features`` (``routing_mode="cond"``) the router reads the latent from
    :func:`condition` (or ``cond``, ``(B, style_features)``), else the input per ``routing_mode``.
    """

    def __init__(self, in_features, out_features, num_experts, *, style_features=None, sample_dim: int = 0, **kw):
        super().__init__(in_features, out_features, num_experts, routing_features=style_features, **kw)
        self.style_features = style_features
        self.reads_latent = style_features is not None
        self.sample_dim = sample_dim

    @leaf_forward
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                coeffs: torch.Tensor | None = None) -> torch.Tensor:
        if self.reads_latent and coeffs is None:
            cond = self._latent(cond)
        x, back = _rows(x, self.sample_dim)
        return back(super().forward(x, cond, coeffs=coeffs))


class ConvertedModulatedLinear(_Converted, ModulatedLinear):
    """A :class:`~modweights.nn.ModulatedLinear` made by :func:`convert` from an ``nn.Linear``
    (or a GPT-2 ``Conv1D``).

    Shapes: ``forward(x (*, I), w=None) -> (*, O)``, ``w (B, style_features)`` from
    :func:`condition` when not given; dimension ``sample_dim`` of ``x`` is the sample.
    """

    reads_latent = True
    sample_dim = 0

    @leaf_forward
    def forward(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self._latent(w)
        x, back = _rows(x, self.sample_dim)
        return back(super().forward(x, w))


class _PrePad:
    """Padding that the op's symmetric zero padding cannot express ('same' with an even
    total, or a padding mode other than zeros): ``F.pad`` first, as ``nn.Conv2d`` does."""

    _mw_pre_pad: tuple | None = None
    _mw_pad_mode: str = "constant"

    def _pad_input(self, x):
        x = super()._pad_input(x)
        if self._mw_pre_pad is None:
            return x
        return F.pad(x, self._mw_pre_pad, mode=self._mw_pad_mode)

    def _pad_repr(self) -> str:
        return "" if self._mw_pre_pad is None else f", pre_pad={self._mw_pre_pad}, pad_mode={self._mw_pad_mode!r}"


class ConvertedMixtureConv2d(_Converted, _PrePad, MixtureConv2d):
    """A :class:`~modweights.nn.MixtureConv2d` made by :func:`convert` from an ``nn.Conv2d``.

    Shapes: ``forward(x (B, I, H, W) or (I, H, W), cond=None, *, coeffs=None) -> (B, O, H', W')``
    (or ``(O, H', W')``). With ``style_features`` the router reads the latent from
    :func:`condition` (or ``cond``), else the average-pooled input (before any padding).
    """

    def __init__(self, *args, style_features=None, **kw):
        super().__init__(*args, routing_features=style_features, **kw)
        self.style_features = style_features
        self.reads_latent = style_features is not None

    @leaf_forward
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *, coeffs: torch.Tensor | None = None,
                routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.reads_latent and coeffs is None and routing_weights is None:
            cond = self._latent(cond)
        return super().forward(x, cond, coeffs=coeffs, routing_weights=routing_weights)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._pad_repr()


class ConvertedModulatedConv2d(_Converted, _PrePad, ModulatedConv2d):
    """A :class:`~modweights.nn.ModulatedConv2d` made by :func:`convert` from an ``nn.Conv2d``.

    Shapes: ``forward(x (B, I, H, W) or (I, H, W), w=None) -> (B, O, H', W')`` (or ``(O, H', W')``).
    """

    reads_latent = True

    @leaf_forward
    def forward(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, self._latent(w))

    def extra_repr(self) -> str:
        return super().extra_repr() + self._pad_repr()


class ConvertedMixtureConv1d(_Converted, _PrePad, MixtureConv1d):
    """A :class:`~modweights.nn.MixtureConv1d` made by :func:`convert` from an ``nn.Conv1d``.

    Shapes: ``forward(x (B, I, L) or (I, L), cond=None, *, coeffs=None) -> (B, O, L')``. With
    ``style_features`` the router reads the latent from :func:`condition` (or ``cond``), else the
    input averaged over L (before any padding).
    """

    def __init__(self, *args, style_features=None, **kw):
        super().__init__(*args, routing_features=style_features, **kw)
        self.style_features = style_features
        self.reads_latent = style_features is not None

    @leaf_forward
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                coeffs: torch.Tensor | None = None) -> torch.Tensor:
        if self.reads_latent and coeffs is None:
            cond = self._latent(cond)
        return super().forward(x, cond, coeffs=coeffs)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._pad_repr()


class ConvertedModulatedConv1d(_Converted, _PrePad, ModulatedConv1d):
    """A :class:`~modweights.nn.ModulatedConv1d` made by :func:`convert` from an ``nn.Conv1d``.

    Shapes: ``forward(x (B, I, L) or (I, L), w=None) -> (B, O, L')``.
    """

    reads_latent = True

    @leaf_forward
    def forward(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, self._latent(w))

    def extra_repr(self) -> str:
        return super().extra_repr() + self._pad_repr()
