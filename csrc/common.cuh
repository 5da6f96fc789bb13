// Shared device building blocks for the mod_linear kernels: element conversions, the
// tile loader that folds styles / mixing / demodulation into the global -> shared copy,
// the cp.async copies of raw tiles, and the two tile-GEMM engines (tensor cores through
// ldmatrix + mma.sync for fp16/bf16, CUDA core FMAs for fp32). The host side of the
// launchers (errors, checks, the dtype dispatch, the launch itself) is in launch.cuh.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "mod_linear.h"

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
__device__ __forceinline__ float2 to_f2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
template <typename T> struct Pair;  // the 2-element vector type of a 16-bit T
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };
template <typename T>  // __half, __nv_bfloat16 (the float overload above is preferred for float)
__device__ __forceinline__ void load16(const T* p, float* v) {
  uint4 r = *reinterpret_cast<const uint4*>(p);
  const typename Pair<T>::type* h = reinterpret_cast<const typename Pair<T>::type*>(&r);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float2 f = to_f2(h[j]);
    v[2 * j] = f.x; v[2 * j + 1] = f.y;
  }
}

// Four 16-bit elements from an 8-byte aligned address (fp32 tiles filled from 16-bit data).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float* v) {
  uint2 r = *reinterpret_cast<const uint2*>(p);
  const typename Pair<T>::type* h = reinterpret_cast<const typename Pair<T>::type*>(&r);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    float2 f = to_f2(h[j]);
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
// (keeps ldmatrix's 16-byte rows and spreads rows over the banks), +1 for fp32 (an odd
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
// T pointer (styles), a float pointer (demodulation coefficients) or neither; rscale_f,
// when given, scales row r by rscale_f[r] (dx: the demodulation of output row o). `vec` says
// that 16-byte loads are allowed (base 16-byte aligned, ldg and kstride multiples of the
// vector width); it must be uniform across the block.
//
// This is where the styles are folded into the A tile and the bank mixture into the B
// tile: nothing of size B x O x I is ever formed in global memory.
// V consecutive elements of S starting at a 16-byte aligned address (8-byte for 8 bytes),
// as floats (one 8-byte, one or two 16-byte loads).
template <int V, typename S>
__device__ __forceinline__ void load_vec(const S* p, float* v) {
  if constexpr (V * sizeof(S) == 8) {
    load8(p, v);
  } else if constexpr (V * sizeof(S) == 16) {
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

// Visit the 16-byte vectors (V = 16 / sizeof(T) columns) of an R x C tile, spread over NT
// threads: this thread calls f(r, c) for each of its vectors (row r, columns c .. c + V - 1).
// UNROLL: all of a thread's vectors unrolled (the copies, the per-token fills); else one
// vector in flight (load_tile: the GEMMs around it hold their accumulators; unrolled there,
// ptxas spilled 36 bytes in the per-sample forward GEMM on sm_90a).
template <typename T, int R, int C, int NT, bool UNROLL, typename F>
__device__ __forceinline__ void for_tile_vecs(F&& f) {
  constexpr int V = Vec<T>::N;
  static_assert(C % V == 0, "tile columns must be a multiple of the vector width");
  constexpr int CV = C / V, NV = R * CV;
  static_assert(NV % NT == 0, "tile vectors must divide evenly among the threads");
#pragma unroll (UNROLL ? NV / NT : 1)
  for (int j = 0; j < NV / NT; ++j) {
    const int v = (int)threadIdx.x + j * NT;
    f(v / CV, (v % CV) * V);
  }
}

// Fill an R x C shared tile (leading dimension lds) one vector at a time (for_tile_vecs):
// fill(r, c, acc) sets acc[0..V) to the fp32 values of row r, columns c .. c + V - 1 (it
// sees acc zeroed), stored rounded to T. The per-token loaders (mod_linear_token.cuh) and
// load_tile below are this loop with their own fill.
template <typename T, int R, int C, int NT, bool UNROLL = true, typename Fill>
__device__ __forceinline__ void fill_tile(T* __restrict__ smem, int lds, Fill&& fill) {
  constexpr int V = Vec<T>::N;
  for_tile_vecs<T, R, C, NT, UNROLL>([&](int r, int c) {
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    fill(r, c, acc);
    store_vec<T, V>(smem + r * lds + c, acc);  // lds and c multiples of 8 for 16-bit T
  });
}

template <typename T, int R, int C, int NT>
__device__ __forceinline__ void load_tile(T* __restrict__ smem, int lds, const T* __restrict__ g,
                                          int64_t ldg, int rows, int cols, int nmix,
                                          int64_t kstride, const T* __restrict__ coef,
                                          const T* __restrict__ cscale_t,
                                          const float* __restrict__ cscale_f, bool vec,
                                          const float* __restrict__ rscale_f = nullptr) {
  constexpr int V = Vec<T>::N;
  fill_tile<T, R, C, NT, false>(smem, lds, [&](int r, int c, float* acc) {
    if (r >= rows || c >= cols) return;  // tails: zero
    const T* p = g + (int64_t)r * ldg + c;
    const bool full = vec && (c + V <= cols);
#pragma unroll 1
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
    if (rscale_f) {
      const float rs = rscale_f[r];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] *= rs;
    }
  });
}

// ------------------------------------------------------------------ cp.async (LDGSTS)
//
// sm_80+ asynchronous copies, global -> shared without a register round trip: the main
// loops stage raw operand tiles (x in the forward, g in dx) STAGES deep with these while
// the mixed tile (the bank mixture, computed in registers) is written and the tensor cores
// work. src_bytes < 16 zero-fills the rest of the 16 bytes (tails). The host emulation
// defines the same three functions as a plain copy and no-ops (csrc/emu/include/emu_cuda.h).
#if defined(__CUDACC__)
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// Leading dimension of a shared tile that cp.async fills: rows must start 16-byte aligned
// (+8 elements for 16-bit types as Ld, +4 for fp32 instead of Ld's +1).
template <typename T, int C> struct LdAsync {
  static constexpr int value = C + (sizeof(T) == 2 ? 8 : 4);
};

// Issue the copies of an R x C tile of raw elements, smem[r][c] = g[r * ldg + c], the
// 16-byte vectors spread over NT threads; rows r >= rows and columns c >= cols are zero.
// Needs what `vec` means for load_tile (16-byte aligned base, ldg and cols multiples of the
// vector width). The caller commits the group.
template <typename T, int R, int C, int NT>
__device__ __forceinline__ void async_tile(T* __restrict__ smem, int lds, const T* __restrict__ g, int64_t ldg,
                                           int rows, int cols) {
  for_tile_vecs<T, R, C, NT, true>([&](int r, int c) {
    const bool in = r < rows && c < cols;
    cp_async16(smem + r * lds + c, in ? g + (int64_t)r * ldg + c : g, in ? 16 : 0);
  });
}

// ------------------------------------------------------------------ tile GEMM engines
//
// Both compute a BM x BN fp32 tile  C += A (BM x BK) * B (BK x BN)  from shared memory and
// store it to a row-major fp32 shared tile. A is stored [m][k] (A_COL = false) or [k][m]
// (A_COL = true); B is stored [k][n] (B_COL = false) or [n][k] (B_COL = true).

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
#pragma unroll 1
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

// Tensor cores through ldmatrix + mma.sync.m16n8k16 (fp16 and bf16 alike; fp32
// accumulators): WM x WN warps, each FM x FN blocks of 16 x 16 (two m16n8 MMAs per block).
// The fragment layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16"); the host
// emulation implements the same documented layouts lane by lane (emu_cuda.h), so a wrong
// lane mapping here fails the CPU tests. ldmatrix reads 8 rows of 16 bytes per matrix:
// tiles keep 16-byte aligned rows (Ld / LdAsync leading dimensions, column offsets of 8).
#if defined(__CUDACC__)
// d (4 fp32) += a (4 x 2 16-bit) b (2 x 2 16-bit); `ty` is the PTX type of a and b, f16 or bf16
#define MW_MMA_M16N8K16(ty)                                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ty "." ty ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
template <typename T> struct MmaOp {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16");
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b) {
    if constexpr (std::is_same<T, __half>::value) MW_MMA_M16N8K16("f16");
    else MW_MMA_M16N8K16("bf16");
  }
};
#undef MW_MMA_M16N8K16
// Four 8 x 8 matrices of 16-bit elements; lanes 8j .. 8j+7 give the row addresses of matrix j.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* row_addr) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row_addr));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
#else
template <typename T> struct MmaOp {
  static void run(float* d, const uint32_t* a, const uint32_t* b) { ::mw_emu::mma_m16n8k16<T>(d, a, b); }
};
template <bool TRANS>
inline void ldmatrix_x4(uint32_t* r, const void* row_addr) { ::mw_emu::ldmatrix_x4(r, row_addr, TRANS); }
#endif

