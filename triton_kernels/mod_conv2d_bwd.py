"""mod_conv2d backward kernels (DESIGN.md section 2, conv2d form).

With ``g = dL/dy``, ``gz = d * g`` and ``c[b, o] = (sum_p g z) d^3`` (0 without demodulation;
the launcher forms it from the pre-pass sums), ``V_b = M_b * s_b``, and the im2col gather
``X_b[(i, ky, kx), p] = x[b, i, ih(p, ky), iw(p, kx)]``::

    dx[b, i, h, w]    = s[b, i] * sum_{o, ky, kx: oh * sh = h + ph - ky * dh, ...} M_b[o, i, ky, kx] gz[b, o, oh, ow]
    Q_b               = gz_b X_b^T                                    # [O, I * kh * kw]
    dV_b              = Q_b - c_b[:, None] * V_b
    dW_k              = sum_b a_b[k] * dV_b * s_b                     # s over i, broadcast over taps
    ds_b[i]           = sum_{o, ky, kx} dV_b * M_b
    dalpha_b[k]       = <dV_b * s_b, W_k>_F

``_modconv2d_bwd_prep_kernel``      one pass over (g, y): ``sum_p g`` and ``sum_p g * y`` per
                                    (b, o), float32 (dbias, and ``c`` for the demodulation).
``_modconv2d_bwd_dx_kernel``        groups == 1: implicit GEMM of the transposed convolution,
                                    ``gz`` (scaled by d in the A-tile load) against the mixed
                                    filter tile, styles in the epilogue.
``_modconv2d_bwd_weight_kernel``    groups == 1: the one-pass weight-side kernel. A program owns
                                    an ``[O, I]`` tile of one tap (ky, kx) and a range of samples;
                                    per sample it accumulates ``Q_b`` over the pixels on tensor
                                    cores, then folds it into all K ``dW_k`` tiles, the ``ds_b``
                                    partial sums and the ``dalpha_b`` partial sums.
``_modconv2d_dw_bwd_dx_kernel`` /
``_modconv2d_dw_bwd_weight_kernel`` the same for depthwise (groups == I == O), without dots.

No atomics: every output element and every partial sum has exactly one writing program.
``dW_k`` accumulates across samples in registers (``BLOCK_K`` deep, all k at once) and is
stored once per tile and sample split (one float32 slice per split, summed by the launcher);
the ``ds``/``dalpha`` partials land in per-tile slots that the launcher sums in a fixed order. So the backward is deterministic whatever
``torch.are_deterministic_algorithms_enabled()`` says.
"""
import triton
import triton.language as tl

from .mod_conv2d_fwd import _in_pixel, _load_tap, _mix_tap, _mix_tap_unrolled, _mix_tap_vec


@triton.jit
def _modconv2d_bwd_prep_kernel(
    # pointers: g (B, O, HO, WO), y (B, O, HO, WO) (read when DEMOD), gsum (B, O), gy (B, O) float32 out
    g_ptr, y_ptr, gsum_ptr, gy_ptr,
    # sizes
    O, HO, WO,
    # strides (elements); gsum and gy are contiguous (B, O)
    stride_gb, stride_go, stride_gh, stride_gw,
    stride_yb, stride_yo, stride_yh, stride_yw,
    # meta
    DEMOD: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``gsum[b, o] = sum_p g[b, o, p]``, ``gy[b, o] = sum_p g[b, o, p] y[b, o, p]`` (float32).

    Grid ``(B, cdiv(O, BLOCK_O))``: one read of g (and y), bandwidth-bound.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    P = HO * WO
    g_b = g_ptr + b * stride_gb
    y_b = y_ptr + b * stride_yb
    s1 = tl.zeros([BLOCK_O], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_O], dtype=tl.float32)
    for pb in range(0, tl.cdiv(P, BLOCK_P)):
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        oh = offs_p // WO
        ow = offs_p - oh * WO
        msk = omask[:, None] & pmask[None, :]
        gv = tl.load(g_b + offs_o[:, None] * stride_go + (oh * stride_gh + ow * stride_gw)[None, :],
                     mask=msk, other=0.0).to(tl.float32)
        s1 += tl.sum(gv, axis=1)
        if DEMOD:
            yv = tl.load(y_b + offs_o[:, None] * stride_yo + (oh * stride_yh + ow * stride_yw)[None, :],
                         mask=msk, other=0.0).to(tl.float32)
            s2 += tl.sum(gv * yv, axis=1)
    tl.store(gsum_ptr + b * O + offs_o, s1, mask=omask)
    if DEMOD:
        tl.store(gy_ptr + b * O + offs_o, s2, mask=omask)


