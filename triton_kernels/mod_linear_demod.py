"""Per-row demodulation terms from the mixed rows (stacked layout, K > 1 coefficients).

Per row ``r = (b, t)`` with ``M_r = sum_k a_rk W_k`` (coefficients per token or per sample)
and styles ``s_r``::

    q[r, o]   = sum_i M_r[o, i]^2 s_r[i]^2,      d = rsqrt(q + eps)           (forward)
    t2[r, i]  = sum_o c[r, o] M_r[o, i]^2        ds_r -= s_r * t2             (backward)
    da[r, k] -= sum_{o, i} c[r, o] W_k[o, i] M_r[o, i] s_r[i]^2              (backward)

Why not the pair products ``sum_{k<=l} a_k a_l W_k W_l`` (K(K+1)/2 tensor-core dots): ``q``
and ``t2`` are quadratic in the mixture, and when the experts nearly cancel (``W`` and
``-W + 1e-3 noise``) the pair terms are ``~1e6`` times their sum: 5-20 % error in float32, a
negative ``q`` (NaN) at 1e-4. Squaring the *mixed* tile bounds the error by that of forming
``M`` itself (``eps |a| |W| / |M|``, which the reference shares). The price is CUDA-core work:
each program mixes a ``[BLOCK_R, BLOCK_O, BLOCK_I]`` tile in registers, ``K`` FMAs per element,
``R * O * I * K`` FMAs per kernel (the bank tile is read once per ``BLOCK_R`` rows, from L2),
against ``K(K+1)/2`` dots of ``R x O x I`` for the pairs: on an H100 roughly 2-4x the pair
path's time for K = 2-8 (fp32 CUDA cores ~1/15 of the bf16 tensor-core rate). The da and dW
terms are linear in ``M`` (the pairs' error there is the mixture's own) and the da term is
computed here only because this kernel already holds the mixed tile.

Nothing of size ``B x T x O x I`` is stored: the mixed rows live one tile at a time.
"""
import triton
import triton.language as tl

from .mod_linear_common import _load_row_vec, _load_rows, _load_w


@triton.jit
def _mixed_rows(w_ptr, a_ptr, rb, rt, K, offs_o, offs_i, stride_wk, stride_wo, stride_wi,
                stride_ab, stride_at, stride_ak, rmask, omask, imask,
                BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """``M[r, o, i] = sum_k a[r, k] W_k[o, i]`` for a tile of rows, float32 [BLOCK_R, BLOCK_O, BLOCK_I]."""
    m = tl.zeros([BLOCK_R, BLOCK_O, BLOCK_I], dtype=tl.float32)
    for k in range(0, K):
        w = _load_w(w_ptr, k, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask, imask).to(tl.float32)
        ak = _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask)
        m += ak[:, None, None] * w[None, :, :]
    return m


@triton.jit
def _rows_of(pid, T, R, BLOCK_R: tl.constexpr):
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rb = r // T
    return rb, r - rb * T, r < R


