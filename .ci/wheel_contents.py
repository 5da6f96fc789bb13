"""Check a modweights wheel's contents against the source tree it was built from.

    python .ci/wheel_contents.py WHEEL SOURCE_TREE [--cuda]

The wheel must hold every ``.py`` file of every package under ``modweights/`` and
``triton_kernels/`` (installed as ``modweights.triton_kernels``), the packaged data
(``backends/auto_table.json``, the CUDA build record ``_cuda_build.json``), with ``--cuda`` the
built extension ``modweights/_cuda*.so``, its ``.dist-info``, and nothing else: no tests,
caches (``__pycache__``, ``.pyc``) or build leftovers. Prints the wheel's size and file
count; exits 1 with the differences otherwise. Also imported by tests/test_wheel.py.
"""
from __future__ import annotations

import fnmatch
import os
import sys
import zipfile
from pathlib import Path

#: data files a wheel ships besides the modules
DATA = {"modweights/backends/auto_table.json", "modweights/_cuda_build.json"}
#: the CUDA extension of a CUDA build (one per Python ABI)
CUDA_MODULE = "modweights/_cuda.*.so"
#: the source roots and their installed names (setup.py's package_dir)
ROOTS = (("modweights", "modweights"), ("triton_kernels", "modweights/triton_kernels"))


def source_modules(src: str | os.PathLike) -> set[str]:
    """The installed names of the ``.py`` files in packages (folders with ``__init__.py`` all the
    way up) of the source tree ``src``. A development symlink ``modweights/triton_kernels``
    is not followed: ``triton_kernels/`` is its own root."""
    src = Path(src)
    want = set()
    for top, installed in ROOTS:
        for dirpath, dirnames, filenames in os.walk(src / top):
            here = Path(dirpath)
            if not (here / "__init__.py").is_file():
                dirnames[:] = []  # not a package: nothing below it is installed either
                continue
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = here.relative_to(src / top).as_posix()
            prefix = installed if rel == "." else f"{installed}/{rel}"
            want |= {f"{prefix}/{f}" for f in filenames if f.endswith(".py")}
    return want


def problems(wheel: str | os.PathLike, src: str | os.PathLike, cuda: bool) -> list[str]:
    """What is wrong with ``wheel`` (empty when it is right)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    dist = {n for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    modules = source_modules(src)
    so = {n for n in names if fnmatch.fnmatch(n, CUDA_MODULE)}
    out = []
    missing = (modules | DATA) - names
    if missing:
        out.append(f"missing: {sorted(missing)}")
    extra = names - modules - DATA - dist - so
    if extra:
        out.append(f"not from the source's packages (tests, caches, leftovers?): {sorted(extra)}")
    if cuda and len(so) != 1:
        out.append(f"a CUDA build must ship one {CUDA_MODULE}; found {sorted(so)}")
    if not cuda and so:
        out.append(f"a build without CUDA ships no extension; found {sorted(so)}")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cuda = "--cuda" in argv
    args = [a for a in argv if a != "--cuda"]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    wheel, src = args
    names = zipfile.ZipFile(wheel).namelist()
    size = os.path.getsize(wheel)
    bad = problems(wheel, src, cuda)
    print(f"{os.path.basename(wheel)}: {size / 1024:.0f} KiB, {len(names)} files "
          f"({'with' if cuda else 'without'} the CUDA extension): {'contents OK' if not bad else 'WRONG'}")
    for p in bad:
        print(f"  {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
