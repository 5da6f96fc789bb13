"""The `torch` backend: pure PyTorch, explicit closed-form backward (DESIGN.md section 2).

This is the algebra the fused kernels mirror, written in differentiable PyTorch ops so
that double backward works: when a graph is being built (``create_graph=True``) the
backward recomputes ``z`` and ``d`` from the saved inputs instead of using the saved
constants, so every intermediate stays connected to the inputs.

Formulations (chosen by :func:`linear_plan` / :func:`conv2d_plan`, by counting):

``stacked``
    Scale the input by the styles, run one GEMM (conv) against the whole bank viewed as
    ``(K*O, I)``, mix the ``K`` partial outputs with the coefficients, demodulate and add
    the bias in the epilogue. ``K`` times the dense FLOPs, nothing of size ``B x O x I``.
    For ``K = 1`` this is exactly scale-GEMM-scale (StyleGAN2's non-fused path) and costs
    one dense GEMM; the demodulation coefficients come from a small GEMM,
    ``d = rsqrt(a^2 * (s^2 @ (W^2)^T) + eps)``, never from a formed weight. The backward
    costs 2K GEMMs (+ K more to recompute the partial outputs for ``dcoeffs`` when K > 1).

    Linear with demodulation and ``K > 1`` (:mod:`._torch_demod`): the row norms
    ``q[r, o] = sum_i (M_r[o, i] s_r[i])^2`` and the backward's ``ds`` and ``dcoeffs``
    demodulation terms go through the bank's pair products, guarded: rows where the pair sum
    could lose precision (``q < tau * (sum_k |a_k| |W_k s|)^2``) square the *mixed* rows
    ``M_r = sum_k a_rk W_k`` instead (all rows where that is cheaper, or when traced), formed a chunk of
    rows at a time (at most ``DEMOD_CHUNK_ELEMS`` elements, or one ``O x I`` row): an unguarded
    expansion over the pair products ``W_k W_l`` (the first formulation, and what a
    Gram matrix ``a^T W diag(s^2) W^T a`` computes too) cancels catastrophically when the
    experts do (``W`` and ``-W + 1e-3 noise``: 5-10 % error in float32, NaN at 1e-4). The
    ``dW`` term, linear in the mixture, keeps the pairs: ``F_kl = sum_r a_rk a_rl c_r (s_r^2)^T``
    (one GEMM, ``(npairs, O, I)``, ``npairs = K(K+1)/2``) gives ``dW_k -= sum_l W_l * F_kl``.
    Nothing of size ``rows x O x I``; work ``(2K + 8) * Rm * O * I`` elementwise (``Rm`` the
    rows with their own mixture: ``B``, or ``B*T`` with per-token coefficients) + the dense
    GEMMs. Only this case (K > 1 with demodulation) pays for it; the statistics are float32
    for half inputs on every path.
``form``
    Form each sample's mixture ``M_b = sum_k alpha_b[k] W_k`` (``B x O x I``, or per token
    ``B*T x O x I``) and run a batched GEMM (conv2d: one grouped conv over all samples, as
    timm's CondConv does). One dense GEMM of FLOPs plus ``B*K*O*I`` mixing work and the
    ``B x O x I`` memory. Chosen when the rows per sample are many enough that K dense
    GEMMs cost more than the mixing (conv2d: always for K > 1 with demodulation). With
    demodulation and per-token coefficients (linear) it is never chosen: it would hold
    ``B*T x O x I``, the per-row weight this package exists to avoid.

The counting: a GEMM FLOP costs 1, an element of mixing/formed-weight traffic costs
``MIX_COST`` (bandwidth-bound elementwise work runs several times slower per element
than a GEMM FLOP on both CPUs and GPUs). Linear with demodulation and K > 1 counts forward
plus backward (``rows = B*T``, ``G`` the groups of the form path, ``R`` the rows of ``d``,
``sty`` 1 with styles else 0)::

    form    = (3*rows + 2*sty*R) * O*I + MIX_COST * (4K + 14) * G * O*I
              (3 GEMMs of the rows against the formed weights; ~4K+14 passes over G x O x I:
               mixing twice, squaring twice, dM and its correction, mix_t and the inner products)
    stacked = (4K*rows + sty*(npairs + 3)*R) * O*I
              + MIX_COST * (2*npairs*O*I + 2*K*rows*O + (2K + 8)*Rm*O*I)
              (z, dx, dW and the recomputed partials for dcoeffs; the pair GEMM for F and the
               GEMMs against the squared mixed rows; the dW correction; the per-row K-sized
               products; mixing and squaring Rm x O x I twice)

Per sample with many rows the form path wins (``G = B`` is small next to ``rows``); with
one row per sample (decode) or per-token conditioning the stacked path does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import Conv2dConfig, LinearConfig
from . import _torch_demod as DM
from ._torch_demod import acc as _acc

NAME = "torch"
DIRECT = False
DIFFERENTIABLE_BACKWARD = True

#: cost of one element of mixing or of formed-weight memory traffic, in GEMM FLOPs
MIX_COST = 4

#: tests set this to "stacked" / "form" ("grouped" for conv) to exercise one formulation
FORCE_PLAN: str | None = None


def availability(device: torch.device) -> tuple[bool, str]:
    return True, "pure PyTorch, any device"


def supports(op: str, **problem) -> tuple[bool, str]:
    return True, ""


# ----------------------------------------------------------------------------- plans


def linear_plan(B, T, I, O, K, per_token_coeffs: bool, demodulate: bool, *,
                has_styles: bool = True, per_token_styles: bool = False) -> str:
    """'stacked' or 'form' for a linear problem, by counting (see the module docstring).

    Without demodulation: ``form = rows*O*I + MIX_COST*G*(K+1)*O*I`` against
    ``stacked = K*rows*O*I + MIX_COST*K*rows*O`` (``rows = B*T``; ``G = B``, or ``B*T`` with
    per-token coefficients). With demodulation and ``K > 1``: per-token coefficients always
    take ``stacked`` (the chunked mixed-row demodulation; form would hold ``B*T x O x I``); per
    sample, the forward + backward count of the module docstring, where ``has_styles`` and
    ``per_token_styles`` size the pair GEMMs (``has_styles`` defaults to True, the dearer
    case for ``stacked``). ``FORCE_PLAN`` ("stacked" / "form") overrides the count for K > 1.
    """
    if FORCE_PLAN is not None and K > 1:
        return "form" if FORCE_PLAN in ("form", "grouped") else "stacked"
    if K == 1:
        return "stacked"
    rows = B * T
    groups = rows if per_token_coeffs else B
    OI = O * I
    if demodulate:
        if per_token_coeffs:
            return "stacked"
        sty = 1 if has_styles else 0
        R = rows if per_token_styles else B  # rows of d
        npairs = K * (K + 1) // 2
        form = (3 * rows + 2 * sty * R) * OI + MIX_COST * (4 * K + 14) * groups * OI
        Rm = B  # rows with their own mixture (per-token coefficients returned above)
        stacked = ((4 * K * rows + sty * (npairs + 3) * R) * OI
                   + MIX_COST * (2 * npairs * OI + 2 * K * rows * O + (2 * K + 8) * Rm * OI))
        return "form" if form <= stacked else "stacked"
    form = rows * OI + MIX_COST * groups * (K + 1) * OI
    stacked = rows * K * OI + MIX_COST * rows * K * O
    return "form" if form <= stacked else "stacked"


def conv2d_plan(B, I, O, K, kh, kw, groups, out_pixels, demodulate: bool) -> str:
    """'stacked' or 'grouped' (form per-sample filters + one grouped conv), by counting."""
    if FORCE_PLAN is not None and K > 1 and not demodulate:
        return "grouped" if FORCE_PLAN in ("form", "grouped") else "stacked"
    if K == 1:
        return "stacked"
    if demodulate:
        return "grouped"
    wsize = O * (I // groups) * kh * kw
    conv = B * wsize * out_pixels
    # fwd + bwd: the stacked path runs 4 K-wide convs (fwd, dx, dW, recompute for dcoeffs)
    stacked = 4 * K * conv
    grouped = 3 * conv + MIX_COST * 3 * B * (K + 1) * wsize
    return "grouped" if grouped <= stacked else "stacked"


# ----------------------------------------------------------------------------- helpers


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


def _bias_grads(g, a, bias, needs_bias, needs_a):
    """dbias and the bias part of dcoeffs; g (B, R, O), a (B, Ta, K) | None."""
    dbias = da = None
    if bias is None:
        return dbias, da
    O = g.shape[-1]
    if needs_bias:
        if bias.dim() == 1:
            dbias = g.reshape(-1, O).sum(0)
        elif a is None:
            dbias = g.reshape(-1, O).sum(0).unsqueeze(0)
        else:
            aa = a.expand(g.shape[0], g.shape[1], a.shape[-1])
            dbias = aa.reshape(-1, aa.shape[-1]).t() @ g.reshape(-1, O)
    if needs_a and a is not None and bias.dim() == 2:
        da = g @ bias.t()  # [B, R, K]
    return dbias, da


def _z_cast(x, cfg):
    """The cast of the operands of the pre-demodulation output ``z``: float32 for float16
    inputs with demodulation, whose ``z`` can pass fp16's range (65504) where the demodulated
    output does not (styles ~100 with x ~100); the fused kernels accumulate ``z`` in float32
    and demodulate before rounding. (On a CPU the float32 GEMM is also much faster than the
    float16 one.) bfloat16 has float32's range; other dtypes as is."""
    if cfg.demodulate and x.dtype == torch.float16:
        return _acc
    return lambda t: t


