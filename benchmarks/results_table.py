"""The README's GPU performance table, generated from committed GPU check results.

    python benchmarks/results_table.py                      print the table (Markdown)
    python benchmarks/results_table.py --write-readme       replace it in README.md, between
                                                            <!-- gpu-perf-table --> and <!-- /gpu-perf-table -->

Reads every ``benchmarks/results/gpu-*/bench.csv`` (the file ``benchmarks/gpu_check.sh`` writes
under ``$OUT``; one row per workload x implementation x pass, each row carrying its device,
date, commit and torch / Triton versions). Only rows measured on a CUDA device with status
``ok`` count; the newest run (by date) gives the table, and a line under it names the file,
device, date, commit and versions every number came from. With no such file it says so,
and prints no number.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- gpu-perf-table -->", "<!-- /gpu-perf-table -->"
WORKLOADS = ("W1", "W2a", "W2b", "W3", "W4", "W5", "W6-1", "W6-8", "W6-64", "W7")
BACKENDS = ("torch", "triton", "cuda")
PEERS = ("naive-bmm", "timm-condconv", "sg2-fused", "sg2-nonfused", "compiled-reference", "reference")

NO_RESULT = ("No GPU result yet: no `benchmarks/results/gpu-*/bench.csv` measured on a CUDA device has been "
             "committed, so this table has no numbers. `bash benchmarks/gpu_check.sh` on a GPU writes one "
             "(see benchmarks/README.md).")


def runs(root: str = ROOT) -> list[tuple[str, list[dict]]]:
    """(path, rows measured on a CUDA device) per result file, newest first."""
    out = []
    for path in sorted(glob.glob(os.path.join(root, "benchmarks", "results", "gpu-*", "bench.csv"))):
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("device", "").startswith("cuda")]
        if rows:
            out.append((path, rows))
    out.sort(key=lambda pr: max(r.get("date", "") for r in pr[1]), reverse=True)
    return out


def _x(v) -> str:
    return f"{float(v):.2f}x" if v not in (None, "") else "-"


def table(root: str = ROOT) -> str:
    found = runs(root)
    if not found:
        return NO_RESULT
    path, rows = found[0]
    ok = {(r["workload"], r["impl"], r["pass"]): r for r in rows if r["status"] == "ok"}
    lines = ["| workload | pass | dense ms | " + " | ".join(f"{b} x dense" for b in BACKENDS)
             + " | best peer x dense | auto picks |",
             "| --- | --- | --- | " + " | ".join("---" for _ in BACKENDS) + " | --- | --- |"]
    for w in WORKLOADS:
        p = "fwd" if w.startswith("W6") else "fwd+bwd"
        dense = ok.get((w, "dense", p))
        if dense is None:
            continue
        cells = [w, p, f"{float(dense['median_ms']):.3f}"]
        cells += [_x(ok[(w, b, p)]["ratio_to_dense"]) if (w, b, p) in ok else "-" for b in BACKENDS]
        peers = [(float(ok[(w, q, p)]["ratio_to_dense"]), q) for q in PEERS
                 if (w, q, p) in ok and ok[(w, q, p)]["ratio_to_dense"]]
        cells.append(f"{min(peers)[1]} {min(peers)[0]:.2f}x" if peers else "-")
        cells.append(dense.get("auto_backend") or "-")
        lines.append("| " + " | ".join(cells) + " |")
    r0 = rows[0]
    commits = sorted({r.get("git_commit", "?") for r in rows})
    lines += ["", f"Source: `{os.path.relpath(path, root)}`: {r0.get('device_name')}, {r0.get('date')}, commit "
              f"{', '.join(commits)}, torch {r0.get('torch_version')}, Triton {r0.get('triton_version')}; "
              "median of CUDA-event timed calls (L2 flushed), time / the dense op of the same shape "
              "(lower is better; bf16, W6 fp16)."]
    return "\n".join(lines)


def write_readme(text: str, readme: str) -> None:
    with open(readme, encoding="utf-8") as f:
        s = f.read()
    if BEGIN not in s or END not in s:
        raise SystemExit(f"{readme}: markers {BEGIN} ... {END} not found")
    head, rest = s.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=ROOT, help="repository root (default: this checkout)")
    p.add_argument("--write-readme", action="store_true", help="replace the table in README.md")
    args = p.parse_args(argv)
    text = table(args.root)
    if args.write_readme:
        write_readme(text, os.path.join(args.root, "README.md"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
