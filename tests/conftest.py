"""Shared pytest setup.

Without a GPU, Triton kernels run under its interpreter on CPU tensors. The variable
must be set before triton is first imported (its decorators read it), so it is set here,
at collection time, before any test module imports modweights' Triton backend.
"""
import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from modweights import _switches as switches  # noqa: E402 (after TRITON_INTERPRET)


#: the repository's root (tests/..)
ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """The module of a script that is not part of the package (``csrc/build.py``,
    ``.ci/wheel_contents.py``, ``benchmarks/results_table.py``, ...), loaded by its path under
    the repository root."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location("_mw_script_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """A fixed seed per test, and no TF32 in references (exact fp32 matmuls)."""
    torch.manual_seed(0)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def switch():
    """``switch(name=value, ...)``: set test-only switches (``modweights/_switches.py``; unknown
    names and wrong types are errors) until the test ends; a later call for the same name wins.
    Within one test, ``with switches.override(...)`` scopes a setting to a block."""
    with contextlib.ExitStack() as stack:
        yield lambda **values: stack.enter_context(switches.override(**values))


@pytest.fixture(scope="session")
def cuda_emulation_library(tmp_path_factory) -> str:
    """Path of the cuda backend's kernels built for the CPU by the host emulation
    (``csrc/emu/build_emu.py``), built once per session; skips without g++."""
    if shutil.which("g++") is None:
        pytest.skip("host emulation of the cuda backend needs g++")
    return str(load_script("csrc/emu/build_emu.py").build(tmp_path_factory.mktemp("cuda_emu")))


@pytest.fixture
def on_backend(request, switch):
    """Select the backend named by the test's ``backend`` parameter: the cuda one through the
    host emulation, the triton one under the interpreter (skipped without triton)."""
    name = request.getfixturevalue("backend")
    if name == "cuda":
        switch(cuda_emulation_library=request.getfixturevalue("cuda_emulation_library"))
    if name == "triton":
        pytest.importorskip("triton")
    return name


class BackendUnavailable(pytest.skip.Exception):
    """A skip because a backend, its library or the GPU is missing on this machine (not because
    the test does not apply here). Raise it through :func:`require_backend` / :func:`skip_unavailable`
    (or mark the test ``gpu``): under ``MODWEIGHTS_REQUIRE`` it is a failure, any other skip stays a skip."""


def skip_unavailable(reason: str):
    """Skip the running test because something it needs is missing here (:class:`BackendUnavailable`);
    the skip is reported at the test, not here."""
    raise BackendUnavailable(reason, _use_item_location=True)


def require_backend(name: str, device) -> None:
    """Skip the running test (:class:`BackendUnavailable`) unless backend ``name`` runs on ``device``."""
    from modweights import backends

    st = backends.status(name, device)
    if not st.available:
        skip_unavailable(f"{name} backend unavailable: {st.reason}")


#: what ``pytest -m "not slow"`` leaves out (docs/testing.md): every test of the cuda backend's
#: host emulation (it uses this fixture, or ``on_backend`` with backend "cuda"), and these files and tests
SLOW_FIXTURES = ("cuda_emulation_library",)
SLOW_FILES = ("test_compile.py", "test_examples.py")  # torch.compile, the examples run end to end
SLOW_NAMES = ("test_dry_run", "test_gpu_path_plumbing")  # the GPU check's script end to end (tests/test_gpu_check.py)


def _slow(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    emulated = "on_backend" in getattr(item, "fixturenames", ()) and params.get("backend") == "cuda"
    return (emulated or any(f in getattr(item, "fixturenames", ()) for f in SLOW_FIXTURES)
            or item.path.name in SLOW_FILES or any(item.name.startswith(n) for n in SLOW_NAMES))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _slow(item):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and not torch.cuda.is_available():
        skip_unavailable("needs a CUDA device")


# ----------------------------------------------------------------------------- shared tests


def torch_matches_reference_test(cases, plans):
    """The test that the torch backend matches the reference (outputs and every gradient) on
    each of one op's ``cases``, in float64 and float32, with the counted plan and with each of
    ``plans`` forced where both formulations exist (:func:`modweights.testing.with_plans`).
    tests/test_mod_linear.py and tests/test_mod_conv2d.py bind it to their op's cases."""
    from modweights import testing as T

    params = T.with_plans(cases, plans)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    @pytest.mark.parametrize("case,plan", params, ids=[f"{c.id}-plan={p or 'auto'}" for c, p in params])
    def test(case, plan, dtype):
        with switches.override(torch_plan=plan):
            T.assert_matches_reference(case, "torch", dtype)

    return test


