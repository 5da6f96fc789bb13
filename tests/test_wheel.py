"""The wheel (``setup.py``): built from a clean copy of the tree without the CUDA extension,
it holds every package of the source (``modweights.aot`` was once left out of a hand-kept
list) and ``triton_kernels/`` as ``modweights.triton_kernels``, and nothing else: no tests,
caches or build leftovers. ``.ci/wheel_check.sh`` goes further (a CUDA build too, installed
in a fresh venv, every subpackage imported)."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what a fresh clone does not have (a dev tree's venvs, builds, caches, the dev symlink)
JUNK = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "bench_out",
                              ".pytest_cache", ".benchmarks", "venv", ".venv", "_cuda_build.json")


def _clean_copy(dst: Path) -> Path:
    src = dst / "src"
    shutil.copytree(ROOT, src, ignore=JUNK, symlinks=True)
    link = src / "modweights" / "triton_kernels"
    if link.is_symlink():
        link.unlink()
    return src


def _source_files(src: Path) -> set[str]:
    """The .py files the wheel must hold, by their installed names."""
    want = set()
    for top, installed in (("modweights", "modweights"), ("triton_kernels", "modweights/triton_kernels")):
        for path in (src / top).rglob("*.py"):
            rel = path.relative_to(src / top)
            if all((src / top / p / "__init__.py").is_file() for p in [Path(*rel.parts[:i]) for i in range(len(rel.parts))]):
                want.add(f"{installed}/{rel.as_posix()}")
    return want


def test_wheel_holds_every_package_and_nothing_else(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = _clean_copy(tmp_path)
    # caches in the source tree must stay out of the wheel
    for d in ("modweights/__pycache__", "tests/__pycache__"):
        (src / d).mkdir(parents=True, exist_ok=True)
        (src / d / "junk.cpython-311.pyc").write_bytes(b"\0")
    env = dict(os.environ, MODWEIGHTS_NO_CUDA="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "out"), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("modweights-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    py = {n for n in names if n.endswith(".py")}
    missing = _source_files(src) - py
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert "modweights/aot/__main__.py" in py and "modweights/triton_kernels/mod_linear.py" in py
    dist = {n for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    data = names - py - dist
    assert data == {"modweights/backends/auto_table.json", "modweights/_cuda_build.json"}, data
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "build/"))]
    assert py == _source_files(src), sorted(py - _source_files(src))
