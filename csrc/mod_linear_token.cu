// Per-token conditioning (coeffs (B, T, K) and/or styles (B, T, I)): every row r = (b, t)
// has its own weight  M_r = sum_k a[r,k] W_k,  V_r = M_r diag(s_r),  d_r = rsqrt(rowsum V_r^2 + eps).
// No per-row weight can be formed, so the work is the stacked formulation of DESIGN.md
// section 4: the coefficients (and styles) fold into the row-side operand and the bank is
// read as K (or, for the da demodulation term, K^2 pairwise-product) tiles.
//
//   _mod_linear_token_q_kernel           d[r,o] = rsqrt(sum_i (M_r[o,i] s_i)^2 + eps), and
//   _mod_linear_token_ds2_kernel         ds_rows[r,i] -= s_i sum_o c[r,o] M_r[o,i]^2:
//       the two terms quadratic in the mixture, from the mixed rows (see "mixed-row
//       demodulation" below: the pair products cancel when the experts do)
//   _mod_linear_token_rows_kernel<JOB>   a 64 x 64 tile of a row-indexed output, looping
//       over terms (k or pairs (k, l)) and the inner dimension:
//     TJ_Z    y[r,o]  = d[r,o] sum_k a_k sum_i (x s)_i W_k[o,i] + bias_r[o]   (forward)
//     TJ_DX   u[r,i]  = sum_k a_k sum_o gz[r,o] W_k[o,i];  dx = s u,  ds_rows = x u;  and with
//             da_rows, from the same per-k products (one group per k, a_k applied after):
//             da_rows[0, tile, r, k] = sum_{i in tile} (s x)_i sum_o gz[r,o] W_k[o,i]
//     TJ_DA2  da_rows[1, tile, r, k] = sum_{i in tile} s_i^2 sum_l a_l sum_o c[r,o] W_k W_l[o,i]
//             (linear in the mixture: the pairs' error is the mixture's own)
//   _mod_linear_token_weight_kernel      dbank[k] for a 64 x 64 (o, i) tile, over all rows:
//       dW_k = sum_r a_k gz[r] (s x)[r]^T  -  sum_l W_l * (sum_r a_k a_l c[r] (s^2)[r]^T)
//   _mod_linear_token_prep_kernel        gz = g d,  c = g (y - bias_r) d^2   (elementwise)
//
// with gz = g * d and c[r,o] = dd[r,o] d[r,o]^3 = g (y - bias) d^2 (z = (y - bias) / d), the
// per-row form of DESIGN.md section 2:  dV_r = gz_r x_r^T - c_r V_r,
//   dx_r = s_r M_r^T gz_r,   ds_r = x_r (M_r^T gz_r) - s_r sum_o c_r M_r^2,
//   da_r[k] = <W_k^T gz_r, s_r x_r> - sum_l a_l <W_k W_l, c_r (s_r^2)^T>,
//   dW_k = sum_r a_r[k] dV_r diag(s_r).
// Without demodulation d = 1, c = 0 and the squared terms vanish (the q and ds2 kernels,
// TJ_DA2 and the weight kernel's l-terms are not run).
//
// Cost, in dense GEMMs of R x O x I (R = B * T): forward K; dx, ds and the gz term of da
// together K; with demodulation da K^2 more; dbank K (+ K^2); plus, with demodulation,
// R * O * I * (K + 2) CUDA-core FMAs each for d and the ds term. The squared
// operands (s^2, W_k W_l, c) are rounded to the input dtype in the tiles, like x and W.
// Per-row outputs (ds_rows, da_rows) are fp32 and summed over t by the caller where the
// conditioning is per sample; da partials per column tile are summed by the caller too.
// Nothing is reduced across CTAs with atomics: every path is deterministic.
#include "common.cuh"