# ----------------------------------------------------------------------------- the layers


@dataclass(frozen=True)
class LayerCase:
    """One layer configuration the layer tests share (float32, CPU).

    ``make(**kw)`` builds it (``kw``: more constructor keywords, overriding the case's);
    ``x(B)`` draws its input for a batch of B and ``args(B)`` the conditioning arguments after
    ``x`` (a list); ``out`` is the output shape at the case's batch ``B``; ``twin`` is the
    ``torch.nn`` layer it stands in for ("linear", "conv1d", "conv2d"), whose protocol
    tests/test_conformance.py holds it to; ``latent`` the size of the latent it reads from
    ``condition`` (0: none); ``plain``: built by its constructor (not by ``convert``), so
    ``reset_parameters`` reproduces construction."""

    make: Callable
    x: Callable
    args: Callable
    out: tuple
    twin: str
    B: int = 2
    latent: int = 0
    plain: bool = True

    def inputs(self) -> tuple:
        """``(x, *args)`` for one call at the case's batch size."""
        return (self.x(self.B), *self.args(self.B))

    @property
    def conv(self) -> bool:
        return self.twin != "linear"


def _layer(cls: str, *args, x, out, twin, cond=None, B=2, **defaults) -> LayerCase:
    """A layer built by its constructor; ``cond``: the size of its second argument (a latent
    ``w`` or a router input), None when it takes none."""
    def make(**kw):
        from modweights import nn as MN  # at call time: after TRITON_INTERPRET is set above
        return getattr(MN, cls)(*args, **{**defaults, **kw})
    return LayerCase(make, x, (lambda b: [torch.randn(b, cond)]) if cond else (lambda b: []), out, twin, B)


def _converted(to: str, src: Callable, x, out, twin, latent=0, **kw) -> LayerCase:
    """The layer ``convert`` makes of ``src()``, moved off its conversion point (random styles,
    distinct experts) so that gradients of the latent and of the router are not zero."""
    def make():
        from torch import nn
        from modweights.convert import convert
        model = nn.Sequential(src())
        convert(model, to=to, **kw)
        layer = model[0]
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn_like(p))
        return layer
    return LayerCase(make, x, lambda b: [], out, twin, latent=latent, plain=False)


def _lin(b):
    return torch.randn(b, 7, 6)


def _c1(b):
    return torch.randn(b, 4, 9)


def _c2(b):
    return torch.randn(b, 4, 6, 6)


#: one configuration of every layer class (adding a layer: one line here); the layer tests
#: (tests/test_nn.py, tests/test_state.py, tests/test_layers_api.py, tests/test_conformance.py)
#: run each of them
LAYERS = {
    "ModulatedLinear": _layer("ModulatedLinear", 6, 5, 4, cond=4, x=_lin, out=(3, 7, 5), twin="linear", B=3),
    "MixtureLinear": _layer("MixtureLinear", 6, 5, 3, x=_lin, out=(3, 7, 5), twin="linear", B=3),
    "ModulatedConv2d": _layer("ModulatedConv2d", 4, 5, 3, 6, padding=1, cond=6, x=_c2, out=(2, 5, 6, 6),
                              twin="conv2d"),
    "MixtureConv2d": _layer("MixtureConv2d", 4, 6, 3, 3, padding=1, bias=True, x=_c2, out=(2, 6, 6, 6),
                            twin="conv2d"),
    "ModulatedConv1d": _layer("ModulatedConv1d", 4, 5, 3, 6, padding=1, cond=6, x=_c1, out=(2, 5, 9),
                              twin="conv1d"),
    "MixtureConv1d": _layer("MixtureConv1d", 4, 6, 3, 3, padding=1, x=_c1, out=(2, 6, 9), twin="conv1d"),
}

