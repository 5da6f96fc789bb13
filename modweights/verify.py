"""``modweights verify``: every public op, in every mode, on every available backend,
against the ``reference`` backend computed in float64.

For each case of :func:`modweights.testing.mod_linear_cases` / :func:`~modweights.testing.mod_conv2d_cases`
(modulation, mixture, both; demodulation on/off; per-sample and per-token; conv2d with
stride/padding/dilation/groups), each public op that can express it
(:func:`modweights.testing.public_ops`: the general ``mod_linear`` / ``mod_conv2d`` and the
named ``modulated_*`` / ``mixture_*`` wrapper), each backend and each dtype, the output and
every gradient are compared with the reference run on the *same* inputs upcast to float64
(``run_case(..., compute_dtype=torch.float64)``), with the tolerance of the dtype under test
(:data:`modweights.testing.TOLERANCE`). Inputs are fresh random draws: the seed is new on
every run unless ``--seed`` fixes it, and is printed so a failure can be reproduced.

Backends that are unavailable on the device are listed with the registry's reason; a backend
that is available but does not implement an op (its ``supports`` says no) is listed as "not
implemented" with its reason. Neither counts as a failure when verify checks every backend
(the default), but a backend asked for by name (``backend_names``, ``--backends``) that is
unavailable, or that checked nothing, fails the run with the reason: a verify that checked
nothing of what was asked must not say OK. A wrong number or an exception always fails.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field

import torch

from . import backends
from . import testing as T

SIZES = ("small", "medium")

#: dtypes checked by default, by device type (CPU has no fast half precision worth checking)
DEFAULT_DTYPES = {
    "cpu": ("float32", "float64"),
    "cuda": ("float32", "float16", "bfloat16"),
}

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

def cases(size: str = "small") -> list[T.Case]:
    """The verify cases: the shared test cases, scaled up (:func:`modweights.testing.scale_case`)
    for ``size == "medium"``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    small = size == "small"
    return T.mod_linear_cases(small=small) + T.mod_conv2d_cases(small=small)


@dataclass
class Row:
    """One (backend, op, case, dtype) check."""

    backend: str
    op: str
    case: T.Case
    dtype: str
    status: str  # "pass" | "FAIL" | "not implemented" | "error"
    fwd: float = math.nan  # worst relative error of the output
    bwd: float = math.nan  # worst relative error over every gradient
    bwd_name: str = ""  # which gradient is worst
    tolerance: float = math.nan
    detail: str = ""  # failure messages, the not-implemented reason, or the exception

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "error")


@dataclass
class Report:
    """Everything ``verify`` found; ``ok`` is False on any failure."""

    device: str
    seed: int
    size: str
    dtypes: list[str]
    rows: list[Row] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # backend -> reason
    seconds: float = 0.0
    requested: list[str] = field(default_factory=list)  # backends asked for by name ([]: all, none required)
    #: (case id, dtype, backend auto takes, why): see :func:`modweights.backends.auto_choice`
    auto: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    @property
    def unchecked(self) -> dict[str, str]:
        """Backends asked for by name that checked nothing, and why (unavailable, or no case
        it implements)."""
        out = {}
        for name in self.requested:
            if name in self.unavailable:
                out[name] = f"unavailable: {self.unavailable[name]}"
            elif not any(r.backend == name and r.status != "not implemented" for r in self.rows):
                if name == "reference" and set(self.dtypes) == {"float64"}:
                    out[name] = "the float64 reference is the oracle; ask for another dtype to check it"
                else:
                    out[name] = "implements none of the cases (all not implemented)"
        return out

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unchecked


def backend_statuses(device: torch.device, names=None) -> dict[str, backends.BackendStatus]:
    """The registry's availability of each backend, one at a time, so a backend whose module
    fails to import is reported as unavailable with the error instead of stopping verify."""
    out = {}
    for name in names or backends.NAMES:
        try:
            out[name] = backends.status(name, device)
        except Exception as e:  # noqa: BLE001 - a broken backend module is a finding, not a crash
            out[name] = backends.BackendStatus(False, f"failed to load: {type(e).__name__}: {e}")
    return out


