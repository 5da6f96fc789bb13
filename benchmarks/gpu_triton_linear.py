"""Time the triton backend of mod_linear on a GPU (issue 4 workloads), self-contained.

    python benchmarks/gpu_triton_linear.py --out DIR [--only W1,W3] [--dtype bf16]

Workloads (bf16 fwd+bwd unless said; W6 is fp16 forward only, decode has no backward):

    W1   modulated linear + demod      B=16  T=1024   4096 -> 4096   K=1, styles per sample
    W2a  mixture per sample            B=16  T=1024   4096 -> 4096   K=8
    W2b  mixture per sample            B=256 T=49     1024 -> 1024   K=8
    W3   per-token mixture             8192 tokens    4096 -> 4096   K=4 (B=8, T=1024)
    W6   decode, each row its own mixture of K=4 4096x4096, 1 / 8 / 64 rows, fp16

Each is timed (triton.testing.do_bench, median ms) for the providers ``triton``, ``torch``
(the pure-PyTorch backend), ``reference`` (skipped where it would form more than
``--ref-limit-gb`` of per-sample weights) and ``dense``: ``F.linear`` of the same
``(B*T, I) x (O, I)`` shape (fwd+bwd: dx and dW), the ceiling. Results go to
``DIR/gpu_triton_linear.{json,csv,md}`` with device, date, git commit and versions.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

WORKLOADS = {
    "W1": dict(B=16, T=1024, I=4096, O=4096, K=1, coeffs=None, styles="sample", demod=True, backward=True),
    "W2a": dict(B=16, T=1024, I=4096, O=4096, K=8, coeffs="sample", styles=None, demod=False, backward=True),
    "W2b": dict(B=256, T=49, I=1024, O=1024, K=8, coeffs="sample", styles=None, demod=False, backward=True),
    "W3": dict(B=8, T=1024, I=4096, O=4096, K=4, coeffs="token", styles=None, demod=False, backward=True),
    "W6-1": dict(B=1, T=0, I=4096, O=4096, K=4, coeffs="sample", styles=None, demod=False, backward=False,
                 dtype="fp16"),
    "W6-8": dict(B=8, T=0, I=4096, O=4096, K=4, coeffs="sample", styles=None, demod=False, backward=False,
                 dtype="fp16"),
    "W6-64": dict(B=64, T=0, I=4096, O=4096, K=4, coeffs="sample", styles=None, demod=False, backward=False,
                  dtype="fp16"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - best effort metadata
        return "unknown"


def _inputs(w, dtype, grads):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, I, O, K = w["B"], w["T"], w["I"], w["O"], w["K"]
    rows = (B, T) if T else (B,)

    def rnd(*shape, scale=1.0, offset=0.0):
        t = torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g) * scale + offset
        return t.to(dtype).requires_grad_(grads)

    x = rnd(*rows, I)
    bank = rnd(K, O, I, scale=I ** -0.5)
    coeffs = None
    if w["coeffs"] == "sample":
        coeffs = rnd(B, K, scale=0.5, offset=0.5)
    elif w["coeffs"] == "token":
        coeffs = rnd(*rows, K, scale=0.5, offset=0.5)
    styles = rnd(B, I, scale=0.5, offset=1.0) if w["styles"] == "sample" else None
    return x, bank, coeffs, styles


def _formed_gb(w, dtype):
    groups = w["B"] * (max(w["T"], 1) if w["coeffs"] == "token" else 1)
    return groups * w["O"] * w["I"] * torch.empty((), dtype=dtype).element_size() / 1e9


def bench_one(name, w, provider, dtype, ref_limit_gb):
    from triton.testing import do_bench

    from modweights import functional as MF

    grads = w["backward"]
    B, T, I, O, K = w["B"], w["T"], w["I"], w["O"], w["K"]
    rows = B * max(T, 1)
    if provider == "reference" and _formed_gb(w, dtype) > ref_limit_gb:
        return None, f"skipped: forms {_formed_gb(w, dtype):.1f} GB of per-sample weights"
    if provider == "dense":
        x = torch.randn(rows, I, device="cuda", dtype=dtype, requires_grad=grads)
        W = (torch.randn(O, I, device="cuda", dtype=dtype) * I ** -0.5).requires_grad_(grads)
        leaves = [x, W]

        def fwd():
            return F.linear(x, W)
    else:
        x, bank, coeffs, styles = _inputs(w, dtype, grads)
        leaves = [t for t in (x, bank, coeffs, styles) if t is not None]

        def fwd():
            return MF.mod_linear(x, bank, coeffs, styles, demodulate=w["demod"], backend=provider)
    if grads:
        gy = torch.randn_like(fwd().detach())

        def step():
            fwd().backward(gy)
    else:
        def step():
            with torch.no_grad():
                fwd()
    try:
        torch.cuda.reset_peak_memory_stats()
        step()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        ms = do_bench(step, grad_to_none=leaves if grads else None, warmup=25, rep=100, return_mode="median")
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    except torch.cuda.OutOfMemoryError as e:
        return None, f"OOM: {str(e).splitlines()[0]}"
    return (ms, peak), ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--only", default="", help="comma-separated workload names (default: all)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--ref-limit-gb", type=float, default=8.0)
    p.add_argument("--providers", default="triton,torch,reference,dense")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_triton_linear.py needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    names = [n for n in WORKLOADS if not args.only or n in args.only.split(",")]
    providers = args.providers.split(",")
    rows = []
    for name in names:
        w = WORKLOADS[name]
        dtype = DTYPES[w.get("dtype", args.dtype)]
        rowsn = w["B"] * max(w["T"], 1)
        flops = (6 if w["backward"] else 2) * rowsn * w["O"] * w["I"]  # dense-equivalent
        res = {}
        for prov in providers:
            r, note = bench_one(name, w, prov, dtype, args.ref_limit_gb)
            res[prov] = (r, note)
            torch.cuda.empty_cache()
        dense_ms = res.get("dense", (None,))[0][0] if res.get("dense", (None,))[0] else None
        for prov, (r, note) in res.items():
            row = dict(workload=name, provider=prov, dtype=str(dtype).replace("torch.", ""),
                       passes="fwd+bwd" if w["backward"] else "fwd", B=w["B"], T=w["T"], I=w["I"], O=w["O"],
                       K=w["K"], ms=None, peak_mib=None, tflops=None, bank_gbps=None, vs_dense=None,
                       vs_triton=None, note=note)
            if r is not None:
                ms, peak = r
                row.update(ms=round(ms, 4), peak_mib=round(peak, 1), tflops=round(flops / ms / 1e9, 1))
                if not w["backward"]:
                    bank_bytes = w["K"] * w["O"] * w["I"] * torch.empty((), dtype=dtype).element_size()
                    row["bank_gbps"] = round(bank_bytes / ms / 1e6, 1)
                if dense_ms:
                    row["vs_dense"] = round(ms / dense_ms, 3)
            rows.append(row)
        tri = next((r for r in rows if r["workload"] == name and r["provider"] == "triton"), None)
        for r in rows:
            if r["workload"] == name and tri and tri["ms"] and r["ms"]:
                r["vs_triton"] = round(r["ms"] / tri["ms"], 3)
        for r in rows:
            if r["workload"] == name:
                print(f"{name:6s} {r['provider']:9s} {r['passes']:7s} ms={r['ms']} x_dense={r['vs_dense']} "
                      f"x_triton={r['vs_triton']} TFLOP/s={r['tflops']} GB/s={r['bank_gbps']} "
                      f"peak_MiB={r['peak_mib']} {r['note']}", flush=True)

    base = os.path.join(args.out, "gpu_triton_linear")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        wr.writeheader()
        for r in rows:
            wr.writerow({**meta, **r})
    with open(base + ".md", "w") as f:
        f.write(f"# mod_linear triton backend on {meta['device']}\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n")
        f.write("ms: median (triton.testing.do_bench); x_dense: time / F.linear of the same (B*T, I) x (O, I) "
                "shape (same passes); TFLOP/s: dense-equivalent FLOPs / time.\n\n")
        f.write("| workload | provider | passes | dtype | ms | x dense | x triton | TFLOP/s | bank GB/s | peak MiB | note |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['workload']} | {r['provider']} | {r['passes']} | {r['dtype']} | {r['ms']} | {r['vs_dense']} "
                    f"| {r['vs_triton']} | {r['tflops']} | {r['bank_gbps']} | {r['peak_mib']} | {r['note']} |\n")
    print(f"wrote {base}.json/.csv/.md")


if __name__ == "__main__":
    main()
