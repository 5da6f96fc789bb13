"""The `reference` backend: the oracle every other backend is tested against.

It forms each sample's (or token's) effective weight explicitly, exactly as docs/design.md
section 1 writes it, and lets autograd differentiate. Never optimised, never clever:
it materialises one weight per sample, ``(B, O, I)`` (conv2d: ``(B, O, I/groups, kh, kw)``),
and one per token, ``(B, T, O, I)``, only where the conditioning is per token; linear
applies them with one ``einsum`` per sample (or token), conv2d loops over samples. Nothing
larger than the weights it forms and the activations: per-sample linear never broadcasts its
``(B, O, I)`` weights over T, so the oracle stays usable at GPU sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import ModConv2dConfig, ModLinearConfig

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


def _demodulate(V, dims, eps):
    """``V * rsqrt(sum_dims V^2 + eps)``, the statistics in float32 for half inputs (an eps
    of 1e-8 underflows in fp16, and the sum of squares of values ~100 overflows it)."""
    Vs = V.float() if V.dtype in (torch.float16, torch.bfloat16) else V
    return (Vs * torch.rsqrt(Vs.pow(2).sum(dim=dims, keepdim=True) + eps)).to(V.dtype)


def mod_linear(x, bank, coeffs, styles, bias, cfg: ModLinearConfig):
    """y[b, t] = Weff[b, t] @ x[b, t] + bias[b, t]; x (B, T, I) -> y (B, T, O).

    ``Weff`` is ``(B, O, I)`` with per-sample conditioning (the same for the T rows of a
    sample), ``(B, T, O, I)`` where coeffs or styles are per token."""
    B = x.shape[0]
    V = _mix(coeffs, bank, B)  # [B, Tc, O, I]
    if styles is not None:
        s = styles if styles.dim() == 3 else styles.unsqueeze(1)
        V = V * s.unsqueeze(2)  # [B, Tw, O, I]
    if cfg.demodulate:
        V = _demodulate(V, (-1,), cfg.eps)
    if V.shape[1] == 1:  # one weight per sample, shared by its T rows
        y = torch.einsum("bti,boi->bto", x, V[:, 0])  # [B, T, O]
    else:  # one weight per token
        y = torch.einsum("bti,btoi->bto", x, V)  # [B, T, O]
    b = _mix_bias(coeffs, bias, B)
    return y if b is None else y + b


def mod_conv2d(x, bank, coeffs, styles, bias, cfg: ModConv2dConfig):
    """y[b] = conv2d(x[b], Weff[b]) + bias[b]; x (B, I, H, W) -> y (B, O, H', W')."""
    B = x.shape[0]
    V = _mix(coeffs, bank, B)[:, 0]  # [B, O, I/g, kh, kw]
    if styles is not None:
        V = V * styles[:, None, :, None, None]
    if cfg.demodulate:
        V = _demodulate(V, (2, 3, 4), cfg.eps)
    b = _mix_bias(coeffs, bias, B)
    geo = (cfg.stride, cfg.padding, cfg.dilation, cfg.groups)
    if B == 0:  # no sample to loop over: the empty batch convolved with the sum of no filters
        # (zeros) is the empty output, with every input in the graph (zero gradients, as F.conv2d)
        b0 = None if b is None else (b if b.dim() == 1 else b.sum((0, 1)))
        return F.conv2d(x, V.sum(0), b0, *geo)
    ys = []
    for i in range(B):
        bi = None if b is None else (b if b.dim() == 1 else b[i, 0])
        ys.append(F.conv2d(x[i : i + 1], V[i], bi, *geo))
    return torch.cat(ys, dim=0)