// ldmatrix.x4 of the 16 x 16 block at (row0, col0) of a tile stored row-major (leading dimension
// ld): lane l addresses row row0 + l % 8 + 8 * hr, columns col0 + 8 * hc, with (hr, hc) =
// (q % 2, q / 2) when ROW_HALF_FIRST (matrices 0..3 = (row lo, col lo), (row hi, col lo),
// (row lo, col hi), (row hi, col hi)), else (q / 2, q % 2), q = l / 8.
template <bool TRANS, bool ROW_HALF_FIRST, typename T>
__device__ __forceinline__ void ldmatrix_block(uint32_t* r, const T* tile, int ld, int row0, int col0) {
  const int lane = (int)threadIdx.x % 32, l8 = lane % 8, q = lane / 8;
  const int hr = ROW_HALF_FIRST ? q % 2 : q / 2, hc = ROW_HALF_FIRST ? q / 2 : q % 2;
  ldmatrix_x4<TRANS>(r, tile + (row0 + l8 + 8 * hr) * ld + col0 + 8 * hc);
}

template <typename T, int WM, int WN, int FM, int FN, bool A_COL, bool B_COL>
struct MmaEngine {
  static_assert(sizeof(T) == 2, "the MMA engine takes fp16/bf16 operands");
  static constexpr int BM = WM * FM * 16, BN = WN * FN * 16, NT = WM * WN * 32;
  float acc[FM][2 * FN][4];  // [m block][n block of 8][c0..c3]

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < 2 * FN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  // One BK-deep chunk (BK a multiple of 16). A is [m][k] (A_COL: [k][m]), B is [n][k]
  // (B_COL) or [k][n]; the transposed layouts load through ldmatrix.trans.
  template <int BK>
  __device__ __forceinline__ void chunk(const T* As, int lda, const T* Bs, int ldb) {
    const int warp = (int)threadIdx.x / 32;
    const int wm = warp / WN, wn = warp % WN;
    // the x4 loads: A blocks as matrices 0..3 = (m lo, k lo), (m hi, k lo), (m lo, k hi),
    // (m hi, k hi); B blocks as (n lo, k lo), (n lo, k hi), (n hi, k lo), (n hi, k hi)
#pragma unroll 1  // one k step of fragments live at a time: 128 registers at 2 CTAs per SM
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[FM][4], b[FN][4];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m0 = (wm * FM + i) * 16;
        if constexpr (A_COL) ldmatrix_block<true, false>(a[i], As, lda, kk, m0);  // stored [k][m]
        else ldmatrix_block<false, true>(a[i], As, lda, m0, kk);                   // stored [m][k]
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n0 = (wn * FN + j) * 16;
        if constexpr (B_COL) ldmatrix_block<false, false>(b[j], Bs, ldb, n0, kk);  // stored [n][k]
        else ldmatrix_block<true, true>(b[j], Bs, ldb, kk, n0);                    // stored [k][n]
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
          MmaOp<T>::run(acc[i][2 * j], a[i], &b[j][0]);      // n 0-7 of the block: b0, b1
          MmaOp<T>::run(acc[i][2 * j + 1], a[i], &b[j][2]);  // n 8-15
        }
    }
  }

  // C fragment of m16n8: c0, c1 at (row g, columns 2t, 2t+1), c2, c3 at row g + 8.
  __device__ __forceinline__ void store(float* Cs, int ldc) {
    const int lane = (int)threadIdx.x % 32, warp = (int)threadIdx.x / 32;
    const int wm = warp / WN, wn = warp % WN;
    const int gr = lane / 4, tc = (lane % 4) * 2;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < 2 * FN; ++j) {
        float* c = Cs + ((wm * FM + i) * 16 + gr) * ldc + (wn * FN * 2 + j) * 8 + tc;
        c[0] = acc[i][j][0];
        c[1] = acc[i][j][1];
        c[8 * ldc] = acc[i][j][2];
        c[8 * ldc + 1] = acc[i][j][3];
      }
  }
};

// The engine for element type T with a WM x WN warp grid of FM x FN 16 x 16 blocks:
// ldmatrix + mma.sync for 16-bit types, FMA (same tile, same thread count) for fp32.
template <typename T, int WM, int WN, int FM, int FN, bool A_COL, bool B_COL>
struct EngineFor {
  using type = MmaEngine<T, WM, WN, FM, FN, A_COL, B_COL>;
};
template <int WM, int WN, int FM, int FN, bool A_COL, bool B_COL>
struct EngineFor<float, WM, WN, FM, FN, A_COL, B_COL> {
  using type = FmaEngine<WM * FM * 16, WN * FN * 16, WM * WN * 32, A_COL, B_COL>;
};

}  // namespace mw
