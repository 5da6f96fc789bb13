"""The torch backend's ``mod_conv2d`` (op key ``conv2d``): the ``stacked`` and ``form``
formulations, forward and closed-form backward (the counting that picks one is
:func:`.torch_backend.mod_conv2d_plan`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._bias import bias_grads
from ..._checks import ModConv2dConfig
from .common import _add, _bias_b, _inner, _mix, _mix_t, _scaled, _z_cast, acc, demod_terms


def _stack_bank(bank, groups):
    """(K, O, Ig, kh, kw) -> (g*K*Og, Ig, kh, kw), output channels ordered (group, k, o)
    so that a grouped conv sees each group's K experts side by side."""
    K, O, Ig, kh, kw = bank.shape
    if K == 1:
        return bank[0]
    Og = O // groups
    return bank.view(K, groups, Og, Ig, kh, kw).transpose(0, 1).reshape(groups * K * Og, Ig, kh, kw)


def _unstack_bank(w, K, groups):
    """Inverse of :func:`_stack_bank`."""
    if K == 1:
        return w.unsqueeze(0)
    gKOg, Ig, kh, kw = w.shape
    Og = gKOg // (groups * K)
    return w.view(groups, K, Og, Ig, kh, kw).transpose(0, 1).reshape(K, groups * Og, Ig, kh, kw)


def _conv_grads(gout, inp, weight, cfg: ModConv2dConfig, groups: int, need_input: bool, need_weight: bool):
    """(d inp, d weight) of ``conv2d(inp, weight)`` for upstream ``gout`` in ONE
    ``convolution_backward`` call (differentiable, so double backward works), None where
    not needed. One call lets the library share the work of both, as autograd's own
    conv backward does."""
    if not (need_input or need_weight):
        return None, None
    gi, gw, _ = torch.ops.aten.convolution_backward(
        gout, inp, weight, None, list(cfg.stride), list(cfg.padding), list(cfg.dilation), False, [0, 0],
        groups, [need_input, need_weight, False])
    return gi, gw


def _conv_geom(cfg: ModConv2dConfig):
    return dict(stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation)


def _mixed_demod(M, s, eps):
    """``d (B, O)`` of the per-sample filters ``M (B, O, I, kh, kw)`` (groups == 1 with styles)."""
    M2 = acc(M).square().sum((3, 4))  # [B, O, Ig]
    n = (M2 @ acc(s).square().unsqueeze(-1)).squeeze(-1) if s is not None else M2.sum(-1)
    return torch.rsqrt(n + eps)


