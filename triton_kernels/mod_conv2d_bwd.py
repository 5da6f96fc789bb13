"""mod_conv2d backward kernels (docs/design.md section 2, conv2d form).

With ``g = dL/dy``, ``gz = d * g`` and ``c[b, o] = (sum_p g z) d^3`` (0 without demodulation;
the launcher forms it from the pre-pass sums), ``V_b = M_b * s_b``, and the im2col gather
``X_b[(i, ky, kx), p] = x[b, i, ih(p, ky), iw(p, kx)]``::

    dx[b, i, h, w]    = s[b, i] * sum_{o, ky, kx: oh * sh = h + ph - ky * dh, ...} M_b[o, i, ky, kx] gz[b, o, oh, ow]
    Q_b               = gz_b X_b^T                                    # [O, I * kh * kw]
    dW_b              = Q_b - c_b[:, None] * V_b                      # dL/dV_b, the effective filter's gradient
    dbank_k           = sum_b a_b[k] * dW_b * s_b                     # s over i, broadcast over taps
    ds_b[i]           = sum_{o, ky, kx} dW_b * M_b
    dalpha_b[k]       = <dW_b * s_b, W_k>_F

(``dW`` / ``dWs = dW * s`` name the weight-gradient tiles in the kernels, as in the linear ones;
``dmod`` the demodulation coefficients ``d`` loaded from ``d_ptr``; ``TAPS = kh * kw``.)

``_mod_conv2d_bwd_prep_kernel``      one pass over (g, y): ``sum_p g`` and ``sum_p g * y`` per
                                    (b, o), float32 (dbias, and ``c`` for the demodulation).
``_mod_conv2d_bwd_dx_kernel``        groups == 1: implicit GEMM of the transposed convolution,
                                    ``gz`` (scaled by d in the A-tile load) against the mixed
                                    filter tile, styles in the epilogue.
``_mod_conv2d_bwd_weight_kernel``    groups == 1: the one-pass weight-side kernel. A program owns
                                    an ``[O, I]`` tile of one tap (ky, kx) and a range of samples;
                                    per sample it accumulates ``Q_b`` over the pixels on tensor
                                    cores, then folds it into all K ``dbank_k`` tiles, the ``ds_b``
                                    partial sums and the ``dalpha_b`` partial sums.
``_mod_conv2d_dw_bwd_dx_kernel`` /
``_mod_conv2d_dw_bwd_weight_kernel`` the same for depthwise (groups == I == O), without dots.

No atomics: every output element and every partial sum has exactly one writing program.
``dbank_k`` accumulates across samples in registers (``BLOCK_K`` deep, all k at once) and is
stored once per tile and sample split (one float32 slice per split, summed by the launcher);
the ``ds``/``dalpha`` partials land in per-tile slots that the launcher sums in a fixed order.
So the backward is deterministic whatever ``torch.are_deterministic_algorithms_enabled()`` says.

The dx kernels are the forward's bodies (:func:`.mod_conv2d_fwd._conv_gemm`,
:func:`.mod_conv2d_fwd._dw_conv`) with ``TRANSPOSED`` set; their argument lists repeat the
forward's shape on purpose (flat scalar arguments: see :mod:`.mod_conv2d_fwd`).
"""
import triton
import triton.language as tl

from .mod_conv2d_fwd import (_coeff_vec, _conv_gemm, _dw_conv, _gather, _gather_t, _in_pixel, _load_tap,
                             _mix_tap, _mix_tap_vec, _pixel_block, _scatter, _tap, _vec)


