// Per-token conditioning, the terms quadratic in the mixture (see mod_linear_token.cuh):
//
//   _mod_linear_token_q_kernel     d[r,o] = rsqrt(sum_i (M_r[o,i] s_i)^2 + eps)
//   _mod_linear_token_ds2_kernel   ds_rows[r,i] -= s_i sum_o c[r,o] M_r[o,i]^2
#include "mod_linear_token.cuh"

namespace mw {

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

// The mixed-row kernels' launch: q (d) over (row groups, o groups capped at 65535, o
// strided in the kernel), else ds2 over (row groups, i groups).
static int launch_mixed(const MwModLinearParams* p, void* stream, const char* who, bool q) {
  const int64_t rb = cdiv(p->B * p->T, MIX_ROWS);
  if (rb == 0 || p->O == 0 || (!q && p->I == 0)) return MW_OK;  // nothing to write
  if (rb > 2147483647LL) {
    set_error("%s: B * T = %lld rows is more than the mixed-row kernels' grid holds", who,
              (long long)(p->B * p->T));
    return MW_EINVAL;
  }
  const int64_t ob = cdiv(p->O, MIX_WARPS);
  const dim3 grid((unsigned)rb, q ? (unsigned)(ob < 65535 ? ob : 65535)
                                  : (unsigned)cdiv(p->I, MIX_WARPS * 32));  // I < 2^22 (check_token)
  auto kernel_of = [q](auto t) {
    return q ? _mod_linear_token_q_kernel<MW_ELEM(t)> : _mod_linear_token_ds2_kernel<MW_ELEM(t)>;
  };
  return launch_typed(kernel_of, grid, MIX_WARPS * 32, p, stream, who);
}

}  // namespace mw

extern "C" {

int mw_mod_linear_token_demod(const MwModLinearParams* p, void* stream) {
  if (int rc = mw::check_entry(p, __func__, true, p && p->d, "d (the output) is NULL")) return rc;
  return mw::launch_mixed(p, stream, __func__, true);
}

int mw_mod_linear_token_ds_demod(const MwModLinearParams* p, void* stream) {
  const bool ok = p && p->c && p->ds_rows && p->styles;
  if (int rc = mw::check_entry(p, __func__, true, ok, "needs c, ds_rows and styles")) return rc;
  return mw::launch_mixed(p, stream, __func__, false);
}

}  // extern "C"
