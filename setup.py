"""Build script.

Metadata lives in pyproject.toml. This file maps the source layout onto the installed
one (``triton_kernels/`` installs as ``modweights.triton_kernels``: the top-level name
``triton_kernels`` belongs to other packages) and builds the CUDA extension.

CUDA extension (``csrc/`` -> ``modweights/_cuda<EXT_SUFFIX>``, see csrc/README.md): a
pybind11 module compiled by nvcc through ninja with pybind11's and this Python's headers
only (no torch headers: seconds, not minutes, and any torch). Built when nvcc is found;
the install succeeds without it, and without pybind11 or ``Python.h``, but then says so
(a warning, and the reason in ``modweights/_cuda_build.json``, which the ``cuda`` backend
reports as why it is unavailable). Never silently.

Environment:
    MODWEIGHTS_NO_CUDA=1     skip the CUDA extension
    MODWEIGHTS_CUDA_ARCH     targets (default ``80;90a``: sm_80 and sm_90a)
    MODWEIGHTS_NVCC          the nvcc to use (else CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)
    MAX_JOBS                 parallel compiles (ninja: pip install ninja; else parallel nvcc)
"""
import importlib.util
import json
import os
import sys
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_EXT = "modweights._cuda"
STATUS_FILE = "_cuda_build.json"


def _load_builder():
    """csrc/build.py, imported by path (it is not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("_modweights_cuda_build", os.path.join(HERE, "csrc", "build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _warn(msg):
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\nWARNING (modweights): {msg}\n{bar}\n\n")
    sys.stderr.flush()


class BuildCudaExt(build_ext):
    """build_ext that builds the CUDA extension with csrc/build.py, and never fails the install."""

    def build_extension(self, ext):
        if ext.name != CUDA_EXT:
            return super().build_extension(ext)
        out = self.get_ext_fullpath(ext.name)
        status_path = os.path.join(os.path.dirname(out), STATUS_FILE)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        status = {"built": False, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "module": os.path.basename(out)}
        try:
            builder = _load_builder()
            status["arch"] = os.environ.get("MODWEIGHTS_CUDA_ARCH") or builder.DEFAULT_ARCH
            if os.environ.get("MODWEIGHTS_NO_CUDA", "") not in ("", "0"):
                status["reason"] = "extension not built: MODWEIGHTS_NO_CUDA is set"
                self._remove(out)
            else:
                nvcc = builder.find_nvcc()
                if not nvcc:
                    status["reason"] = "extension not built: nvcc not found"
                    self._remove(out)
                    _warn("nvcc not found: the `cuda` backend is not built (the rest of modweights "
                          "works). Put nvcc on PATH or set CUDA_HOME, then reinstall.")
                elif self._missing(builder, status, out):
                    pass
                else:
                    status["nvcc"] = nvcc
                    status["nvcc_version"] = builder.nvcc_version(nvcc)
                    t0 = time.time()
                    log_lines = []

                    def log(line):
                        log_lines.append(line)
                        print(line)

                    try:
                        builder.build(out, os.path.join(self.build_temp, "modweights_cuda"), nvcc=nvcc,
                                      jobs=self.parallel if isinstance(self.parallel, int) else None, log=log)
                        status.update(built=True, reason="built", seconds=round(time.time() - t0, 1),
                                      cudart="shared")
                    except builder.BuildError as e:
                        self._remove(out)
                        first = next((ln for ln in str(e).splitlines() if "error" in ln.lower()),
                                     str(e).strip().splitlines()[0] if str(e).strip() else "")
                        status["reason"] = f"extension not built: the CUDA compile failed ({first.strip()[:300]})"
                        status["log"] = str(e)[-20000:]
                        _warn("the CUDA extension failed to compile, so the `cuda` backend is unavailable "
                              "(the rest of modweights is installed).\n" + str(e)[-4000:])
        except Exception as e:  # never break the install over the optional extension
            self._remove(out)
            status["reason"] = f"extension not built: {type(e).__name__}: {e}"
            _warn(f"building the CUDA extension raised {type(e).__name__}: {e}")
        paths = [status_path]
        if self.inplace or getattr(self, "editable_mode", False):
            # editable install: the package is imported from the source tree
            src_pkg = os.path.join(HERE, "modweights")
            paths.append(os.path.join(src_pkg, STATUS_FILE))
            if not status["built"]:
                self._remove(os.path.join(src_pkg, os.path.basename(out)))
        for path in dict.fromkeys(os.path.abspath(p) for p in paths):
            with open(path, "w") as f:
                json.dump(status, f, indent=1)
        print(f"modweights: cuda backend: {status['reason']}")

    def _missing(self, builder, status, out) -> bool:
        """Record and warn when pybind11 or Python.h is missing (the module needs both)."""
        ok, why = builder.python_headers()
        if ok:
            try:
                builder.pybind11_include()
            except builder.BuildError as e:
                ok, why = False, str(e)
        if ok:
            return False
        status["reason"] = f"extension not built: {why}"
        self._remove(out)
        _warn(f"the `cuda` backend is not built: {why} (the rest of modweights works).")
        return True

    @staticmethod
    def _remove(path):
        # a module left over from an earlier build must not be taken for this one
        if os.path.exists(path):
            os.remove(path)

    def get_outputs(self):
        # only what was built: a skipped or failed CUDA build leaves no module to install
        cuda = self.get_ext_fullpath(CUDA_EXT)
        return [p for p in super().get_outputs() if p != cuda or os.path.exists(p)]


def _packages() -> list[str]:
    """Every package under ``modweights/`` (found, not listed: a hand-kept list once left out
    ``modweights.aot``), and ``triton_kernels/`` (with its subpackages) as
    ``modweights.triton_kernels``. Nothing else: no tests, examples or benchmarks."""
    # (a development symlink modweights/triton_kernels -> ../triton_kernels is found here too)
    found = find_packages(HERE, include=["modweights", "modweights.*"])
    kernels = ["modweights.triton_kernels"] + [f"modweights.triton_kernels.{p}"
                                               for p in find_packages(os.path.join(HERE, "triton_kernels"))]
    return sorted(set(found) | set(kernels))


setup(
    packages=_packages(),
    package_dir={
        "modweights": "modweights",
        "modweights.triton_kernels": "triton_kernels",
    },
    # the measured backend preferences of `auto` (modweights/backends/auto_table.py)
    package_data={"modweights.backends": ["auto_table.json"]},
    # optional: setuptools skips copying it into the source tree (editable installs) when
    # it was not built
    ext_modules=[Extension(CUDA_EXT, sources=[], optional=True)],
    cmdclass={"build_ext": BuildCudaExt},
)
