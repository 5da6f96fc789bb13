// The per-sample GEMM shared by the forward (mod_linear_fwd.cu) and the input gradient
// (mod_linear_bwd.cu): one implementation, the two kernels differ in which operand is raw,
// what folds into the B tile and the epilogue (`DX` below).
//
// One CTA per (128 rows of t, 128 output columns n, sample b); 8 warps in a 2 x 4 grid, each
// 64 x 32 of the output. Main loop over the reduction dimension j in chunks of 32:
//
//   forward (DX = false), n = o, j = i:  y = d * (x @ (M_b s_b)^T) + bias_b
//     A tile [t][i] = x[b, t, i]                           (raw: cp.async, STAGES deep)
//     B tile [o][i] = s[b, i] * sum_k a[b, k] W[k, o, i]   (styles and mixing in the B load)
//     epilogue: times d[b, o], plus bias_b[o]
//   dx (DX = true), n = i, j = o:        dx = s * (g @ (d_b M_b))
//     A tile [t][o] = g[b, t, o]                           (raw: cp.async, STAGES deep)
//     B tile [o][i] = d[b, o] * sum_k a[b, k] W[k, o, i]   (demodulation and mixing in the B load)
//     epilogue: times s[b, i]
//
// then the tensor-core (fp16/bf16) or FMA (fp32) step. The fold sits on the B side so that the
// A tile is a plain copy: while the B tile of chunk c is mixed in registers, the copies of
// chunks c+1 .. c+STAGES-1 are in flight. Unaligned rows take the plain load into the same
// stages. The kernels are __launch_bounds__(256, 2): at most 128 registers, two CTAs per SM.
#pragma once
#include "launch.cuh"

namespace mw {

struct SampleGemmCfg {
  static constexpr int WM = 2, WN = 4, FM = 4, FN = 2, BK = 32, STAGES = 3;
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16, NT = WM * WN * 32;
  static constexpr int LDC = BN + 4;
  template <typename T> static constexpr int lda() { return LdAsync<T, BK>::value; }
  // B is [BN][BK] (o, i) in the forward, [BK][BN] (o, i) in dx
  template <typename T, bool DX> static constexpr int ldb() { return DX ? Ld<T, BN>::value : Ld<T, BK>::value; }
  template <typename T, bool DX> static constexpr int smem() {
    constexpr int stage = (STAGES * BM * lda<T>() + (DX ? BK : BN) * ldb<T, DX>()) * (int)sizeof(T);
    constexpr int ctile = BM * LDC * 4;
    return stage > ctile ? stage : ctile;
  }
};

// The body of _mod_linear_fwd_kernel<T> (DX = false) and _mod_linear_bwd_dx_kernel<T> (DX = true).
template <typename T, bool DX>
__device__ __forceinline__ void sample_gemm(const MwModLinearParams& p) {
  using C = SampleGemmCfg;
  // B stored [o][i]: [n][j] (B_COL) in the forward, [j][n] in dx
  using Eng = typename EngineFor<T, C::WM, C::WN, C::FM, C::FN, false, !DX>::type;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, S = C::STAGES;
  constexpr int LDA = C::lda<T>(), LDB = C::ldb<T, DX>(), LDC = C::LDC;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);  // [S][BM][LDA]  (t, j)
  T* Bs = As + S * BM * LDA;                // (o, i)
  float* Cs = reinterpret_cast<float*>(smem_raw);  // [BM][LDC], after the main loop

  const int64_t I = p.I, O = p.O, Tn = p.T, K = p.K;
  const int64_t N = DX ? I : O, J = DX ? O : I;  // output columns, reduction
  const int64_t n0 = (int64_t)blockIdx.x * BN;
  const int64_t t0 = (int64_t)blockIdx.y * BM;
  const int64_t b = blockIdx.z;
  const void* a_raw = DX ? p.g : p.x;
  const T* a = static_cast<const T*>(a_raw) + (b * Tn + t0) * J;
  const T* bank = static_cast<const T*>(p.bank) + (DX ? n0 : n0 * I);
  const T* coef = p.coeffs ? static_cast<const T*>(p.coeffs) + b * K : nullptr;
  // the B-side fold: the styles (forward, per column i) or the demodulation (dx, per row o)
  const T* sty = (!DX && p.styles) ? static_cast<const T*>(p.styles) + b * I : nullptr;
  const float* dvec = (DX && p.d) ? p.d + b * O : nullptr;
  const bool vec_a = aligned16(a_raw) && (J % V == 0);
  const bool vec_w = aligned16(p.bank) && (I % V == 0);
  const int rows_t = (int)(Tn - t0 < BM ? Tn - t0 : BM);
  const int rows_n = (int)(N - n0 < BN ? N - n0 : BN);
  const int nchunks = (int)((J + BK - 1) / BK);

