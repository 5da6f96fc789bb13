// Backward pass, the weight side (docs/design.md section 2), per-sample conditioning:
//
//   _mod_linear_bwd_weight_kernel   for one output tile (o-tile x i-tile) and every sample b
//                                  of its split, in one pass over (gz_b, x_b):
//       Q_b      = gz_b^T x_b = d_b (g_b^T x_b)       (tensor cores over cp.async-staged g, x
//                                                    tiles; d_b scales the rows in the fold)
//       M_b      = sum_k a[b,k] W_k                  (bank tiles held in shared memory)
//       dV_b     = Q_b - c_b[:, None] * M_b * s_b[None, :]
//       dW_k    += a[b,k] * dV_b * s_b               (K accumulators in shared memory, fp32)
//       ds_b[i] += sum_o dV_b[o,i] M_b[o,i]          (per o-tile partial)
//       da_b[k] += <dV_b * s_b, W_k>                 (per tile partial)
//
// Reductions across CTAs: dW tiles belong to one CTA unless the samples are split
// (wt_nsplit > 1, for few tiles); ds and da always need a sum over tiles. Deterministic
// mode writes per-CTA partials that the caller sums in a fixed order; otherwise fp32
// atomics into zeroed accumulators. Within a CTA every sum runs in a fixed order.
//
// The K accumulators must fit on chip, which decides the tile: 128 x 128 (K small), 64 x 64,
// 32 x 32; when even 32 x 32 cannot hold all K, the bank is cut into groups of wt_kg
// entries, one group per CTA (grid.y), each recomputing Q_b (and reading the other
// groups' bank entries from global memory for M_b).
#include "launch.cuh"

namespace mw {

template <int CFG> struct WtWarps;
template <> struct WtWarps<0> { static constexpr int WM = 2, WN = 4, FM = 4, FN = 2; };  // 128 x 128
template <> struct WtWarps<1> { static constexpr int WM = 2, WN = 4, FM = 2, FN = 1; };  // 64 x 64
template <> struct WtWarps<2> { static constexpr int WM = 2, WN = 2, FM = 1, FN = 1; };  // 32 x 32

template <int CFG> struct WtShape {
  using W = WtWarps<CFG>;
  static constexpr int BO = W::WM * W::FM * 16;  // rows of O per tile
  static constexpr int BI = W::WN * W::FN * 16;  // columns of I per tile
  static constexpr int NT = W::WM * W::WN * 32, NWARPS = NT / 32;
  static constexpr int BK = 32;                   // rows of t per main-loop step
  static constexpr int STAGES = 2;                // (gz, x) tiles in flight (cp.async)
  static constexpr int RG = NT / BI;              // fold: row groups (thread = (rg, column))
  static constexpr int ROWS = BO / RG;            // fold: rows per thread
  static constexpr int RCH = ROWS < 16 ? ROWS : 16;  // fold: rows per step (registers)
  static constexpr int LDQ = BI + 4;
  static_assert(NT % BI == 0 && BO % RG == 0 && BI % 32 == 0 && ROWS % RCH == 0, "fold mapping");
};

struct WtLayout {
  int as, bs, qs, ws, dws, dsw, daw, coef, total;  // byte offsets into dynamic shared memory
};

__host__ __device__ inline int align128(int v) { return (v + 127) & ~127; }

// Shared-memory layout of the weight kernel; the host plan and the kernel both use it. The
// STAGES (gz, x) tile pairs of the Q loop and Q_b itself share the first region: Q_b is
// stored after the loop has drained and read by the fold before the next sample's copies.
template <int CFG>
__host__ __device__ inline WtLayout wt_layout(int kg, int K, bool want_dbank, int esize) {
  using S = WtShape<CFG>;
  const int pad = esize == 2 ? 8 : 4;  // as LdAsync<T, C>: 16-byte aligned rows for cp.async
  const int a_stage = align128(S::BK * (S::BO + pad) * esize);  // gz tile [t][o]
  const int b_stage = align128(S::BK * (S::BI + pad) * esize);  // x tile  [t][i]
  const int stages = S::STAGES * (a_stage + b_stage);
  const int q = align128(S::BO * S::LDQ * 4);                    // Q_b     [o][i] fp32
  WtLayout L;
  L.as = 0;
  L.bs = S::STAGES * a_stage;
  L.qs = 0;
  int off = stages > q ? stages : q;
  L.ws = off;   off = align128(off + kg * S::BO * S::BI * esize);      // W_k     [k][o][i]
  L.dws = off;  off = align128(off + (want_dbank ? kg * S::BO * S::BI * 4 : 0));  // dW_k fp32
  L.dsw = off;  off = align128(off + S::RG * S::BI * 4);               // ds partials per row group
  L.daw = off;  off = align128(off + S::NWARPS * kg * 4);              // da partials per warp
  L.coef = off; off = align128(off + K * 4);                           // a_b (all K)
  L.total = off;
  return L;
}

// f(std::integral_constant<int, CFG>{}) for the tile config `cfg` (0, 1, else 2).
template <typename F>
static int by_config(int cfg, F&& f) {
  switch (cfg) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    default: return f(std::integral_constant<int, 2>{});
  }
}

