"""mod_linear backward kernels (docs/design.md section 2).

With ``g = dL/dy``, ``z_r = (M_r * s_r[None, :]) x_r`` (pre-demodulation output), ``gz = d * g``
and ``c = (sum over the rows that share d of g * z) * d^3`` (0 without demodulation), per row
``r`` with mixture ``M_r = sum_k a_rk W_k`` and styles ``s_r``; ``dW_r`` is the gradient of
the row's modulated weight ``M_r * s_r[None, :]`` and ``dW_k`` that of bank entry k::

    dW_r      = gz_r x_r^T - c_r[:, None] * M_r * s_r[None, :]
    dx_r      = s_r * (M_r^T gz_r)
    ds_r[i]   = sum_o dW_r[o, i] M_r[o, i]  = x_ri (M_r^T gz_r)_i - s_ri (c_r @ M_r^2)_i
    dW_k      = sum_r a_rk dW_r * s_r[None, :]
    da_r[k]   = <dW_r * s_r[None, :], W_k>_F

Per sample (the rows of sample b share a, s, d) the row sums collapse onto
``Q_b = gz_b^T x_b`` and ``c_b``.

Kernels:

``_mod_linear_bwd_prep_sample_kernel``  per-sample pre-pass, one read of (g, y): ``G1_b = sum_t g``
    (for dbias) and ``c_b = dd_b d_b^3`` with ``dd_b = sum_t g (y - bias_b) / d_b``.
``_mod_linear_bwd_prep_token_kernel``   per-token demodulation: ``gz = g d`` and ``c = g (y - bias_r) d^2``
    elementwise (d is per row).
``_mod_linear_bwd_dx_kernel``           dx (the forward transposed, mixing on the fly, epilogue times s)
    and, in the per-token layout, the per-row ds and da.
``_mod_linear_bwd_weight_kernel``       THE fused weight-side kernel: per output tile, one pass over
    (gz, x) per sample gives Q_b; folded at once into dW_k for every k, ds_b and da_b.
``_mod_linear_bwd_weight_token_kernel`` dW_k for per-token coefficients (the stacked GEMM, one k
    per program).

Reductions across programs (ds over O, da over O and I, dW over sample splits): with
``torch.are_deterministic_algorithms_enabled()`` each program adds into its own slice of a
partial buffer (a fixed number of slices: groups of tiles, not one per tile, so the buffers
stay ``O(groups * B * I)``), and the launcher sums the slices in a fixed order; otherwise
every program adds into one float32 buffer with ``tl.atomic_add`` (order-dependent rounding).
"""
import triton
import triton.language as tl

from ._modes import BIAS_BANK, BIAS_SHARED, DEMOD_OFF, DEMOD_READ, DEMOD_ROW
from .mod_linear_common import (
    _expert_step, _load_row_vec, _load_rows, _load_w, _mix_tile, _pair_weight, _row_coef, _row_tile)


