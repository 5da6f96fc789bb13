"""Initialisation shared by the layers: each expert like its dense counterpart."""
import math

import torch
from torch import nn


def init_bank_(bank: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Initialise every expert ``bank[k]`` as ``nn.Linear``/``nn.Conv2d`` initialise their
    weight (Kaiming-uniform, a = sqrt(5)), and a ``(O,)`` or ``(K, O)`` bias as theirs."""
    with torch.no_grad():
        for k in range(bank.shape[0]):
            nn.init.kaiming_uniform_(bank[k], a=math.sqrt(5))
        if bias is not None:
            fan_in = bank[0][0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(bias, -bound, bound)


def modulated_params_(layer: nn.Module, weight_shape: tuple, in_features: int, style_features: int, bias: bool,
                      factory: dict) -> None:
    """Give a modulated layer its ``weight (O, I, *kernel)``, ``bias (O,)`` (or None) and style
    ``affine`` (``nn.Linear(style_features, in_features)``, its bias at 1: the styles start at
    about 1, so the layer starts as its dense counterpart, as StyleGAN2's), drawn in the order
    of :func:`reset_modulated_` (the affine's own construction draws last), so that
    ``reset_parameters`` under a seed reproduces construction under it."""
    layer.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
    layer.bias = nn.Parameter(torch.empty(weight_shape[0], **factory)) if bias else None
    init_bank_(layer.weight.data.unsqueeze(0), layer.bias)
    layer.affine = nn.Linear(style_features, in_features, **factory)
    nn.init.ones_(layer.affine.bias)


def reset_modulated_(layer: nn.Module) -> None:
    """Re-initialise a modulated layer as :func:`modulated_params_` initialised it."""
    init_bank_(layer.weight.data.unsqueeze(0), layer.bias)
    layer.affine.reset_parameters()
    nn.init.ones_(layer.affine.bias)
