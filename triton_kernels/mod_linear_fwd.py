"""mod_linear forward kernels (docs/design.md section 1).

Per row ``r = (b, t)`` with coefficients ``a_r (K)``, styles ``s_r (I)`` (either may be per
sample, i.e. shared by the rows of sample ``b``)::

    z[r, o] = sum_i (sum_k a_r[k] W_k[o, i]) s_r[i] x[r, i]
    n[r, o] = sum_i (sum_k a_r[k] W_k[o, i])^2 s_r[i]^2,     d = rsqrt(n + eps)
    y[r, o] = d[r, o] z[r, o] + bias_r[o],                   bias_r = bias | a_r @ bias

``_mod_linear_demod_kernel``  pre-pass: per-sample ``d_b`` for the flat (stacked) layout,
                             the mixed rows formed tile by tile in registers, never stored.
``_mod_linear_fwd_kernel``    the GEMM, with the styles folded into the A-tile (x) load and
                             the mixture either in the B-tile load (``MIX_B``) or, stacked,
                             in the A tile; demodulation and bias in the epilogue.

The demodulation kernel's argument list repeats the shape of the conv one
(:mod:`.mod_conv2d_fwd`) on purpose: a Triton kernel takes flat scalar arguments, one stride per
tensor dimension; the linear kernel is the one-tap case, kept apart for its 64-bit row offsets.
"""
import triton
import triton.language as tl

from ._modes import BIAS_BANK, BIAS_SHARED, DEMOD_LOOP, DEMOD_READ, DEMOD_ROW
from .mod_linear_common import (
    _expert_step, _load_row_vec, _load_rows, _load_w, _mix_tile, _pair_weight, _row_coef, _row_tile)


