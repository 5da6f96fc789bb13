"""The AOT report: every Triton kernel specialisation the package launches, compiled for a
GPU that is not here, and what the compiler made of it.

``python -m modweights.aot`` compiles, for sm_90a (and sm_80) with the installed Triton (or
another: ``--python``), each kernel launch of a forward and a backward at the workloads W1-W7
(``modweights.benchmarking.workloads``; the ``MODWEIGHTS_TRITON_AUTOTUNE=0`` default and every
config autotuning keeps) and at the GPU tests' shapes, and writes
``benchmarks/results/aot_report.json`` and ``.md``: per kernel, workload and config the shared
memory, registers, spill bytes, ``wgmma`` / ``mma.sync`` / FMA instruction counts and whether
each main loop with a dot is software-pipelined (async copies staged in the loop).

The specialisations come from the launchers themselves (:mod:`.specs`), the compiles from a
torch-free worker (:mod:`.compile_worker`). No GPU is needed. ``tests/test_aot.py`` runs the
W1-W7 defaults for sm_90a and fails on what :func:`problems` names.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from .specs import Problem, compile_specs, spec_key

#: shared memory one block may use: sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB
SMEM_LIMIT = {90: 232448, 80: 166912}

_DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def workload_problems(names=None) -> list[Problem]:
    """W1-W7 (or the named workloads) in their GPU dtypes."""
    from ..benchmarking.workloads import select
    ws = select(names or ["gpu"])
    return [Problem(w.name, w.case, _DT[w.gpu_dtype]) for w in ws]


def test_problems() -> list[Problem]:
    """The shapes of the GPU tests (each op's ``OpSpec.aot_test_cases``: odd sizes, tails in every
    dimension, bias modes); bf16, autotuning off."""
    from .. import ops
    cases = [c for s in ops.SPECS.values() if s.triton_launcher for c in s.aot_test_cases()]
    return [Problem("test:" + c.id, c, torch.bfloat16) for c in cases]


def _worker_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_worker.py")


def compile_all(specs: list[dict], python: str | None = None, jobs: int = 1) -> tuple[str, list[dict]]:
    """Compile ``specs`` (deduplicated) in ``jobs`` worker processes of ``python``; returns
    (triton version, one result per spec, in order)."""
    python = python or sys.executable
    unique: dict[str, dict] = {}
    for s in specs:
        unique.setdefault(spec_key(s), s)
    todo = list(unique.items())
    for i, (_, s) in enumerate(todo):
        s["id"] = str(i)
    chunks = [todo[j::max(jobs, 1)] for j in range(max(jobs, 1))]
    by_key, version = {}, "?"
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for j, chunk in enumerate(c for c in chunks if c):
            src, dst = os.path.join(tmp, f"in{j}.json"), os.path.join(tmp, f"out{j}.json")
            with open(src, "w") as f:
                json.dump([s for _, s in chunk], f)
            env = dict(os.environ)
            env.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller runs under
            procs.append((chunk, dst, subprocess.Popen([python, _worker_path(), src, dst], env=env)))
        for chunk, dst, p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"the compile worker ({python}) failed with exit code {p.returncode}")
            with open(dst) as f:
                data = json.load(f)
            version = data["triton"]
            res = {r["id"]: r for r in data["results"]}
            for key, s in chunk:
                by_key[key] = res[s["id"]]
    out = []
    for s in specs:
        r = dict(by_key[spec_key(s)])
        r.pop("id", None)
        out.append(r)
    return version, out


def rows_for(problems_, which="default", archs=(90,), python=None, jobs=1, default_only=()) -> tuple[str, list[dict]]:
    """Report rows: each spec's description joined with its compile result. ``default_only``:
    problems compiled at their default config whatever ``which`` says (the test shapes: the GPU
    tests run with autotuning off)."""
    specs = [s for p in problems_ for s in compile_specs(p, which, archs)]
    specs += [s for p in default_only for s in compile_specs(p, "default", archs)]
    version, results = compile_all(specs, python, jobs)
    keep = ("problem", "shape", "dtype", "deterministic", "pass", "kernel", "config", "default", "in_autotune",
            "grid", "arch", "num_warps", "num_stages")
    return version, [dict({k: s[k] for k in keep}, **r) for s, r in zip(specs, results)]


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled specialisation (empty: nothing). sm_90a rows must also
    be pipelined in every loop that holds a dot."""
    if "error" in row:
        return [f"compile failed: {row['error'][:200]}"]
    out = []
    limit = SMEM_LIMIT.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        out.append(f"shared memory {row['shared']} B > {limit} B")
    if row.get("spill_stores", 0) or row.get("spill_loads", 0):
        out.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads)")
    if "registers" not in row:
        out.append("no ptxas register count")
    if row["arch"] == 90 and row["dot_loops"] > row["pipelined_loops"]:
        out.append(f"{row['dot_loops'] - row['pipelined_loops']} of {row['dot_loops']} dot loops not pipelined")
    return out


def markdown(version: str, rows: list[dict]) -> str:
    """The report as a markdown table, grouped by problem."""
    lines = [f"# AOT report (Triton {version})", "",
             "Compiled without a GPU (`python -m modweights.aot`); `pipelined`: loops holding a dot that hold "
             "async copies / all loops holding a dot. `default`: the config `MODWEIGHTS_TRITON_AUTOTUNE=0` "
             "runs (`*`). Predictions of the compiler, not measurements.", ""]
    for label, pick in (("W1-W7", lambda r: not r["problem"].startswith("test:")),
                        ("test shapes (defaults)", lambda r: r["problem"].startswith("test:"))):
        for arch in sorted({r["arch"] for r in rows}, reverse=True):
            sel = [r for r in rows if pick(r) and r["arch"] == arch]
            if sel:
                nbad = sum(1 for r in sel if problems(r))
                lines.append(f"- {label}, sm_{arch}{'a' if arch == 90 else ''}: {len(sel)} specialisations, "
                             f"{nbad} with problems")
    lines.append("")
    head = ("| problem | pass | kernel | config | default | arch | shared B | regs | spill B | wgmma | mma.sync "
            "| fma | pipelined | problems |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        bad = "; ".join(problems(r))
        if "error" in r:
            cells = ["-"] * 7
        else:
            spill = r.get("spill_stores", 0) + r.get("spill_loads", 0)
            pl = f"{r['pipelined_loops']}/{r['dot_loops']}" if r["dot_loops"] else "no dot"
            cells = [r["shared"], r.get("registers", "?"), spill, r["wgmma"], r["mma_sync"], r["fma"], pl]
        lines.append("| " + " | ".join(str(c) for c in [
            r["problem"], r["pass"], r["kernel"].replace("_kernel", "").lstrip("_"), r["config"],
            "*" if r["default"] else "", f"sm_{r['arch']}{'a' if r['arch'] == 90 else ''}", *cells, bad]) + " |")
    return "\n".join(lines) + "\n"
