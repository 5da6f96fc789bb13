"""The examples run end to end: each with ``--quick`` in a subprocess, checking the exit code,
the ``RESULT`` line and the plots.

The four subprocesses start together (one module-scoped fixture) so that their start-up
(importing torch, scikit-learn, matplotlib) overlaps; each test then checks one of them.
Needs scikit-learn and matplotlib (the ``examples`` extra); skipped without them.
"""
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 300  # generous: the quick runs take seconds, but CI machines are shared

# example -> (plots it writes, keys its RESULT line must have)
EXPECTED = {
    "weights_of_weights": (
        ["weights_of_weights_coeffs.png", "weights_of_weights_curves.png"],
        ["mixture_acc", "plain_acc", "mixture_params", "plain_params", "coeff_spread", "seeds"],
    ),
    "transfer_learning": (
        ["transfer_learning.png"],
        ["feature_extraction_acc", "finetune_acc", "modulation_acc", "modulation_params", "finetune_params", "seeds"],
    ),
    "input_modulation": (
        ["input_modulation_acc.png", "input_modulation_inputs.png"],
        ["max_diff", "clean_acc", "inverted_before", "inverted_styles", "seeds"],
    ),
    "parameter_sharing": (
        ["parameter_sharing.png"],
        ["shared_bank_acc", "own_banks_acc", "plain_acc", "shared_bank_params", "plain_params", "seeds"],
    ),
}

RESULT_RE = re.compile(r"^RESULT (?P<name>[a-z_]+)(?P<pairs>( [A-Za-z_][A-Za-z0-9_]*=\S+)+)$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("MODWEIGHTS_BACKEND", "TRITON_INTERPRET")}
    procs = {}
    for name in EXPECTED:
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--seeds", "1", "--out", str(out)]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        cwd=EXAMPLES.parent), out, time.perf_counter())
    results = {}
    for name, (p, out, t0) in procs.items():
        try:
            stdout, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        results[name] = (p.returncode, stdout, out)
    return results


def parse_result(stdout: str):
    lines = stdout.strip().splitlines()
    assert lines, "no output"
    m = RESULT_RE.match(lines[-1])
    assert m, f"last line is not `RESULT <example> key=value ...`: {lines[-1]!r}"
    pairs = dict(kv.split("=", 1) for kv in m.group("pairs").split())
    return m.group("name"), pairs


@pytest.mark.parametrize("name", list(EXPECTED))
def test_example_quick(runs, name):
    rc, stdout, out = runs[name]
    assert rc == 0, f"{name} --quick exited with {rc}:\n{stdout[-3000:]}"
    got_name, pairs = parse_result(stdout)
    assert got_name == name
    plots, keys = EXPECTED[name]
    missing = [k for k in keys if k not in pairs]
    assert not missing, f"RESULT line lacks {missing}: {stdout.strip().splitlines()[-1]}"
    for k, v in pairs.items():
        assert math.isfinite(float(v)), f"{k}={v} is not a finite number"
    for key, v in pairs.items():
        if key.endswith("_acc") or key in ("clean_acc",):
            assert 0.0 <= float(v) <= 1.0, f"{key}={v} is not an accuracy"
    for plot in plots:
        path = Path(out) / plot
        assert path.is_file() and path.stat().st_size > 0, f"{name} did not write {plot}"
    if name == "input_modulation":
        # modulated_linear without demodulation is exactly F.linear(x * s, W)
        assert float(pairs["max_diff"]) < 1e-4


def _run_example(name: str, *args: str) -> dict:
    """Run ``examples/<name>.py`` with ``args``; its RESULT line as a dict of floats."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODWEIGHTS_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(EXAMPLES.parent) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], capture_output=True, text=True,
                       env=env, cwd=EXAMPLES.parent, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stdout + p.stderr
    line = [l for l in p.stdout.splitlines() if l.startswith(f"RESULT {name} ")]
    assert len(line) == 1, p.stdout
    return {k: float(v) for k, v in (kv.split("=") for kv in line[0].split()[2:])}


@pytest.mark.slow
def test_stylegan2_generator_example_trains():
    """The generator of modulated convolutions learns (its loss falls) and its styles matter
    (two latents give two different images)."""
    r = _run_example("stylegan2_generator", "--steps", "30")
    assert r["last_loss"] < r["first_loss"] and r["latent_diff"] > 0.01, r


@pytest.mark.slow
def test_condconv_cnn_example_trains():
    """The CondConv CNN beats chance (10 classes) after 3 epochs, and its images get different
    mixtures of the experts."""
    r = _run_example("condconv_cnn", "--epochs", "3")
    assert r["test_acc"] > 0.3 and r["coeff_spread"] > 0, r


@pytest.mark.slow
def test_smear_lm_quick():
    """examples/smear_lm.py (transformers, no scikit-learn): after fine-tuning, the causal LM's
    outputs read no later token, cached generation equals full forward passes, and padding
    leaves the encoder classifier's logits unchanged."""
    pytest.importorskip("transformers")
    env = {k: v for k, v in os.environ.items() if k not in ("MODWEIGHTS_BACKEND", "TRITON_INTERPRET")}
    p = subprocess.run([sys.executable, str(EXAMPLES / "smear_lm.py"), "--quick"], capture_output=True, text=True,
                       env=env, cwd=EXAMPLES.parent, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    name, pairs = parse_result(p.stdout)
    assert name == "smear_lm"
    r = {k: float(v) for k, v in pairs.items()}
    assert r["causal_leak"] == 0.0 and r["cache_equal"] == 1.0
    assert r["padding_diff"] < 1e-5
    assert r["lm_loss_after"] < r["lm_loss_before"] and r["cls_acc"] > r["majority_acc"]
