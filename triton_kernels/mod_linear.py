"""mod_linear in Triton: the host launchers (checks, allocation, which kernels run in which
order) of the forward and the backward, over the kernels of :mod:`.mod_linear_fwd`,
:mod:`.mod_linear_bwd` and :mod:`.mod_linear_demod`.

Canonical inputs (see ``modweights._checks``)::

    x (B, T, I)    bank (K, O, I)    coeffs None | (B, K) | (B, T, K)
    styles None | (B, I) | (B, T, I)    bias None | (O,) | (K, O)

:func:`forward` returns ``(y (B, T, O), d)`` with ``d`` the float32 demodulation
coefficients (``(Bd, O)`` per sample, ``Bd = 1`` without conditioning; ``(B, T, O)`` per
token; empty without demodulation: :func:`.mod_linear_layout.d_shape`). :func:`backward`
returns the five gradients, an empty tensor for each one not asked for.

The layout of a call (per-sample ``MIX_B`` row tiles or stacked flat rows) is chosen by
counting in :mod:`.mod_linear_layout`; every launch goes through
the one launch path :func:`._launch.launch` (tuning, interpreter, AOT recording), with which
:mod:`.mod_linear_launch` registers the kernels; that module also holds the backward's
per-kernel launchers.

Per-token conditioning (coeffs or styles per token) demodulates per row; the forward
accumulates the row norms from squared operands in the same kernel, and the backward
works per row (see :func:`backward`). In the stacked layout with K > 1 coefficients the
row norms and the backward's ds term (quadratic in the mixture) come instead from the mixed
rows, in ``mod_linear_demod.py`` (the squared-operand pair products cancel when the experts
do: see there).

Nothing of size ``B x O x I`` is allocated on any path.
"""
from __future__ import annotations

import contextlib

import torch
import triton

from . import _launch as L
from . import _record
from . import mod_linear_launch as LA
from .. import _switches as switches
from .._bias import bias_grads
from .._checks import (
    check_canonical_mod_linear, check_device, check_dtype, check_grad_output, check_needs, check_saved)
from ._host import absent, ptr
from ._modes import Bias, Demod
from .mod_linear_bwd import _mod_linear_bwd_prep_sample_kernel, _mod_linear_bwd_prep_token_kernel
from .mod_linear_demod import _mod_linear_demod_rows_bwd_kernel, _mod_linear_demod_rows_kernel
from .mod_linear_fwd import _mod_linear_demod_kernel, _mod_linear_fwd_kernel
from .mod_linear_layout import (
    _bias_mode, _precisions, _rows_strides, choose_weight_stacked, layout, mixed_rows_demod)

