// Backward pass, the row statistics and the input gradient (per-sample conditioning):
//
//   _mod_linear_bwd_stats_kernel  gsum[b, o] = sum_t g[b,t,o]                  (bias grads)
//                                c[b, o]    = d^2 * sum_t g[b,t,o] (y[b,t,o] - bias_b[o])
//                                           = dd_b[o] * d_b[o]^3   (z = (y - bias) / d)
//   _mod_linear_bwd_dx_kernel     dx[b, t, i] = s[b,i] * sum_o g[b,t,o] (d[b,o] M_b[o,i])
//                                with d_b M_b = d * sum_k a[b,k] W_k formed in the B-tile load
#include "mod_linear_gemm.cuh"

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
// dx = s * (g @ (d_b M_b)): the per-sample GEMM of mod_linear_gemm.cuh with g raw (cp.async,
// 3 stages) and the demodulation and the mixture in the B tile; the forward's warp layout.
template <typename T>
__global__ void __launch_bounds__(SampleGemmCfg::NT, 2) _mod_linear_bwd_dx_kernel(const MwModLinearParams p) {
  sample_gemm<T, true>(p);
}

}  // namespace mw

extern "C" {

int mw_mod_linear_bwd_stats(const MwModLinearParams* p, void* stream) {
  const char* who = __func__;
  if (int rc = mw::check_common(p, who)) return rc;
  if (!p->g || (p->c && (!p->y || !p->d)) || (!p->c && !p->gsum)) {
    mw::set_error("%s: `g` must be a device pointer, `y` and `d` too when `c` is, and one of `c`, `gsum`; "
                  "got g=%s c=%s y=%s d=%s gsum=%s", who, p->g ? "set" : "0", p->c ? "set" : "0",
                  p->y ? "set" : "0", p->d ? "set" : "0", p->gsum ? "set" : "0");
    return mw::MW_EINVAL;
  }
  const dim3 grid((unsigned)mw::cdiv(p->O, 32), (unsigned)p->B);
  return mw::launch_typed([](auto t) { return mw::_mod_linear_bwd_stats_kernel<MW_ELEM(t)>; }, grid, 256, p, stream,
                          who);
}

int mw_mod_linear_bwd_dx(const MwModLinearParams* p, void* stream) {
  const char* what = p && p->g ? "`dx` must be a device pointer; got 0" : "`g` must be a device pointer; got 0";
  if (int rc = mw::check_entry(p, __func__, false, p && p->g && p->dx, what)) return rc;
  return mw::launch_sample_gemm<true>([](auto t) { return mw::_mod_linear_bwd_dx_kernel<MW_ELEM(t)>; }, p, stream,
                                      __func__);
}

}  // extern "C"
