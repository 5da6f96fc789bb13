"""Python entry points of ``benchmarks/gpu_check.sh`` (the one GPU check; see benchmarks/README.md).

    python -m modweights.benchmarking.gpu_check env OUT.json
    python -m modweights.benchmarking.gpu_check small-cases --family triton-linear [--device cuda]
    python -m modweights.benchmarking.gpu_check auto-table OUT.json BENCH_RESULTS.json ... [--dry-run]
    python -m modweights.benchmarking.gpu_check sanitizer-verdict [--unsupported-file F] OUT.txt:EXIT ...
    python -m modweights.benchmarking.gpu_check summary WORKDIR [--out summary.txt]

``env``: device, driver-visible name, versions, commit, date and each backend's availability
(the cuda backend's reason says whether the CUDA build worked). ``small-cases``: a forward and
backward through every kernel of one family (``<backend>-<op>``) on small tile-crossing
shapes, fp32 and bf16 (fp32 only under the interpreter), atomics and deterministic mode: the
program ``compute-sanitizer --tool memcheck`` runs. ``auto-table``: the auto-table entries for
this GPU from the bench stage's records (no new timing). ``sanitizer-verdict``: each
compute-sanitizer run clean, with errors, or unsupported on this machine (:func:`sanitizer_verdict`).
``summary``: the one-screen summary
of a GPU check's work folder (pass/fail per stage, time against budget, W1-W7 ratios).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

FAMILIES = ("triton-linear", "triton-conv2d", "cuda-linear")


def _family(family: str) -> tuple[str, str]:
    """``(backend, op)`` of a family: the scripts' short names, ``triton-linear`` ->
    ``("triton", "mod_linear")`` (the op key is the op's stem)."""
    name, short = family.split("-", 1)
    return name, f"mod_{short}"


#: the GPU check's stages in order of value (benchmarks/gpu_check.sh)
STAGE_ORDER = ("env", "install", "verify", "sweep", "tests", "sanitizer", "bench-warm", "bench", "auto-table")

#: W1-W7 in the summary: the workloads and which pass is shown (decode is inference)
SUMMARY_WORKLOADS = ("W1", "W2a", "W2b", "W3", "W4", "W5", "W6-1", "W6-8", "W6-64", "W7")
SUMMARY_BACKENDS = ("torch", "triton", "cuda")
PEERS = ("naive-bmm", "timm-condconv", "sg2-fused", "sg2-nonfused", "compiled-reference", "reference")


# ----------------------------------------------------------------------------- env


def environment(device_name: str | None = None) -> dict:
    """The run's facts: the runner's environment plus the backends' availability and CUDA facts."""
    import torch

    from .. import backends
    from .runner import environment as runner_env

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = runner_env(dev)
    env["cuda_runtime"] = torch.version.cuda
    if dev.type == "cuda":
        env["capability"] = list(torch.cuda.get_device_capability(dev))
        env["multiprocessors"] = torch.cuda.get_device_properties(dev).multi_processor_count
    env["backends"] = {n: {"available": s.available, "reason": s.reason}
                       for n, s in backends.available_backends(dev).items()}
    return env


# ----------------------------------------------------------------------------- small cases


def small_cases(family: str, dry: bool = False):
    """The sanitizer's cases of one family: its op's spec says them
    (:meth:`modweights.ops.OpSpec.sanitizer_cases`)."""
    from .. import ops

    return ops.get(_family(family)[1]).sanitizer_cases(dry)


def run_small_cases(family: str, device: str, dry: bool = False) -> int:
    """Run every small case of ``family`` forward and backward, compare with the reference;
    0 when all ran and matched (the sanitizer judges the memory accesses)."""
    import torch

    from .. import backends
    from .. import testing as T

    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}; got {family!r}")
    name, op = _family(family)
    st = backends.status(name, device)
    if not st.available:
        print(f"{family}: backend {name} unavailable on {device}: {st.reason}")
        return 0 if dry else 1
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    bad = n = 0
    old = torch.are_deterministic_algorithms_enabled()
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            for dtype in dtypes:
                for case in small_cases(family, dry):
                    ok, why = backends.load(name).supports(op, **_problem(case, dtype))
                    if not ok:
                        continue
                    expected = T.run_case(case, "reference", dtype, device, compute_dtype=torch.float64)
                    got = T.run_case(case, name, dtype, device)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    wrong = [str(c) for c in T.compare_results(got, expected, dtype) if not c.ok]
                    n += 1
                    if wrong:
                        bad += 1
                        print(f"MISMATCH {family} {case.id} {dtype} deterministic={det}: {'; '.join(wrong)}")
    finally:
        torch.use_deterministic_algorithms(old)
    print(f"{family}: {n} small cases ran on {device}, {bad} mismatched")
    return 1 if bad or n == 0 else 0


