"""The suite's own conventions (tests/conftest.py): under MODWEIGHTS_REQUIRE only a typed
"backend unavailable" skip fails, and ``-m "not slow"`` leaves out the slow groups."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _pytest(tmp_path, test_source: str, *args, **env):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(test_source)
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", str(tmp_path),
                           *args], capture_output=True, text=True, env=e, cwd=tmp_path, timeout=300)


PROBE = '''
import pytest
import torch
from conftest import BackendUnavailable, skip_unavailable

def test_typed():
    skip_unavailable("cuda backend unavailable: no device here")

def test_untyped_mentioning_a_backend():
    pytest.skip("checks a cuda backend unavailable on cpu")  # does not apply: stays a skip

@pytest.mark.gpu
def test_gpu_marked():
    assert torch.cuda.is_available()

def test_typed_is_a_skip():
    assert issubclass(BackendUnavailable, pytest.skip.Exception)
'''


def test_require_fails_typed_unavailable_skips_only(tmp_path):
    r = _pytest(tmp_path, PROBE, MODWEIGHTS_REQUIRE="reference")
    out = r.stdout
    assert "FAILED test_probe.py::test_typed" in out, out[-2000:]
    assert "SKIPPED [1] test_probe.py:10: checks a cuda backend unavailable on cpu" in out, out[-2000:]
    if not torch.cuda.is_available():
        assert "ERROR test_probe.py::test_gpu_marked" in out, out[-2000:]  # raised at setup
    # without the switch every unavailable skip is a skip
    r = _pytest(tmp_path, PROBE)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout[-2000:]


def test_slow_groups_are_marked(tmp_path):
    probe = '''
import pytest

def test_dry_run_of_something():
    pass

def test_uses_the_emulation(cuda_emulation_library):
    pass

def test_fast():
    pass

@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_on_backend(backend, on_backend):
    pass
'''
    r = _pytest(tmp_path, probe, "--collect-only", "-m", "not slow")
    assert "test_fast" in r.stdout and "test_dry_run_of_something" not in r.stdout, r.stdout[-2000:]
    assert "test_on_backend[torch]" in r.stdout and "test_on_backend[cuda]" not in r.stdout, r.stdout[-2000:]
    assert "test_uses_the_emulation" not in r.stdout and "3 deselected" in r.stdout, r.stdout[-2000:]