@triton.jit
def _out_pixel(h, w, ky, kx, HO, WO, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw, qmask):
    """The output pixel (oh, ow) that input pixel (h, w) meets through tap (ky, kx), and whether
    it exists (inside the output, on the stride grid)."""
    th = h + conv_ph - ky * conv_dh
    tw = w + conv_pw - kx * conv_dw
    thc = tl.where(th >= 0, th, 0)  # keep the division on non-negative values: no rounding-mode question
    twc = tl.where(tw >= 0, tw, 0)
    oh = thc // conv_sh
    ow = twc // conv_sw
    valid = qmask & (th >= 0) & (tw >= 0) & (oh * conv_sh == thc) & (ow * conv_sw == twc) & (oh < HO) & (ow < WO)
    return oh, ow, valid


@triton.jit
def _modconv2d_bwd_dx_kernel(
    # pointers: g (B, O, HO, WO), bank (K, O, I, KH, KW), coeffs (B, K), styles (B, I),
    # d (B, O) float32, dx (B, I, H, W) out
    g_ptr, w_ptr, a_ptr, s_ptr, d_ptr, dx_ptr,
    # sizes and conv geometry
    B, I, H, W, O, K, KH, KW, HO, WO,
    conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
    # autotuning keys only
    q_bucket, r_bucket,
    # strides (elements)
    stride_gb, stride_go, stride_gh, stride_gw,
    stride_wk, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_sb, stride_si,
    stride_db, stride_do,
    stride_xb, stride_xi, stride_xh, stride_xw,
    # meta
    HAS_COEFFS: tl.constexpr, HAS_STYLES: tl.constexpr, DEMOD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,  # power of two >= K: the bank tiles mixed per step (1 without coeffs)
):
    """``dx[b, i, q] = s[b, i] * sum_{ky,kx,o} gz[b, o, op(q, ky, kx)] M_b[o, i, ky, kx]`` for one
    ``[BLOCK_Q input pixels of sample b, BLOCK_I]`` tile.

    Grid ``(B * cdiv(H * W, BLOCK_Q), cdiv(I, BLOCK_I))``. Main loop over taps, then ``O`` blocks:
    A tile ``g[b, o, oh, ow] * d[b, o]`` gathered at the output pixel each input pixel meets
    through the tap (masked off the stride grid: with stride s, ``1 - 1/s^2`` of those lanes
    are zeros), B tile the mixed filter ``M_b[o, i, ky, kx]``.
    """
    pid = tl.program_id(0)
    pid_i = tl.program_id(1)
    Q = H * W
    n_qt = tl.cdiv(Q, BLOCK_Q)
    b = pid // n_qt
    b64 = b.to(tl.int64)  # int64 per-sample bases, int32 in-sample offsets (checked by the launcher)
    offs_q = (pid - b * n_qt) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = offs_q < Q
    h = offs_q // W
    w = offs_q - h * W
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = offs_i < I
    g_b = g_ptr + b64 * stride_gb
    dt = w_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_Q, BLOCK_I], dtype=tl.float32)
    for t in range(0, KH * KW):
        ky = t // KW
        kx = t - ky * KW
        oh, ow, valid = _out_pixel(h, w, ky, kx, HO, WO, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
                                   qmask)
        grow = oh * stride_gh + ow * stride_gw  # [BLOCK_Q]
        for ob in range(0, tl.cdiv(O, BLOCK_O)):
            offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
            omask = offs_o < O
            ga = tl.load(g_b + grow[:, None] + offs_o[None, :] * stride_go, mask=valid[:, None] & omask[None, :],
                         other=0.0)  # [BLOCK_Q, BLOCK_O]
            if DEMOD:
                dv = tl.load(d_ptr + b64 * stride_db + offs_o * stride_do, mask=omask, other=0.0)
                ga = ga.to(tl.float32) * dv[None, :]
            ga = ga.to(dt)
            if HAS_COEFFS:
                m = _mix_tap_unrolled(w_ptr, a_ptr, b64, K, offs_o, offs_i, ky, kx, stride_wk, stride_wo,
                                      stride_wi, stride_wh, stride_ww, stride_ab, stride_ak, omask, imask,
                                      BLOCK_O, BLOCK_I, BLOCK_K).to(dt)  # [BLOCK_O, BLOCK_I]
            else:
                m = _load_tap(w_ptr, 0, offs_o, offs_i, ky, kx, stride_wk, stride_wo, stride_wi, stride_wh,
                              stride_ww, omask, imask)
            acc = tl.dot(ga, m, acc, input_precision=DOT_PREC)

    if HAS_STYLES:
        s = tl.load(s_ptr + b64 * stride_sb + offs_i * stride_si, mask=imask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    xp = dx_ptr + b64 * stride_xb + offs_i[None, :] * stride_xi + (h * stride_xh + w * stride_xw)[:, None]
    tl.store(xp, acc.to(dx_ptr.dtype.element_ty), mask=qmask[:, None] & imask[None, :])


@triton.jit
def _modconv2d_bwd_weight_kernel(
    # pointers: g (B, O, HO, WO), x (B, I, H, W), bank (K, O, I, KH, KW), coeffs (B, K),
    # styles (B, I), d (B, O) and c (B, O) float32; float32 outputs: dw (splits, K, O, I, KH*KW),
    # ds (O tiles * KH*KW, B, I) and da (tiles, B, K) partial slots
    g_ptr, x_ptr, w_ptr, a_ptr, s_ptr, d_ptr, c_ptr, dw_ptr, ds_ptr, da_ptr,
    # sizes, conv geometry, samples per split, chunks of BLOCK_K experts
    B, I, H, W, O, K, KH, KW, HO, WO,
    conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
    samples_per_split, k_chunks,
    # autotuning key only
    p_bucket,
    # strides (elements)
    stride_gb, stride_go, stride_gh, stride_gw,
    stride_xb, stride_xi, stride_xh, stride_xw,
    stride_wk, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_sb, stride_si,
    stride_db, stride_do,
    stride_cb, stride_co,
    stride_dws, stride_dwk, stride_dwo, stride_dwi, stride_dwt,
    stride_dsp, stride_dsb, stride_dsi,
    stride_dap, stride_dab, stride_dak,
    # meta: features
    HAS_COEFFS: tl.constexpr, HAS_STYLES: tl.constexpr, DEMOD: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DS: tl.constexpr, NEED_DA: tl.constexpr, DOT_PREC: tl.constexpr,
    # meta: tiles (BLOCK_K: next power of two of K, the depth of the register accumulators)
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_k (all k), ds_b partials and dalpha_b partials in one pass over (gz, x).

    Grid ``(cdiv(O, BLOCK_O), cdiv(I, BLOCK_I) * KH * KW, splits * k_chunks)``: program (o-tile,
    i-tile, tap, split, k-chunk) owns ``dw[split, k-chunk, o-tile, i-tile, tap]``. ``k_chunks = 1``
    unless K passes the register budget (``BLOCK_K <= 16``): then each chunk recomputes Q. For
    each of its samples b:

    1. ``Q = sum_p gz[b, o, p] x[b, i, ih(p), iw(p)]`` on tensor cores (``BLOCK_O x BLOCK_I``,
       reduction over the ``HO * WO`` output pixels in blocks of ``BLOCK_P``);
    2. ``M_b = sum_k a_bk W_k`` from the bank tiles of this tap (re-read from L2 per sample,
       only with demodulation or ds); ``dV = Q - c[b, o] M_b s_b``, ``dVs = dV s_b``;
    3. ``acc[k] += a_bk dVs`` in a ``BLOCK_K x BLOCK_O x BLOCK_I`` float32 register accumulator
       (all k at once), ``da[tile, b, k] = <dVs, W_k>`` (one bank tile at a time) and
       ``ds[o-tile, tap, b, i] = sum_o dV M_b`` into slots this program alone writes.

    The accumulator is stored once, after the last sample. Per sample and tile the fold costs
    ``~3 K BLOCK_O BLOCK_I`` FMAs on CUDA cores against ``2 BLOCK_O BLOCK_I HO WO`` MMA FLOPs.
    """
    pid_o = tl.program_id(0)
    pid_it = tl.program_id(1)
    pid_2 = tl.program_id(2)
    split = pid_2 // k_chunks
    kc = pid_2 - split * k_chunks
    KK = KH * KW
    n_it = tl.cdiv(I, BLOCK_I)
    it = pid_it // KK
    tap = pid_it - it * KK
    ky = tap // KW
    kx = tap - ky * KW
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = offs_i < I
    kk = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    KN = K if HAS_COEFFS else 1
    kmask = kk < KN
    k_hi = tl.minimum(kc * BLOCK_K + BLOCK_K, KN)
    tile_id = (pid_o * n_it * KK + pid_it).to(tl.int64)
    P = HO * WO
    dt = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_K, BLOCK_O, BLOCK_I], dtype=tl.float32)
    b_lo = split.to(tl.int64) * samples_per_split  # int64 loop: per-sample bases may pass 2^31
    b_hi = tl.minimum(b_lo + samples_per_split, B)
    for b in range(b_lo, b_hi):
        b64 = b  # int64 per-sample bases, int32 in-sample offsets (checked by the launcher)
        g_b = g_ptr + b64 * stride_gb
        x_b = x_ptr + b64 * stride_xb
        if DEMOD:
            dv = tl.load(d_ptr + b64 * stride_db + offs_o * stride_do, mask=omask, other=0.0)
        q = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for pb in range(0, tl.cdiv(P, BLOCK_P)):
            offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = offs_p < P
            oh = offs_p // WO
            ow = offs_p - oh * WO
            ih, iw, valid = _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw,
                                      conv_dh, conv_dw, pmask)
            gt = tl.load(g_b + offs_o[:, None] * stride_go + (oh * stride_gh + ow * stride_gw)[None, :],
                         mask=omask[:, None] & pmask[None, :], other=0.0)  # [BLOCK_O, BLOCK_P]
            if DEMOD:
                gt = gt.to(tl.float32) * dv[:, None]
            gt = gt.to(dt)
            xt = tl.load(x_b + (ih * stride_xh + iw * stride_xw)[:, None] + offs_i[None, :] * stride_xi,
                         mask=valid[:, None] & imask[None, :], other=0.0)  # [BLOCK_P, BLOCK_I]
            q = tl.dot(gt, xt, q, input_precision=DOT_PREC)

        if HAS_COEFFS:
            ab = tl.load(a_ptr + b64 * stride_ab + kk * stride_ak, mask=kmask, other=0.0).to(tl.float32)
        else:
            ab = tl.where(kk == 0, 1.0, 0.0)
        if DEMOD or NEED_DS:
            m = _mix_tap(w_ptr, a_ptr, b64, K, offs_o, offs_i, ky, kx, stride_wk, stride_wo, stride_wi, stride_wh,
                         stride_ww, stride_ab, stride_ak, omask, imask, HAS_COEFFS, BLOCK_O, BLOCK_I)
        if HAS_STYLES:
            s = tl.load(s_ptr + b64 * stride_sb + offs_i * stride_si, mask=imask, other=0.0).to(tl.float32)
        dV = q
        if DEMOD:
            cv = tl.load(c_ptr + b64 * stride_cb + offs_o * stride_co, mask=omask, other=0.0)
            if HAS_STYLES:
                dV = dV - cv[:, None] * (m * s[None, :])
            else:
                dV = dV - cv[:, None] * m
        if NEED_DS:  # (k-chunk 0 only: every chunk computes the same dV)
            tl.store(ds_ptr + (pid_o * KK + tap).to(tl.int64) * stride_dsp + b64 * stride_dsb + offs_i * stride_dsi,
                     tl.sum(dV * m, axis=0), mask=imask & (kc == 0))
        if HAS_STYLES:
            dVs = dV * s[None, :]
        else:
            dVs = dV
        if NEED_DW:
            acc += ab[:, None, None] * dVs[None, :, :]
        if NEED_DA:
            # one bank tile at a time (a BLOCK_K-deep float32 copy would not fit in registers)
            for k in range(kc * BLOCK_K, k_hi):
                wk = _load_tap(w_ptr, k, offs_o, offs_i, ky, kx, stride_wk, stride_wo, stride_wi, stride_wh,
                               stride_ww, omask, imask).to(tl.float32)
                tl.store(da_ptr + tile_id * stride_dap + b64 * stride_dab + k * stride_dak, tl.sum(dVs * wk))
    if NEED_DW:
        dwp = dw_ptr + split.to(tl.int64) * stride_dws + kk[:, None, None] * stride_dwk \
            + offs_o[None, :, None] * stride_dwo + offs_i[None, None, :] * stride_dwi + tap * stride_dwt
        mask3 = kmask[:, None, None] & omask[None, :, None] & imask[None, None, :]
        tl.store(dwp, acc, mask=mask3)


@triton.jit
def _modconv2d_dw_bwd_dx_kernel(
    # pointers: g (B, C, HO, WO), bank (K, C, 1, KH, KW), coeffs (B, K), d (B, C) float32, dx (B, C, H, W) out
    g_ptr, w_ptr, a_ptr, d_ptr, dx_ptr,
    # sizes and conv geometry
    B, C, H, W, K, KH, KW, HO, WO,
    conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
    # strides (elements)
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_wk, stride_wc, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_db, stride_do,
    stride_xb, stride_xc, stride_xh, stride_xw,
    # meta
    HAS_COEFFS: tl.constexpr, DEMOD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Depthwise ``dx[b, c, q] = sum_{ky,kx} M_b[c, ky, kx] gz[b, c, op(q, ky, kx)]``.

    Grid ``(B * cdiv(H * W, BLOCK_Q), cdiv(C, BLOCK_C))``.
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    Q = H * W
    n_qt = tl.cdiv(Q, BLOCK_Q)
    b = pid // n_qt
    b64 = b.to(tl.int64)
    offs_q = (pid - b * n_qt) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = offs_q < Q
    h = offs_q // W
    w = offs_q - h * W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    g_b = g_ptr + b64 * stride_gb

    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
    for t in range(0, KH * KW):
        ky = t // KW
        kx = t - ky * KW
        oh, ow, valid = _out_pixel(h, w, ky, kx, HO, WO, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
                                   qmask)
        gp = g_b + (oh * stride_gh + ow * stride_gw)[:, None] + offs_c[None, :] * stride_gc
        gv = tl.load(gp, mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        m = _mix_tap_vec(w_ptr, a_ptr, b64, K, offs_c, ky, kx, stride_wk, stride_wc, stride_wh, stride_ww,
                         stride_ab, stride_ak, cmask, HAS_COEFFS, BLOCK_C)
        acc += gv * m[None, :]
    if DEMOD:
        dv = tl.load(d_ptr + b64 * stride_db + offs_c * stride_do, mask=cmask, other=0.0)
        acc = acc * dv[None, :]
    xp = dx_ptr + b64 * stride_xb + offs_c[None, :] * stride_xc + (h * stride_xh + w * stride_xw)[:, None]
    tl.store(xp, acc.to(dx_ptr.dtype.element_ty), mask=qmask[:, None] & cmask[None, :])


@triton.jit
def _modconv2d_dw_bwd_weight_kernel(
    # pointers: g (B, C, HO, WO), x (B, C, H, W), bank (K, C, 1, KH, KW), coeffs (B, K), d, c (B, C)
    # float32; float32 outputs: dw (splits, K, C, 1, KH*KW), da (C tiles * KH*KW, B, K)
    g_ptr, x_ptr, w_ptr, a_ptr, d_ptr, c_ptr, dw_ptr, da_ptr,
    # sizes, conv geometry, samples per split
    B, C, H, W, K, KH, KW, HO, WO,
    conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
    samples_per_split,
    # strides (elements)
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_db, stride_do,
    stride_cb, stride_co,
    stride_dws, stride_dwk, stride_dwc, stride_dwt,
    stride_dap, stride_dab, stride_dak,
    # meta
    HAS_COEFFS: tl.constexpr, DEMOD: tl.constexpr, NEED_DW: tl.constexpr, NEED_DA: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Depthwise dW_k and dalpha_b partials: per sample ``Q[c] = sum_p gz[b,c,p] x[b,c,ih,iw]`` for
    one tap, ``dV = Q - c M_b``, then ``acc[k] += a_bk dV`` (registers, ``BLOCK_K x BLOCK_C``)
    and ``da[tile, b, k] = <dV, W_k>``; the accumulator is stored once at the end.

    Grid ``(cdiv(C, BLOCK_C), KH * KW, splits)``; program (c-tile, tap, split) owns its dw slice.
    """
    pid_c = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    KK = KH * KW
    ky = tap // KW
    kx = tap - ky * KW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    P = HO * WO
    KN = K if HAS_COEFFS else 1
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < KN
    mask2 = kmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)

    b_lo = split.to(tl.int64) * samples_per_split  # int64 loop: per-sample bases may pass 2^31
    b_hi = tl.minimum(b_lo + samples_per_split, B)
    for b in range(b_lo, b_hi):
        b64 = b
        g_b = g_ptr + b64 * stride_gb
        x_b = x_ptr + b64 * stride_xb
        q = tl.zeros([BLOCK_C], dtype=tl.float32)
        for pb in range(0, tl.cdiv(P, BLOCK_P)):
            offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = offs_p < P
            oh = offs_p // WO
            ow = offs_p - oh * WO
            ih, iw, valid = _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw,
                                      conv_dh, conv_dw, pmask)
            gv = tl.load(g_b + (oh * stride_gh + ow * stride_gw)[:, None] + offs_c[None, :] * stride_gc,
                         mask=pmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            xv = tl.load(x_b + (ih * stride_xh + iw * stride_xw)[:, None] + offs_c[None, :] * stride_xc,
                         mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            q += tl.sum(gv * xv, axis=0)
        dV = q
        if DEMOD:
            dv = tl.load(d_ptr + b64 * stride_db + offs_c * stride_do, mask=cmask, other=0.0)
            cv = tl.load(c_ptr + b64 * stride_cb + offs_c * stride_co, mask=cmask, other=0.0)
            m = _mix_tap_vec(w_ptr, a_ptr, b64, K, offs_c, ky, kx, stride_wk, stride_wc, stride_wh, stride_ww,
                             stride_ab, stride_ak, cmask, HAS_COEFFS, BLOCK_C)
            dV = q * dv - cv * m
        if HAS_COEFFS:
            ab = tl.load(a_ptr + b64 * stride_ab + kk * stride_ak, mask=kmask, other=0.0).to(tl.float32)
        else:
            ab = tl.where(kk == 0, 1.0, 0.0)
        if NEED_DW:
            acc += ab[:, None] * dV[None, :]
        if NEED_DA:
            wt = tl.load(w_ptr + kk[:, None] * stride_wk + offs_c[None, :] * stride_wc + ky * stride_wh
                         + kx * stride_ww, mask=mask2, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_C]
            tl.store(da_ptr + (pid_c * KK + tap).to(tl.int64) * stride_dap + b64 * stride_dab + kk * stride_dak,
                     tl.sum(wt * dV[None, :], axis=1), mask=kmask)
    if NEED_DW:
        tl.store(dw_ptr + split.to(tl.int64) * stride_dws + kk[:, None] * stride_dwk + offs_c[None, :] * stride_dwc
                 + tap * stride_dwt, acc, mask=mask2)
