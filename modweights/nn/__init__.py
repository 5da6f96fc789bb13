"""Layers built on :mod:`modweights.functional`. Each has a ``backend`` attribute
(``None`` = follow :func:`modweights.use_backend` / ``MODWEIGHTS_BACKEND`` / auto)."""
from .conv import MixtureConv2d, ModulatedConv2d
from .linear import MixtureLinear, ModulatedLinear
from ._routing import ROUTING_MODES, decoding, masked_mean
from .routers import Router

__all__ = ["ModulatedLinear", "MixtureLinear", "ModulatedConv2d", "MixtureConv2d", "Router", "ROUTING_MODES", "decoding",
           "masked_mean"]