#: per-sample demodulation with row tiles per sample: up to this many rows per sample the
#: forward kernel accumulates d from its mixed B tiles (every row tile redoing ``O * I``
#: FMAs); beyond it a pre-pass computes d once per sample (tests lower it: the switch
#: ``triton_demod_in_loop_max_t``)
DEMOD_IN_LOOP_MAX_T = 128


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(op, x, bank, coeffs, styles, bias):
    """Check what the kernels assume (the glue's custom ops, torch.ops.modweights.mod_linear_triton*,
    are public) with the package's one set of checks; returns ``(coeffs, styles)`` with
    ``(B, 1, C)`` conditioning as per sample (``_checks.as_per_sample``)."""
    check_dtype(op, x, (torch.float16, torch.bfloat16, torch.float32), "triton")
    coeffs, styles = check_canonical_mod_linear(op, x, bank, coeffs, styles, bias)
    ok = x.is_cuda or (x.device.type == "cpu" and LA.INTERPRETED) or (x.is_meta and _record.active())
    check_device(op, x, ok, "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return coeffs, styles


# ----------------------------------------------------------------------------- forward


def forward(x, bank, coeffs, styles, bias, demodulate: bool, eps: float):
    """``y = d * ((sum_k a_k W_k) * s) x + bias`` without forming any per-sample weight.

    Args:
        x: ``(B, T, I)``. bank: ``(K, O, I)``. coeffs: None | ``(B, K)`` | ``(B, T, K)``.
        styles: None | ``(B, I)`` | ``(B, T, I)``. bias: None | ``(O,)`` | ``(K, O)``.

    Returns:
        ``y (B, T, O)`` in x's dtype and ``d`` (float32, see :func:`d_shape`).

    Cost: the GEMM kernel (one dense GEMM of FLOPs with ``MIX_B`` or without coefficients,
    K when stacked), plus for per-sample demodulation in the stacked layout a pre-pass of
    ``Bd * K * O * I`` CUDA-core FMAs; per-row demodulation adds, with K > 1 coefficients in
    the stacked layout, a pre-pass of ``B * T * K * O * I`` CUDA-core FMAs on the mixed rows
    (mod_linear_demod.py), else one GEMM of squared operands in the same kernel.
    """
    coeffs, styles = _check("mod_linear (triton) forward", x, bank, coeffs, styles, bias)
    B, T, I = x.shape
    K, O, _ = bank.shape
    lay = layout(x, bank, coeffs, styles, demodulate)
    precs = _precisions(x.dtype, demodulate)
    dot_prec, sq_prec, f32_dot = precs
    y = torch.empty((B, T, O), dtype=x.dtype, device=x.device)
    f32 = torch.float32
    bias_flag, bias_t, bias_str = _bias_mode(bias, coeffs)
    a_str, s_str = _rows_strides(coeffs), _rows_strides(styles)
    dev = x.device

    with _device_guard(x):
        if not demodulate:
            d, demod_flag, d_str = torch.empty(0, dtype=f32, device=x.device), Demod.OFF, (0, 0, 0)
        elif mixed_rows_demod(lay, coeffs):
            d = torch.empty((B, T, O), dtype=f32, device=x.device)
            demod_flag, d_str = Demod.READ, tuple(d.stride())
            L.launch(_mod_linear_demod_rows_kernel, lambda m: (triton.cdiv(B * T, m["BLOCK_R"]),
                                                                 triton.cdiv(O, m["BLOCK_O"])), (
                bank, coeffs, ptr(styles, dev), d,
                B, T, I, O, K,
                *bank.stride(), *a_str, *s_str, *d.stride(),
                eps,
            ), dict(HAS_STYLES=styles is not None))
        elif lay.token:
            d = torch.empty((B, T, O), dtype=f32, device=x.device)
            demod_flag, d_str = Demod.ROW, tuple(d.stride())
        elif lay.mix_b and T <= switches.get("triton_demod_in_loop_max_t", DEMOD_IN_LOOP_MAX_T):
            # few row tiles per sample: d from the mixed tile in the main loop (each row tile of
            # a sample recomputes it: cheaper than a pre-pass while the tiles are few).
            # Without conditioning every sample computes the same d: all store it to one row.
            Bd = B if (coeffs is not None or styles is not None) else 1
            d = torch.empty((Bd, O), dtype=f32, device=x.device)
            demod_flag, d_str = Demod.LOOP, (O if Bd > 1 else 0, 0, 1)
        else:
            Bd = B if (coeffs is not None or styles is not None) else 1
            d = torch.empty((Bd, O), dtype=f32, device=x.device)
            demod_flag, d_str = Demod.READ, (O if Bd > 1 else 0, 0, 1)
            L.launch(_mod_linear_demod_kernel, lambda m: (Bd, triton.cdiv(O, m["BLOCK_O"])), (
                bank, ptr(coeffs, dev), ptr(styles, dev), d,
                I, O, K,
                *bank.stride(), a_str[0], a_str[2], s_str[0], s_str[2], O, 1,
                eps,
            ), dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None))

        rows = T if lay.mix_b else B * T

        def grid(meta):
            bt = meta["BLOCK_T"]
            n_r = B * triton.cdiv(T, bt) if lay.mix_b else triton.cdiv(B * T, bt)
            return (n_r, triton.cdiv(O, meta["BLOCK_O"]))

        args = (
            x, bank, ptr(coeffs, dev), ptr(styles, dev),
            ptr(bias_t, dev), d, y,
            B, T, I, O, K, triton.next_power_of_2(rows),
            *x.stride(), *bank.stride(), *a_str, *s_str, *bias_str, *d_str, *y.stride(),
            eps,
        )
        flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None,
                     S_PER_ROW=lay.styles == "token", MIX_B=lay.mix_b, DEMOD=demod_flag, BIAS=bias_flag,
                     DOT_PREC=dot_prec, SQ_PREC=sq_prec, F32_DOT=f32_dot,
                     BLOCK_K=triton.next_power_of_2(K) if (coeffs is not None and lay.mix_b) else 1)
        L.launch(_mod_linear_fwd_kernel, grid, args, flags)
    return y, d


# ----------------------------------------------------------------------------- backward


