"""Build the CUDA library of modweights with nvcc alone (standard library only).

``csrc/*.cu -> libmodweights_cuda.so``: plain C entry points loaded through ctypes, with
the CUDA runtime linked statically. No torch, pybind11 or Python headers are compiled in,
so a build takes seconds, needs only nvcc, and the library works with any Python and any
torch version. Used by ``setup.py`` (the installed extension) and by
``csrc/check_build.sh`` (CI: every .cu must compile for every target).

Environment:
    MODWEIGHTS_CUDA_ARCH  targets, e.g. ``80;90a`` (the default), ``sm_80,sm_90a``,
                          ``8.6 9.0a``, ``90a+PTX``, or raw ``-gencode=...`` flags
    MODWEIGHTS_NVCC       the nvcc to use (else $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc,
                          nvcc on PATH, /usr/local/cuda/bin/nvcc)
    MAX_JOBS              parallel compiles (default: CPU count)

Command line (exit status 1 on any compile or link error)::

    python csrc/build.py --out DIR [--arch SPEC] [--jobs N] [--verbose]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent
LIB_NAME = "libmodweights_cuda.so"
DEFAULT_ARCH = "80;90a"
MIN_ARCH = 80  # WMMA on bf16 needs sm_80


class BuildError(RuntimeError):
    """A compile or link step failed; the message holds the compiler output."""


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def headers() -> list[Path]:
    return sorted(list(CSRC.glob("*.h")) + list(CSRC.glob("*.cuh")))


def find_nvcc() -> str | None:
    """The nvcc to use, or None."""
    named = os.environ.get("MODWEIGHTS_NVCC")
    if named:  # named explicitly: that one or none
        return named if os.path.isfile(named) and os.access(named, os.X_OK) else None
    cand = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cand.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        cand.append(which)
    cand.append("/usr/local/cuda/bin/nvcc")
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release ([0-9.]+)", out)
    return m.group(1) if m else "unknown"


def arch_flags(spec: str | None = None) -> list[str]:
    """``-gencode`` flags for a target list (see the module docstring)."""
    spec = (spec if spec is not None else os.environ.get("MODWEIGHTS_CUDA_ARCH", "")).strip() or DEFAULT_ARCH
    flags: list[str] = []
    for item in re.split(r"[;,\s]+", spec):
        if not item:
            continue
        if item.startswith("-"):
            flags.append(item)  # raw nvcc flag
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d+))?([af]?)(\+ptx)?", item, flags=re.IGNORECASE)
        if not m:
            raise BuildError(f"MODWEIGHTS_CUDA_ARCH: cannot read target {item!r} (examples: 80, sm_90a, 8.6, 90a+PTX)")
        num = m.group(1) + (m.group(2) or "")
        if len(num) == 1:
            num += "0"  # "8" means 8.0
        if int(num) < MIN_ARCH:
            raise BuildError(f"MODWEIGHTS_CUDA_ARCH: target {item!r} is older than sm_{MIN_ARCH}; "
                             "the kernels need compute capability 8.0 or newer")
        a = num + m.group(3).lower()
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if m.group(4):  # also embed PTX, which newer GPUs compile when they load the library
            flags.append(f"-gencode=arch=compute_{a},code=compute_{a}")
    if not flags:
        raise BuildError("MODWEIGHTS_CUDA_ARCH names no target")
    return flags


def compile_flags(arch: list[str], verbose: bool = False) -> list[str]:
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "-lineinfo", "-Xcompiler", "-fPIC",
             "-Xcompiler", "-fvisibility=hidden", "--expt-relaxed-constexpr", *arch]
    if verbose:
        flags += ["-Xptxas", "-v,-warn-spills"]
    return flags


def link_flags() -> list[str]:
    # -cudart static: the library needs no libcudart.so beside it and loads on machines
    # without a driver (it then reports no device instead of failing to load)
    # --exclude-libs: the static runtime's symbols stay private to this library, so its
    # calls cannot bind to the libcudart that torch loaded into the global scope
    return ["-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL"]


def _jobs(jobs: int | None) -> int:
    if jobs:
        return max(1, jobs)
    env = os.environ.get("MAX_JOBS")
    if env and env.isdigit():
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def _run(cmd: list[str], log) -> tuple[int, str]:
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, (p.stdout or "") + (p.stderr or "")


def _build_ninja(nvcc, objs, cflags, lib, lflags, build_dir: Path, jobs: int, log) -> None:
    q = lambda s: str(s).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(nvcc)}",
        f"cflags = {' '.join(shlex.quote(f) for f in cflags)}",
        f"lflags = {' '.join(shlex.quote(f) for f in lflags)}",
        "rule cu",
        "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc $lflags $in -o $out",
        "  description = link $out",
    ]
    for src, obj in objs:
        lines.append(f"build {q(obj)}: cu {q(src)}")
    lines.append(f"build {q(lib)}: link {' '.join(q(o) for _, o in objs)}")
    lines.append(f"default {q(lib)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    rc, out = _run([shutil.which("ninja"), "-C", str(build_dir), "-j", str(jobs)], log)
    if out.strip():
        log(out.rstrip())
    if rc != 0:
        raise BuildError(out)


def _build_pool(nvcc, objs, cflags, lib, lflags, jobs: int, log) -> None:
    def one(pair):
        src, obj = pair
        return src, _run([nvcc, *cflags, "-c", str(src), "-o", str(obj)], log)

    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for src, (rc, out) in pool.map(one, objs):
            log(f"nvcc {src.name}: {'ok' if rc == 0 else 'FAILED'}")
            if out.strip():
                log(out.rstrip())
            if rc != 0:
                failed.append(f"--- {src.name} ---\n{out}")
    if failed:
        raise BuildError("\n".join(failed))
    rc, out = _run([nvcc, *lflags, *[str(o) for _, o in objs], "-o", str(lib)], log)
    if out.strip():
        log(out.rstrip())
    if rc != 0:
        raise BuildError(out)


def build(out_lib: str | os.PathLike, build_dir: str | os.PathLike, nvcc: str | None = None,
          arch: str | None = None, jobs: int | None = None, verbose: bool = False, log=print,
          use_ninja: bool | None = None) -> Path:
    """Compile every csrc/*.cu (in parallel) and link ``out_lib``. Raises BuildError."""
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise BuildError("nvcc not found")
    out_lib = Path(out_lib).resolve()
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    out_lib.parent.mkdir(parents=True, exist_ok=True)
    cflags = compile_flags(arch_flags(arch), verbose)
    objs = [(src, build_dir / (src.stem + ".o")) for src in sources()]
    if not objs:
        raise BuildError(f"no .cu files in {CSRC}")
    n = _jobs(jobs)
    if use_ninja is None:
        use_ninja = shutil.which("ninja") is not None
    log(f"modweights CUDA build: {nvcc} ({nvcc_version(nvcc)}), {len(objs)} files, {n} jobs, "
        f"{'ninja' if use_ninja else 'parallel nvcc'}; {' '.join(arch_flags(arch))}")
    tmp_lib = out_lib.with_name(out_lib.name + ".tmp")
    if use_ninja:
        _build_ninja(nvcc, objs, cflags, tmp_lib, link_flags(), build_dir, n, log)
    else:
        _build_pool(nvcc, objs, cflags, tmp_lib, link_flags(), n, log)
    os.replace(tmp_lib, out_lib)  # never leave a half-written library behind
    return out_lib


def check_library(lib: Path) -> None:
    """Load the built library (no GPU needed) and check its exported entry points."""
    import ctypes

    h = ctypes.CDLL(str(lib))
    for sym in ("mw_abi_version", "mw_last_error", "mw_linear_params_layout", "mw_device_check",
                "mw_linear_demod", "mw_linear_forward", "mw_linear_bwd_stats", "mw_linear_bwd_dx",
                "mw_linear_bwd_weight_plan", "mw_linear_bwd_weight", "mw_linear_token_tile",
                "mw_linear_token_demod", "mw_linear_token_forward", "mw_linear_token_prep", "mw_linear_token_dx",
                "mw_linear_token_ds_demod", "mw_linear_token_da_demod", "mw_linear_token_weight"):
        getattr(h, sym)
    h.mw_abi_version.restype = ctypes.c_int
    print(f"{lib.name}: loads, ABI version {h.mw_abi_version()}, all entry points exported")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--arch", default=None, help=f"targets (default: $MODWEIGHTS_CUDA_ARCH or {DEFAULT_ARCH})")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--verbose", action="store_true", help="ptxas register / spill report")
    ap.add_argument("--no-ninja", action="store_true")
    args = ap.parse_args(argv)
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="mw_cuda_build_")
        out = tmp
    try:
        lib = build(Path(out) / LIB_NAME, Path(out) / "obj", arch=args.arch, jobs=args.jobs,
                    verbose=args.verbose, use_ninja=False if args.no_ninja else None)
        check_library(lib)
    except BuildError as e:
        print(f"modweights CUDA build FAILED:\n{e}", file=sys.stderr)
        return 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