@triton.jit
def _mod_linear_bwd_prep_sample_kernel(
    # pointers: g (B, T, O), y (B, T, O), d (Bd, O) f32, coeffs (B, K), bias (O,) | (K, O),
    # G1 (B, O) f32 out, c (B, O) f32 out
    g_ptr, y_ptr, d_ptr, a_ptr, bias_ptr, g1_ptr, c_ptr,
    # sizes
    T, O, K,
    # strides (elements)
    stride_gb, stride_gt, stride_go,
    stride_yb, stride_yt, stride_yo,
    stride_db, stride_do,
    stride_ab, stride_ak,
    stride_bk, stride_bo,
    stride_1b, stride_1o,
    stride_cb, stride_co,
    # meta
    DEMOD: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """``G1[b] = sum_t g[b, t]``; with DEMOD, ``c[b] = (sum_t g y - bias_b G1[b]) * d_b^2``
    (= ``dd_b d_b^3``, z recovered from the saved y). Grid ``(B, cdiv(O, BLOCK_O))``;
    one pass over g (and y): ``2 B T O`` reads."""
    b = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    omask = offs_o < O
    g1 = tl.zeros([BLOCK_O], dtype=tl.float32)
    gy = tl.zeros([BLOCK_O], dtype=tl.float32)
    for tb in range(0, tl.cdiv(T, BLOCK_T)):
        rt = tb * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        m2 = (rt < T)[:, None] & omask[None, :]
        g = tl.load(g_ptr + b * stride_gb + rt[:, None] * stride_gt + offs_o[None, :] * stride_go,
                    mask=m2, other=0.0).to(tl.float32)
        g1 += tl.sum(g, axis=0)
        if DEMOD:
            y = tl.load(y_ptr + b * stride_yb + rt[:, None] * stride_yt + offs_o[None, :] * stride_yo,
                        mask=m2, other=0.0).to(tl.float32)
            gy += tl.sum(g * y, axis=0)
    tl.store(g1_ptr + b * stride_1b + offs_o * stride_1o, g1, mask=omask)
    if DEMOD:
        bias_b = tl.zeros([BLOCK_O], dtype=tl.float32)
        if BIAS == BIAS_SHARED:
            bias_b = tl.load(bias_ptr + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)
        if BIAS == BIAS_BANK:
            for k in range(0, K):
                ak = tl.load(a_ptr + b * stride_ab + k * stride_ak).to(tl.float32)
                bias_b += ak * tl.load(bias_ptr + k * stride_bk + offs_o * stride_bo, mask=omask,
                                       other=0.0).to(tl.float32)
        dmod = tl.load(d_ptr + b * stride_db + offs_o * stride_do, mask=omask, other=0.0)
        tl.store(c_ptr + b * stride_cb + offs_o * stride_co, (gy - bias_b * g1) * dmod * dmod, mask=omask)


@triton.jit
def _mod_linear_bwd_prep_token_kernel(
    # pointers: g, y (B, T, O), d (B, T, O) f32, coeffs (B, [T,] K), bias, gz (B, T, O) out, c (B, T, O) f32 out
    g_ptr, y_ptr, d_ptr, a_ptr, bias_ptr, gz_ptr, c_ptr,
    # sizes
    B, T, O, K,
    # strides (elements); per-sample coeffs pass stride_at = 0
    stride_gb, stride_gt, stride_go,
    stride_yb, stride_yt, stride_yo,
    stride_db, stride_dt, stride_do,
    stride_ab, stride_at, stride_ak,
    stride_bk, stride_bo,
    stride_zb, stride_zt, stride_zo,
    stride_cb, stride_ct, stride_co,
    # meta
    BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Per-row demodulation: ``gz = g d``, ``c = g (y - bias_r) d^2`` (= g z d^3); elementwise,
    grid ``(cdiv(B*T, BLOCK_T), cdiv(O, BLOCK_O))``."""
    rb, rt, rmask = _row_tile(tl.program_id(0).to(tl.int64), T, B * T, False, BLOCK_T)
    offs_o = tl.program_id(1).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    omask = offs_o < O
    g = _load_rows(g_ptr, rb, rt, offs_o, stride_gb, stride_gt, stride_go, rmask, omask)
    y = _load_rows(y_ptr, rb, rt, offs_o, stride_yb, stride_yt, stride_yo, rmask, omask)
    dmod = _load_rows(d_ptr, rb, rt, offs_o, stride_db, stride_dt, stride_do, rmask, omask)
    if BIAS == BIAS_SHARED:
        y -= tl.load(bias_ptr + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)[None, :]
    if BIAS == BIAS_BANK:
        for k in range(0, K):
            ak = _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask)
            bk = tl.load(bias_ptr + k * stride_bk + offs_o * stride_bo, mask=omask, other=0.0).to(tl.float32)
            y -= ak[:, None] * bk[None, :]
    m2 = rmask[:, None] & omask[None, :]
    gz = g * dmod
    tl.store(gz_ptr + rb[:, None] * stride_zb + rt[:, None] * stride_zt + offs_o[None, :] * stride_zo,
             gz.to(gz_ptr.dtype.element_ty), mask=m2)
    tl.store(c_ptr + rb[:, None] * stride_cb + rt[:, None] * stride_ct + offs_o[None, :] * stride_co,
             gz * y * dmod, mask=m2)


@triton.jit
def _mod_linear_bwd_dx_kernel(
    # pointers: g (B, T, O) (gz when DEMOD_ROW), bank (K, O, I), coeffs, styles, x (B, T, I),
    # d (Bd, O) f32 (DEMOD_READ), c (B, T, O) f32 (DEMOD_ROW),
    # dx (B, T, I) out, ds (B, T, I) f32 out (ROW_DS), da (groups | 1, B, T, K) f32 out (ROW_DA)
    g_ptr, w_ptr, a_ptr, s_ptr, x_ptr, d_ptr, c_ptr, dx_ptr, ds_ptr, da_ptr,
    # sizes (rows_bucket: autotuning key only)
    B, T, I, O, K, rows_bucket,
    # strides (elements); per-sample coeffs/styles/d pass stride 0 for t; da: stride 0 for the
    # group when all programs add into one buffer
    stride_gb, stride_gt, stride_go,
    stride_wk, stride_wo, stride_wi,
    stride_ab, stride_at, stride_ak,
    stride_sb, stride_st, stride_si,
    stride_xb, stride_xt, stride_xi,
    stride_db, stride_dt, stride_do,
    stride_cb, stride_ct, stride_co,
    stride_dxb, stride_dxt, stride_dxi,
    stride_dsb, stride_dst, stride_dsi,
    stride_dap, stride_dab, stride_dat, stride_dak,
    # meta: features
    HAS_COEFFS: tl.constexpr, HAS_STYLES: tl.constexpr, S_PER_ROW: tl.constexpr, MIX_B: tl.constexpr,
    DEMOD: tl.constexpr,     # _modes.Demod: OFF | READ: gz = g * d (per-sample d) | ROW: g is gz, c per row
    STORE_DX: tl.constexpr,  # write dx
    ROW_DS: tl.constexpr,    # write ds per row (per-token layout)
    ROW_DA: tl.constexpr,    # write da per row (per-token coefficients; stacked only)
    ATOMIC: tl.constexpr,    # da: atomic_add into one shared buffer (else one slice per I group)
    DOT_PREC: tl.constexpr, SQ_PREC: tl.constexpr,
    # meta: tiles
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dx = s * (M^T gz)`` for ``[BLOCK_T rows, BLOCK_I]`` tiles; grid ``(row tiles, groups)``,
    a program taking the I tiles ``pid_i, pid_i + groups, ...`` (groups = the number of I tiles
    unless ROW_DA, whose per-row sums over I then stay in registers across a group).

    Main loop over ``O``. ``MIX_B``: B tile ``M_b`` mixed in registers, one dot per step (1
    dense GEMM + ``K O I`` CUDA-core FMAs per row tile). Stacked: for each k
    ``P_k = gz @ W_k`` and ``acc += a_k P_k`` (K dense GEMMs); ``da_rk += sum_i (s x)_ri P_k[r, i]``.
    Per-row demodulation terms (``DEMOD_ROW`` with ``ROW_DS`` / ``ROW_DA``) use the squared
    operands: ``P2_kl = c @ (W_k W_l)`` for the K(K+1)/2 pairs k <= l (1 dot with ``MIX_B``:
    ``c @ M_b^2``)::

        ds_r = x_r * (M_r^T gz_r) - s_r * sum_{k<=l} (2 - [k=l]) a_k a_l P2_kl
        da_rk -= sum_i s_ri^2 sum_l a_rl P2_kl
    """
    pid_r = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    R = B * T
    rb, rt, rmask = _row_tile(pid_r, T, R, MIX_B, BLOCK_T)
    dt = w_ptr.dtype.element_ty
    NBANK = K if HAS_COEFFS else 1  # bank entries mixed: K, or W_0 alone without coefficients
    n_o = tl.cdiv(O, BLOCK_O)
    n_i = tl.cdiv(I, BLOCK_I)
    kk = tl.arange(0, BLOCK_K)
    if MIX_B:
        b = pid_r // tl.cdiv(T, BLOCK_T)

    dap = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)  # da over this program's I tiles
    for ib in range(pid_i, n_i, tl.num_programs(1)):
        offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
        imask = offs_i < I
        acc = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)  # M^T gz
        t2 = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)  # (c @ M^2) per row (DEMOD_ROW)
        if HAS_STYLES:
            st = _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
        if ROW_DS or ROW_DA:
            xt = _load_rows(x_ptr, rb, rt, offs_i, stride_xb, stride_xt, stride_xi, rmask, imask)
            ut = xt
            if HAS_STYLES:
                ut = xt * st
        if MIX_B:
            for ob in range(0, n_o):
                offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
                omask = offs_o < O
                gt = _load_rows(g_ptr, rb, rt, offs_o, stride_gb, stride_gt, stride_go, rmask, omask)
                if DEMOD == DEMOD_READ:
                    gt = gt * tl.load(d_ptr + b * stride_db + offs_o * stride_do, mask=omask, other=0.0)[None, :]
                mq, m = _mix_tile(w_ptr, a_ptr, b, NBANK, offs_o, offs_i, stride_wk, stride_wo, stride_wi,
                                  stride_ab, stride_ak, omask, imask, HAS_COEFFS, BLOCK_O, BLOCK_I, BLOCK_K)
                acc = tl.dot(gt.to(dt), mq, acc, input_precision=DOT_PREC)
                if DEMOD == DEMOD_ROW and ROW_DS:
                    ct = _load_rows(c_ptr, rb, rt, offs_o, stride_cb, stride_ct, stride_co, rmask, omask)
                    t2 = tl.dot(ct, m * m, t2, input_precision=SQ_PREC)
        else:
            for step in range(0, n_o * NBANK):
                k, offs_o, omask = _expert_step(step, NBANK, O, BLOCK_O)
                gt = _load_rows(g_ptr, rb, rt, offs_o, stride_gb, stride_gt, stride_go, rmask, omask)
                if DEMOD == DEMOD_READ:
                    gt = gt * _load_rows(d_ptr, rb, rt, offs_o, stride_db, stride_dt, stride_do, rmask, omask)
                w = _load_w(w_ptr, k, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask, imask)
                if ROW_DA:
                    # da needs W_k^T gz unscaled: one dot, then scale
                    p = tl.dot(gt.to(dt), w, input_precision=DOT_PREC)
                    ak = _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask)
                    acc += ak[:, None] * p
                    dap += tl.where(kk[None, :] == k, tl.sum(ut * p, axis=1)[:, None], 0.0)
                else:
                    if HAS_COEFFS:
                        gt = gt * _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask)[:, None]
                    acc = tl.dot(gt.to(dt), w, acc, input_precision=DOT_PREC)
            if DEMOD == DEMOD_ROW and (ROW_DS or ROW_DA):
                if HAS_STYLES:
                    s2 = st * st
                else:
                    s2 = tl.where(rmask[:, None] & imask[None, :], 1.0, 0.0)
                for ob in range(0, n_o):
                    offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
                    omask = offs_o < O
                    ct = _load_rows(c_ptr, rb, rt, offs_o, stride_cb, stride_ct, stride_co, rmask, omask)
                    for k in range(0, NBANK):
                        wk = _load_w(w_ptr, k, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask,
                                     imask).to(tl.float32)
                        ak = _row_coef(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask, HAS_COEFFS, BLOCK_T)
                        for l in range(k, NBANK):
                            wl = _load_w(w_ptr, l, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask,
                                         imask).to(tl.float32)
                            al = _row_coef(a_ptr, rb, rt, l, stride_ab, stride_at, stride_ak, rmask, HAS_COEFFS,
                                           BLOCK_T)
                            p2 = tl.dot(ct, wk * wl, input_precision=SQ_PREC)  # [BLOCK_T, BLOCK_I]
                            if ROW_DS:
                                t2 += (ak * al * _pair_weight(k, l))[:, None] * p2
                            if ROW_DA:
                                q = tl.sum(s2 * p2, axis=1)
                                dap -= tl.where(kk[None, :] == k, (al * q)[:, None], 0.0)
                                dap -= tl.where((kk[None, :] == l) & (l != k), (ak * q)[:, None], 0.0)

        # epilogue of this I tile
        m2 = rmask[:, None] & imask[None, :]
        if ROW_DS:
            dsr = xt * acc
            if DEMOD == DEMOD_ROW:
                dsr -= st * t2
            tl.store(ds_ptr + rb[:, None] * stride_dsb + rt[:, None] * stride_dst + offs_i[None, :] * stride_dsi,
                     dsr, mask=m2)
        if STORE_DX:
            if HAS_STYLES:
                acc = acc * st
            tl.store(dx_ptr + rb[:, None] * stride_dxb + rt[:, None] * stride_dxt + offs_i[None, :] * stride_dxi,
                     acc.to(dx_ptr.dtype.element_ty), mask=m2)
    if ROW_DA:
        dp = da_ptr + pid_i * stride_dap + rb[:, None] * stride_dab + rt[:, None] * stride_dat \
            + kk[None, :] * stride_dak
        if ATOMIC:
            tl.atomic_add(dp, dap, mask=rmask[:, None] & (kk[None, :] < NBANK))
        else:
            tl.store(dp, dap, mask=rmask[:, None] & (kk[None, :] < NBANK))