def backward(g, x, bank, coeffs, styles, bias, d, y, demodulate: bool, eps: float, needs):
    """Gradients of :func:`forward`: ``(dx, dbank, dcoeffs, dstyles, dbias)``, an empty
    tensor for each one not in ``needs`` (or whose input is None).

    ``d`` and ``y`` are what the forward returned (``y`` only needed with demodulation: the
    pre-demodulation output is recovered as ``z = (y - bias) / d``). ``g`` may have any
    strides (an expanded gradient has stride 0).

    Per sample (coeffs (B, K) | None, styles (B, I) | None): a pre-pass over (g, y) for
    ``G1 = sum_t g`` and ``c = dd d^3``; the dx kernel (one GEMM, mixing on the fly); the
    fused weight kernel (one GEMM + ``3 B K O I`` FMAs) for dW_k, ds and da together.

    Per token: ``gz = g d`` and ``c`` elementwise (demodulation only); the dx kernel also
    produces the per-row ds and (per-token coefficients) da. Per-token coefficients: dx costs
    K dense GEMMs (with demodulation and ds/da, the mixed-rows kernel adds their demodulation
    terms: ``B * T * (2K + 3) * O * I`` CUDA-core FMAs), dW K dense GEMMs (+ K^2 with
    demodulation and styles). Per-sample coefficients with per-token styles: dx one GEMM
    (+1 with demodulation), the fused weight kernel one GEMM (+1 with demodulation).
    """
    op = "mod_linear (triton) backward"
    coeffs_in, styles_in = coeffs, styles
    coeffs, styles = _check(op, x, bank, coeffs, styles, bias)
    nx, nbank, na, ns, nbias = check_needs(op, needs)
    B, T, I = x.shape
    K, O, _ = bank.shape
    check_grad_output(op, g, (B, T, O))
    if demodulate:
        check_saved(op, d, y)
    na = na and coeffs is not None
    ns = ns and styles is not None
    nbias = nbias and bias is not None
    lay = layout(x, bank, coeffs, styles, demodulate)
    dev, dtype, f32 = x.device, x.dtype, torch.float32
    det = torch.are_deterministic_algorithms_enabled()
    precs = _precisions(dtype, demodulate)
    a_str, s_str = _rows_strides(coeffs), _rows_strides(styles)
    bias_flag, bias_t, bias_str = _bias_mode(bias, coeffs)
    NBANK = K if coeffs is not None else 1  # bank entries mixed: K, or W_0 alone without coefficients
    BK = triton.next_power_of_2(NBANK)
    empty = lambda: torch.empty(0, dtype=dtype, device=dev)  # noqa: E731
    dx = dbank = None
    G1 = None  # sum_t g per sample, float32 (B, O)
    da = None  # float32 coefficient gradient before the bias part
    ds = None  # float32 styles gradient

    with _device_guard(x):
        gsrc, c, c_str, demod_dx = g, absent(dev), (0, 0, 0), Demod.OFF
        if not lay.token:
            # ---- per sample: pre-pass, dx, fused weight kernel
            if demodulate or nbias or (na and bias_flag == Bias.BANK):
                G1 = torch.empty((B, O), dtype=f32, device=dev)
                c = torch.empty((B, O), dtype=f32, device=dev) if demodulate else G1
                L.launch(_mod_linear_bwd_prep_sample_kernel, lambda m: (B, triton.cdiv(O, m["BLOCK_O"])), (
                    g, ptr(y, dev), d if demodulate else absent(dev), ptr(coeffs, dev),
                    ptr(bias_t, dev), G1, c,
                    T, O, NBANK,
                    *g.stride(), *((0, 0, 0) if y is None else y.stride()),
                    (d.stride(0) if d.shape[0] > 1 else 0) if demodulate else 0, 1,
                    a_str[0], a_str[2], *bias_str, O, 1, O, 1,
                ), dict(DEMOD=demodulate, BIAS=bias_flag))
                c_str = (O, 0, 1)
            d_str = ((d.stride(0) if d.shape[0] > 1 else 0), 0, 1) if demodulate else (0, 0, 0)
            if choose_weight_stacked(B, T, K, coeffs is not None, demodulate, lay.mix_b):
                # few rows per sample: ds and da as per-row sums of the dx kernel, dW stacked
                dx, ds, da = LA._dx_rows(lay, g, bank, coeffs, styles, x, nx, ns, na, a_str, s_str, det,
                                      precs, BK)
                if ds is not None:
                    ds = ds.sum(1)
                if da is not None:
                    da = da.sum(1)
                if nbank:
                    dbank = torch.empty((K, O, I), dtype=bank.dtype, device=dev)
                    LA._weight_token(g, x, bank, coeffs, styles, absent(dev), (0, 0, 0), dbank, a_str, s_str,
                                     False, precs)
            elif nx:
                dx = torch.empty((B, T, I), dtype=dtype, device=dev)
                LA._dx(lay, g, bank, coeffs, styles, x, d if demodulate else absent(dev), absent(dev), dx,
                       absent(dev), absent(dev), a_str, s_str, d_str, (0, 0, 0), (0, 0, 0, 0),
                       Demod.READ if demodulate else Demod.OFF, store_dx=True, row_ds=False, row_da=False, atomic=False, precs=precs,
                       BK=BK)
            if (nbank or ns or na) and not choose_weight_stacked(B, T, K, coeffs is not None, demodulate,
                                                                 lay.mix_b):
                dbank, ds, da = LA._weight(lay, g, x, bank, coeffs, styles, d if demodulate else absent(dev), c,
                                           c_str, Demod.READ if demodulate else Demod.OFF, nbank, ns, na, det, precs,
                                           BK)
        else:
            # ---- per token
            if demodulate:
                gsrc = torch.empty((B, T, O), dtype=dtype, device=dev)
                c = torch.empty((B, T, O), dtype=f32, device=dev)
                c_str = tuple(c.stride())
                L.launch(_mod_linear_bwd_prep_token_kernel, lambda m: (triton.cdiv(B * T, m["BLOCK_T"]),
                                                                      triton.cdiv(O, m["BLOCK_O"])), (
                    g, y, d, ptr(coeffs, dev), ptr(bias_t, dev), gsrc, c,
                    B, T, O, NBANK,
                    *g.stride(), *y.stride(), *d.stride(), *a_str, *bias_str, *gsrc.stride(), *c.stride(),
                ), dict(BIAS=bias_flag))
                demod_dx = Demod.ROW
            mixed = mixed_rows_demod(lay, coeffs)
            if mixed:
                demod_dx = Demod.OFF  # gsrc is gz; the ds and da demodulation terms come from the mixed rows
            row_ds = ns
            row_da = na and lay.coeffs == "token"
            if nx or row_ds or row_da:
                dx, dsr, dap, dap_str = LA._row_outputs(B, T, I, NBANK, dtype, dev, nx, row_ds, row_da, det)
                LA._dx(lay, gsrc, bank, coeffs, styles, x, absent(dev), c, dx, dsr, dap,
                    a_str, s_str, (0, 0, 0), c_str, dap_str, demod_dx,
                    store_dx=nx, row_ds=row_ds, row_da=row_da, atomic=not det, precs=precs, BK=BK)
                if mixed and (row_ds or row_da):
                    n_it = triton.cdiv(I, L.fixed_meta(_mod_linear_demod_rows_bwd_kernel)["BLOCK_I"])
                    dad = torch.empty((n_it, B, T, NBANK) if row_da else (1,), dtype=f32, device=dev)
                    L.launch(_mod_linear_demod_rows_bwd_kernel, lambda m: (triton.cdiv(B * T, m["BLOCK_R"]), n_it), (
                        bank, coeffs, ptr(styles, dev), c, dsr, dad,
                        B, T, I, O, NBANK,
                        *bank.stride(), *a_str, *s_str, *c_str,
                        *((dsr.stride()) if row_ds else (0, 0, 0)), *(dad.stride() if row_da else (0, 0, 0, 0)),
                    ), dict(HAS_STYLES=styles is not None, NEED_DS=row_ds, NEED_DA=row_da, BLOCK_K=BK))
                    if row_da:
                        dap[0] -= dad.sum(0)
                if not nx:
                    dx = None
                if row_ds:
                    ds = dsr if lay.styles == "token" else dsr.sum(1)
                if row_da:
                    da = dap.sum(0)
            if lay.coeffs == "token":
                if nbank:
                    dbank = torch.empty((K, O, I), dtype=bank.dtype, device=dev)
                    LA._weight_token(gsrc, x, bank, coeffs, styles, c, c_str, dbank, a_str, s_str, demodulate,
                                  precs)
            elif nbank or na:
                # per-sample (or no) coefficients, per-token styles: the fused kernel, per-row styles
                dbank, _, da = LA._weight(lay, gsrc, x, bank, coeffs, styles, absent(dev), c, c_str,
                                          Demod.ROW if demodulate else Demod.OFF, nbank, False, na, det, precs, BK)

        # ---- bias: dbias and the bias part of dcoeffs (small GEMMs over (B, O) or (B*T, O))
        dbias = None
        if bias is not None and (nbias or (na and bias_flag == Bias.BANK)):
            if lay.coeffs == "token":  # a coefficient vector per row
                g_rows, a_rows = g.reshape(B * T, O).to(f32), coeffs.reshape(B * T, -1).to(f32)
            else:  # per sample: g summed over the sample's rows
                g_rows = G1 if G1 is not None else g.to(f32).sum(1)
                a_rows = None if coeffs is None else coeffs.to(f32)
            dbias, da_bias = bias_grads(g_rows, a_rows, bias, nbias, na)
            if da_bias is not None:
                da = da + da_bias.view(da.shape)

    def out(t, ref, need):
        if not need or t is None:
            return empty()
        return t.to(ref.dtype).reshape(ref.shape)

    return (
        out(dx, x, nx),
        out(dbank, bank, nbank),
        out(da, coeffs_in, na),
        out(ds, styles_in, ns),
        out(dbias, bias, nbias),
    )
