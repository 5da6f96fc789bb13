#!/usr/bin/env bash
# Build, test and time modweights' Triton conv2d kernels and the compat drop-ins on a GPU machine.
#
#   benchmarks/gpu_triton_conv2d.sh [OUTDIR]        (default: $OUT, else benchmarks/results/gpu_triton_conv2d)
#   SKIP_TESTS=1 / SKIP_BENCH=1 run one half, for machines that limit a command's time (the
#   benchmarks autotune each kernel on first use; not yet timed on a GPU)
#
# Writes to OUTDIR: env.txt (device, versions), install.log, tests.txt (pytest -m gpu for conv2d
# and compat), bench.csv (one row per workload x implementation x pass), bench.txt (a readable
# table), check.txt (triton vs torch backend at the benchmark shapes), autotune.txt (chosen tiles).
#
# Workloads (bf16, fwd / bwd / fwd+bwd, every gradient the layer has):
#   W4  StyleGAN2 modulated conv 512->512 3x3, 64x64, batch 32, demod
#   W5  CondConv K=8 256->256 3x3, 56x56, batch 64
#   W7  GigaGAN K=8 + modulation + demod, 512->512 3x3, 64x64, batch 32
# Implementations: dense F.conv2d of the same shape (the ceiling: ratios are against it),
# modweights reference / torch / triton backends; W4: StyleGAN2 via modweights.compat in both
# fused_modconv settings (our kernels) and the two plain-PyTorch baselines their code runs
# (per-sample weights + grouped conv; scale-conv-scale); W5: timm CondConv2d and the swapped
# modweights layer; W7: per-sample weights + grouped conv in plain PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu_triton_conv2d}}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET
PY="${PYTHON:-python}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import timm; print('timm', timm.__version__)" 2>/dev/null || echo "timm: not installed"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

"$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/install.log" 2>&1 || {
  echo "install failed: see $OUT_DIR/install.log"; tail -20 "$OUT_DIR/install.log"; exit 1; }

if [ -z "${SKIP_TESTS:-}" ]; then
set +e
# fixed tiles in the tests (MODWEIGHTS_TRITON_AUTOTUNE=0): every test shape would otherwise be tuned;
# the benchmarks below autotune
MODWEIGHTS_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m gpu tests/test_triton_conv2d.py tests/test_compat_stylegan2.py tests/test_compat_timm.py \
  -p no:cacheprovider > "$OUT_DIR/tests.txt" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT_DIR/tests.txt"))"
set -e
fi
[ -n "${SKIP_BENCH:-}" ] && exit 0

"$PY" - "$OUT_DIR" <<'PYEOF'
import csv, os, sys
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

out_dir = sys.argv[1]
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.backends.cudnn.benchmark = True
dev = torch.device("cuda")
DT = torch.bfloat16

import modweights
import modweights.functional as MF
import modweights.backends.triton as triton_mod
from modweights.backends import _triton_conv2d as TC
from modweights.compat import stylegan2 as SG
from modweights.triton_kernels import mod_conv2d as MC

if getattr(triton_mod, "conv2d_forward", None) is not TC.conv2d_forward:  # not wired yet: patch in
    triton_mod.conv2d_forward, triton_mod.conv2d_backward = TC.conv2d_forward, TC.conv2d_backward
    _orig = triton_mod.supports
    triton_mod.supports = lambda op, **p: TC.supports_conv2d(**p) if op == "conv2d" else _orig(op, **p)

VERS = dict(torch=torch.__version__, triton=triton.__version__, modweights=modweights.__version__,
            device=torch.cuda.get_device_name())
rows = []


def leaf(t):
    return t.detach().requires_grad_()