@triton.jit
def _mod_conv2d_bwd_prep_kernel(
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
        offs_p, pmask, oh, ow = _pixel_block(pb * BLOCK_P, P, WO, BLOCK_P)
        gv = _gather_t(g_b, oh * stride_gh + ow * stride_gw, offs_o, stride_go, pmask, omask).to(tl.float32)
        s1 += tl.sum(gv, axis=1)
        if DEMOD:
            yv = _gather_t(y_b, oh * stride_yh + ow * stride_yw, offs_o, stride_yo, pmask, omask).to(tl.float32)
            s2 += tl.sum(gv * yv, axis=1)
    tl.store(gsum_ptr + b * O + offs_o, s1, mask=omask)
    if DEMOD:
        tl.store(gy_ptr + b * O + offs_o, s2, mask=omask)


@triton.jit
def _sample_range(split, samples_per_split, B):
    """The samples ``[b_lo, b_hi)`` of a weight-side program's split, int64: the loop over them
    gives int64 per-sample bases (the batch may pass 2^31 elements)."""
    b_lo = split.to(tl.int64) * samples_per_split
    return b_lo, tl.minimum(b_lo + samples_per_split, B)


@triton.jit
def _mod_conv2d_bwd_dx_kernel(
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
    acc, b64, h, w, qmask, offs_i, imask = _conv_gemm(
        g_ptr, w_ptr, a_ptr, d_ptr, s_ptr, tl.program_id(0), tl.program_id(1), K, KH, KW, O, I, H, W, HO, WO,
        conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
        stride_gb, stride_go, stride_gh, stride_gw, stride_wk, stride_wo, stride_wi, stride_wh, stride_ww,
        stride_ab, stride_ak, stride_db, stride_do, stride_sb, stride_si,
        True, DEMOD, HAS_STYLES, HAS_COEFFS, DOT_PREC, False, BLOCK_Q, BLOCK_I, BLOCK_O, BLOCK_K)
    _scatter(dx_ptr + b64 * stride_xb, h * stride_xh + w * stride_xw, offs_i, stride_xi, qmask, imask, acc)


@triton.jit
def _mod_conv2d_bwd_weight_kernel(
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
    """dbank_k (all k), ds_b partials and dalpha_b partials in one pass over (gz, x).

    Grid ``(cdiv(O, BLOCK_O), cdiv(I, BLOCK_I) * KH * KW, splits * k_chunks)``: program (o-tile,
    i-tile, tap, split, k-chunk) owns ``dw[split, k-chunk, o-tile, i-tile, tap]``. ``k_chunks = 1``
    unless K passes the register budget (``BLOCK_K <= 16``): then each chunk recomputes Q. For
    each of its samples b:

    1. ``Q = sum_p gz[b, o, p] x[b, i, ih(p), iw(p)]`` on tensor cores (``BLOCK_O x BLOCK_I``,
       reduction over the ``HO * WO`` output pixels in blocks of ``BLOCK_P``);
    2. ``M_b = sum_k a_bk W_k`` from the bank tiles of this tap (re-read from L2 per sample,
       only with demodulation or ds); ``dW = Q - c[b, o] M_b s_b``, ``dWs = dW s_b``;
    3. ``acc[k] += a_bk dWs`` in a ``BLOCK_K x BLOCK_O x BLOCK_I`` float32 register accumulator
       (all k at once), ``da[tile, b, k] = <dWs, W_k>`` (one bank tile at a time) and
       ``ds[o-tile, tap, b, i] = sum_o dW M_b`` into slots this program alone writes.

    The accumulator is stored once, after the last sample. Per sample and tile the fold costs
    ``~3 K BLOCK_O BLOCK_I`` FMAs on CUDA cores against ``2 BLOCK_O BLOCK_I HO WO`` MMA FLOPs.
    """
    pid_o = tl.program_id(0)
    pid_it = tl.program_id(1)
    pid_2 = tl.program_id(2)
    split = pid_2 // k_chunks
    kc = pid_2 - split * k_chunks
    TAPS = KH * KW
    n_it = tl.cdiv(I, BLOCK_I)
    it = pid_it // TAPS
    tap = pid_it - it * TAPS
    ky, kx = _tap(tap, KW)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = offs_i < I
    kk = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    NBANK = K if HAS_COEFFS else 1
    kmask = kk < NBANK
    k_hi = tl.minimum(kc * BLOCK_K + BLOCK_K, NBANK)
    tile_id = (pid_o * n_it * TAPS + pid_it).to(tl.int64)
    P = HO * WO
    dt = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_K, BLOCK_O, BLOCK_I], dtype=tl.float32)
    b_lo, b_hi = _sample_range(split, samples_per_split, B)
    for b in range(b_lo, b_hi):  # b: int64 per-sample bases, int32 in-sample offsets (checked by the launcher)
        g_b = g_ptr + b * stride_gb
        x_b = x_ptr + b * stride_xb
        if DEMOD:
            dmod = _vec(d_ptr, b, offs_o, stride_db, stride_do, omask)
        q = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for pb in range(0, tl.cdiv(P, BLOCK_P)):
            offs_p, pmask, oh, ow = _pixel_block(pb * BLOCK_P, P, WO, BLOCK_P)
            ih, iw, valid = _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw,
                                      conv_dh, conv_dw, pmask)
            gt = _gather_t(g_b, oh * stride_gh + ow * stride_gw, offs_o, stride_go, pmask, omask)  # [BLOCK_O, BLOCK_P]
            if DEMOD:
                gt = gt.to(tl.float32) * dmod[:, None]
            gt = gt.to(dt)
            xt = _gather(x_b, ih * stride_xh + iw * stride_xw, offs_i, stride_xi, valid, imask)  # [BLOCK_P, BLOCK_I]
            q = tl.dot(gt, xt, q, input_precision=DOT_PREC)

        ab = _coeff_vec(a_ptr, b, kk, stride_ab, stride_ak, kmask, HAS_COEFFS)
        if DEMOD or NEED_DS:
            m = _mix_tap(w_ptr, a_ptr, b, K, offs_o, offs_i, ky, kx, stride_wk, stride_wo, stride_wi, stride_wh,
                         stride_ww, stride_ab, stride_ak, omask, imask, HAS_COEFFS, BLOCK_O, BLOCK_I)
        if HAS_STYLES:
            s = _vec(s_ptr, b, offs_i, stride_sb, stride_si, imask)
        dW = q  # the gradient of this sample's effective filter tile V_b = M_b s_b
        if DEMOD:
            cv = _vec(c_ptr, b, offs_o, stride_cb, stride_co, omask)
            if HAS_STYLES:
                dW = dW - cv[:, None] * (m * s[None, :])
            else:
                dW = dW - cv[:, None] * m
        if NEED_DS:  # (k-chunk 0 only: every chunk computes the same dW)
            tl.store(ds_ptr + (pid_o * TAPS + tap).to(tl.int64) * stride_dsp + b * stride_dsb + offs_i * stride_dsi,
                     tl.sum(dW * m, axis=0), mask=imask & (kc == 0))
        if HAS_STYLES:
            dWs = dW * s[None, :]  # the gradient of the mixed filter M_b
        else:
            dWs = dW
        if NEED_DW:
            acc += ab[:, None, None] * dWs[None, :, :]
        if NEED_DA:
            # one bank tile at a time (a BLOCK_K-deep float32 copy would not fit in registers)
            for k in range(kc * BLOCK_K, k_hi):
                wk = _load_tap(w_ptr, k, offs_o, offs_i, ky, kx, stride_wk, stride_wo, stride_wi, stride_wh,
                               stride_ww, omask, imask).to(tl.float32)
                tl.store(da_ptr + tile_id * stride_dap + b * stride_dab + k * stride_dak, tl.sum(dWs * wk))
    if NEED_DW:
        dwp = dw_ptr + split.to(tl.int64) * stride_dws + kk[:, None, None] * stride_dwk \
            + offs_o[None, :, None] * stride_dwo + offs_i[None, None, :] * stride_dwi + tap * stride_dwt
        mask3 = kmask[:, None, None] & omask[None, :, None] & imask[None, None, :]
        tl.store(dwp, acc, mask=mask3)


