// Shared device building blocks for the modlinear kernels: element conversions, the
// tile loader that folds styles / mixing / demodulation into the global -> shared copy,
// and the two tile-GEMM engines (tensor cores through nvcuda::wmma for fp16/bf16, CUDA
// core FMAs for fp32). Host helpers for errors and launch checks are at the bottom.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "modlinear.h"

namespace mw {

// ------------------------------------------------------------------ element conversions

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte vector.
template <typename T> struct Vec { static constexpr int N = 16 / (int)sizeof(T); };

// Load N = 16 / sizeof(T) consecutive elements from a 16-byte aligned address.
__device__ __forceinline__ void load16(const float* p, float* v) {
  float4 r = *reinterpret_cast<const float4*>(p);
  v[0] = r.x; v[1] = r.y; v[2] = r.z; v[3] = r.w;
}
__device__ __forceinline__ void load16(const __half* p, float* v) {
  uint4 r = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __half22float2(h[j]);
    v[2 * j] = f.x; v[2 * j + 1] = f.y;
  }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* v) {
  uint4 r = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = __bfloat1622float2(h[j]);
    v[2 * j] = f.x; v[2 * j + 1] = f.y;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // the same value in every lane, summed in a fixed order
}

// Shared-memory leading dimension for a tile with C columns: +8 elements for 16-bit types
// (keeps WMMA's 16-byte ldm rule and spreads rows over the banks), +1 for fp32 (an odd
// stride: the FMA engine reads columns of a [n][k] tile without bank conflicts).
template <typename T, int C> struct Ld {
  static constexpr int value = C + (sizeof(T) == 2 ? 8 : 1);
};

// ------------------------------------------------------------------ the tile loader
//
// smem[r][c] (row-major, leading dimension lds) for r < R, c < C:
//
//     sum_{k < nmix} coef[k] * g[k * kstride + r * ldg + c]  *  cscale[c]
//
// read from global memory in fp32 and rounded once to T. Rows r >= rows and columns
// c >= cols (the tails) are zero. coef == NULL means coefficient 1; cscale is either a
// T pointer (styles), a float pointer (demodulation coefficients) or neither. `vec` says
// that 16-byte loads are allowed (base 16-byte aligned, ldg and kstride multiples of the
// vector width); it must be uniform across the block.
//
// This is where the styles are folded into the A tile and the bank mixture into the B
// tile: nothing of size B x O x I is ever formed in global memory.
// V consecutive elements of S starting at a 16-byte aligned address, as floats (one or
// two 16-byte loads).
template <int V, typename S>
__device__ __forceinline__ void load_vec(const S* p, float* v) {
  if constexpr (V * sizeof(S) == 16) {
    load16(p, v);
  } else {
    static_assert(V * sizeof(S) == 32, "two 16-byte loads at most");
    load16(p, v);
    load16(p + 16 / sizeof(S), v + 16 / sizeof(S));
  }
}

// V elements from p as floats: vector loads when `full` (aligned and all V in range), else
// element by element, zero from `valid` on.
template <int V, typename S>
__device__ __forceinline__ void load_part(const S* p, float* v, int valid, bool full) {
  if (full) {
    load_vec<V>(p, v);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = e < valid ? to_f(p[e]) : 0.f;
  }
}

// Round V floats to T and store them at dst (16-byte aligned for 16-bit T: callers keep
// column offsets and leading dimensions multiples of 8).
template <typename T, int V>
__device__ __forceinline__ void store_vec(T* dst, const float* acc) {
  if constexpr (sizeof(T) == 2) {
    union { uint4 u; T h[V]; } pack;
#pragma unroll
    for (int e = 0; e < V; ++e) pack.h[e] = from_f<T>(acc[e]);
    *reinterpret_cast<uint4*>(dst) = pack.u;
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) dst[e] = from_f<T>(acc[e]);
  }
}