#: more configurations of the same classes, for the shape, backend-agreement and protocol tests
LAYER_VARIANTS = {
    "ModulatedLinear-2d": _layer("ModulatedLinear", 6, 5, 4, demodulate=False, cond=4,
                                 x=lambda b: torch.randn(b, 6), out=(3, 5), twin="linear", B=3),
    "MixtureLinear-token": _layer("MixtureLinear", 6, 5, 3, routing_mode="token", routing="sigmoid", x=_lin,
                                  out=(3, 7, 5), twin="linear", B=3),
    "MixtureLinear-cond": _layer("MixtureLinear", 6, 5, 3, routing_features=2, cond=2, x=_lin, out=(3, 7, 5),
                                 twin="linear", B=3),
    "MixtureLinear-nobias": _layer("MixtureLinear", 6, 5, 3, bias=False, x=_lin, out=(3, 7, 5), twin="linear", B=3),
    "MixtureConv2d-stride": _layer("MixtureConv2d", 4, 6, 3, 3, padding=1, stride=2, bias=True,
                                   x=lambda b: torch.randn(b, 4, 7, 7), out=(2, 6, 4, 4), twin="conv2d"),
    "MixtureConv2d-depthwise": _layer("MixtureConv2d", 4, 4, 3, 2, padding=1, groups=4, routing="softmax",
                                      x=lambda b: torch.randn(b, 4, 5, 5), out=(2, 4, 5, 5), twin="conv2d"),
    "MixtureConv2d-nobias": _layer("MixtureConv2d", 4, 6, 3, 2, padding=1, bias=False, x=_c2, out=(2, 6, 6, 6),
                                   twin="conv2d"),
    "MixtureConv2d-cond": _layer("MixtureConv2d", 4, 6, 3, 2, padding=1, routing_features=5, stride=2, cond=5,
                                 x=_c2, out=(2, 6, 3, 3), twin="conv2d"),
    "MixtureConv1d-depthwise": _layer("MixtureConv1d", 4, 4, 5, 2, padding=2, groups=4, stride=2, x=_c1,
                                      out=(2, 4, 5), twin="conv1d"),
}


def _nn(cls: str, *args, **kw) -> Callable:
    def make():
        from torch import nn
        return getattr(nn, cls)(*args, **kw)
    return make


#: layers made by ``convert`` from their torch.nn twin (tests/test_conformance.py)
CONVERTED = {
    "Converted-mixture-conv": _converted("mixture", _nn("Conv2d", 4, 5, 3, padding=1), x=_c2, out=(2, 5, 6, 6),
                                         twin="conv2d", num_experts=2),
    "Converted-mixture-conv-latent": _converted("mixture", _nn("Conv2d", 4, 5, 3, padding="same"), x=_c2,
                                                out=(2, 5, 6, 6), twin="conv2d", latent=3, num_experts=2,
                                                style_features=3),
    "Converted-modulated-conv": _converted("modulated", _nn("Conv2d", 4, 5, 3, padding=1, padding_mode="reflect"),
                                           x=_c2, out=(2, 5, 6, 6), twin="conv2d", latent=3, style_features=3),
    "Converted-mixture-conv1d-latent": _converted("mixture", _nn("Conv1d", 4, 5, 3, padding=1), x=_c1,
                                                  out=(2, 5, 9), twin="conv1d", latent=3, num_experts=2,
                                                  style_features=3),
    "Converted-modulated-conv1d": _converted("modulated", _nn("Conv1d", 4, 5, 3, padding="same", padding_mode="circular"),
                                             x=_c1, out=(2, 5, 9), twin="conv1d", latent=3, style_features=3),
    "Converted-modulated-linear": _converted("modulated", _nn("Linear", 6, 5), x=_lin, out=(2, 7, 5), twin="linear",
                                             latent=3, style_features=3),
}


# ----------------------------------------------------------------------------- MODWEIGHTS_REQUIRE
# MODWEIGHTS_REQUIRE=triton,cuda (the GPU check sets it): those backends must be available on
# this machine's device (else the run still runs every test, says which is missing and why, and
# exits 1), and a test skipped because a backend or the GPU is unavailable fails instead.
# Without it, such tests skip, as everywhere else.

REQUIRE_ENV = "MODWEIGHTS_REQUIRE"


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
    if call.excinfo is not None and call.excinfo.errisinstance(BackendUnavailable):
        rep.outcome = "failed"
        rep.longrepr = f"{REQUIRE_ENV} is set, so this skip is a failure: {reason}"
