// Per-token conditioning, the shared part of its kernels (mod_linear_token.cu: the row
// kernels and prep; mod_linear_token_weight.cu: dbank; mod_linear_token_demod.cu: the
// mixed-row demodulation kernels): the tile config, the row operand and the tile loaders.
//
// The maths. With coeffs (B, T, K) and/or styles (B, T, I) every row r = (b, t)
// has its own weight  M_r = sum_k a[r,k] W_k,  V_r = M_r diag(s_r),  d_r = rsqrt(rowsum V_r^2 + eps).
// No per-row weight can be formed, so the work is the stacked formulation of docs/design.md
// section 3: the coefficients (and styles) fold into the row-side operand and the bank is
// read as K (or, for the da demodulation term, K^2 pairwise-product) tiles.
//
//   _mod_linear_token_q_kernel           d[r,o] = rsqrt(sum_i (M_r[o,i] s_i)^2 + eps), and
//   _mod_linear_token_ds2_kernel         ds_rows[r,i] -= s_i sum_o c[r,o] M_r[o,i]^2:
//       the two terms quadratic in the mixture, from the mixed rows (see "mixed-row
//       demodulation" in mod_linear_token_demod.cu: the pair products cancel when the
//       experts do)
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
// per-row form of docs/design.md section 2:  dV_r = gz_r x_r^T - c_r V_r,
//   dx_r = s_r M_r^T gz_r,   ds_r = x_r (M_r^T gz_r) - s_r sum_o c_r M_r^2,
//   da_r[k] = <W_k^T gz_r, s_r x_r> - sum_l a_l <W_k W_l, c_r (s_r^2)^T>,
//   dW_k = sum_r a_r[k] dV_r diag(s_r).
// Without demodulation d = 1, c = 0 and the squared terms vanish (the q and ds2 kernels,
// TJ_DA2 and the weight kernel's l-terms are not run).
//
// Cost, in dense GEMMs of R x O x I (R = B * T): forward K; dx, ds and the gz term of da
// together K; with demodulation da K^2 more; dbank K (+ K^2); plus, with demodulation,
// R * O * I * (K + 2) CUDA-core FMAs each for d and the ds term. The squared
// operands (s^2, W_k W_l, c) are rounded to the input dtype in the tiles, like x and W,
// except in float16 with demodulation, where the forward and the weight kernel keep their
// tiles in fp32 (TileOf below: x s and s^2 can pass 65504) and run on the CUDA cores.
// Per-row outputs (ds_rows, da_rows) are fp32 and summed over t by the caller where the
// conditioning is per sample; da partials per column tile are summed by the caller too.
// Nothing is reduced across CTAs with atomics: every path is deterministic.
#pragma once
#include "launch.cuh"

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

// The element type of the shared tiles and the GEMM engine for data of type T. float16 with
// demodulation (docs/numerics.md): the row operands x s (forward) and s x, s^2 (the bank
// gradient) can pass 65504 although every output stays bounded, so the kernels that form
// them (the forward, the weight kernel) run on fp32 tiles and the FMA engine there (exact
// fp32, CUDA cores); their other jobs, the other dtypes and float16 without demodulation
// keep T's tiles and the tensor cores.
template <typename T, bool F32> struct TileOf { using type = T; };
template <> struct TileOf<__half, true> { using type = float; };

// ------------------------------------------------------------------ loaders

// The row-side operand of a term:
//     src[r, j] * sty[r / s_div, j]^spow * a[r / a_div, ka] * a[r / a_div, la] * mult
// (src, sty, a optional: NULL or an index < 0 means 1). `ld` is src's row stride and also
// the styles' (styles are only used where the inner dimension is I).
template <typename T, typename S>
struct RowOperand {
  const S* src = nullptr;
  int64_t ld = 0;
  const T* sty = nullptr;
  int64_t s_div = 1;
  int spow = 1;
  const T* coef = nullptr;
  int64_t a_div = 1, K = 1;
  int ka = -1, la = -1;
  float mult = 1.f;
  bool vec_src = false, vec_sty = false;

  // src[r, j] (row stride ld, which the styles share); vector loads where aligned
  __device__ __forceinline__ void set_src(const void* s, int64_t ld_) {
    src = static_cast<const S*>(s);
    ld = ld_;
    vec_src = src && aligned16(src) && (ld % Vec<T>::N == 0);
  }
  // times p's styles to the power pw (after set_src or ld: the same row stride)
  __device__ __forceinline__ void set_styles(const MwModLinearParams& p, int pw) {
    sty = static_cast<const T*>(p.styles);
    s_div = p.s_div;
    spow = pw;
    vec_sty = sty && aligned16(sty) && (ld % Vec<T>::N == 0);
  }
  // times a[r, ka] of p's coefficients (and a[r, la], la >= 0; ka < 0: not a_k)
  __device__ __forceinline__ void set_coef(const MwModLinearParams& p, int ka_) {
    coef = static_cast<const T*>(p.coeffs);
    a_div = p.a_div;
    K = p.K;
    ka = ka_;
  }

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

// smem tile (element type TT: T, or float for float16 with demodulation, see TileOf) of the
// row operand for rows [r0, r0 + RT) x columns [j0, j0 + CT), stored [r][j] (rows >= R and
// columns >= J zero).
template <typename TT, typename T, typename S, int RT, int CT, int NT>
__device__ __forceinline__ void load_row_tile(TT* __restrict__ smem, int lds, const RowOperand<T, S>& op,
                                              int64_t r0, int64_t R, int64_t j0, int64_t J) {
  constexpr int V = Vec<TT>::N;  // the tile's vector; the loads' alignment (vec_*) is checked for T's, wider
  fill_tile<TT, RT, CT, NT>(smem, lds, [&](int rr, int cc, float* acc) {
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
// of (o, i), zero outside O x I, in a tile of TT (as load_row_tile). wk, wl point at the bank
// entries [O, I]; `vec`: aligned for T's vector width.
template <typename TT, typename T, int RT, int CT, int NT>
__device__ __forceinline__ void load_bank_tile(TT* __restrict__ smem, int lds, const T* __restrict__ wk,
                                               const T* __restrict__ wl, int64_t O, int64_t I, int64_t o0,
                                               int64_t i0, bool vec) {
  constexpr int V = Vec<TT>::N;
  fill_tile<TT, RT, CT, NT>(smem, lds, [&](int oo, int ii, float* acc) {
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

}  // namespace mw
