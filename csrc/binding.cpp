// modweights._cuda: the pybind11 binding of the kernels' entry points (mod_linear.h).
//
// Host C++ only: no CUDA headers, no torch headers (the build stays seconds and the module is
// tied to a Python version, not to a torch version). Python fills one `ModLinearParams`, the
// struct the kernels themselves take (`MwModLinearParams`, passed to every kernel by value):
// device pointers as ints (0: absent), sizes, flags; every launch function takes it and the
// stream (`torch.cuda.current_stream(device).cuda_stream`, an int). A failed check or launch
// raises: ValueError for a bad argument (the message names it and the value expected),
// RuntimeError for a CUDA error. The current CUDA device is restored after every call.
//
// Compiled twice: by setup.py into `modweights._cuda` (nvcc objects of the .cu files, the CUDA
// runtime linked shared: the libcudart torch has loaded) and by csrc/emu/build_emu.py into
// `_cuda_emu` (g++ objects of the same .cu source for the host emulation, MW_MODULE=_cuda_emu).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "mod_linear.h"

#ifndef MW_MODULE
#define MW_MODULE _cuda
#endif

namespace py = pybind11;

namespace {

using Entry = int (*)(const MwModLinearParams*, void*);

// The C entry points' codes as Python exceptions; messages lose the C prefix ("mw_").
[[noreturn]] void raise_error(int rc) {
  std::string msg = mw_last_error();
  if (msg.rfind("mw_", 0) == 0) msg.erase(0, 3);
  if (rc == MW_RC_EINVAL) throw py::value_error("modweights._cuda." + msg);
  throw std::runtime_error("modweights._cuda." + msg);
}

void launch(Entry fn, const MwModLinearParams& p, uintptr_t stream) {
  int rc;
  {
    py::gil_scoped_release nogil;  // launches can block (a full queue); let other threads run
    rc = mw_run(fn, &p, reinterpret_cast<void*>(stream));
  }
  if (rc) raise_error(rc);
}

// The weight-side plan (the wt_* fields of MwModLinearParams), cached by the caller per problem.
struct WeightPlan {
  int32_t config, bo, bi, kg, ngroups, nsplit, n_otiles, n_itiles, smem;
};

WeightPlan plan_of(const MwModLinearParams& p) {
  return {p.wt_config, p.wt_bo, p.wt_bi, p.wt_kg, p.wt_ngroups, p.wt_nsplit, p.wt_n_otiles, p.wt_n_itiles, p.wt_smem};
}

MwModLinearParams make_params(int64_t B, int64_t T, int64_t I, int64_t O, int64_t K, int32_t dtype,
                              int32_t device, float eps, bool deterministic, int64_t a_div, int64_t s_div,
                              int64_t bias_div, int64_t bias_stride_b) {
  if (dtype != MW_F32 && dtype != MW_F16 && dtype != MW_BF16)
    throw py::value_error("modweights._cuda.ModLinearParams: `dtype` must be 0 (float32), 1 (float16) or 2 (bfloat16); "
                          "got " + std::to_string(dtype));
  const struct { const char* name; int64_t v; } sizes[] = {
      {"B", B}, {"T", T}, {"I", I}, {"O", O}, {"K", K}, {"a_div", a_div}, {"s_div", s_div}, {"bias_div", bias_div}};
  for (const auto& s : sizes)
    if (s.v < 1)
      throw py::value_error(std::string("modweights._cuda.ModLinearParams: `") + s.name + "` must be >= 1; got " +
                            std::to_string(s.v));
  if (bias_stride_b != 0 && bias_stride_b != O)
    throw py::value_error("modweights._cuda.ModLinearParams: `bias_stride_b` must be 0 or O = " + std::to_string(O) +
                          "; got " + std::to_string(bias_stride_b));
  if (device < 0)
    throw py::value_error("modweights._cuda.ModLinearParams: `device` must be a device index >= 0; got " +
                          std::to_string(device));
  MwModLinearParams p{};
  p.B = B, p.T = T, p.I = I, p.O = O, p.K = K;
  p.dtype = dtype, p.device = device, p.eps = eps, p.deterministic = deterministic ? 1 : 0;
  p.a_div = a_div, p.s_div = s_div, p.bias_div = bias_div, p.bias_stride_b = bias_stride_b;
  return p;
}

}  // namespace

