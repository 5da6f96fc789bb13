"""`auto`'s measured preferences: shape classes, the table file, the lookup, the fallback,
and the command that measures the table (which refuses without a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modweights import backends
from modweights import functional as MF
from modweights.backends import auto_table as AT
from modweights.benchmarking import auto_table as MEASURE
from modweights.benchmarking.workloads import WORKLOADS
from modweights.verify import problem_kwargs

H100 = ("NVIDIA H100 80GB HBM3", (9, 0))
ROOT = Path(__file__).resolve().parent.parent


def entry(**kw):
    e = {"device": "H100", "capability": [9, 0], "op": "mod_linear", "class": "per-sample-many-rows",
         "dtype": "bfloat16", "backend": "cuda", "measured": {"cuda_ms": 1.0, "triton_ms": 1.5, "torch_ms": 2.0}}
    e.update(kw)
    return e


@pytest.fixture
def table(tmp_path, monkeypatch):
    """write(entries or a raw object) -> the path, installed as MODWEIGHTS_AUTO_TABLE."""
    monkeypatch.delenv("MODWEIGHTS_BACKEND", raising=False)

    def write(content, name="mine.json"):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else
                        json.dumps(content if isinstance(content, dict) else {"format": 1, "entries": content}))
        monkeypatch.setenv(AT.ENV, str(path))
        AT.clear_cache()
        return path

    AT.clear_cache()
    yield write
    AT.clear_cache()


# ----------------------------------------------------------------------------- shape classes


@pytest.mark.parametrize("problem, expected", [
    (dict(rows=1, per_token=False), "decode"),
    (dict(rows=1, per_token=True), "decode"),  # one row: per token is per sample
    (dict(rows=2, per_token=True), "per-token"),
    (dict(rows=1024, per_token=True), "per-token"),
    (dict(rows=256, per_token=False), "per-sample-many-rows"),
    (dict(rows=255, per_token=False), "per-sample-few-rows"),
    (dict(rows=49, per_token=False), "per-sample-few-rows"),
    (dict(rows=None, per_token=False), None),  # symbolic under torch.compile
    (dict(per_token=True), None),  # a caller that does not pass rows
], ids=lambda v: str(v))
def test_linear_shape_class(problem, expected):
    assert AT.shape_class("mod_linear", dict(problem, dtype=torch.bfloat16)) == expected


def test_conv2d_has_one_class():
    assert AT.shape_class("mod_conv2d", dict(dtype=torch.float32, groups=1, kernel_size=(3, 3))) == "per-sample"
    assert AT.shape_class("attention", {}) is None


def test_functional_passes_rows_per_sample(monkeypatch):
    seen = []
    real = backends._auto

    def spy(op, device, problem):
        seen.append(dict(problem))
        return real(op, device, problem)

    monkeypatch.delenv("MODWEIGHTS_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_auto", spy)
    bank = torch.randn(2, 4, 3)
    MF.mixture_linear(torch.randn(5, 3), bank, torch.rand(5, 2))  # 2-D: one row per sample
    MF.mixture_linear(torch.randn(2, 7, 3), bank, torch.rand(2, 2))
    MF.mixture_linear(torch.randn(2, 7, 3), bank, torch.rand(2, 7, 2))
    assert [(p["rows"], p["per_token"]) for p in seen] == [(1, False), (7, False), (7, True)]
    assert [AT.shape_class("mod_linear", p) for p in seen] == ["decode", "per-sample-few-rows", "per-token"]


@pytest.mark.parametrize("cls", list(MEASURE.CLASS_WORKLOADS))
def test_each_class_is_measured_on_a_workload_of_that_class(cls):
    case = WORKLOADS[MEASURE.CLASS_WORKLOADS[cls]].case
    assert AT.shape_class(case.op, problem_kwargs(case, torch.bfloat16)) == cls


# ----------------------------------------------------------------------------- lookup


def test_lookup_matches_device_capability_op_class_dtype(table):
    table([entry(), entry(**{"class": "decode", "backend": "triton", "device": "h100"})])
    many = dict(dtype=torch.bfloat16, per_token=False, rows=1024)
    assert AT.preferred("mod_linear", "cuda", many, facts=H100) == "cuda"
    assert AT.preferred("mod_linear", "cuda", dict(many, rows=1), facts=H100) == "triton"  # name: any case
    assert AT.preferred("mod_linear", "cuda", dict(many, rows=49), facts=H100) is None  # class not measured
    assert AT.preferred("mod_linear", "cuda", dict(many, dtype=torch.float16), facts=H100) is None
    assert AT.preferred("mod_linear", "cuda", dict(many, rows=None), facts=H100) is None
    assert AT.preferred("mod_conv2d", "cuda", dict(dtype=torch.bfloat16, groups=1), facts=H100) is None
    assert AT.preferred("mod_linear", "cuda", many, facts=("NVIDIA H100 80GB HBM3", (8, 0))) is None
    assert AT.preferred("mod_linear", "cuda", many, facts=("NVIDIA A100-SXM4-80GB", (9, 0))) is None
    # only CUDA devices have entries
    assert AT.preferred("mod_linear", "cpu", many) is None


def test_users_table_comes_before_the_packaged_one(table, tmp_path, monkeypatch):
    packaged = tmp_path / "packaged.json"
    packaged.write_text(json.dumps({"format": 1, "entries": [entry(backend="torch"), entry(device="", **{
        "class": "decode"}, backend="torch")]}))
    monkeypatch.setattr(AT, "PACKAGED", packaged)
    table([entry(backend="triton")])
    many = dict(dtype=torch.bfloat16, per_token=False, rows=1024)
    assert AT.preferred("mod_linear", "cuda", many, facts=H100) == "triton"
    assert AT.preferred("mod_linear", "cuda", dict(many, rows=1), facts=H100) == "torch"  # "" matches any name
    monkeypatch.delenv(AT.ENV)
    AT.clear_cache()
    assert AT.preferred("mod_linear", "cuda", many, facts=H100) == "torch"


# ----------------------------------------------------------------------------- auto


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(AT, "device_facts", lambda device: H100)
    return torch.device("cuda")


def _auto(device, **problem):
    return backends.resolve(None, "mod_linear" if "rows" in problem else "mod_conv2d", device, **problem).NAME


def test_auto_takes_the_measured_backend(table, fake_gpu):
    table([entry(backend="reference", dtype="float32", measured={"reference_ms": 0.5, "torch_ms": 1.0},
                 **{"class": "decode"})])
    assert _auto(fake_gpu, dtype=torch.float32, per_token=False, rows=1) == "reference"
    name, why = backends.auto_choice("mod_linear", fake_gpu, dict(dtype=torch.float32, per_token=False, rows=1))
    assert name == "reference"
    assert "measured fastest for NVIDIA H100 80GB HBM3 (sm 9.0), mod_linear, decode, float32" in why
    assert "reference 0.5 ms, torch 1 ms" in why
    # no entry for this class: torch, and the reason names the key that has no entry
    assert _auto(fake_gpu, dtype=torch.float32, per_token=False, rows=300) == "torch"
    name, why = backends.auto_choice("mod_linear", fake_gpu, dict(dtype=torch.float32, per_token=False, rows=300))
    assert name == "torch" and "no entry for NVIDIA H100 80GB HBM3 (sm 9.0), mod_linear, per-sample-many-rows" in why


def test_auto_on_cuda_without_a_measurement_is_torch_even_where_triton_runs(table, fake_gpu, monkeypatch):
    """No entry: the fused kernels are not taken on trust, however available they are."""
    monkeypatch.setattr(backends, "status", lambda name, device=None: backends.BackendStatus(True, "pretend"))
    table([])
    for problem in (dict(dtype=torch.bfloat16, per_token=False, rows=1024),
                    dict(dtype=torch.float16, per_token=True, rows=7)):
        assert _auto(fake_gpu, **problem) == "torch"
    assert _auto(fake_gpu, dtype=torch.bfloat16, groups=1, kernel_size=(3, 3)) == "torch"
    # a measured win: taken
    table([entry(backend="triton")])
    assert _auto(fake_gpu, dtype=torch.bfloat16, per_token=False, rows=1024) == "triton"


def test_auto_choice_reasons_off_cuda_and_for_a_measured_torch(table, fake_gpu):
    name, why = backends.auto_choice("mod_linear", "cpu", dict(dtype=torch.float32, per_token=False, rows=3))
    assert name == "torch" and why.startswith("cpu tensors")
    table([entry(backend="torch")])
    name, why = backends.auto_choice("mod_linear", fake_gpu, dict(dtype=torch.bfloat16, per_token=False, rows=1024))
    assert name == "torch" and "measured fastest" in why and "cuda 1 ms" in why


def test_auto_falls_back_when_the_measured_backend_is_unavailable(table, fake_gpu, monkeypatch):
    real = backends.status
    monkeypatch.setattr(backends, "status", lambda name, device=None: (
        backends.BackendStatus(False, "pretend: not built") if name == "cuda" else real(name, device)))
    table([entry(dtype="float32", **{"class": "decode"})])
    assert _auto(fake_gpu, dtype=torch.float32, per_token=False, rows=1) == "torch"
    _, why = backends.auto_choice("mod_linear", fake_gpu, dict(dtype=torch.float32, per_token=False, rows=1))
    assert "the table's cuda" in why and "unavailable: pretend: not built" in why


def test_auto_falls_back_when_the_measured_backend_does_not_support_the_problem(table, fake_gpu, monkeypatch):
    real = backends.status
    monkeypatch.setattr(backends, "status", lambda name, device=None: (
        backends.BackendStatus(True, "pretend") if name == "cuda" else real(name, device)))
    table([entry(dtype="float32", **{"class": "decode"}),
           entry(op="mod_conv2d", dtype="float32", **{"class": "per-sample"})])
    assert _auto(fake_gpu, dtype=torch.float32, per_token=False, rows=1) == "cuda"
    ok, _ = backends.load("cuda").supports("mod_conv2d", dtype=torch.float32)
    assert not ok
    assert _auto(fake_gpu, dtype=torch.float32, groups=1, kernel_size=(3, 3)) == "torch"


def test_auto_on_cpu_never_reads_the_table(table):
    table("not json")
    assert _auto(torch.device("cpu"), dtype=torch.float32, per_token=False, rows=1) == "torch"


# ----------------------------------------------------------------------------- the file


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"format": 2, "entries": []}, "'format' must be 1"),
    ({"format": 1, "entries": {}}, "'entries' must be a list"),
    ([{k: v for k, v in entry().items() if k != "backend"}], r"entries\[0\] lacks 'backend'"),
    ([entry(), entry(backend="fast")], r"entries\[1\].backend must be one of"),
    ([entry(**{"class": "prefill"})], r"entries\[0\].class must be one of"),
    ([entry(op="mod_conv2d")], r"class must be one of per-sample for mod_conv2d"),
    ([entry(capability="9.0")], r"capability must be \[major, minor\]"),
    ([entry(dtype="torch.bfloat16")], "dtype must be one of"),
    ([entry(device=None)], "device must be a string"),
    ([entry(measured={"workload": "W2a"})], "at least one positive '<backend>_ms'"),
    ([entry(measured={"triton_ms": 1.0, "torch_ms": 2.0})], r"lacks 'cuda_ms', the time of the backend"),
    ([entry(measured={"cuda_ms": 1.0})], r"names 'cuda' but measured.torch_ms \(None\) is missing"),
    ([entry(measured={"cuda_ms": 2.0, "torch_ms": 1.5})], "only a measured win over torch counts"),
], ids=["json", "object", "format", "entries", "missing", "backend", "class", "conv-class", "capability",
        "dtype", "device", "measured", "own-time", "no-torch", "slower-than-torch"])
def test_malformed_table_is_an_error_naming_the_file(table, content, message):
    if isinstance(content, list) and content and not isinstance(content[0], dict):
        content = json.dumps(content)  # a top-level array, not an entries list
    path = table(content)
    many = dict(dtype=torch.bfloat16, per_token=False, rows=1024)
    with pytest.raises(ValueError, match=message) as e:
        AT.preferred("mod_linear", "cuda", many, facts=H100)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match=message):  # not cached away: every lookup says so
        AT.preferred("mod_linear", "cuda", many, facts=H100)


def test_missing_table_file_is_an_error(table, tmp_path, monkeypatch):
    monkeypatch.setenv(AT.ENV, str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"nope\.json: cannot read it"):
        AT.preferred("mod_linear", "cuda", dict(dtype=torch.bfloat16, per_token=False, rows=1), facts=H100)


def test_packaged_table_is_valid_and_installed():
    assert AT.PACKAGED.is_file()
    assert isinstance(AT.read(AT.PACKAGED), list)
    assert '"modweights.backends": ["auto_table.json"]' in (ROOT / "setup.py").read_text()
    assert AT._BACKENDS == backends.NAMES  # the validator's copy of the registry's names


# ----------------------------------------------------------------------------- the command


def test_measuring_command_refuses_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    out = tmp_path / "t.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "modweights.benchmarking.auto_table", "--device", "cuda",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no CUDA device is available" in r.stderr
    assert not out.exists()
    assert MEASURE.main(["--device", "cpu", "--out", str(out)]) == 2
    assert not out.exists()


def test_measure_writes_a_valid_table_of_what_ran(monkeypatch):
    # the machinery on the CPU at smoke sizes (triton would run under the interpreter: left out)
    monkeypatch.setattr(MEASURE, "IMPLS", ("torch", "cuda"))
    t, records = MEASURE.measure(torch.device("cpu"), "float32", warmup=1, reps=2,
                                 classes=["decode", "per-token"], tiny=True, facts=H100)
    assert AT.validate(t, "measured") == t["entries"]
    assert [(e["class"], e["backend"], e["device"], e["capability"]) for e in t["entries"]] == [
        ("decode", "torch", H100[0], [9, 0]), ("per-token", "torch", H100[0], [9, 0])]
    for e in t["entries"]:
        m = e["measured"]
        assert m["torch_ms"] > 0 and "cuda_ms" not in m and "tiny" in m
        assert "cuda" in m["not_measured"]
    assert {r["workload"] for r in records} == {"W6-8", "W3"}