def _add(a, b):
    if b is None:
        return a
    return b if a is None else a + b


# ----------------------------------------------------------------------------- linear


def _linear_group_view(x, a, s):
    """Group rows that share one mixture M: per sample (G = B) or per token (G = B*T)."""
    B, T, I = x.shape
    if a.shape[1] == T and T > 1:  # per-token coefficients: every row its own mixture
        xg = x.reshape(B * T, 1, I)
        ag = a.reshape(B * T, -1)
        sg = None if s is None else s.expand(B, T, I).reshape(B * T, 1, I)
        return xg, ag, sg
    return x, a[:, 0], s


def _linear_fwd(x, bank, a, s, bias, cfg: LinearConfig, plan: str):
    """Return y, z (pre-demod output) and d (demod coefficients, (B, 1|T, O) or None)."""
    B, T, I = x.shape
    K, O, _ = bank.shape
    zc = _z_cast(x, cfg)
    if plan == "stacked":
        u = x if s is None else x * s
        if K == 1:
            z = zc(u) @ zc(bank[0]).t()  # [B, T, O]
            if a is not None:
                z = z * a
        else:
            Zs = (zc(u) @ zc(bank).reshape(K * O, I).t()).unflatten(-1, (K, O))  # [B, T, K, O]
            z = (zc(a).unsqueeze(-2) @ Zs).squeeze(-2)  # [B, T, O]
        d = None
        if cfg.demodulate and K > 1:  # the mixed rows, a chunk at a time (_torch_demod)
            d = torch.rsqrt(DM.mixed_norms(bank, a, s) + cfg.eps)  # [B, Td, O]
        elif cfg.demodulate:
            W2 = _acc(bank[0]).square()
            n = (_acc(s).square() @ W2.t()) if s is not None else W2.sum(1).view(1, 1, O)  # [B|1, Ts, O]
            if a is not None:
                n = n * _acc(a).square()
            d = torch.rsqrt(n + cfg.eps)
    else:  # form: one mixture per group of rows
        xg, ag, sg = _linear_group_view(x, a, s)
        G = xg.shape[0]
        M = _mix(ag, bank)  # [G, O, I]
        ug = xg if sg is None else xg * sg
        z = (zc(ug) @ zc(M).transpose(1, 2)).reshape(B, T, O)
        d = None
        if cfg.demodulate:
            M2 = _acc(M).square()
            n = (_acc(sg).square() @ M2.transpose(1, 2)) if sg is not None else M2.sum(-1).unsqueeze(1)
            d = torch.rsqrt(n + cfg.eps)  # [G, 1|Ts, O]
            d = d.reshape(B, T, O) if G == B * T and T > 1 else d
    bb = _bias_b(a, bias)
    # d is float32 for half inputs (its statistics are): the epilogue runs in float32 and
    # rounds once, as the fused kernels' does
    y = z if d is None else z * d
    if bb is not None:
        y = y + bb
    return y.to(x.dtype), z, d