def bench(workload, impl, fn, inputs, flops, dense_ms=None, params=()):
    """fn(*inputs) -> y. Times fwd, fwd+bwd (random upstream gradient), bwd = difference.
    Every input is a leaf that needs its gradient; ``params`` (module parameters) too."""
    ins = [leaf(t) if t is not None else None for t in inputs]
    live = [t for t in ins if t is not None and t.requires_grad] + list(params)
    y = fn(*ins)
    gy = torch.randn_like(y)

    def fwd():
        with torch.no_grad():
            fn(*ins)

    def fwd_bwd():
        for t in live:
            t.grad = None
        torch.autograd.backward(fn(*ins), gy)

    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    q = [0.5, 0.2, 0.8]
    tf = do_bench(fwd, quantiles=q, warmup=25, rep=200)
    tfb = do_bench(fwd_bwd, quantiles=q, warmup=25, rep=200)
    res = {}
    tb = max(tfb[0] - tf[0], 1e-6)  # bwd: the difference of the medians
    for pas, t, fl in (("fwd", tf, flops), ("fwd+bwd", tfb, 3 * flops), ("bwd", [tb] * 3, 2 * flops)):
        res[pas] = t[0]
        rows.append(dict(workload=workload, impl=impl, pass_=pas, ms=round(t[0], 4), ms_p20=round(t[1], 4),
                         ms_p80=round(t[2], 4), tflops=round(fl / t[0] / 1e9, 1),
                         vs_dense=round(t[0] / dense_ms[pas], 3) if dense_ms else 1.0,
                         peak_mb=round(peak_mb, 1), dtype=str(DT).replace("torch.", ""), **VERS))
        print(f"{workload:3s} {impl:34s} {pas:8s} {t[0]:8.3f} ms  {fl / t[0] / 1e9:7.1f} TFLOP/s"
              + (f"  x{t[0] / dense_ms[pas]:.2f} of dense" if dense_ms else ""), flush=True)
    return res


def dense(workload, B, I, O, H, W):
    x = torch.randn(B, I, H, W, device=dev, dtype=DT)
    w = torch.randn(O, I, 3, 3, device=dev, dtype=DT) / (I * 9) ** 0.5
    flops = 2 * B * O * I * 9 * H * W
    return bench(workload, "dense F.conv2d (ceiling)", lambda x, w: F.conv2d(x, w, padding=1), [x, w], flops), flops


def grouped(x, M, H, W):
    """Per-sample filters M (B, O, I, 3, 3) through one grouped conv (StyleGAN2 fused / timm)."""
    B, O, I = M.shape[:3]
    return F.conv2d(x.reshape(1, B * I, H, W), M.reshape(B * O, I, 3, 3), padding=1, groups=B).view(B, O, H, W)


def mw(backend, demod):
    def f(x, bank, coeffs, styles):
        return MF.mod_conv2d(x, bank, coeffs, styles, demodulate=demod, padding=1, backend=backend)
    return f


check = []


def agree(name, fn_a, fn_b, inputs):
    ya, yb = fn_a(*inputs), fn_b(*inputs)
    err = ((ya.float() - yb.float()).abs().max() / yb.float().abs().max()).item()
    check.append(f"{name}: max |triton - torch| / max |torch| = {err:.3g}")
    print(check[-1], flush=True)


def run(workload, B, I, O, H, W, K, mod, demod):
    d, flops = dense(workload, B, I, O, H, W)
    x = torch.randn(B, I, H, W, device=dev, dtype=DT)
    bank = torch.randn(K, O, I, 3, 3, device=dev, dtype=DT) / (I * 9) ** 0.5
    coeffs = torch.softmax(torch.randn(B, K, device=dev), -1).to(DT) if K > 1 else None
    styles = (torch.randn(B, I, device=dev) * 0.2 + 1).to(DT) if mod else None
    ins = [x, bank, coeffs, styles]
    with torch.no_grad():
        agree(workload, mw("triton", demod), mw("torch", demod), ins)
    for be in ("triton", "torch", "reference"):
        try:
            bench(workload, f"modweights {be}", mw(be, demod), ins, flops, d)
        except Exception as e:  # e.g. out of memory for the reference
            print(f"{workload} modweights {be}: {type(e).__name__}: {e}", flush=True)
    return d, flops, ins


