"""The kernel specialisations the triton backend launches for a problem, found without a GPU.

:func:`launches` runs the launchers of :mod:`modweights.triton_kernels` (forward, then
backward with every gradient a training step asks for) on ``device="meta"`` tensors while
:mod:`modweights.triton_kernels._record` records: the launchers' own code picks the layout,
the flags, the strides, the sample splits and the configs autotuning would time, and nothing
runs. :func:`compile_specs` turns each launch and config into what
:mod:`.compile_worker` compiles: the signature, the constexprs and the divisibility hints
Triton derives at a launch (mirrored by :func:`specialise`, checked against Triton's own
binder in ``tests/test_aot.py``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..testing import Case

_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64"}


@dataclass(frozen=True)
class Problem:
    """One thing the report compiles for: a case in a dtype, under a name (a workload or a test)."""

    name: str
    case: Case
    dtype: torch.dtype
    deterministic: bool = False


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _inputs(case: Case, dtype):
    """Canonical meta tensors (as ``modweights._checks`` hands them to the backends)."""
    B, I, O, K = case.B, case.I, case.O, case.K
    case = case.spec.canonical_case(case)
    x, bank, rows = case.spec.make_x_bank(case, lambda *shape, scale=1.0: _meta(*shape, dtype=dtype))
    coeffs = styles = bias = None
    if case.coeffs != "none":
        coeffs = _meta(*((B, K) if case.coeffs == "sample" else (*rows, K)), dtype=dtype)
    if case.styles != "none":
        styles = _meta(*((B, I) if case.styles == "sample" else (*rows, I)), dtype=dtype)
    if case.bias == "shared":
        bias = _meta(O, dtype=dtype)
    elif case.bias == "bank":
        bias = _meta(K, O, dtype=dtype)
    return x, bank, coeffs, styles, bias


def ML_INTERPRETED() -> bool:
    """Whether the Triton kernels were built for the interpreter (then nothing can be recorded)."""
    from ..triton_kernels import _launch
    return _launch.INTERPRETED


def launches(problem: Problem) -> list[tuple[str, object]]:
    """``[(pass, Launch)]`` for one forward and one backward (every input's gradient) of ``problem``,
    through the Triton launcher of the op its case runs as (``OpSpec.triton_launcher``: ``forward``
    and ``backward`` taking the op's non-tensor arguments, ``OpSpec.launcher_args``)."""
    from ..triton_kernels import _record

    if ML_INTERPRETED():
        raise RuntimeError("the AOT report records the GPU launches, but the Triton kernels were built for the "
                           "interpreter (TRITON_INTERPRET=1): run it without TRITON_INTERPRET")
    case = problem.case.spec.canonical_case(problem.case)
    spec = case.spec
    launcher = spec.triton_module()
    x, bank, coeffs, styles, bias = _inputs(case, problem.dtype)
    needs = (True, True, coeffs is not None, styles is not None, bias is not None)
    args = (case.demodulate, 1e-8, *spec.launcher_args(case))
    out = []
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(problem.deterministic)
    try:
        with _record.recording() as rec:
            y, d = launcher.forward(x, bank, coeffs, styles, bias, *args)
            n_fwd = len(rec)
            launcher.backward(torch.empty_like(y), x, bank, coeffs, styles, bias, d, y, *args, needs)
            out = [("fwd" if i < n_fwd else "bwd", launch) for i, launch in enumerate(rec)]
    finally:
        torch.use_deterministic_algorithms(old_det)
    return out


def specialise(args, names) -> tuple[dict, dict, list]:
    """(signature, constexprs, divisible) of the runtime arguments ``args`` named ``names``, as
    Triton specialises them at a launch: tensors become ``*<dtype>`` pointers, divisible by 16
    when their start is 16-byte aligned (fresh allocations are; a view's offset decides);
    integers equal to 1 become the constexpr 1, others ``i32``/``i64``, divisible when a
    multiple of 16; bools ``u1``; floats ``fp32`` (never specialised)."""
    sig, const, div = {}, {}, []
    for name, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _DTYPE[a.dtype]
            if (a.storage_offset() * a.element_size()) % 16 == 0:
                div.append(name)
        elif isinstance(a, bool):
            sig[name] = "u1"
        elif isinstance(a, int):
            if a == 1:
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else ("i64" if a < 2 ** 63 else "u64")
            if a % 16 == 0:
                div.append(name)
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"cannot specialise argument {name} = {a!r}")
    return sig, const, div


def config_label(cfg: tuple) -> str:
    meta, warps, stages = cfg
    tiles = "x".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in meta.items())
    return f"{tiles} w{warps} s{stages}"


def compile_specs(problem: Problem, which: str = "default", archs=(90,)) -> list[dict]:
    """The worker specs of every launch of ``problem``: its default config (``which='default'``)
    or every config autotuning keeps (``'all'``; the default is marked among them)."""
    specs = []
    for pass_, launch in launches(problem):
        kernel = launch.kernel
        names = list(kernel.arg_names)
        sig, const, div = specialise(launch.args, names[:len(launch.args)])
        cfgs = [launch.default] if which == "default" else list(launch.configs)
        if which != "default" and launch.default not in cfgs:
            cfgs.append(launch.default)  # autotuning off runs it even where pruning drops it
        for cfg in cfgs:
            meta, warps, stages = cfg
            constexprs = dict(const, **launch.flags, **meta)
            signature = dict(sig, **{k: "constexpr" for k in list(launch.flags) + list(meta)})
            for arch in archs:
                specs.append({
                    "problem": problem.name, "shape": problem.case.id, "dtype": _DTYPE[problem.dtype],
                    "deterministic": problem.deterministic, "pass": pass_, "kernel": launch.name,
                    "config": config_label(cfg), "default": cfg == launch.default,
                    "in_autotune": cfg in launch.configs, "grid": list(launch.grid) if cfg == launch.default else None,
                    "file": inspect.getsourcefile(kernel.fn), "arch": arch,
                    "signature": {n: signature[n] for n in names}, "constexprs": constexprs, "divisible": div,
                    "num_warps": warps, "num_stages": stages,
                })
    return specs


def spec_key(spec: dict) -> str:
    """Identity of what is compiled (two problems launching the same specialisation share it)."""
    import json
    return json.dumps([spec[k] for k in ("file", "kernel", "arch", "signature", "constexprs", "divisible",
                                         "num_warps", "num_stages")], sort_keys=True, default=str)