// Fill an R x C shared tile (leading dimension lds) one vector of V = 16 / sizeof(T)
// columns at a time, the vectors spread over NT threads: fill(r, c, acc) sets acc[0..V) to
// the fp32 values of row r, columns c .. c + V - 1 (it sees acc zeroed), stored rounded to T.
// The per-token loaders (modlinear_token.cu) are this loop with their own fill. load_tile
// below keeps its own copy of the loop: through fill_tile, ptxas spills 36 bytes in the
// per-sample forward GEMM (sm_90a), the kernel W1 / W2 run on.
template <typename T, int R, int C, int NT, typename Fill>
__device__ __forceinline__ void fill_tile(T* __restrict__ smem, int lds, Fill fill) {
  constexpr int V = Vec<T>::N;
  static_assert(C % V == 0, "tile columns must be a multiple of the vector width");
  constexpr int CV = C / V;
  constexpr int NV = R * CV;
  static_assert(NV % NT == 0, "tile vectors must divide evenly among the threads");
#pragma unroll
  for (int j = 0; j < NV / NT; ++j) {
    const int v = (int)threadIdx.x + j * NT;
    const int r = v / CV;
    const int c = (v % CV) * V;
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    fill(r, c, acc);
    store_vec<T, V>(smem + r * lds + c, acc);
  }
}

template <typename T, int R, int C, int NT>
__device__ __forceinline__ void load_tile(T* __restrict__ smem, int lds, const T* __restrict__ g,
                                          int64_t ldg, int rows, int cols, int nmix,
                                          int64_t kstride, const T* __restrict__ coef,
                                          const T* __restrict__ cscale_t,
                                          const float* __restrict__ cscale_f, bool vec) {
  constexpr int V = Vec<T>::N;
  static_assert(C % V == 0, "tile columns must be a multiple of the vector width");
  constexpr int CV = C / V;
  constexpr int NV = R * CV;
  static_assert(NV % NT == 0, "tile vectors must divide evenly among the threads");
#pragma unroll
  for (int j = 0; j < NV / NT; ++j) {
    const int v = (int)threadIdx.x + j * NT;
    const int r = v / CV;
    const int c = (v % CV) * V;
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    if (r < rows && c < cols) {
      const T* p = g + (int64_t)r * ldg + c;
      const bool full = vec && (c + V <= cols);
#pragma unroll 2
      for (int k = 0; k < nmix; ++k) {
        const float w = coef ? to_f(coef[k]) : 1.f;
        const T* pk = p + (int64_t)k * kstride;
        float val[V];
        if (full) {
          load16(pk, val);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) val[e] = (c + e < cols) ? to_f(pk[e]) : 0.f;
        }
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fmaf(w, val[e], acc[e]);
      }
      if (cscale_t) {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] *= (c + e < cols) ? to_f(cscale_t[c + e]) : 0.f;
      }
      if (cscale_f) {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] *= (c + e < cols) ? cscale_f[c + e] : 0.f;
      }
    }
    T* dst = smem + r * lds + c;
    if constexpr (sizeof(T) == 2) {
      // lds and c are multiples of 8 elements: one 16-byte aligned store
      union { uint4 u; T h[V]; } pack;
#pragma unroll
      for (int e = 0; e < V; ++e) pack.h[e] = from_f<T>(acc[e]);
      *reinterpret_cast<uint4*>(dst) = pack.u;
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) dst[e] = from_f<T>(acc[e]);
    }
  }
}

// ------------------------------------------------------------------ tile GEMM engines
//
// Both compute a BM x BN fp32 tile  C += A (BM x BK) * B (BK x BN)  from shared memory and
// store it to a row-major fp32 shared tile. A is stored [m][k] (A_COL = false) or [k][m]
// (A_COL = true); B is stored [k][n] (B_COL = false) or [n][k] (B_COL = true).