# ----------------------------------------------------------------------------- sanitizer verdict

#: compute-sanitizer's own refusal of the GPU (seen on gVisor-based H200 machines, where the
#: program then dies with CUDA error 999, cudaErrorUnknown): the check cannot run there
_UNSUPPORTED = re.compile(r"^=+ .*Device not supported", re.M | re.I)
#: what memcheck / racecheck report for a kernel's bad access (each counts as a finding)
_FINDING = re.compile(r"^=+ +(Invalid __\w+__ (read|write|atomic)|.*out of bounds|.*misaligned address"
                      r"|.*Race reported|.*hazard detected|Error: Race|Malloc/Free error|Leaked \d+ bytes)", re.M | re.I)
_SUMMARY = re.compile(r"(ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: (\d+) hazards?)")


def sanitizer_verdict(text: str, exit_code: int) -> tuple[str, str]:
    """``(verdict, note)`` of one compute-sanitizer run from its output and exit status:
    ``"clean"`` (ran, nothing found), ``"errors"`` (a memory or race finding, or a failed run),
    or ``"unsupported"`` (the sanitizer refused this GPU: nothing was checked, which is not a
    finding about the kernels; a run that reports a finding is never called unsupported)."""
    findings = [m.group(0).strip("= ").strip() for m in _FINDING.finditer(text)]
    summary = _SUMMARY.search(text)
    if findings:
        return "errors", f"{len(findings)} finding(s), first: {findings[0][:120]}"
    if _UNSUPPORTED.search(text):
        err999 = " (then CUDA error 999)" if re.search(r"error 999|cudaErrorUnknown", text) else ""
        return "unsupported", f"compute-sanitizer: Device not supported{err999}: not checked on this machine"
    if exit_code == 0 and summary and (summary.group(2) or summary.group(3)) == "0":
        return "clean", summary.group(0)
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    return "errors", f"exit {exit_code}{', ' + summary.group(0) if summary else ''}; last: {last[:120]}"


def sanitizer_verdicts(files: list[str], codes: list[int], unsupported_file: str | None = None) -> int:
    """Print one verdict line per run (``files[i]`` with exit status ``codes[i]``) and the
    stage's last line; 0 when every run was clean or unsupported. With ``unsupported_file``,
    the names of the unsupported runs are written there (the driver then records the stage as
    ``unsupported``, not ``pass``)."""
    if len(files) != len(codes):
        raise ValueError(f"one exit status per file: {len(files)} files, {len(codes)} statuses")
    verdicts = {}
    for path, code in zip(files, codes):
        with open(path, encoding="utf-8", errors="replace") as f:
            verdict, note = sanitizer_verdict(f.read(), code)
        run = os.path.splitext(os.path.basename(path))[0]
        verdicts[run] = verdict
        print(f"{run}: {verdict.upper()}: {note}")
    bad = [r for r, v in verdicts.items() if v == "errors"]
    unsupported = [r for r, v in verdicts.items() if v == "unsupported"]
    if unsupported and unsupported_file:
        with open(unsupported_file, "w", encoding="utf-8") as f:
            f.write(" ".join(unsupported) + "\n")
    if bad:
        print(f"compute-sanitizer FAILED: {', '.join(bad)}")
    elif unsupported:
        print(f"compute-sanitizer UNSUPPORTED on this machine (nothing checked): {', '.join(unsupported)}"
              + (f"; clean: {', '.join(r for r in verdicts if r not in unsupported)}" if len(unsupported) < len(verdicts)
                 else ""))
    else:
        print(f"compute-sanitizer clean: {', '.join(verdicts)}")
    return 1 if bad else 0


