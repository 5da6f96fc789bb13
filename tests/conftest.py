"""Shared pytest setup.

Without a GPU, Triton kernels run under its interpreter on CPU tensors. The variable
must be set before triton is first imported (its decorators read it), so it is set here,
at collection time, before any test module imports modweights' Triton backend.
"""
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """A fixed seed per test, and no TF32 in references (exact fp32 matmuls)."""
    torch.manual_seed(0)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="session")
def cuda_emulation_library(tmp_path_factory) -> str:
    """Path of the cuda backend's kernels built for the CPU by the host emulation
    (``csrc/emu/build_emu.py``), built once per session; skips without g++."""
    if shutil.which("g++") is None:
        pytest.skip("host emulation of the cuda backend needs g++")
    build_emu = Path(__file__).resolve().parents[1] / "csrc" / "emu" / "build_emu.py"
    spec = importlib.util.spec_from_file_location("_mw_build_emu", build_emu)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.build(tmp_path_factory.mktemp("cuda_emu")))


@pytest.fixture
def on_backend(request, monkeypatch):
    """Select the backend named by the test's ``backend`` parameter: the cuda one through the
    host emulation, the triton one under the interpreter (skipped without triton)."""
    name = request.getfixturevalue("backend")
    if name == "cuda":
        from modweights.backends import cuda as CB

        monkeypatch.setattr(CB, "EMULATION_LIBRARY", request.getfixturevalue("cuda_emulation_library"))
    if name == "triton":
        pytest.importorskip("triton")
    return name


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- shared tests


def torch_matches_reference_test(cases, plans):
    """The test that the torch backend matches the reference (outputs and every gradient) on
    each of one op's ``cases``, in float64 and float32, with the counted plan and with each of
    ``plans`` forced where both formulations exist (:func:`modweights.testing.with_plans`).
    tests/test_mod_linear.py and tests/test_mod_conv2d.py bind it to their op's cases."""
    from modweights import testing as T
    from modweights.backends import torch_backend as TB

    params = T.with_plans(cases, plans)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    @pytest.mark.parametrize("case,plan", params, ids=[f"{c.id}-plan={p or 'auto'}" for c, p in params])
    def test(case, plan, dtype, monkeypatch):
        monkeypatch.setattr(TB, "FORCE_PLAN", plan)
        T.assert_matches_reference(case, "torch", dtype)

    return test


# ----------------------------------------------------------------------------- MODWEIGHTS_REQUIRE
# MODWEIGHTS_REQUIRE=triton,cuda (the GPU check sets it): those backends must be available on
# this machine's device (else the run still runs every test, says which is missing and why, and
# exits 1), and a test skipped because a backend or the GPU is unavailable fails instead.
# Without it, such tests skip, as everywhere else.

REQUIRE_ENV = "MODWEIGHTS_REQUIRE"


def means_unavailable(reason: str) -> bool:
    """Whether a skip reason says a backend, its library or the GPU is missing (not "does not apply")."""
    r = reason.lower()
    return ("needs a cuda device" in r or "library not built" in r
            or ("backend" in r and ("unavailable" in r or "not available" in r)))


def required_backends() -> list[str]:
    text = os.environ.get(REQUIRE_ENV, "")
    names = [n.strip() for n in text.split(",") if n.strip()]
    from modweights import backends

    bad = [n for n in names if n not in backends.NAMES]
    if bad:
        raise pytest.UsageError(f"{REQUIRE_ENV}={text!r}: unknown backend(s) {', '.join(bad)}; "
                                f"choose from {', '.join(backends.NAMES)}")
    return names


_MISSING: dict[str, str] = {}  # required backend -> why it is unavailable here


def pytest_sessionstart(session):
    """Note the required backends that are unavailable: the run goes on (the other backends'
    tests still tell us something), and fails at the end (:func:`pytest_sessionfinish`)."""
    names = required_backends()
    if not names:
        return
    import modweights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for n, st in modweights.available_backends(device).items():
        if n in names and not st.available:
            _MISSING[n] = f"{st.reason} (on {device})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _MISSING:
        why = "; ".join(f"{n}: {r}" for n, r in _MISSING.items())
        terminalreporter.write_sep("=", f"{REQUIRE_ENV}: required backend(s) unavailable: {why}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _MISSING and session.exitstatus == 0:
        session.exitstatus = 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or not os.environ.get(REQUIRE_ENV):
        return
    reason = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if means_unavailable(reason):
        rep.outcome = "failed"
        rep.longrepr = f"{REQUIRE_ENV} is set, so this skip is a failure: {reason}"