@triton.jit
def _mod_conv2d_dw_bwd_dx_kernel(
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
    acc, b64, h, w, qmask, offs_c, cmask = _dw_conv(
        g_ptr, w_ptr, a_ptr, d_ptr, tl.program_id(0), tl.program_id(1), K, KH, KW, C, H, W, HO, WO,
        conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
        stride_gb, stride_gc, stride_gh, stride_gw, stride_wk, stride_wc, stride_wh, stride_ww,
        stride_ab, stride_ak, stride_db, stride_do, True, DEMOD, HAS_COEFFS, BLOCK_Q, BLOCK_C)
    _scatter(dx_ptr + b64 * stride_xb, h * stride_xh + w * stride_xw, offs_c, stride_xc, qmask, cmask, acc)


@triton.jit
def _mod_conv2d_dw_bwd_weight_kernel(
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
    one tap, ``dW = Q d - c M_b``, then ``acc[k] += a_bk dW`` (registers, ``BLOCK_K x BLOCK_C``)
    and ``da[tile, b, k] = <dW, W_k>``; the accumulator is stored once at the end.

    Grid ``(cdiv(C, BLOCK_C), KH * KW, splits)``; program (c-tile, tap, split) owns its dw slice.
    """
    pid_c = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    TAPS = KH * KW
    ky, kx = _tap(tap, KW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    P = HO * WO
    NBANK = K if HAS_COEFFS else 1
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < NBANK
    mask2 = kmask[:, None] & cmask[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)

    b_lo, b_hi = _sample_range(split, samples_per_split, B)
    for b in range(b_lo, b_hi):
        g_b = g_ptr + b * stride_gb
        x_b = x_ptr + b * stride_xb
        q = tl.zeros([BLOCK_C], dtype=tl.float32)
        for pb in range(0, tl.cdiv(P, BLOCK_P)):
            offs_p, pmask, oh, ow = _pixel_block(pb * BLOCK_P, P, WO, BLOCK_P)
            ih, iw, valid = _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw,
                                      conv_dh, conv_dw, pmask)
            gv = _gather(g_b, oh * stride_gh + ow * stride_gw, offs_c, stride_gc, pmask, cmask).to(tl.float32)
            xv = _gather(x_b, ih * stride_xh + iw * stride_xw, offs_c, stride_xc, valid, cmask).to(tl.float32)
            q += tl.sum(gv * xv, axis=0)
        dW = q  # the gradient of this sample's filter tap M_b (no styles in the depthwise kernels)
        if DEMOD:
            dmod = _vec(d_ptr, b, offs_c, stride_db, stride_do, cmask)
            cv = _vec(c_ptr, b, offs_c, stride_cb, stride_co, cmask)
            m = _mix_tap_vec(w_ptr, a_ptr, b, K, offs_c, ky, kx, stride_wk, stride_wc, stride_wh, stride_ww,
                             stride_ab, stride_ak, cmask, HAS_COEFFS, BLOCK_C)
            dW = q * dmod - cv * m
        ab = _coeff_vec(a_ptr, b, kk, stride_ab, stride_ak, kmask, HAS_COEFFS)
        if NEED_DW:
            acc += ab[:, None] * dW[None, :]
        if NEED_DA:
            wt = tl.load(w_ptr + kk[:, None] * stride_wk + offs_c[None, :] * stride_wc + ky * stride_wh
                         + kx * stride_ww, mask=mask2, other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_C]
            tl.store(da_ptr + (pid_c * TAPS + tap).to(tl.int64) * stride_dap + b * stride_dab + kk * stride_dak,
                     tl.sum(wt * dW[None, :], axis=1), mask=kmask)
    if NEED_DW:
        tl.store(dw_ptr + split.to(tl.int64) * stride_dws + kk[:, None] * stride_dwk + offs_c[None, :] * stride_dwc
                 + tap * stride_dwt, acc, mask=mask2)
