"""The wheel (``setup.py``): built from a clean copy of the tree without the CUDA extension,
it holds every package of the source (``modweights.aot`` was once left out of a hand-kept
list) and ``triton_kernels/`` as ``modweights.triton_kernels``, and nothing else: no tests,
caches or build leftovers (the rule: ``.ci/wheel_contents.py``). ``.ci/wheel_check.sh`` goes
further: a CUDA build too, each installed in a fresh venv, every subpackage imported."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
# what a fresh clone does not have (a dev tree's venvs, builds, caches, the dev symlink)
JUNK = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "bench_out",
                              ".pytest_cache", ".benchmarks", "venv", ".venv", "_cuda_build.json")


def _contents():
    return load_script(".ci/wheel_contents.py")


def test_wheel_holds_every_package_and_nothing_else(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    W = _contents()
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=JUNK, symlinks=True)
    if (src / "modweights" / "triton_kernels").is_symlink():
        (src / "modweights" / "triton_kernels").unlink()
    # caches in the source tree must stay out of the wheel
    for d in (Path("modweights", "__pycache__"), Path("tests", "__pycache__")):
        (src / d).mkdir(parents=True, exist_ok=True)
        (src / d / "junk.cpython-311.pyc").write_bytes(b"\0")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "out"), str(src)], capture_output=True, text=True,
                       env=dict(os.environ, MODWEIGHTS_NO_CUDA="1"), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("modweights-*.whl")
    assert W.problems(wheel, src, cuda=False) == []
    modules = W.source_modules(src)
    assert {"modweights/aot/__main__.py", "modweights/triton_kernels/mod_linear.py", "modweights/nn/conv.py"} <= modules


def test_the_contents_check_finds_what_is_wrong(tmp_path):
    """The rule itself: a missing package, a stray test or cache, an extension that should not be there."""
    import zipfile

    W = _contents()
    src = tmp_path / "src"
    for f in ("modweights/__init__.py", "modweights/aot/__init__.py", "triton_kernels/__init__.py",
              "/".join(("modweights", "notapackage", "x.py"))):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text("")
    assert W.source_modules(src) == {"modweights/__init__.py", "modweights/aot/__init__.py",
                                     "modweights/triton_kernels/__init__.py"}

    def wheel(*names):
        path = tmp_path / f"w{len(list(tmp_path.glob('w*.whl')))}.whl"
        with zipfile.ZipFile(path, "w") as z:
            for n in names:
                z.writestr(n, "")
        return path

    good = ["modweights/__init__.py", "modweights/aot/__init__.py", "modweights/triton_kernels/__init__.py",
            *sorted(W.DATA), "modweights-0.1.0.dist-info/RECORD"]
    assert W.problems(wheel(*good), src, cuda=False) == []
    cuda_module = "/".join(("modweights", "_cuda.cpython-311-x86_64-linux-gnu.so"))  # (names made up here)
    assert W.problems(wheel(*good, cuda_module), src, cuda=True) == []
    assert "missing" in W.problems(wheel(*good[1:]), src, cuda=False)[0]
    for stray in ("tests/test_nn.py", "/".join(("modweights", "__pycache__", "nn.cpython-311.pyc")), "build/lib/x.py"):
        assert "not from the source's packages" in W.problems(wheel(*good, stray), src, cuda=False)[0]
    assert "one modweights/_cuda" in W.problems(wheel(*good), src, cuda=True)[0]
