"""mod_conv2d forward kernels (DESIGN.md section 1, conv2d form), implicit GEMM.

For sample ``b`` with coefficients ``a_b (K)``, styles ``s_b (I)``, bank ``W_k (O, I/g, kh, kw)``::

    M_b[o, i, ky, kx] = sum_k a_b[k] W_k[o, i, ky, kx]                      # mixture
    z[b, o, p]        = sum_{i, ky, kx} M_b[o, i, ky, kx] s_b[i] x[b, i, ih(p, ky), iw(p, kx)]
    d[b, o]           = rsqrt(sum_{i, ky, kx} (M_b[o, i, ky, kx] s_b[i])^2 + eps)
    y[b, o, p]        = d[b, o] z[b, o, p] + bias_b[o]                        # bias_b = bias | a_b @ bias

with ``ih = oh * stride_h - pad_h + ky * dil_h`` (zero outside the image), likewise ``iw``.

``_modconv2d_demod_kernel``   ``d`` (B, O): the mixed filter rows formed tile by tile in
                              registers (``B * K * O * I/g * kh * kw`` FMAs), never stored.
``_modconv2d_fwd_kernel``     groups == 1: implicit GEMM over ``(pixels of one sample) x O``,
                              reduction over ``(ky, kx)`` taps then ``I`` blocks; styles folded
                              into the A-tile (input gather) load, the K-bank mixture into the
                              B-tile (filter) load; demodulation and bias in the epilogue.
``_modconv2d_dw_fwd_kernel``  depthwise (groups == I == O): per channel, no reduction over
                              channels, so no dot: ``kh * kw`` FMAs per output on CUDA cores
                              with the mixed filter tap loaded as a vector.

Nothing of size ``B x O x I x kh x kw`` is written anywhere.
"""
import triton
import triton.language as tl


@triton.jit
def _pixel_tile(pid, HO, WO, BLOCK_P: tl.constexpr):
    """Program ``pid``'s tile of BLOCK_P output pixels of one sample: (b, b64, offs_p, pmask,
    oh, ow). In-sample offsets are int32 (the launcher checks each sample's extent and the
    bank fit); per-sample bases use ``b64``: the batch may pass 2^31 elements."""
    P = HO * WO
    n_pt = tl.cdiv(P, BLOCK_P)
    b = pid // n_pt
    offs_p = (pid - b * n_pt) * BLOCK_P + tl.arange(0, BLOCK_P)
    oh = offs_p // WO
    return b, b.to(tl.int64), offs_p, offs_p < P, oh, offs_p - oh * WO


@triton.jit
def _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw, pmask):
    """The input pixel (ih, iw) that output pixel (oh, ow) reads through tap (ky, kx), and
    whether it exists (inside the image: padding reads zero). The inverse is
    ``mod_conv2d_bwd._out_pixel``."""
    ih = oh * conv_sh - conv_ph + ky * conv_dh
    iw = ow * conv_sw - conv_pw + kx * conv_dw
    return ih, iw, pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


@triton.jit
def _load_tap(w_ptr, k, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh, stride_ww, amask, bmask):
    """Tile ``bank[k, offs_a, offs_b, ky, kx]`` (pass o/i offsets and strides in either order to get
    the tile or its transpose), in the bank's dtype; zeros outside the masks."""
    p = w_ptr + k * stride_wk + ky * stride_wh + kx * stride_ww + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b
    return tl.load(p, mask=amask[:, None] & bmask[None, :], other=0.0)


