"""The suite's own conventions (tests/conftest.py): under MODWEIGHTS_REQUIRE only a typed
"backend unavailable" skip fails, ``-m "not slow"`` leaves out the slow groups, and tests force
code paths only through the test-only switches (modweights/_switches.py)."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


# ----------------------------------------------------------------------------- test-only switches

#: the module globals tests once set with monkeypatch.setattr, and the switch that replaced each
OLD_GLOBALS = {
    "FORCE_PLAN": "torch_plan", "DEMOD_CHUNK_ELEMS": "torch_demod_chunk_elems", "_tau": "torch_demod_threshold",
    "EXACT_HOOK": "torch_demod_exact_hook", "FORCE_MIX_B": "triton_mix_b",
    "FORCE_WEIGHT_STACKED": "triton_weight_stacked", "FORCE_SPLIT": "triton_split",
    "DEMOD_IN_LOOP_MAX_T": "triton_demod_in_loop_max_t", "CHANNELS_LAST": "triton_conv2d_channels_last",
    "BANK_RELAYOUT": "triton_conv2d_bank_relayout", "MAX_BLOCK_K": "triton_conv2d_max_block_k",
    "MAX_ELEMENTS": "triton_conv2d_max_elements", "EMULATION_LIBRARY": "cuda_emulation_library",
    "DECODE_ROWS": "cuda_decode_rows",
}
PACKAGE_DIRS = ("modweights", "triton_kernels")


def _sources(*dirs):
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            if "triton_kernels" not in path.relative_to(ROOT).parts[1:]:  # the installed-layout link
                yield path, path.read_text()


def _attribute_sets(tree):
    """``(line, attribute name)`` of every ``setattr(obj, "NAME", ...)`` / ``monkeypatch.setattr``
    call and every ``obj.NAME = ...`` assignment in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            f = node.func
            if getattr(f, "id", None) == "setattr" or getattr(f, "attr", None) == "setattr":
                yield node.lineno, node.args[1].value
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute):
                yield node.lineno, t.attr


def test_no_test_sets_a_switch_global():
    """Tests (benchmarks, the kernel sweep) force paths through modweights/_switches.py only: none
    sets one of the globals the switches replaced, or any FORCE_* attribute, by monkeypatch or
    assignment."""
    from modweights import _switches as switches

    assert set(OLD_GLOBALS.values()) <= set(switches.SWITCHES)
    bad = [f"{path.relative_to(ROOT)}:{line}: sets {name}" + (f" (use the switch {OLD_GLOBALS[name]!r})"
                                                              if name in OLD_GLOBALS else "")
           for path, text in _sources("tests", "benchmarks", *PACKAGE_DIRS)
           for line, name in _attribute_sets(ast.parse(text))
           if name in OLD_GLOBALS or str(name).startswith("FORCE_")]
    assert not bad, "\n".join(bad)


def test_package_has_no_force_globals():
    """No module of the package defines a FORCE_* global or one of the removed test hooks."""
    removed = {"EXACT_HOOK", "EMULATION_LIBRARY", "CHANNELS_LAST", "BANK_RELAYOUT"}
    bad = []
    for path, text in _sources(*PACKAGE_DIRS):
        for node in ast.parse(text).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {t.id}" for t in targets
                    if isinstance(t, ast.Name) and (t.id.startswith("FORCE_") or t.id in removed)]
    assert not bad, ("module globals that tests would set; declare a switch in modweights/_switches.py:\n"
                     + "\n".join(bad))


def test_every_switch_is_read_where_declared():
    """Each declared switch is read (``switches.get("name"``) in the modules its declaration names,
    and every switch the package reads is declared."""
    from modweights import _switches as switches

    read = {}
    for path, text in _sources(*PACKAGE_DIRS):
        if path.name == "_switches.py":  # its docstring's examples
            continue
        for name in re.findall(r'switches\.get\("(\w+)"', text):
            read.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert set(read) <= set(switches.SWITCHES), set(read) - set(switches.SWITCHES)
    for s in switches.SWITCHES.values():
        assert read.get(s.name) == set(s.where.split(", ")), (s.name, read.get(s.name), s.where)


def test_switch_table_in_testing_md_matches_the_declarations():
    """docs/testing.md lists every switch as declared (``python -m modweights._switches`` prints the table)."""
    from modweights import _switches as switches

    assert switches.markdown() in (ROOT / "docs" / "testing.md").read_text(), (
        "docs/testing.md's switch table is stale: paste the output of `python -m modweights._switches`")


BAD_SETTINGS = [
    (dict(torch_plam="form"), TypeError, r"no switch named 'torch_plam'; declared: torch_plan, "),
    (dict(triton_split=True), TypeError, r"'triton_split' takes a value of type int \(or None: unset\); got True"),
    (dict(triton_mix_b=1), TypeError, r"switch 'triton_mix_b' takes a value of type bool .*; got 1"),
    (dict(torch_plan="formed"), ValueError, r"switch 'torch_plan' must be one of 'stacked', 'form'"),
    (dict(triton_split=0), ValueError, r"switch 'triton_split' must be at least 1; got 0"),
    (dict(torch_demod_exact_hook="print"), TypeError, r"'torch_demod_exact_hook' takes a value of type callable"),
]


@pytest.mark.parametrize("values,error,match", BAD_SETTINGS, ids=[next(iter(v)) for v, _, _ in BAD_SETTINGS])
def test_override_rejects_unknown_names_and_bad_values(values, error, match):
    from modweights import _switches as switches

    with pytest.raises(error, match=match):
        with switches.override(**values):
            pass


def test_override_restores_and_nests():
    from modweights import _switches as switches

    # a rejected override changes nothing, also where its other names were valid
    with pytest.raises(TypeError):
        with switches.override(torch_plan="form", triton_split="2"):
            pass
    assert switches.get("torch_plan") is None and switches.get("triton_split", 7) == 7
    with switches.override(torch_plan="form", torch_demod_threshold=-float("inf")):
        assert switches.get("torch_plan") == "form"
        with switches.override(torch_plan="stacked"):
            assert switches.get("torch_plan") == "stacked"
        assert switches.get("torch_plan") == "form"
        with pytest.raises(RuntimeError):
            with switches.override(torch_plan=None):
                assert switches.get("torch_plan") is None
                raise RuntimeError
        assert switches.get("torch_plan") == "form"
    assert switches.get("torch_plan") is None and switches.get("torch_demod_threshold") is None


def test_switch_fixture_sets_until_the_test_ends(switch):
    from modweights import _switches as switches
    from modweights.backends import torch_backend

    switch(torch_plan="stacked")
    assert torch_backend.mod_linear_plan(16, 256, 512, 512, 4, False, False) == "stacked"  # counted: form
    switch(torch_plan="form")
    assert switches.get("torch_plan") == "form"
    with pytest.raises(TypeError, match="no switch named 'plan'"):
        switch(plan="form")


def test_no_op_dispatch_outside_op_files():
    """Issue 22's rule: the shared code asks the op registry (modweights/ops/<op>.py), it never
    branches on an op's name (``op == "mod_conv2d"``, ``isinstance(cfg, ModConv2dConfig)``).
    Every module of the package and of triton_kernels/ but the op specs is checked."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for d in ("modweights", "triton_kernels") for p in sorted((root / d).rglob("*.py"))
             if "ops" not in p.relative_to(root).parts and "triton_kernels" not in p.relative_to(root / d).parts]
    pattern = re.compile(r"\bop\s*[!=]=|[!=]=\s*[\"']mod_\w+[\"']|isinstance\(\w+,\s*Mod\w*Config")
    hits = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert len(files) > 40 and not hits, hits