static int wt_smem(int cfg, int kg, int K, bool want_dbank, int esize) {
  return by_config(cfg, [&](auto c) { return wt_layout<decltype(c)::value>(kg, K, want_dbank, esize).total; });
}

template <typename T, int CFG>
__global__ void __launch_bounds__(WtShape<CFG>::NT, 1) _mod_linear_bwd_weight_kernel(const MwModLinearParams p) {
  using S = WtShape<CFG>;
  using W = WtWarps<CFG>;
  using Eng = typename EngineFor<T, W::WM, W::WN, W::FM, W::FN, true, false>::type;
  constexpr int BO = S::BO, BI = S::BI, BK = S::BK, NT = S::NT, NWARPS = S::NWARPS;
  constexpr int RG = S::RG, ROWS = S::ROWS, RCH = S::RCH, LDQ = S::LDQ;
  constexpr int LDA = LdAsync<T, BO>::value, LDB = LdAsync<T, BI>::value, NS = S::STAGES;
  constexpr int V = Vec<T>::N;
  static_assert(Eng::BM == BO && Eng::BN == BI, "engine tile");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int K = (int)p.K;
  const int kg = p.wt_kg;
  const bool want_dbank = p.want_dbank != 0;
  const WtLayout L = wt_layout<CFG>(kg, K, want_dbank, (int)sizeof(T));
  T* As = reinterpret_cast<T*>(smem_raw + L.as);        // [NS][BK][LDA] g (t, o): A = g^T, col-major
  T* Bs = reinterpret_cast<T*>(smem_raw + L.bs);        // [NS][BK][LDB] x (t, i)
  float* Qs = reinterpret_cast<float*>(smem_raw + L.qs);  // [BO][LDQ], over the stages after the loop
  T* Ws = reinterpret_cast<T*>(smem_raw + L.ws);        // [kn][BO][BI]
  float* dWs = reinterpret_cast<float*>(smem_raw + L.dws);  // [kn][BO][BI]
  float* dsw = reinterpret_cast<float*>(smem_raw + L.dsw);  // [RG][BI]
  float* daw = reinterpret_cast<float*>(smem_raw + L.daw);  // [NWARPS][kg]
  float* a_s = reinterpret_cast<float*>(smem_raw + L.coef);  // [K]

  const int tid = (int)threadIdx.x;
  const int64_t I = p.I, O = p.O, Tn = p.T, B = p.B;
  const int tile = (int)blockIdx.x;
  const int ot = tile / p.wt_n_itiles, it = tile % p.wt_n_itiles;
  const int64_t o0 = (int64_t)ot * BO, i0 = (int64_t)it * BI;
  const int split = (int)blockIdx.y / p.wt_ngroups, group = (int)blockIdx.y % p.wt_ngroups;
  const int kbeg = group * kg;
  const int kn = K - kbeg < kg ? K - kbeg : kg;
  const int64_t b_begin = (int64_t)split * B / p.wt_nsplit;
  const int64_t b_end = (int64_t)(split + 1) * B / p.wt_nsplit;
  const int rows_o = (int)(O - o0 < BO ? O - o0 : BO);
  const int cols_i = (int)(I - i0 < BI ? I - i0 : BI);
  const bool want_da = p.want_dcoeffs && p.coeffs;
  const bool want_ds = p.want_dstyles && p.styles && group == 0;
  const bool det = p.deterministic != 0;

  const T* bank = static_cast<const T*>(p.bank);
  const T* coeffs = static_cast<const T*>(p.coeffs);
  const T* styles = static_cast<const T*>(p.styles);
  const T* g = static_cast<const T*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  const bool vec_g = aligned16(p.g) && (O % V == 0);
  const bool vec_x = aligned16(p.x) && (I % V == 0);

  // this group's bank tiles on chip (zero in the tails), dW accumulators zeroed
  for (int e = tid; e < kn * BO * BI; e += NT) {
    const int kk = e / (BO * BI), rem = e % (BO * BI);
    const int r = rem / BI, cc = rem % BI;
    const bool in = r < rows_o && cc < cols_i;
    Ws[e] = in ? bank[((int64_t)(kbeg + kk) * O + o0 + r) * I + i0 + cc] : from_f<T>(0.f);
    if (want_dbank) dWs[e] = 0.f;
  }
  __syncthreads();

  // fold mapping: thread = (row group rg, column ci); rows rg + RG * r
  const int ci = tid % BI, rg = tid / BI, lane = tid % 32, warp = tid / 32;
  const int64_t i = i0 + ci;
  const bool ivalid = ci < cols_i;

  Eng eng;
  const int nchunks = (int)((Tn + BK - 1) / BK);
  for (int64_t b = b_begin; b < b_end; ++b) {
    // ---- Q_b = g_b^T x_b for this tile, over all t: the (g, x) tiles of chunk c+1 .. c+NS-1
    // are copied (cp.async) while chunk c is multiplied; d_b scales the rows of Q_b in the fold
    const T* gb = g + b * Tn * O + o0;
    const T* xb = x + b * Tn * I + i0;
    const float* db = p.d ? p.d + b * O + o0 : nullptr;
    auto issue = [&](int c) {  // chunk c into stage c % NS; one commit group per chunk
      if (c < nchunks) {
        const int64_t t0 = (int64_t)c * BK;
        const int rows_t = (int)(Tn - t0 < BK ? Tn - t0 : BK);
        T* a = As + (c % NS) * BK * LDA;
        T* bt = Bs + (c % NS) * BK * LDB;
        if (vec_g) async_tile<T, BK, BO, NT>(a, LDA, gb + t0 * O, O, rows_t, rows_o);
        else load_tile<T, BK, BO, NT>(a, LDA, gb + t0 * O, O, rows_t, rows_o, 1, 0, nullptr, nullptr, nullptr, false);
        if (vec_x) async_tile<T, BK, BI, NT>(bt, LDB, xb + t0 * I, I, rows_t, cols_i);
        else load_tile<T, BK, BI, NT>(bt, LDB, xb + t0 * I, I, rows_t, cols_i, 1, 0, nullptr, nullptr, nullptr, false);
      }
      cp_async_commit();
    };
    __syncthreads();  // the previous sample's fold is done with Qs (the stages) and a_s
#pragma unroll
    for (int c = 0; c < NS - 1; ++c) issue(c);
    eng.zero();
    for (int c = 0; c < nchunks; ++c) {
      cp_async_wait<NS - 2>();  // this thread's copies of chunk c have landed
      __syncthreads();          // everyone's; and stage (c - 1) % NS is consumed
      issue(c + NS - 1);
      eng.template chunk<BK>(As + (c % NS) * BK * LDA, LDA, Bs + (c % NS) * BK * LDB, LDB);
    }
    cp_async_wait<0>();
    __syncthreads();  // every MMA is done before Qs overwrites the stages
    eng.store(Qs, LDQ);
    for (int k = tid; k < K; k += NT) a_s[k] = coeffs ? to_f(coeffs[b * K + k]) : 1.f;
    __syncthreads();

    // ---- fold: M_b, dV_b, and the K accumulators / reductions, RCH rows at a time
    const float sv = ivalid ? (styles ? to_f(styles[b * I + i]) : 1.f) : 0.f;
    const float* cb = p.c ? p.c + b * O : nullptr;
    float dsp = 0.f;
#pragma unroll 1
    for (int r0 = 0; r0 < ROWS; r0 += RCH) {
      float v[RCH];  // M_b[o, i], then dV_b[o, i] * s_b[i]
#pragma unroll
      for (int r = 0; r < RCH; ++r) v[r] = 0.f;
      for (int k = 0; k < K; ++k) {
        const float ak = a_s[k];
        if (k >= kbeg && k < kbeg + kn) {
          const T* wk = Ws + (k - kbeg) * BO * BI + ci;
#pragma unroll
          for (int r = 0; r < RCH; ++r) v[r] = fmaf(ak, to_f(wk[(rg + RG * (r0 + r)) * BI]), v[r]);
        } else {  // another group's bank entry: from global memory
#pragma unroll
          for (int r = 0; r < RCH; ++r) {
            const int64_t o = o0 + rg + RG * (r0 + r);
            const float w = (o < O && ivalid) ? to_f(bank[((int64_t)k * O + o) * I + i]) : 0.f;
            v[r] = fmaf(ak, w, v[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < RCH; ++r) {
        const int row = rg + RG * (r0 + r);
        const int64_t o = o0 + row;
        const float cv = (cb && o < O) ? cb[o] : 0.f;
        const float qd = (db && o < O) ? db[row] : 1.f;  // Q_b[o, :] = d_b[o] (g_b^T x_b)[o, :]
        const float m = v[r];
        const float dv = Qs[row * LDQ + ci] * qd - cv * (m * sv);
        dsp = fmaf(dv, m, dsp);
        v[r] = dv * sv;
      }
      for (int kk = 0; kk < kn; ++kk) {
        const float ak = a_s[kbeg + kk];
        const T* wk = Ws + kk * BO * BI + ci;
        float* dwk = dWs + kk * BO * BI + ci;
        float acc = 0.f;
#pragma unroll
        for (int r = 0; r < RCH; ++r) {
          const int row = rg + RG * (r0 + r);
          if (want_dbank) dwk[row * BI] = fmaf(ak, v[r], dwk[row * BI]);
          acc = fmaf(v[r], to_f(wk[row * BI]), acc);
        }
        if (want_da) {
          acc = warp_sum(acc);  // lane 0 owns this warp's slot: no race, fixed order
          if (lane == 0) daw[warp * kg + kk] = (r0 == 0 ? 0.f : daw[warp * kg + kk]) + acc;
        }
      }
    }
    if (want_ds) dsw[rg * BI + ci] = dsp;
    __syncthreads();

    // ---- this sample's ds / da partials of the tile, summed in a fixed order
    if (want_da) {
      for (int kk = tid; kk < kn; kk += NT) {
        float s = 0.f;
        for (int w = 0; w < NWARPS; ++w) s += daw[w * kg + kk];
        const int64_t k = kbeg + kk;
        if (det) p.dcoeffs_acc[((int64_t)tile * B + b) * K + k] = s;
        else atomicAdd(&p.dcoeffs_acc[b * K + k], s);
      }
    }
    if (want_ds) {
      for (int c2 = tid; c2 < cols_i; c2 += NT) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < RG; ++j) s += dsw[j * BI + c2];
        if (det) p.dstyles_acc[((int64_t)ot * B + b) * I + i0 + c2] = s;
        else atomicAdd(&p.dstyles_acc[b * I + i0 + c2], s);
      }
    }
  }

  // ---- dW_k tiles: written once (one split), or partials / atomics across splits
  if (want_dbank) {
    __syncthreads();
    T* dbank = static_cast<T*>(p.dbank);
    const int64_t KOI = (int64_t)K * O * I;
    for (int e = tid; e < kn * BO * BI; e += NT) {
      const int kk = e / (BO * BI), rem = e % (BO * BI);
      const int r = rem / BI, cc = rem % BI;
      if (r < rows_o && cc < cols_i) {
        const int64_t off = ((int64_t)(kbeg + kk) * O + o0 + r) * I + i0 + cc;
        const float val = dWs[e];
        if (p.wt_nsplit == 1) dbank[off] = from_f<T>(val);
        else if (det) p.dbank_acc[(int64_t)split * KOI + off] = val;
        else atomicAdd(&p.dbank_acc[off], val);
      }
    }
  }
}

// ------------------------------------------------------------------ plan and launch

static int plan(MwModLinearParams* p) {
  const char* who = "mw_mod_linear_bwd_weight_plan";
  int optin = 0, sms = 0;
  cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, p->device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, p->device);
  if (e != cudaSuccess) {
    set_error("%s: cudaDeviceGetAttribute failed: %s", who, cudaGetErrorString(e));
    return MW_ECUDA;
  }
  const int esize = p->dtype == MW_F32 ? 4 : 2;
  const int K = (int)p->K;
  const bool wdb = p->want_dbank != 0;
  int cfg = -1, kg = K;
  for (int c = 0; c < 3; ++c) {
    if (wt_smem(c, K, K, wdb, esize) <= optin) {
      cfg = c;
      break;
    }
  }
  if (cfg < 0) {  // cut the bank into groups that fit the smallest tile
    cfg = 2;
    while (kg > 1 && wt_smem(2, kg, K, wdb, esize) > optin) --kg;
    if (wt_smem(2, kg, K, wdb, esize) > optin) {
      set_error("%s: K = %d does not fit in %d bytes of shared memory", who, K, optin);
      return MW_EINVAL;
    }
  }
  const int bo = by_config(cfg, [](auto c) { return WtShape<decltype(c)::value>::BO; });
  const int bi = by_config(cfg, [](auto c) { return WtShape<decltype(c)::value>::BI; });
  const int64_t ngroups = cdiv(K, kg);
  const int64_t n_ot = cdiv(p->O, bo), n_it = cdiv(p->I, bi);
  if (n_ot * n_it > ((int64_t)1 << 31) - 1) {
    set_error("%s: too many output tiles (%lld)", who, (long long)(n_ot * n_it));
    return MW_EINVAL;
  }
  // split the samples over CTAs only when the tiles alone leave SMs idle
  const int64_t ctas = n_ot * n_it * ngroups;
  int64_t nsplit = 1;
  const int64_t target = 2 * (int64_t)sms;
  if (ctas < target) nsplit = cdiv(target, ctas);
  if (nsplit > p->B) nsplit = p->B;
  if (wdb && nsplit > 1) {  // the partial dW buffer: at most 1 GiB
    int64_t cap = ((int64_t)1 << 30) / (p->K * p->O * p->I * 4);
    if (cap < 1) cap = 1;
    if (nsplit > cap) nsplit = cap;
  }
  if (nsplit * ngroups > 65535) nsplit = 65535 / ngroups;
  if (nsplit < 1) nsplit = 1;
  p->wt_config = cfg;
  p->wt_bo = bo;
  p->wt_bi = bi;
  p->wt_kg = kg;
  p->wt_ngroups = (int32_t)ngroups;
  p->wt_nsplit = (int32_t)nsplit;
  p->wt_n_otiles = (int32_t)n_ot;
  p->wt_n_itiles = (int32_t)n_it;
  p->wt_smem = wt_smem(cfg, kg, K, wdb, esize);
  return MW_OK;
}

static int launch_weight(const MwModLinearParams* p, void* stream, const char* who) {
  const dim3 grid((unsigned)p->wt_n_otiles * (unsigned)p->wt_n_itiles, (unsigned)(p->wt_nsplit * p->wt_ngroups));
  return by_dtype(p->dtype, [&](auto t) {
    return by_config(p->wt_config, [&](auto c) {
      constexpr int CFG = decltype(c)::value;
      return launch(_mod_linear_bwd_weight_kernel<MW_ELEM(t), CFG>, grid, WtShape<CFG>::NT, p->wt_smem, p, stream,
                    who);
    });
  });
}

}  // namespace mw

