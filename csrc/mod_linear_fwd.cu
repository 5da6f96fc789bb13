// Forward pass of the modulated / mixture linear op, per-sample conditioning:
//
//   _mod_linear_demod_kernel   d[b, o] = rsqrt(sum_i (sum_k a[b,k] W[k,o,i] * s[b,i])^2 + eps)
//   _mod_linear_fwd_kernel     y[b, t, o] = d[b,o] * sum_i (x[b,t,i] s[b,i]) M_b[o,i] + bias_b[o]
//                             with M_b = sum_k a[b,k] W_k mixed in the B-tile load
#include "common.cuh"

namespace mw {

// ------------------------------------------------------------------ demodulation pre-pass
//
// Block: 32 output rows x 8 samples (256 threads, thread (o = tid % 32, b = tid / 32)).
// For each 32-wide chunk of I the block stages W_k[o-tile, i-chunk] in shared memory one
// k at a time and every thread mixes its row of M_b in registers. Reads the bank
// ceil(B / 8) times (L2), B*K*O*I FMAs: small next to the GEMM it feeds.
template <typename T>
__global__ void __launch_bounds__(256) _mod_linear_demod_kernel(const MwModLinearParams p) {
  __shared__ float Wt[32][33];
  const int tid = (int)threadIdx.x;
  const int ol = tid % 32, bl = tid / 32;
  const int64_t O = p.O, I = p.I, B = p.B;
  const int K = (int)p.K;
  const int64_t obase = (int64_t)blockIdx.x * 32;
  const int64_t o = obase + ol;
  const int64_t b = (int64_t)blockIdx.y * 8 + bl;
  const bool bvalid = b < B;
  const T* bank = static_cast<const T*>(p.bank);
  const T* coeffs = static_cast<const T*>(p.coeffs);
  const T* styles = static_cast<const T*>(p.styles);
  float acc = 0.f;
  for (int64_t i0 = 0; i0 < I; i0 += 32) {
    float mix[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) mix[j] = 0.f;
    for (int k = 0; k < K; ++k) {
      __syncthreads();  // the previous Wt is consumed
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = tid + 256 * j;
        const int r = e / 32, cc = e % 32;
        const int64_t oo = obase + r, ii = i0 + cc;
        Wt[r][cc] = (oo < O && ii < I) ? to_f(bank[((int64_t)k * O + oo) * I + ii]) : 0.f;
      }
      __syncthreads();
      const float ak = (coeffs && bvalid) ? to_f(coeffs[b * p.K + k]) : 1.f;
#pragma unroll
      for (int j = 0; j < 32; ++j) mix[j] = fmaf(ak, Wt[ol][j], mix[j]);
    }
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int64_t i = i0 + j;
      const float sv = (i < I && bvalid) ? (styles ? to_f(styles[b * I + i]) : 1.f) : 0.f;
      const float v = mix[j] * sv;
      acc = fmaf(v, v, acc);
    }
  }
  if (bvalid && o < O) p.d[b * O + o] = rsqrtf(acc + p.eps);
}

// ------------------------------------------------------------------ forward GEMM
//
// One CTA per (128 rows of t, 128 columns of o, sample b); 8 warps in a 2 x 4 grid, each
// 64 x 32 of the output. Main loop over I in chunks of 32, y = x @ (M_b s_b)^T:
//   A tile [t][i] = x[b, t, i]                           (raw: cp.async, STAGES deep)
//   B tile [o][i] = s[b, i] * sum_k a[b, k] W[k, o, i]   (styles and mixing in the B load)
// then the tensor-core (fp16/bf16) or FMA (fp32) step. Epilogue: demodulation and bias.
// The styles sit on the B side so that the A tile is a plain copy: while the B tile of chunk
// c is mixed in registers, the copies of chunks c+1 .. c+STAGES-1 are in flight.
// __launch_bounds__(256, 2): at most 128 registers, two CTAs per SM.
struct FwdCfg {
  static constexpr int WM = 2, WN = 4, FM = 4, FN = 2, BK = 32, STAGES = 3;
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16, NT = WM * WN * 32;
  static constexpr int LDC = BN + 4;
  template <typename T> static constexpr int smem() {
    constexpr int lda = LdAsync<T, BK>::value, ldb = Ld<T, BK>::value;
    constexpr int stage = (STAGES * BM * lda + BN * ldb) * (int)sizeof(T);
    constexpr int ctile = BM * LDC * 4;
    return stage > ctile ? stage : ctile;
  }
};

