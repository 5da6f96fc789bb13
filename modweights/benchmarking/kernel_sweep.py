"""The raw-kernel sweep: every configuration of every autotuned Triton kernel, launched
directly on tile-crossing shapes and compared with the float64 reference.

    python -m modweights.benchmarking.kernel_sweep --out DIR [--jobs 8] [--dtype bfloat16]
    python -m modweights.benchmarking.kernel_sweep --dry-run --out DIR      (CPU, no GPU)

Autotuning picks one configuration per key at run time, on shapes nobody tested; this sweep
makes sure none of the candidates it might pick computes a wrong answer. The kernels and
their configuration lists are read from the package itself, never copied: every kernel the
ops' Triton launchers register with candidate configs (``triton_kernels/_launch.py``,
:func:`discover`; each op's spec names its launcher module, ``OpSpec.triton_launcher``).

How one configuration is launched: every launch goes through the one launch path,
``_launch.launch(raw, grid, args, flags)``; the sweep wraps it so that the kernel under
test runs as ``raw[grid(meta)](*args, **flags, **meta)`` with that configuration's
meta-parameters, warps and stages, while every other kernel of the pass keeps its default
(``MODWEIGHTS_TRITON_AUTOTUNE=0``). Each shape's output and every gradient are compared with
the reference in float64 on the same inputs (:data:`modweights.testing.TOLERANCE`).
A configuration the kernel's own prune function drops for that launch (shared memory,
registers) is recorded as ``pruned`` and not launched: autotuning never runs it there.

Then every shape runs once more through the autotuned kernels themselves (a tuning call and a
cached call, ``MODWEIGHTS_TRITON_AUTOTUNE=1``): autotuning runs each candidate on the real output
buffers, so the answer after tuning is checked too.

Work is split over ``--jobs`` processes (compilation is the cost: one compile per
configuration and flag set); each appends one JSON line per result to
``DIR/sweep-<i>.jsonl`` as it goes, so a stage cut short keeps what ran; the parent merges
them into ``DIR/sweep.json`` and prints one line per kernel. Exit status 1 on any mismatch or
error. ``--dry-run`` (CPU, Triton interpreter): discovery, the configuration lists and the
prune decisions for the GPU shapes, and one launch per kernel through the same wrapper with
the interpreter's tiles on tiny shapes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .. import _switches as switches

PKG = "modweights.triton_kernels"


def _registry():
    """The one launch path (``triton_kernels/_launch.py``), every op's kernels registered: the
    launcher module each kernel-implementing op's spec names is imported (no GPU needed)."""
    from .. import ops
    for spec in ops.SPECS.values():
        if spec.triton_launcher:
            spec.triton_module()
    return importlib.import_module(f"{PKG}._launch")


def ops_with_kernels() -> list[str]:
    """The ops whose Triton launchers register tuned kernels, in registration order."""
    return list(dict.fromkeys(k.op for k in _registry().tuned_kernels()))


@dataclass(frozen=True)
class Kernel:
    """One autotuned kernel: ``op`` and its raw ``@triton.jit`` name (its candidate configs and
    prune function are the ones registered with the launch path)."""

    op: str
    name: str

    @property
    def registered(self):
        return _registry().by_name(self.name)

    @property
    def short(self) -> str:
        return f"{self.op}:{self.name.strip('_').replace('kernel', '').strip('_')}"


def discover() -> list[Kernel]:
    """Every kernel registered with candidate configs (:func:`_launch.tuned_kernels`)."""
    return [Kernel(k.op, k.name) for k in _registry().tuned_kernels()]


def config_list(k: Kernel) -> list:
    """The kernel's candidate ``triton.Config`` list, as registered."""
    return list(k.registered.configs)


def describe(cfg) -> str:
    kw = ",".join(f"{n.replace('BLOCK_', '')}{v}" for n, v in cfg.kwargs.items())
    return f"{kw},w{cfg.num_warps},s{cfg.num_stages}"


