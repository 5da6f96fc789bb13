"""Compile recorded kernel specialisations for a GPU target and read off what the compiler did.

Needs Triton and nothing else (no torch, no GPU, no modweights import): it is run as a script,
``python compile_worker.py specs.json results.json``, by whichever Python holds the Triton to
test (``python -m modweights.aot --python /venv-t36/bin/python`` compiles with another Triton).

A spec (JSON, built by :mod:`modweights.aot.specs`)::

    {"id": str, "file": kernel module path, "kernel": name, "arch": 90 | 80,
     "signature": {arg: "*bf16" | "i32" | "i64" | "fp32" | "u1" | "constexpr"},
     "constexprs": {arg: value}, "divisible": [arg, ...], "num_warps": int, "num_stages": int}

A result: the spec's id and ``shared`` (bytes), ``registers``, ``spill_stores`` /
``spill_loads`` (bytes, ``ptxas -v`` on the PTX with the flags Triton uses), ``stack``,
``wgmma`` / ``mma_sync`` / ``fma`` (instruction counts in the PTX), ``dot_loops`` /
``pipelined_loops`` (``scf.for`` loops of the final TTGIR holding a dot directly, and those of
them that also hold asynchronous copies: the software pipeliner staged their loads), or
``error``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

_PKG = "_modweights_aot_kernels"


def _load_kernel(path: str, name: str):
    """The @triton.jit function ``name`` of the kernel module at ``path``, imported inside a
    synthetic package so that its relative imports (``from .mod_linear_common import ...``) work."""
    folder = os.path.dirname(os.path.abspath(path))
    if _PKG not in sys.modules:
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [folder]
        sys.modules[_PKG] = pkg
    mod = importlib.import_module(f"{_PKG}.{os.path.splitext(os.path.basename(path))[0]}")
    return getattr(mod, name)


def _triton_bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spills from ``ptxas -v`` with the flags Triton's own ptxas run uses."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_triton_bin("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True).stderr
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    if not m:
        out["ptxas_log"] = log[-2000:]
    return out


_FOR = re.compile(r"\bscf\.for\b")
_DOT = re.compile(r"\b(tt\.dot|tt\.dot_scaled|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\b")
_ASYNC = re.compile(r"\b(ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local|"
                    r"ttng\.async_tma_gather|tt\.descriptor_load)\b")


def loop_facts(ttgir: str) -> tuple[int, int]:
    """(loops holding a dot, those of them that also hold async copies) in a TTGIR listing.

    Ops count for the innermost ``scf.for`` around them (through ``scf.if`` regions, not
    through an inner loop): a dot in a loop whose operand loads are plain register loads is
    a loop the pipeliner did not stage, whatever ``num_stages`` says."""
    stack: list = []  # per open region: the loop record it belongs to (None outside loops)
    loops = []
    for line in ttgir.splitlines():
        code = re.sub(r'"[^"]*"', '""', line.split(" loc(")[0])
        owner = stack[-1] if stack else None
        if owner is not None:
            if _DOT.search(code):
                owner["dot"] = True
            if _ASYNC.search(code):
                owner["async"] = True
        is_for = bool(_FOR.search(code)) and code.rstrip().endswith("{")
        # walk the braces in order: inline attribute dicts open and close on the same line
        last_open = code.rfind("{")
        for i, ch in enumerate(code):
            if ch == "{":
                if is_for and i == last_open:
                    rec = {"dot": False, "async": False}
                    loops.append(rec)
                    stack.append(rec)
                else:
                    stack.append(stack[-1] if stack else None)
            elif ch == "}" and stack:
                stack.pop()
    dot_loops = [r for r in loops if r["dot"]]
    return len(dot_loops), sum(1 for r in dot_loops if r["async"])


def compile_one(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    out = {"id": spec["id"]}
    try:
        fn = _load_kernel(spec["file"], spec["kernel"])
        names = list(fn.arg_names)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec["divisible"]}
        src = ASTSource(fn, dict(spec["signature"]), dict(spec["constexprs"]), attrs)
        k = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32),
                           options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        ptx = k.asm["ptx"]
        arch = "sm_90a" if spec["arch"] == 90 else f"sm_{spec['arch']}"
        out.update(_ptxas_usage(ptx, arch))
        out["shared"] = int(k.metadata.shared)
        out["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
        out["mma_sync"] = len(re.findall(r"\bmma\.sync", ptx))
        out["fma"] = len(re.findall(r"\bfma\.rn\.", ptx))
        out["dot_loops"], out["pipelined_loops"] = loop_facts(k.asm["ttgir"])
    except Exception as e:  # noqa: BLE001 - a compile failure is a result, not a crash of the report
        out["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    out["seconds"] = round(time.time() - t0, 2)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: compile_worker.py specs.json results.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        specs = json.load(f)
    import triton
    results = [compile_one(s) for s in specs]
    with open(argv[1], "w") as f:
        json.dump({"triton": triton.__version__, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
