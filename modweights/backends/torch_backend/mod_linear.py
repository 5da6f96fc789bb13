"""The torch backend's ``mod_linear`` (op key ``linear``): the ``stacked`` and ``form``
formulations, forward and closed-form backward (the counting that picks one, and the module
docstring that derives it, are in :mod:`.torch_backend`)."""
from __future__ import annotations

import torch

from ..._bias import bias_grads
from ..._checks import ModLinearConfig
from . import demod as DM
from .common import _bias_b, _inner, _mix, _mix_t, _scaled, _z_cast, acc, demod_terms


def _mod_linear_group_view(x, a, s):
    """Group rows that share one mixture M: per sample (G = B) or per token (G = B*T)."""
    B, T, I = x.shape
    if a.shape[1] == T and T > 1:  # per-token coefficients: every row its own mixture
        xg = x.reshape(B * T, 1, I)
        ag = a.reshape(B * T, -1)
        sg = None if s is None else s.expand(B, T, I).reshape(B * T, 1, I)
        return xg, ag, sg
    return x, a[:, 0], s


def forward(x, bank, a, s, bias, cfg: ModLinearConfig, plan: str):
    """Return y, z (pre-demod output) and d (demod coefficients, (B, 1|T, O) or None)."""
    B, T, I = x.shape
    K, O, _ = bank.shape
    zc = _z_cast(x, cfg)
    if plan == "stacked":
        u = _scaled(x, s, zc)
        if K == 1:
            z = zc(u) @ zc(bank[0]).t()  # [B, T, O]
            if a is not None:
                z = z * a
        else:
            Zs = (zc(u) @ zc(bank).reshape(K * O, I).t()).unflatten(-1, (K, O))  # [B, T, K, O]
            z = (zc(a).unsqueeze(-2) @ Zs).squeeze(-2)  # [B, T, O]
        d = None
        if cfg.demodulate and K > 1:  # the mixed rows, a chunk at a time (demod.py)
            d = torch.rsqrt(DM.mixed_norms(bank, a, s) + cfg.eps)  # [B, Td, O]
        elif cfg.demodulate:
            W2 = acc(bank[0]).square()
            n = (acc(s).square() @ W2.t()) if s is not None else W2.sum(1).view(1, 1, O)  # [B|1, Ts, O]
            if a is not None:
                n = n * acc(a).square()
            d = torch.rsqrt(n + cfg.eps)
    else:  # form: one mixture per group of rows
        xg, ag, sg = _mod_linear_group_view(x, a, s)
        G = xg.shape[0]
        M = _mix(ag, bank)  # [G, O, I]
        ug = _scaled(xg, sg, zc)
        z = (zc(ug) @ zc(M).transpose(1, 2)).reshape(B, T, O)
        d = None
        if cfg.demodulate:
            M2 = acc(M).square()
            n = (acc(sg).square() @ M2.transpose(1, 2)) if sg is not None else M2.sum(-1).unsqueeze(1)
            d = torch.rsqrt(n + cfg.eps)  # [G, 1|Ts, O]
            d = d.reshape(B, T, O) if G == B * T and T > 1 else d
    bb = _bias_b(a, bias)
    # d is float32 for half inputs (its statistics are): the epilogue runs in float32 and
    # rounds once, as the fused kernels' does
    y = z if d is None else z * d
    if bb is not None:
        y = y + bb
    return y.to(x.dtype), z, d


