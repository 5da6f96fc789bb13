"""mod_conv2d forward kernels (docs/design.md section 1, conv2d form), implicit GEMM.

For sample ``b`` with coefficients ``a_b (K)``, styles ``s_b (I)``, bank ``W_k (O, I/g, kh, kw)``::

    M_b[o, i, ky, kx] = sum_k a_b[k] W_k[o, i, ky, kx]                      # mixture
    z[b, o, p]        = sum_{i, ky, kx} M_b[o, i, ky, kx] s_b[i] x[b, i, ih(p, ky), iw(p, kx)]
    d[b, o]           = rsqrt(sum_{i, ky, kx} (M_b[o, i, ky, kx] s_b[i])^2 + eps)
    y[b, o, p]        = d[b, o] z[b, o, p] + bias_b[o]                        # bias_b = bias | a_b @ bias

with ``ih = oh * stride_h - pad_h + ky * dil_h`` (zero outside the image), likewise ``iw``.

``_mod_conv2d_demod_kernel``   ``d`` (B, O): the mixed filter rows formed tile by tile in
                              registers (``B * K * O * I/g * kh * kw`` FMAs), never stored.
``_mod_conv2d_fwd_kernel``     groups == 1: implicit GEMM over ``(pixels of one sample) x O``,
                              reduction over ``(ky, kx)`` taps then ``I`` blocks; styles folded
                              into the A-tile (input gather) load, the K-bank mixture into the
                              B-tile (filter) load; demodulation and bias in the epilogue.
``_mod_conv2d_dw_fwd_kernel``  depthwise (groups == I == O): per channel, no reduction over
                              channels, so no dot: ``kh * kw`` FMAs per output on CUDA cores
                              with the mixed filter tap loaded as a vector.

Nothing of size ``B x O x I x kh x kw`` is written anywhere.

The bodies are written once and shared with dx (:mod:`.mod_conv2d_bwd`, the transposed
convolution): :func:`_conv_gemm` (the implicit GEMM) and :func:`_dw_conv` (depthwise), with the
tile, tap, gather and vector helpers above them; Triton inlines every ``@triton.jit`` helper,
so the kernels compile as if written out (the AOT report checks their pipelining and spills).
The kernels' argument lists still repeat one another's shape (sizes, conv geometry, one stride
per tensor dimension), here, in dx and in the linear demodulation kernel, on purpose: a Triton
kernel takes flat scalar arguments (no structs), and its signature is what the launcher,
autotuning keys and the AOT report name.
"""
import triton
import triton.language as tl

from ._modes import BIAS_NONE, BIAS_SHARED


@triton.jit
def _tap(t, KW):
    """Tap ``t`` of a ``kh x kw`` filter in row-major order: (ky, kx)."""
    ky = t // KW
    return ky, t - ky * KW


@triton.jit
def _pixel_block(start, P, WO, BLOCK_P: tl.constexpr):
    """BLOCK_P pixels from ``start`` of a ``(HO, WO)`` image of ``P = HO * WO`` pixels, row-major:
    (offs_p, pmask, oh, ow)."""
    offs_p = start + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    oh = offs_p // WO
    return offs_p, pmask, oh, offs_p - oh * WO


@triton.jit
def _pixel_tile(pid, HO, WO, BLOCK_P: tl.constexpr):
    """Program ``pid``'s tile of BLOCK_P pixels of one sample's ``(HO, WO)`` image (the output
    for the forward, the input for dx): (b, b64, offs_p, pmask, oh, ow). In-sample offsets are
    int32 (the launcher checks each sample's extent and the bank fit); per-sample bases use
    ``b64``: the batch may pass 2^31 elements."""
    P = HO * WO
    n_pt = tl.cdiv(P, BLOCK_P)
    b = pid // n_pt
    offs_p, pmask, oh, ow = _pixel_block((pid - b * n_pt) * BLOCK_P, P, WO, BLOCK_P)
    return b, b.to(tl.int64), offs_p, pmask, oh, ow


@triton.jit
def _in_pixel(oh, ow, ky, kx, H, W, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw, pmask):
    """The input pixel (ih, iw) that output pixel (oh, ow) reads through tap (ky, kx), and
    whether it exists (inside the image: padding reads zero). The inverse is :func:`_out_pixel`."""
    ih = oh * conv_sh - conv_ph + ky * conv_dh
    iw = ow * conv_sw - conv_pw + kx * conv_dw
    return ih, iw, pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


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
def _tap_pixel(t, KW, ph, pw, SH, SW, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw, pmask,
               TRANSPOSED: tl.constexpr):
    """Tap ``t`` (ky, kx) and the pixel of the other image that pixel (ph, pw) meets through it,
    and whether that exists: the input pixel it reads (forward, :func:`_in_pixel`; ``(SH, SW)``
    the input size) or the output pixel it feeds (``TRANSPOSED``: dx, :func:`_out_pixel`; the
    output size). (ky, kx, sh, sw, valid)."""
    ky, kx = _tap(t, KW)
    if TRANSPOSED:
        sh, sw, valid = _out_pixel(ph, pw, ky, kx, SH, SW, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
                                   pmask)
    else:
        sh, sw, valid = _in_pixel(ph, pw, ky, kx, SH, SW, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
                                  pmask)
    return ky, kx, sh, sw, valid


