#!/usr/bin/env bash
# The `cuda` backend on a GPU machine, in one call: build, test, sanitize, time.
#
#   bash benchmarks/gpu_cuda_linear.sh [OUTDIR]        (default: $OUT, else bench_out/cuda_linear)
#
# Self-contained (no network): builds the extension with `pip install --no-build-isolation
# --no-deps -e .`, runs tests/test_cuda_linear.py's GPU tests, runs a small case under
# compute-sanitizer (memcheck, racecheck, synccheck), and times W1 (modulated linear +
# demod, 16 x 1024 tokens, 4096 -> 4096), W2a (mixture per sample, K = 8, same shape) and W3
# (mixture per token, K = 4, 8 x 1024 tokens) in bf16, forward and forward+backward, against the triton backend (when available) and the
# dense F.linear of the same shape (the ceiling). Writes at most 6 files to OUTDIR:
#   env.txt build.log tests.log sanitizer.log bench.csv summary.md
# Exit status: non-zero when the build, the GPU tests or a sanitizer run failed.
# SKIP_TESTS=1 / SKIP_SANITIZER=1 / SKIP_BENCH=1 leave a part out (to split the work over
# several calls when one is too short).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-bench_out/cuda_linear}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUTDIR/summary.md"
status=0
note() { echo "$*" | tee -a "$SUMMARY"; }
: > "$SUMMARY"
note "# cuda backend on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ)"

# ---------------------------------------------------------------- environment
{
  nvidia-smi || true
  command -v nvcc && nvcc --version
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  git log -1 --oneline 2>/dev/null || true
} > "$OUTDIR/env.txt" 2>&1

# ---------------------------------------------------------------- build
t0=$(date +%s)
{
  echo "+ pip install --no-build-isolation --no-deps -e ."
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -Ev "^\s*(Using|Requirement|Collecting|copying|adding)"
  echo "+ ptxas report (sm_90a)"
  MODWEIGHTS_CUDA_ARCH=90a MAX_JOBS=16 bash csrc/check_build.sh --verbose 2>&1 | grep -E "Compiling entry|Used|spill|error|OK" \
    | sed -E "s/ptxas info *: //"
} > "$OUTDIR/build.log" 2>&1
avail=$("$PY" -c "import modweights; s = modweights.available_backends('cuda'); print(s['cuda'].available, '|', s['cuda'].reason, '|', s['triton'].available, '|', s['triton'].reason)" 2>&1)
note ""
note "build: $(( $(date +%s) - t0 )) s; backends: $avail"
if [[ "$avail" != True* ]]; then
  note "the cuda backend is not available: stopping (see build.log)"
  exit 1
fi

# ---------------------------------------------------------------- tests
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
t0=$(date +%s)
"$PY" -m pytest tests/test_cuda_linear.py -m gpu -v -rs --tb=short -p no:cacheprovider > "$OUTDIR/tests.log" 2>&1
rc=$?
[[ $rc -ne 0 ]] && status=1
note "gpu tests: exit $rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUTDIR/tests.log")"
fi