def problem_kwargs(case: T.Case, dtype: torch.dtype) -> dict:
    """The keywords that :mod:`modweights.functional` passes to a backend's ``supports``."""
    if case.op == "mod_linear":
        return {"dtype": dtype, "per_token": case.coeffs == "token" or case.styles == "token",
                "rows": max(case.T, 1)}
    # the channel counts too, as mod_conv2d passes them: a backend may implement a grouped conv
    # only for some of them (triton: depthwise, groups == in_channels == out_channels)
    return {"dtype": dtype, "groups": case.conv.get("groups", 1), "kernel_size": tuple(case.kernel),
            "in_channels": case.I, "out_channels": case.O}


def _supported(name: str, case: T.Case, dtype: torch.dtype) -> tuple[bool, str]:
    mod = backends.load(name) if name != "auto" else None
    if mod is None:
        return True, ""
    ok, reason = mod.supports(case.op, **problem_kwargs(case, dtype))
    return bool(ok), reason


def check_one(case: T.Case, op: str, backend: str, dtype: torch.dtype, device, seed: int,
              expected: dict) -> Row:
    """Run ``case`` through public op ``op`` on ``backend`` and compare with ``expected``."""
    dname = str(dtype).replace("torch.", "")
    row = Row(backend, op, case, dname, "pass", tolerance=T.TOLERANCE[dtype])
    try:
        ok, reason = _supported(backend, case, dtype)
        if not ok:
            row.status, row.detail = "not implemented", reason
            return row
        got = T.run_case(case, backend, dtype, device, seed=seed, api=op)
    except RuntimeError as e:
        # resolve() refuses an op the backend does not implement with "cannot run this";
        # reached only if supports() is asked with keywords this module does not pass
        if "cannot run this" in str(e):
            row.status, row.detail = "not implemented", str(e)
            return row
        row.status, row.detail = "error", f"{type(e).__name__}: {e}"
        return row
    except Exception as e:  # noqa: BLE001 - any exception from a backend is a failure to report
        row.status, row.detail = "error", f"{type(e).__name__}: {e}"
        return row
    comps = T.compare_results(got, expected, dtype)
    fwd = [c for c in comps if c.name == "y"]
    bwd = [c for c in comps if c.name != "y"]
    row.fwd = fwd[0].worst if fwd else math.nan
    if bwd:
        worst = max(bwd, key=lambda c: c.worst)
        row.bwd, row.bwd_name = worst.worst, worst.name
    bad = [str(c) for c in comps if not c.ok]
    if bad:
        row.status, row.detail = "FAIL", "; ".join(bad)
    return row


