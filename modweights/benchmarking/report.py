"""Output of ``modweights bench``: the terminal table, JSON, CSV, PNG plots and a Markdown summary."""
from __future__ import annotations

import csv
import json
import os

from . import impls as I
from .plots import label, write_plots
from .runner import Sweep

#: CSV columns, in order (JSON records carry the same keys)
FIELDS = (
    "workload", "impl", "pass", "status", "reason", "dtype", "fp32_precision", "device", "device_name", "op", "shape",
    "flops", "median_ms", "p20_ms", "p80_ms", "min_ms", "reps", "warmup", "tflops", "gbps", "ratio_to_dense",
    "peak_memory_bytes", "memory_method", "num_threads", "torch_version", "triton_version",
    "timm_version", "modweights_version", "python_version", "git_commit", "date", "title",
    "auto_backend", "auto_reason",
)

#: baselines a backend is compared with in the ratio summary
PEERS = ("timm-condconv", "sg2-fused", "sg2-nonfused", "naive-bmm", "reference", "compiled-reference")


#: how the table names :func:`.runner.fp32_precision`'s modes
_PRECISION = {"tf32": "TF32 (--tf32)", "ieee": "exact float32 (IEEE; --tf32 for TF32)"}


#: a timing whose p80 / p20 exceeds this is flagged (``!``) in the table: the machine's load
#: changed during the run, and the median is worth less than the digits it shows
SPREAD_FLAG = 1.5


def _3(v: float) -> str:
    """Three significant digits, no exponent."""
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def _scaled(v, units) -> str:
    """``v`` (in the base unit) with the largest unit of ``units`` ((factor, name), ascending)
    that keeps it >= 1."""
    if v is None:
        return "-"
    factor, name = units[0]
    for f, n in units:
        if abs(v) >= f:
            factor, name = f, n
    return f"{_3(v / factor)} {name}"


def fmt_time(ms) -> str:
    """A duration given in ms, in us, ms or s: ``850 us``, ``12.3 ms``, ``2.1 s``."""
    return _scaled(None if ms is None else ms * 1e-3, ((1e-6, "us"), (1e-3, "ms"), (1.0, "s")))


def fmt_rate(v, unit: str) -> str:
    """A rate per second in k/M/G/T steps: ``fmt_rate(4.2e11, "FLOP/s") == "420 GFLOP/s"``."""
    return _scaled(v, ((1.0, unit), (1e3, "k" + unit), (1e6, "M" + unit), (1e9, "G" + unit), (1e12, "T" + unit)))


def spread_flagged(r: dict) -> bool:
    """Whether a record's p80 / p20 is above :data:`SPREAD_FLAG`."""
    return bool(r.get("p20_ms")) and r.get("p80_ms") is not None and r["p80_ms"] / r["p20_ms"] > SPREAD_FLAG


def _spread(r: dict) -> str:
    lo, hi = r["p20_ms"], r["p80_ms"]
    text = f"{fmt_time(lo)}-{fmt_time(hi)}"
    if fmt_time(lo).split()[1] == fmt_time(hi).split()[1]:  # one unit: say it once
        text = f"{fmt_time(lo).split()[0]}-{fmt_time(hi)}"
    return text + (" !" if spread_flagged(r) else "")


