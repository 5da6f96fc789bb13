"""Routers: map a conditioning vector to mixing coefficients."""
from __future__ import annotations

import torch
from torch import nn

ROUTINGS = ("softmax", "sigmoid")


class Router(nn.Module):
    """``coeffs = act(Linear(cond) / temperature)``.

    ``softmax`` (DynamicConv, SMEAR: a convex combination; anneal ``temperature`` from high to
    1 during training as DynamicConv does) or ``sigmoid`` (CondConv: independent gates).

    Args:
        in_features: size of the conditioning vector.
        num_experts: K.
        routing: ``"softmax"`` or ``"sigmoid"``.
        temperature: divides the logits; a plain attribute, so training may change it.
        device, dtype: of the parameters, as for ``torch.nn`` layers.

    Shapes: ``(..., in_features) -> (..., K)``.
    """

    def __init__(self, in_features: int, num_experts: int, routing: str = "softmax", temperature: float = 1.0, *,
                 device=None, dtype=None):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"Router: `routing` must be one of {ROUTINGS}; got {routing!r}")
        if not temperature > 0:
            raise ValueError(f"Router: `temperature` must be > 0; got {temperature!r}")
        self.routing = routing
        self.temperature = float(temperature)
        self.fc = nn.Linear(in_features, num_experts, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Re-initialise the logits' linear as ``nn.Linear`` does."""
        self.fc.reset_parameters()

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        logits = self.fc(cond) / self.temperature
        return logits.softmax(-1) if self.routing == "softmax" else logits.sigmoid()

    def extra_repr(self) -> str:
        return f"routing={self.routing!r}, temperature={self.temperature}"