@triton.jit
def _mix_tap(w_ptr, a_ptr, b, K, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh, stride_ww,
             stride_ab, stride_ak, amask, bmask,
             HAS_COEFFS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Sample b's mixture tile ``M_b = sum_k a[b, k] W_k`` at tap (ky, kx), float32 ``[BLOCK_A, BLOCK_B]``
    (``W_0`` without coefficients): ``K * BLOCK_A * BLOCK_B`` FMAs on CUDA cores."""
    if HAS_COEFFS:
        m = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        for k in range(0, K):
            ak = tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
            m += ak * _load_tap(w_ptr, k, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh,
                                stride_ww, amask, bmask).to(tl.float32)
    else:
        m = _load_tap(w_ptr, 0, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh, stride_ww,
                      amask, bmask).to(tl.float32)
    return m


@triton.jit
def _mix_tap_unrolled(w_ptr, a_ptr, b, K, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh,
                      stride_ww, stride_ab, stride_ak, amask, bmask,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_mix_tap` for a main loop: the K bank tiles unrolled over ``BLOCK_K`` (a power of two
    >= K, tiles beyond K masked off). A runtime loop over k nested in the main loop stops Triton's
    software pipeliner (the AOT report shows plain register loads and nothing in flight);
    unrolled, each bank tile is one more load staged ``num_stages`` deep (shared memory per stage
    grows by ``BLOCK_K`` tiles: the configs' pruning counts it)."""
    m = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for k in tl.static_range(BLOCK_K):
        kin = k < K
        ak = tl.load(a_ptr + b * stride_ab + k * stride_ak, mask=kin, other=0.0).to(tl.float32)
        m += ak * _load_tap(w_ptr, k, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh,
                            stride_ww, amask & kin, bmask).to(tl.float32)
    return m


@triton.jit
def _mix_tap_vec(w_ptr, a_ptr, b, K, offs_c, ky, kx, stride_wk, stride_wc, stride_wh, stride_ww, stride_ab,
                 stride_ak, cmask, HAS_COEFFS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise: the mixed filter tap ``sum_k a[b, k] W_k[c, 0, ky, kx]`` for a block of channels, float32."""
    base = w_ptr + ky * stride_wh + kx * stride_ww + offs_c * stride_wc
    if HAS_COEFFS:
        m = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in range(0, K):
            ak = tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
            m += ak * tl.load(base + k * stride_wk, mask=cmask, other=0.0).to(tl.float32)
    else:
        m = tl.load(base, mask=cmask, other=0.0).to(tl.float32)
    return m


@triton.jit
def _bias_vec(bias_ptr, a_ptr, b, K, offs_o, stride_bk, stride_bo, stride_ab, stride_ak, omask,
              BIAS: tl.constexpr, BLOCK_O: tl.constexpr):
    """bias_b for a block of output channels, float32: ``bias`` (BIAS == 1) or ``a_b @ bias`` (BIAS == 2)."""
    if BIAS == 1:
        bv = tl.load(bias_ptr + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)
    else:
        bv = tl.zeros([BLOCK_O], dtype=tl.float32)
        for k in range(0, K):
            ak = tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
            bv += ak * tl.load(bias_ptr + k * stride_bk + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)
    return bv


@triton.jit
def _modconv2d_demod_kernel(
    # pointers: bank (K, O, IG, KH, KW), coeffs (B, K), styles (B, I), d (B, O) float32 out
    w_ptr, a_ptr, s_ptr, d_ptr,
    # sizes
    IG, O, K, KH, KW,
    # strides (elements)
    stride_wk, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_sb, stride_si,
    stride_db, stride_do,
    eps,
    # meta
    HAS_COEFFS: tl.constexpr, HAS_STYLES: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``d[b, o] = rsqrt(sum_{i,ky,kx} (sum_k a[b,k] W_k[o,i,ky,kx] s[b,i])^2 + eps)``.

    Grid ``(B, cdiv(O, BLOCK_O))``; the reduction index ``r = (i, ky, kx)`` runs over
    ``IG * KH * KW`` in blocks of ``BLOCK_R``. Cost ``B * K * O * IG * KH * KW`` FMAs, the bank
    read once per sample (from L2 when it fits).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    KK = KH * KW
    R = IG * KK
    KN = K if HAS_COEFFS else 1
    nrm = tl.zeros([BLOCK_O], dtype=tl.float32)
    for rb in range(0, tl.cdiv(R, BLOCK_R)):
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        i = offs_r // KK
        t = offs_r - i * KK
        ky = t // KW
        kx = t - ky * KW
        roff = i * stride_wi + ky * stride_wh + kx * stride_ww
        m = tl.zeros([BLOCK_O, BLOCK_R], dtype=tl.float32)
        for k in range(0, KN):
            w = tl.load(w_ptr + k * stride_wk + offs_o[:, None] * stride_wo + roff[None, :],
                        mask=omask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            if HAS_COEFFS:
                w = w * tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
            m += w
        if HAS_STYLES:
            s = tl.load(s_ptr + b * stride_sb + i * stride_si, mask=rmask, other=0.0).to(tl.float32)
            m = m * s[None, :]
        nrm += tl.sum(m * m, axis=1)
    tl.store(d_ptr + b * stride_db + offs_o * stride_do, tl.rsqrt(nrm + eps), mask=omask)


@triton.jit
def _modconv2d_fwd_kernel(
    # pointers: x (B, I, H, W), bank (K, O, I, KH, KW), coeffs (B, K), styles (B, I),
    # bias (O,) | (K, O), d (B, O) float32, y (B, O, HO, WO) out
    x_ptr, w_ptr, a_ptr, s_ptr, bias_ptr, d_ptr, y_ptr,
    # sizes; conv geometry (runtime: a new stride or padding does not recompile)
    B, I, H, W, O, K, KH, KW, HO, WO,
    conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
    # autotuning keys only (powers of two of the pixels per sample and of I * KH * KW)
    p_bucket, r_bucket,
    # strides (elements)
    stride_xb, stride_xi, stride_xh, stride_xw,
    stride_wk, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_sb, stride_si,
    stride_bk, stride_bo,
    stride_db, stride_do,
    stride_yb, stride_yo, stride_yh, stride_yw,
    # meta: features
    HAS_COEFFS: tl.constexpr,   # coeffs given (else K == 1 and a = 1)
    HAS_STYLES: tl.constexpr,   # styles given
    DEMOD: tl.constexpr,        # multiply by d in the epilogue
    BIAS: tl.constexpr,         # 0 none | 1 (O,) | 2 (K, O) mixed by the coefficients
    DOT_PREC: tl.constexpr,     # tl.dot input precision for float32 operands ("ieee" | "tf32")
    # meta: tiles
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,      # power of two >= K: the bank tiles mixed per step (1 without coeffs)
):
    """``y = d * z + bias`` for one ``[BLOCK_P pixels of sample b, BLOCK_O]`` output tile.

    Grid ``(B * cdiv(HO * WO, BLOCK_P), cdiv(O, BLOCK_O))``. Main loop over taps (ky, kx), then
    ``I`` in blocks: A tile ``x[b, i, ih(p), iw(p)] * s[b, i]`` (a masked gather: the padding
    is never materialised), B tile ``M_b[o, i, ky, kx]`` mixed in registers
    (``K * BLOCK_I * BLOCK_O`` CUDA-core FMAs per step, repeated for each pixel tile of the same
    sample: keep ``BLOCK_P`` tall when K > 1), one tensor-core dot per step.
    """
    pid = tl.program_id(0)
    pid_o = tl.program_id(1)
    P = HO * WO
    b, b64, offs_p, pmask, oh, ow = _pixel_tile(pid, HO, WO, BLOCK_P)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    x_b = x_ptr + b64 * stride_xb
    dt = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
    for t in range(0, KH * KW):
        ky = t // KW
        kx = t - ky * KW
        ih, iw, valid = _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw,
                                  conv_dh, conv_dw, pmask)
        xrow = ih * stride_xh + iw * stride_xw  # [BLOCK_P]
        for ib in range(0, tl.cdiv(I, BLOCK_I)):
            offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
            imask = offs_i < I
            xa = tl.load(x_b + xrow[:, None] + offs_i[None, :] * stride_xi, mask=valid[:, None] & imask[None, :],
                         other=0.0)  # [BLOCK_P, BLOCK_I]
            if HAS_STYLES:
                s = tl.load(s_ptr + b64 * stride_sb + offs_i * stride_si, mask=imask, other=0.0).to(tl.float32)
                xa = (xa.to(tl.float32) * s[None, :]).to(dt)
            if HAS_COEFFS:
                m = _mix_tap_unrolled(w_ptr, a_ptr, b64, K, offs_i, offs_o, ky, kx, stride_wk, stride_wi,
                                      stride_wo, stride_wh, stride_ww, stride_ab, stride_ak, imask, omask,
                                      BLOCK_I, BLOCK_O, BLOCK_K).to(dt)  # [BLOCK_I, BLOCK_O]
            else:
                m = _load_tap(w_ptr, 0, offs_i, offs_o, ky, kx, stride_wk, stride_wi, stride_wo, stride_wh,
                              stride_ww, imask, omask)
            acc = tl.dot(xa, m, acc, input_precision=DOT_PREC)

    if DEMOD:
        dv = tl.load(d_ptr + b64 * stride_db + offs_o * stride_do, mask=omask, other=0.0)
        acc = acc * dv[None, :]
    if BIAS != 0:
        acc += _bias_vec(bias_ptr, a_ptr, b64, K, offs_o, stride_bk, stride_bo, stride_ab, stride_ak, omask,
                         BIAS, BLOCK_O)[None, :]
    yp = y_ptr + b64 * stride_yb + offs_o[None, :] * stride_yo + (oh * stride_yh + ow * stride_yw)[:, None]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & omask[None, :])


@triton.jit
def _modconv2d_dw_fwd_kernel(
    # pointers: x (B, C, H, W), bank (K, C, 1, KH, KW), coeffs (B, K), bias (C,) | (K, C),
    # d (B, C) float32, y (B, C, HO, WO) out
    x_ptr, w_ptr, a_ptr, bias_ptr, d_ptr, y_ptr,
    # sizes and conv geometry
    B, C, H, W, K, KH, KW, HO, WO,
    conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
    # strides (elements)
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wk, stride_wc, stride_wh, stride_ww,
    stride_ab, stride_ak,
    stride_bk, stride_bo,
    stride_db, stride_do,
    stride_yb, stride_yc, stride_yh, stride_yw,
    # meta
    HAS_COEFFS: tl.constexpr, DEMOD: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Depthwise ``y[b, c, p] = d[b, c] * sum_{ky,kx} M_b[c, ky, kx] x[b, c, ih, iw] + bias_b[c]``.

    Grid ``(B * cdiv(HO * WO, BLOCK_P), cdiv(C, BLOCK_C))``. Bandwidth-bound (``kh * kw`` FMAs per
    output): the mixture costs ``K`` loads of a ``BLOCK_C`` vector per tap, nothing next to the
    ``BLOCK_P x BLOCK_C`` input gather.
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    P = HO * WO
    b, b64, offs_p, pmask, oh, ow = _pixel_tile(pid, HO, WO, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    x_b = x_ptr + b64 * stride_xb

    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(0, KH * KW):
        ky = t // KW
        kx = t - ky * KW
        ih, iw, valid = _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw,
                                  conv_dh, conv_dw, pmask)
        xv = tl.load(x_b + (ih * stride_xh + iw * stride_xw)[:, None] + offs_c[None, :] * stride_xc,
                     mask=valid[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        m = _mix_tap_vec(w_ptr, a_ptr, b64, K, offs_c, ky, kx, stride_wk, stride_wc, stride_wh, stride_ww,
                         stride_ab, stride_ak, cmask, HAS_COEFFS, BLOCK_C)
        acc += xv * m[None, :]

    if DEMOD:
        dv = tl.load(d_ptr + b64 * stride_db + offs_c * stride_do, mask=cmask, other=0.0)
        acc = acc * dv[None, :]
    if BIAS != 0:
        acc += _bias_vec(bias_ptr, a_ptr, b64, K, offs_c, stride_bk, stride_bo, stride_ab, stride_ak, cmask,
                         BIAS, BLOCK_C)[None, :]
    yp = y_ptr + b64 * stride_yb + offs_c[None, :] * stride_yc + (oh * stride_yh + ow * stride_yw)[:, None]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])
