"""Timing, memory and the sweep behind ``modweights bench``.

Timing: ``warmup`` untimed calls, then ``reps`` timed rounds (interleaved across the
implementations and passes of a workload, see :func:`run`), each call bracketed by a device
synchronisation (CUDA events on a GPU, :func:`time.perf_counter` on a CPU); the median and
the 20th/80th percentiles are kept. On a GPU the L2 cache is flushed (a 256 MiB buffer is
zeroed) before every timed call, outside the timed region, so no call reads a warm cache
left by the previous one.

The passes: ``fwd`` is an inference call (no graph). ``bwd`` and ``fwd+bwd`` come from the same
timed training steps (:meth:`Timer.time_step`): each step is timed in two halves, the forward
that builds the graph and the backward through it, with a timestamp between them (a CUDA
event on a GPU: no extra synchronisation). ``bwd`` is the second half and ``fwd+bwd`` the sum,
so in every step the backward is shorter than the step, and so is every quantile of ``bwd``
than the same quantile of ``fwd+bwd`` (an order statistic of values each below its partner is
below the partner's). Timing the two passes in separate runs let a change of the machine's
load between them make the backward look longer than the whole step.

Precision: float32 dots run alike on every implementation of a sweep. :func:`fp32_precision`
sets both PyTorch TF32 switches to ``Settings.tf32`` (default off: exact float32) for the whole
sweep, so the dense baseline (``F.conv2d`` on cuDNN, ``F.linear`` on cuBLAS) and what is timed
against it (the triton conv kernels follow ``torch.backends.cudnn.allow_tf32``, the triton linear
kernels ``torch.backends.cuda.matmul.allow_tf32``, the peers either) compute at one precision
and ``ratio_to_dense`` compares like with like; every float32 record says which
(``fp32_precision``: ``"tf32"`` or ``"ieee"``; None for other dtypes).

Peak memory (``peak_memory_bytes``) is what one call allocates at its peak *beyond the
tensors that already exist* (inputs, weights), measured on the first warm-up call:

- GPU: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call;
- CPU: the running sum of the allocation and free events that
  ``torch.profiler.profile(profile_memory=True)`` records during the call, at its maximum
  (``memory_method`` says which; it is None where neither works).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from .. import testing as T
from . import impls as I
from .workloads import Workload, forward_bytes

#: the passes timed: the forward alone (no graph), the backward alone and the training step
#: (the two halves of the same timed steps, see the module docstring)
PASSES = ("fwd", "bwd", "fwd+bwd")

#: dense-FLOP multiple of each pass (a backward is two GEMMs of the forward's size)
PASS_FLOPS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass
class Settings:
    """What a sweep measures and how.

    ``dtype`` None: each workload's default for the device. ``impls`` None: all that apply.
    """

    device: torch.device
    dtype: str | None = None
    impls: list[str] | None = None
    passes: tuple[str, ...] = PASSES
    warmup: int = 2
    reps: int = 10
    compile: bool = True
    compile_timeout: float | None = 240.0
    memory_limit: int | None = None
    seed: int = 0
    tiny: bool = False  # CI smoke sizes (see Workload.tiny)
    tf32: bool = False  # float32 dots in TF32 on every implementation, the dense baseline included

    def __post_init__(self):
        if not isinstance(self.tf32, bool):
            raise TypeError(f"Settings.tf32 must be a bool; got {type(self.tf32).__name__}")


# ----------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def fp32_precision(tf32: bool):
    """Both PyTorch TF32 switches (cuDNN's convolutions, cuBLAS's matmuls) set to ``tf32`` for the
    duration, restored after; yields the precision's name, ``"tf32"`` or ``"ieee"``."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    try:
        yield "tf32" if tf32 else "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def _silence_stderr_fd():
    """Silence fd 2 for the duration: the profiler's C++ side logs a few lines per session
    (and, without a GPU, an 'ERROR ... gpuGetDeviceCount' line) that would break the progress bar."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn) -> int | None:
    """Peak bytes allocated during ``fn()`` beyond what existed before, from the profiler's
    memory events (None if this torch's profiler does not expose them)."""
    from torch.profiler import ProfilerActivity, profile

    with _silence_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except Exception:  # noqa: BLE001 - a private-ish profiler structure; report None, never guess
        return None
    cur = peak = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
    return peak


class Timer:
    """Times a zero-argument callable on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_bytes(self, fn) -> tuple[int | None, str | None]:
        """Run ``fn`` once and return (peak extra bytes, method)."""
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            self.sync()
            return torch.cuda.max_memory_allocated(self.device) - before, "torch.cuda.max_memory_allocated"
        peak = _cpu_peak_bytes(fn)
        return peak, ("torch.profiler memory events" if peak is not None else None)

    def time_step(self, forward, backward) -> tuple[float, float]:
        """Milliseconds of ``y = forward()`` and of ``backward(y)`` in one step, with one
        timestamp between them (on a GPU a CUDA event, after an untimed L2 flush)."""
        if self.cuda:
            self._flush.zero_()
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            y = forward()
            e[1].record()
            backward(y)
            e[2].record()
            e[2].synchronize()
            return e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])
        t0 = time.perf_counter()
        y = forward()
        t1 = time.perf_counter()
        backward(y)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def time_once(self, fn) -> float:
        """Milliseconds of one call of ``fn``, bracketed by device synchronisation (on a GPU,
        CUDA events, after an L2 flush that is not timed)."""
        if self.cuda:
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- environment


def _git_commit() -> str | None:
    """HEAD of the repository this package is imported from (suffix '+dirty' if modified); where
    there is no git repository (a copied tree, as on the GPU machine), ``MODWEIGHTS_GIT_COMMIT``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        given = os.environ.get("MODWEIGHTS_GIT_COMMIT", "").strip()
        return f"{given} (MODWEIGHTS_GIT_COMMIT)" if given else None


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - absent or broken: recorded as None
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions, device, commit and date recorded with every result."""
    import modweights

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {
        "device": str(device),
        "device_name": name,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "timm_version": _version("timm"),
        "modweights_version": modweights.__version__,
        "python_version": platform.python_version(),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------- sweep


@dataclass
class Sweep:
    """Result of :func:`run`: flat records plus the environment they were measured in."""

    env: dict
    records: list[dict] = field(default_factory=list)


def _record(env, wl: Workload, impl: str, pass_: str, dtype: str, **kw) -> dict:
    flops = wl.flops * PASS_FLOPS[pass_]
    rec = {
        "workload": wl.name, "impl": impl, "pass": pass_, "dtype": dtype, "device": env["device"],
        "device_name": env["device_name"], "op": wl.case.op, "shape": wl.shape, "title": wl.title,
        "status": "ok", "reason": "", "flops": flops, "median_ms": None, "p20_ms": None, "p80_ms": None,
        "min_ms": None, "reps": 0, "warmup": 0, "tflops": None, "gbps": None, "ratio_to_dense": None,
        "peak_memory_bytes": None, "memory_method": None, "auto_backend": None, "auto_reason": None,
        "fp32_precision": env.get("fp32_precision") if dtype == "float32" else None,
    }
    rec.update(kw)
    if rec["median_ms"]:
        rec["tflops"] = flops / (rec["median_ms"] * 1e-3) / 1e12
        if pass_ == "fwd":
            # the bandwidth view (decode): least bytes of a forward over the time; the dense
            # op reads one weight and no conditioning, so its own least traffic is counted
            case = wl.case if impl != "dense" else dataclasses.replace(wl.case, K=1, coeffs="none", styles="none")
            nbytes = forward_bytes(case, DTYPES[dtype].itemsize)
            rec["gbps"] = nbytes / (rec["median_ms"] * 1e-3) / 1e9
    for k in ("num_threads", "torch_version", "triton_version", "timm_version", "modweights_version",
              "python_version", "git_commit", "date"):
        rec[k] = env[k]
    return rec


def _fill_ratios(records: list[dict]) -> None:
    dense = {(r["workload"], r["pass"], r["dtype"]): r["median_ms"] for r in records
             if r["impl"] == "dense" and r["median_ms"]}
    for r in records:
        d = dense.get((r["workload"], r["pass"], r["dtype"]))
        if d and r["median_ms"]:
            r["ratio_to_dense"] = r["median_ms"] / d


def plan(workloads: list[Workload], settings: Settings) -> list[tuple[Workload, str]]:
    """(workload, impl) pairs in sweep order: every impl asked for, and always ``dense``
    first (every record's ``ratio_to_dense`` needs it)."""
    names = settings.impls or I.all_impls()
    ordered = ["dense"] + [n for n in names if n != "dense"]
    return [(w, n) for w in workloads for n in ordered]


def run(workloads: list[Workload], settings: Settings, progress=None) -> Sweep:
    """Measure every (workload, impl, pass); skipped and failed ones are recorded with the reason.

    Within a workload and pass the timed calls are interleaved: each round runs every
    implementation once (the starting one rotating), so a change in the machine's load (other
    processes on a shared CPU, GPU clocks) falls on all implementations alike instead of on
    whichever was being timed at that moment. Records keep the definition order.

    ``progress``: an object with ``update(label)`` called once per (workload, impl, pass). The
    whole sweep runs under :func:`fp32_precision` (``settings.tf32``).
    """
    device = settings.device
    env = environment(device)
    if settings.tiny:
        env["tiny"] = True  # CI smoke sizes: nothing measured here is a number to quote
    with fp32_precision(settings.tf32) as precision:
        env["fp32_precision"] = precision
        return _sweep(workloads, settings, env, progress)


def _sweep(workloads: list[Workload], settings: Settings, env: dict, progress) -> Sweep:
    device = settings.device
    sweep = Sweep(env)
    timer = Timer(device)
    explicit = set(settings.impls or ())
    mem_limit = settings.memory_limit if settings.memory_limit is not None else I.default_memory_limit(device)
    by_wl: dict[str, list[str]] = {}
    for w, n in plan(workloads, settings):
        by_wl.setdefault(w.name, []).append(n)
    for wl in workloads:
        names = by_wl[wl.name]
        if settings.tiny:
            wl = wl.tiny()
        dname = settings.dtype or wl.dtype_for(device)
        dtype = DTYPES[dname]
        auto = auto_choice(wl, device, dtype)
        results: dict[tuple[str, str], dict] = {}  # (impl, pass) -> record
        inputs = None
        prepared: dict[str, I.Prepared] = {}
        for impl in names:
            base = dict(env=env, wl=wl, impl=impl, dtype=dname)
            try:
                I.applies(impl, wl, device, dtype, compile_enabled=settings.compile,
                          explicit=impl in explicit, memory_limit=mem_limit)
                if inputs is None:
                    inputs = T.make_inputs(wl.case, dtype, device, settings.seed)
                prepared[impl] = I.prepare(impl, wl, inputs, compile_timeout=settings.compile_timeout)
            except I.Skip as e:
                for p in settings.passes:
                    results[impl, p] = _record(pass_=p, status="skipped", reason=str(e), **base)
                    _tick(progress, wl, impl, p)
            except Exception as e:  # noqa: BLE001 - a failing setup is a result, not the end of the sweep
                for p in settings.passes:
                    results[impl, p] = _record(pass_=p, **_failure(e), **base)
                    _tick(progress, wl, impl, p)
        _time_workload(prepared, settings, timer, results,
                       lambda impl, p, **kw: _record(pass_=p, env=env, wl=wl, impl=impl, dtype=dname, **kw),
                       lambda impl, p: _tick(progress, wl, impl, p))
        for impl in names:
            for p in settings.passes:
                results[impl, p]["auto_backend"], results[impl, p]["auto_reason"] = auto
        sweep.records += [results[impl, p] for impl in names for p in settings.passes]
        del prepared, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _fill_ratios(sweep.records)
    return sweep


def _time_workload(prepared: dict, settings: Settings, timer: Timer, results: dict, record, tick) -> None:
    """Warm up, measure the peak memory of, and time every prepared implementation of one
    workload in every pass of ``settings.passes``, into ``results[(impl, pass)]``.

    Each timed round runs every implementation once (the starting one rotating), and for each
    the inference call (``fwd``) and one training step (timed in halves: ``bwd`` and
    ``fwd+bwd``, see the module docstring). ``record(impl, pass, **fields)`` makes a record,
    ``tick(impl, pass)`` reports progress."""
    passes = settings.passes
    want_step = "bwd" in passes or "fwd+bwd" in passes
    fwd_fns, steps, peaks = {}, {}, {}
    for impl, prep in prepared.items():
        try:
            if "fwd" in passes:
                fwd_fns[impl] = prep.pass_fn("fwd")
                peaks[impl, "fwd"] = timer.peak_bytes(fwd_fns[impl])  # doubles as the first warm-up call
            if "bwd" in passes:  # the backward's own peak, beyond the graph it runs through
                peaks[impl, "bwd"] = timer.peak_bytes(prep.pass_fn("bwd"))
            if want_step:
                steps[impl] = prep.training_step()
                f, b = steps[impl]
                peaks[impl, "fwd+bwd"] = timer.peak_bytes(lambda: b(f()))
            for _ in range(settings.warmup - 1):
                if impl in fwd_fns:
                    fwd_fns[impl]()
                if impl in steps:
                    steps[impl][1](steps[impl][0]())
        except Exception as e:  # noqa: BLE001 - OOM or a crash in one impl: record, go on
            fwd_fns.pop(impl, None)
            steps.pop(impl, None)
            for p in passes:
                results[impl, p] = record(impl, p, **_failure(e))
    order = [impl for impl in prepared if (impl, passes[0]) not in results]
    times: dict[tuple[str, str], list[float]] = {(impl, p): [] for impl in order for p in passes}
    for r in range(settings.reps):
        k = r % max(len(order), 1)
        for impl in order[k:] + order[:k]:
            if (impl, passes[0]) in results:  # failed in an earlier round
                continue
            try:
                if impl in fwd_fns:
                    times[impl, "fwd"].append(timer.time_once(fwd_fns[impl]))
                if impl in steps:
                    t_fwd, t_bwd = timer.time_step(*steps[impl])
                    if "bwd" in passes:
                        times[impl, "bwd"].append(t_bwd)
                    if "fwd+bwd" in passes:
                        times[impl, "fwd+bwd"].append(t_fwd + t_bwd)
            except Exception as e:  # noqa: BLE001
                for p in passes:
                    results[impl, p] = record(impl, p, **_failure(e))
    for impl in prepared:
        for p in passes:
            if (impl, p) not in results:
                t = times[impl, p]
                peak, method = peaks[impl, p]
                results[impl, p] = record(
                    impl, p, median_ms=statistics.median(t), p20_ms=_quantile(t, 0.2), p80_ms=_quantile(t, 0.8),
                    min_ms=min(t), reps=len(t), warmup=settings.warmup, peak_memory_bytes=peak,
                    memory_method=method)
            tick(impl, p)


def auto_choice(wl: Workload, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """Which backend ``auto`` takes for the workload here, and why (:func:`modweights.backends.auto_choice`)."""
    from .. import backends
    from ..verify import problem_kwargs

    try:
        return backends.auto_choice(wl.case.op, device, problem_kwargs(wl.case, dtype))
    except Exception as e:  # noqa: BLE001 - a malformed auto table is reported with the records
        return "error", f"{type(e).__name__}: {e}"


def _failure(e: BaseException) -> dict:
    if I.is_oom(e):
        return {"status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0][:160]}"}
    return {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _tick(progress, wl, impl, p):
    if progress is not None:
        progress.update(f"{wl.name} {impl} {p}")
