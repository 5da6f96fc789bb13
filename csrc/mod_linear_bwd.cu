// Backward pass, the row statistics and the input gradient (per-sample conditioning):
//
//   _mod_linear_bwd_stats_kernel  gsum[b, o] = sum_t g[b,t,o]                  (bias grads)
//                                c[b, o]    = d^2 * sum_t g[b,t,o] (y[b,t,o] - bias_b[o])
//                                           = dd_b[o] * d_b[o]^3   (z = (y - bias) / d)
//   _mod_linear_bwd_dx_kernel     dx[b, t, i] = s[b,i] * sum_o g[b,t,o] (d[b,o] M_b[o,i])
//                                with d_b M_b = d * sum_k a[b,k] W_k formed in the B-tile load
#include "common.cuh"

namespace mw {

// ------------------------------------------------------------------ row statistics
//
// Block: 32 columns of o x 8 row groups of t (256 threads) for one sample; each thread
// strides over t, then the 8 partial sums are added in a fixed order (deterministic).
template <typename T>
__global__ void __launch_bounds__(256) _mod_linear_bwd_stats_kernel(const MwModLinearParams p) {
  __shared__ float sg[8][32];
  __shared__ float sz[8][32];
  const int tid = (int)threadIdx.x;
  const int ol = tid % 32, tg = tid / 32;
  const int64_t O = p.O, Tn = p.T;
  const int64_t o = (int64_t)blockIdx.x * 32 + ol;
  const int64_t b = blockIdx.y;
  const T* g = static_cast<const T*>(p.g);
  const T* y = static_cast<const T*>(p.y);
  const bool want_c = p.c != nullptr;
  float G = 0.f, S = 0.f;
  if (o < O) {
    const float bb = p.bias ? p.bias[b * p.bias_stride_b + o] : 0.f;
#pragma unroll 4
    for (int64_t t = tg; t < Tn; t += 8) {
      const int64_t off = (b * Tn + t) * O + o;
      const float gv = to_f(g[off]);
      G += gv;
      if (want_c) S = fmaf(gv, to_f(y[off]) - bb, S);
    }
  }
  sg[tg][ol] = G;
  sz[tg][ol] = S;
  __syncthreads();
  if (tg == 0 && o < O) {
    float gs = 0.f, zs = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      gs += sg[j][ol];
      zs += sz[j][ol];
    }
    if (p.gsum) p.gsum[b * O + o] = gs;
    if (want_c) {
      const float dv = p.d[b * O + o];
      p.c[b * O + o] = zs * dv * dv;
    }
  }
}

// ------------------------------------------------------------------ input gradient GEMM
//
// One CTA per (128 rows of t, 128 columns of i, sample b), the forward's warp layout.
// Main loop over O in chunks of 32, dx = g @ (d_b M_b) then times s:
//   A tile [t][o] = g[b, t, o]                           (raw: cp.async, STAGES deep)
//   B tile [o][i] = d[b, o] * sum_k a[b, k] W[k, o, i]   (demodulation and mixing in the B load)
// Epilogue: times s[b, i]. As in the forward, the fold sits on the B side so that the A
// tile is a plain copy in flight while B is mixed; __launch_bounds__(256, 2).
struct DxCfg {
  static constexpr int WM = 2, WN = 4, FM = 4, FN = 2, BK = 32, STAGES = 3;
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16, NT = WM * WN * 32;
  static constexpr int LDC = BN + 4;
  template <typename T> static constexpr int smem() {
    constexpr int lda = LdAsync<T, BK>::value, ldb = Ld<T, BN>::value;
    constexpr int stage = (STAGES * BM * lda + BK * ldb) * (int)sizeof(T);
    constexpr int ctile = BM * LDC * 4;
    return stage > ctile ? stage : ctile;
  }
};

template <typename T>
__global__ void __launch_bounds__(DxCfg::NT, 2) _mod_linear_bwd_dx_kernel(const MwModLinearParams p) {
  using C = DxCfg;
  using Eng = typename EngineFor<T, C::WM, C::WN, C::FM, C::FN, false, false>::type;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::NT, S = C::STAGES;
  constexpr int LDA = LdAsync<T, BK>::value, LDB = Ld<T, BN>::value, LDC = C::LDC;
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);  // [S][BM][LDA]  (t, o)
  T* Bs = As + S * BM * LDA;                // [BK][LDB]     (o, i)
  float* Cs = reinterpret_cast<float*>(smem_raw);

  const int64_t I = p.I, O = p.O, Tn = p.T, K = p.K;
  const int64_t i0 = (int64_t)blockIdx.x * BN;
  const int64_t t0 = (int64_t)blockIdx.y * BM;
  const int64_t b = blockIdx.z;
  const T* g = static_cast<const T*>(p.g) + (b * Tn + t0) * O;
  const T* bank = static_cast<const T*>(p.bank) + i0;
  const T* coef = p.coeffs ? static_cast<const T*>(p.coeffs) + b * K : nullptr;
  const float* dvec = p.d ? p.d + b * O : nullptr;
  const bool vec_g = aligned16(p.g) && (O % V == 0);
  const bool vec_w = aligned16(p.bank) && (I % V == 0);
  const int rows_t = (int)(Tn - t0 < BM ? Tn - t0 : BM);
  const int cols_i = (int)(I - i0 < BN ? I - i0 : BN);
  const int nchunks = (int)((O + BK - 1) / BK);

  auto issue = [&](int c) {  // A chunk c into stage c % S (see the forward)
    if (c < nchunks) {
      const int64_t oc = (int64_t)c * BK;
      const int n_o = (int)(O - oc < BK ? O - oc : BK);
      T* dst = As + (c % S) * BM * LDA;
      if (vec_g) async_tile<T, BM, BK, NT>(dst, LDA, g + oc, O, rows_t, n_o);
      else load_tile<T, BM, BK, NT>(dst, LDA, g + oc, O, rows_t, n_o, 1, 0, nullptr, nullptr, nullptr, false);
    }
    cp_async_commit();
  };

  Eng eng;
  eng.zero();
