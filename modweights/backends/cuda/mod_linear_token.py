"""The cuda backend's per-token launchers for ``mod_linear`` (coefficients ``(B, T, K)`` and/or
styles ``(B, T, I)``, and decode): the kernels of ``csrc/mod_linear_token*.cu`` (see the module
docstring of :mod:`.cuda` for the formulation). Split from :mod:`.cuda` by role: that module
owns the extension, availability, validation and the per-sample launchers; the helpers used
here are read from it at call time (``CB.<name>``), so the two import each other safely."""
from __future__ import annotations

import torch

from ..._bias import bias_grads
from ..._checks import ModLinearConfig
from .. import cuda as CB


def _bias(pp):
    """fp32 bias the per-token kernels read at row ``r // bias_div`` with ``bias_stride_b``:
    ``(O,)`` shared, ``(B, O)`` mixed per sample, or ``(B * T, O)`` mixed per token."""
    if pp.bias is None:
        return None, 0, 1
    if pp.bias.dim() == 1:
        return pp.bias.float().contiguous(), 0, 1
    if pp.coeffs is None:  # K == 1
        return pp.bias[0].float().contiguous(), 0, 1
    a = pp.coeffs.float().reshape(-1, pp.K)  # (B * T, K) per token, (B, K) per sample
    return (a @ pp.bias.float()).contiguous(), pp.O, pp.a_div


def _launch_params(ext, pp, cfg: ModLinearConfig):
    bb, bias_stride_b, bias_div = _bias(pp)
    p = CB._params(ext, pp, cfg, bias_stride_b, pp.a_div, pp.s_div, bias_div)
    p.x, p.bank, p.coeffs, p.styles = CB._ptr(pp.x), CB._ptr(pp.bank), CB._ptr(pp.coeffs), CB._ptr(pp.styles)
    p.bias = CB._ptr(bb)
    return p, bb  # keep bb alive while p points at it


def forward(ext, pp, cfg: ModLinearConfig):
    """Per-token forward: ``d (B, T, O)`` (demodulation kernel), then ``y (B, T, O)``."""
    B, T, O = pp.B, pp.T, pp.O
    dev = pp.device
    if CB._empty_problem(pp):
        return _forward_empty(pp, cfg)
    stream = CB._stream(dev)
    p, _bb = _launch_params(ext, pp, cfg)
    demod = ext.mod_linear_token_demod if cfg.demodulate else None
    return CB._demod_then_forward(p, stream, demod, ext.mod_linear_token_forward, (B, T, O), (B, T, O), dev, pp.dtype)


def _forward_empty(pp, cfg: ModLinearConfig):
    """No rows or no input features: y is the bias alone (d = rsqrt(eps) with I = 0)."""
    B, T, O = pp.B, pp.T, pp.O
    dev, f32 = pp.device, torch.float32
    bb, _, div = _bias(pp)
    y = torch.zeros((B, T, O), device=dev, dtype=f32)
    if bb is not None and B * T > 0:
        y += bb if bb.dim() == 1 else bb.repeat_interleave(div, 0).view(B, T, O)
    d = torch.full((B, T, O), cfg.eps ** -0.5, device=dev, dtype=f32) if cfg.demodulate else None
    return y.to(pp.dtype), d


def backward(ext, pp, g, d, y, cfg: ModLinearConfig, needs, coeffs_in, styles_in):
    """Per-token gradients (see csrc/mod_linear_token.cuh): ``(dx, dbank, dcoeffs, dstyles,
    dbias)`` with None for what ``needs`` leaves out."""
    nx, nbank, na, ns, nbias = needs
    B, T, I, O, K = pp.B, pp.T, pp.I, pp.O, pp.K
    R = B * T
    dev, dtype = pp.device, pp.dtype
    f32 = dict(device=dev, dtype=torch.float32)
    g = g.reshape(B, T, O).to(dtype).contiguous()
    dx = dbank = da = ds = dbias = None
    if CB._empty_problem(pp):
        da_r = torch.zeros((B, T, K), **f32) if na else None
        ds_r = torch.zeros((B, T, I), **f32) if ns else None
        dx = torch.zeros((B, T, I), device=dev, dtype=dtype) if nx else None
        dbank = torch.zeros((K, O, I), device=dev, dtype=dtype) if nbank else None
    else:
        stream = CB._stream(dev)
        p, _bb = _launch_params(ext, pp, cfg)
        p.g = g.data_ptr()
        need_c = cfg.demodulate and (nbank or na or ns)
        c = None
        if cfg.demodulate:
            if d is None or y is None:  # not saved: recompute
                y, d = forward(ext, pp, cfg)
            d = d.reshape(B, T, O).float().contiguous()
            y = y.reshape(B, T, O).to(dtype).contiguous()
            gz = torch.empty((B, T, O), device=dev, dtype=dtype)
            p.d, p.y, p.gz = d.data_ptr(), y.data_ptr(), gz.data_ptr()
            if need_c:
                c = torch.empty((B, T, O), **f32)
                p.c = c.data_ptr()
            ext.mod_linear_token_prep(p, stream)
        else:
            p.gz = g.data_ptr()  # d = 1: gz = g, and c = 0 (NULL: the squared terms are skipped)

        # dx, the x u part of ds and the gz part of da: one pass of K GEMMs
        ds_r = da_r = parts = None
        if nx or ns or na:
            if nx:
                dx = torch.empty((B, T, I), device=dev, dtype=dtype)
                p.dx = dx.data_ptr()
            if ns:
                ds_r = torch.empty((B, T, I), **f32)
                p.ds_rows = ds_r.data_ptr()
            if na:  # per column tile partials: [0] the gz term, [1] the demodulation term
                parts = torch.empty((2 if c is not None else 1, CB._cdiv(I, CB.TOKEN_TILE), R, K), **f32)
                p.da_rows = parts.data_ptr()
            ext.mod_linear_token_dx(p, stream)
            if ns and c is not None:
                ext.mod_linear_token_ds_demod(p, stream)
            if na and c is not None:
                ext.mod_linear_token_da_demod(p, stream)
        if na:
            da_r = parts[0].sum(0)
            if c is not None:
                da_r = da_r - parts[1].sum(0)
            da_r = da_r.view(B, T, K)
        if nbank:
            dbank = torch.empty((K, O, I), device=dev, dtype=dtype)
            p.dbank = dbank.data_ptr()
            ext.mod_linear_token_weight(p, stream)

    # ---- bias: dbias and the bias part of dcoeffs ((B, T, O)-sized torch ops)
    bias = pp.bias
    a_tok = pp.coeffs is not None and pp.a_div == 1
    da_bias = None
    if bias is not None and (nbias or (na and bias.dim() == 2)):
        g2 = g.float()
        if a_tok:  # a coefficient vector per row
            g_rows, a_rows = g2.reshape(R, O), pp.coeffs.float().reshape(R, K)
        else:  # per sample: g summed over the sample's rows
            g_rows, a_rows = g2.sum(1), None if pp.coeffs is None else pp.coeffs.float()
        db, da_bias = bias_grads(g_rows, a_rows, bias, nbias, na)
        if db is not None:
            dbias = db.to(bias.dtype).contiguous()
    if na:
        da = da_r if a_tok else da_r.sum(1)
        if da_bias is not None:
            da = da + da_bias.view(da.shape)
        da = da.to(coeffs_in.dtype).reshape(coeffs_in.shape).contiguous()
    if ns:
        ds = ds_r if pp.s_div == 1 else ds_r.sum(1)
        ds = ds.to(styles_in.dtype).reshape(styles_in.shape).contiguous()
    return dx, dbank, da, ds, dbias
