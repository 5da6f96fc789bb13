"""mod_linear in Triton: how one call is laid out, chosen by counting (host only, no kernels).

:func:`layout` reads the conditioning modes of a call (none / per sample / per token) and picks
the formulation; the small helpers turn inputs into the kernels' stride and mode arguments
(:func:`_rows_strides`, :func:`_bias_mode`, :func:`_precisions`) and :func:`d_shape` gives the
shape of the demodulation coefficients the forward returns.

Layouts:

per sample, ``MIX_B``
    coefficients (if any) per sample, rows per sample many enough: row tiles inside one
    sample, the sample's mixture formed in the B-tile load, styles loaded as a vector;
    per-sample demodulation accumulated from the mixed tile (no pre-pass) up to
    ``mod_linear.DEMOD_IN_LOOP_MAX_T`` rows per sample, from a pre-pass beyond. FLOPs: one
    dense GEMM on tensor cores plus ``B * cdiv(T, BLOCK_T) * K * O * I`` mixing FMAs on CUDA
    cores.
stacked
    per-token coefficients, and per-sample ones with few rows per sample (CondConv heads at
    small T, decode): flat row tiles, coefficients (per row, or per sample gathered per row)
    scale the A tile, one dot per expert: K dense GEMMs (1 without coefficients), the bank
    read once per row tile — the decode regime's single pass over the bank.

The count (``FMA_COST``: a CUDA-core FMA costs ~6 tensor-core FLOPs on an H100; K_mix = K
with coefficients, 0 without; K_dots = K with coefficients, 1 without)::

    mix_b   = B * cdiv(T, 64) * (2 * 64 + 2 * FMA_COST * K_mix) * O * I
    stacked = cdiv(B * T, 64) * 64 * 2 * K_dots * O * I      (x 1.05 with per-sample styles/demod)

The weight side of per-sample coefficients in the stacked layout, without demodulation, is
counted too (:func:`choose_weight_stacked`): the fused per-sample kernel (one GEMM plus a fold of
``3 B K O I`` CUDA-core FMAs) or, with few rows per sample (decode), the stacked GEMM with ds
and da as per-row sums of the dx kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .. import _switches as switches
from ._modes import Bias

#: cost of one mixing FMA on CUDA cores, in tensor-core FLOPs (docs/design.md section 3: tensor cores run
#: ~6-7x faster than the CUDA-core FMAs the mixing needs, on an H100)
FMA_COST = 6


@dataclass(frozen=True)
class Layout:
    """How one call is laid out: the conditioning modes and the chosen formulation."""

    B: int
    T: int
    I: int
    O: int
    K: int
    coeffs: str  # "none" | "sample" | "token"
    styles: str  # "none" | "sample" | "token"
    demod: bool
    mix_b: bool  # row tiles per sample, mixture in the B-tile load (else stacked, flat rows)

    @property
    def token(self) -> bool:
        return self.coeffs == "token" or self.styles == "token"


def _mode(t, B, T) -> str:
    if t is None:
        return "none"
    # (B, 1, C) is per sample (the same memory as (B, C)); (B, 0, C) is per token, with per-token
    # strides: read as (B, C) it would index an empty buffer
    return "token" if t.dim() == 3 and T != 1 else "sample"


def choose_mix_b(B: int, T: int, K: int, has_coeffs: bool, per_sample_vectors: bool) -> bool:
    """Per-sample row tiles with the mixture in the B-tile load (True) or the stacked flat
    layout (False), by counting (module docstring). ``per_sample_vectors``: per-sample styles
    or demodulation, which the per-sample tiles load as vectors and demodulate without a
    pre-pass, and the stacked layout gathers per row: a tie-break of a few percent. The switch
    ``triton_mix_b`` (tests) decides instead where set."""
    forced = switches.get("triton_mix_b")
    if forced is not None:
        return forced
    bt = 64
    k_mix = K if has_coeffs else 0
    k_dots = K if has_coeffs else 1
    mix_b = B * triton.cdiv(T, bt) * (2 * bt + 2 * FMA_COST * k_mix)
    stacked = triton.cdiv(B * T, bt) * bt * 2 * k_dots * (1.05 if per_sample_vectors else 1.0)
    return mix_b <= stacked


def choose_weight_stacked(B: int, T: int, K: int, has_coeffs: bool, demod: bool, mix_b: bool) -> bool:
    """Weight side of per-sample coefficients in the stacked (flat-row) layout: the stacked GEMM
    ``dW_k = (a_k gz)^T (s x)`` over all rows (K dense GEMMs; ``da`` and ``ds`` as per-row sums
    from the dx kernel) instead of the fused per-sample kernel (one GEMM for ``Q_b`` plus a fold
    of ``3 B K O I`` CUDA-core FMAs). Counted per ``O * I`` in tensor-core FLOPs::

        fused   = B * (2 T + 3 FMA_COST K)
        stacked = cdiv(B T, 64) * 64 * 2 K

    so the stacked GEMM wins with few rows per sample (decode: T = 1). Only without
    demodulation (its per-sample ``c`` term has no per-row form here) and in the stacked
    layout (the forward counted few rows too). The switch ``triton_weight_stacked`` (tests)
    decides instead where set."""
    if not has_coeffs or demod or mix_b:
        return False
    forced = switches.get("triton_weight_stacked")
    if forced is not None:
        return forced
    fused = B * (2 * T + 3 * FMA_COST * K)
    stacked = triton.cdiv(B * T, 64) * 64 * 2 * K
    return stacked < fused


def layout(x, bank, coeffs, styles, demodulate: bool) -> Layout:
    """The :class:`Layout` of a call on canonical inputs (``_checks``: (B, 1, C) already per sample)."""
    B, T, I = x.shape
    K, O, _ = bank.shape
    cm, sm = _mode(coeffs, B, T), _mode(styles, B, T)
    vectors = sm == "sample" or (demodulate and sm != "token")
    mix_b = cm != "token" and choose_mix_b(B, T, K, cm == "sample", vectors)
    return Layout(B, T, I, O, K, cm, sm, bool(demodulate), mix_b)


def mixed_rows_demod(lay: Layout, coeffs) -> bool:
    """Per-row demodulation in the stacked layout with K > 1 coefficients: d and the ds
    term from the mixed rows (mod_linear_demod.py), not from squared-operand pair products."""
    return lay.demod and lay.token and not lay.mix_b and coeffs is not None and lay.K > 1


def d_shape(x_shape, bank_shape, coeffs_dim, styles_dim, demodulate: bool):
    """Shape of the float32 demodulation coefficients ``mod_linear.forward`` returns (for fake tensors)."""
    B, T, _ = x_shape
    O = bank_shape[1]
    if not demodulate:
        return (0,)
    if T != 1 and (coeffs_dim == 3 or styles_dim == 3):
        return (B, T, O)
    return (B if (coeffs_dim or styles_dim) else 1, O)


def _rows_strides(t):
    """(stride_b, stride_t, stride_c) of a (B, C) or (B, T, C) tensor; stride_t = 0 per sample."""
    if t is None:
        return (0, 0, 0)
    if t.dim() == 2:
        return (t.stride(0), 0, t.stride(1))
    return tuple(t.stride())


def _bias_mode(bias, coeffs):
    """(BIAS mode (:class:`._modes.Bias`), bias tensor, (stride_k, stride_o)); a (1, O) bias without
    coeffs is (O,)."""
    if bias is None:
        return Bias.NONE, None, (0, 0)
    if bias.dim() == 2 and coeffs is None:
        bias = bias[0]
    if bias.dim() == 1:
        return Bias.SHARED, bias, (0, bias.stride(0))
    return Bias.BANK, bias, tuple(bias.stride())


def _precisions(dtype, demodulate: bool = False):
    """(DOT_PREC, SQ_PREC, F32_DOT): tl.dot input precision of the float32 operands, and whether
    the GEMM operands are float32 for half inputs. float32 inputs: exact ("ieee") unless PyTorch
    allows TF32 matmuls, for the GEMM and the squared operands alike. Half inputs: the GEMM
    operands are half and the squared float32 operands may use TF32 (its 2^-11 relative error
    is below the inputs' own); except float16 with demodulation (F32_DOT): an A tile that is a
    product (``x * s``, ``a * x * s``) can pass 65504 where the demodulated output does not
    (docs/numerics.md), so the dots take float32 operands at TF32 precision (float16's 10-bit
    mantissa, float32's range; on the GPU about half the float16 tensor-core rate)."""
    if dtype == torch.float32:
        p = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return p, p, False
    return "tf32", "tf32", bool(demodulate) and dtype == torch.float16
