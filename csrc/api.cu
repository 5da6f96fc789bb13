// Host side shared by the launchers: error messages, common checks, the ABI version, the
// device check and the device-restoring call wrapper that binding.cpp uses. No kernels here.
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <mutex>
#include <vector>

#include "launch.cuh"

namespace mw {

static thread_local char g_error[1024] = "";

void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
}

const char* last_error() { return g_error; }

int need(bool ok, const char* who, const char* what) {
  if (ok) return MW_OK;
  set_error("%s: %s", who, what);
  return MW_EINVAL;
}

// The checks of both kernel families; `token` picks the grid limits: the per-sample
// kernels put samples on grid.z and 128-row tiles on grid.y, the per-token kernels put
// 64-row tiles of R = B * T on grid.x and 64-column tiles of I or O on grid.y.
static int check_core(const MwModLinearParams* p, const char* who, bool token, bool ptrs = true) {
  if (!p) {
    set_error("%s: params is NULL", who);
    return MW_EINVAL;
  }
  if (p->dtype != MW_F32 && p->dtype != MW_F16 && p->dtype != MW_BF16) {
    set_error("%s: `dtype` must be 0 (float32), 1 (float16) or 2 (bfloat16); got %d", who, (int)p->dtype);
    return MW_EINVAL;
  }
  const struct { const char* name; int64_t v; } sizes[] = {{"B", p->B}, {"T", p->T}, {"I", p->I}, {"O", p->O},
                                                           {"K", p->K}};
  for (const auto& sz : sizes) {
    if (sz.v < 1) {
      set_error("%s: `%s` must be >= 1; got %lld", who, sz.name, (long long)sz.v);
      return MW_EINVAL;
    }
  }
  if (!token) {
    // grid limits: samples on grid.z (<= 65535), row tiles of 128 on grid.y (<= 65535),
    // K loops and shared arrays in int
    if (p->B > 65535 || cdiv(p->T, 128) > 65535 || p->K > 1024 || p->O > ((int64_t)1 << 31) - 256 ||
        p->I > ((int64_t)1 << 31) - 256) {
      set_error("%s: sizes out of range for the kernels (B <= 65535, T <= 8388480, K <= 1024, "
                "I, O < 2^31); got B=%lld T=%lld I=%lld O=%lld K=%lld", who, (long long)p->B,
                (long long)p->T, (long long)p->I, (long long)p->O, (long long)p->K);
      return MW_EINVAL;
    }
  } else {
    const int64_t R = p->B * p->T;
    if (p->B > ((int64_t)1 << 40) / p->T || cdiv(R, MW_TOKEN_TILE) > 2147483647LL || p->K > 1024 ||
        cdiv(p->O, MW_TOKEN_TILE) > 65535 || cdiv(p->I, MW_TOKEN_TILE) > 65535) {
      set_error("%s: sizes out of range for the per-token kernels (B * T < 2^37, K <= 1024, "
                "I, O <= 4194240); got B=%lld T=%lld I=%lld O=%lld K=%lld", who, (long long)p->B,
                (long long)p->T, (long long)p->I, (long long)p->O, (long long)p->K);
      return MW_EINVAL;
    }
    if (p->a_div < 1 || p->s_div < 1 || (p->bias && p->bias_div < 1)) {
      set_error("%s: `a_div`, `s_div` (and `bias_div` with a bias) must be >= 1; got %lld, %lld, %lld", who,
                (long long)p->a_div, (long long)p->s_div, (long long)p->bias_div);
      return MW_EINVAL;
    }
  }
  if (ptrs && (!p->bank || !p->x)) {
    set_error("%s: `%s` must be a device pointer; got 0", who, p->x ? "bank" : "x");
    return MW_EINVAL;
  }
  if (ptrs && p->K > 1 && !p->coeffs) {
    set_error("%s: `coeffs` must be a device pointer with K = %lld > 1; got 0", who, (long long)p->K);
    return MW_EINVAL;
  }
  if (p->bias && p->bias_stride_b != 0 && p->bias_stride_b != p->O) {
    set_error("%s: `bias_stride_b` must be 0 or O = %lld; got %lld", who, (long long)p->O,
              (long long)p->bias_stride_b);
    return MW_EINVAL;
  }
  int cur = -1;
  cudaError_t e = cudaGetDevice(&cur);
  if (e != cudaSuccess) {
    set_error("%s: cudaGetDevice failed: %s", who, cudaGetErrorString(e));
    return MW_ECUDA;
  }
  if (cur != p->device) {
    e = cudaSetDevice(p->device);
    if (e != cudaSuccess) {
      set_error("%s: cudaSetDevice(%d) failed: %s", who, (int)p->device, cudaGetErrorString(e));
      return MW_ECUDA;
    }
  }
  return MW_OK;
}