extern "C" {

int mw_mod_linear_bwd_weight_plan(MwModLinearParams* p) {
  if (int rc = mw::check_sizes(p, __func__)) return rc;
  return mw::plan(p);
}

int mw_mod_linear_bwd_weight(const MwModLinearParams* p, void* stream) {
  using namespace mw;
  const char* who = "mw_mod_linear_bwd_weight";
  if (int rc = check_common(p, who)) return rc;
  MwModLinearParams q = *p;  // the plan must be the one this library computes
  if (int rc = plan(&q)) return rc;
  if (q.wt_config != p->wt_config || q.wt_kg != p->wt_kg || q.wt_ngroups != p->wt_ngroups ||
      q.wt_nsplit != p->wt_nsplit || q.wt_n_otiles != p->wt_n_otiles || q.wt_n_itiles != p->wt_n_itiles ||
      q.wt_smem != p->wt_smem) {
    set_error("%s: `plan` must be the one mod_linear_bwd_weight_plan gives for these params (config %d, "
              "kg %d, nsplit %d); got config %d, kg %d, nsplit %d", who, q.wt_config, q.wt_kg, q.wt_nsplit,
              p->wt_config, p->wt_kg, p->wt_nsplit);
    return MW_EINVAL;
  }
  if (int rc = need(p->g != nullptr, who, "`g` must be a device pointer; got 0")) return rc;
  if (p->want_dbank && !(p->wt_nsplit == 1 ? p->dbank != nullptr : p->dbank_acc != nullptr)) {
    set_error("%s: want_dbank needs `%s` (the plan has nsplit = %d); got 0", who,
              p->wt_nsplit == 1 ? "dbank" : "dbank_acc", p->wt_nsplit);
    return MW_EINVAL;
  }
  const bool bad_a = p->want_dcoeffs && p->coeffs && !p->dcoeffs_acc;
  if (bad_a || (p->want_dstyles && p->styles && !p->dstyles_acc)) {
    set_error("%s: want_%s needs `%s`; got 0", who, bad_a ? "dcoeffs" : "dstyles",
              bad_a ? "dcoeffs_acc" : "dstyles_acc");
    return MW_EINVAL;
  }
  if (!p->want_dbank && !(p->want_dcoeffs && p->coeffs) && !(p->want_dstyles && p->styles)) return MW_OK;
  return launch_weight(p, stream, who);
}

}  // extern "C"