def forward(x, bank, a, s, bias, cfg: ModConv2dConfig, plan: str):
    """Return y, z, d (d: (B|1, O) or None). a (B, K) | None, s (B, I) | None."""
    B, I, H, W = x.shape
    K, O, Ig, kh, kw = bank.shape
    g = cfg.groups
    geo = _conv_geom(cfg)
    zc = _z_cast(x, cfg)
    u = _scaled(x, None if s is None else s[:, :, None, None], zc)
    if plan == "stacked":
        Zs = F.conv2d(zc(u), zc(_stack_bank(bank, g)), None, groups=g, **geo)
        if K == 1:
            z = Zs if a is None else Zs * a[:, :, None, None]
        else:
            Ho, Wo = Zs.shape[-2:]
            Zs = Zs.view(B, g, K, O // g, Ho, Wo)
            z = torch.einsum("bgkohw,bk->bgohw", Zs, zc(a)).reshape(B, O, Ho, Wo)
        d = None
        if cfg.demodulate and K > 1:  # a dynamic batch (the plan's rule): d from the formed mixture
            d = _mixed_demod(_mix(a, bank), s, cfg.eps)
        elif cfg.demodulate:
            W2 = acc(bank[0]).square().sum((2, 3))  # [O, Ig], float32 for half inputs
            n = (acc(s).square() @ W2.t()) if s is not None else W2.sum(1).unsqueeze(0)  # [B|1, O]
            if a is not None:
                n = n * acc(a).square()
            d = torch.rsqrt(n + cfg.eps)
    elif plan == "im2col":  # per-sample filters times the unfolded input: one batched GEMM, no batch in a shape
        M = _mix(a, bank)  # [B, O, Ig, kh, kw]
        # the unfolding as a depthwise conv with one-hot filters (what F.unfold computes, in the
        # channel order (i, kh, kw)): exporters emit one Conv, where F.unfold becomes gathers
        # that onnxruntime runs several times slower
        eye = torch.eye(kh * kw, dtype=x.dtype, device=x.device).view(kh * kw, 1, kh, kw).repeat(I, 1, 1, 1)
        cols = F.conv2d(zc(u), zc(eye), None, groups=I, **geo)  # [B, I*kh*kw, Ho, Wo]
        Ho, Wo = cols.shape[-2:]
        z = zc(M).flatten(2).unflatten(1, (g, O // g)) @ cols.flatten(2).unflatten(1, (g, Ig * kh * kw))  # [B, g, Og, L]
        z = z.flatten(1, 2).unflatten(-1, (Ho, Wo))
        d = _mixed_demod(M, s, cfg.eps) if cfg.demodulate else None
    else:  # form: per-sample filters, one conv with B*groups groups
        M = _mix(a, bank)  # [B, O, Ig, kh, kw]
        z = F.conv2d(zc(u).reshape(1, B * I, H, W), zc(M).reshape(B * O, Ig, kh, kw), None,
                     groups=B * g, **geo)
        z = z.view(B, O, *z.shape[-2:])
        d = _mixed_demod(M, s, cfg.eps) if cfg.demodulate else None
    y = z if d is None else z * d[:, :, None, None]
    bb = _bias_b(a, bias)
    if bb is not None:
        y = y + bb[..., None, None]
    return y.to(x.dtype), z, d


def backward(g, x, bank, coeffs, styles, bias, d, y, cfg: ModConv2dConfig, needs, plan: str):
    """Closed-form gradients under ``plan``; returns (dx, dbank, dcoeffs, dstyles, dbias)."""
    nx, nbank, na, ns, nbias = needs
    a, s = coeffs, styles
    na = na and a is not None
    ns = ns and s is not None
    B, I, H, W = x.shape
    K, O, Ig, kh, kw = bank.shape
    grp = cfg.groups
    geo = _conv_geom(cfg)
    Ho, Wo = g.shape[-2:]
    c = None
    gz = g
    if cfg.demodulate:
        gz, c, d = demod_terms(g, y, d, a, bias, lambda: forward(x, bank, a, s, bias, cfg, plan)[1:], spatial=True)
    zc = _z_cast(x, cfg)  # u and the convolutions over it: float32 for float16 with demodulation
    u = _scaled(x, None if s is None else s[:, :, None, None], zc)
    dx = dbank = da = ds = None

    if plan == "stacked":
        Wst = zc(_stack_bank(bank, grp))
        if K == 1:
            Gin = gz if a is None else gz * a[:, :, None, None]
        else:
            Gin = (gz.view(B, grp, 1, O // grp, Ho, Wo) * a.view(B, 1, K, 1, 1, 1)).reshape(B, -1, Ho, Wo)
        need_t = nx or ns or (na and K == 1)
        # with a per-sample scalar (K == 1 and coeffs) the input side needs W^T gz unscaled
        # (for dcoeffs), the weight side gz * a: two upstream gradients, two calls
        shared = K > 1 or a is None
        tG, dWst = _conv_grads(zc(Gin), u, Wst, cfg, grp, need_t and shared, nbank)
        if need_t:
            if K == 1:
                tW = tG if shared else _conv_grads(zc(gz), u, Wst, cfg, grp, True, False)[0]  # W^T gz
                t = tW if a is None else tW * a[:, :, None, None]
            else:
                t = tG  # M^T gz
            if nx:
                dx = t if s is None else t * s[:, :, None, None]
            if ns:
                ds = (x * t).sum((2, 3))
        if cfg.demodulate:  # K == 1
            Wb = bank[0]
            W2 = acc(Wb).square().sum((2, 3))  # [O, Ig]
            ca2 = c if a is None else c * acc(a).square()  # [B|1, O]
            if ns:
                ds = ds - acc(s) * (ca2 @ W2)
        if nbank:
            if cfg.demodulate:
                if s is None:
                    E = ca2.sum(0)[:, None, None, None]
                else:
                    E = (ca2.expand(B, O).t() @ acc(s).square())[:, :, None, None]
                dWst = dWst - acc(Wb) * E
            dbank = _unstack_bank(dWst, K, grp)
        if na:
            if K == 1:
                # <Q s, W> = sum gz * (W * u) = sum (W^T gz) * u: no extra conv
                da = (tW * u).sum((1, 2, 3)).unsqueeze(1)
                if cfg.demodulate:
                    nW = (acc(s).square() @ W2.t()) if s is not None else W2.sum(1).unsqueeze(0)
                    da = da - acc(a) * (c * nW).sum(1, keepdim=True)
            else:
                Zs = F.conv2d(u, Wst, None, groups=grp, **geo).view(B, grp, K, O // grp, Ho, Wo)
                da = torch.einsum("bgkohw,bgohw->bk", Zs, gz.view(B, grp, O // grp, Ho, Wo))
    else:  # form
        M = _mix(a, bank)  # [B, O, Ig, kh, kw]
        Mf = zc(M).reshape(B * O, Ig, kh, kw)
        gzf = zc(gz).reshape(1, B * O, Ho, Wo)
        tf, dM = _conv_grads(gzf, u.reshape(1, B * I, H, W), Mf, cfg, B * grp, nx or ns, nbank or na)
        if nx or ns:
            t = tf.view(B, I, H, W)  # M^T gz
            if nx:
                dx = t if s is None else t * s[:, :, None, None]
            if ns:
                ds = (x * t).sum((2, 3))
                if cfg.demodulate:
                    M2 = acc(M).square().sum((3, 4))  # [B, O, I]
                    ds = ds - acc(s) * (c.unsqueeze(1) @ M2).squeeze(1)
        if nbank or na:
            dM = dM.view(B, O, Ig, kh, kw)
            if cfg.demodulate:
                if s is None:
                    E = c[:, :, None, None, None]
                else:
                    E = (c[:, :, None] * acc(s).square()[:, None, :])[..., None, None]
                dM = (acc(dM) - acc(M) * E).to(M.dtype)  # nearly cancelling: float32, one rounding
            if nbank:
                dbank = _mix_t(a, dM)
            if na:
                da = _inner(dM, bank)

    dbias, da_bias = bias_grads(g.sum((2, 3)), a, bias, nbias, na)  # rows: the samples
    if na:
        da = _add(da, da_bias).to(a.dtype)
    if dx is not None:
        dx = dx.to(x.dtype)
    if ds is not None:
        ds = ds.to(s.dtype)
    if dbank is not None:
        dbank = dbank.to(bank.dtype)
    return dx, dbank, da, ds, dbias
