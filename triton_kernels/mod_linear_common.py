"""Device helpers shared by the mod_linear forward and backward kernels.

Row indexing: a *row* is one token ``(b, t)`` of ``x (B, T, I)``. Kernels tile rows in
one of two ways (the constexpr ``MIX_B``):

``MIX_B = True``   a row tile lies inside one sample ``b`` (``cdiv(T, BLOCK_T)`` tiles per
                   sample), so a per-sample mixture can be formed once per B-tile load.
``MIX_B = False``  rows are flat, ``r = b * T + t`` over all ``B * T`` rows (``cdiv(B*T,
                   BLOCK_T)`` tiles): the stacked formulation, where per-row (or per-sample,
                   gathered per row) coefficients scale the A operand instead.

Every row index is int64: ``B * T * I`` may pass 2^31 elements.
"""
import triton
import triton.language as tl


@triton.jit
def _row_tile(pid, T, R, MIX_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows of row tile ``pid``: (rb, rt, rmask), sample and token of each row, int64 [BLOCK_T]."""
    if MIX_B:
        n_tb = tl.cdiv(T, BLOCK_T)
        b = pid // n_tb
        tb = pid - b * n_tb
        rt = tb * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        rb = tl.zeros([BLOCK_T], dtype=tl.int64) + b
        rmask = rt < T
    else:
        r = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        rb = r // T
        rt = r - rb * T
        rmask = r < R
    return rb, rt, rmask


@triton.jit
def _load_rows(ptr, rb, rt, cols, stride_b, stride_t, stride_c, rmask, cmask):
    """A ``[rows, cols]`` tile of a ``(B, T, C)`` tensor (stride_t = 0 for a per-sample
    ``(B, C)`` tensor, gathered per row), as float32; zeros outside the masks."""
    p = ptr + rb[:, None] * stride_b + rt[:, None] * stride_t + cols[None, :] * stride_c
    return tl.load(p, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_row_vec(ptr, rb, rt, k, stride_b, stride_t, stride_k, rmask):
    """Column ``k`` of a ``(B, T, K)`` tensor for each row (stride_t = 0 when per sample), float32."""
    return tl.load(ptr + rb * stride_b + rt * stride_t + k * stride_k, mask=rmask, other=0.0).to(tl.float32)


@triton.jit
def _row_coef(a_ptr, rb, rt, k, stride_b, stride_t, stride_k, rmask, HAS_COEFFS: tl.constexpr,
              BLOCK_T: tl.constexpr):
    """``a[r, k]`` for each row (:func:`_load_row_vec`), or ones without coefficients (then the
    bank is ``W_0`` alone, ``NBANK = 1``): float32 [BLOCK_T]."""
    if HAS_COEFFS:
        a = _load_row_vec(a_ptr, rb, rt, k, stride_b, stride_t, stride_k, rmask)
    else:
        a = tl.full([BLOCK_T], 1.0, tl.float32)
    return a


@triton.jit
def _expert_step(step, NBANK, size, BLOCK: tl.constexpr):
    """Step ``step`` of a main loop over (tile, bank entry) pairs, flattened into one loop:
    ``(k, offs, mask)``, the bank entry ``k = step % NBANK`` and the int64 offsets and mask of
    tile ``step // NBANK`` along a dimension of ``size``. One flat loop, not a tile loop around
    an expert loop: the software pipeliner stages the loads of a single ``scf.for``."""
    t = step // NBANK
    k = step - t * NBANK
    offs = t * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return k, offs, offs < size


@triton.jit
def _load_w(w_ptr, k, offs_a, offs_b, stride_k, stride_a, stride_b, amask, bmask):
    """Tile ``bank[k, offs_a, offs_b]`` in the bank's dtype (pass the o/i offsets and strides
    in either order to get the tile or its transpose)."""
    # k * stride_k in int64 (offs_a is int64): a bank of K * O * I > 2^31 elements would
    # overflow an int32 product even though each stride fits in 32 bits
    k_off = (offs_a * 0 + k) * stride_k
    p = w_ptr + k_off[:, None] + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b
    return tl.load(p, mask=amask[:, None] & bmask[None, :], other=0.0)


@triton.jit
def _pair_weight(k, l):
    """Weight of the unordered pair (k, l) in ``sum_{k,l} a_k a_l W_k W_l``: 1 on the
    diagonal, 2 off it (each off-diagonal pair stands for (k, l) and (l, k))."""
    return tl.where(k == l, 1.0, 2.0)


@triton.jit
def _mix_tile(w_ptr, a_ptr, b, K, offs_a, offs_b, stride_wk, stride_a, stride_b, stride_ab, stride_ak,
              amask, bmask, HAS_COEFFS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Sample b's mixture tile ``M_b = sum_k a[b, k] W_k`` (offsets/strides in either order) as
    (bank dtype, for tl.dot; float32). Without coefficients it is ``W_0`` as loaded (the float32
    copy is dead code unless a squared term uses it).

    The K bank tiles are unrolled over ``BLOCK_K`` (a power of two >= K, the tiles beyond K
    masked off): a runtime ``for k in range(K)`` nested in the caller's main loop stops
    Triton's software pipeliner (seen in the AOT report: plain register loads, nothing in
    flight), while unrolled each bank tile is one more load the pipeliner stages ``num_stages``
    deep. Shared memory per stage grows by ``BLOCK_K`` tiles: the configs' pruning counts it."""
    if HAS_COEFFS:
        m = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        for k in tl.static_range(BLOCK_K):
            kin = k < K
            ak = tl.load(a_ptr + b * stride_ab + k * stride_ak, mask=kin, other=0.0).to(tl.float32)
            m += ak * _load_w(w_ptr, k, offs_a, offs_b, stride_wk, stride_a, stride_b, amask & kin,
                              bmask).to(tl.float32)
        mq = m.to(w_ptr.dtype.element_ty)
    else:
        mq = _load_w(w_ptr, 0, offs_a, offs_b, stride_wk, stride_a, stride_b, amask, bmask)
        m = mq.to(tl.float32)
    return mq, m