# W4: StyleGAN2 modulated conv
d, flops, (x, bank, _, styles) = run("W4", 32, 512, 512, 64, 64, 1, True, True)
w4 = bank[0].clone()
for fused in (True, False):
    bench("W4", f"compat.stylegan2 fused_modconv={fused}",
          lambda x, w, s, fused=fused: SG.modulated_conv2d(x, w, s, padding=1, fused_modconv=fused),
          [x, w4, styles], flops, d)


def sg_grouped(x, w, s):  # their fused path: per-sample weights, demod, grouped conv
    v = w[None] * s[:, None, :, None, None]
    v = v * (v.float().square().sum((2, 3, 4)) + 1e-8).rsqrt().to(v.dtype)[:, :, None, None, None]
    return grouped(x, v, 64, 64)


def sg_scale(x, w, s):  # their non-fused path: scale, conv, scale
    dc = ((s.float().square() @ w.float().square().sum((2, 3)).t()) + 1e-8).rsqrt().to(x.dtype)
    return F.conv2d(x * s[:, :, None, None], w, padding=1) * dc[:, :, None, None]


bench("W4", "pytorch grouped conv (SG2 fused)", sg_grouped, [x, w4, styles], flops, d)
bench("W4", "pytorch scale-conv-scale (SG2 non-fused)", sg_scale, [x, w4, styles], flops, d)

# W5: CondConv
d, flops, (x, bank, coeffs, _) = run("W5", 64, 256, 256, 56, 56, 8, False, False)
try:
    from timm.layers import CondConv2d
    from modweights.compat.timm import TimmCondConv2d
    cc = CondConv2d(256, 256, 3, padding=1, num_experts=8).to(dev, DT)
    cc.weight.data.copy_(bank.reshape(8, -1))
    bench("W5", "timm CondConv2d", lambda x, r: cc(x, r), [x, coeffs], flops, d, params=list(cc.parameters()))
    ours = TimmCondConv2d.from_timm(cc)
    bench("W5", "compat.timm swapped (auto backend)", lambda x, r: ours(x, r), [x, coeffs], flops, d,
          params=list(ours.parameters()))
except ImportError as e:
    print("timm not available:", e)

# W7: GigaGAN
d, flops, (x, bank, coeffs, styles) = run("W7", 32, 512, 512, 64, 64, 8, True, True)


def giga_grouped(x, bank, a, s):
    m = torch.einsum("bk,koihw->boihw", a, bank) * s[:, None, :, None, None]
    m = m * (m.float().square().sum((2, 3, 4)) + 1e-8).rsqrt().to(m.dtype)[:, :, None, None, None]
    return grouped(x, m, 64, 64)


bench("W7", "pytorch per-sample weights + grouped conv", giga_grouped, [x, bank, coeffs, styles], flops, d)

fields = ["workload", "impl", "pass_", "ms", "ms_p20", "ms_p80", "tflops", "vs_dense", "peak_mb", "dtype",
          "torch", "triton", "modweights", "device"]
with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
with open(os.path.join(out_dir, "bench.txt"), "w") as f:
    for r in rows:
        f.write(f"{r['workload']:3s} {r['impl']:42s} {r['pass_']:8s} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s "
                f"x{r['vs_dense']:.2f} of dense  peak {r['peak_mb']:.0f} MB\n")
with open(os.path.join(out_dir, "check.txt"), "w") as f:
    f.write("\n".join(check) + "\n")
with open(os.path.join(out_dir, "autotune.txt"), "w") as f:
    for name in ("_fwd_tuned", "_dx_tuned", "_weight_tuned"):
        tuner = getattr(MC, name, None)
        cache = getattr(tuner, "cache", {}) if tuner is not None else {}
        for key, cfg in cache.items():
            f.write(f"{name} {key} -> {cfg}\n")
print("wrote", out_dir)
PYEOF