def backward(g, x, bank, coeffs, styles, a, s, bias, d, y, cfg: ModLinearConfig, needs, plan: str):
    """Closed-form gradients of docs/design.md section 2 under ``plan``; returns (dx, dbank, dcoeffs,
    dstyles, dbias). ``a``, ``s``: the conditioning as rows (``_rows``) of ``coeffs``, ``styles``.

    ``d`` and ``y`` are the saved forward results; when either is None, or a graph is being
    built, ``z`` and ``d`` are recomputed from the inputs (differentiably).
    """
    nx, nbank, na, ns, nbias = needs
    B, T, I = x.shape
    K, O, _ = bank.shape
    g = g.reshape(B, T, O)
    c = None
    gz = g
    if cfg.demodulate:
        gz, c, d = demod_terms(g, y, d, a, bias, lambda: forward(x, bank, a, s, bias, cfg, plan)[1:])
    zc = _z_cast(x, cfg)  # u and the GEMMs over it: float32 for float16 with demodulation
    u = _scaled(x, s, zc)
    dx = dbank = da = ds = None
    na = na and a is not None
    ns = ns and s is not None

    if plan == "stacked" and K == 1:
        W = bank[0]
        tW = gz @ W  # W^T gz: [B, T, I]
        t = tW if a is None else tW * a
        if nx:
            dx = t if s is None else t * s
        if cfg.demodulate:
            ca2 = c if a is None else c * acc(a).square()  # [B|1, Td, O]
            W2, s2 = acc(W).square(), acc(s).square() if s is not None else None
        if ns:
            ds = (x * t).sum_to_size(s.shape)
            if cfg.demodulate:
                ds = ds - (acc(s) * (ca2 @ W2)).sum_to_size(s.shape)
        if nbank:
            ga = gz if a is None else gz * a
            dW = zc(ga).reshape(-1, O).t() @ u.reshape(-1, I)
            if cfg.demodulate:
                if s is None:
                    E = ca2.reshape(-1, O).sum(0).unsqueeze(1)
                else:
                    rows = max(ca2.shape[1], s.shape[1])
                    cb = ca2.expand(B, rows, O)
                    E = cb.reshape(-1, O).t() @ s2.expand(B, rows, I).reshape(-1, I)
                dW = dW - acc(W) * E
            dbank = dW.unsqueeze(0)
        if na:
            da = (tW * u).sum(-1, keepdim=True).sum_to_size(a.shape)  # [B, Ta, 1]
            if cfg.demodulate:
                nW = (s2 @ W2.t()) if s is not None else W2.sum(1)
                da = da - (acc(a) * (c * nW).sum(-1, keepdim=True)).sum_to_size(a.shape)
    elif plan == "stacked":  # K > 1 (demodulation terms in demod.py)
        Wf = bank.reshape(K * O, I)
        Ga = gz.unsqueeze(-2) * a.unsqueeze(-1)  # [B, T, K, O]
        if nx or ns:
            t = Ga.flatten(-2) @ Wf  # [B, T, I]
            if nx:
                dx = t if s is None else t * s
            if ns:
                ds = (x * t).sum_to_size(s.shape)
        if nbank:
            dbank = (zc(Ga).reshape(-1, K * O).t() @ u.reshape(-1, I)).view(K, O, I)
        if na:
            Zs = (u @ zc(Wf).t()).unflatten(-1, (K, O))  # recomputed: [B, T, K, O]
            da = (Zs * gz.unsqueeze(-2)).sum(-1).sum_to_size(a.shape)  # [B, Ta, K]
        if cfg.demodulate:
            ds_d, da_d, dbank_d = DM.demod_grads(bank, a, s, c, ns, na, nbank)
            if ns:
                ds = ds - ds_d
            if na:
                da = da - da_d
            if nbank:
                dbank = dbank - dbank_d
    else:  # form
        xg, ag, sg = _mod_linear_group_view(x, a, s)
        G, Tg, _ = xg.shape
        gzg = gz.reshape(G, Tg, O)
        ug = u.reshape(G, Tg, I)
        M = _mix(ag, bank)  # [G, O, I]
        if cfg.demodulate:
            cg = c.reshape(G, -1, O)  # [G, Td, O]
        if nx or ns:
            t = (gzg @ M).reshape(B, T, I)
            if nx:
                dx = t if s is None else t * s
            if ns:
                ds = (x * t).sum_to_size(s.shape)
                if cfg.demodulate:
                    ds = ds - (acc(sg) * (cg @ acc(M).square())).reshape(B, -1, I).sum_to_size(s.shape)
            del t
        if not cfg.demodulate:
            # the formed weights are not needed past dx: freed before their gradient dM is
            # formed, so the backward holds one G x O x I tensor at a time, not two
            del M
        if nbank or na:
            dM = zc(gzg).transpose(1, 2) @ ug  # [G, O, I] = (gz^T x) * s
            if cfg.demodulate:
                # the two terms nearly cancel: subtract in float32, round once
                if sg is None:
                    E = cg.sum(1).unsqueeze(-1)
                else:
                    rows = max(cg.shape[1], sg.shape[1])
                    s2 = acc(sg).square().expand(G, rows, I)
                    E = cg.expand(G, rows, O).transpose(1, 2) @ s2
                dM = (acc(dM) - acc(M) * E).to(M.dtype)
            if nbank:
                dbank = _mix_t(ag, dM)
            if na:
                da = _inner(dM, bank).reshape(B, -1, K)

    # the bias part over the rows that share a coefficient vector: each row with per-token
    # coefficients (a (B, T, K)), else each sample (g summed over its rows; a (B, 1, K))
    per_row = a is not None and a.shape[1] == T and T > 1
    dbias, da_bias = bias_grads(g.reshape(B * T, O) if per_row else g.sum(1),
                                None if a is None else a.reshape(-1, K), bias, nbias, na)
    if na:
        da = da.sum_to_size(a.shape)
        if da_bias is not None:
            da = da + da_bias.view(a.shape)
        da = da.reshape(coeffs.shape).to(coeffs.dtype)
    if ns:
        ds = ds.reshape(styles.shape).to(styles.dtype)
    if dbank is not None:
        dbank = dbank.to(bank.dtype)
    return dx, dbank, da, ds, dbias
