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