// A pointer field: an int (a torch tensor's data_ptr(), 0 for absent) in both directions.
#define MW_PTR(name)                                                                                     \
  def_property(                                                                                          \
      #name, [](const MwModLinearParams& p) { return reinterpret_cast<uintptr_t>(p.name); },            \
      [](MwModLinearParams& p, uintptr_t v) { p.name = reinterpret_cast<decltype(p.name)>(v); })
#define MW_LAUNCH(name, entry, doc) \
  m.def(name, [](const MwModLinearParams& p, uintptr_t stream) { launch(entry, p, stream); }, doc, \
        py::arg("params"), py::arg("stream"))

PYBIND11_MODULE(MW_MODULE, m) {
  m.doc() = "modweights CUDA kernels (csrc/): the modulated / mixture linear op. See csrc/README.md.";
  m.attr("ABI_VERSION") = MW_ABI_VERSION;
  m.attr("TOKEN_TILE") = MW_TOKEN_TILE;
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");  // dtype codes 0, 1, 2

  py::class_<MwModLinearParams>(m, "ModLinearParams", py::module_local(),
                                "MwModLinearParams (csrc/mod_linear.h): device pointers (ints, 0 = absent), sizes, "
                                "flags. Sizes and flags are fixed at construction.")
      .def(py::init(&make_params), py::arg("B"), py::arg("T"), py::arg("I"), py::arg("O"), py::arg("K"),
           py::arg("dtype"), py::arg("device"), py::arg("eps") = 1e-8f, py::arg("deterministic") = false,
           py::arg("a_div") = 1, py::arg("s_div") = 1, py::arg("bias_div") = 1, py::arg("bias_stride_b") = 0)
      .MW_PTR(x).MW_PTR(bank).MW_PTR(coeffs).MW_PTR(styles).MW_PTR(bias).MW_PTR(d).MW_PTR(g).MW_PTR(y)
      .MW_PTR(c).MW_PTR(gsum).MW_PTR(dx).MW_PTR(dbank).MW_PTR(dbank_acc).MW_PTR(dcoeffs_acc)
      .MW_PTR(dstyles_acc).MW_PTR(gz).MW_PTR(ds_rows).MW_PTR(da_rows)
      .def_readonly("B", &MwModLinearParams::B).def_readonly("T", &MwModLinearParams::T)
      .def_readonly("I", &MwModLinearParams::I).def_readonly("O", &MwModLinearParams::O)
      .def_readonly("K", &MwModLinearParams::K).def_readonly("dtype", &MwModLinearParams::dtype)
      .def_readonly("device", &MwModLinearParams::device).def_readonly("eps", &MwModLinearParams::eps)
      .def_readonly("deterministic", &MwModLinearParams::deterministic)
      .def_readonly("a_div", &MwModLinearParams::a_div).def_readonly("s_div", &MwModLinearParams::s_div)
      .def_readonly("bias_div", &MwModLinearParams::bias_div)
      .def_readonly("bias_stride_b", &MwModLinearParams::bias_stride_b)
      .def_readwrite("want_dbank", &MwModLinearParams::want_dbank)
      .def_readwrite("want_dcoeffs", &MwModLinearParams::want_dcoeffs)
      .def_readwrite("want_dstyles", &MwModLinearParams::want_dstyles);

  py::class_<WeightPlan>(m, "WeightPlan", py::module_local(),
                         "The weight kernel's plan: tile config (0: 128x128, 1: 64x64, 2: 32x32), tile "
                         "(bo x bi), bank entries per group (kg) and groups, sample split, tiles, shared bytes.")
      .def_readonly("config", &WeightPlan::config).def_readonly("bo", &WeightPlan::bo)
      .def_readonly("bi", &WeightPlan::bi).def_readonly("kg", &WeightPlan::kg)
      .def_readonly("ngroups", &WeightPlan::ngroups).def_readonly("nsplit", &WeightPlan::nsplit)
      .def_readonly("n_otiles", &WeightPlan::n_otiles).def_readonly("n_itiles", &WeightPlan::n_itiles)
      .def_readonly("smem", &WeightPlan::smem)
      .def("__repr__", [](const WeightPlan& w) {
        return "WeightPlan(config=" + std::to_string(w.config) + ", tile=" + std::to_string(w.bo) + "x" +
               std::to_string(w.bi) + ", kg=" + std::to_string(w.kg) + ", ngroups=" + std::to_string(w.ngroups) +
               ", nsplit=" + std::to_string(w.nsplit) + ", smem=" + std::to_string(w.smem) + ")";
      });

  m.def("abi_version", &mw_abi_version, "MW_ABI_VERSION the module was compiled with");
  m.def(
      "device_check",
      [](int device) -> std::string {
        py::gil_scoped_release nogil;
        return mw_device_check(device) == 0 ? std::string() : std::string(mw_last_error());
      },
      "'' when `device` exists and this build holds kernel code for it, else why not", py::arg("device"));

  MW_LAUNCH("mod_linear_demod", mw_mod_linear_demod,
            "d[b, o] = rsqrt(sum_i (sum_k a W_k[o,i] s_i)^2 + eps) (reads bank, coeffs, styles; writes d)");
  MW_LAUNCH("mod_linear_forward", mw_mod_linear_forward,
            "y = d * ((x * s) @ M_b^T) + bias (reads x, bank, coeffs, styles, bias, d; writes y)");
  MW_LAUNCH("mod_linear_bwd_stats", mw_mod_linear_bwd_stats,
            "gsum = sum_t g; c = d^2 sum_t g (y - bias) (reads g, y, d, bias)");
  MW_LAUNCH("mod_linear_bwd_dx", mw_mod_linear_bwd_dx, "dx = s * ((g * d) @ M_b)");
  m.def(
      "mod_linear_bwd_weight_plan",
      [](const MwModLinearParams& p) {
        MwModLinearParams q = p;
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = mw_run_plan(&q);
        }
        if (rc) raise_error(rc);
        return plan_of(q);
      },
      "The weight kernel's plan for these sizes, dtype and wanted outputs on this device", py::arg("params"));
  m.def(
      "mod_linear_bwd_weight",
      [](const MwModLinearParams& p, const WeightPlan& w, uintptr_t stream) {
        MwModLinearParams q = p;
        q.wt_config = w.config, q.wt_bo = w.bo, q.wt_bi = w.bi, q.wt_kg = w.kg, q.wt_ngroups = w.ngroups;
        q.wt_nsplit = w.nsplit, q.wt_n_otiles = w.n_otiles, q.wt_n_itiles = w.n_itiles, q.wt_smem = w.smem;
        launch(mw_mod_linear_bwd_weight, q, stream);
      },
      "dbank, dcoeffs, dstyles in one pass over (g * d, x) per output tile, with `plan` from "
      "mod_linear_bwd_weight_plan",
      py::arg("params"), py::arg("plan"), py::arg("stream"));
  MW_LAUNCH("mod_linear_token_demod", mw_mod_linear_token_demod, "per token: d[r, o]");
  MW_LAUNCH("mod_linear_token_forward", mw_mod_linear_token_forward, "per token: y[r, o]");
  MW_LAUNCH("mod_linear_token_prep", mw_mod_linear_token_prep, "per token: gz = g d, c = g (y - bias) d^2");
  MW_LAUNCH("mod_linear_token_dx", mw_mod_linear_token_dx, "per token: dx, the x u part of ds, the gz part of da");
  MW_LAUNCH("mod_linear_token_ds_demod", mw_mod_linear_token_ds_demod, "per token: the demodulation part of ds");
  MW_LAUNCH("mod_linear_token_da_demod", mw_mod_linear_token_da_demod, "per token: the demodulation part of da");
  MW_LAUNCH("mod_linear_token_weight", mw_mod_linear_token_weight, "per token: dbank");
}