def meta_of(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------- shapes


def shapes(op: str, dry: bool):
    """(label, case, force_mix_b) per op, from the op's spec (``OpSpec.sweep_cases``): GPU shapes
    cross the largest tiles of every list, dry-run shapes are tiny."""
    from .. import ops
    return ops.get(op).sweep_cases(dry)


# ----------------------------------------------------------------------------- one launch


class Forcer:
    """Wraps the one launch path (``_launch.launch``) so that one kernel runs with one configuration.

    ``target`` (a :class:`Kernel`) and ``meta`` select it; ``seen`` collects which kernels
    ran and ``named`` the last named arguments each one received (for the prune decision).
    """

    def __init__(self):
        self.mod = _registry()
        self.orig = self.mod.launch
        self.target, self.meta = None, None
        self.seen: dict[str, dict] = {}
        self.forced = 0  # launches that ran the target with the forced meta

    def _launch(self, raw, grid, args, flags):
        name = self.mod.KERNELS[raw].name
        self.seen[name] = dict(zip(raw.arg_names, args), **flags)
        t = self.target
        if t is not None and name == t.name and self.meta is not None:
            self.mod.run(raw, grid, args, flags, self.meta)
            self.forced += 1
        else:
            self.orig(raw, grid, args, flags)

    def __enter__(self):
        self.mod.launch = self._launch
        return self

    def __exit__(self, *exc):
        self.mod.launch = self.orig


def _run(case, force_mix_b, dtype, device, seed, expected=None):
    from .. import testing as T

    with switches.override(triton_mix_b=force_mix_b):  # the layout, as tests force it
        got = T.run_case(case, "triton", dtype, device, seed=seed)
    if expected is None:
        return got, []
    return got, T.compare_results(got, expected, dtype)


def kept_by_prune(k: Kernel, cfgs: list, named: dict) -> list[bool]:
    """For each configuration, whether the kernel's prune function keeps it for a launch with
    these named arguments (what autotuning would consider)."""
    prune = k.registered.prune
    if prune is None:
        return [True] * len(cfgs)
    flags = {n: v for n, v in named.items() if n.isupper()}
    kept = prune(list(cfgs), named, **flags)
    ids = {id(c) for c in kept}
    return [id(c) in ids for c in cfgs]


def work_items(dry: bool) -> list[tuple[Kernel, int]]:
    return [(k, i) for k in discover() for i in range(len(config_list(k)) if not dry else 1)]


def run_shard(shard: int, jobs: int, dtype_name: str, device: str, out_path: str, dry: bool, seed: int = 0):
    """Run every ``jobs``-th work item starting at ``shard``; append results to ``out_path``."""
    import torch

    from .. import testing as T

    dtype = getattr(torch, dtype_name)
    forcer = Forcer()
    items = work_items(dry)[shard::jobs]
    per_op = {op: shapes(op, dry) for op in ops_with_kernels()}
    expected, uses = {}, {}
    with forcer, open(out_path, "a", encoding="utf-8") as out:
        # probe: which kernels each shape launches (defaults), and the reference answers
        for op, shp in per_op.items():
            for label, case, mix in shp:
                expected[label] = T.run_case(case, "reference", dtype, device, seed=seed,
                                             compute_dtype=torch.float64)
                forcer.seen.clear()
                _run(case, mix, dtype, device, seed)
                uses[label] = dict(forcer.seen)
        for k, ci in items:
            cfgs = config_list(k)
            cfg = cfgs[ci]
            labels = [lab for lab, _, _ in per_op[k.op] if k.name in uses[lab]][:2]
            if not labels:
                rec = dict(kernel=k.short, config=describe(cfg), index=ci, shape="-", status="error",
                           detail="no sweep shape launches this kernel")
                out.write(json.dumps(rec) + "\n")
                out.flush()
            for lab in labels:
                case, mix = next((c, m) for lb, c, m in per_op[k.op] if lb == lab)
                rec = dict(kernel=k.short, config=describe(cfg), index=ci, shape=lab, case=case.id,
                           dtype=dtype_name)
                t0 = time.perf_counter()
                keep = kept_by_prune(k, cfgs, uses[lab][k.name])[ci]
                rec["kept_by_prune"] = keep
                if not keep and not dry:
                    rec.update(status="pruned", detail="the kernel's prune drops it for this launch")
                else:
                    forcer.target, forcer.forced = k, 0
                    forcer.meta = meta_of(cfg) if not dry else _interpreter_meta(k)
                    try:
                        _, comps = _run(case, mix, dtype, device, seed, expected[lab])
                        bad = [str(c) for c in comps if not c.ok]
                        if not forcer.forced:  # the wrapper missed the kernel: nothing was tested
                            bad.append(f"{k.name} was not launched with the forced configuration")
                        worst = max((c.worst for c in comps), default=float("nan"))
                        rec.update(status="FAIL" if bad else "pass", worst=worst, launches=forcer.forced,
                                   detail="; ".join(bad)[:400])
                    except Exception as e:  # noqa: BLE001 - one config's crash is a result
                        name = type(e).__name__
                        oor = name in ("OutOfResources", "PTXASError")
                        rec.update(status="out-of-resources" if oor else "error",
                                   detail=f"{name}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                    finally:
                        forcer.target = forcer.meta = None
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                out.write(json.dumps(rec) + "\n")
                out.flush()


def run_autotuned(dtype_name: str, device: str, out_path: str, dry: bool, seed: int = 0):
    """Every sweep shape through the autotuned kernels (``MODWEIGHTS_TRITON_AUTOTUNE=1``): the first
    call tunes (each candidate runs on the real buffers, which autotuning must reset), the second
    takes the cached choice; both must match the reference."""
    import torch

    from .. import testing as T

    dtype = getattr(torch, dtype_name)
    with open(out_path, "a", encoding="utf-8") as out:
        for op in ops_with_kernels():
            for label, case, mix in shapes(op, dry):
                expected = T.run_case(case, "reference", dtype, device, seed=seed, compute_dtype=torch.float64)
                for call in ("tuning call", "cached call"):
                    rec = dict(kernel=f"{op}:autotuned", config=call, index=-1, shape=label, case=case.id,
                               dtype=dtype_name)
                    t0 = time.perf_counter()
                    try:
                        _, comps = _run(case, mix, dtype, device, seed, expected)
                        bad = [str(c) for c in comps if not c.ok]
                        rec.update(status="FAIL" if bad else "pass", detail="; ".join(bad)[:400])
                    except Exception as e:  # noqa: BLE001
                        rec.update(status="error", detail=f"{type(e).__name__}: {str(e)[:300]}")
                    rec["seconds"] = round(time.perf_counter() - t0, 2)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()


def _interpreter_meta(k: Kernel) -> dict:
    """Dry run: the interpreter's own tiles for the kernel (its configs are GPU-sized)."""
    return dict(k.registered.fixed)


# ----------------------------------------------------------------------------- the whole sweep


def plan_lines(dry: bool) -> list[str]:
    lines = []
    for k in discover():
        cfgs = config_list(k)
        pruned = "pruned per launch" if k.registered.prune else "no pruning"
        lines.append(f"{k.short:28s} {len(cfgs):3d} configs ({pruned})")
    return lines


def merge(out_dir: str, jobs: int, dry: bool) -> dict:
    recs = []
    for i in [*range(jobs), "autotuned"]:
        p = os.path.join(out_dir, f"sweep-{i}.jsonl")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                recs += [json.loads(line) for line in f if line.strip()]
    ran = {(r["kernel"], r["index"]) for r in recs}
    missing = [f"{k.short}#{i}" for k, i in work_items(dry) if (k.short, i) not in ran]
    by_kernel: dict[str, dict[str, int]] = {}
    for r in recs:
        by_kernel.setdefault(r["kernel"], {}).setdefault(r["status"], 0)
        by_kernel[r["kernel"]][r["status"]] += 1
    bad = [r for r in recs if r["status"] in ("FAIL", "error")]
    result = {"ok": not bad and not missing, "dry_run": dry, "records": recs, "missing": missing,
              "by_kernel": by_kernel}
    with open(os.path.join(out_dir, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m modweights.benchmarking.kernel_sweep",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for sweep-<i>.jsonl and sweep.json")
    p.add_argument("--jobs", type=int, default=8, help="worker processes (default 8)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: discovery, prune decisions, one interpreted launch per kernel")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # a worker (spawned by the parent): N or "autotuned"
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1; got {args.jobs}")
    os.makedirs(args.out, exist_ok=True)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run and args.dtype == "bfloat16":
        args.dtype = "float32"  # the interpreter's bf16 dot is wrong (docs/environment.md)
    if not args.dry_run and not torch.cuda.is_available():
        print("kernel_sweep: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    if args.shard is not None:
        path = os.path.join(args.out, f"sweep-{args.shard}.jsonl")
        if args.shard == "autotuned":
            run_autotuned(args.dtype, device, path, args.dry_run)
        else:
            run_shard(int(args.shard), args.jobs, args.dtype, device, path, args.dry_run)
        return 0
    print("\n".join(plan_lines(args.dry_run)), flush=True)
    for i in [*range(args.jobs), "autotuned"]:  # a rerun into the same folder starts afresh
        p_ = os.path.join(args.out, f"sweep-{i}.jsonl")
        if os.path.exists(p_):
            os.remove(p_)
    env = dict(os.environ, MODWEIGHTS_TRITON_AUTOTUNE="0", PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "modweights.benchmarking.kernel_sweep", "--out", args.out, "--jobs",
           str(args.jobs), "--dtype", args.dtype] + (["--dry-run"] if args.dry_run else [])
    procs = []
    for i in range(args.jobs):
        log = open(os.path.join(args.out, f"worker-{i}.log"), "w")
        procs.append((subprocess.Popen(cmd + ["--shard", str(i)], env=env, stdout=log, stderr=subprocess.STDOUT),
                      log))
    rcs = []
    for proc, log in procs:
        rcs.append(proc.wait())
        log.close()
    # then the autotuned path itself, on a warm compile cache (the shards compiled every config)
    with open(os.path.join(args.out, "worker-autotuned.log"), "w") as log:
        tuned_env = dict(env, MODWEIGHTS_TRITON_AUTOTUNE="1")
        rcs.append(subprocess.run(cmd + ["--shard", "autotuned"], env=tuned_env, stdout=log,
                                  stderr=subprocess.STDOUT).returncode)
    res = merge(args.out, args.jobs, args.dry_run)
    for name, counts in res["by_kernel"].items():
        print(f"{name:28s} " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in res["records"]:
        if r["status"] in ("FAIL", "error"):
            print(f"  {r['status']} {r['kernel']} [{r['config']}] on {r['shape']}: {r['detail']}")
    if res["missing"]:
        print(f"not run: {len(res['missing'])} configs ({', '.join(res['missing'][:8])}...)")
    if any(rcs):
        print(f"worker exit codes {rcs} (see worker-*.log)")
    n = len(res["records"])
    print(f"sweep {'OK' if res['ok'] and not any(rcs) else 'FAILED'}: {n} launches"
          + (" (dry run: interpreter tiles, not the GPU configurations)" if args.dry_run else ""))
    return 0 if res["ok"] and not any(rcs) else 1


__all__ = ["Forcer", "Kernel", "config_list", "discover", "kept_by_prune", "main", "merge", "shapes"]

if __name__ == "__main__":
    sys.exit(main())
