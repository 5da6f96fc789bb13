"""Measure the table ``auto`` consults: per linear shape class, the fastest backend here.

    python -m modweights.benchmarking.auto_table --device cuda --out FILE.json

For each shape class of :data:`modweights.backends.auto_table.CLASSES` (linear), one
representative workload (:data:`CLASS_WORKLOADS`) is timed forward+backward in bfloat16
(``--dtype``) on every fast backend (``torch``, ``triton``, ``cuda``) that is available and
supports it, with the sweep of ``modweights bench`` (:func:`modweights.benchmarking.runner.run`:
warm-up, interleaved timed calls, median). The table names the backend with the lowest median
per class and records every measured median, the workload, date and commit. Point
``MODWEIGHTS_AUTO_TABLE`` at the file to use it, or copy its entries into the packaged
``modweights/backends/auto_table.json``.

CUDA only: ``auto`` consults the table on CUDA devices, and a CPU has nothing to measure
for it; without a CUDA device the command exits with status 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..backends import auto_table as AT
from . import runner as R
from .workloads import WORKLOADS

#: the workload that stands for each linear shape class (DESIGN.md section 4)
CLASS_WORKLOADS = {
    "per-sample-many-rows": "W2a",  # mixture K=8 per sample, 16 x 1024 rows, 4096 -> 4096
    "per-sample-few-rows": "W2b",  # mixture K=8 per sample, 256 x 49 rows, 1024 -> 1024
    "per-token": "W3",  # per-token mixture K=4, 8 x 1024 rows, 4096 -> 4096
    "decode": "W6-8",  # 8 samples of one row each, K=4, 4096 -> 4096 (W6 is fp16 in bench)
}
IMPLS = ("torch", "triton", "cuda")
PASS = "fwd+bwd"


def measure(device: torch.device, dtype: str = "bfloat16", warmup: int = 2, reps: int = 10,
            classes=None, progress=None, *, tiny: bool = False, facts=None) -> tuple[dict, list[dict]]:
    """Time every class's workload; return ``(table, records)``.

    ``table`` is an auto table (format 1) with one entry per class where at least one
    backend ran; ``records`` are the runner's rows (including skipped and failed backends,
    with the reason, and the dense op for scale). ``tiny`` and ``facts`` (device name and
    capability) exist for the tests, which run the machinery on a CPU; a table made with
    them is not a measurement.
    """
    classes = list(classes or CLASS_WORKLOADS)
    name, cap = facts if facts is not None else AT.device_facts(device)
    wls = [WORKLOADS[CLASS_WORKLOADS[c]] for c in classes]
    wls = [w.tiny() for w in wls] if tiny else wls  # (the runner shrinks them alike)
    settings = R.Settings(device=device, dtype=dtype, impls=list(IMPLS), passes=(PASS,), warmup=warmup,
                          reps=reps, compile=False)
    sweep = R.run(wls, settings, progress=progress)
    env = sweep.env
    entries = []
    for cls, wl in zip(classes, wls):
        rows = [r for r in sweep.records if r["workload"] == wl.name and r["pass"] == PASS]
        timed = {r["impl"]: r["median_ms"] for r in rows if r["status"] == "ok" and r["median_ms"]}
        fast = {k: v for k, v in timed.items() if k in IMPLS}
        if not fast:
            continue
        best = min(fast, key=fast.get)
        measured = {f"{k}_ms": round(v, 4) for k, v in sorted(timed.items())}
        measured.update({
            "pass": PASS, "reps": reps, "workload": f"{wl.name}: {wl.shape}",
            "not_measured": {r["impl"]: r["reason"] for r in rows if r["impl"] in IMPLS and r["status"] != "ok"},
            "date": env["date"], "commit": env["git_commit"], "torch": env["torch_version"],
            "triton": env["triton_version"],
        })
        if tiny:
            measured["tiny"] = "CI smoke sizes: not a measurement"
        entries.append({"device": name, "capability": list(cap), "op": "linear", "class": cls, "dtype": dtype,
                        "backend": best, "measured": measured})
    table = {"format": AT.FORMAT,
             "comment": f"measured by python -m modweights.benchmarking.auto_table on {name}",
             "entries": entries}
    AT.validate(table, "(measured table)")
    return table, sweep.records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modweights.benchmarking.auto_table",
                                description="Measure which backend auto should pick per linear shape class "
                                            "on this GPU, and write the table (see modweights.backends.auto_table).")
    p.add_argument("--device", default="cuda", help="a CUDA device (default: cuda)")
    p.add_argument("--out", required=True, help="the table file to write (JSON)")
    p.add_argument("--dtype", default="bfloat16", choices=AT.DTYPES)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--classes", nargs="+", choices=list(CLASS_WORKLOADS), default=None,
                   help="measure only these classes (default: all)")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type != "cuda":
        print(f"auto_table: --device {args.device}: the table is for CUDA devices (auto consults it only "
              "there); pass --device cuda on a machine with a GPU", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("auto_table: no CUDA device is available here (torch.cuda.is_available() is False); "
              "nothing was measured and no table was written", file=sys.stderr)
        return 2
    table, records = measure(device, args.dtype, args.warmup, args.reps, args.classes)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    for r in records:
        t = f"{r['median_ms']:.3f} ms" if r["median_ms"] else f"{r['status']}: {r['reason']}"
        print(f"{r['workload']:6} {r['impl']:8} {t}")
    for e in table["entries"]:
        print(f"{e['class']:22} -> {e['backend']}")
    print(f"wrote {args.out} ({len(table['entries'])} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
