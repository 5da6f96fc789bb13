// Host emulation of the small part of CUDA that the modweights kernels use, so that the
// very same kernel source runs on a CPU for testing (see csrc/emu/README.md).
//
// A launch runs the blocks one after another; each block runs as blockDim std::threads
// with real barriers for __syncthreads and a per-warp exchange for __shfl_xor_sync.
// __shared__ arrays become function statics (one block at a time, so one copy suffices)
// and dynamic shared memory is one static buffer. ldmatrix and mma.sync are emulated lane
// by lane with their documented fragment layouts. Half and bfloat16 are 16-bit storage
// types with round-to-nearest-even conversions.
//
// What this cannot show: real GPU scheduling and memory ordering, alignment faults, bank
// conflicts, speed, and whether the hardware matches the documented fragment
// semantics (that is what the GPU tests are for).
#pragma once
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

// ------------------------------------------------------------------ vector and index types
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

// ------------------------------------------------------------------ 16-bit float types
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };

inline float __half2float(__half h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline __half __float2half_rn(float v) {
  _Float16 f = (_Float16)v;  // round to nearest even
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.bits << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN
    b.bits = 0x7fc0;
    return b;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  b.bits = (uint16_t)(u >> 16);
  return b;
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }

inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }

// ------------------------------------------------------------------ runtime API stand-ins
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes { int maxThreadsPerBlock; };

namespace mw_emu {
// The emulated device: H100-like by default; MW_EMU_SMEM / MW_EMU_SMS change it (e.g. an
// A100's 166912 bytes, to exercise the smaller weight-kernel tiles).
inline int env_int(const char* name, int dflt) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : dflt;
}
inline int smem_optin() { return env_int("MW_EMU_SMEM", 232448); }
inline int sm_count() { return env_int("MW_EMU_SMS", 132); }
constexpr size_t kSmemBytes = 256 * 1024;
// dynamic shared memory (`extern __shared__ ... smem_raw[]` is rewritten to point here)
alignas(128) inline unsigned char dyn_smem[kSmemBytes];
}  // namespace mw_emu

inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = mw_emu::smem_optin(); break;
    case cudaDevAttrMultiProcessorCount: *v = mw_emu::sm_count(); break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) {
  return (size_t)v <= mw_emu::kSmemBytes ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void*) {
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
namespace mw_emu { inline thread_local cudaError_t last_error = cudaSuccess; }
inline cudaError_t cudaGetLastError() {
  cudaError_t e = mw_emu::last_error;
  mw_emu::last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "emulated error" : "no error"; }
inline const char* cudaGetErrorName(cudaError_t e) { return e ? "cudaErrorEmulated" : "cudaSuccess"; }

// ------------------------------------------------------------------ threads and blocks
namespace mw_emu {
inline thread_local dim3 tl_thread, tl_block;
struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<float> shfl;
  std::vector<const void*> xptr;  // ldmatrix: the row address of every lane
  std::vector<uint32_t> xreg;     // mma.sync: every lane's fragments (8 words a lane)
  int nthreads = 0;
};
inline Block* g_block = nullptr;
inline dim3 g_block_dim, g_grid_dim;
}  // namespace mw_emu

#define threadIdx (::mw_emu::tl_thread)
#define blockIdx (::mw_emu::tl_block)
#define blockDim (::mw_emu::g_block_dim)
#define gridDim (::mw_emu::g_grid_dim)

inline void __syncthreads() { mw_emu::g_block->all->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int off) {
  mw_emu::Block* b = mw_emu::g_block;
  const int t = (int)threadIdx.x, w = t / 32, lane = t % 32;
  b->shfl[t] = v;
  b->warp[w]->arrive_and_wait();
  const float r = b->shfl[w * 32 + (lane ^ off)];
  b->warp[w]->arrive_and_wait();
  return r;
}

inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v);
}

