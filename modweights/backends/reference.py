"""The `reference` backend: the oracle every other backend is tested against.

It forms each sample's (or token's) effective weight explicitly, exactly as DESIGN.md
section 1 writes it, and lets autograd differentiate. Never optimised, never clever:
it materialises ``(B, [T,] O, I)`` weights (conv2d: ``(B, O, I/groups, kh, kw)``) and
loops over samples for conv2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import Conv2dConfig, LinearConfig

NAME = "reference"
DIRECT = True  # differentiable as written: no autograd.Function around it


def availability(device: torch.device) -> tuple[bool, str]:
    return True, "pure PyTorch, any device"


def supports(op: str, **problem) -> tuple[bool, str]:
    return True, ""


def _mix(coeffs, bank, B):
    """coeffs (B, K) | (B, T, K) | None, bank (K, O, ...) -> (B, Tc, O, ...) with Tc in {1, T}."""
    if coeffs is None:
        return bank[0].expand(B, 1, *bank.shape[1:])
    if coeffs.dim() == 2:
        coeffs = coeffs.unsqueeze(1)
    return torch.einsum("btk,k...->bt...", coeffs, bank)


def _mix_bias(coeffs, bias, B):
    """The per-sample (or per-token) bias, broadcastable against (B, T, O)."""
    if bias is None:
        return None
    if bias.dim() == 1:
        return bias
    if coeffs is None:
        return bias[0]
    if coeffs.dim() == 2:
        coeffs = coeffs.unsqueeze(1)
    return coeffs @ bias  # (B, Tc, O)


def linear(x, bank, coeffs, styles, bias, cfg: LinearConfig):
    """y[b, t] = Weff[b, t] @ x[b, t] + bias[b, t]; x (B, T, I) -> y (B, T, O)."""
    B = x.shape[0]
    V = _mix(coeffs, bank, B)  # [B, Tc, O, I]
    if styles is not None:
        s = styles if styles.dim() == 3 else styles.unsqueeze(1)
        V = V * s.unsqueeze(2)  # [B, Tw, O, I]
    if cfg.demodulate:
        V = V * torch.rsqrt(V.pow(2).sum(dim=-1, keepdim=True) + cfg.eps)
    y = (V @ x.unsqueeze(-1)).squeeze(-1)  # [B, T, O]
    b = _mix_bias(coeffs, bias, B)
    return y if b is None else y + b


def conv2d(x, bank, coeffs, styles, bias, cfg: Conv2dConfig):
    """y[b] = conv2d(x[b], Weff[b]) + bias[b]; x (B, I, H, W) -> y (B, O, H', W')."""
    B = x.shape[0]
    V = _mix(coeffs, bank, B)[:, 0]  # [B, O, I/g, kh, kw]
    if styles is not None:
        V = V * styles[:, None, :, None, None]
    if cfg.demodulate:
        V = V * torch.rsqrt(V.pow(2).sum(dim=(2, 3, 4), keepdim=True) + cfg.eps)
    b = _mix_bias(coeffs, bias, B)
    ys = []
    for i in range(B):
        bi = None if b is None else (b if b.dim() == 1 else b[i, 0])
        ys.append(F.conv2d(x[i : i + 1], V[i], bi, cfg.stride, cfg.padding, cfg.dilation, cfg.groups))
    return torch.cat(ys, dim=0)
