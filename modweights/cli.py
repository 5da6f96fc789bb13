"""The ``modweights`` command: ``modweights verify`` and ``modweights bench``
(also ``python -m modweights ...``).

``verify`` checks every public op in every mode on every available backend against the
float64 reference, outputs and gradients, and exits 1 on any failure.
``bench`` times the workloads on every applicable implementation and writes a table,
JSON, CSV, a Markdown summary and PNG plots; it exits 1 if an implementation raised.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

#: --quick: repetitions (warm-up, timed) and the sweep it runs
QUICK_WARMUP, QUICK_REPS = 2, 5
#: repetitions (warm-up, timed) by device type otherwise: enough that p20-p80 means something
DEFAULT_WARMUP = {"cpu": 3, "cuda": 5}
DEFAULT_REPS = {"cpu": 15, "cuda": 30}


class _ListAction(argparse.Action):
    """Collect values given comma- or space-separated, over repeated options:
    ``--x a,b --x c`` and ``--x a b c`` both give ``["a", "b", "c"]``."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for v in values:
            items += [t for t in (p.strip() for p in v.split(",")) if t]
        setattr(namespace, self.dest, items)


def _device(parser: argparse.ArgumentParser, text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {text}: no CUDA device is available (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device {text}: only cpu and cuda devices are supported")
    return dev


def _check_choices(parser, option: str, values, choices) -> list[str]:
    bad = [v for v in values if v not in choices]
    if bad:
        parser.error(f"{option}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
    return list(values)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import backends
    from .benchmarking import runner
    from .verify import DTYPES, SIZES

    p = argparse.ArgumentParser(prog="modweights", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{verify,bench}")
    sub.required = True

    v = sub.add_parser("verify", help="check every op, mode and backend against the float64 reference",
                       description="Run every public op in every mode on every available backend and "
                                   "compare the output and every gradient with the reference computed "
                                   "in float64 on the same inputs. Exits 1 on any failure.")
    v.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    v.add_argument("--dtypes", nargs="+", action=_ListAction, metavar="DTYPE",
                   help=f"dtypes to check, comma- or space-separated, from {', '.join(DTYPES)} "
                        "(default: float32,float64 on cpu; float32,float16,bfloat16 on cuda)")
    v.add_argument("--backends", nargs="+", action=_ListAction, metavar="NAME",
                   help=f"backends to check, from {', '.join(backends.NAMES + ('auto',))} (default: all)")
    v.add_argument("--seed", type=int, help="base seed of the random inputs (default: a fresh one, printed)")
    v.add_argument("--size", choices=SIZES, default="small", help="case sizes; medium scales them up")
    v.add_argument("--quiet", action="store_true",
                   help="no summary table and no progress bar: only failures and the verdict")
    v.add_argument("--verbose", action="store_true",
                   help="also every case's errors, and auto's pick per case (default: failures only)")

    b = sub.add_parser("bench", help="time the workloads on every applicable implementation",
                       description="Time each workload (forward, backward, and forward+backward) on the modweights "
                                   "backends, the dense op, the naive reference, the peers' paths and "
                                   "torch.compile; write results.json, results.csv, summary.md and PNG "
                                   "plots to --out. Exits 1 if an implementation raised an error.")
    b.add_argument("--workloads", nargs="+", action=_ListAction, metavar="NAME",
                   help="workload names, a prefix (W6), or a group (cpu, gpu, all); default: the "
                        "device's group (cpu-* on cpu, W1-W7 on cuda). See --list")
    b.add_argument("--impls", nargs="+", action=_ListAction, metavar="NAME",
                   help="implementations to time (default: all that apply; dense is always timed)")
    b.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    b.add_argument("--dtype", choices=list(runner.DTYPES),
                   help="dtype for every workload (default: float32 on cpu; each workload's own on cuda)")
    b.add_argument("--tf32", action="store_true", help="float32 dots in TF32 on every implementation, the dense "
                   "op's cuDNN / cuBLAS calls included (default: exact float32 everywhere, like with like)")
    b.add_argument("--reps", type=_positive,
                   help=f"timed repetitions (default {DEFAULT_REPS['cpu']} on cpu, {DEFAULT_REPS['cuda']} on cuda; "
                        f"--quick {QUICK_REPS})")
    b.add_argument("--warmup", type=_positive,
                   help=f"warm-up calls (default {DEFAULT_WARMUP['cpu']} on cpu, {DEFAULT_WARMUP['cuda']} on cuda; "
                        f"--quick {QUICK_WARMUP})")
    b.add_argument("--quick", action="store_true",
                   help=f"a small sweep (the device's default workloads, {QUICK_WARMUP} warm-up + {QUICK_REPS} reps, "
                        "no torch.compile unless --compile on): a few minutes on 2 CPU cores")
    b.add_argument("--passes", nargs="+", action=_ListAction, metavar="PASS",
                   help="any of fwd (inference), bwd (the backward alone) and fwd+bwd (a training step); "
                        "bwd and fwd+bwd are timed in the same steps (default: all three)")
    b.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="time torch.compile of the naive reference (auto: on, except with --quick)")
    b.add_argument("--compile-timeout", type=_nonneg_float, default=240.0, metavar="S",
                   help="give up compiling one implementation after S seconds, 0 for no limit (default 240)")
    b.add_argument("--mem-limit", type=_nonneg_float, metavar="GIB",
                   help="skip implementations that would form more than this many GiB of per-sample "
                        "weights (default: a quarter of the available RAM on cpu, 80%% of free GPU memory)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    b.add_argument("--out", default="bench_out", help="output folder (default ./bench_out)")
    b.add_argument("--tiny", action="store_true",
                   help="CI smoke sizes: exercises the machinery, the numbers mean nothing")
    b.add_argument("--list", action="store_true", help="list the workloads and implementations, and exit")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _verify(args, parser) -> int:
    """``modweights verify``: run, print the table and summary, 1 on any failure."""
    from . import backends, verify

    device = _device(parser, args.device)
    dtypes = _check_choices(parser, "--dtypes", args.dtypes or [], list(verify.DTYPES)) or None
    names = _check_choices(parser, "--backends", args.backends or [], list(backends.NAMES) + ["auto"]) or None
    report = verify.run(device=device, dtypes=dtypes, backend_names=names, seed=args.seed, size=args.size,
                        progress=not args.quiet and (sys.stderr.isatty() or _force_bar()))
    print(verify.format_report(report, quiet=args.quiet, verbose=args.verbose))
    return 0 if report.ok else 1


def _force_bar() -> bool:
    # the progress bar goes to stderr; without a terminal it would only litter logs,
    # unless asked for (MODWEIGHTS_PROGRESS=1)
    return os.environ.get("MODWEIGHTS_PROGRESS") == "1"


def _unwritable(folder: str) -> str:
    """Why files cannot be written into ``folder`` (created if missing), or ""."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return ""


def _bench(args, parser, argv) -> int:
    """``modweights bench``: sweep, print the table, write the files, 1 if anything raised."""
    from .benchmarking import impls as I
    from .benchmarking import report, runner, workloads
    from .verify import Progress

    device = _device(parser, args.device)
    if args.list:
        for w in workloads.WORKLOADS.values():
            print(f"{w.name:14s} [{w.group}] {w.title}  ({w.shape}; {w.dtype_for(device)} on {device.type})")
        print("\nimplementations: " + ", ".join(I.all_impls()))
        return 0
    try:
        wls = workloads.select(args.workloads, device)
    except ValueError as e:
        parser.error(f"--workloads: {e}")
    impls = _check_choices(parser, "--impls", args.impls or [], I.all_impls()) or None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: exists and is not a folder")
    unwritable = _unwritable(args.out)
    if unwritable:  # before the sweep, not after minutes of timing
        parser.error(f"--out {args.out}: cannot write there ({unwritable})")
    passes = tuple(_check_choices(parser, "--passes", args.passes or [], list(runner.PASSES))) or runner.PASSES
    cuda = device.type == "cuda"
    warmup = args.warmup or (QUICK_WARMUP if args.quick else DEFAULT_WARMUP["cuda" if cuda else "cpu"])
    reps = args.reps or (QUICK_REPS if args.quick else DEFAULT_REPS["cuda" if cuda else "cpu"])
    compile_on = {"on": True, "off": False, "auto": not args.quick}[args.compile]
    settings = runner.Settings(
        device=device, dtype=args.dtype, impls=impls, passes=passes, warmup=warmup, reps=reps,
        compile=compile_on, compile_timeout=args.compile_timeout or None,
        memory_limit=None if args.mem_limit is None else int(args.mem_limit * 2**30),
        seed=args.seed, tiny=args.tiny, tf32=args.tf32,
    )
    total = len(runner.plan(wls, settings)) * len(passes)
    show = not args.no_progress and (sys.stderr.isatty() or _force_bar())
    bar = Progress(total, show, "bench")
    try:
        sweep = runner.run(wls, settings, progress=bar)
    finally:
        bar.close()
    print(report.format_table(sweep))
    try:
        paths = report.write_all(sweep, args.out, command="modweights " + " ".join(argv))
    except OSError as e:
        print(f"\nmodweights bench: could not write the results to {args.out}: {e}", file=sys.stderr)
        return 1
    print("\nwrote " + ", ".join(paths))
    errors = [r for r in sweep.records if r["status"] == "error"]
    if errors:
        print(f"\n{len(errors)} measurements raised an error (see the table)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``modweights`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args, parser)
    return _bench(args, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