namespace mw_emu {
template <class Kernel, class P>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, const P& params) {
  const int n = (int)(block.x * block.y * block.z);
  if (smem > kSmemBytes || n < 1 || n > 1024 || n % 32) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  // MW_EMU_NO_KERNELS=1: launches are checked and dropped, so that a benchmark can time the
  // host side alone (benchmarks/cuda_host_overhead.py); results are then garbage
  static const bool no_kernels = env_int("MW_EMU_NO_KERNELS", 0) != 0;
  if (no_kernels) return;
  g_grid_dim = grid;
  g_block_dim = block;
  const long nblocks = (long)grid.x * grid.y * grid.z;
  Block b;
  b.nthreads = n;
  b.all = std::make_unique<std::barrier<>>(n);
  for (int w = 0; w < n / 32; ++w) b.warp.push_back(std::make_unique<std::barrier<>>(32));
  b.shfl.assign(n, 0.f);
  b.xptr.assign(n, nullptr);
  b.xreg.assign((size_t)n * 8, 0u);
  g_block = &b;
  // one set of threads runs the blocks in order; between blocks (the barrier's completion
  // step, while every thread waits) shared memory is refilled with NaN: reading what a
  // block never wrote shows up in the results
  long cur = 0;
  memset(dyn_smem, 0xff, smem);
  auto next_block = [&]() noexcept {
    ++cur;
    memset(dyn_smem, 0xff, smem);
  };
  std::barrier<decltype(next_block)> boundary(n, next_block);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int t = 0; t < n; ++t)
    threads.emplace_back([&, t] {
      tl_thread = dim3((unsigned)t, 0, 0);
      for (;;) {
        const long c = cur;  // stable: only changed while every thread waits at the boundary
        if (c >= nblocks) break;
        tl_block = dim3((unsigned)(c % grid.x), (unsigned)(c / grid.x % grid.y), (unsigned)(c / grid.x / grid.y));
        kernel(params);
        boundary.arrive_and_wait();
      }
    });
  for (auto& th : threads) th.join();
  g_block = nullptr;
}
}  // namespace mw_emu

// ------------------------------------------------------------------ cp.async
// The copy happens at issue time; commit and wait have nothing to wait for. The kernels'
// barriers around them still order the stages (a stage refilled too early shows up).
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  memcpy(dst, src, (size_t)src_bytes);
  memset(static_cast<char*>(dst) + src_bytes, 0, (size_t)(16 - src_bytes));
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

// ------------------------------------------------------------------ ldmatrix, mma.sync
// Warp-collective, lane by lane as the PTX ISA documents them (m8n8.x4 ldmatrix, the
// m16n8k16 fragments; g = lane / 4, t = lane % 4): every lane posts its part, the warp
// meets at a barrier, every lane takes what the layout gives it.
namespace mw_emu {
inline uint16_t ld16(const void* p, int e) {
  uint16_t v;
  memcpy(&v, static_cast<const char*>(p) + 2 * e, 2);
  return v;
}
inline uint32_t pack(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

// r[j] = this lane's two elements of matrix j, whose 8 rows lanes 8j .. 8j+7 address:
// (row g, columns 2t, 2t+1), or with trans (rows 2t, 2t+1, column g)
inline void ldmatrix_x4(uint32_t* r, const void* row_addr, bool trans) {
  Block* b = g_block;
  const int tid = (int)threadIdx.x, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  b->xptr[tid] = row_addr;
  b->warp[w]->arrive_and_wait();
  for (int j = 0; j < 4; ++j) {
    const void* const* rows = &b->xptr[w * 32 + 8 * j];
    r[j] = trans ? pack(ld16(rows[2 * t], g), ld16(rows[2 * t + 1], g))
                 : pack(ld16(rows[g], 2 * t), ld16(rows[g], 2 * t + 1));
  }
  b->warp[w]->arrive_and_wait();
}

template <class T>
inline float half_to_f(uint16_t bits) {
  T h;
  h.bits = bits;
  if constexpr (std::is_same<T, __half>::value) return __half2float(h);
  else return __bfloat162float(h);
}

// d (this lane's c0..c3) += A (16 x 16, from a0..a3 of every lane) * B (16 x 8, b0, b1)
template <class T>
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* bf) {
  Block* b = g_block;
  const int tid = (int)threadIdx.x, w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  uint32_t* mine = &b->xreg[(size_t)tid * 8];
  for (int e = 0; e < 4; ++e) mine[e] = a[e];
  mine[4] = bf[0];
  mine[5] = bf[1];
  b->warp[w]->arrive_and_wait();
  const uint32_t* all = &b->xreg[(size_t)w * 32 * 8];
  auto A = [&](int row, int k) {  // a0: (g, 2t..), a1: (g+8, 2t..), a2: (g, 2t+8..), a3: (g+8, 2t+8..)
    const int src = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    const uint32_t v = all[src * 8 + reg];
    return half_to_f<T>((uint16_t)((k % 2) ? v >> 16 : v & 0xffffu));
  };
  auto B = [&](int k, int n) {  // b0: (k 2t.., n g), b1: (k 2t+8.., n g)
    const int src = n * 4 + (k % 8) / 2;
    const uint32_t v = all[src * 8 + 4 + (k >= 8 ? 1 : 0)];
    return half_to_f<T>((uint16_t)((k % 2) ? v >> 16 : v & 0xffffu));
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e % 2);
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    out[e] = s;
  }
  b->warp[w]->arrive_and_wait();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}
}  // namespace mw_emu