int check_common(const MwModLinearParams* p, const char* who) { return check_core(p, who, false); }

int check_token(const MwModLinearParams* p, const char* who) { return check_core(p, who, true); }

int check_sizes(const MwModLinearParams* p, const char* who) { return check_core(p, who, false, false); }

// Kernels already opted in, per device, with the bytes they were given: the attribute is set
// once per (kernel, device), not on every launch.
namespace {
constexpr int kMaxDevices = 64;
struct SmemOpt {
  const void* kernel;
  int bytes;
};
std::mutex g_smem_mutex;
std::vector<SmemOpt> g_smem_set[kMaxDevices];
}  // namespace

int prepare_smem(const void* kernel, int smem, int device, const char* who) {
  std::vector<SmemOpt>* done = device >= 0 && device < kMaxDevices ? &g_smem_set[device] : nullptr;
  if (done) {
    std::lock_guard<std::mutex> lock(g_smem_mutex);
    for (const SmemOpt& s : *done)
      if (s.kernel == kernel && s.bytes >= smem) return MW_OK;
  }
  int optin = 0;
  cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) {
    set_error("%s: cudaDeviceGetAttribute failed: %s", who, cudaGetErrorString(e));
    return MW_ECUDA;
  }
  if (smem > optin) {
    set_error("%s: needs %d bytes of shared memory per block; device %d allows %d", who, smem, device,
              optin);
    return MW_EINVAL;
  }
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) {
    set_error("%s: cudaFuncSetAttribute(%d bytes) failed: %s", who, smem, cudaGetErrorString(e));
    return MW_ECUDA;
  }
  if (done) {
    std::lock_guard<std::mutex> lock(g_smem_mutex);
    bool found = false;
    for (SmemOpt& s : *done)
      if (s.kernel == kernel) s.bytes = s.bytes > smem ? s.bytes : smem, found = true;
    if (!found) done->push_back({kernel, smem});
  }
  return MW_OK;
}

int check_launch(const char* who) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    set_error("%s: kernel launch failed: %s (%s)", who, cudaGetErrorString(e), cudaGetErrorName(e));
    return MW_ECUDA;
  }
  return MW_OK;
}

// In fwd.cu: cudaFuncGetAttributes on one kernel, i.e. is there code for this device.
cudaError_t probe_kernel_image();

}  // namespace mw

extern "C" {

int mw_abi_version(void) { return MW_ABI_VERSION; }

const char* mw_last_error(void) { return mw::last_error(); }

int mw_device_check(int device) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    mw::set_error("no usable CUDA device: cudaGetDeviceCount failed: %s (%s)", cudaGetErrorString(e),
                  cudaGetErrorName(e));
    return mw::MW_ECUDA;
  }
  if (device < 0 || device >= count) {
    mw::set_error("CUDA device %d does not exist (%d devices)", device, count);
    return mw::MW_EINVAL;
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major < 8) {
    mw::set_error("device %d has compute capability %d.%d; the kernels need 8.0 or newer", device, major,
                  minor);
    return mw::MW_EINVAL;
  }
  int cur = 0;
  cudaGetDevice(&cur);
  if (cur != device) cudaSetDevice(device);
  e = mw::probe_kernel_image();
  if (cur != device) cudaSetDevice(cur);
  if (e != cudaSuccess) {
    mw::set_error("this build has no kernel code for device %d (compute capability %d.%d): %s; "
                  "rebuild with MODWEIGHTS_CUDA_ARCH naming it", device, major, minor,
                  cudaGetErrorString(e));
    return mw::MW_ECUDA;
  }
  return mw::MW_OK;
}

// The entry points make p->device current (check_core); the caller's current device is put
// back here, so a call leaves the process as it found it (torch's current device included).
int mw_run(int (*fn)(const MwModLinearParams*, void*), const MwModLinearParams* p, void* stream) {
  int cur = -1;
  const bool known = cudaGetDevice(&cur) == cudaSuccess;
  const int rc = fn(p, stream);
  if (known && p && cur != p->device) cudaSetDevice(cur);
  return rc;
}

int mw_run_plan(MwModLinearParams* p) {
  int cur = -1;
  const bool known = cudaGetDevice(&cur) == cudaSuccess;
  const int rc = mw_mod_linear_bwd_weight_plan(p);
  if (known && p && cur != p->device) cudaSetDevice(cur);
  return rc;
}

}  // extern "C"
