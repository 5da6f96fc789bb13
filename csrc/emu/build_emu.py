"""Build the host emulation of the CUDA extension: the same csrc/*.cu / *.cuh kernel source,
compiled by g++ against csrc/emu/include/emu_cuda.h, and the same binding (csrc/binding.cpp,
pybind11), into a CPU extension module ``_cuda_emu`` with the functions of
``modweights._cuda`` (see csrc/emu/README.md).

    python csrc/emu/build_emu.py --out DIR      # -> DIR/_cuda_emu<EXT_SUFFIX>

The .cu and .cuh text is rewritten in three places only: ``extern __shared__ ... smem_raw[]``
points at the emulator's buffer, other ``__shared__`` arrays become function statics, and
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``mw_emu::launch(kernel, grid,
block, smem, stream, args)``. Everything else compiles as written.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

EMU = Path(__file__).resolve().parent
CSRC = EMU.parent
MODULE = "_cuda_emu"
LIB_NAME = MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _builder():
    """csrc/build.py (its Python.h and pybind11 lookups), imported by path."""
    spec = importlib.util.spec_from_file_location("_mw_cuda_build", CSRC / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rewrite(text: str) -> str:
    text = re.sub(r"extern\s+__shared__[^;]*\bsmem_raw\[\];",
                  "unsigned char* smem_raw = ::mw_emu::dyn_smem;", text)
    text = re.sub(r"\b__shared__\b", "static", text)
    text = re.sub(r"(\b[A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", r"::mw_emu::launch(\1, \2, ", text)
    return text


def build(out: Path, jobs: int = 2, opt: str = "-O1") -> Path:
    out = Path(out).resolve()
    src_dir = out / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    objs = []
    cmds = []
    # the headers too (a launch or a shared-memory declaration may sit in a .cuh): the
    # rewritten copies sit beside the .cpp files, so `#include "x.cuh"` finds them first
    for h in sorted(CSRC.glob("*.cuh")):
        (src_dir / h.name).write_text(f'#line 1 "{h}"\n' + rewrite(h.read_text()))
    for cu in sorted(CSRC.glob("*.cu")):
        cpp = src_dir / (cu.stem + ".cpp")
        cpp.write_text(f'#line 1 "{cu}"\n' + rewrite(cu.read_text()))
        obj = src_dir / (cu.stem + ".o")
        objs.append(obj)
        cmds.append(["g++", "-std=c++20", opt, "-g", "-fPIC", "-fvisibility=hidden", "-pthread", "-w",
                     f"-I{EMU / 'include'}", f"-I{CSRC}", "-c", str(cpp), "-o", str(obj)])

    b = _builder()
    ok, py_inc = b.python_headers()
    if not ok:
        raise RuntimeError(f"emulation build: {py_inc}")
    try:
        pb_inc = b.pybind11_include()
    except b.BuildError as e:
        raise RuntimeError(f"emulation build: {e}") from None
    obj = src_dir / "binding.o"
    objs.append(obj)
    cmds.append(["g++", "-std=c++20", "-O1", "-fPIC", "-fvisibility=hidden", "-w", f"-DMW_MODULE={MODULE}",
                 f"-I{pb_inc}", f"-I{py_inc}", f"-I{CSRC}", "-c", str(CSRC / "binding.cpp"), "-o", str(obj)])

    def run(cmd):
        p = subprocess.run(cmd, capture_output=True, text=True)
        return p.returncode, p.stdout + p.stderr

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(run, cmds))
    errors = [out_ for rc, out_ in results if rc != 0]
    if errors:
        raise RuntimeError("emulation build failed:\n" + "\n".join(errors))
    lib = out / LIB_NAME
    rc, msg = run(["g++", "-shared", "-pthread", "-o", str(lib), *map(str, objs)])
    if rc != 0:
        raise RuntimeError("emulation link failed:\n" + msg)
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--opt", default="-O1")
    args = ap.parse_args(argv)
    try:
        print(build(Path(args.out), args.jobs, args.opt))
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
