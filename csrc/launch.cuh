// Host side of the launchers, shared by every entry point: the error message, the checks
// (api.cu), the dispatch from MwModLinearParams::dtype to the element type, and one launch
// (shared-memory opt-in, <<<...>>>, the launch error). The entry points are written as
//
//     if (int rc = mw::check_entry(p, __func__, false, p && p->d, "`d` (the output) ...")) return rc;
//     return mw::launch_typed([](auto t) { return mw::_mod_linear_demod_kernel<MW_ELEM(t)>; }, grid, 256,
//                             p, stream, __func__);
//
// so that the checks, the dtype switch and the launch sequence are written once, here.
#pragma once
#include "common.cuh"

namespace mw {

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
// MW_OK when `ok`, else MW_EINVAL with the message "<who>: <what>".
int need(bool ok, const char* who, const char* what);
// What every entry point checks first: check_common (`token`: check_token), then `ok`, the
// pointers this entry point needs (written `p && ...`: it is evaluated before the checks and
// decides only after them), else MW_EINVAL with "<who>: <what>".
inline int check_entry(const MwModLinearParams* p, const char* who, bool token, bool ok, const char* what) {
  if (int rc = token ? check_token(p, who) : check_common(p, who)) return rc;
  return need(ok, who, what);
}
// Opt the kernel into `smem` bytes of dynamic shared memory, if the device allows it.
int prepare_smem(const void* kernel, int smem, int device, const char* who);
// After a launch: the launch error, if any, as an error code with a message.
int check_launch(const char* who);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The element type an MwDtype code names, as a value: by_dtype calls f(Elem<T>{}) and the
// callee takes T back with MW_ELEM(t).
template <typename T> struct Elem { using type = T; };
#define MW_ELEM(t) typename decltype(t)::type

// f(Elem<T>{}) for the element type of `dtype` (float, __half, __nv_bfloat16); MW_EINVAL for
// an unknown code (check_core refuses those first).
template <typename F>
int by_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case MW_F32: return f(Elem<float>{});
    case MW_F16: return f(Elem<__half>{});
    case MW_BF16: return f(Elem<__nv_bfloat16>{});
  }
  return MW_EINVAL;
}

// One launch of `kernel` (every kernel takes the params by value): the kernel opted into
// `smem` bytes of dynamic shared memory first when it needs any, the launch error checked after.
// `stream` is the entry point's cudaStream_t.
inline int launch(void (*kernel)(MwModLinearParams), dim3 grid, int threads, int smem, const MwModLinearParams* p,
                  void* stream, const char* who) {
  if (smem > 0)
    if (int rc = prepare_smem((const void*)kernel, smem, p->device, who)) return rc;
  kernel<<<grid, threads, smem, static_cast<cudaStream_t>(stream)>>>(*p);
  return check_launch(who);
}

// launch() of the kernel for p's element type: kernel_of(Elem<T>{}) names it, e.g.
// `[](auto t) { return _mod_linear_demod_kernel<MW_ELEM(t)>; }`; smem_of(Elem<T>{}) its bytes.
template <typename KernelOf, typename SmemOf>
int launch_typed(KernelOf&& kernel_of, dim3 grid, int threads, SmemOf&& smem_of, const MwModLinearParams* p,
                 void* stream, const char* who) {
  return by_dtype(p->dtype, [&](auto t) { return launch(kernel_of(t), grid, threads, smem_of(t), p, stream, who); });
}
// the same without dynamic shared memory
template <typename KernelOf>
int launch_typed(KernelOf&& kernel_of, dim3 grid, int threads, const MwModLinearParams* p, void* stream,
                 const char* who) {
  return launch_typed(kernel_of, grid, threads, [](auto) { return 0; }, p, stream, who);
}

}  // namespace mw