@triton.jit
def _conv_tile(src_ptr, stride_sb, pid, pid_n, PH, PW, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``(pid, pid_n)``'s output tile of the forward or dx kernels: BLOCK_P pixels of one
    sample's ``(PH, PW)`` image (:func:`_pixel_tile`) by BLOCK_N of the ``N`` channels, and the
    sample's base in ``src``: (src_b, b64, ph, pw, pmask, offs_n, nmask)."""
    b, b64, offs_p, pmask, ph, pw = _pixel_tile(pid, PH, PW, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return src_ptr + b64 * stride_sb, b64, ph, pw, pmask, offs_n, offs_n < N


@triton.jit
def _gather(base, rows, offs_c, stride_c, rmask, cmask):
    """Tile ``[R, C]`` of ``base[rows[r] + offs_c[c] * stride_c]`` (rows: element offsets of pixels
    inside one sample), zeros outside the masks."""
    return tl.load(base + rows[:, None] + offs_c[None, :] * stride_c, mask=rmask[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _gather_t(base, rows, offs_c, stride_c, rmask, cmask):
    """:func:`_gather` transposed: tile ``[C, R]`` of ``base[offs_c[c] * stride_c + rows[r]]``."""
    return tl.load(base + offs_c[:, None] * stride_c + rows[None, :], mask=cmask[:, None] & rmask[None, :],
                   other=0.0)


@triton.jit
def _scatter(base, rows, offs_c, stride_c, rmask, cmask, val):
    """Store ``val`` ``[R, C]`` at ``base[rows[r] + offs_c[c] * stride_c]`` in base's dtype."""
    tl.store(base + rows[:, None] + offs_c[None, :] * stride_c, val.to(base.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _vec(ptr, b, offs, stride_b, stride_n, mask):
    """Sample ``b``'s vector ``ptr[b, offs]`` (styles, demodulation coefficients, c), float32."""
    return tl.load(ptr + b * stride_b + offs * stride_n, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _coeff_vec(a_ptr, b, kk, stride_ab, stride_ak, kmask, HAS_COEFFS: tl.constexpr):
    """Sample ``b``'s coefficients ``a[b, kk]``, float32; ``a = [1, 0, ...]`` without coefficients."""
    if HAS_COEFFS:
        ab = _vec(a_ptr, b, kk, stride_ab, stride_ak, kmask)
    else:
        ab = tl.where(kk == 0, 1.0, 0.0)
    return ab


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
def _filter_tile(w_ptr, a_ptr, b, K, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh, stride_ww,
                 stride_ab, stride_ak, amask, bmask,
                 HAS_COEFFS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The B tile of a main-loop step in the bank's dtype: sample b's mixed filter at tap (ky, kx)
    (:func:`_mix_tap_unrolled`), or ``W_0``'s tile without coefficients."""
    if HAS_COEFFS:
        m = _mix_tap_unrolled(w_ptr, a_ptr, b, K, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh,
                              stride_ww, stride_ab, stride_ak, amask, bmask, BLOCK_A, BLOCK_B,
                              BLOCK_K).to(w_ptr.dtype.element_ty)
    else:
        m = _load_tap(w_ptr, 0, offs_a, offs_b, ky, kx, stride_wk, stride_a, stride_b, stride_wh, stride_ww,
                      amask, bmask)
    return m


@triton.jit
def _conv_gemm(src_ptr, w_ptr, a_ptr, v_ptr, u_ptr, pid, pid_n, K, KH, KW, C, N, PH, PW, SH, SW,
               conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
               stride_sb, stride_sc, stride_sh, stride_sw, stride_wk, stride_wc, stride_wn, stride_wh, stride_ww,
               stride_ab, stride_ak, stride_vb, stride_vc, stride_ub, stride_un,
               TRANSPOSED: tl.constexpr, SCALE_IN: tl.constexpr, SCALE_OUT: tl.constexpr, HAS_COEFFS: tl.constexpr,
               DOT_PREC: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """The implicit GEMM of the forward and of dx (the transposed convolution), written once:
    program ``(pid, pid_n)``'s tile ``[BLOCK_P pixels of sample b of a (PH, PW) image, BLOCK_N]``::

        acc[p, n] = u[b, n] * sum_{ky, kx, c} src[b, c, q(p, ky, kx)] v[b, c] M_b[c, n, ky, kx]

    with ``q`` the pixel of the ``(SH, SW)`` source image that p meets through the tap
    (:func:`_tap_pixel`; masked where there is none), ``v`` applied when ``SCALE_IN`` and ``u``
    when ``SCALE_OUT`` (float32 vectors), ``M_b`` mixed in registers (:func:`_filter_tile`; the
    bank strides given in (c, n) order). Main loop over taps, then ``C`` in blocks of BLOCK_C:
    one masked gather (the padding is never materialised), one tensor-core dot per step.
    Forward: src = x, C = I, N = O, v = styles, u = d. dx: src = g, C = O, N = I, v = d, u = styles.
    ``F32_DOT``: the dot's operands float32 (half inputs whose scaled A tile can pass fp16's range).
    Returns (acc float32, b64, ph, pw, pmask, offs_n, nmask) for the caller's epilogue."""
    src_b, b64, ph, pw, pmask, offs_n, nmask = _conv_tile(src_ptr, stride_sb, pid, pid_n, PH, PW, N, BLOCK_P, BLOCK_N)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    dt = tl.float32 if F32_DOT else w_ptr.dtype.element_ty  # the dot operands' dtype
    for t in range(0, KH * KW):
        ky, kx, sh, sw, valid = _tap_pixel(t, KW, ph, pw, SH, SW, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh,
                                           conv_dw, pmask, TRANSPOSED)
        rows = sh * stride_sh + sw * stride_sw  # [BLOCK_P]
        for cb in range(0, tl.cdiv(C, BLOCK_C)):
            offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = offs_c < C
            xa = _gather(src_b, rows, offs_c, stride_sc, valid, cmask)  # [BLOCK_P, BLOCK_C]
            if SCALE_IN:
                xa = xa.to(tl.float32) * _vec(v_ptr, b64, offs_c, stride_vb, stride_vc, cmask)[None, :]
            xa = xa.to(dt)
            m = _filter_tile(w_ptr, a_ptr, b64, K, offs_c, offs_n, ky, kx, stride_wk, stride_wc, stride_wn,
                             stride_wh, stride_ww, stride_ab, stride_ak, cmask, nmask, HAS_COEFFS, BLOCK_C, BLOCK_N,
                             BLOCK_K).to(dt)  # [BLOCK_C, BLOCK_N]
            acc = tl.dot(xa, m, acc, input_precision=DOT_PREC)
    if SCALE_OUT:
        acc = acc * _vec(u_ptr, b64, offs_n, stride_ub, stride_un, nmask)[None, :]
    return acc, b64, ph, pw, pmask, offs_n, nmask


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
def _dw_conv(src_ptr, w_ptr, a_ptr, u_ptr, pid, pid_c, K, KH, KW, C, PH, PW, SH, SW,
             conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
             stride_sb, stride_sc, stride_sh, stride_sw, stride_wk, stride_wc, stride_wh, stride_ww,
             stride_ab, stride_ak, stride_ub, stride_uc,
             TRANSPOSED: tl.constexpr, SCALE_OUT: tl.constexpr, HAS_COEFFS: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The depthwise convolution of the forward and of dx, written once: program ``(pid, pid_c)``'s
    tile ``acc[p, c] = u[b, c] * sum_{ky, kx} src[b, c, q(p, ky, kx)] M_b[c, ky, kx]`` (``q`` as in
    :func:`_conv_gemm`, ``u`` when ``SCALE_OUT``): ``kh * kw`` FMAs per output on CUDA cores, the
    mixed filter tap loaded as a vector. Returns (acc float32, b64, ph, pw, pmask, offs_c, cmask)."""
    src_b, b64, ph, pw, pmask, offs_c, cmask = _conv_tile(src_ptr, stride_sb, pid, pid_c, PH, PW, C, BLOCK_P, BLOCK_C)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(0, KH * KW):
        ky, kx, sh, sw, valid = _tap_pixel(t, KW, ph, pw, SH, SW, conv_sh, conv_sw, conv_ph, conv_pw, conv_dh,
                                           conv_dw, pmask, TRANSPOSED)
        xv = _gather(src_b, sh * stride_sh + sw * stride_sw, offs_c, stride_sc, valid, cmask).to(tl.float32)
        m = _mix_tap_vec(w_ptr, a_ptr, b64, K, offs_c, ky, kx, stride_wk, stride_wc, stride_wh, stride_ww,
                         stride_ab, stride_ak, cmask, HAS_COEFFS, BLOCK_C)
        acc += xv * m[None, :]
    if SCALE_OUT:
        acc = acc * _vec(u_ptr, b64, offs_c, stride_ub, stride_uc, cmask)[None, :]
    return acc, b64, ph, pw, pmask, offs_c, cmask


@triton.jit
def _bias_vec(bias_ptr, a_ptr, b, K, offs_o, stride_bk, stride_bo, stride_ab, stride_ak, omask,
              BIAS: tl.constexpr, BLOCK_O: tl.constexpr):
    """bias_b for a block of output channels, float32: ``bias`` (BIAS_SHARED) or ``a_b @ bias`` (BIAS_BANK)."""
    if BIAS == BIAS_SHARED:
        bv = tl.load(bias_ptr + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)
    else:
        bv = tl.zeros([BLOCK_O], dtype=tl.float32)
        for k in range(0, K):
            ak = tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
            bv += ak * tl.load(bias_ptr + k * stride_bk + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)
    return bv


@triton.jit
def _mod_conv2d_demod_kernel(
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
    TAPS = KH * KW
    R = IG * TAPS
    NBANK = K if HAS_COEFFS else 1
    nrm = tl.zeros([BLOCK_O], dtype=tl.float32)
    for rb in range(0, tl.cdiv(R, BLOCK_R)):
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = offs_r < R
        i = offs_r // TAPS
        ky, kx = _tap(offs_r - i * TAPS, KW)
        roff = i * stride_wi + ky * stride_wh + kx * stride_ww
        m = tl.zeros([BLOCK_O, BLOCK_R], dtype=tl.float32)
        for k in range(0, NBANK):
            w = tl.load(w_ptr + k * stride_wk + offs_o[:, None] * stride_wo + roff[None, :],
                        mask=omask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            if HAS_COEFFS:
                w = w * tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
            m += w
        if HAS_STYLES:
            m = m * _vec(s_ptr, b, i, stride_sb, stride_si, rmask)[None, :]
        nrm += tl.sum(m * m, axis=1)
    tl.store(d_ptr + b * stride_db + offs_o * stride_do, tl.rsqrt(nrm + eps), mask=omask)


@triton.jit
def _mod_conv2d_fwd_kernel(
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
    BIAS: tl.constexpr,         # _modes.Bias: NONE | SHARED (O,) | BANK (K, O) mixed by the coefficients
    DOT_PREC: tl.constexpr,     # tl.dot input precision for float32 operands ("ieee" | "tf32")
    F32_DOT: tl.constexpr,      # float32 dot operands for half inputs (x * s can pass fp16's range)
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
    acc, b64, oh, ow, pmask, offs_o, omask = _conv_gemm(
        x_ptr, w_ptr, a_ptr, s_ptr, d_ptr, tl.program_id(0), tl.program_id(1), K, KH, KW, I, O, HO, WO, H, W,
        conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
        stride_xb, stride_xi, stride_xh, stride_xw, stride_wk, stride_wi, stride_wo, stride_wh, stride_ww,
        stride_ab, stride_ak, stride_sb, stride_si, stride_db, stride_do,
        False, HAS_STYLES, DEMOD, HAS_COEFFS, DOT_PREC, F32_DOT, BLOCK_P, BLOCK_O, BLOCK_I, BLOCK_K)
    if BIAS != BIAS_NONE:
        acc += _bias_vec(bias_ptr, a_ptr, b64, K, offs_o, stride_bk, stride_bo, stride_ab, stride_ak, omask,
                         BIAS, BLOCK_O)[None, :]
    _scatter(y_ptr + b64 * stride_yb, oh * stride_yh + ow * stride_yw, offs_o, stride_yo, pmask, omask, acc)


@triton.jit
def _mod_conv2d_dw_fwd_kernel(
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
    acc, b64, oh, ow, pmask, offs_c, cmask = _dw_conv(
        x_ptr, w_ptr, a_ptr, d_ptr, tl.program_id(0), tl.program_id(1), K, KH, KW, C, HO, WO, H, W,
        conv_sh, conv_sw, conv_ph, conv_pw, conv_dh, conv_dw,
        stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wc, stride_wh, stride_ww,
        stride_ab, stride_ak, stride_db, stride_do, False, DEMOD, HAS_COEFFS, BLOCK_P, BLOCK_C)
    if BIAS != BIAS_NONE:
        acc += _bias_vec(bias_ptr, a_ptr, b64, K, offs_c, stride_bk, stride_bo, stride_ab, stride_ak, cmask,
                         BIAS, BLOCK_C)[None, :]
    _scatter(y_ptr + b64 * stride_yb, oh * stride_yh + ow * stride_yw, offs_c, stride_yc, pmask, cmask, acc)