namespace mw {

enum TokJob { TJ_Z = 1, TJ_DX = 2, TJ_DA2 = 4 };

// 64 x 64 output tiles, 4 warps of 32 x 32 (2 x 2 MMA blocks of 16 x 16), 32-deep chunks.
struct TokCfg {
  static constexpr int WM = 2, WN = 2, FM = 2, FN = 2, BK = 32;
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16, NT = WM * WN * 32;
  static constexpr int LDC = BN + 4;
  static_assert(BM == MW_TOKEN_TILE && BN == MW_TOKEN_TILE, "MW_TOKEN_TILE is the tile");
  // Dynamic shared memory: A stage, B stage (the larger of the layouts the kernels use),
  // and the fp32 output tile (not aliased: the da jobs reuse the stages after each group).
  template <typename T> __host__ __device__ static constexpr int a_elems() {
    constexpr int x = BM * Ld<T, BK>::value, y = BK * Ld<T, BM>::value;
    return x > y ? x : y;
  }
  template <typename T> __host__ __device__ static constexpr int b_elems() {
    constexpr int x = BN * Ld<T, BK>::value, y = BK * Ld<T, BN>::value;
    return x > y ? x : y;
  }
  template <typename T> __host__ __device__ static constexpr int a_bytes() {
    return (a_elems<T>() * (int)sizeof(T) + 127) / 128 * 128;
  }
  template <typename T> __host__ __device__ static constexpr int b_bytes() {
    return (b_elems<T>() * (int)sizeof(T) + 127) / 128 * 128;
  }
  template <typename T> __host__ __device__ static constexpr int smem() {
    return a_bytes<T>() + b_bytes<T>() + BM * LDC * 4;
  }
  // + the fp32 running total of the groups (the weight kernel, the dx job with da)
  template <typename T> __host__ __device__ static constexpr int smem_tot() {
    return smem<T>() + BM * BN * 4;
  }
};

// ------------------------------------------------------------------ loaders

// The row-side operand of a term:
//     src[r, j] * sty[r / s_div, j]^spow * a[r / a_div, ka] * a[r / a_div, la] * mult
// (src, sty, a optional: NULL or an index < 0 means 1). `ld` is src's row stride and also
// the styles' (styles are only used where the inner dimension is I).
template <typename T, typename S>
struct RowOperand {
  const S* src;
  int64_t ld;
  const T* sty;
  int64_t s_div;
  int spow;
  const T* coef;
  int64_t a_div, K;
  int ka, la;
  float mult;
  bool vec_src, vec_sty;

  __device__ __forceinline__ float rowfac(int64_t r) const {
    float f = mult;
    if (coef) {
      const T* ar = coef + (r / a_div) * K;
      if (ka >= 0) f *= to_f(ar[ka]);
      if (la >= 0) f *= to_f(ar[la]);
    }
    return f;
  }
};

// smem tile of the row operand for rows [r0, r0 + RT) x columns [j0, j0 + CT) (rows >= R and
// columns >= J zero). ROW_MAJOR: stored [row][col] (row = r); else [col][row] (the weight
// kernel's A and B tiles are [r][...] too, so both callers store rows of r: the flag says
// whether r runs along the tile's rows).
template <typename T, typename S, int RT, int CT, int NT>
__device__ __forceinline__ void load_row_tile(T* __restrict__ smem, int lds, const RowOperand<T, S>& op,
                                              int64_t r0, int64_t R, int64_t j0, int64_t J) {
  constexpr int V = Vec<T>::N;
  fill_tile<T, RT, CT, NT>(smem, lds, [&](int rr, int cc, float* acc) {
    const int64_t r = r0 + rr, c = j0 + cc;
    if (r >= R || c >= J) return;
    const bool full = c + V <= J;
    const int valid = (int)(J - c < V ? J - c : V);
    const float f = op.rowfac(r);
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = e < valid ? f : 0.f;
    if (op.src) {
      float val[V];
      load_part<V>(op.src + r * op.ld + c, val, valid, full && op.vec_src);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] *= val[e];
    }
    if (op.sty) {
      float val[V];
      load_part<V>(op.sty + (r / op.s_div) * op.ld + c, val, valid, full && op.vec_sty);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] *= op.spow == 2 ? val[e] * val[e] : val[e];
    }
  });
}

// smem[oo][ii] = W_k[o0 + oo, i0 + ii] * (wl ? W_l[o0 + oo, i0 + ii] : 1) for a RT x CT tile
// of (o, i), zero outside O x I. wk, wl point at the bank entries [O, I].
template <typename T, int RT, int CT, int NT>
__device__ __forceinline__ void load_bank_tile(T* __restrict__ smem, int lds, const T* __restrict__ wk,
                                               const T* __restrict__ wl, int64_t O, int64_t I, int64_t o0,
                                               int64_t i0, bool vec) {
  constexpr int V = Vec<T>::N;
  fill_tile<T, RT, CT, NT>(smem, lds, [&](int oo, int ii, float* acc) {
    const int64_t o = o0 + oo, i = i0 + ii;
    if (o >= O || i >= I) return;
    const bool full = vec && i + V <= I;
    const int valid = (int)(I - i < V ? I - i : V);
    const int64_t off = o * I + i;
    load_part<V>(wk + off, acc, valid, full);
    if (wl) {
      float val[V];
      load_part<V>(wl + off, val, valid, full);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] *= val[e];
    }
  });
}

