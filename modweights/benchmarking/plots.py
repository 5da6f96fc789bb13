"""The figures of ``modweights bench``: time relative to the dense op, and peak memory.

``ratio_to_dense.png``
    one row per pass; left: each implementation's median time over the dense op's, as a bar
    anchored at 1x on a log axis (so 0.5x and 2x are bars of the same length, one down, one up),
    with the p20-p80 range as an error bar; right: the peak memory of the same calls. An
    implementation that did not run on a workload is marked ``n/a`` where its bar would be; one
    that ran on none is left out of the panels and named below them.
``memory.png``
    the peak memory panels alone, larger.

Legend names say which implementations are this package's (``modweights (torch backend)``)
and which are plain PyTorch or a peer (:data:`LABELS`).
"""
from __future__ import annotations

import math
import os

from . import impls as I

#: legend and table names: ours say so, and so does plain PyTorch
LABELS = {
    "torch": "modweights (torch backend)",
    "triton": "modweights (triton backend)",
    "cuda": "modweights (cuda backend)",
    "dense": "dense: plain PyTorch, one weight",
    "reference": "reference: forms every weight",
    "naive-bmm": "materialise + bmm",
    "compiled-reference": "torch.compile(reference)",
}


def label(impl: str) -> str:
    return LABELS.get(impl, impl)


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks covering [lo, hi] (positive)."""
    out = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                out.append(v)
    return out or [lo, hi]


def _fmt_tick(v: float, suffix: str) -> str:
    return (f"{v:g}" if v >= 0.01 else f"{v:.0e}") + suffix


def _panel(ax, sweep, pass_: str, impls: list[str], key: str, anchor: float | None, suffix: str):
    """Grouped bars of ``key`` per workload (x) and implementation; bars start at ``anchor``
    (1 for ratios) or at the axis bottom (None); p20-p80 error bars for ratios."""
    wls = list(dict.fromkeys(r["workload"] for r in sweep.records))
    by = {(r["workload"], r["impl"]): r for r in sweep.records if r["pass"] == pass_}
    dense = {w: by.get((w, "dense")) for w in wls}
    width = 0.8 / max(len(impls), 1)
    order = I.all_impls()
    values = []
    for j, impl in enumerate(impls):
        for i, wl in enumerate(wls):
            r = by.get((wl, impl))
            v = None if r is None or r["status"] != "ok" else r.get(key)
            if v is not None and key == "peak_memory_bytes":
                v = max(v, 1) / 2**20
            if v is not None and v > 0:
                values.append(v)
    lo, hi = (min(values), max(values)) if values else (0.5, 2.0)
    if anchor is not None:
        lo, hi = min(lo, anchor), max(hi, anchor)
    lo, hi = lo / 1.5, hi * 1.5
    for j, impl in enumerate(impls):
        color = f"C{order.index(impl) % 10}" if impl in order else None
        labelled = False
        for i, wl in enumerate(wls):
            x = i - 0.4 + width * (j + 0.5)
            r = by.get((wl, impl))
            v = None if r is None or r["status"] != "ok" else r.get(key)
            if v is None or v <= 0:
                ax.text(x, anchor or lo * 1.3, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="0.4")
                continue
            if key == "peak_memory_bytes":
                v = max(v, 1) / 2**20
            base = anchor if anchor is not None else lo
            ax.bar(x, v - base, width, bottom=base, color=color, label=None if labelled else label(impl),
                   edgecolor="white", linewidth=0.3)
            labelled = True
            d = dense.get(wl)
            if key == "ratio_to_dense" and d and d.get("median_ms") and r.get("p20_ms") is not None:
                ax.errorbar(x, v, yerr=[[v - r["p20_ms"] / d["median_ms"]], [r["p80_ms"] / d["median_ms"] - v]],
                            fmt="none", ecolor="k", elinewidth=0.8, capsize=2)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ticks = _nice_ticks(lo, hi)
    ax.set_yticks(ticks)
    ax.set_yticklabels([_fmt_tick(t, suffix) for t in ticks])
    ax.minorticks_off()
    if anchor is not None:
        ax.axhline(anchor, color="k", linewidth=0.8)
    ax.set_xticks(range(len(wls)))
    ax.set_xticklabels(wls, rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(wls) - 0.4)
    ax.grid(axis="y", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)


def _impls(sweep) -> tuple[list[str], list[str]]:
    """(implementations measured on at least one workload, those measured on none)."""
    names = list(dict.fromkeys(r["impl"] for r in sweep.records))
    ran = {r["impl"] for r in sweep.records if r["status"] == "ok"}
    return [i for i in names if i in ran], [i for i in names if i not in ran]


def _caption(sweep) -> str:
    env = sweep.env
    kind = "GPU" if str(env.get("device", "")).startswith("cuda") else "CPU"
    reps = max((r.get("reps") or 0 for r in sweep.records), default=0)
    tiny = " - CI smoke sizes, not a measurement" if env.get("tiny") else ""
    return (f"{kind}: {env.get('device_name')} ({env.get('num_threads')} threads), torch {env.get('torch_version')}, "
            f"{reps} reps, {str(env.get('date', ''))[:10]}{tiny}")


def _memory_panel(ax, sweep, pass_: str, impls: list[str], title: str) -> None:
    _panel(ax, sweep, pass_, impls, "peak_memory_bytes", None, " MiB")
    ax.set_ylabel("peak extra memory per call", fontsize=8)
    ax.set_title(title, fontsize=9)


def _finish(fig, legend_ax, note: str, title: str, ncol: int, path: str) -> str:
    """The legend (from ``legend_ax``) and ``note`` below the panels, the title above; saved."""
    handles, labels = legend_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(ncol, len(labels)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.02))
    fig.text(0.5, 0.005, note, ha="center", fontsize=7, color="0.4")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=110)
    return path


def write_plots(sweep, out_dir: str) -> list[str]:
    """``ratio_to_dense.png`` (time ratio beside memory) and ``memory.png``; [] without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return []
    passes = list(dict.fromkeys(r["pass"] for r in sweep.records))
    n_wl = len({r["workload"] for r in sweep.records})
    impls, never = _impls(sweep)
    caption = _caption(sweep)
    note = f"not run on any workload here (see summary.md for why): {', '.join(never)}" if never else ""
    paths = []

    fig = Figure(figsize=(2 * (4 + 0.9 * n_wl), 3.4 * len(passes) + 1.2))
    axes = fig.subplots(len(passes), 2, squeeze=False)
    for (ax_t, ax_m), p in zip(axes, passes):
        _panel(ax_t, sweep, p, [i for i in impls if i != "dense"], "ratio_to_dense", 1.0, "x")
        ax_t.set_ylabel("time / dense (lower is faster)", fontsize=8)
        ax_t.set_title(f"{p}: time relative to the dense op (bars from 1x; p20-p80)", fontsize=9)
        _memory_panel(ax_m, sweep, p, impls, f"{p}: peak memory")
    paths.append(_finish(fig, axes[0][1], note, f"modweights bench - {caption}", 4,
                         os.path.join(out_dir, "ratio_to_dense.png")))

    method = next((r["memory_method"] for r in sweep.records if r.get("memory_method")), None)
    fig = Figure(figsize=(max(8.0, 4 + 1.1 * n_wl), 3.4 * len(passes) + 1.2))
    axes = fig.subplots(len(passes), 1, squeeze=False)[:, 0]
    for ax, p in zip(axes, passes):
        _memory_panel(ax, sweep, p, impls, f"{p}: peak memory ({method or 'not measured'})")
    paths.append(_finish(fig, axes[0], note, f"modweights bench memory - {caption}", 3,
                         os.path.join(out_dir, "memory.png")))
    return paths