def _problem(case, dtype):
    from ..verify import problem_kwargs

    return problem_kwargs(case, dtype)


# ----------------------------------------------------------------------------- auto table


def auto_table(out: str, bench_files: list[str], dry: bool = False) -> int:
    """Write the auto-table entries for this GPU (from the bench stage's results) to ``out``."""
    from . import auto_table as AT

    files = [f for f in bench_files if os.path.isfile(f)]
    if not files:
        print("auto-table: no bench results to read (the bench stage wrote none)")
        return 1
    facts = ("DRY RUN (no GPU)", (0, 0)) if dry else None
    if dry:  # the CPU records carry the CPU's name: label them as what they are, a dry run
        data = [json.load(open(f, encoding="utf-8")) for f in files]
        recs = [dict(r, device_name=facts[0]) for d in data for r in d["records"]]
        env = dict(data[0]["environment"], tiny=True)
        table = AT.table_of(AT.entries_from_records(recs, env, facts, tiny=True), facts[0])
    else:
        table, _ = AT.from_bench(files, facts)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    for e in table["entries"]:
        m = e["measured"]
        times = ", ".join(f"{k[:-3]} {v}" for k, v in m.items() if k.endswith("_ms"))
        print(f"{e['op']:6} {e['class']:22} {e['dtype']:9} -> {e['backend']:7} ({times} ms)")
    print(f"auto-table: {len(table['entries'])} entries for {table['comment'].rsplit(' on ', 1)[-1]}")
    return 0


# ----------------------------------------------------------------------------- summary


def _read_stages(work: str) -> list[dict]:
    path = os.path.join(work, "stages.tsv")
    out = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 5:
                    out.append(dict(name=parts[0], result=parts[1], seconds=parts[2], budget=parts[3],
                                    note=parts[4]))
    return out


def bench_records(work: str) -> tuple[list[dict], dict]:
    recs, env = [], {}
    root = os.path.join(work, "bench")
    for group in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        p = os.path.join(root, group, "results.json")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
            recs += data["records"]
            env = env or data["environment"]
    return recs, env


def ratio_lines(recs: list[dict]) -> list[str]:
    """W1-W7: time / dense of each backend and of the best peer, and auto's pick."""
    ok = {(r["workload"], r["impl"], r["pass"]): r for r in recs if r["status"] == "ok"}
    seen = [w for w in SUMMARY_WORKLOADS if any(k[0] == w for k in ok)]
    if not seen:
        return ["W1-W7: no bench results"]
    head = ("workload", "pass", "dense ms") + SUMMARY_BACKENDS + ("best peer", "auto")
    rows = [head]
    for w in seen:
        p = "fwd" if w.startswith("W6") else "fwd+bwd"
        dense = ok.get((w, "dense", p))
        cells = [w, p, f"{dense['median_ms']:.3f}" if dense else "-"]
        for b in SUMMARY_BACKENDS:
            r = ok.get((w, b, p))
            cells.append(f"{r['ratio_to_dense']:.2f}x" if r and r["ratio_to_dense"] else "-")
        peers = [(ok[(w, q, p)]["ratio_to_dense"], q) for q in PEERS if (w, q, p) in ok
                 and ok[(w, q, p)]["ratio_to_dense"]]
        cells.append(f"{min(peers)[1]} {min(peers)[0]:.2f}x" if peers else "-")
        any_rec = next(r for r in recs if r["workload"] == w)
        cells.append(any_rec.get("auto_backend") or "-")
        rows.append(tuple(cells))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    out = ["W1-W7: time / dense op of the same shape (lower is better; bwd and fwd alone in the files)"]
    for i, r in enumerate(rows):
        out.append("  " + "  ".join(str(v).ljust(wd) for v, wd in zip(r, widths)).rstrip())
    return out