def _mib(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _grid(rows: list[tuple], indent: str = "  ") -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        out.append(indent + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
        if i == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


def format_table(sweep: Sweep) -> str:
    """One block per workload: impl, pass, median (p20-p80) ms, TFLOP/s, x dense, peak MiB."""
    env = sweep.env
    lines = [f"modweights bench on {env['device']} ({env['device_name']}, {env['num_threads']} threads), "
             f"torch {env['torch_version']}, triton {env['triton_version']}, commit {env['git_commit']}"]
    if env.get("fp32_precision"):
        lines.append(f"float32 dots: {_PRECISION[env['fp32_precision']]} on every implementation, the dense op included")
    seen = list(dict.fromkeys(r["workload"] for r in sweep.records))
    # a backend skipped as unavailable on every workload is said once, not per workload
    unavailable = {}
    for r in sweep.records:
        if r["status"] == "skipped" and r["reason"].startswith("unavailable"):
            unavailable.setdefault(r["impl"], r["reason"])
    unavailable = {k: v for k, v in unavailable.items()
                   if all(r["status"] == "skipped" and r["reason"] == v
                          for r in sweep.records if r["impl"] == k)}
    for impl, reason in unavailable.items():
        lines.append(f"  {impl}: {reason}")
    lines.append("bwd and fwd+bwd are the two halves of the same timed training steps (bwd < fwd+bwd in every "
                 "step); fwd is an inference call. ! marks p80/p20 > %.1f: a busy machine, rerun with more --reps"
                 % SPREAD_FLAG)
    skipped: dict[str, dict[str, list[str]]] = {}  # impl -> reason -> workloads
    auto_said = None
    for wl in seen:
        recs = [r for r in sweep.records if r["workload"] == wl and r["impl"] not in unavailable]
        r0 = recs[0]
        lines.append("")
        lines.append(f"{wl}: {r0['title']}  [{r0['shape']}, {r0['dtype']}, {fmt_rate(r0['flops'], 'FLOP')} fwd]")
        auto = (r0.get("auto_backend"), r0.get("auto_reason"))
        if auto[0] and auto != auto_said:  # said again only where it changes
            lines.append(f"  auto picks {auto[0]}: {auto[1]}")
            auto_said = auto
        rows = [("impl", "pass", "median", "p20-p80", "compute", "fwd traffic", "x dense", "peak MiB")]
        errors = {}
        for r in recs:
            if r["status"] == "skipped":
                skipped.setdefault(r["impl"], {}).setdefault(r["reason"], [])
                if wl not in skipped[r["impl"]][r["reason"]]:
                    skipped[r["impl"]][r["reason"]].append(wl)
                continue
            if r["status"] != "ok":
                errors.setdefault((r["impl"], r["status"], r["reason"]), []).append(r["pass"])
                continue
            rows.append((label(r["impl"]), r["pass"], fmt_time(r["median_ms"]), _spread(r),
                         fmt_rate(None if r["tflops"] is None else r["tflops"] * 1e12, "FLOP/s"),
                         fmt_rate(None if r.get("gbps") is None else r["gbps"] * 1e9, "B/s"),
                         _x(r["ratio_to_dense"]), _mib(r["peak_memory_bytes"])))
        if len(rows) > 1:
            lines += _grid(rows)
        for (impl, status, reason), passes in errors.items():
            which = "" if len(passes) == len(set(r["pass"] for r in recs)) else f" ({', '.join(passes)})"
            lines.append(f"  {impl}: {status}{which}: {reason}")
    if skipped:  # one line per implementation, over every workload
        lines += ["", "not run:"]
        for impl, reasons in skipped.items():
            parts = [reason + ("" if len(wls) == len(seen) else f" ({', '.join(wls)})") for reason, wls in reasons.items()]
            lines.append(f"  {impl}: {'; '.join(parts)}")
    ratios = format_ratios(sweep)
    if ratios:
        lines += ["", ratios]
    return "\n".join(lines)


def ratios(sweep: Sweep) -> list[dict]:
    """For each workload, pass and modweights backend: time relative to dense and to each peer."""
    ok = {(r["workload"], r["pass"], r["impl"]): r for r in sweep.records if r["status"] == "ok"}
    out = []
    for (wl, p, impl), r in ok.items():
        if impl not in I.backend_impls():
            continue
        row = {"workload": wl, "pass": p, "impl": impl, "median_ms": r["median_ms"],
               "ratio_to_dense": r["ratio_to_dense"]}
        for peer in PEERS:
            q = ok.get((wl, p, peer))
            if q is not None:
                row[f"vs {peer}"] = r["median_ms"] / q["median_ms"]
        out.append(row)
    return out


def format_ratios(sweep: Sweep) -> str:
    """Backends against dense and the peers (time ratios: below 1 is faster)."""
    rows = ratios(sweep)
    if not rows:
        return ""
    peers = [p for p in PEERS if any(f"vs {p}" in r for r in rows)]
    table = [("workload", "pass", "backend", "x dense") + tuple(f"x {p}" for p in peers)]
    for r in rows:
        table.append((r["workload"], r["pass"], r["impl"], _x(r["ratio_to_dense"]))
                     + tuple(_x(r.get(f"vs {p}")) for p in peers))
    return "\n".join(["time ratios of the modweights backends (below 1.00x: faster than that implementation)"]
                     + _grid(table))


def write_json(sweep: Sweep, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"environment": sweep.env, "records": [{k: r.get(k) for k in FIELDS} for r in sweep.records]},
                  f, indent=1)


def write_csv(sweep: Sweep, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sweep.records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})


def summary_markdown(sweep: Sweep, command: str = "") -> str:
    """The environment, the table and the ratios as a Markdown page."""
    env = sweep.env
    out = ["# modweights bench results", ""]
    if command:
        out += [f"Command: `{command}`", ""]
    out += [f"- {k}: {v}" for k, v in env.items()]
    out += ["", "```", format_table(sweep), "```", ""]
    return "\n".join(out)


def write_all(sweep: Sweep, out_dir: str, command: str = "") -> list[str]:
    """Write results.json, results.csv, summary.md and the plots into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.csv"),
             os.path.join(out_dir, "summary.md")]
    write_json(sweep, paths[0])
    write_csv(sweep, paths[1])
    with open(paths[2], "w") as f:
        f.write(summary_markdown(sweep, command))
    return paths + write_plots(sweep, out_dir)


__all__ = ["FIELDS", "format_table", "format_ratios", "ratios", "write_all", "write_csv", "write_json",
           "write_plots", "summary_markdown"]
