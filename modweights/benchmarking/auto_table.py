"""Measure the table ``auto`` consults: per shape class, the fastest backend here.

    python -m modweights.benchmarking.auto_table --device cuda --out FILE.json
    python -m modweights.benchmarking.auto_table --from-bench results.json [...] --out FILE.json

For each shape class of :data:`modweights.backends.auto_table.CLASSES`, one representative
workload (:data:`CLASS_WORKLOADS`) is timed forward+backward in bfloat16 (``--dtype``) on
every fast backend (``torch``, ``triton``, ``cuda``) that is available and supports it, with
the sweep of ``modweights bench`` (:func:`modweights.benchmarking.runner.run`: warm-up,
interleaved timed calls, median). ``--from-bench`` reads those medians from ``modweights bench``
result files instead (the GPU check's bench stage already timed them, each workload in its
own dtype). The table names a fused backend for a class only where its median beats the
torch backend's by more than :data:`MARGIN`, else ``torch``, and records every median, the
workload, date, commit and versions. Point ``MODWEIGHTS_AUTO_TABLE`` at the file to use it, or
copy its entries into the packaged ``modweights/backends/auto_table.json``.

CUDA only: ``auto`` consults the table on CUDA devices, and a CPU has nothing to measure
for it; without a CUDA device the command exits with status 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..backends import auto_table as AT
from . import runner as R
from .workloads import WORKLOADS

#: the workload that stands for each shape class (docs/design.md section 4); the op is the workload's
CLASS_WORKLOADS = {
    "per-sample-many-rows": "W2a",  # mixture K=8 per sample, 16 x 1024 rows, 4096 -> 4096
    "per-sample-few-rows": "W2b",  # mixture K=8 per sample, 256 x 49 rows, 1024 -> 1024
    "per-token": "W3",  # per-token mixture K=4, 8 x 1024 rows, 4096 -> 4096
    "decode": "W6-8",  # 8 samples of one row each, K=4, 4096 -> 4096 (W6 is fp16 in bench)
    "per-sample": "W4",  # conv2d: StyleGAN2 modconv + demod 512->512 3x3 64x64, batch 32
}
IMPLS = ("torch", "triton", "cuda")
PASS = "fwd+bwd"

#: a fused backend is preferred only when its median is below (1 - MARGIN) x torch's: a win
#: smaller than the spread of repeated timings is not a win
MARGIN = 0.03


def entries_from_records(records: list[dict], env: dict, facts, classes=None, *, reps=None,
                         tiny: bool = False) -> list[dict]:
    """Auto-table entries from runner records (``modweights bench`` / :func:`measure` rows).

    One entry per class whose workload has an ``ok`` ``torch`` median for :data:`PASS`; the
    entry names the fastest fused backend if it beats torch by :data:`MARGIN`, else torch.
    Classes whose workload was not timed, or has no torch time to compare with, get no entry.
    """
    name, cap = facts
    out = []
    for cls in classes or CLASS_WORKLOADS:
        wname = CLASS_WORKLOADS[cls]
        rows = [r for r in records if r["workload"] == wname and r["pass"] == PASS]
        timed = {r["impl"]: r["median_ms"] for r in rows if r["status"] == "ok" and r["median_ms"]}
        fast = {k: v for k, v in timed.items() if k in IMPLS}
        if "torch" not in fast:
            continue
        best = min(fast, key=fast.get)
        if best != "torch" and not fast[best] < (1 - MARGIN) * fast["torch"]:
            best = "torch"
        r0 = rows[0]
        measured = {f"{k}_ms": round(v, 4) for k, v in sorted(timed.items())}
        measured.update({
            "pass": PASS, "reps": reps if reps is not None else r0.get("reps"),
            "workload": f"{wname}: {r0.get('shape', '')}", "margin": MARGIN,
            "not_measured": {r["impl"]: r["reason"] for r in rows if r["impl"] in IMPLS and r["status"] != "ok"},
            "date": env.get("date"), "commit": env.get("git_commit"), "torch": env.get("torch_version"),
            "triton": env.get("triton_version"),
        })
        if tiny:
            measured["tiny"] = "CI smoke sizes: not a measurement"
        out.append({"device": name, "capability": list(cap), "op": r0.get("op", "mod_linear"), "class": cls,
                    "dtype": r0["dtype"], "backend": best, "measured": measured})
    return out


def table_of(entries: list[dict], name: str) -> dict:
    table = {"format": AT.FORMAT,
             "comment": f"measured by python -m modweights.benchmarking.auto_table on {name}",
             "entries": entries}
    AT.validate(table, "(measured table)")
    return table


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
    # (tiny workloads keep their names: the records still say which class they stand for)
    entries = entries_from_records(sweep.records, sweep.env, (name, cap), classes, reps=reps, tiny=tiny)
    return table_of(entries, name), sweep.records


def from_bench(paths, facts=None) -> tuple[dict, list[dict]]:
    """A table from ``modweights bench`` result files (``results.json``), and their records.

    ``facts`` (device name, capability) defaults to the machine's CUDA device; the files'
    ``device_name`` must match it, so a table is never labelled with another GPU's name.
    """
    records, env = [], {}
    for p in paths:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        records += data["records"]
        env = env or data["environment"]
    if facts is None:
        facts = AT.device_facts(torch.device("cuda"))
    names = {r["device_name"] for r in records}
    if names and names != {facts[0]}:
        raise ValueError(f"--from-bench: the results were measured on {sorted(names)}, not on {facts[0]!r}")
    tiny = bool(env.get("tiny"))
    return table_of(entries_from_records(records, env, facts, tiny=tiny), facts[0]), records


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
    p.add_argument("--from-bench", nargs="+", metavar="RESULTS_JSON",
                   help="make the table from these `modweights bench` results.json files instead of timing")
    args = p.parse_args(argv)
    if args.from_bench:
        missing = [f for f in args.from_bench if not os.path.isfile(f)]
        if missing:
            p.error(f"--from-bench: no such file: {', '.join(missing)}")
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
    if args.from_bench:
        table, records = from_bench(args.from_bench)
    else:
        table, records = measure(device, args.dtype, args.warmup, args.reps, args.classes)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    for r in records:
        if r["pass"] != PASS or r["impl"] not in IMPLS or r["workload"] not in CLASS_WORKLOADS.values():
            continue
        t = f"{r['median_ms']:.3f} ms" if r["median_ms"] else f"{r['status']}: {r['reason']}"
        print(f"{r['workload']:6} {r['impl']:8} {t}")
    for e in table["entries"]:
        print(f"{e['class']:22} -> {e['backend']}")
    print(f"wrote {args.out} ({len(table['entries'])} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
