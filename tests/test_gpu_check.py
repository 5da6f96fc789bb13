"""The GPU check (benchmarks/gpu_check.sh) without a GPU: its dry run end to end, and the pieces
it is made of (kernel discovery, the config-forcing launch wrapper, auto-table entries from bench
records, the summary, the README table, the MODWEIGHTS_REQUIRE switch)."""
import csv
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import load_script
from modweights import testing as T
from modweights.backends import auto_table as AT
from modweights.benchmarking import auto_table as MEASURE
from modweights.benchmarking import gpu_check as G
from modweights.benchmarking import kernel_sweep as KS

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("env", "install", "verify", "sweep", "tests", "sanitizer", "bench-warm", "bench", "auto-table")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_dry_run_passes_and_brings_back_at_most_8_files(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env.pop("MODWEIGHTS_REQUIRE", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.txt", "gpu_check.tar.gz", "auto_table.json", "bench.csv"} <= set(files)
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "verdict: all stages passed" in summary
    for s in STAGES:
        assert re.search(rf"^  {re.escape(s)}\s+dry-ok\s", summary, re.M), (s, summary)
    assert "W1-W7: time / dense op" in summary and re.search(r"^  W1\s+fwd\+bwd\s+\d", summary, re.M)
    # every stage left its log in the tarball, and the table is valid but labelled as no measurement
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    assert all(f"gpu_check/{s}/log.txt" in names for s in STAGES) and "gpu_check/stages.tsv" in names
    table = json.loads((out / "auto_table.json").read_text())
    assert AT.validate(table, "dry") and all("tiny" in e["measured"] for e in table["entries"])
    assert all(e["device"] == "DRY RUN (no GPU)" for e in table["entries"])
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"} and {"W1", "W4"} <= {r["workload"] for r in rows}
    # the bench stages run with --compile on, as on the GPU: the compiled reference's every pass ran
    compiled = {(r["workload"], r["pass"], r["status"]) for r in rows if r["impl"] == "compiled-reference"}
    assert compiled == {(w, p, "ok") for w in ("W1", "W2a", "W3") for p in ("fwd", "bwd", "fwd+bwd")}, compiled


def test_unknown_argument_is_refused_and_help_is_the_header():
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    r = subprocess.run(["bash", script, "--fast"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument '--fast'" in r.stderr
    r = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(f"#   {s}" in r.stdout for s in STAGES) and "set -uo" not in r.stdout


def test_the_old_per_backend_gpu_scripts_are_gone():
    for name in ("gpu_all.sh", "gpu_cuda_linear.sh", "gpu_triton_conv2d.sh", "gpu_triton_linear.py",
                 "gpu_triton_linear.sh"):
        assert not (ROOT / "benchmarks" / name).exists(), name


# ----------------------------------------------------------------------------- the sweep


def test_discovery_finds_every_autotuned_kernel_and_its_list():
    """The sweep covers every kernel registered with candidate configs, for every op whose spec
    names a Triton launcher, and only those (the fixed-tile pre-passes have nothing to sweep)."""
    from modweights import ops
    from modweights.triton_kernels import _launch as L
    kernels = KS.discover()
    tuned = [k for k in L.KERNELS.values() if k.configs]
    assert [k.name for k in kernels] == [k.name for k in tuned] and len(kernels) >= 7
    assert {k.op for k in kernels} == {s.name for s in ops.SPECS.values() if s.triton_launcher} == set(
        KS.ops_with_kernels())
    names = {k.name for k in kernels}
    assert {"_mod_linear_fwd_kernel", "_mod_linear_bwd_dx_kernel", "_mod_conv2d_bwd_weight_kernel"} <= names
    assert "_mod_linear_demod_kernel" not in names and "_mod_linear_demod_kernel" in {
        k.name for k in L.KERNELS.values()}
    for k in kernels:
        cfgs = KS.config_list(k)
        assert cfgs and all(c.num_warps >= 1 for c in cfgs), k
        assert any(KS.kept_by_prune(k, cfgs, {})), k  # the registered prune keeps at least one


def test_forcer_launches_the_target_with_the_given_tiles():
    """Under the interpreter: the wrapper runs the target kernel with the meta it is given (and
    only that one), and the answer still matches the reference."""
    ml = pytest.importorskip("modweights.triton_kernels.mod_linear_launch")
    if not ml.INTERPRETED:
        pytest.skip("interpreter only (the GPU sweep runs this for real)")
    case = T.Case("mod_linear", B=2, T=5, I=9, O=7, K=2, coeffs="sample", styles="sample", demodulate=True)
    fwd = next(k for k in KS.discover() if k.name == "_mod_linear_fwd_kernel")
    expected = T.run_case(case, "reference", torch.float32, compute_dtype=torch.float64)
    with KS.Forcer() as f:
        f.target, f.meta = fwd, dict(BLOCK_T=32, BLOCK_O=16, BLOCK_I=32, num_warps=4, num_stages=2)
        got, comps = KS._run(case, True, torch.float32, "cpu", 0, expected)
        assert f.forced == 1 and "_mod_linear_bwd_dx_kernel" in f.seen
    assert all(c.ok for c in comps), [str(c) for c in comps]
    from modweights.triton_kernels import _launch as L
    assert L.launch is f.orig  # restored


# ----------------------------------------------------------------------------- auto-table entries


def _rec(wl, impl, ms, p="fwd+bwd", dtype="bfloat16", op="mod_linear", status="ok"):
    return dict(workload=wl, impl=impl, median_ms=ms, status=status, reason="", dtype=dtype, op=op,
                shape="s", reps=10, device_name="NVIDIA H200", ratio_to_dense=None, **{"pass": p})


def test_entries_name_a_fused_backend_only_where_it_beats_torch_by_the_margin():
    env = {"date": "d", "git_commit": "c", "torch_version": "t", "triton_version": "tr"}
    recs = [_rec("W2a", "torch", 10.0), _rec("W2a", "triton", 8.0), _rec("W2a", "cuda", 9.0),
            _rec("W2b", "torch", 10.0), _rec("W2b", "triton", 9.9),  # within the margin: torch
            _rec("W3", "triton", 1.0),  # no torch time: no entry
            _rec("W4", "torch", 5.0, op="mod_conv2d"), _rec("W4", "triton", 1.0, op="mod_conv2d", p="fwd")]
    entries = MEASURE.entries_from_records(recs, env, ("NVIDIA H200", (9, 0)))
    got = {e["class"]: e["backend"] for e in entries}
    assert got == {"per-sample-many-rows": "triton", "per-sample-few-rows": "torch", "per-sample": "torch"}
    assert AT.validate({"format": 1, "entries": entries}, "t")
    e = entries[0]["measured"]
    assert e["triton_ms"] == 8.0 and e["torch_ms"] == 10.0 and e["commit"] == "c" and e["margin"] == MEASURE.MARGIN


def test_from_bench_refuses_results_of_another_gpu(tmp_path):
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"environment": {}, "records": [_rec("W2a", "torch", 1.0)]}))
    with pytest.raises(ValueError, match="measured on \\['NVIDIA H200'\\], not on 'NVIDIA H100'"):
        MEASURE.from_bench([str(p)], ("NVIDIA H100", (9, 0)))
    table, _ = MEASURE.from_bench([str(p)], ("NVIDIA H200", (9, 0)))
    assert [e["backend"] for e in table["entries"]] == ["torch"]


def test_packaged_table_holds_no_dry_run_entries():
    for e in AT.read(AT.PACKAGED):
        assert "tiny" not in e["measured"] and "DRY RUN" not in e["device"]


# ----------------------------------------------------------------------------- summary and README table


def test_summary_shows_each_stage_and_the_ratios(tmp_path):
    (tmp_path / "stages.tsv").write_text("verify\tpass\t80\t140\tverify OK\nsweep\ttimeout\t140\t140\tcut\n")
    bench = tmp_path / "bench" / "linear"
    bench.mkdir(parents=True)
    recs = [dict(_rec("W1", "dense", 2.0), ratio_to_dense=1.0, auto_backend="torch"),
            dict(_rec("W1", "triton", 3.0), ratio_to_dense=1.5),
            dict(_rec("W1", "naive-bmm", 8.0), ratio_to_dense=4.0)]
    (bench / "results.json").write_text(json.dumps({"environment": {}, "records": recs}))
    text = G.summary(str(tmp_path), dry=False)
    assert re.search(r"verify\s+pass\s+80 / 140\s+verify OK", text)
    assert re.search(r"W1\s+fwd\+bwd\s+2\.000\s+-\s+1\.50x\s+-\s+naive-bmm 4\.00x\s+torch", text)
    assert "NOT PASSED: sweep" in text and "DRY RUN" not in text


def _results_table():
    return load_script("benchmarks/results_table.py")


def test_results_table_says_so_when_there_is_no_gpu_result(tmp_path):
    RT = _results_table()
    (tmp_path / "benchmarks" / "results" / "gpu-cpu-only").mkdir(parents=True)
    with open(tmp_path / "benchmarks" / "results" / "gpu-cpu-only" / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["workload", "impl", "pass", "status", "device", "median_ms"])
        w.writeheader()
        w.writerow(dict(workload="W1", impl="dense", status="ok", device="cpu", median_ms=1.0, **{"pass": "fwd+bwd"}))
    assert RT.table(str(tmp_path)) == RT.NO_RESULT  # CPU rows are not GPU results
    readme = (ROOT / "README.md").read_text()
    assert f"{RT.BEGIN}\n{RT.table(str(ROOT))}\n{RT.END}" in readme  # the README is what the script writes


def test_results_table_from_a_gpu_run_names_its_source(tmp_path):
    RT = _results_table()
    d = tmp_path / "benchmarks" / "results" / "gpu-2026-12-01-h200"
    d.mkdir(parents=True)
    base = dict(status="ok", device="cuda", device_name="NVIDIA H200", date="2026-12-01", git_commit="abc",
                torch_version="2.11.0", triton_version="3.6.0", auto_backend="torch")
    rows = [dict(base, workload="W1", impl="dense", median_ms=2.0, ratio_to_dense=1.0),
            dict(base, workload="W1", impl="triton", median_ms=3.0, ratio_to_dense=1.5)]
    with open(d / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["pass"])
        w.writeheader()
        for r in rows:
            w.writerow(dict(r, **{"pass": "fwd+bwd"}))
    text = RT.table(str(tmp_path))
    assert "| W1 | fwd+bwd | 2.000 | - | 1.50x | - | - | torch |" in text
    assert "NVIDIA H200, 2026-12-01, commit abc, torch 2.11.0, Triton 3.6.0" in text


# ----------------------------------------------------------------------------- MODWEIGHTS_REQUIRE


def _pytest(args, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          capture_output=True, text=True, env=e, cwd=ROOT, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the switch where the cuda backend is missing")
def test_require_turns_an_unavailable_backend_into_a_failure():
    r = _pytest(["tests/test_backends.py"], MODWEIGHTS_REQUIRE="triton,cuda", TRITON_INTERPRET="1")
    assert r.returncode == 1 and " passed" in r.stdout  # the tests still ran: the others tell us something
    assert "MODWEIGHTS_REQUIRE: required backend(s) unavailable: cuda:" in r.stdout, r.stdout[-2000:]
    # a GPU test that would skip for want of a device fails instead
    r = _pytest(["tests/test_gpu.py"], MODWEIGHTS_REQUIRE="triton", TRITON_INTERPRET="1")
    assert r.returncode != 0 and "MODWEIGHTS_REQUIRE is set, so this skip is a failure" in r.stdout
    r = _pytest(["tests/test_backends.py"], MODWEIGHTS_REQUIRE="cuda,fast")
    assert r.returncode != 0 and "unknown backend(s) fast" in r.stdout + r.stderr


def test_no_test_monkeypatches_the_cublas_module():
    """pytest 9 undoes monkeypatch.setattr on torch.backends.cuda.matmul with delattr, an error
    at teardown: tests set and restore such flags by hand."""
    pat = re.compile(r"monkeypatch\.setattr\(\s*torch\.backends\.cuda\.matmul")
    hits = [p.name for p in (ROOT / "tests").glob("*.py") if pat.search(p.read_text())]
    assert not hits, hits


def test_verify_says_what_auto_picks():
    from modweights import verify

    report = verify.run(device="cpu", dtypes=["float32"], backend_names=["torch"], seed=1, progress=False)
    lines = verify.format_auto(report)
    assert len(lines) == 1 and lines[0].startswith(f"  auto picks torch for {len(verify.cases())} case(s): cpu")
    assert "auto picks torch" in verify.format_report(report, quiet=True)
    per_case = verify.format_auto(report, per_case=True)
    first = verify.cases()[0].id
    assert len(per_case) == len(verify.cases()) and per_case[0].startswith(f"  auto picks torch for {first} ")


def test_autotune_bound_from_the_environment_is_checked():
    from modweights.backends import triton as triton_backend

    with pytest.raises(ValueError, match="positive integer"):
        triton_backend.bound_autotune(0)
    env = dict(os.environ, MODWEIGHTS_TRITON_AUTOTUNE_MAX="three")
    r = subprocess.run([sys.executable, "-c", "import modweights.backends.triton"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "MODWEIGHTS_TRITON_AUTOTUNE_MAX must be a positive integer; got 'three'" in r.stderr


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for python3 on a GPU machine: logs its arguments and the switches it was given
echo "ARGS $* | REQUIRE=${MODWEIGHTS_REQUIRE:-} AUTOTUNE=${MODWEIGHTS_TRITON_AUTOTUNE:-} MAX=${MODWEIGHTS_TRITON_AUTOTUNE_MAX:-}"
if [ "$1 $2 $3" = "-m modweights bench" ]; then
  out=""; prev=""
  for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
  mkdir -p "$out" && echo '{"environment": {}, "records": []}' > "$out/results.json"
fi
# the sanitizer's verdict and the summary are plain Python: the real one runs them
case "$1 $2 $3" in
  "-m modweights.benchmarking.gpu_check sanitizer-verdict"|"-m modweights.benchmarking.gpu_check summary")
    exec "$REAL_PYTHON" "$@" ;;
esac
exit 0
"""

#: stands in for compute-sanitizer: FAKE_SANITIZER=clean runs the program as the real one does and
#: reports nothing; "unsupported" is what a GPU the sanitizer refuses gives (seen on gVisor-based
#: H200s: "Device not supported", then CUDA error 999); "memerror" reports an out-of-bounds read
FAKE_SANITIZER = r"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift 2; done
echo "========= COMPUTE-SANITIZER"
case "${FAKE_SANITIZER:-clean}" in
  unsupported)
    echo "========= Error: Device not supported. Please refer to the \"Supported Devices\" section of the sanitizer documentation"
    echo "RuntimeError: CUDA error: unknown error (cudaErrorUnknown, error 999)"
    echo "========= Target application returned an error"
    echo "========= ERROR SUMMARY: 1 error"
    exit 9 ;;
  memerror)
    "$@"
    echo "========= Invalid __global__ read of size 4 bytes"
    echo "=========     at _mod_linear_fwd_kernel+0x1a0"
    echo "========= ERROR SUMMARY: 1 error"
    exit 9 ;;
esac
"$@"; rc=$?
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


def _gpu_path(tmp_path, sanitizer: str):
    """The non-dry script with the stand-in python and compute-sanitizer (``sanitizer``: the
    latter's FAKE_SANITIZER mode)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "fakepy").write_text(FAKE_PYTHON)
    (bin_ / "compute-sanitizer").write_text(FAKE_SANITIZER)
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", PYTHON="fakepy", OUT=str(tmp_path / "out"),
               REAL_PYTHON=sys.executable, FAKE_SANITIZER=sanitizer)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_gpu_path_plumbing_with_a_stand_in_python(tmp_path):
    """The non-dry path of the script with a stand-in python and compute-sanitizer: every stage
    runs its commands with the intended arguments and switches, and the driver records them all."""
    r = _gpu_path(tmp_path, "clean")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "verdict: all stages passed" in r.stdout
    for s in STAGES:
        assert re.search(rf"^\[{re.escape(s)}\] pass in", r.stdout, re.M), (s, r.stdout)
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        logs = {m.name.split("gpu_check/", 1)[1]: tar.extractfile(m).read().decode()
                for m in tar.getmembers() if m.isfile() and m.name.endswith((".txt", ".log"))}
    assert "ARGS -m pip install --no-build-isolation --no-deps -e ." in logs["install/pip.log"]
    assert "gpu_check env" in logs["install/log.txt"]
    verify = [v for k, v in logs.items() if k.startswith("verify/verify-")]
    assert len(verify) == 6 and all("--device cuda" in v and "AUTOTUNE=0" in v for v in verify)
    assert "--jobs 6" in logs["sweep/log.txt"] and "AUTOTUNE=0" in logs["sweep/log.txt"]
    assert "-m pytest -m gpu -v" in logs["tests/log.txt"] and "REQUIRE=triton,cuda" in logs["tests/log.txt"]
    assert "-n 8" in logs["tests/log.txt"]
    san = [k for k in logs if k.startswith("sanitizer/") and k != "sanitizer/log.txt"]
    assert sorted(san) == ["sanitizer/memcheck-cuda-linear.txt", "sanitizer/memcheck-triton-conv2d.txt",
                           "sanitizer/memcheck-triton-linear.txt", "sanitizer/racecheck-cuda-linear.txt"]
    for stage in ("bench", "bench-warm"):
        groups = {g: logs[f"{stage}/{g}.txt"] for g in ("linear", "decode", "conv")}
        assert "--workloads W1 W2a W2b W3 --compile on" in groups["linear"]
        assert "--workloads W6 --compile off" in groups["decode"]
        assert "--workloads W4 W5 W7 --compile on" in groups["conv"]
        assert all("AUTOTUNE= MAX=2" in g for g in groups.values())  # autotuning on, bounded
    assert "--reps 20 --warmup 3" in logs["bench/linear.txt"]
    assert "auto-table" in logs["auto-table/log.txt"] and "bench/linear/results.json" in logs["auto-table/log.txt"]


@pytest.mark.parametrize("mode", ["unsupported", "memerror"])
def test_sanitizer_stage_tells_unsupported_from_a_memory_error(tmp_path, mode):
    """A sanitizer that refuses the GPU ("Device not supported", then error 999) makes the stage
    UNSUPPORTED (said in the verdict; the check exits 0); a memory error makes it FAIL (exit 1)."""
    r = _gpu_path(tmp_path, mode)
    if mode == "unsupported":
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert re.search(r"^\[sanitizer\] unsupported in", r.stdout, re.M), r.stdout
        assert "UNSUPPORTED here: sanitizer" in r.stdout and "all stages passed" not in r.stdout
    else:
        assert r.returncode == 1
        assert re.search(r"^\[sanitizer\] FAIL in", r.stdout, re.M), r.stdout
        assert "NOT PASSED: sanitizer" in r.stdout


@pytest.mark.parametrize("text, code, verdict", [
    ("========= COMPUTE-SANITIZER\nok\n========= ERROR SUMMARY: 0 errors\n", 0, "clean"),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0, "clean"),
    ("========= Error: Device not supported. See the docs\nerror 999\n========= ERROR SUMMARY: 1 error\n", 9,
     "unsupported"),
    # a finding is never hidden behind an unsupported line
    ("========= Error: Device not supported\n========= Invalid __global__ write of size 4 bytes\n", 9, "errors"),
    ("========= Invalid __shared__ read of size 2 bytes\n========= ERROR SUMMARY: 1 error\n", 9, "errors"),
    ("Traceback...\nRuntimeError: CUDA error: unknown error (error 999)\n", 1, "errors"),  # no refusal: a crash
    ("========= COMPUTE-SANITIZER\n", 0, "errors"),  # no summary: the program never ran under it
])
def test_sanitizer_verdict(text, code, verdict):
    assert G.sanitizer_verdict(text, code)[0] == verdict
