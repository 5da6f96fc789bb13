"""Drop-in replacements for peers' modulated / conditional convolutions.

``modweights.compat.stylegan2``
    ``modulated_conv2d(...)`` with StyleGAN2-ADA's signature and semantics (also StyleGAN3's
    ``networks_stylegan2.py``), plus ``upfirdn2d`` / ``setup_filter`` in plain PyTorch.
``modweights.compat.timm``
    ``swap_condconv(model) -> int``: replace every ``timm.layers.CondConv2d`` in place by a
    :class:`~modweights.nn.MixtureConv2d` that shares timm's parameter tensors.

The submodules load on first use, so ``import modweights.compat`` never imports timm
(an optional dependency).
"""
from __future__ import annotations

import importlib

__all__ = ["stylegan2", "timm", "swap_condconv"]


def __getattr__(name):
    if name in ("stylegan2", "timm"):
        return importlib.import_module(f"{__name__}.{name}")
    if name == "swap_condconv":
        return importlib.import_module(f"{__name__}.timm").swap_condconv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