// ------------------------------------------------------------------ the row kernels
//
// CTA (row tile, column tile): rows r0 .. r0 + 63 of R = B * T, columns n0 .. n0 + 63 of N
// (N = O for TJ_Z, whose inner dimension is I; N = I for the others, inner O).
// Grouped jobs run one group per bank entry k (each its own accumulator, reduced per row
// against a row-wise factor after the group): TJ_DA2, and TJ_DX when da_rows is wanted (its
// groups' accumulators W_k^T gz are then also added, times a_k, into the running total
// Tot for dx and ds: one pass gives both). The others run one group summing every term.
template <typename T, int JOB>
__global__ void __launch_bounds__(TokCfg::NT, 1) _mod_linear_token_rows_kernel(const MwModLinearParams p) {
  using C = TokCfg;
  constexpr bool INNER_I = (JOB == TJ_Z);
  constexpr bool C_SRC = (JOB == TJ_DA2);  // the fp32 c is the row operand
  constexpr bool DA2 = (JOB == TJ_DA2);
  using S = typename std::conditional<C_SRC, float, T>::type;
  // B tile stored [o][i]: [n][j] (B_COL) when the inner dimension is I, [j][n] when it is O
  using Eng = typename EngineFor<T, C::WM, C::WN, C::FM, C::FN, false, INNER_I>::type;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, LDC = C::LDC;
  constexpr int LDA = Ld<T, BK>::value;
  constexpr int LDB = INNER_I ? Ld<T, BK>::value : Ld<T, BN>::value;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);                                 // [BM][LDA] (r, j)
  T* Bs = reinterpret_cast<T*>(smem_raw + C::a_bytes<T>());                // (o, i)
  float* Cs = reinterpret_cast<float*>(smem_raw + C::a_bytes<T>() + C::b_bytes<T>());  // [BM][LDC]
  float* Tot = Cs + BM * LDC;  // [BM * BN], TJ_DX only (the launcher sizes the smem for it)

  const int64_t I = p.I, O = p.O, K = p.K, R = p.B * p.T;
  const int64_t N = INNER_I ? O : I, J = INNER_I ? I : O;
  const int64_t r0 = (int64_t)blockIdx.x * BM, n0 = (int64_t)blockIdx.y * BN;
  const T* bank = static_cast<const T*>(p.bank);
  const T* coef = static_cast<const T*>(p.coeffs);
  const T* sty = static_cast<const T*>(p.styles);
  const bool vec_w = aligned16(p.bank) && (I % V == 0);

  RowOperand<T, S> op;
  op.ld = J;
  op.coef = coef;
  op.a_div = p.a_div;
  op.K = K;
  op.s_div = p.s_div;
  op.sty = nullptr;
  op.spow = 1;
  if constexpr (JOB == TJ_Z) {
    op.src = static_cast<const S*>(p.x);
    op.sty = sty;
  } else if constexpr (C_SRC) {
    op.src = p.c;
  } else {
    op.src = static_cast<const S*>(p.gz);
  }
  op.vec_src = op.src && aligned16(op.src) && (J % V == 0);
  op.vec_sty = sty && aligned16(sty) && (J % V == 0);

  const bool grouped = DA2 || (JOB == TJ_DX && p.da_rows != nullptr);
  const int ngroups = grouped ? (int)K : 1;
  for (int grp = 0; grp < ngroups; ++grp) {
    Eng eng;
    eng.zero();
    // terms of this group: (k, l) with the bank tile W_k (* W_l when l >= 0)
    const int k_lo = grouped ? grp : 0, k_hi = grouped ? grp + 1 : (int)K;
    for (int k = k_lo; k < k_hi; ++k) {
      // l in [l_lo, l_hi); the range [-1, 0) is the single term W_k alone
      const int l_lo = DA2 ? 0 : -1;
      const int l_hi = DA2 ? (int)K : 0;
      for (int l = l_lo; l < l_hi; ++l) {
        const T* wk = bank + (int64_t)k * O * I;
        const T* wl = l >= 0 ? bank + (int64_t)l * O * I : nullptr;
        // row factors: a_k (Z, DX), a_l (DA2), none (grouped DX: a_k is applied when the
        // group is added to Tot)
        op.ka = grouped ? -1 : k;
        op.la = DA2 ? l : -1;
        op.mult = 1.f;
        // a single 16-bit bank entry is a raw tile: cp.async, in flight while the row tile is
        // formed in registers (fp32 tiles keep Ld's odd stride for the FMA engine: plain loads)
        const bool async_w = sizeof(T) == 2 && !wl && vec_w;
        for (int64_t j0 = 0; j0 < J; j0 += BK) {
          __syncthreads();  // the previous chunk is consumed
          if (async_w) {
            if constexpr (INNER_I) {  // [o][i]: rows o of [n0, n0 + BN), columns i of [j0, j0 + BK)
              async_tile<T, BN, BK, NT>(Bs, LDB, wk + n0 * I + j0, I, (int)(O - n0 < BN ? O - n0 : BN),
                                        (int)(I - j0 < BK ? I - j0 : BK));
            } else {  // [o][i]: rows o of [j0, j0 + BK), columns i of [n0, n0 + BN)
              async_tile<T, BK, BN, NT>(Bs, LDB, wk + j0 * I + n0, I, (int)(O - j0 < BK ? O - j0 : BK),
                                        (int)(I - n0 < BN ? I - n0 : BN));
            }
            cp_async_commit();
          }
          load_row_tile<T, S, BM, BK, NT>(As, LDA, op, r0, R, j0, J);
          if (!async_w) {
            if constexpr (INNER_I) {
              load_bank_tile<T, BN, BK, NT>(Bs, LDB, wk, wl, O, I, n0, j0, vec_w);  // [o][i]
            } else {
              load_bank_tile<T, BK, BN, NT>(Bs, LDB, wk, wl, O, I, j0, n0, vec_w);  // [o][i]
            }
          }
          cp_async_wait<0>();
          __syncthreads();
          eng.template chunk<BK>(As, LDA, Bs, LDB);
        }
      }
    }
    __syncthreads();  // Cs is free (previous group's reduction done)
    eng.store(Cs, LDC);
    __syncthreads();

    if (grouped) {
      // row-wise reduction against E[r, i] = (s x)[r, i] (DX) or s[r, i]^2 (DA2): thread pair
      // (2m, 2m + 1) owns row m, 32 columns each, added in a fixed order
      const int m = (int)threadIdx.x / 2, half = (int)threadIdx.x % 2;
      const int64_t r = r0 + m;
      float part = 0.f;
      if (r < R) {
        const T* xr = static_cast<const T*>(p.x) + r * I;
        const T* sr = sty ? sty + (r / p.s_div) * I : nullptr;
        for (int jj = 0; jj < BN / 2; ++jj) {
          const int cc = half * (BN / 2) + jj;
          const int64_t i = n0 + cc;
          if (i < I) {
            const float sv = sr ? to_f(sr[i]) : 1.f;
            const float e = DA2 ? sv * sv : to_f(xr[i]) * sv;
            part = fmaf(Cs[m * LDC + cc], e, part);
          }
        }
      }
      part += __shfl_xor_sync(0xffffffffu, part, 1);
      if (half == 0 && r < R) {
        const int64_t part_idx = DA2 ? 1 : 0;
        const int64_t ntiles = gridDim.y;  // = cdiv(I, BN)
        p.da_rows[((part_idx * ntiles + blockIdx.y) * R + r) * K + grp] = part;
      }
      if constexpr (JOB == TJ_DX) {
        // Tot += a[r, k] * W_k^T gz; each thread keeps the same elements in every group
        for (int e = (int)threadIdx.x; e < BM * BN; e += NT) {
          const int rr = e / BN, cc = e % BN;
          const int64_t r = r0 + rr;
          const float ak = (r < R && coef) ? to_f(coef[(r / p.a_div) * K + grp]) : 1.f;
          Tot[e] = fmaf(ak, Cs[rr * LDC + cc], grp == 0 ? 0.f : Tot[e]);
        }
      }
    }
    if constexpr (!DA2) {
      if (grouped && grp + 1 < ngroups) continue;  // the epilogue reads Tot after the last group
      for (int e = (int)threadIdx.x; e < BM * BN; e += NT) {
        const int rr = e / BN, cc = e % BN;
        const int64_t r = r0 + rr, n = n0 + cc;
        if (r >= R || n >= N) continue;
        const float v = grouped ? Tot[e] : Cs[rr * LDC + cc];
        if constexpr (JOB == TJ_Z) {
          float out = v;
          if (p.d) out *= p.d[r * O + n];
          if (p.bias) out += p.bias[(r / p.bias_div) * p.bias_stride_b + n];
          static_cast<T*>(p.y)[r * O + n] = from_f<T>(out);
        } else if constexpr (JOB == TJ_DX) {
          if (p.dx) {
            const float sv = sty ? to_f(sty[(r / p.s_div) * I + n]) : 1.f;
            static_cast<T*>(p.dx)[r * I + n] = from_f<T>(v * sv);
          }
          if (p.ds_rows) p.ds_rows[r * I + n] = v * to_f(static_cast<const T*>(p.x)[r * I + n]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ the weight kernel
//
// CTA (i tile, o tile, bank entry k): dbank[k, o0:o0+64, i0:i0+64] over every row. Group
// g = -1 accumulates  sum_r (a_k gz)[r, o] (s x)[r, i];  with demodulation, group l
// accumulates  sum_r (a_k a_l c)[r, o] (s^2)[r, i]  and is folded as  -= W_l * acc.
// Both operands are row tiles [r][o] and [r][i] (A column-major in the engine's terms).
template <typename T>
__global__ void __launch_bounds__(TokCfg::NT, 1) _mod_linear_token_weight_kernel(const MwModLinearParams p) {
  using C = TokCfg;
  using Eng = typename EngineFor<T, C::WM, C::WN, C::FM, C::FN, true, false>::type;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, LDC = C::LDC;
  constexpr int LDA = Ld<T, BM>::value, LDB = Ld<T, BN>::value;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);                                 // [BK][LDA] (r, o)
  T* Bs = reinterpret_cast<T*>(smem_raw + C::a_bytes<T>());                // [BK][LDB] (r, i)
  float* Cs = reinterpret_cast<float*>(smem_raw + C::a_bytes<T>() + C::b_bytes<T>());  // [BM][LDC]
  float* Tot = Cs + BM * LDC;  // [BM * BN] with demodulation: the running total of the groups

  const int64_t I = p.I, O = p.O, K = p.K, R = p.B * p.T;
  const int64_t i0 = (int64_t)blockIdx.x * BN, o0 = (int64_t)blockIdx.y * BM;
  const int k = (int)blockIdx.z;
  const T* bank = static_cast<const T*>(p.bank);
  const T* coef = static_cast<const T*>(p.coeffs);
  const T* sty = static_cast<const T*>(p.styles);

  RowOperand<T, T> ga;  // (a_k gz)[r, o]
  ga.src = static_cast<const T*>(p.gz);
  ga.ld = O;
  ga.sty = nullptr;
  ga.s_div = p.s_div;
  ga.spow = 1;
  ga.coef = coef;
  ga.a_div = p.a_div;
  ga.K = K;
  ga.ka = k;
  ga.la = -1;
  ga.mult = 1.f;
  ga.vec_src = aligned16(ga.src) && (O % V == 0);
  ga.vec_sty = false;
  RowOperand<T, T> xb = ga;  // (s x)[r, i]
  xb.src = static_cast<const T*>(p.x);
  xb.ld = I;
  xb.sty = sty;
  xb.coef = nullptr;
  xb.vec_src = aligned16(xb.src) && (I % V == 0);
  xb.vec_sty = sty && aligned16(sty) && (I % V == 0);
  RowOperand<T, float> ca;  // (a_k a_l c)[r, o]
  ca.src = p.c;
  ca.ld = O;
  ca.sty = nullptr;
  ca.s_div = p.s_div;
  ca.spow = 1;
  ca.coef = coef;
  ca.a_div = p.a_div;
  ca.K = K;
  ca.ka = k;
  ca.mult = 1.f;
  ca.vec_src = p.c && aligned16(p.c) && (O % V == 0);
  ca.vec_sty = false;
  RowOperand<T, T> s2 = xb;  // (s^2)[r, i]
  s2.src = nullptr;
  s2.spow = 2;

  const int ngroups = p.c ? (int)K : 0;
  for (int grp = -1; grp < ngroups; ++grp) {
    Eng eng;
    eng.zero();
    ca.la = grp;
    for (int64_t r0 = 0; r0 < R; r0 += BK) {
      __syncthreads();
      if (grp < 0) {
        load_row_tile<T, T, BK, BM, NT>(As, LDA, ga, r0, R, o0, O);
        load_row_tile<T, T, BK, BN, NT>(Bs, LDB, xb, r0, R, i0, I);
      } else {
        load_row_tile<T, float, BK, BM, NT>(As, LDA, ca, r0, R, o0, O);
        load_row_tile<T, T, BK, BN, NT>(Bs, LDB, s2, r0, R, i0, I);
      }
      __syncthreads();
      eng.template chunk<BK>(As, LDA, Bs, LDB);
    }
    __syncthreads();
    eng.store(Cs, LDC);
    __syncthreads();
    if (ngroups == 0) break;  // no demodulation: Cs is the result
    // each thread owns the same elements of Tot in every group: no barrier between groups
    const T* wl = grp >= 0 ? bank + (int64_t)grp * O * I : nullptr;
    for (int idx = (int)threadIdx.x; idx < BM * BN; idx += NT) {
      const int oo = idx / BN, ii = idx % BN;
      const float v = Cs[oo * LDC + ii];
      if (grp < 0) {
        Tot[idx] = v;
      } else {
        const int64_t o = o0 + oo, i = i0 + ii;
        const float w = (o < O && i < I) ? to_f(wl[o * I + i]) : 0.f;
        Tot[idx] = fmaf(-w, v, Tot[idx]);
      }
    }
  }
  T* dbank = static_cast<T*>(p.dbank) + (int64_t)k * O * I;
  for (int idx = (int)threadIdx.x; idx < BM * BN; idx += NT) {
    const int oo = idx / BN, ii = idx % BN;
    const int64_t o = o0 + oo, i = i0 + ii;
    if (o < O && i < I) dbank[o * I + i] = from_f<T>(ngroups == 0 ? Cs[oo * LDC + ii] : Tot[idx]);
  }
}

// ------------------------------------------------------------------ elementwise prep
//
// gz[r, o] = g d;  c[r, o] = g (y - bias_r) d^2   (with demodulation; grid-stride loop)
template <typename T>
__global__ void __launch_bounds__(256) _mod_linear_token_prep_kernel(const MwModLinearParams p) {
  const int64_t O = p.O, n = p.B * p.T * O;
  const T* g = static_cast<const T*>(p.g);
  const T* y = static_cast<const T*>(p.y);
  T* gz = static_cast<T*>(p.gz);
  for (int64_t e = (int64_t)blockIdx.x * 256 + threadIdx.x; e < n; e += (int64_t)gridDim.x * 256) {
    const int64_t r = e / O, o = e % O;
    const float gv = to_f(g[e]), dv = p.d[e];
    gz[e] = from_f<T>(gv * dv);
    if (p.c) {
      const float bb = p.bias ? p.bias[(r / p.bias_div) * p.bias_stride_b + o] : 0.f;
      p.c[e] = gv * (to_f(y[e]) - bb) * dv * dv;
    }
  }
}

// ------------------------------------------------------------------ mixed-row demodulation
//
// d and the ds term are quadratic in the mixture M_r = sum_k a[r,k] W_k. Expanded over the
// pair products W_k W_l they are sums of terms of size |a|^2 |W|^2 whose total is |M|^2:
// when the experts nearly cancel (W and -W + 1e-3 noise) the terms' rounding is ~1e6 times
// the result's (10-20 % error in fp32, a negative q and NaN at 1e-4). So these kernels mix
// the bank rows in fp32 registers and square the mixture: the error is then that of forming
// M (eps |a| |W| / |M|), which the reference shares. K + 2 FMAs per (r, o, i) on CUDA cores;
// each bank element read is used by MIX_ROWS rows (coalesced along i).
//   _mod_linear_token_q_kernel    a warp per (output o, MIX_ROWS rows), lanes along i,
//                                reduced over the warp in a fixed order
//   _mod_linear_token_ds2_kernel  a thread per (i, MIX_ROWS rows), looping over o; runs after
//                                the dx job, which wrote ds_rows (same stream)
constexpr int MIX_ROWS = 8, MIX_WARPS = 4;

template <typename T>
__device__ __forceinline__ void mix_rows(float (&m)[MIX_ROWS], const MwModLinearParams& p, int64_t r0, int64_t o,
                                         int64_t i) {
  const T* bank = static_cast<const T*>(p.bank);
  const T* coef = static_cast<const T*>(p.coeffs);
  const int64_t O = p.O, I = p.I, K = p.K, R = p.B * p.T;
#pragma unroll
  for (int j = 0; j < MIX_ROWS; ++j) m[j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float w = to_f(bank[(k * O + o) * I + i]);
#pragma unroll
    for (int j = 0; j < MIX_ROWS; ++j) {
      const int64_t r = r0 + j < R ? r0 + j : R - 1;  // rows past R: computed, never stored
      m[j] = fmaf(coef ? to_f(coef[(r / p.a_div) * K + k]) : 1.f, w, m[j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(MIX_WARPS * 32, 1) _mod_linear_token_q_kernel(const MwModLinearParams p) {
  const int64_t I = p.I, O = p.O, R = p.B * p.T;
  const int lane = (int)threadIdx.x % 32, warp = (int)threadIdx.x / 32;
  const int64_t r0 = (int64_t)blockIdx.x * MIX_ROWS;
  const T* sty = static_cast<const T*>(p.styles);
  // o strides over the grid's y extent (capped at 65535 blocks); uniform per warp
  for (int64_t ob = (int64_t)blockIdx.y * MIX_WARPS; ob < O; ob += (int64_t)gridDim.y * MIX_WARPS) {
    const int64_t o = ob + warp;
    float acc[MIX_ROWS];
#pragma unroll
    for (int j = 0; j < MIX_ROWS; ++j) acc[j] = 0.f;
    if (o < O) {
      for (int64_t i = lane; i < I; i += 32) {
        float m[MIX_ROWS];
        mix_rows<T>(m, p, r0, o, i);
#pragma unroll
        for (int j = 0; j < MIX_ROWS; ++j) {
          const int64_t r = r0 + j < R ? r0 + j : R - 1;
          const float v = sty ? m[j] * to_f(sty[(r / p.s_div) * I + i]) : m[j];
          acc[j] = fmaf(v, v, acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < MIX_ROWS; ++j)
      for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
    if (lane == 0 && o < O) {
#pragma unroll
      for (int j = 0; j < MIX_ROWS; ++j)
        if (r0 + j < R) p.d[(r0 + j) * O + o] = rsqrtf(acc[j] + p.eps);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(MIX_WARPS * 32) _mod_linear_token_ds2_kernel(const MwModLinearParams p) {
  const int64_t I = p.I, O = p.O, R = p.B * p.T;
  const int64_t i = (int64_t)blockIdx.y * (MIX_WARPS * 32) + threadIdx.x;
  const int64_t r0 = (int64_t)blockIdx.x * MIX_ROWS;
  if (i >= I) return;
  const T* sty = static_cast<const T*>(p.styles);
  float t2[MIX_ROWS];
#pragma unroll
  for (int j = 0; j < MIX_ROWS; ++j) t2[j] = 0.f;
  for (int64_t o = 0; o < O; ++o) {
    float m[MIX_ROWS];
    mix_rows<T>(m, p, r0, o, i);
#pragma unroll
    for (int j = 0; j < MIX_ROWS; ++j) {
      const int64_t r = r0 + j < R ? r0 + j : R - 1;
      t2[j] = fmaf(p.c[r * O + o] * m[j], m[j], t2[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < MIX_ROWS; ++j) {
    const int64_t r = r0 + j;
    if (r < R) p.ds_rows[r * I + i] -= to_f(sty[(r / p.s_div) * I + i]) * t2[j];
  }
}

template <typename T>
static int launch_mixed(const MwModLinearParams* p, cudaStream_t stream, const char* who, bool q) {
  const int64_t rb = cdiv(p->B * p->T, MIX_ROWS);
  if (rb == 0 || p->O == 0 || (!q && p->I == 0)) return MW_OK;  // nothing to write
  if (rb > 2147483647LL) {
    set_error("%s: B * T = %lld rows is more than the mixed-row kernels' grid holds", who,
              (long long)(p->B * p->T));
    return MW_EINVAL;
  }
  if (q) {
    const int64_t ob = cdiv(p->O, MIX_WARPS);
    dim3 grid((unsigned)rb, (unsigned)(ob < 65535 ? ob : 65535));
    _mod_linear_token_q_kernel<T><<<grid, MIX_WARPS * 32, 0, stream>>>(*p);
  } else {
    dim3 grid((unsigned)rb, (unsigned)cdiv(p->I, MIX_WARPS * 32));  // I < 2^22 (check_token)
    _mod_linear_token_ds2_kernel<T><<<grid, MIX_WARPS * 32, 0, stream>>>(*p);
  }
  return check_launch(who);
}

static int dispatch_mixed(const MwModLinearParams* p, void* stream, const char* who, bool q) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_mixed<float>(p, s, who, q);
    case MW_F16: return launch_mixed<__half>(p, s, who, q);
    case MW_BF16: return launch_mixed<__nv_bfloat16>(p, s, who, q);
  }
  return MW_EINVAL;
}

// ------------------------------------------------------------------ launchers

template <typename T, int JOB>
static int launch_rows(const MwModLinearParams* p, cudaStream_t stream, const char* who) {
  constexpr int smem = JOB == TJ_DX ? TokCfg::smem_tot<T>() : TokCfg::smem<T>();
  if (int rc = prepare_smem((const void*)_mod_linear_token_rows_kernel<T, JOB>, smem, p->device, who)) return rc;
  const int64_t N = (JOB == TJ_Z) ? p->O : p->I;
  dim3 grid((unsigned)cdiv(p->B * p->T, TokCfg::BM), (unsigned)cdiv(N, TokCfg::BN));
  _mod_linear_token_rows_kernel<T, JOB><<<grid, TokCfg::NT, smem, stream>>>(*p);
  return check_launch(who);
}

template <int JOB>
static int dispatch_rows(const MwModLinearParams* p, void* stream, const char* who) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_rows<float, JOB>(p, s, who);
    case MW_F16: return launch_rows<__half, JOB>(p, s, who);
    case MW_BF16: return launch_rows<__nv_bfloat16, JOB>(p, s, who);
  }
  return MW_EINVAL;
}

template <typename T>
static int launch_weight(const MwModLinearParams* p, cudaStream_t stream, const char* who) {
  constexpr int smem = TokCfg::smem_tot<T>();
  if (int rc = prepare_smem((const void*)_mod_linear_token_weight_kernel<T>, smem, p->device, who)) return rc;
  dim3 grid((unsigned)cdiv(p->I, TokCfg::BN), (unsigned)cdiv(p->O, TokCfg::BM), (unsigned)p->K);
  _mod_linear_token_weight_kernel<T><<<grid, TokCfg::NT, smem, stream>>>(*p);
  return check_launch(who);
}

template <typename T>
static int launch_prep(const MwModLinearParams* p, cudaStream_t stream, const char* who) {
  const int64_t n = p->B * p->T * p->O;
  const int64_t blocks = cdiv(n, 256) < 65535 * 8 ? cdiv(n, 256) : 65535 * 8;
  _mod_linear_token_prep_kernel<T><<<(unsigned)blocks, 256, 0, stream>>>(*p);
  return check_launch(who);
}

static int need(bool ok, const char* who, const char* what) {
  if (ok) return MW_OK;
  set_error("%s: %s", who, what);
  return MW_EINVAL;
}

}  // namespace mw

extern "C" {

int mw_mod_linear_token_tile(void) { return MW_TOKEN_TILE; }

int mw_mod_linear_token_demod(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_token_demod";
  if (int rc = check_token(p, who)) return rc;
  if (int rc = need(p->d != nullptr, who, "d (the output) is NULL")) return rc;
  return dispatch_mixed(p, stream, who, true);
}

int mw_mod_linear_token_forward(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_token_forward";
  if (int rc = check_token(p, who)) return rc;
  if (int rc = need(p->y != nullptr, who, "y (the output) is NULL")) return rc;
  return dispatch_rows<TJ_Z>(p, stream, who);
}

int mw_mod_linear_token_prep(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_token_prep";
  if (int rc = check_token(p, who)) return rc;
  if (int rc = need(p->g && p->d && p->gz && (!p->c || p->y), who, "needs g, d, gz, and y for c")) return rc;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_prep<float>(p, s, who);
    case MW_F16: return launch_prep<__half>(p, s, who);
    case MW_BF16: return launch_prep<__nv_bfloat16>(p, s, who);
  }
  return MW_EINVAL;
}

int mw_mod_linear_token_dx(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_token_dx";
  if (int rc = check_token(p, who)) return rc;
  if (int rc = need(p->gz && (p->dx || p->ds_rows || p->da_rows), who,
                    "needs gz and at least one of dx, ds_rows, da_rows")) return rc;
  if (int rc = need(!p->da_rows || p->coeffs, who, "da_rows needs coeffs")) return rc;
  return dispatch_rows<TJ_DX>(p, stream, who);
}

int mw_mod_linear_token_ds_demod(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_token_ds_demod";
  if (int rc = check_token(p, who)) return rc;
  if (int rc = need(p->c && p->ds_rows && p->styles, who, "needs c, ds_rows and styles")) return rc;
  return dispatch_mixed(p, stream, who, false);
}

int mw_mod_linear_token_da_demod(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_token_da_demod";
  if (int rc = check_token(p, who)) return rc;
  if (int rc = need(p->c && p->da_rows && p->coeffs, who, "needs c, da_rows and coeffs")) return rc;
  return dispatch_rows<TJ_DA2>(p, stream, who);
}

int mw_mod_linear_token_weight(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_token_weight";
  if (int rc = check_token(p, who)) return rc;
  if (int rc = need(p->gz && p->dbank, who, "needs gz and dbank")) return rc;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_weight<float>(p, s, who);
    case MW_F16: return launch_weight<__half>(p, s, who);
    case MW_BF16: return launch_weight<__nv_bfloat16>(p, s, who);
  }
  return MW_EINVAL;
}

}  // extern "C"
