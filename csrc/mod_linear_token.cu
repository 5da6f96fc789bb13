// Per-token conditioning, the row kernels (see mod_linear_token.cuh for the maths):
//
//   _mod_linear_token_rows_kernel<JOB>   a 64 x 64 tile of a row-indexed output: TJ_Z the
//       forward, TJ_DX dx / ds_rows / the gz term of da, TJ_DA2 the demodulation term of da
//   _mod_linear_token_prep_kernel        gz = g d,  c = g (y - bias_r) d^2   (elementwise)
#include "mod_linear_token.cuh"

namespace mw {

// ------------------------------------------------------------------ the row kernels
//
// CTA (row tile, column tile): rows r0 .. r0 + 63 of R = B * T, columns n0 .. n0 + 63 of N
// (N = O for TJ_Z, whose inner dimension is I; N = I for the others, inner O).
// Grouped jobs run one group per bank entry k (each its own accumulator, reduced per row
// against a row-wise factor after the group): TJ_DA2, and TJ_DX when da_rows is wanted (its
// groups' accumulators W_k^T gz are then also added, times a_k, into the running total
// Tot for dx and ds: one pass gives both). The others run one group summing every term.
// TT: the tiles' element type (TileOf: float for the float16 forward with demodulation).
template <typename T, int JOB, typename TT = T>
__global__ void __launch_bounds__(TokCfg::NT, 1) _mod_linear_token_rows_kernel(const MwModLinearParams p) {
  using C = TokCfg;
  constexpr bool INNER_I = (JOB == TJ_Z);
  constexpr bool C_SRC = (JOB == TJ_DA2);  // the fp32 c is the row operand
  constexpr bool DA2 = (JOB == TJ_DA2);
  using S = typename std::conditional<C_SRC, float, T>::type;
  // B tile stored [o][i]: [n][j] (B_COL) when the inner dimension is I, [j][n] when it is O
  using Eng = typename EngineFor<TT, C::WM, C::WN, C::FM, C::FN, false, INNER_I>::type;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, LDC = C::LDC;
  constexpr int LDA = Ld<TT, BK>::value;
  constexpr int LDB = INNER_I ? Ld<TT, BK>::value : Ld<TT, BN>::value;
  constexpr int V = Vec<T>::N;
  constexpr bool RAW16 = sizeof(TT) == 2;  // 16-bit tiles (then TT is T): raw bank tiles by cp.async
  extern __shared__ __align__(128) unsigned char smem_raw[];
  TT* As = reinterpret_cast<TT*>(smem_raw);                                // [BM][LDA] (r, j)
  TT* Bs = reinterpret_cast<TT*>(smem_raw + C::a_bytes<TT>());              // (o, i)
  float* Cs = reinterpret_cast<float*>(smem_raw + C::a_bytes<TT>() + C::b_bytes<TT>());  // [BM][LDC]
  float* Tot = Cs + BM * LDC;  // [BM * BN], TJ_DX only (the launcher sizes the smem for it)

  const int64_t I = p.I, O = p.O, K = p.K, R = p.B * p.T;
  const int64_t N = INNER_I ? O : I, J = INNER_I ? I : O;
  const int64_t r0 = (int64_t)blockIdx.x * BM, n0 = (int64_t)blockIdx.y * BN;
  const T* bank = static_cast<const T*>(p.bank);
  const T* coef = static_cast<const T*>(p.coeffs);
  const T* sty = static_cast<const T*>(p.styles);
  const bool vec_w = aligned16(p.bank) && (I % V == 0);

  RowOperand<T, S> op;  // x s (Z), gz (DX), c (DA2); the row factors are set per term below
  op.set_src(JOB == TJ_Z ? p.x : C_SRC ? static_cast<const void*>(p.c) : p.gz, J);
  if constexpr (JOB == TJ_Z) op.set_styles(p, 1);
  op.set_coef(p, -1);

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
        const bool async_w = RAW16 && !wl && vec_w;
        for (int64_t j0 = 0; j0 < J; j0 += BK) {
          __syncthreads();  // the previous chunk is consumed
          if constexpr (RAW16) if (async_w) {
            if constexpr (INNER_I) {  // [o][i]: rows o of [n0, n0 + BN), columns i of [j0, j0 + BK)
              async_tile<T, BN, BK, NT>(Bs, LDB, wk + n0 * I + j0, I, (int)(O - n0 < BN ? O - n0 : BN),
                                        (int)(I - j0 < BK ? I - j0 : BK));
            } else {  // [o][i]: rows o of [j0, j0 + BK), columns i of [n0, n0 + BN)
              async_tile<T, BK, BN, NT>(Bs, LDB, wk + j0 * I + n0, I, (int)(O - j0 < BK ? O - j0 : BK),
                                        (int)(I - n0 < BN ? I - n0 : BN));
            }
            cp_async_commit();
          }
          load_row_tile<TT, T, S, BM, BK, NT>(As, LDA, op, r0, R, j0, J);
          if (!async_w) {
            if constexpr (INNER_I) {
              load_bank_tile<TT, T, BN, BK, NT>(Bs, LDB, wk, wl, O, I, n0, j0, vec_w);  // [o][i]
            } else {
              load_bank_tile<TT, T, BK, BN, NT>(Bs, LDB, wk, wl, O, I, j0, n0, vec_w);  // [o][i]
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

// ------------------------------------------------------------------ launchers

template <int JOB>
static int launch_rows(const MwModLinearParams* p, void* stream, const char* who) {
  const dim3 grid((unsigned)cdiv(p->B * p->T, TokCfg::BM), (unsigned)cdiv(JOB == TJ_Z ? p->O : p->I, TokCfg::BN));
  const bool f32 = JOB == TJ_Z && p->d != nullptr;  // the forward with demodulation: TileOf<T, true>
  auto kernel_of = [f32](auto t) {
    using T = MW_ELEM(t);
    using TT = typename TileOf<T, JOB == TJ_Z>::type;
    return f32 ? _mod_linear_token_rows_kernel<T, JOB, TT> : _mod_linear_token_rows_kernel<T, JOB>;
  };
  auto smem_of = [f32](auto t) {
    using T = MW_ELEM(t);
    using TT = typename TileOf<T, JOB == TJ_Z>::type;
    return JOB == TJ_DX ? TokCfg::smem_tot<T>() : f32 ? TokCfg::smem<TT>() : TokCfg::smem<T>();
  };
  return launch_typed(kernel_of, grid, TokCfg::NT, smem_of, p, stream, who);
}

static int launch_prep(const MwModLinearParams* p, void* stream, const char* who) {
  const int64_t blocks = cdiv(p->B * p->T * p->O, 256);
  const dim3 grid((unsigned)(blocks < 65535 * 8 ? blocks : 65535 * 8));  // a grid-stride loop past that
  return launch_typed([](auto t) { return _mod_linear_token_prep_kernel<MW_ELEM(t)>; }, grid, 256, p, stream, who);
}

}  // namespace mw

extern "C" {

int mw_mod_linear_token_tile(void) { return MW_TOKEN_TILE; }

int mw_mod_linear_token_forward(const MwModLinearParams* p, void* stream) {
  if (int rc = mw::check_entry(p, __func__, true, p && p->y, "y (the output) is NULL")) return rc;
  return mw::launch_rows<mw::TJ_Z>(p, stream, __func__);
}

int mw_mod_linear_token_prep(const MwModLinearParams* p, void* stream) {
  const bool ok = p && p->g && p->d && p->gz && (!p->c || p->y);
  if (int rc = mw::check_entry(p, __func__, true, ok, "needs g, d, gz, and y for c")) return rc;
  return mw::launch_prep(p, stream, __func__);
}

int mw_mod_linear_token_dx(const MwModLinearParams* p, void* stream) {
  const bool ok = p && p->gz && (p->dx || p->ds_rows || p->da_rows);
  if (int rc = mw::check_entry(p, __func__, true, ok, "needs gz and at least one of dx, ds_rows, da_rows")) return rc;
  if (int rc = mw::need(!p->da_rows || p->coeffs, __func__, "da_rows needs coeffs")) return rc;
  return mw::launch_rows<mw::TJ_DX>(p, stream, __func__);
}

int mw_mod_linear_token_da_demod(const MwModLinearParams* p, void* stream) {
  const bool ok = p && p->c && p->da_rows && p->coeffs;
  if (int rc = mw::check_entry(p, __func__, true, ok, "needs c, da_rows and coeffs")) return rc;
  return mw::launch_rows<mw::TJ_DA2>(p, stream, __func__);
}

}  // extern "C"