// Tensor cores, 16x16x16 WMMA fragments; WM x WN warps, each FM x FN fragments.
template <typename T, int WM, int WN, int FM, int FN, bool A_COL, bool B_COL>
struct WmmaEngine {
  static_assert(sizeof(T) == 2, "WMMA engine takes fp16/bf16 operands");
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16, NT = WM * WN * 32;
  using ALay = typename std::conditional<A_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
  using BLay = typename std::conditional<B_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  // One BK-deep chunk (BK a multiple of 16).
  template <int BK>
  __device__ __forceinline__ void chunk(const T* As, int lda, const T* Bs, int ldb) {
    using namespace nvcuda;
    const int warp = (int)threadIdx.x / 32;
    const int wm = warp / WN, wn = warp % WN;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALay> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLay> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = (wm * FM + i) * 16;
        const T* pa = A_COL ? As + kk * lda + m : As + m * lda + kk;
        wmma::load_matrix_sync(a[i], pa, lda);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = (wn * FN + j) * 16;
        const T* pb = B_COL ? Bs + n * ldb + kk : Bs + kk * ldb + n;
        wmma::load_matrix_sync(b[j], pb, ldb);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs, int ldc) {
    const int warp = (int)threadIdx.x / 32;
    const int wm = warp / WN, wn = warp % WN;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (wm * FM + i) * 16 * ldc + (wn * FN + j) * 16, acc[i][j],
                                        ldc, nvcuda::wmma::mem_row_major);
  }
};

// CUDA cores, fp32 operands and fp32 FMAs (exact fp32 GEMM; no TF32 rounding). Thread
// (ty, tx) of a TY x 16 grid owns rows ty + TY * r and columns tx + 16 * c.
template <int BM_, int BN_, int NT_, bool A_COL, bool B_COL>
struct FmaEngine {
  static constexpr int BM = BM_, BN = BN_, NT = NT_;
  static constexpr int TX = 16, TY = NT / TX, TM = BM / TY, TN = BN / TX;
  static_assert(NT % TX == 0 && BM % TY == 0 && BN % TX == 0, "FMA engine tiling");
  float acc[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  }

  template <int BK>
  __device__ __forceinline__ void chunk(const float* As, int lda, const float* Bs, int ldb) {
    const int tx = (int)threadIdx.x % TX, ty = (int)threadIdx.x / TX;
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = ty + TY * i;
        a[i] = A_COL ? As[k * lda + m] : As[m * lda + k];
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int n = tx + TX * j;
        b[j] = B_COL ? Bs[n * ldb + k] : Bs[k * ldb + n];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs, int ldc) {
    const int tx = (int)threadIdx.x % TX, ty = (int)threadIdx.x / TX;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Cs[(ty + TY * i) * ldc + tx + TX * j] = acc[i][j];
  }
};

// The engine for element type T with a WM x WN warp grid of FM x FN fragments: WMMA for
// 16-bit types, FMA (same tile, same thread count) for fp32.
template <typename T, int WM, int WN, int FM, int FN, bool A_COL, bool B_COL>
struct EngineFor {
  using type = WmmaEngine<T, WM, WN, FM, FN, A_COL, B_COL>;
};
template <int WM, int WN, int FM, int FN, bool A_COL, bool B_COL>
struct EngineFor<float, WM, WN, FM, FN, A_COL, B_COL> {
  using type = FmaEngine<WM * FM * 16, WN * FN * 16, WM * WN * 32, A_COL, B_COL>;
};

// ------------------------------------------------------------------ host helpers

// Per-thread error message for mw_last_error(): "<entry point>: <what is wrong>", naming the
// argument (a field of MwLinearParams, in backquotes) and the value expected.
void set_error(const char* fmt, ...);
const char* last_error();

// Return codes.
enum { MW_OK = MW_RC_OK, MW_EINVAL = MW_RC_EINVAL, MW_ECUDA = MW_RC_ECUDA };

// Shared checks of every launcher: sizes positive and within the grid limits, dtype
// known, pointers for the tensors `need` lists present, device current. 0 or an error.
int check_common(const MwLinearParams* p, const char* who);
// The same for the per-token kernels (their grid limits, a_div / s_div / bias_div).
int check_token(const MwLinearParams* p, const char* who);
// check_common without the pointers (plans: sizes, dtype and device only).
int check_sizes(const MwLinearParams* p, const char* who);
// Opt the kernel into `smem` bytes of dynamic shared memory, if the device allows it.
int prepare_smem(const void* kernel, int smem, int device, const char* who);
// After a launch: the launch error, if any, as an error code with a message.
int check_launch(const char* who);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mw
