"""Build the CUDA extension of modweights: ``csrc/ -> modweights/_cuda<EXT_SUFFIX>``.

A pybind11 extension module built with nvcc and pybind11's headers alone (no torch headers:
a build takes seconds and is tied to a Python version, not to a torch version). The
``.cu`` files (CUDA headers only) are compiled by nvcc for the targets; ``binding.cpp``
(pybind11, host C++, no CUDA headers) by nvcc's host compiler against this Python's
headers; the CUDA runtime is linked shared (``-cudart shared``), so the module uses the
``libcudart.so`` that torch has already loaded instead of a second, static copy (see
csrc/README.md). Used by ``setup.py`` (the installed extension) and by
``csrc/check_build.sh`` (CI: every .cu must compile for every target, with no spills).

Needs: nvcc, pybind11 (``pip install pybind11``), this Python's ``Python.h`` (the
development headers), and ninja for parallel builds (``pip install ninja``; without it,
parallel nvcc processes). A missing piece is a BuildError that says which.

Environment:
    MODWEIGHTS_CUDA_ARCH  targets, e.g. ``80;90a`` (the default), ``sm_80,sm_90a``,
                          ``8.6 9.0a``, ``90a+PTX``, or raw ``-gencode=...`` flags
    MODWEIGHTS_NVCC       the nvcc to use (else $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc,
                          nvcc on PATH, /usr/local/cuda/bin/nvcc)
    MAX_JOBS              parallel compiles (default: CPU count)

Command line (exit status 1 on any failure)::

    python csrc/build.py [--out DIR] [--arch SPEC] [--jobs N] [--verbose]   # build + import check
    python csrc/build.py --report [--check]   # + per-kernel registers / spills / cp.async table
    python csrc/build.py --check-python     # does this Python have Python.h? (exit 1: no)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent
MODULE = "_cuda"  # modweights._cuda
DEFAULT_ARCH = "80;90a"
MIN_ARCH = 80  # WMMA on bf16 needs sm_80
BINDING = CSRC / "binding.cpp"


class BuildError(RuntimeError):
    """A build step failed or a prerequisite is missing; the message says which."""


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def headers() -> list[Path]:
    return sorted(list(CSRC.glob("*.h")) + list(CSRC.glob("*.cuh")))


def module_filename() -> str:
    """``_cuda`` + this Python's extension suffix, e.g. ``_cuda.cpython-311-x86_64-linux-gnu.so``."""
    return MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def python_headers() -> tuple[bool, str]:
    """``(True, include dir)`` when this Python's ``Python.h`` exists, else ``(False, why)``.

    A pybind11 module cannot be built without it; the GPU check records this for the GPU
    machine's Python (``python3.12 csrc/build.py --check-python``).
    """
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = sysconfig.get_paths()
    dirs = list(dict.fromkeys(d for d in (paths.get("include"), paths.get("platinclude")) if d))
    for d in dirs:
        if (Path(d) / "Python.h").is_file():
            return True, d
    return False, (f"Python.h not found for Python {ver} ({sys.executable}; looked in {', '.join(dirs) or 'nothing'}): "
                   f"install this Python's development headers (e.g. apt install python{ver}-dev)")


def pybind11_include() -> str:
    """pybind11's header folder, or BuildError."""
    try:
        import pybind11
    except ImportError:
        raise BuildError(f"pybind11 is not installed for {sys.executable}: pip install pybind11") from None
    return pybind11.get_include()


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
    """nvcc flags of the .cu files."""
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "-lineinfo", "-Xcompiler", "-fPIC",
             "-Xcompiler", "-fvisibility=hidden", "--expt-relaxed-constexpr", *arch]
    if verbose:
        flags += ["-Xptxas", "-v,-warn-spills"]
    return flags


def binding_flags() -> list[str]:
    """Host-compiler flags of binding.cpp (through nvcc): pybind11 and Python headers."""
    ok, inc = python_headers()
    if not ok:
        raise BuildError(inc)
    return ["-std=c++17", "-O2", "-DNDEBUG", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            f"-I{pybind11_include()}", f"-I{inc}", f"-I{CSRC}"]


def cudart_dir(nvcc: str) -> str | None:
    """The toolkit folder holding libcudart.so (for the fallback RPATH), or None."""
    root = Path(os.path.realpath(nvcc)).parent.parent
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (root / sub / "libcudart.so").exists() or any((root / sub).glob("libcudart.so.*")):
            return str(root / sub)
    return None


