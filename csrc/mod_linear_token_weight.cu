// Per-token conditioning, the bank gradient (see mod_linear_token.cuh for the maths):
//
//   _mod_linear_token_weight_kernel   dbank[k] for a 64 x 64 (o, i) tile, over all rows:
//       dW_k = sum_r a_k gz[r] (s x)[r]^T  -  sum_l W_l * (sum_r a_k a_l c[r] (s^2)[r]^T)
#include "mod_linear_token.cuh"

namespace mw {

// ------------------------------------------------------------------ the weight kernel
//
// CTA (i tile, o tile, bank entry k): dbank[k, o0:o0+64, i0:i0+64] over every row. Group
// g = -1 accumulates  sum_r (a_k gz)[r, o] (s x)[r, i];  with demodulation, group l
// accumulates  sum_r (a_k a_l c)[r, o] (s^2)[r, i]  and is folded as  -= W_l * acc.
// Both operands are row tiles [r][o] and [r][i] (A column-major in the engine's terms).
// TT: the tiles' element type (TileOf: float for float16 with demodulation, where s x and s^2
// can pass 65504).
template <typename T, typename TT = T>
__global__ void __launch_bounds__(TokCfg::NT, 1) _mod_linear_token_weight_kernel(const MwModLinearParams p) {
  using C = TokCfg;
  using Eng = typename EngineFor<TT, C::WM, C::WN, C::FM, C::FN, true, false>::type;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, LDC = C::LDC;
  constexpr int LDA = Ld<TT, BM>::value, LDB = Ld<TT, BN>::value;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  TT* As = reinterpret_cast<TT*>(smem_raw);                                // [BK][LDA] (r, o)
  TT* Bs = reinterpret_cast<TT*>(smem_raw + C::a_bytes<TT>());              // [BK][LDB] (r, i)
  float* Cs = reinterpret_cast<float*>(smem_raw + C::a_bytes<TT>() + C::b_bytes<TT>());  // [BM][LDC]
  float* Tot = Cs + BM * LDC;  // [BM * BN] with demodulation: the running total of the groups

  const int64_t I = p.I, O = p.O, K = p.K, R = p.B * p.T;
  const int64_t i0 = (int64_t)blockIdx.x * BN, o0 = (int64_t)blockIdx.y * BM;
  const int k = (int)blockIdx.z;
  const T* bank = static_cast<const T*>(p.bank);

  RowOperand<T, T> ga;  // (a_k gz)[r, o]
  ga.set_src(p.gz, O);
  ga.set_coef(p, k);
  RowOperand<T, T> xb;  // (s x)[r, i]
  xb.set_src(p.x, I);
  xb.set_styles(p, 1);
  RowOperand<T, float> ca;  // (a_k a_l c)[r, o], l per group
  ca.set_src(p.c, O);
  ca.set_coef(p, k);
  RowOperand<T, T> s2;  // (s^2)[r, i]
  s2.ld = I;
  s2.set_styles(p, 2);

  const int ngroups = p.c ? (int)K : 0;
  for (int grp = -1; grp < ngroups; ++grp) {
    Eng eng;
    eng.zero();
    ca.la = grp;
    for (int64_t r0 = 0; r0 < R; r0 += BK) {
      __syncthreads();
      if (grp < 0) {
        load_row_tile<TT, T, T, BK, BM, NT>(As, LDA, ga, r0, R, o0, O);
        load_row_tile<TT, T, T, BK, BN, NT>(Bs, LDB, xb, r0, R, i0, I);
      } else {
        load_row_tile<TT, T, float, BK, BM, NT>(As, LDA, ca, r0, R, o0, O);
        load_row_tile<TT, T, T, BK, BN, NT>(Bs, LDB, s2, r0, R, i0, I);
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

}  // namespace mw

extern "C" {

int mw_mod_linear_token_weight(const MwModLinearParams* p, void* stream) {
  if (int rc = mw::check_entry(p, __func__, true, p && p->gz && p->dbank, "needs gz and dbank")) return rc;
  const dim3 grid((unsigned)mw::cdiv(p->I, mw::TokCfg::BN), (unsigned)mw::cdiv(p->O, mw::TokCfg::BM), (unsigned)p->K);
  const bool f32 = p->c != nullptr;  // with demodulation: mw::TileOf<T, true>
  auto kernel_of = [f32](auto t) {
    using T = MW_ELEM(t);
    using TT = typename mw::TileOf<T, true>::type;
    return f32 ? mw::_mod_linear_token_weight_kernel<T, TT> : mw::_mod_linear_token_weight_kernel<T>;
  };
  auto smem_of = [f32](auto t) {
    using T = MW_ELEM(t);
    return f32 ? mw::TokCfg::smem_tot<typename mw::TileOf<T, true>::type>() : mw::TokCfg::smem_tot<T>();
  };
  return mw::launch_typed(kernel_of, grid, mw::TokCfg::NT, smem_of, p, stream, __func__);
}

}  // extern "C"
