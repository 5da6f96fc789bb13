"""Helpers shared by the torch backend's linear and conv2d formulations
(:mod:`.mod_linear`, :mod:`.mod_conv2d`): conditioning as rows, the mixed bias,
the cast of ``z``'s operands, the demodulated backward's upstream terms, and the bank mixing GEMMs."""
from __future__ import annotations

import torch

from .demod import acc

__all__ = ["acc", "_rows", "_bias_b", "_z_cast", "_scaled", "_add", "_mix", "_mix_t", "_inner", "demod_terms"]


def _rows(t):
    """(B, K) -> (B, 1, K); (B, T, K) stays; None stays."""
    if t is None:
        return None
    return t if t.dim() == 3 else t.unsqueeze(1)


def _bias_b(a, bias):
    """Bias broadcastable to the output rows: (O,) or a @ bias -> (B, Ta, O)."""
    if bias is None:
        return None
    if bias.dim() == 1:
        return bias
    return bias[0] if a is None else a @ bias


def _z_cast(x, cfg):
    """The cast of the operands of every product that can pass fp16's range (65504) where
    the demodulated output does not (docs/numerics.md): the scaled input ``u = x * s`` (x ~300
    with styles ~300), the pre-demodulation output ``z`` and the weight gradients' GEMMs over
    ``u``: float32 for float16 inputs with demodulation; the fused kernels do the same. (On a
    CPU the float32 GEMM is also much faster than the float16 one.) bfloat16 has float32's
    range; other dtypes as is."""
    if cfg.demodulate and x.dtype == torch.float16:
        return acc
    return lambda t: t


def _scaled(x, s, zc):
    """``u = x * s`` (``s`` broadcastable to ``x``, or None: ``x``), its operands cast by
    ``zc`` (:func:`_z_cast`) first, so that a float16 product beyond 65504 is float32."""
    return zc(x) if s is None else zc(x) * zc(s)


def _add(a, b):
    if b is None:
        return a
    return b if a is None else a + b


def _mix(a, bank):
    """sum_k a[g, k] bank[k]: (G, K) x (K, ...) -> (G, ...) as one GEMM (einsum routes these
    through bmm with a copy of the result: measured 2 extra B x O x I copies per step)."""
    return (a @ bank.reshape(bank.shape[0], -1)).view(a.shape[0], *bank.shape[1:])


def _mix_t(a, dM):
    """sum_g a[g, k] dM[g]: (G, K) x (G, ...) -> (K, ...)."""
    return (a.t() @ dM.reshape(dM.shape[0], -1)).view(a.shape[1], *dM.shape[1:])


def _inner(dM, bank):
    """<dM[g], bank[k]>_F: (G, ...) x (K, ...) -> (G, K)."""
    return dM.reshape(dM.shape[0], -1) @ bank.reshape(bank.shape[0], -1).t()


def demod_terms(g, y, d, a, bias, recompute, spatial: bool = False):
    """The demodulated backward's upstream terms ``(gz, c, d)``: ``gz = g * d`` (in g's dtype:
    the GEMM operands) and ``c = dd * d^3`` with ``dd = sum g * z`` over the rows (pixels)
    that share ``d``. ``z`` comes from the saved ``y = z * d + bias`` or, when ``d`` / ``y``
    were not saved or a graph is being built, from ``recompute() -> (z, d)`` (differentiably).
    ``d``, ``z`` and ``c`` are float32 for half inputs. ``spatial``: conv2d, g ``(B, O, H, W)``
    and d ``(B|1, O)``; else linear, g ``(B, T, O)`` and d ``(B|1, 1|T, O)``."""
    px = (lambda t: t[..., None, None]) if spatial else (lambda t: t)
    if d is None or y is None or torch.is_grad_enabled():
        z, d = recompute()
    else:
        bb = _bias_b(a, bias)
        z = (acc(y) if bb is None else acc(y) - px(bb)) / px(d)
    gz = (g * px(d)).to(g.dtype)
    dd = acc(g) * acc(z)
    c = (dd.sum((2, 3)) if spatial else dd).sum_to_size(d.shape) * d.pow(3)  # [B|1, 1|T, O] | [B|1, O]
    return gz, c, d
