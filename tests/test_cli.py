"""The ``modweights`` command: verify and bench (no timing assertions).

verify: passes on the CPU backends; a backend that returns a wrong answer or raises makes it
fail (exit 1) and says where; unavailable and not-implemented backends are listed, not
failed. bench: --quick writes its JSON/CSV/PNG files with the required fields; its peer
baselines compute the same op as the reference. ``python -m modweights --help`` works.
"""
import csv
import json
import math
import subprocess
import sys
import types

import pytest
import torch

import modweights.backends as registry
from modweights import _autograd, ops
from modweights import cli
from modweights import testing as T
from modweights import verify
from modweights.backends import torch_backend
from modweights.benchmarking import Skip, WORKLOADS, applies, prepare, select
from modweights.benchmarking.report import FIELDS

VERIFY_FAST = ["verify", "--device", "cpu", "--dtypes", "float32", "--seed", "7"]


def test_python_m_help():
    out = subprocess.run([sys.executable, "-m", "modweights", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "verify" in out.stdout and "bench" in out.stdout


@pytest.mark.parametrize("sub", ["verify", "bench"])
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    assert "--device" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["verify", "--dtypes", "float8"], "float8"),
    (["verify", "--backends", "numpy"], "numpy"),
    (["verify", "--size", "huge"], "huge"),
    (["verify", "--device", "not-a-device"], "--device"),
    (["bench", "--workloads", "W99"], "W99"),
    (["bench", "--impls", "magic"], "magic"),
    (["bench", "--reps", "0"], "positive"),
    (["bench", "--passes", "bwd-only"], "bwd-only"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a missing GPU")
def test_cuda_device_without_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--device", "cuda"])
    assert e.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


#: every public op: each registered op and its modulated_* / mixture_* wrappers
PUBLIC_OPS = [n for s in ops.SPECS.values() for n in (s.name, *s.wrappers) if n]


def test_verify_passes_on_cpu_backends(capsys):
    rc = cli.main(VERIFY_FAST + ["--backends", "reference,torch"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "verify OK" in out
    # every public op appears in the table
    for op in PUBLIC_OPS:
        assert f" {op} " in out
    assert not [l for l in out.splitlines() if l.rstrip().endswith(("FAIL", "error"))]


def test_verify_prints_one_summary_table_that_fits_a_screen(capsys):
    """One row per (backend, op), a column per dtype; the float64 reference is the oracle, not
    compared with itself; auto's pick in one line, not one per case."""
    rc = cli.main(["verify", "--device", "cpu", "--seed", "7", "--backends", "reference,torch"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert len(lines) <= 30, out
    assert sum("auto picks" in l for l in lines) == 1, out
    head = next(l for l in lines if l.startswith("backend "))
    assert head.split()[:4] == ["backend", "op", "float32", "float64"]
    rows = [l.split() for l in lines if l.startswith(("reference ", "torch "))]
    assert len(rows) == 2 * len(PUBLIC_OPS)  # 2 backends x every public op of every registered op
    for r in rows:
        assert r[2:4] != ["-", "-"] and "FAIL" not in r
        if r[0] == "reference":  # float32 is checked against the oracle; float64 is the oracle
            assert r[4] == "oracle" and r[3] == "pass", r
    assert "verify OK" in lines[-1]


def test_verify_verbose_lists_every_case_but_not_the_oracle_against_itself(capsys):
    rc = cli.main(VERIFY_FAST[:-4] + ["--dtypes", "float32,float64", "--seed", "7", "--backends", "reference,torch",
                                      "--verbose", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    per_case = [l.split() for l in out.splitlines() if l.rstrip().endswith("pass")]
    n = sum(len(T.public_ops(c)) for c in verify.cases("small"))
    assert len(per_case) == 3 * n, out  # torch in two dtypes, the reference in float32 only
    assert not [r for r in per_case if r[0] == "reference" and "float64" in r], out
    assert sum("auto picks" in l for l in out.splitlines()) == 2 * len(verify.cases("small"))


def test_verify_of_the_oracle_alone_says_why_nothing_was_checked(capsys):
    rc = cli.main(VERIFY_FAST[:-4] + ["--dtypes", "float64", "--backends", "reference", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and "the float64 reference is the oracle" in out, out


@pytest.fixture
def torch_backend_off(monkeypatch):
    """The torch backend reports itself unavailable (as cuda does when not built, or triton
    without a GPU or the interpreter)."""
    monkeypatch.setattr(torch_backend, "availability", lambda device: (False, "switched off by the test"))


def test_verify_fails_when_an_asked_for_backend_is_unavailable(torch_backend_off, capsys):
    rc = cli.main(VERIFY_FAST + ["--backends", "torch", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "verify FAILED" in out and "verify OK" not in out
    assert "[torch] asked for, nothing checked: unavailable: switched off by the test" in out


def test_verify_of_every_backend_lists_the_unavailable_ones(torch_backend_off, monkeypatch, capsys):
    # no --backends: every backend (here reference and torch), the unavailable ones listed, not failed
    monkeypatch.setattr(registry, "NAMES", ("reference", "torch"))
    rc = cli.main(VERIFY_FAST + ["--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "backend torch: unavailable: switched off by the test" in out and "verify OK" in out


@pytest.mark.skipif(registry.status("cuda", "cpu").available, reason="checks a cuda backend unavailable on cpu")
def test_verify_cuda_unavailable_on_cpu_fails(capsys):
    rc = cli.main(VERIFY_FAST + ["--backends", "cuda", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"[cuda] asked for, nothing checked: unavailable: {registry.status('cuda', 'cpu').reason}" in out


def test_verify_fails_when_an_asked_for_backend_implements_nothing(monkeypatch, capsys):
    monkeypatch.setattr(torch_backend, "supports", lambda op, **problem: (False, "declines everything"))
    rc = cli.main(VERIFY_FAST + ["--backends", "reference,torch", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "[torch] asked for, nothing checked: implements none of the cases" in out


def test_verify_asks_about_depthwise_conv_with_its_channel_counts():
    """triton implements depthwise conv (groups == in_channels == out_channels) only: verify must
    tell its supports() the channel counts, as mod_conv2d does, or it skips a case that runs."""
    from modweights import verify
    MC = pytest.importorskip("modweights.triton_kernels.mod_conv2d")

    dw = [c for c in T.op_cases("mod_conv2d", small=True) if c.conv.get("groups", 1) == c.I == c.O > 1]
    grouped = [c for c in T.op_cases("mod_conv2d", small=True) if 1 < c.conv.get("groups", 1) < c.I]
    assert dw and grouped
    for c in dw:
        assert MC.supports(**verify.problem_kwargs(c, torch.float32)) == (True, "")
    for c in grouped:
        ok, why = MC.supports(**verify.problem_kwargs(c, torch.float32))
        assert not ok and "in_channels" in why and "does not say" not in why


@pytest.mark.parametrize("op", list(ops.SPECS))
def test_case_lists_scale_when_not_small(op):
    """``small=False`` gives the same cases scaled up (what ``verify --size medium`` runs)."""
    small, medium = T.op_cases(op, small=True), T.op_cases(op, small=False)
    assert len(medium) == len(small)
    for s, m in zip(small, medium):
        assert m == T.scale_case(s) and m.I > s.I and m.O > s.O
        assert (m.B, m.K, m.mode, m.kernel, m.conv) == (s.B, s.K, s.mode, s.kernel, s.conv)
    from modweights import verify
    assert verify.cases("medium") == [c for name in ops.SPECS for c in T.op_cases(name, small=False)]


def test_verify_lists_not_implemented_ops(monkeypatch, capsys):
    # an available backend that declines an op is "not implemented", not a failure
    monkeypatch.setattr(torch_backend, "supports",
                        lambda op, **problem: (op != "mod_conv2d", "" if op != "mod_conv2d" else "no conv here"))
    rc = cli.main(VERIFY_FAST + ["--backends", "torch", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "backend torch: not implemented for mod_conv2d" in out and "no conv here" in out


@pytest.fixture
def wrong_torch_backend(monkeypatch):
    """Make the registry hand out a `torch` backend whose linear output is 0.1% off and whose
    conv2d raises (a DIRECT backend wrapping the real one)."""
    real = registry.resolve

    def mod_linear(x, bank, coeffs, styles, bias, cfg):
        return _autograd.run("mod_linear", torch_backend, x, bank, coeffs, styles, bias, cfg) * 1.001

    def mod_conv2d(x, bank, coeffs, styles, bias, cfg):
        raise RuntimeError("kernel exploded")

    wrong = types.SimpleNamespace(NAME="torch", DIRECT=True, mod_linear=mod_linear, mod_conv2d=mod_conv2d)

    def resolve(backend, op, device, **problem):
        impl = real(backend, op, device, **problem)
        return wrong if impl is torch_backend else impl

    monkeypatch.setattr(registry, "resolve", resolve)


def test_verify_fails_on_a_wrong_backend(wrong_torch_backend, capsys):
    rc = cli.main(VERIFY_FAST + ["--backends", "reference,torch", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "verify FAILED" in out
    assert "[torch] mod_linear" in out and "worst relative error" in out  # the wrong numbers
    assert "kernel exploded" in out  # the exception, reported as an error
    assert "[reference]" not in out  # the oracle itself still passes
    # the table (quiet: failures only) names backend, op and result
    fail_rows = [l for l in out.splitlines() if l.startswith("torch") and l.rstrip().endswith("FAIL")]
    assert fail_rows and all("1.00e-03" in l or "9.99e-04" in l for l in fail_rows)


def test_bench_out_unwritable_is_a_usage_error(tmp_path, capsys):
    """--out under a plain file cannot be created: a clear usage error before any timing, not a
    traceback after the sweep (a path under a file fails for root too, unlike a chmod)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--tiny", "--quick", "--workloads", "cpu-mixlinear",
                  "--out", str(blocker / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'out'}: cannot write there" in err


def test_bench_quick_writes_results(tmp_path, capsys):
    out_dir = tmp_path / "bench"
    # the naive reference (a per-sample loop, seconds here) is left out to keep this fast; cuda is
    # asked for to see an unavailable implementation recorded with its reason
    rc = cli.main(["bench", "--quick", "--workloads", "cpu-condconv", "--device", "cpu", "--out", str(out_dir),
                   "--impls", "torch,timm-condconv,cuda", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "cpu-condconv" in text and "x dense" in text

    data = json.loads((out_dir / "results.json").read_text())
    records = data["records"]
    impls = {r["impl"] for r in records}
    assert impls == {"dense", "torch", "timm-condconv", "cuda"}  # dense: always, the ratios need it
    required = {"workload", "impl", "pass", "dtype", "device", "shape", "median_ms", "tflops",
                "ratio_to_dense", "peak_memory_bytes", "torch_version", "triton_version",
                "modweights_version", "git_commit", "date"}
    for r in records:
        assert required <= set(r)
        assert r["workload"] == "cpu-condconv" and r["pass"] in ("fwd", "bwd", "fwd+bwd")
        assert r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["torch_version"] == torch.__version__ and r["date"]
    # one record per workload x impl x pass
    assert len({(r["impl"], r["pass"]) for r in records}) == len(records)
    measured = {(r["impl"], r["pass"]): r for r in records if r["status"] == "ok"}
    for key in [(i, p) for i in ("dense", "torch", "timm-condconv") for p in ("fwd", "bwd", "fwd+bwd")]:
        r = measured[key]
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["reps"] == cli.QUICK_REPS
        assert r["ratio_to_dense"] > 0 and r["peak_memory_bytes"] is not None
    assert measured[("dense", "fwd")]["ratio_to_dense"] == 1.0
    assert measured[("torch", "fwd")]["gbps"] > 0 and measured[("torch", "fwd+bwd")]["gbps"] is None
    assert measured[("dense", "fwd+bwd")]["flops"] == 3 * measured[("dense", "fwd")]["flops"]
    assert measured[("dense", "bwd")]["flops"] == 2 * measured[("dense", "fwd")]["flops"]
    # every record says which backend auto takes here, and why
    assert {r["auto_backend"] for r in records} == {"torch"} and all(r["auto_reason"] for r in records)
    assert "auto picks torch: cpu tensors" in text
    # skipped implementations carry their reason
    if not torch.cuda.is_available():
        assert {r["status"] for r in records if r["impl"] == "cuda"} == {"skipped"}
    assert all(r["reason"] for r in records if r["status"] == "skipped")

    with open(out_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and tuple(rows[0]) == FIELDS
    for name in ("ratio_to_dense.png", "memory.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "summary.md").read_text().startswith("# modweights bench results")


def test_cpu_benchmark_workloads_keep_their_published_shapes():
    """cpu-condconv and cpu-mixlinear are the CPU benchmark whose results benchmarks/results/ holds:
    their shapes must not drift, or the committed numbers stop describing them."""
    cc, ml = WORKLOADS["cpu-condconv"].case, WORKLOADS["cpu-mixlinear"].case
    assert (cc.op, cc.B, cc.I, cc.O, cc.K, cc.H, cc.W, cc.kernel, cc.conv) == (
        "mod_conv2d", 16, 64, 64, 4, 32, 32, (3, 3), {"padding": 1})
    assert (cc.coeffs, cc.styles, cc.demodulate) == ("sample", "none", False)
    assert (ml.op, ml.B, ml.T, ml.I, ml.O, ml.K, ml.coeffs, ml.styles) == (
        "mod_linear", 16, 256, 512, 512, 4, "sample", "none")
    assert WORKLOADS["cpu-condconv"].flops == 2 * 16 * 64 * 64 * 9 * 32 * 32
    assert WORKLOADS["cpu-mixlinear"].flops == 2 * 16 * 256 * 512 * 512
    assert [w.name for w in select(["W6"])] == ["W6-1", "W6-8", "W6-64"]


@pytest.mark.parametrize("impl", ["naive-bmm", "timm-condconv", "sg2-fused", "sg2-nonfused"])
def test_bench_baselines_compute_the_op(impl):
    """Each peer baseline, set up as bench sets it up, gives the reference's output and
    gradients (float64, tiny shapes): a benchmark of a wrong computation means nothing."""
    dtype, device = torch.float64, torch.device("cpu")
    checked = 0
    for wl in select(["cpu"], device):
        wl = wl.tiny()
        try:
            applies(impl, wl, device, dtype)
        except Skip:
            continue
        inputs = T.make_inputs(wl.case, dtype, device, seed=3)
        got, ref = prepare(impl, wl, inputs), prepare("reference", wl, inputs)
        y, y_ref = got.forward(), ref.forward()
        gy = torch.randn_like(y_ref)
        grads = torch.autograd.grad(y, got.leaves, gy)
        grads_ref = torch.autograd.grad(y_ref, ref.leaves, gy)
        pairs = [("y", y, y_ref)] + [(f"d{i}", g.reshape(r.shape), r)
                                     for i, (g, r) in enumerate(zip(grads, grads_ref))]
        assert len(grads) == len(grads_ref)
        for name, a, e in pairs:
            c = T.compare(name, a, e, 1e-9)
            assert c.ok, f"{impl} on {wl.name}: {c}"
        checked += 1
    assert checked, f"{impl} applies to none of the CPU workloads"


def test_memory_limit_skips_with_reason():
    wl = WORKLOADS["cpu-mixlinear"]
    with pytest.raises(Skip, match="GiB"):
        applies("reference", wl, torch.device("cpu"), torch.float32, memory_limit=1 << 20)
    applies("dense", wl, torch.device("cpu"), torch.float32, memory_limit=1 << 20)
    assert not math.isnan(wl.flops)


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_bench_runs_dense_and_kernels_under_one_fp32_precision(tf32, monkeypatch, capsys):
    """The float32 x dense ratio compares like with like: the sweep sets both TF32 switches (the
    one F.conv2d / the triton conv follow, and the matmul one) to ``--tf32`` around every call of
    every implementation, the dense baseline included, records which, and restores them after."""
    from modweights.benchmarking import impls as I
    from modweights.benchmarking import report, runner
    seen = []

    def fake_prepare(impl, wl, inputs, compile_timeout=None):
        x = inputs["x"].detach().requires_grad_(True)

        def forward():
            seen.append((impl, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x * 2
        return I.Prepared(forward, [x])

    monkeypatch.setattr(I, "prepare", fake_prepare)
    monkeypatch.setattr(I, "applies", lambda *a, **k: None)
    torch.backends.cudnn.allow_tf32 = not tf32  # the caller's switches (conftest.py restores them)
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    settings = runner.Settings(device=torch.device("cpu"), impls=["dense", "triton"], passes=("fwd", "fwd+bwd"),
                               warmup=1, reps=2, compile=False, tiny=True, tf32=tf32)
    sweep = runner.run([WORKLOADS["cpu-condconv"]], settings)
    assert {impl for impl, _, _ in seen} == {"dense", "triton"}
    assert all((c, m) == (tf32, tf32) for _, c, m in seen), seen
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (not tf32, not tf32)
    name = "tf32" if tf32 else "ieee"
    assert sweep.env["fp32_precision"] == name
    assert [r["fp32_precision"] for r in sweep.records] == [name] * 4 and all(r["status"] == "ok" for r in sweep.records)
    assert ("TF32" if tf32 else "exact float32") in report.format_table(sweep).splitlines()[1]
    with pytest.raises(TypeError, match="tf32"):
        runner.Settings(device=torch.device("cpu"), tf32="yes")
    # the command line's switch reaches the sweep
    got = {}
    monkeypatch.setattr(runner, "run", lambda wls, s, progress=None: got.setdefault("s", s) and runner.Sweep(
        {"device": "cpu", "device_name": "x", "num_threads": 1, "torch_version": "", "triton_version": "",
         "git_commit": ""}))
    monkeypatch.setattr(report, "write_all", lambda *a, **k: [])
    argv = ["bench", "--device", "cpu", "--tiny", "--quick", "--workloads", "cpu-condconv", "--no-progress"]
    assert cli.main(argv + (["--tf32"] if tf32 else [])) == 0
    assert got["s"].tf32 is tf32
    capsys.readouterr()


def test_bench_compiled_reference_times_its_backward():
    """``bench --compile on``: the compiled reference's graph is compiled with donated buffers,
    which refuse ``retain_graph=True``; its ``bwd`` goes through a fresh graph per call (the
    forward run untimed by the timer first) and gives the reference's gradients. It used to be
    an error, so ``bench --compile on`` always exited 1."""
    from modweights.benchmarking import runner
    wl = WORKLOADS["cpu-tokmix"]
    settings = runner.Settings(device=torch.device("cpu"), impls=["compiled-reference"], passes=("bwd", "fwd+bwd"),
                               warmup=1, reps=2, compile=True, tiny=True)
    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile workers (~30 s to start)
        sweep = runner.run([wl], settings)
        recs = {(r["impl"], r["pass"]): r for r in sweep.records}
        for p in ("bwd", "fwd+bwd"):
            r = recs["compiled-reference", p]
            assert r["status"] == "ok", r
            assert r["median_ms"] > 0 and r["reps"] == 2
        # the fresh-graph backward computes the reference's gradients, call after call
        inputs = T.make_inputs(wl.tiny().case, torch.float64, torch.device("cpu"), seed=3)
        got, ref = prepare("compiled-reference", wl.tiny(), inputs), prepare("reference", wl.tiny(), inputs)
    bwd = got.pass_fn("bwd")
    y_ref = ref.forward()
    want = torch.autograd.grad(y_ref, ref.leaves, got.grad_out)
    for _ in range(2):
        bwd.setup()
        for g, w in zip(bwd(), want):
            torch.testing.assert_close(g, w)
    torch._dynamo.reset()