#pragma unroll
  for (int c = 0; c < S - 1; ++c) issue(c);
  for (int c = 0; c < nchunks; ++c) {
    const int64_t oc = (int64_t)c * BK;
    const int n_o = (int)(O - oc < BK ? O - oc : BK);
    __syncthreads();  // chunk c-1 is consumed
    issue(c + S - 1);
    load_tile<T, BK, BN, NT>(Bs, LDB, bank + oc * I, I, n_o, cols_i, (int)K, O * I, coef, nullptr, nullptr,
                             vec_w, dvec ? dvec + oc : nullptr);
    cp_async_wait<S - 1>();
    __syncthreads();
    eng.template chunk<BK>(As + (c % S) * BM * LDA, LDA, Bs, LDB);
  }
  cp_async_wait<0>();
  __syncthreads();
  eng.store(Cs, LDC);
  __syncthreads();

  T* dx = static_cast<T*>(p.dx);
  const T* sty = p.styles ? static_cast<const T*>(p.styles) + b * I : nullptr;
#pragma unroll 4
  for (int e = (int)threadIdx.x; e < BM * BN; e += NT) {
    const int r = e / BN, cc = e % BN;
    const int64_t t = t0 + r, i = i0 + cc;
    if (t < Tn && i < I) {
      float v = Cs[r * LDC + cc];
      if (sty) v *= to_f(sty[i]);
      dx[(b * Tn + t) * I + i] = from_f<T>(v);
    }
  }
}

// ------------------------------------------------------------------ launchers

template <typename T>
static int launch_stats(const MwModLinearParams* p, cudaStream_t stream) {
  dim3 grid((unsigned)cdiv(p->O, 32), (unsigned)p->B);
  _mod_linear_bwd_stats_kernel<T><<<grid, 256, 0, stream>>>(*p);
  return check_launch("mw_mod_linear_bwd_stats");
}

template <typename T>
static int launch_dx(const MwModLinearParams* p, cudaStream_t stream) {
  const char* who = "mw_mod_linear_bwd_dx";
  constexpr int smem = DxCfg::smem<T>();
  if (int rc = prepare_smem((const void*)_mod_linear_bwd_dx_kernel<T>, smem, p->device, who)) return rc;
  dim3 grid((unsigned)cdiv(p->I, DxCfg::BN), (unsigned)cdiv(p->T, DxCfg::BM), (unsigned)p->B);
  _mod_linear_bwd_dx_kernel<T><<<grid, DxCfg::NT, smem, stream>>>(*p);
  return check_launch(who);
}

}  // namespace mw

extern "C" {

int mw_mod_linear_bwd_stats(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  if (int rc = check_common(p, "mw_mod_linear_bwd_stats")) return rc;
  if (!p->g || (p->c && (!p->y || !p->d)) || (!p->c && !p->gsum)) {
    set_error("mw_mod_linear_bwd_stats: `g` must be a device pointer, `y` and `d` too when `c` is, and one of `c`, "
              "`gsum`; got g=%s c=%s y=%s d=%s gsum=%s", p->g ? "set" : "0", p->c ? "set" : "0",
              p->y ? "set" : "0", p->d ? "set" : "0", p->gsum ? "set" : "0");
    return MW_EINVAL;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_stats<float>(p, s);
    case MW_F16: return launch_stats<__half>(p, s);
    case MW_BF16: return launch_stats<__nv_bfloat16>(p, s);
  }
  return MW_EINVAL;
}

int mw_mod_linear_bwd_dx(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  if (int rc = check_common(p, "mw_mod_linear_bwd_dx")) return rc;
  if (!p->g || !p->dx) {
    set_error("mw_mod_linear_bwd_dx: `%s` must be a device pointer; got 0", p->g ? "dx" : "g");
    return MW_EINVAL;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p->dtype) {
    case MW_F32: return launch_dx<float>(p, s);
    case MW_F16: return launch_dx<__half>(p, s);
    case MW_BF16: return launch_dx<__nv_bfloat16>(p, s);
  }
  return MW_EINVAL;
}

}  // extern "C"