def link_flags(nvcc: str | None = None) -> list[str]:
    # -cudart shared: the module's CUDA runtime calls go to the libcudart.so.<major> that
    # torch loaded when it was imported (same soname: the loader maps it once), so there is
    # one runtime in the process, the driver need only match torch's CUDA, and the module is
    # ~8 MB smaller than with the static runtime. The RPATH to the toolkit's lib is a fallback
    # for importing the module before torch (csrc/check_build.sh without torch).
    flags = ["-shared", "-cudart", "shared"]
    d = cudart_dir(nvcc) if nvcc else None
    if d:
        flags += ["-Xlinker", f"-rpath,{d}"]
    return flags


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


def _build_ninja(nvcc, units, lib, lflags, build_dir: Path, jobs: int, log) -> None:
    """units: (source, object, flags) triples, compiled by nvcc and linked into lib."""
    q = lambda s: str(s).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(nvcc)}",
        f"lflags = {' '.join(shlex.quote(f) for f in lflags)}",
        "rule cc",
        "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $nvcc $lflags $in -o $out",
        "  description = link $out",
    ]
    for src, obj, flags in units:
        lines.append(f"build {q(obj)}: cc {q(src)}")
        lines.append(f"  flags = {' '.join(shlex.quote(f) for f in flags)}")
    lines.append(f"build {q(lib)}: link {' '.join(q(o) for _, o, _ in units)}")
    lines.append(f"default {q(lib)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    rc, out = _run([shutil.which("ninja"), "-C", str(build_dir), "-j", str(jobs)], log)
    if out.strip():
        log(out.rstrip())
    if rc != 0:
        raise BuildError(out)


def _build_pool(nvcc, units, lib, lflags, jobs: int, log) -> None:
    def one(unit):
        src, obj, flags = unit
        return src, _run([nvcc, *flags, "-c", str(src), "-o", str(obj)], log)

    failed = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for src, (rc, out) in pool.map(one, units):
            log(f"nvcc {src.name}: {'ok' if rc == 0 else 'FAILED'}")
            if out.strip():
                log(out.rstrip())
            if rc != 0:
                failed.append(f"--- {src.name} ---\n{out}")
    if failed:
        raise BuildError("\n".join(failed))
    rc, out = _run([nvcc, *lflags, *[str(o) for _, o, _ in units], "-o", str(lib)], log)
    if out.strip():
        log(out.rstrip())
    if rc != 0:
        raise BuildError(out)


def build(out_module: str | os.PathLike, build_dir: str | os.PathLike, nvcc: str | None = None,
          arch: str | None = None, jobs: int | None = None, verbose: bool = False, log=print,
          use_ninja: bool | None = None) -> Path:
    """Compile every csrc/*.cu and binding.cpp (in parallel) and link the extension module
    ``out_module`` (name it :func:`module_filename`). Raises BuildError, also before
    compiling anything when Python.h or pybind11 is missing."""
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise BuildError("nvcc not found")
    bflags = binding_flags()  # Python.h and pybind11 first: fail in a second, not after the .cu files
    out_module = Path(out_module).resolve()
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    out_module.parent.mkdir(parents=True, exist_ok=True)
    cflags = compile_flags(arch_flags(arch), verbose)
    units = [(src, build_dir / (src.stem + ".o"), cflags) for src in sources()]
    if not units:
        raise BuildError(f"no .cu files in {CSRC}")
    units.append((BINDING, build_dir / "binding.o", bflags))
    n = _jobs(jobs)
    if use_ninja is None:
        use_ninja = shutil.which("ninja") is not None
    log(f"modweights CUDA build: {nvcc} ({nvcc_version(nvcc)}), {len(units)} files, {n} jobs, "
        f"{'ninja' if use_ninja else 'parallel nvcc (ninja not found)'}; {' '.join(arch_flags(arch))}")
    tmp = out_module.with_name(out_module.name + ".tmp")
    if use_ninja:
        _build_ninja(nvcc, units, tmp, link_flags(nvcc), build_dir, n, log)
    else:
        _build_pool(nvcc, units, tmp, link_flags(nvcc), n, log)
    os.replace(tmp, out_module)  # never leave a half-written module behind
    return out_module


def import_module(path: str | os.PathLike, name: str = MODULE):
    """Import an extension module from a file (its PyInit name must be ``name``)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None:
        raise ImportError(f"{path} is not an extension module file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_module(path: Path) -> None:
    """Import the built module (no GPU needed) and check what it reports."""
    try:  # torch first when present: then the module binds to torch's libcudart
        import torch  # noqa: F401
    except ImportError:
        pass
    mod = import_module(path)
    fns = ("abi_version", "device_check", "mod_linear_demod", "mod_linear_forward", "mod_linear_bwd_stats",
           "mod_linear_bwd_dx", "mod_linear_bwd_weight_plan", "mod_linear_bwd_weight", "mod_linear_token_demod",
           "mod_linear_token_forward", "mod_linear_token_prep", "mod_linear_token_dx", "mod_linear_token_ds_demod",
           "mod_linear_token_da_demod", "mod_linear_token_weight")
    missing = [f for f in fns if not hasattr(mod, f)]
    if missing:
        raise BuildError(f"{path.name}: missing {', '.join(missing)}")
    runtimes = sorted(set(re.findall(r"\S*libcudart[^\s]*", Path("/proc/self/maps").read_text())))
    why = mod.device_check(0)
    print(f"{path.name}: imports, ABI version {mod.abi_version()}, {len(fns)} functions; CUDA runtime "
          f"{', '.join(runtimes) or 'not mapped'}; device 0: {why or 'usable'}")


def _report(log: str, obj_dir: Path, check: bool, readme: bool = False, arch: str | None = None) -> int:
    sys.path.insert(0, str(CSRC))
    import ptxas_report as R

    kernels = R.parse_ptxas(log)
    cuobjdump = R.find_cuobjdump(find_nvcc())
    if cuobjdump:
        R.read_objects(sorted(obj_dir.glob("*.o")), kernels, cuobjdump)
    text = R.table(kernels)
    print(text)
    if readme:
        nvcc = find_nvcc()
        R.write_readme(CSRC / "README.md", text, f"nvcc {nvcc_version(nvcc)}, "
                       f"`{' '.join(arch_flags(arch))}`, `python csrc/build.py --report --readme"
                       f"{' --arch ' + arch if arch else ''}`")
    if not cuobjdump:
        print("cuobjdump not found (PATH, the toolkit, Triton's copy): no launch bounds, no SASS counts")
        if check:
            return 1
    if check:
        bad = R.problems(kernels)
        for b in bad:
            print(f"CHECK FAILED: {b}")
        if bad:
            return 1
        print(f"check: {len(kernels)} kernels, 0 spill bytes, cp.async in the per-sample GEMMs and the 16-bit per-token forward / dx, "
              "forward / dx at >= 2 blocks per SM")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--arch", default=None, help=f"targets (default: $MODWEIGHTS_CUDA_ARCH or {DEFAULT_ARCH})")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--verbose", action="store_true", help="ptxas register / spill report")
    ap.add_argument("--no-ninja", action="store_true")
    ap.add_argument("--check-python", action="store_true", help="report whether this Python has Python.h")
    ap.add_argument("--report", action="store_true",
                    help="print registers, spills, occupancy and cp.async / ldmatrix / HMMA counts per kernel "
                         "(csrc/ptxas_report.py; implies --verbose)")
    ap.add_argument("--readme", action="store_true",
                    help="with --report: write the table into csrc/README.md (between its ptxas-report markers)")
    ap.add_argument("--check", action="store_true",
                    help="with --report: fail on spills, GEMM kernels without cp.async, forward / dx under 2 blocks/SM")
    args = ap.parse_args(argv)
    if args.check_python:
        ok, what = python_headers()
        print(f"Python.h for Python {sys.version.split()[0]} ({sys.executable}): "
              f"{'found in ' + what if ok else 'MISSING: ' + what}")
        return 0 if ok else 1
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="mw_cuda_build_")
        out = tmp
    lines: list[str] = []

    def log(line):
        lines.append(line)
        if not args.report or "ptxas" not in line:  # the report says it shorter
            print(line)

    try:
        mod = build(Path(out) / module_filename(), Path(out) / "obj", arch=args.arch, jobs=args.jobs,
                    verbose=args.verbose or args.report, log=log, use_ninja=False if args.no_ninja else None)
        check_module(mod)
        if args.report:
            return _report("\n".join(lines), Path(out) / "obj", args.check, args.readme, args.arch)
    except BuildError as e:
        print(f"modweights CUDA build FAILED:\n{e}", file=sys.stderr)
        return 1
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
