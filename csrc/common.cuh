// Shared device building blocks for the mod_linear kernels: element conversions, the
// tile loader that folds styles / mixing / demodulation into the global -> shared copy,
// the cp.async copies of raw tiles, and the two tile-GEMM engines (tensor cores through
// ldmatrix + mma.sync for fp16/bf16, CUDA core FMAs for fp32). Host helpers for errors and
// launch checks are at the bottom.
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
// The per-token loaders (mod_linear_token.cu) are this loop with their own fill. load_tile
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
                                          const float* __restrict__ cscale_f, bool vec,
                                          const float* __restrict__ rscale_f = nullptr) {
  constexpr int V = Vec<T>::N;
  static_assert(C % V == 0, "tile columns must be a multiple of the vector width");
  constexpr int CV = C / V;
  constexpr int NV = R * CV;
  static_assert(NV % NT == 0, "tile vectors must divide evenly among the threads");
#pragma unroll 1  // one vector in flight: the GEMMs around it hold their accumulators
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
    const bool in = r < rows && c < cols;
    cp_async16(smem + r * lds + c, in ? g + (int64_t)r * ldg + c : g, in ? 16 : 0);
  }
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
template <typename T> struct MmaOp;
#if defined(__CUDACC__)
template <> struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <> struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
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
    const int lane = (int)threadIdx.x % 32, warp = (int)threadIdx.x / 32;
    const int wm = warp / WN, wn = warp % WN;
    // lane -> the row it addresses in each x4 load: A blocks are (m 0-7, 8-15) x (k 0-7, 8-15)
    // as matrices 0..3 = (m lo, k lo), (m hi, k lo), (m lo, k hi), (m hi, k hi); B blocks are
    // (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo), (n 8-15, k hi)
    const int l8 = lane % 8, q = lane / 8;
#pragma unroll 1  // one k step of fragments live at a time: 128 registers at 2 CTAs per SM
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[FM][4], b[FN][4];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m0 = (wm * FM + i) * 16;
        if constexpr (A_COL) {  // stored [k][m]: row k, 8 columns of m
          const int k = kk + l8 + (q / 2) * 8, m = m0 + (q % 2) * 8;
          ldmatrix_x4<true>(a[i], As + k * lda + m);
        } else {  // stored [m][k]
          const int m = m0 + l8 + (q % 2) * 8, k = kk + (q / 2) * 8;
          ldmatrix_x4<false>(a[i], As + m * lda + k);
        }
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n0 = (wn * FN + j) * 16;
        if constexpr (B_COL) {  // stored [n][k]
          const int n = n0 + l8 + (q / 2) * 8, k = kk + (q % 2) * 8;
          ldmatrix_x4<false>(b[j], Bs + n * ldb + k);
        } else {  // stored [k][n]
          const int k = kk + l8 + (q % 2) * 8, n = n0 + (q / 2) * 8;
          ldmatrix_x4<true>(b[j], Bs + k * ldb + n);
        }
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

// ------------------------------------------------------------------ host helpers

// Per-thread error message for mw_last_error(): "<entry point>: <what is wrong>", naming the
// argument (a field of MwModLinearParams, in backquotes) and the value expected.
void set_error(const char* fmt, ...);
const char* last_error();

// Return codes.
enum { MW_OK = MW_RC_OK, MW_EINVAL = MW_RC_EINVAL, MW_ECUDA = MW_RC_ECUDA };

// Shared checks of every launcher: sizes positive and within the grid limits, dtype
// known, pointers for the tensors `need` lists present, device current. 0 or an error.
int check_common(const MwModLinearParams* p, const char* who);
// The same for the per-token kernels (their grid limits, a_div / s_div / bias_div).
int check_token(const MwModLinearParams* p, const char* who);
// check_common without the pointers (plans: sizes, dtype and device only).
int check_sizes(const MwModLinearParams* p, const char* who);
// Opt the kernel into `smem` bytes of dynamic shared memory, if the device allows it.
int prepare_smem(const void* kernel, int smem, int device, const char* who);
// After a launch: the launch error, if any, as an error code with a message.
int check_launch(const char* who);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mw