@triton.jit
def _mod_linear_bwd_weight_kernel(
    # pointers: g (B, T, O) (gz when DEMOD_ROW), x (B, T, I), bank (K, O, I), coeffs (B, K),
    # styles (B, [T,] I), d (Bd, O) f32 (DEMOD_READ), c f32 ((B, O) when DEMOD_READ, (B, T, O)
    # when DEMOD_ROW), dW (splits | 1, K, O, I) out, ds (groups | 1, B, I) f32 out (added to),
    # da (groups * n_i | 1, B, K) f32 out (added to)
    g_ptr, x_ptr, w_ptr, a_ptr, s_ptr, d_ptr, c_ptr, dw_ptr, ds_ptr, da_ptr,
    # sizes (b_per_split: samples per program along grid axis 2; rows_bucket: autotuning key only)
    B, T, I, O, K, b_per_split, rows_bucket,
    # strides (elements); per-sample styles / c pass stride 0 for t; ds / da pass stride 0 for the
    # slice when every program adds into one buffer
    stride_gb, stride_gt, stride_go,
    stride_xb, stride_xt, stride_xi,
    stride_wk, stride_wo, stride_wi,
    stride_ab, stride_ak,
    stride_sb, stride_st, stride_si,
    stride_db, stride_do,
    stride_cb, stride_ct, stride_co,
    stride_dws, stride_dwk, stride_dwo, stride_dwi,
    stride_dsp, stride_dsb, stride_dsi,
    stride_dap, stride_dab, stride_dak,
    # meta: features
    HAS_COEFFS: tl.constexpr, HAS_STYLES: tl.constexpr, S_PER_ROW: tl.constexpr,
    DEMOD: tl.constexpr,     # _modes.Demod: OFF | READ: per-sample d and c | ROW: g is gz, c per row
                             # (styles per row)
    NEED_DW: tl.constexpr, NEED_DS: tl.constexpr, NEED_DA: tl.constexpr,
    DW_ATOMIC: tl.constexpr,  # dW: atomic_add of every split into one float32 (K, O, I)
    DOT_PREC: tl.constexpr, SQ_PREC: tl.constexpr,
    F32_DOT: tl.constexpr,  # float32 GEMM operands for half inputs (x * s can pass fp16's range)
    # meta: tiles
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW_k for all k, ds_b and da_b in one pass over (gz, x) per ``[BLOCK_O, BLOCK_I]`` tile.

    Grid ``(cdiv(I, BLOCK_I), groups, splits)``: a program owns one I tile, the O tiles
    ``group, group + groups, ...`` and the samples ``[split * b_per_split, ...)``. Per output
    tile and sample b:

    * ``Q = sum_t gz[b,t]^T u[b,t]`` on tensor cores, u = x (per-sample styles: applied after)
      or x * s_t (per-token styles); with per-token demodulation also ``E = sum_t c_t^T s_t^2``;
    * fold, on CUDA cores, with the bank tiles ``W_k[o, i]`` re-read one at a time (L2)::

        M    = sum_k a_bk W_k
        dW   = Q - c_b M s_b                  (per-sample styles: dW_b; ds_b += sum_o dW M)
        dWs  = dW * s_b                       (per-sample styles: the gradient of M)
             | Q - M * E                      (per-token styles)
             | Q - c_b M                      (no styles)
        dW_k += a_bk dWs,   da_bk += <dWs, W_k>

    ds and da are added with ``tl.atomic_add``: into the program's own slice of a
    ``(groups, B, I)`` / ``(groups * n_i, B, K)`` buffer (deterministic: one program, a fixed
    order; summed by the launcher), or into one shared buffer (order-dependent rounding).

    Cost: one dense GEMM (``2 B T O I`` FLOPs; two with per-token demodulation) plus
    ``3 B K O I`` CUDA-core FMAs; (gz, x) read once per output tile as in any GEMM.
    """
    pid_i = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    n_i = tl.cdiv(I, BLOCK_I)
    n_o = tl.cdiv(O, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    imask = offs_i < I
    kk = tl.arange(0, BLOCK_K).to(tl.int64)
    NBANK = K if HAS_COEFFS else 1  # bank entries mixed: K, or W_0 alone without coefficients
    kmask = kk < NBANK
    dt = tl.float32 if F32_DOT else w_ptr.dtype.element_ty  # the GEMM operands' dtype
    b_lo = split * b_per_split
    b_hi = tl.minimum(b_lo + b_per_split, B)
    ds_base = ds_ptr + grp * stride_dsp
    da_base = da_ptr + (grp * n_i + pid_i) * stride_dap

    for ob in range(grp, n_o, tl.num_programs(1)):
        offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
        omask = offs_o < O
        mask3 = kmask[:, None, None] & omask[None, :, None] & imask[None, None, :]
        acc = tl.zeros([BLOCK_K, BLOCK_O, BLOCK_I], dtype=tl.float32)
        for b in range(b_lo, b_hi):
            q = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
            e = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
            if DEMOD == DEMOD_READ:
                dmod = tl.load(d_ptr + b * stride_db + offs_o * stride_do, mask=omask, other=0.0)
            rb = tl.zeros([BLOCK_T], dtype=tl.int64) + b
            for tb in range(0, tl.cdiv(T, BLOCK_T)):
                rt = tb * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
                rmask = rt < T
                gt = _load_rows(g_ptr, rb, rt, offs_o, stride_gb, stride_gt, stride_go, rmask, omask)
                if DEMOD == DEMOD_READ:
                    gt = gt * dmod[None, :]
                xt = _load_rows(x_ptr, rb, rt, offs_i, stride_xb, stride_xt, stride_xi, rmask, imask)
                if S_PER_ROW:
                    st = _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
                    xt = xt * st
                q = tl.dot(tl.trans(gt.to(dt)), xt.to(dt), q, input_precision=DOT_PREC)
                if DEMOD == DEMOD_ROW:
                    ct = _load_rows(c_ptr, rb, rt, offs_o, stride_cb, stride_ct, stride_co, rmask, omask)
                    if HAS_STYLES:
                        s2 = st * st
                    else:
                        s2 = tl.where(rmask[:, None] & imask[None, :], 1.0, 0.0)
                    e = tl.dot(tl.trans(ct), s2, e, input_precision=SQ_PREC)
            if HAS_COEFFS:
                ab = tl.load(a_ptr + b * stride_ab + kk * stride_ak, mask=kmask, other=0.0).to(tl.float32)
            else:
                ab = tl.where(kk == 0, 1.0, 0.0)
            if DEMOD != DEMOD_OFF or NEED_DS:
                # the sample's mixture [BLOCK_O, BLOCK_I], the bank tiles re-read per sample (L2)
                # one at a time: a K-deep bank tile held in registers across the sample loop
                # (beside the K-deep accumulator) forced 32x32 mma.sync tiles
                m = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
                for k in tl.static_range(BLOCK_K):
                    ak = tl.sum(tl.where(kk == k, ab, 0.0))
                    m += ak * _load_w(w_ptr, k, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask & (k < NBANK),
                                      imask).to(tl.float32)
            if DEMOD == DEMOD_READ:
                cb = tl.load(c_ptr + b * stride_cb + offs_o * stride_co, mask=omask, other=0.0)
            if HAS_STYLES and not S_PER_ROW:
                sv = tl.load(s_ptr + b * stride_sb + offs_i * stride_si, mask=imask, other=0.0).to(tl.float32)
                dW = q
                if DEMOD == DEMOD_READ:
                    dW = q - cb[:, None] * m * sv[None, :]
                if NEED_DS:
                    tl.atomic_add(ds_base + b * stride_dsb + offs_i * stride_dsi, tl.sum(dW * m, axis=0), mask=imask)
                dWs = dW * sv[None, :]
            else:
                dWs = q
                if DEMOD == DEMOD_READ:
                    dWs = q - cb[:, None] * m
                if DEMOD == DEMOD_ROW:
                    dWs = q - m * e
            if NEED_DW:
                acc += ab[:, None, None] * dWs[None, :, :]
            if NEED_DA:
                da = tl.zeros([BLOCK_K], dtype=tl.float32)
                for k in tl.static_range(BLOCK_K):
                    wk = _load_w(w_ptr, k, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask & (k < NBANK),
                                 imask).to(tl.float32)
                    da = tl.where(kk == k, tl.sum(dWs * wk), da)
                tl.atomic_add(da_base + b * stride_dab + kk * stride_dak, da, mask=kmask)
        if NEED_DW:
            dwp = dw_ptr + split * stride_dws + kk[:, None, None] * stride_dwk + offs_o[None, :, None] * stride_dwo \
                + offs_i[None, None, :] * stride_dwi
            if DW_ATOMIC:
                tl.atomic_add(dwp, acc, mask=mask3)
            else:
                tl.store(dwp, acc.to(dw_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _mod_linear_bwd_weight_token_kernel(
    # pointers: g (B, T, O) (gz when DEMOD), x (B, T, I), bank (K, O, I), coeffs (B, T, K),
    # styles (B, [T,] I), c (B, T, O) f32 (DEMOD), dW (K, O, I) out
    g_ptr, x_ptr, w_ptr, a_ptr, s_ptr, c_ptr, dw_ptr,
    # sizes
    B, T, I, O, K,
    # strides (elements); per-sample styles pass stride_st = 0
    stride_gb, stride_gt, stride_go,
    stride_xb, stride_xt, stride_xi,
    stride_wk, stride_wo, stride_wi,
    stride_ab, stride_at, stride_ak,
    stride_sb, stride_st, stride_si,
    stride_cb, stride_ct, stride_co,
    stride_dwk, stride_dwo, stride_dwi,
    # meta
    HAS_STYLES: tl.constexpr, DEMOD: tl.constexpr, DOT_PREC: tl.constexpr, SQ_PREC: tl.constexpr,
    F32_DOT: tl.constexpr,  # float32 GEMM operands for half inputs (x * s can pass fp16's range)
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """dW_k with per-token coefficients: the stacked GEMM, one k per program.

    ``dW_k = sum_r (a_rk gz_r) u_r^T - sum_l W_l * F_kl``, ``u = s x``,
    ``F_kl = sum_r (a_rk a_rl c_r) (s_r^2)^T`` (demodulation only). Grid
    ``(cdiv(O, BLOCK_O) * cdiv(I, BLOCK_I), K)``. Cost: K dense GEMMs over all ``B T`` rows,
    plus K^2 for the demodulation term (a row reduction instead without styles).
    """
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    n_i = tl.cdiv(I, BLOCK_I)
    pid_o = pid // n_i
    pid_i = pid - pid_o * n_i
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
    omask = offs_o < O
    imask = offs_i < I
    dt = tl.float32 if F32_DOT else w_ptr.dtype.element_ty  # the GEMM operands' dtype
    R = B * T
    n_r = tl.cdiv(R, BLOCK_T)

    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for rblk in range(0, n_r):
        rb, rt, rmask = _row_tile(rblk, T, R, False, BLOCK_T)
        gt = _load_rows(g_ptr, rb, rt, offs_o, stride_gb, stride_gt, stride_go, rmask, omask)
        gt = gt * _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask)[:, None]
        xt = _load_rows(x_ptr, rb, rt, offs_i, stride_xb, stride_xt, stride_xi, rmask, imask)
        if HAS_STYLES:
            xt = xt * _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
        acc = tl.dot(tl.trans(gt.to(dt)), xt.to(dt), acc, input_precision=DOT_PREC)
    if DEMOD:
        for l in range(0, K):
            f = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
            fv = tl.zeros([BLOCK_O], dtype=tl.float32)
            for rblk in range(0, n_r):
                rb, rt, rmask = _row_tile(rblk, T, R, False, BLOCK_T)
                ct = _load_rows(c_ptr, rb, rt, offs_o, stride_cb, stride_ct, stride_co, rmask, omask)
                coef = _load_row_vec(a_ptr, rb, rt, k, stride_ab, stride_at, stride_ak, rmask) \
                    * _load_row_vec(a_ptr, rb, rt, l, stride_ab, stride_at, stride_ak, rmask)
                ct = ct * coef[:, None]
                if HAS_STYLES:
                    st = _load_rows(s_ptr, rb, rt, offs_i, stride_sb, stride_st, stride_si, rmask, imask)
                    f = tl.dot(tl.trans(ct), st * st, f, input_precision=SQ_PREC)
                else:
                    fv += tl.sum(ct, axis=0)
            if not HAS_STYLES:
                f = fv[:, None] + f
            wl = _load_w(w_ptr, l, offs_o, offs_i, stride_wk, stride_wo, stride_wi, omask, imask).to(tl.float32)
            acc -= wl * f
    tl.store(dw_ptr + k * stride_dwk + offs_o[:, None] * stride_dwo + offs_i[None, :] * stride_dwi,
             acc.to(dw_ptr.dtype.element_ty), mask=omask[:, None] & imask[None, :])