  // A chunk c into stage c % S: cp.async when rows are 16-byte aligned, else a plain load
  // (the barriers below order both); one commit group per chunk, empty past the end
  auto issue = [&](int c) {
    if (c < nchunks) {
      const int64_t j0 = (int64_t)c * BK;
      const int cols = (int)(J - j0 < BK ? J - j0 : BK);
      T* dst = As + (c % S) * BM * LDA;
      if (vec_a) async_tile<T, BM, BK, NT>(dst, LDA, a + j0, J, rows_t, cols);
      else load_tile<T, BM, BK, NT>(dst, LDA, a + j0, J, rows_t, cols, 1, 0, nullptr, nullptr, nullptr, false);
    }
    cp_async_commit();
  };

  Eng eng;
  eng.zero();
#pragma unroll
  for (int c = 0; c < S - 1; ++c) issue(c);
  for (int c = 0; c < nchunks; ++c) {
    const int64_t j0 = (int64_t)c * BK;
    const int cols = (int)(J - j0 < BK ? J - j0 : BK);
    __syncthreads();  // chunk c-1 is consumed: Bs and A stage (c-1) % S are free
    issue(c + S - 1);
    if constexpr (DX)
      load_tile<T, BK, BN, NT>(Bs, LDB, bank + j0 * I, I, cols, rows_n, (int)K, O * I, coef, nullptr, nullptr,
                               vec_w, dvec ? dvec + j0 : nullptr);
    else
      load_tile<T, BN, BK, NT>(Bs, LDB, bank + j0, I, rows_n, cols, (int)K, O * I, coef, sty ? sty + j0 : nullptr,
                               nullptr, vec_w);
    cp_async_wait<S - 1>();  // this thread's copies of chunk c have landed
    __syncthreads();         // ... and everyone's, and Bs is written
    eng.template chunk<BK>(As + (c % S) * BM * LDA, LDA, Bs, LDB);
  }
  cp_async_wait<0>();
  __syncthreads();  // Cs aliases the staging tiles
  eng.store(Cs, LDC);
  __syncthreads();

  T* out = static_cast<T*>(DX ? p.dx : p.y);
  const T* escale_t = (DX && p.styles) ? static_cast<const T*>(p.styles) + b * I : nullptr;  // dx: s
  const float* escale_f = (!DX && p.d) ? p.d + b * O : nullptr;                              // forward: d
  const float* bptr = (!DX && p.bias) ? p.bias + b * p.bias_stride_b : nullptr;
#pragma unroll 4
  for (int e = (int)threadIdx.x; e < BM * BN; e += NT) {
    const int r = e / BN, cc = e % BN;
    const int64_t t = t0 + r, n = n0 + cc;
    if (t < Tn && n < N) {
      float v = Cs[r * LDC + cc];
      if (escale_t) v *= to_f(escale_t[n]);
      if (escale_f) v *= escale_f[n];
      if (bptr) v += bptr[n];
      out[(b * Tn + t) * N + n] = from_f<T>(v);
    }
  }
}

// The launch of either kernel (kernel_of as for launch_typed): grid (N / BN, T / BM, B) x 256,
// its dynamic shared memory.
template <bool DX, typename KernelOf>
int launch_sample_gemm(KernelOf&& kernel_of, const MwModLinearParams* p, void* stream, const char* who) {
  using C = SampleGemmCfg;
  const dim3 grid((unsigned)cdiv(DX ? p->I : p->O, C::BN), (unsigned)cdiv(p->T, C::BM), (unsigned)p->B);
  return launch_typed(kernel_of, grid, C::NT, [](auto t) { return C::smem<MW_ELEM(t), DX>(); }, p, stream, who);
}

}  // namespace mw