def _norm_linear(x, bank, coeffs, styles):
    """Conditioning as rows: a (B, 1|T, K), s (B, 1|T, I); and whether coeffs are per token."""
    a = _rows(coeffs)
    s = _rows(styles)
    per_token = a is not None and a.shape[1] == x.shape[1] and x.shape[1] > 1
    return a, s, per_token


def _linear_plan_for(x, bank, s, K, per_token, cfg: LinearConfig):
    B, T, I = x.shape
    return linear_plan(B, T, I, bank.shape[1], K, per_token, cfg.demodulate,
                       has_styles=s is not None, per_token_styles=s is not None and s.shape[1] > 1)


def linear_forward(x, bank, coeffs, styles, bias, cfg: LinearConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, T, O), d or None)."""
    a, s, per_token = _norm_linear(x, bank, coeffs, styles)
    B, T, I = x.shape
    K, O, _ = bank.shape
    plan = _linear_plan_for(x, bank, s, K, per_token, cfg)
    y, _, d = _linear_fwd(x, bank, a, s, bias, cfg, plan)
    return y, d


def linear_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: LinearConfig, needs):
    """Closed-form gradients of DESIGN.md section 2; returns (dx, dbank, dcoeffs, dstyles, dbias).

    ``d`` and ``y`` are the saved forward results; when either is None, or a graph is being
    built, ``z`` and ``d`` are recomputed from the inputs (differentiably).
    """
    nx, nbank, na, ns, nbias = needs
    a, s, per_token = _norm_linear(x, bank, coeffs, styles)
    B, T, I = x.shape
    K, O, _ = bank.shape
    plan = _linear_plan_for(x, bank, s, K, per_token, cfg)
    g = g.reshape(B, T, O)
    c = None
    gz = g
    if cfg.demodulate:
        if d is None or y is None or torch.is_grad_enabled():
            _, z, d = _linear_fwd(x, bank, a, s, bias, cfg, plan)
        else:
            bb = _bias_b(a, bias)
            z = (_acc(y) if bb is None else _acc(y) - bb) / d
        # the statistics (d, z, c) are float32 for half inputs; the GEMM operands stay in x's dtype
        gz = (g * d).to(g.dtype)
        c = (_acc(g) * _acc(z)).sum_to_size(d.shape) * d.pow(3)  # dd * d^3: [B|1, 1|T, O]
    u = x if s is None else x * s
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
            ca2 = c if a is None else c * _acc(a).square()  # [B|1, Td, O]
            W2, s2 = _acc(W).square(), _acc(s).square() if s is not None else None
        if ns:
            ds = (x * t).sum_to_size(s.shape)
            if cfg.demodulate:
                ds = ds - (_acc(s) * (ca2 @ W2)).sum_to_size(s.shape)
        if nbank:
            ga = gz if a is None else gz * a
            dW = ga.reshape(-1, O).t() @ u.reshape(-1, I)
            if cfg.demodulate:
                if s is None:
                    E = ca2.reshape(-1, O).sum(0).unsqueeze(1)
                else:
                    rows = max(ca2.shape[1], s.shape[1])
                    cb = ca2.expand(B, rows, O)
                    E = cb.reshape(-1, O).t() @ s2.expand(B, rows, I).reshape(-1, I)
                dW = dW - _acc(W) * E
            dbank = dW.unsqueeze(0)
        if na:
            da = (tW * u).sum(-1, keepdim=True).sum_to_size(a.shape)  # [B, Ta, 1]
            if cfg.demodulate:
                nW = (s2 @ W2.t()) if s is not None else W2.sum(1)
                da = da - (_acc(a) * (c * nW).sum(-1, keepdim=True)).sum_to_size(a.shape)
    elif plan == "stacked":  # K > 1 (demodulation terms in _torch_demod)
        Wf = bank.reshape(K * O, I)
        Ga = gz.unsqueeze(-2) * a.unsqueeze(-1)  # [B, T, K, O]
        if nx or ns:
            t = Ga.flatten(-2) @ Wf  # [B, T, I]
            if nx:
                dx = t if s is None else t * s
            if ns:
                ds = (x * t).sum_to_size(s.shape)
        if nbank:
            dbank = (Ga.reshape(-1, K * O).t() @ u.reshape(-1, I)).view(K, O, I)
        if na:
            zc = _z_cast(x, cfg)  # the partial outputs are z-sized (fp16: float32, see _z_cast)
            Zs = (zc(u) @ zc(Wf).t()).unflatten(-1, (K, O))  # recomputed: [B, T, K, O]
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
        xg, ag, sg = _linear_group_view(x, a, s)
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
                    ds = ds - (_acc(sg) * (cg @ _acc(M).square())).reshape(B, -1, I).sum_to_size(s.shape)
        if nbank or na:
            dM = gzg.transpose(1, 2) @ ug  # [G, O, I] = (gz^T x) * s
            if cfg.demodulate:
                # the two terms nearly cancel: subtract in float32, round once
                if sg is None:
                    E = cg.sum(1).unsqueeze(-1)
                else:
                    rows = max(cg.shape[1], sg.shape[1])
                    s2 = _acc(sg).square().expand(G, rows, I)
                    E = cg.expand(G, rows, O).transpose(1, 2) @ s2
                dM = (_acc(dM) - _acc(M) * E).to(M.dtype)
            if nbank:
                dbank = _mix_t(ag, dM)
            if na:
                da = _inner(dM, bank).reshape(B, -1, K)

    dbias, da_bias = _bias_grads(g, a, bias, nbias, na)
    if na:
        da = da.sum_to_size(a.shape)
        if da_bias is not None:
            da = da + da_bias.sum_to_size(a.shape)
        da = da.reshape(coeffs.shape).to(coeffs.dtype)
    if ns:
        ds = ds.reshape(styles.shape).to(styles.dtype)
    if dbank is not None:
        dbank = dbank.to(bank.dtype)
    return dx, dbank, da, ds, dbias


# ----------------------------------------------------------------------------- conv2d


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


def _conv_grads(gout, inp, weight, cfg: Conv2dConfig, groups: int, need_input: bool, need_weight: bool):
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


def _conv_geom(cfg: Conv2dConfig):
    return dict(stride=cfg.stride, padding=cfg.padding, dilation=cfg.dilation)


def _conv2d_fwd(x, bank, a, s, bias, cfg: Conv2dConfig, plan: str):
    """Return y, z, d (d: (B|1, O) or None). a (B, K) | None, s (B, I) | None."""
    B, I, H, W = x.shape
    K, O, Ig, kh, kw = bank.shape
    g = cfg.groups
    geo = _conv_geom(cfg)
    u = x if s is None else x * s[:, :, None, None]
    zc = _z_cast(x, cfg)
    if plan == "stacked":
        Zs = F.conv2d(zc(u), zc(_stack_bank(bank, g)), None, groups=g, **geo)
        if K == 1:
            z = Zs if a is None else Zs * a[:, :, None, None]
        else:
            Ho, Wo = Zs.shape[-2:]
            Zs = Zs.view(B, g, K, O // g, Ho, Wo)
            z = torch.einsum("bgkohw,bk->bgohw", Zs, zc(a)).reshape(B, O, Ho, Wo)
        d = None
        if cfg.demodulate:  # K == 1
            W2 = _acc(bank[0]).square().sum((2, 3))  # [O, Ig], float32 for half inputs
            n = (_acc(s).square() @ W2.t()) if s is not None else W2.sum(1).unsqueeze(0)  # [B|1, O]
            if a is not None:
                n = n * _acc(a).square()
            d = torch.rsqrt(n + cfg.eps)
    else:  # grouped: per-sample filters, one conv with B*groups groups
        M = _mix(a, bank)  # [B, O, Ig, kh, kw]
        z = F.conv2d(zc(u).reshape(1, B * I, H, W), zc(M).reshape(B * O, Ig, kh, kw), None,
                     groups=B * g, **geo)
        z = z.view(B, O, *z.shape[-2:])
        d = None
        if cfg.demodulate:
            M2 = _acc(M).square().sum((3, 4))  # [B, O, Ig]
            n = (M2 @ _acc(s).square().unsqueeze(-1)).squeeze(-1) if s is not None else M2.sum(-1)
            d = torch.rsqrt(n + cfg.eps)  # [B, O]
    y = z if d is None else z * d[:, :, None, None]
    bb = _bias_b(a, bias)
    if bb is not None:
        y = y + bb[..., None, None]
    return y.to(x.dtype), z, d


def conv2d_forward(x, bank, coeffs, styles, bias, cfg: Conv2dConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, O, H', W'), d (B|1, O) or None)."""
    plan = _conv_plan_for(x, bank, cfg)
    y, _, d = _conv2d_fwd(x, bank, coeffs, styles, bias, cfg, plan)
    return y, d