def summary(work: str, dry: bool) -> str:
    env = {}
    p = os.path.join(work, "env", "env.json")
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            env = json.load(f)
    head = (f"modweights GPU check: {env.get('device_name', '?')}, {env.get('date', '?')}, commit "
            f"{env.get('git_commit', '?')}, torch {env.get('torch_version', '?')}, "
            f"triton {env.get('triton_version', '?')}")
    lines = [head]
    if dry:
        lines.append("DRY RUN on a machine without a GPU: the plan and the machinery ran; nothing here is a GPU result")
    order = {n: i for i, n in enumerate(STAGE_ORDER)}
    # (the concurrent stages finish in any order)
    stages = sorted(_read_stages(work), key=lambda s: order.get(s["name"], len(order)))
    rows = [("stage", "result", "s / budget", "note")]
    rows += [(s["name"], s["result"], f"{s['seconds']} / {s['budget']}", s["note"][:90]) for s in stages]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3])
    recs, _ = bench_records(work)
    lines.append("")
    lines += ratio_lines(recs)
    at = os.path.join(work, "auto-table", "auto_table.json")
    if os.path.isfile(at):
        with open(at, encoding="utf-8") as f:
            entries = json.load(f)["entries"]
        picks = ", ".join(f"{e['op']}/{e['class']}/{e['dtype']}->{e['backend']}" for e in entries)
        lines.append(f"auto table ({len(entries)} entries): {picks or 'none'}")
    failed = [s["name"] for s in stages if s["result"] not in ("pass", "dry-ok", "unsupported")]
    unsupported = [s["name"] for s in stages if s["result"] == "unsupported"]
    if failed:
        verdict = "NOT PASSED: " + ", ".join(failed)
    elif unsupported:  # a tool this machine refuses checked nothing: said, never counted as a pass
        verdict = f"passed where this machine supports the check; UNSUPPORTED here: {', '.join(unsupported)}"
    else:
        verdict = "all stages passed"
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modweights.benchmarking.gpu_check",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("out")
    s = sub.add_parser("small-cases")
    s.add_argument("--family", required=True, choices=FAMILIES)
    s.add_argument("--device", default="cuda")
    s.add_argument("--dry-run", action="store_true")
    a = sub.add_parser("auto-table")
    a.add_argument("out")
    a.add_argument("bench", nargs="*")
    a.add_argument("--dry-run", action="store_true")
    v = sub.add_parser("sanitizer-verdict")
    v.add_argument("--unsupported-file")
    v.add_argument("runs", nargs="+", metavar="FILE:EXIT", help="a sanitizer output file and its exit status")
    m = sub.add_parser("summary")
    m.add_argument("work")
    m.add_argument("--out")
    m.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "env":
        env = environment()
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(env, f, indent=1)
        cuda = env["backends"]["cuda"]
        print(f"{env['device_name']}, torch {env['torch_version']}, triton {env['triton_version']}, "
              f"commit {env['git_commit']}; cuda backend: {'available' if cuda['available'] else 'unavailable'}: "
              f"{cuda['reason']}")
        return 0
    if args.cmd == "small-cases":
        return run_small_cases(args.family, args.device, args.dry_run)
    if args.cmd == "sanitizer-verdict":
        runs = [r.rsplit(":", 1) for r in args.runs]
        if any(len(r) != 2 or not r[1].lstrip("-").isdigit() for r in runs):
            p.error(f"sanitizer-verdict: each run is FILE:EXIT (an output file and its exit status); got {args.runs}")
        return sanitizer_verdicts([f for f, _ in runs], [int(c) for _, c in runs], args.unsupported_file)
    if args.cmd == "auto-table":
        return auto_table(args.out, args.bench, args.dry_run)
    text = summary(args.work, args.dry_run)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