template <typename T>
__global__ void __launch_bounds__(FwdCfg::NT, 2) _mod_linear_fwd_kernel(const MwModLinearParams p) {
  using C = FwdCfg;
  using Eng = typename EngineFor<T, C::WM, C::WN, C::FM, C::FN, false, true>::type;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, S = C::STAGES;
  constexpr int LDA = LdAsync<T, BK>::value, LDB = Ld<T, BK>::value, LDC = C::LDC;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);  // [S][BM][LDA]  (t, i)
  T* Bs = As + S * BM * LDA;                // [BN][LDB]     (o, i)
  float* Cs = reinterpret_cast<float*>(smem_raw);  // [BM][LDC], after the main loop

  const int64_t I = p.I, O = p.O, Tn = p.T, K = p.K;
  const int64_t o0 = (int64_t)blockIdx.x * BN;
  const int64_t t0 = (int64_t)blockIdx.y * BM;
  const int64_t b = blockIdx.z;
  const T* x = static_cast<const T*>(p.x) + (b * Tn + t0) * I;
  const T* bank = static_cast<const T*>(p.bank) + o0 * I;
  const T* coef = p.coeffs ? static_cast<const T*>(p.coeffs) + b * K : nullptr;
  const T* sty = p.styles ? static_cast<const T*>(p.styles) + b * I : nullptr;
  const bool vec_x = aligned16(p.x) && (I % V == 0);
  const bool vec_w = aligned16(p.bank) && (I % V == 0);
  const int rows_t = (int)(Tn - t0 < BM ? Tn - t0 : BM);
  const int rows_o = (int)(O - o0 < BN ? O - o0 : BN);
  const int nchunks = (int)((I + BK - 1) / BK);

  // A chunk c into stage c % S: cp.async when rows are 16-byte aligned, else a plain load
  // (the barriers below order both); one commit group per chunk, empty past the end
  auto issue = [&](int c) {
    if (c < nchunks) {
      const int64_t i0 = (int64_t)c * BK;
      const int cols = (int)(I - i0 < BK ? I - i0 : BK);
      T* dst = As + (c % S) * BM * LDA;
      if (vec_x) async_tile<T, BM, BK, NT>(dst, LDA, x + i0, I, rows_t, cols);
      else load_tile<T, BM, BK, NT>(dst, LDA, x + i0, I, rows_t, cols, 1, 0, nullptr, nullptr, nullptr, false);
    }
    cp_async_commit();
  };

  Eng eng;
  eng.zero();
#pragma unroll
  for (int c = 0; c < S - 1; ++c) issue(c);
  for (int c = 0; c < nchunks; ++c) {
    const int64_t i0 = (int64_t)c * BK;
    const int cols = (int)(I - i0 < BK ? I - i0 : BK);
    __syncthreads();  // chunk c-1 is consumed: Bs and A stage (c-1) % S are free
    issue(c + S - 1);
    load_tile<T, BN, BK, NT>(Bs, LDB, bank + i0, I, rows_o, cols, (int)K, O * I, coef, sty ? sty + i0 : nullptr,
                             nullptr, vec_w);
    cp_async_wait<S - 1>();  // this thread's copies of chunk c have landed
    __syncthreads();         // ... and everyone's, and Bs is written
    eng.template chunk<BK>(As + (c % S) * BM * LDA, LDA, Bs, LDB);
  }
  cp_async_wait<0>();
  __syncthreads();  // Cs aliases the staging tiles
  eng.store(Cs, LDC);
  __syncthreads();

  T* y = static_cast<T*>(p.y);
  const float* dptr = p.d ? p.d + b * O : nullptr;
  const float* bptr = p.bias ? p.bias + b * p.bias_stride_b : nullptr;
#pragma unroll 4
  for (int e = (int)threadIdx.x; e < BM * BN; e += NT) {
    const int r = e / BN, cc = e % BN;
    const int64_t t = t0 + r, o = o0 + cc;
    if (t < Tn && o < O) {
      float v = Cs[r * LDC + cc];
      if (dptr) v *= dptr[o];
      if (bptr) v += bptr[o];
      y[(b * Tn + t) * O + o] = from_f<T>(v);
    }
  }
}

// ------------------------------------------------------------------ launchers

template <typename T>
static int launch_demod(const MwModLinearParams* p, cudaStream_t stream) {
  dim3 grid((unsigned)cdiv(p->O, 32), (unsigned)cdiv(p->B, 8));
  _mod_linear_demod_kernel<T><<<grid, 256, 0, stream>>>(*p);
  return check_launch("mw_mod_linear_demod");
}

template <typename T>
static int launch_fwd(const MwModLinearParams* p, cudaStream_t stream) {
  const char* who = "mw_mod_linear_forward";
  constexpr int smem = FwdCfg::smem<T>();
  if (int rc = prepare_smem((const void*)_mod_linear_fwd_kernel<T>, smem, p->device, who)) return rc;
  dim3 grid((unsigned)cdiv(p->O, FwdCfg::BN), (unsigned)cdiv(p->T, FwdCfg::BM), (unsigned)p->B);
  _mod_linear_fwd_kernel<T><<<grid, FwdCfg::NT, smem, stream>>>(*p);
  return check_launch(who);
}

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, (const void*)_mod_linear_demod_kernel<float>);
  if (e != cudaSuccess) cudaGetLastError();  // clear it
  return e;
}

}  // namespace mw

extern "C" {

int mw_mod_linear_demod(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  if (int rc = check_common(p, "mw_mod_linear_demod")) return rc;
  if (!p->d) {
    set_error("mw_mod_linear_demod: `d` (the output) must be a device pointer; got 0");
    return MW_EINVAL;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_demod<float>(p, s);
    case MW_F16: return launch_demod<__half>(p, s);
    case MW_BF16: return launch_demod<__nv_bfloat16>(p, s);
  }
  return MW_EINVAL;
}

int mw_mod_linear_forward(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  if (int rc = check_common(p, "mw_mod_linear_forward")) return rc;
  if (!p->y) {
    set_error("mw_mod_linear_forward: `y` (the output) must be a device pointer; got 0");
    return MW_EINVAL;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_fwd<float>(p, s);
    case MW_F16: return launch_fwd<__half>(p, s);
    case MW_BF16: return launch_fwd<__nv_bfloat16>(p, s);
  }
  return MW_EINVAL;
}

}  // extern "C"