def _conv_plan_for(x, bank, cfg):
    B, I, H, W = x.shape
    K, O, Ig, kh, kw = bank.shape
    ho = (H + 2 * cfg.padding[0] - cfg.dilation[0] * (kh - 1) - 1) // cfg.stride[0] + 1
    wo = (W + 2 * cfg.padding[1] - cfg.dilation[1] * (kw - 1) - 1) // cfg.stride[1] + 1
    return conv2d_plan(B, I, O, K, kh, kw, cfg.groups, ho * wo, cfg.demodulate)


def conv2d_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: Conv2dConfig, needs):
    """Closed-form gradients; returns (dx, dbank, dcoeffs, dstyles, dbias)."""
    nx, nbank, na, ns, nbias = needs
    a, s = coeffs, styles
    na = na and a is not None
    ns = ns and s is not None
    B, I, H, W = x.shape
    K, O, Ig, kh, kw = bank.shape
    grp = cfg.groups
    geo = _conv_geom(cfg)
    plan = _conv_plan_for(x, bank, cfg)
    Ho, Wo = g.shape[-2:]
    c = None
    gz = g
    if cfg.demodulate:
        if d is None or y is None or torch.is_grad_enabled():
            _, z, d = _conv2d_fwd(x, bank, a, s, bias, cfg, plan)
        else:
            bb = _bias_b(a, bias)
            z = (_acc(y) if bb is None else _acc(y) - bb[..., None, None]) / d[:, :, None, None]
        # d, z, c are float32 for half inputs; the conv operands stay in x's dtype
        gz = (g * d[:, :, None, None]).to(g.dtype)
        c = (_acc(g) * _acc(z)).sum((2, 3)).sum_to_size(d.shape) * d.pow(3)  # [B|1, O]
    u = x if s is None else x * s[:, :, None, None]
    dx = dbank = da = ds = None

    if plan == "stacked":
        Wst = _stack_bank(bank, grp)
        if K == 1:
            Gin = gz if a is None else gz * a[:, :, None, None]
        else:
            Gin = (gz.view(B, grp, 1, O // grp, Ho, Wo) * a.view(B, 1, K, 1, 1, 1)).reshape(B, -1, Ho, Wo)
        need_t = nx or ns or (na and K == 1)
        # with a per-sample scalar (K == 1 and coeffs) the input side needs W^T gz unscaled
        # (for dcoeffs), the weight side gz * a: two upstream gradients, two calls
        shared = K > 1 or a is None
        tG, dWst = _conv_grads(Gin, u, Wst, cfg, grp, need_t and shared, nbank)
        if need_t:
            if K == 1:
                tW = tG if shared else _conv_grads(gz, u, Wst, cfg, grp, True, False)[0]  # W^T gz
                t = tW if a is None else tW * a[:, :, None, None]
            else:
                t = tG  # M^T gz
            if nx:
                dx = t if s is None else t * s[:, :, None, None]
            if ns:
                ds = (x * t).sum((2, 3))
        if cfg.demodulate:  # K == 1
            Wb = bank[0]
            W2 = _acc(Wb).square().sum((2, 3))  # [O, Ig]
            ca2 = c if a is None else c * _acc(a).square()  # [B|1, O]
            if ns:
                ds = ds - _acc(s) * (ca2 @ W2)
        if nbank:
            if cfg.demodulate:
                if s is None:
                    E = ca2.sum(0)[:, None, None, None]
                else:
                    E = (ca2.expand(B, O).t() @ _acc(s).square())[:, :, None, None]
                dWst = dWst - _acc(Wb) * E
            dbank = _unstack_bank(dWst, K, grp)
        if na:
            if K == 1:
                # <Q s, W> = sum gz * (W * u) = sum (W^T gz) * u: no extra conv
                da = (tW * u).sum((1, 2, 3)).unsqueeze(1)
                if cfg.demodulate:
                    nW = (_acc(s).square() @ W2.t()) if s is not None else W2.sum(1).unsqueeze(0)
                    da = da - _acc(a) * (c * nW).sum(1, keepdim=True)
            else:
                Zs = F.conv2d(u, Wst, None, groups=grp, **geo).view(B, grp, K, O // grp, Ho, Wo)
                da = torch.einsum("bgkohw,bgohw->bk", Zs, gz.view(B, grp, O // grp, Ho, Wo))
    else:  # grouped
        M = _mix(a, bank)  # [B, O, Ig, kh, kw]
        Mf = M.reshape(B * O, Ig, kh, kw)
        gzf = gz.reshape(1, B * O, Ho, Wo)
        tf, dM = _conv_grads(gzf, u.reshape(1, B * I, H, W), Mf, cfg, B * grp, nx or ns, nbank or na)
        if nx or ns:
            t = tf.view(B, I, H, W)  # M^T gz
            if nx:
                dx = t if s is None else t * s[:, :, None, None]
            if ns:
                ds = (x * t).sum((2, 3))
                if cfg.demodulate:
                    M2 = _acc(M).square().sum((3, 4))  # [B, O, I]
                    ds = ds - _acc(s) * (c.unsqueeze(1) @ M2).squeeze(1)
        if nbank or na:
            dM = dM.view(B, O, Ig, kh, kw)
            if cfg.demodulate:
                if s is None:
                    E = c[:, :, None, None, None]
                else:
                    E = (c[:, :, None] * _acc(s).square()[:, None, :])[..., None, None]
                dM = (_acc(dM) - _acc(M) * E).to(M.dtype)  # nearly cancelling: float32, one rounding
            if nbank:
                dbank = _mix_t(a, dM)
            if na:
                da = _inner(dM, bank)

    a3 = None if a is None else a.unsqueeze(1)
    dbias, da_bias = _bias_grads(g.sum((2, 3)).unsqueeze(1), a3, bias, nbias, na)
    if na:
        da = _add(da, None if da_bias is None else da_bias[:, 0]).to(a.dtype)
    if ds is not None:
        ds = ds.to(s.dtype)
    if dbank is not None:
        dbank = dbank.to(bank.dtype)
    return dx, dbank, da, ds, dbias