@triton.jit
def _mod_linear_demod_rows_kernel(
    # pointers: bank (K, O, I), coeffs (B, [T,] K), styles (B, [T,] I), d (B, T, O) float32 out
    w_ptr, a_ptr, s_ptr, d_ptr,
    # sizes
    B, T, I, O, K,
    # strides (elements); per-sample coeffs / styles pass stride 0 for t
    stride_wk, stride_wo, stride_wi,
    stride_ab, stride_at, stride_ak,
    stride_sb, stride_st, stride_si,
    stride_db, stride_dt, stride_do,
    eps,
    # meta
    HAS_STYLES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """``d[r, o] = rsqrt(sum_i (M_r[o, i] s_r[i])^2 + eps)``; grid ``(cdiv(B*T, BLOCK_R), cdiv(O, BLOCK_O))``."""
    rb, rt, rmask = _rows_of(tl.program_id(0).to(tl.int64), T, B * T, BLOCK_R)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < O
    n = tl.zeros([BLOCK_R, BLOCK_O], dtype=tl.float32)
    for ib in range(0, tl.cdiv(I, BLOCK_I)):
        offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
        imask = offs_i < I
        m = _mixed_rows(w_ptr, a_ptr, rb, rt, K, offs_o, offs_i, stride_wk, stride_wo, stride_wi,
                        stride_ab, stride_at, stride_ak, rmask, omask, imask, BLOCK_R, BLOCK_O, BLOCK_I)
        if HAS_STYLES:
            st = _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
            m = m * st[:, None, :]
        n += tl.sum(m * m, axis=2)
    dp = d_ptr + rb[:, None] * stride_db + rt[:, None] * stride_dt + offs_o[None, :] * stride_do
    tl.store(dp, tl.rsqrt(n + eps), mask=rmask[:, None] & omask[None, :])


@triton.jit
def _mod_linear_demod_rows_bwd_kernel(
    # pointers: bank (K, O, I), coeffs (B, [T,] K), styles (B, [T,] I), c (B, T, O) f32,
    # ds (B, T, I) f32 (updated in place: -= s * t2), da (n_i_tiles, B, T, K) f32 out
    w_ptr, a_ptr, s_ptr, c_ptr, ds_ptr, da_ptr,
    # sizes
    B, T, I, O, K,
    # strides (elements)
    stride_wk, stride_wo, stride_wi,
    stride_ab, stride_at, stride_ak,
    stride_sb, stride_st, stride_si,
    stride_cb, stride_ct, stride_co,
    stride_dsb, stride_dst, stride_dsi,
    stride_dap, stride_dab, stride_dat, stride_dak,
    # meta
    HAS_STYLES: tl.constexpr, NEED_DS: tl.constexpr, NEED_DA: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The ds and da demodulation terms of the module docstring for ``[BLOCK_R, BLOCK_I]``;
    grid ``(cdiv(B*T, BLOCK_R), cdiv(I, BLOCK_I))``, loop over O. da: this I tile's part,
    summed over the tiles by the caller (deterministic)."""
    pid_i = tl.program_id(1).to(tl.int64)
    rb, rt, rmask = _rows_of(tl.program_id(0).to(tl.int64), T, B * T, BLOCK_R)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    imask = offs_i < I
    kk = tl.arange(0, BLOCK_K)
    if HAS_STYLES:
        st = _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
        s2 = st * st
    else:
        s2 = tl.where(rmask[:, None] & imask[None, :], 1.0, 0.0)
    t2 = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.float32)
    dap = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for ob in range(0, tl.cdiv(O, BLOCK_O)):
        offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
        omask = offs_o < O
        ct = _load_rows(c_ptr, rb, rt, offs_o, stride_cb, stride_ct, stride_co, rmask, omask)
        m = _mixed_rows(w_ptr, a_ptr, rb, rt, K, offs_o, offs_i, stride_wk, stride_wo, stride_wi,
                        stride_ab, stride_at, stride_ak, rmask, omask, imask, BLOCK_R, BLOCK_O, BLOCK_I)
        cm = ct[:, :, None] * m  # [R, O, I]
        if NEED_DS:
            t2 += tl.sum(cm * m, axis=1)
        if NEED_DA:
            cms = cm * s2[:, None, :]
            for k in range(0, K):
                w = _load_w(w_ptr, k, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask, imask).to(tl.float32)
                q = tl.sum(tl.sum(cms * w[None, :, :], axis=2), axis=1)  # [R]
                dap += tl.where(kk[None, :] == k, q[:, None], 0.0)
    if NEED_DS:
        m2 = rmask[:, None] & imask[None, :]
        dp = ds_ptr + rb[:, None] * stride_dsb + rt[:, None] * stride_dst + offs_i[None, :] * stride_dsi
        tl.store(dp, tl.load(dp, mask=m2, other=0.0) - st * t2, mask=m2)
    if NEED_DA:
        ap = da_ptr + pid_i * stride_dap + rb[:, None] * stride_dab + rt[:, None] * stride_dat \
            + kk[None, :] * stride_dak
        tl.store(ap, dap, mask=rmask[:, None] & (kk[None, :] < K))
