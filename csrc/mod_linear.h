// modweights CUDA extension: the modulated / mixture linear op (docs/design.md sections 1-2).
//
// One parameter struct, shared by the host launchers and the kernels (passed to every
// kernel by value) and bound to Python as `modweights._cuda.ModLinearParams` by binding.cpp:
// the struct is compiled once, from this header, into both sides, so there is no mirror to
// keep in step. The module reports MW_ABI_VERSION; the Python backend refuses a module
// built for another one (a stale build).
//
// Only C types here: included by the nvcc-compiled .cu files and by binding.cpp (host C++,
// pybind11, no CUDA headers). No torch.
#pragma once
#include <stdint.h>

#define MW_ABI_VERSION 4
// Tile (rows and columns) of the per-token kernels; the launcher sizes da_rows with it.
#define MW_TOKEN_TILE 64

// The entry points are internal to the extension module (everything is compiled with
// -fvisibility=hidden; only the module's PyInit is exported), called by binding.cpp.
#define MW_API

// Return codes of the entry points.
#define MW_RC_OK 0
#define MW_RC_EINVAL 1  // a bad argument: binding.cpp raises ValueError
#define MW_RC_ECUDA 2   // a CUDA error: RuntimeError

#ifdef __cplusplus
extern "C" {
#endif

// Element type of x, bank, coeffs, styles, g, y, dx and dbank (all the same).
enum MwDtype { MW_F32 = 0, MW_F16 = 1, MW_BF16 = 2 };

typedef struct MwModLinearParams {
  // ---- tensors (device pointers, contiguous, NULL where absent) ------------------------
  const void* x;       // [B, T, I] dtype
  const void* bank;    // [K, O, I] dtype
  const void* coeffs;  // [B, K]    dtype; NULL means a = 1 (only with K == 1)
  const void* styles;  // [B, I]    dtype; NULL means s = 1
  const float* bias;   // fp32 [O] (bias_stride_b = 0) or [B, O] mixed per sample
                       // (bias_stride_b = O); NULL: no bias
  float* d;            // fp32 [B, O] demodulation coefficients (demod kernel writes, others
                       // read); NULL: no demodulation
  const void* g;       // [B, T, O] dtype, dL/dy (backward)
  void* y;             // [B, T, O] dtype, the output (forward writes, stats reads)
  float* c;            // fp32 [B, O]: c_b = dd_b * d_b^3 (stats writes, weight kernel
                       // reads); NULL: 0 (no demodulation)
  float* gsum;         // fp32 [B, O]: sum_t g (stats writes); NULL: not wanted
  void* dx;            // [B, T, I] dtype (dx kernel writes)
  void* dbank;         // [K, O, I] dtype, written when wt_nsplit == 1
  float* dbank_acc;    // fp32, wt_nsplit > 1: [nsplit, K, O, I] partials (deterministic)
                       // or a zeroed [K, O, I] accumulator (atomics)
  float* dcoeffs_acc;  // fp32, deterministic: [n_otiles * n_itiles, B, K] partials;
                       // else a zeroed [B, K] accumulator (atomics)
  float* dstyles_acc;  // fp32, deterministic: [n_otiles, B, I] partials;
                       // else a zeroed [B, I] accumulator (atomics)
  // ---- per-token kernels only (rows r = b * T + t, R = B * T) ------------------------
  // In the per-token kernels d, c are [R, O] fp32 and bias is read at row
  // (r / bias_div) * bias_stride_b; coeffs row r / a_div, styles row r / s_div.
  void* gz;            // [R, O] dtype: g * d (the prep kernel writes it; = g without demod)
  float* ds_rows;      // fp32 [R, I]: per-row styles gradient
  float* da_rows;      // fp32 [2, n_itiles, R, K]: per-row coefficient gradient partials,
                       // [0] the gz term, [1] the demodulation term (subtracted)
  // ---- sizes ------------------------------------------------------------------------
  int64_t B, T, I, O, K;
  int64_t bias_stride_b;  // 0 or O
  int64_t a_div, s_div, bias_div;  // per-token kernels: rows per coeffs / styles / bias row
  // ---- options ----------------------------------------------------------------------
  float eps;           // demodulation: d = rsqrt(sum V^2 + eps)
  int32_t dtype;       // MwDtype
  int32_t device;      // CUDA device index that the pointers live on
  int32_t deterministic;  // 1: no atomics anywhere (partials reduced by the caller)
  int32_t want_dbank, want_dcoeffs, want_dstyles;  // weight-side outputs wanted
  // ---- weight-side plan: filled by mw_mod_linear_bwd_weight_plan, read by the launcher --
  int32_t wt_config;   // tile config index (0: 128x128, 1: 64x64, 2: 32x32)
  int32_t wt_bo, wt_bi;        // output tile (rows of O, columns of I)
  int32_t wt_kg, wt_ngroups;   // bank entries per group held on chip, number of groups
  int32_t wt_nsplit;           // samples split across this many CTAs per tile
  int32_t wt_n_otiles, wt_n_itiles;
  int32_t wt_smem;             // dynamic shared memory per CTA, bytes
} MwModLinearParams;

// All entry points return 0 on success, or a nonzero code; mw_last_error() then holds a
// message (per host thread) that names the argument and the value expected. Kernels are
// launched on `stream` (a cudaStream_t) and the calls do not synchronise.
MW_API int mw_abi_version(void);
MW_API const char* mw_last_error(void);
// 0 when `device` exists and this library holds kernel code that runs on it.
MW_API int mw_device_check(int device);
// fn(p, stream) with the CUDA device that was current restored afterwards (the entry points
// make p->device current); mw_run_plan: the same for mw_mod_linear_bwd_weight_plan.
MW_API int mw_run(int (*fn)(const MwModLinearParams*, void*), const MwModLinearParams* p, void* stream);
MW_API int mw_run_plan(MwModLinearParams* p);

// d[b, o] = rsqrt(sum_i (sum_k a[b,k] W[k,o,i] s[b,i])^2 + eps)
MW_API int mw_mod_linear_demod(const MwModLinearParams* p, void* stream);
// y = d * ((x * s) @ M_b^T) + bias
MW_API int mw_mod_linear_forward(const MwModLinearParams* p, void* stream);
// gsum = sum_t g; c = d^2 * sum_t g * (y - bias)   (= dd * d^3)
MW_API int mw_mod_linear_bwd_stats(const MwModLinearParams* p, void* stream);
// dx = s * ((g * d) @ M_b)
MW_API int mw_mod_linear_bwd_dx(const MwModLinearParams* p, void* stream);
// Fill the wt_* fields (tile config, groups of the bank, sample split, shared memory).
MW_API int mw_mod_linear_bwd_weight_plan(MwModLinearParams* p);
// dbank, dcoeffs, dstyles in one pass over (g * d, x) per output tile (needs the plan).
MW_API int mw_mod_linear_bwd_weight(const MwModLinearParams* p, void* stream);

// ---- per-token conditioning (mod_linear_token*.cu): rows r = (b, t) flattened; coeffs
// (B, T, K) or (B, K), styles (B, T, I) or (B, I) through a_div / s_div (1 or T).
// MW_TOKEN_TILE, for the caller's buffer sizes.
MW_API int mw_mod_linear_token_tile(void);
// d[r, o] = rsqrt(sum_i (sum_k a[r,k] W[k,o,i] s[r,i])^2 + eps)
MW_API int mw_mod_linear_token_demod(const MwModLinearParams* p, void* stream);
// y[r, o] = d[r,o] * sum_k a[r,k] sum_i W[k,o,i] s[r,i] x[r,i] + bias[r, o]
MW_API int mw_mod_linear_token_forward(const MwModLinearParams* p, void* stream);
// gz = g * d; c = g * (y - bias) * d^2 (when c is given)
MW_API int mw_mod_linear_token_prep(const MwModLinearParams* p, void* stream);
// u = sum_k a[r,k] W_k^T gz[r]: dx = s * u (when dx), ds_rows = x * u (when ds_rows), and
// da_rows[0] = <W_k^T gz[r], s x> (when da_rows), in one pass
MW_API int mw_mod_linear_token_dx(const MwModLinearParams* p, void* stream);
// ds_rows[r, i] -= s[r,i] * sum_o c[r,o] M_r[o,i]^2   (demodulation term of ds)
MW_API int mw_mod_linear_token_ds_demod(const MwModLinearParams* p, void* stream);
// da_rows[1] = sum_l a[r,l] <W_k W_l, c[r] (s^2)^T>   (demodulation term of da, subtracted)
MW_API int mw_mod_linear_token_da_demod(const MwModLinearParams* p, void* stream);
// dbank[k] = sum_r a[r,k] gz[r] (s x)[r]^T - sum_l W_l * sum_r a[r,k] a[r,l] c[r] (s^2)[r]^T
MW_API int mw_mod_linear_token_weight(const MwModLinearParams* p, void* stream);

#ifdef __cplusplus
}
#endif