# ---------------------------------------------------------------- compute-sanitizer
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
SMALL="$OUTDIR/.small_case.py"
cat > "$SMALL" <<'EOF'
# A small forward + backward through every cuda kernel (demod, fwd, stats, dx, weight:
# 128 and 32 tiles, groups), fp32 and bf16, atomics and deterministic.
import torch
from modweights import testing as T
L = "linear"
cases = [
    T.Case(L, B=2, T=37, I=72, O=40, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case(L, B=2, T=5, I=17, O=9, K=1, styles="sample", demodulate=True, bias="shared"),
    T.Case(L, B=2, T=9, I=40, O=36, K=40, coeffs="sample", styles="sample", demodulate=True),
    # per token: every modlinear_token.cu kernel, tails in rows, I and O
    T.Case(L, B=2, T=70, I=72, O=136, K=3, coeffs="token", styles="token", demodulate=True, bias="bank"),
    T.Case(L, B=3, T=45, I=67, O=65, K=2, coeffs="token", styles="sample", demodulate=True, bias="shared"),
]
for det in (False, True):
    torch.use_deterministic_algorithms(det)
    for dtype in (torch.float32, torch.bfloat16):
        for c in cases:
            out = T.run_case(c, "cuda", dtype, device="cuda")
torch.cuda.synchronize()
print("small cases ran")
EOF
: > "$OUTDIR/sanitizer.log"
if [[ "${SKIP_SANITIZER:-0}" == 1 ]]; then
  note "compute-sanitizer: skipped (SKIP_SANITIZER=1)"
elif [[ -n "$SAN" ]]; then
  for tool in memcheck racecheck synccheck; do
    t0=$(date +%s)
    # no caching allocator: out-of-bounds accesses inside a cached block would go unseen
    echo "===== $tool" >> "$OUTDIR/sanitizer.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 180 "$SAN" --tool "$tool" --error-exitcode 9 \
      "$PY" "$SMALL" >> "$OUTDIR/sanitizer.log" 2>&1
    rc=$?
    [[ $rc -ne 0 ]] && status=1
    note "compute-sanitizer $tool: exit $rc in $(( $(date +%s) - t0 )) s ($(grep -cE "ERROR SUMMARY|Hazard|Invalid" "$OUTDIR/sanitizer.log") report lines so far)"
  done
else
  note "compute-sanitizer not found: skipped"
fi
rm -f "$SMALL"

# ---------------------------------------------------------------- timing
[[ "${SKIP_BENCH:-0}" == 1 ]] && { note "timing: skipped (SKIP_BENCH=1)"; note "exit status $status"; exit $status; }
"$PY" - "$OUTDIR" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import csv, sys, statistics, torch, torch.nn.functional as F
import modweights
from modweights import functional as MF
from modweights import testing as T

out = sys.argv[1]
dev = torch.device("cuda")
dtype = torch.bfloat16
L = "linear"
workloads = {
    "W1": T.Case(L, B=16, T=1024, I=4096, O=4096, K=1, styles="sample", demodulate=True),
    "W2a": T.Case(L, B=16, T=1024, I=4096, O=4096, K=8, coeffs="sample"),
    "W3": T.Case(L, B=8, T=1024, I=4096, O=4096, K=4, coeffs="token"),
}
avail = modweights.available_backends(dev)
impls = ["cuda"] + (["triton"] if avail["triton"].available else []) + ["dense"]
print(f"\n## timing, {torch.cuda.get_device_name(0)}, bf16 (median of CUDA-event times)\n")
if not avail["triton"].available:
    print(f"triton backend unavailable: {avail['triton'].reason}\n")


def timeit(fn, reps=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), min(times)


rows = []
for wname, case in workloads.items():
    inp = T.make_inputs(case, dtype, dev)
    leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
    full = {k: leaves.get(k) for k in T.GRAD_NAMES}
    flops = 2 * case.B * case.T * case.O * case.I
    # correctness at scale: cuda against torch (both bf16), relative to the largest value
    y_ref = T.call(case, full, "torch").float()
    y_cu = T.call(case, full, "cuda").float()
    rel = ((y_cu - y_ref).abs().max() / y_ref.abs().max()).item()
    print(f"{wname}: max |cuda - torch| / max |torch| of y = {rel:.2e}")
    gy = torch.randn(case.B, case.T, case.O, device=dev, dtype=dtype)
    res = {}
    for impl in impls:
        for det in ([False, True] if impl == "cuda" else [False]):
            torch.use_deterministic_algorithms(det)
            if impl == "dense":
                x = inp["x"].detach().reshape(-1, case.I).requires_grad_()
                w = inp["bank"][0].detach().requires_grad_()
                g2 = gy.reshape(-1, case.O)
                fwd = lambda: F.linear(x, w)
                def fb():
                    y = F.linear(x, w)
                    torch.autograd.grad(y, [x, w], g2)
            else:
                fwd = lambda impl=impl: T.call(case, full, impl)
                def fb(impl=impl):
                    y = T.call(case, full, impl)
                    torch.autograd.grad(y, list(leaves.values()), gy)
            torch.cuda.reset_peak_memory_stats()
            try:
                with torch.no_grad():
                    f_med, f_min = timeit(fwd)
                fb_med, fb_min = timeit(fb, reps=20)
            except Exception as e:  # report, keep going
                print(f"{wname} {impl}: FAILED {type(e).__name__}: {e}")
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            name = impl + ("-deterministic" if det else "")
            res[name] = (f_med, fb_med)
            rows.append(dict(workload=wname, impl=name, dtype="bf16", shape=f"B{case.B}xT{case.T} {case.I}->{case.O} K{case.K}",
                             fwd_ms=round(f_med, 4), fwd_min_ms=round(f_min, 4), fwdbwd_ms=round(fb_med, 4),
                             fwdbwd_min_ms=round(fb_min, 4), fwd_tflops=round(flops / f_med / 1e9, 1),
                             fwdbwd_tflops=round(3 * flops / fb_med / 1e9, 1), peak_gib=round(peak, 2),
                             device=torch.cuda.get_device_name(0), torch=torch.__version__))
    torch.use_deterministic_algorithms(False)
    dense = res.get("dense")
    print(f"\n| {wname} | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd / dense | fwd+bwd / dense |")
    print("|---|---|---|---|---|---|---|")
    for name, (f, fb) in res.items():
        fr = f"{f / dense[0]:.2f}" if dense else "-"  # time ratios: 1.20 = 20% slower than dense
        fbr = f"{fb / dense[1]:.2f}" if dense else "-"
        print(f"| {name} | {f:.3f} | {fb:.3f} | {flops / f / 1e9:.0f} | {3 * flops / fb / 1e9:.0f} | {fr} | {fbr} |")
    # per-kernel breakdown of the cuda backend's fwd + bwd
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                y = T.call(case, full, "cuda")
                torch.autograd.grad(y, list(leaves.values()), gy)
            torch.cuda.synchronize()
        print(f"\n{wname} cuda kernels (3 iterations):\n```")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print("```")
    except Exception as e:
        print(f"profiler failed: {e}")
    del inp, leaves, full
    torch.cuda.empty_cache()

if rows:
    with open(f"{out}/bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
else:
    sys.exit("no timing succeeded")
EOF
[[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
note ""
note "exit status $status"
exit $status