class Progress:
    """tqdm when installed, else a one-line counter on stderr; nothing when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.total, self.n, self.enabled, self.desc = total, 0, enabled, desc
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, label: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label[:40], refresh=False)
            self.bar.update(1)
        elif self.enabled:
            width = 30
            done = int(width * self.n / max(self.total, 1))
            sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def run(device=None, dtypes=None, backend_names=None, seed: int | None = None, size: str = "small",
        progress: bool = True) -> Report:
    """Run the whole verification and return a :class:`Report` (nothing is printed).

    Args:
        device: ``"cpu"``, ``"cuda"``, ... (default: cuda if available, else cpu).
        dtypes: dtype names (default: :data:`DEFAULT_DTYPES` for the device type).
        backend_names: backends to check (default: every registry name, ``reference`` included:
            the reference in each dtype but float64 is itself checked against the float64 one;
            the float64 reference is the oracle and is not compared with itself). Named here, a
            backend must be available and check something, or the report is not ``ok``.
        seed: base seed of the random inputs (default: a fresh random one).
        size: ``"small"`` or ``"medium"`` (cases scaled up).
        progress: show a progress bar on stderr.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtypes = list(dtypes or DEFAULT_DTYPES.get(device.type, DEFAULT_DTYPES["cuda"]))
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31 - 1)
    names = list(backend_names or backends.NAMES)
    statuses = backend_statuses(device, [n for n in names if n != "auto"])
    report = Report(str(device), seed, size, dtypes, requested=[n for n in backend_names or [] if n != "auto"])
    report.unavailable = {n: st.reason for n, st in statuses.items() if not st.available}
    usable = [n for n in names if n == "auto" or statuses[n].available]

    work = [(ci, case, T.public_ops(case)) for ci, case in enumerate(cases(size))]
    total = sum(len(ops) for _, _, ops in work) * sum(
        len([n for n in usable if not (n == "reference" and d == "float64")]) for d in dtypes)
    bar = Progress(total, progress, "verify")
    start = time.perf_counter()
    # TF32 would make float32 convolutions (cuDNN default) miss the float32 tolerance: it is a
    # different precision, not the one under test
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for ci, case, ops in work:
                report.auto.append((case.id, dname, *auto_choice(case, dtype, device)))
                # a distinct seed per case (+1 is the upstream gradient's seed in run_case)
                case_seed = seed + 10 * ci
                # the general op on the reference, in float64 on the same inputs: the oracle
                # for every public op that expresses this case
                expected = T.run_case(case, "reference", dtype, device, seed=case_seed,
                                      compute_dtype=torch.float64)
                for op in ops:
                    for name in usable:
                        if name == "reference" and dtype == torch.float64:
                            continue  # the oracle itself: comparing it with itself shows nothing
                        report.rows.append(check_one(case, op, name, dtype, device, case_seed, expected))
                        bar.update(f"{name} {op} {dname}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32
        bar.close()
    report.seconds = time.perf_counter() - start
    return report


def auto_choice(case: T.Case, dtype: torch.dtype, device) -> tuple[str, str]:
    """(backend, why) that ``auto`` takes for ``case`` on ``device`` (a malformed auto table: "error")."""
    try:
        return backends.auto_choice(case.op, device, problem_kwargs(case, dtype))
    except Exception as e:  # noqa: BLE001 - reported, and the auto rows then fail with the same error
        return "error", f"{type(e).__name__}: {e}"


def format_auto(report: Report, per_case: bool = False) -> list[str]:
    """``auto``'s pick and why: one line per case and dtype (``per_case``), else one line per
    distinct (backend, reason) with how many cases it covers."""
    if per_case:
        return [f"  auto picks {name} for {cid} {dname}: {why}" for cid, dname, name, why in report.auto]
    groups: dict[tuple[str, str], list[str]] = {}
    for cid, dname, name, why in report.auto:
        groups.setdefault((name, why), []).append(f"{cid} {dname}")
    return [f"  auto picks {name} for {len(ids)} case(s): {why}" for (name, why), ids in groups.items()]


def _fmt_err(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2e}"


def _shape(case: T.Case) -> str:
    return case.id.split("-")[-1]


def summary_table(report: Report) -> list[str]:
    """One row per (backend, op), one column per dtype: how many cases passed, failed (FAIL or
    error) and were skipped (not implemented: the reasons are listed below the table), and the
    worst error of the row as a fraction of its tolerance (1.0 is the limit)."""
    groups: dict[tuple[str, str], dict[str, list[Row]]] = {}
    for r in report.rows:
        groups.setdefault((r.backend, r.op), {}).setdefault(r.dtype, []).append(r)
    head = ("backend", "op", *report.dtypes, "worst err/tol")
    table = [head]
    order = {name: i for i, name in enumerate(dict.fromkeys(r.backend for r in report.rows))}
    for (backend, op), by_dtype in sorted(groups.items(), key=lambda kv: order[kv[0][0]]):  # stable: ops stay in order
        cells, ratios = [], []
        for d in report.dtypes:
            rows = by_dtype.get(d, [])
            if not rows:
                cells.append("oracle" if backend == "reference" and d == "float64" else "-")
                continue
            n = {k: sum(1 for r in rows if cond(r)) for k, cond in (
                ("pass", lambda r: r.status == "pass"), ("FAIL", lambda r: r.failed),
                ("skipped", lambda r: r.status == "not implemented"))}
            cells.append(", ".join(f"{v} {k}" for k, v in n.items() if v) or "-")
            ratios += [max(v for v in (r.fwd, r.bwd) if not math.isnan(v)) / r.tolerance for r in rows
                       if r.status in ("pass", "FAIL") and not (math.isnan(r.fwd) and math.isnan(r.bwd))]
        table.append((backend, op, *cells, f"{max(ratios):.2f}" if ratios else "-"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    out = []
    for i, row in enumerate(table):
        out.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_report(report: Report, quiet: bool = False, verbose: bool = False) -> str:
    """The report as text: the summary table (:func:`summary_table`; not when ``quiet``), the
    per-case rows of the failures (of every check with ``verbose``), the skip reasons, what
    ``auto`` picks (one line per distinct choice; per case with ``verbose``), and the verdict."""
    lines = [f"modweights verify: device {report.device}, dtypes {', '.join(report.dtypes)}, "
             f"size {report.size}, seed {report.seed}"]
    for name, reason in report.unavailable.items():
        lines.append(f"  backend {name}: unavailable: {reason}")
    if report.rows and not quiet:
        lines.append("")
        lines += summary_table(report)
    shown = report.rows if verbose else report.failures
    # rows that are not implemented are summarised once per (backend, op) below, not repeated
    shown = [r for r in shown if r.status != "not implemented"]
    if shown:
        lines += ["", "per case:" if verbose else "failing cases:"]
        head = ("backend", "op", "mode", "shape", "dtype", "fwd err", "bwd err", "tol", "result")
        table = [head]
        for r in shown:
            bwd = _fmt_err(r.bwd) + (f" ({r.bwd_name})" if r.bwd_name else "")
            table.append((r.backend, r.op, r.case.mode, _shape(r.case), r.dtype, _fmt_err(r.fwd), bwd,
                          f"{r.tolerance:.0e}", r.status))
        widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
        for i, row in enumerate(table):
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    # not implemented: one line per (backend, reason), naming the ops and, unless all, the dtypes
    nimpl: dict[tuple, tuple[list, list]] = {}
    for r in report.rows:
        if r.status == "not implemented":
            ops, dts = nimpl.setdefault((r.backend, r.detail), ([], []))
            if r.op not in ops:
                ops.append(r.op)
            if r.dtype not in dts:
                dts.append(r.dtype)
    if nimpl:
        lines.append("")
        for (b, reason), (ops, dts) in nimpl.items():
            where = "" if len(dts) == len(report.dtypes) else f" in {', '.join(dts)}"
            lines.append(f"  backend {b}: not implemented for {', '.join(ops)}{where}: {reason}")
    if report.auto:
        lines.append("")
        lines += format_auto(report, per_case=verbose)
    fails, unchecked = report.failures, report.unchecked
    if fails or unchecked:
        lines.append("")
        lines.append("failures:")
        for name, why in unchecked.items():
            lines.append(f"  [{name}] asked for, nothing checked: {why}")
        for r in fails:
            lines.append(f"  [{r.backend}] {r.op} {r.case.id} {r.dtype}: {r.detail}")
    lines.append("")
    lines.append(summary_line(report))
    return "\n".join(lines)


def summary_line(report: Report) -> str:
    """One line: counts by outcome, per backend, and the seed to reproduce the run."""
    per: dict[str, dict[str, int]] = {}
    for r in report.rows:
        per.setdefault(r.backend, {}).setdefault(r.status, 0)
        per[r.backend][r.status] += 1
    parts = []
    for b, counts in per.items():
        parts.append(f"{b}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for b in report.unavailable:
        parts.append(f"{b}: unavailable")
    if report.ok:
        verdict = "OK"
    else:
        why = [f"{len(report.failures)} failing checks"] if report.failures else []
        why += [f"{n} asked for and not checked" for n in report.unchecked]
        verdict = f"FAILED ({'; '.join(why)})"
    return (f"verify {verdict} in {report.seconds:.1f} s - {'; '.join(parts)} "
            f"(seed {report.seed}; rerun with --seed {report.seed})")