@triton.jit
def _mod_linear_demod_kernel(
    # pointers: bank (K, O, I), coeffs (B, K), styles (B, I), d (Bd, O) float32 out
    w_ptr, a_ptr, s_ptr, d_ptr,
    # sizes
    I, O, K,
    # strides (elements)
    stride_wk, stride_wo, stride_wi,
    stride_ab, stride_ak,
    stride_sb, stride_si,
    stride_db, stride_do,
    eps,
    # meta
    HAS_COEFFS: tl.constexpr, HAS_STYLES: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """``d[b, o] = rsqrt(sum_i (sum_k a[b,k] W_k[o,i] s[b,i])^2 + eps)``; grid ``(Bd, cdiv(O, BLOCK_O))``.

    Cost: ``Bd * K * O * I`` FMAs on CUDA cores, the bank read once per sample (from L2
    when it fits): the mixed rows live one ``BLOCK_O x BLOCK_I`` tile at a time.
    """
    b = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    NBANK = K if HAS_COEFFS else 1  # bank entries mixed: K, or W_0 alone without coefficients
    nrm = tl.zeros([BLOCK_O], dtype=tl.float32)
    for ib in range(0, tl.cdiv(I, BLOCK_I)):
        offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
        imask = offs_i < I
        m = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for k in range(0, NBANK):
            w = _load_w(w_ptr, k, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask, imask).to(tl.float32)
            if HAS_COEFFS:
                w = w * tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
            m += w
        if HAS_STYLES:
            s = tl.load(s_ptr + b * stride_sb + offs_i * stride_si, mask=imask, other=0.0).to(tl.float32)
            m = m * s[None, :]
        nrm += tl.sum(m * m, axis=1)
    tl.store(d_ptr + b * stride_db + offs_o * stride_do, tl.rsqrt(nrm + eps), mask=omask)


@triton.jit
def _mod_linear_fwd_kernel(
    # pointers: x (B, T, I), bank (K, O, I), coeffs (B, [T,] K), styles (B, [T,] I),
    # bias (O,) | (K, O), d (float32: (Bd, O) read when DEMOD_READ, (B, O) written when
    # DEMOD_LOOP, (B, T, O) written when DEMOD_ROW), y (B, T, O) out
    x_ptr, w_ptr, a_ptr, s_ptr, bias_ptr, d_ptr, y_ptr,
    # sizes (rows_bucket: next power of two of the row count, only an autotuning key)
    B, T, I, O, K, rows_bucket,
    # strides (elements); a per-sample coeffs/styles/d passes stride 0 for t
    stride_xb, stride_xt, stride_xi,
    stride_wk, stride_wo, stride_wi,
    stride_ab, stride_at, stride_ak,
    stride_sb, stride_st, stride_si,
    stride_bk, stride_bo,
    stride_db, stride_dt, stride_do,
    stride_yb, stride_yt, stride_yo,
    eps,
    # meta: features
    HAS_COEFFS: tl.constexpr,   # coeffs given (else K == 1 and a = 1)
    HAS_STYLES: tl.constexpr,   # styles given
    S_PER_ROW: tl.constexpr,    # styles per token (B, T, I)
    MIX_B: tl.constexpr,        # row tiles per sample; the sample's mixture formed in the B-tile load
    DEMOD: tl.constexpr,        # _modes.Demod: OFF | READ d | ROW: per-row norm accumulated here
                                # | LOOP: per-sample norm of the mixed tile (MIX_B)
    BIAS: tl.constexpr,         # _modes.Bias: NONE | SHARED (O,) | BANK (K, O) mixed by the coefficients
    DOT_PREC: tl.constexpr,     # tl.dot input precision for float32 operands ("ieee" | "tf32")
    SQ_PREC: tl.constexpr,      # the same for the float32 squared operands of the demodulation
    F32_DOT: tl.constexpr,      # float32 GEMM operands for half inputs (x * s can pass fp16's range)
    # meta: tiles
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,      # power of two >= K: the bank tiles mixed per step (MIX_B), else 1
):
    """``y = d * z + bias`` for one ``[BLOCK_T rows, BLOCK_O]`` output tile (see module docstring).

    Grid ``(row tiles, cdiv(O, BLOCK_O))``. Main loop over ``I``:

    * ``MIX_B`` (per-sample or no coefficients, rows of one sample): B tile ``M_b = sum_k a_bk W_k``
      mixed in registers (``K * BLOCK_O * BLOCK_I`` CUDA-core FMAs per step; W_0 as loaded
      without coefficients), A tile ``x * s``;
      one tensor-core dot per step. ``DEMOD_LOOP`` accumulates ``sum_i (M_b s_b)^2`` from the
      same mixed tile (free: no pre-pass); ``DEMOD_ROW`` (styles per token) runs a second dot
      ``(s^2) @ (M_b^2)^T``.
    * stacked (flat rows): for each k, A tile ``a_rk * s_r * x_r`` against ``W_k``: K dots per
      step (K dense GEMMs in all; 1 without coefficients). ``DEMOD_ROW`` (per-token
      conditioning) adds a second accumulator over squared operands,
      ``n = sum_{k<=l} (2 - [k=l]) (a_k a_l s^2) @ (W_k W_l)^T``: K(K+1)/2 more dots per step
      (a row-sum instead of a dot without styles).
    """
    pid_r = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1).to(tl.int64)
    R = B * T
    rb, rt, rmask = _row_tile(pid_r, T, R, MIX_B, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    omask = offs_o < O
    dt = tl.float32 if F32_DOT else w_ptr.dtype.element_ty  # the GEMM operands' dtype
    NBANK = K if HAS_COEFFS else 1  # bank entries mixed: K, or W_0 alone without coefficients
    n_i = tl.cdiv(I, BLOCK_I)

    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)  # per-row sum of squares (DEMOD_ROW)
    nrm = tl.zeros([BLOCK_O], dtype=tl.float32)  # per-sample sum of squares (DEMOD_LOOP)
    if MIX_B:
        b = pid_r // tl.cdiv(T, BLOCK_T)  # the tile's sample (all its rows share it)
        for ib in range(0, n_i):
            offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
            imask = offs_i < I
            xt = _load_rows(x_ptr, rb, rt, offs_i, stride_xb, stride_xt, stride_xi, rmask, imask)
            if HAS_STYLES:
                if S_PER_ROW:
                    st = _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
                    xt = xt * st
                else:
                    sv = tl.load(s_ptr + b * stride_sb + offs_i * stride_si, mask=imask, other=0.0).to(tl.float32)
                    xt = xt * sv[None, :]
            # B tile: the sample's mixture, transposed [BLOCK_I, BLOCK_O]
            mq, m = _mix_tile(w_ptr, a_ptr, b, NBANK, offs_i, offs_o, stride_wk, stride_wi, stride_wo,
                              stride_ab, stride_ak, imask, omask, HAS_COEFFS, BLOCK_I, BLOCK_O, BLOCK_K)
            acc = tl.dot(xt.to(dt), mq.to(dt), acc, input_precision=DOT_PREC)
            if DEMOD == DEMOD_LOOP:
                m2 = m * m
                if HAS_STYLES:
                    m2 = m2 * (sv * sv)[:, None]
                nrm += tl.sum(m2, axis=0)
            if DEMOD == DEMOD_ROW:
                if HAS_STYLES:
                    s2 = st * st
                else:
                    s2 = tl.where(rmask[:, None] & imask[None, :], 1.0, 0.0)
                acc2 = tl.dot(s2, m * m, acc2, input_precision=SQ_PREC)
    else:
        for step in range(0, n_i * NBANK):
            k, offs_i, imask = _expert_step(step, NBANK, I, BLOCK_I)
            xt = _load_rows(x_ptr, rb, rt, offs_i, stride_xb, stride_xt, stride_xi, rmask, imask)
            if HAS_STYLES:
                xt = xt * _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
            if HAS_COEFFS:
                xt = xt * _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask)[:, None]
            w = _load_w(w_ptr, k, offs_i, offs_o, stride_wk, stride_wi, stride_wo, imask, omask)
            acc = tl.dot(xt.to(dt), w.to(dt), acc, input_precision=DOT_PREC)
        if DEMOD == DEMOD_ROW:
            # second pass over the bank with squared operands (the pair loop needs W_k W_l)
            for ib in range(0, n_i):
                offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
                imask = offs_i < I
                if HAS_STYLES:
                    st = _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
                    s2 = st * st
                for k in range(0, NBANK):
                    wk = _load_w(w_ptr, k, offs_i, offs_o, stride_wk, stride_wi, stride_wo, imask, omask).to(tl.float32)
                    ak = _row_coef(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask, HAS_COEFFS, BLOCK_T)
                    for l in range(k, NBANK):
                        wl = _load_w(w_ptr, l, offs_i, offs_o, stride_wk, stride_wi, stride_wo, imask,
                                     omask).to(tl.float32)
                        coef = ak * _pair_weight(k, l)
                        if HAS_COEFFS:
                            coef = coef * _load_row_vec(a_ptr, rb, rt, l, stride_ab, stride_at, stride_ak, rmask)
                        if HAS_STYLES:
                            acc2 = tl.dot(s2 * coef[:, None], wk * wl, acc2, input_precision=SQ_PREC)
                        else:
                            # without styles the squared operand is a row sum, no dot needed
                            acc2 += coef[:, None] * tl.sum(wk * wl, axis=0)[None, :]

    # epilogue: demodulation, bias, store
    omask2 = rmask[:, None] & omask[None, :]
    if DEMOD == DEMOD_READ:
        acc = acc * _load_rows(d_ptr, rb, rt, offs_o, stride_db, stride_dt, stride_do, rmask, omask)
    if DEMOD == DEMOD_ROW:
        dmod = tl.rsqrt(acc2 + eps)
        tl.store(d_ptr + rb[:, None] * stride_db + rt[:, None] * stride_dt + offs_o[None, :] * stride_do,
                 dmod, mask=omask2)
        acc = acc * dmod
    if DEMOD == DEMOD_LOOP:
        dmod_b = tl.rsqrt(nrm + eps)
        # every row tile of the sample computes the same d_b; the first one stores it
        first = pid_r % tl.cdiv(T, BLOCK_T) == 0
        tl.store(d_ptr + b * stride_db + offs_o * stride_do, dmod_b, mask=omask & first)
        acc = acc * dmod_b[None, :]
    if BIAS == BIAS_SHARED:
        acc += tl.load(bias_ptr + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)[None, :]
    if BIAS == BIAS_BANK:
        for k in range(0, NBANK):
            bk = tl.load(bias_ptr + k * stride_bk + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)
            ak = _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask)
            acc += ak[:, None] * bk[None, :]
    yp = y_ptr + rb[:, None] * stride_yb + rt[:, None] * stride_yt + offs_o[None, :] * stride_yo
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=omask2)
