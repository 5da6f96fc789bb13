"""The AOT report (modweights.aot): every W1-W7 default kernel specialisation compiles for
sm_90a without a GPU, fits in shared memory, spills nothing, and every main loop with a dot
is software-pipelined. Also the pieces: the launch recording, the specialisation rules
against Triton's own, the TTGIR loop reading.

The tests compiling kernels run the report in a subprocess: this test session runs Triton
under its interpreter (conftest.py), and the report must see the kernels built for a GPU.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from modweights import aot  # noqa: E402
from modweights.aot import compile_worker as CW  # noqa: E402
from modweights.aot import specs as S  # noqa: E402


def _run(args, tmp_path, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "aot"
    cmd = [sys.executable, "-m", "modweights.aot", "--out", str(out), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(str(out) + ".json") as f:
        return json.load(f), r.stdout


def test_w1_w7_defaults_compile_pipelined_and_spill_free_on_sm90(tmp_path):
    data, log = _run(["--which", "default", "--arch", "90", "--no-tests", "--jobs", "2"], tmp_path)
    rows = data["rows"]
    names = {r["problem"] for r in rows}
    assert names == {w.name for w in aot.workload_problems()}, names
    # every workload launches its GEMM-like kernels (a forward and the weight side at least)
    for n in names:
        kernels = {r["kernel"] for r in rows if r["problem"] == n}
        assert any("fwd_kernel" in k for k in kernels) and any("weight" in k for k in kernels), (n, kernels)
    bad = [f"{r['problem']} {r['kernel']} {r['config']}: {'; '.join(aot.problems(r))}" for r in rows
           if aot.problems(r)]
    assert not bad, "\n".join(bad)
    # the tensor-core path: every dot kernel of W1-W7 issues wgmma except the decode row tiles
    # (16 rows: below the 64-row wgmma tile, mma.sync)
    for r in rows:
        if r["dot_loops"] and not r["config"].startswith(("T16", "T32")):
            assert r["wgmma"] > 0, (r["problem"], r["kernel"], r["config"])


@pytest.mark.skipif(not os.environ.get("MODWEIGHTS_AOT_PYTHON"),
                    reason="MODWEIGHTS_AOT_PYTHON names no Python with another Triton (e.g. a venv with triton==3.6.0)")
def test_w1_w7_defaults_with_another_triton(tmp_path):
    """The same gate under another Triton (the GPU machine's 3.6): its register allocation differs."""
    data, _ = _run(["--which", "default", "--arch", "90", "--no-tests", "--jobs", "2",
                    "--python", os.environ["MODWEIGHTS_AOT_PYTHON"]], tmp_path)
    bad = [f"{r['problem']} {r['kernel']} {r['config']}: {'; '.join(aot.problems(r))}" for r in data["rows"]
           if aot.problems(r)]
    assert not bad, f"Triton {data['triton']}:\n" + "\n".join(bad)


_RECORD = """
import json
from modweights import aot
from modweights.aot import specs
out = [(p, l.name, l.flags.get("BLOCK_K"), l.default, len(l.configs), list(l.grid))
       for p, l in specs.launches(aot.workload_problems(["W2a"])[0])]
print(json.dumps(out))
"""


def test_recording_runs_the_launchers_without_a_gpu():
    # W2a: the per-sample mixture: forward, dx and the fused weight kernel; the mixture
    # unrolled over BLOCK_K = 8 bank tiles in the forward's and dx's B-tile loads
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _RECORD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(p, n) for p, n, *_ in got] == [("fwd", "_mod_linear_fwd_kernel"), ("bwd", "_mod_linear_bwd_dx_kernel"),
                                           ("bwd", "_mod_linear_bwd_weight_kernel")]
    assert got[0][2] == 8 and got[1][2] == 8
    meta, warps, stages = got[0][3]
    # the grid covers B * T / BLOCK_T row tiles and O / BLOCK_O columns
    assert got[0][5] == [16 * 1024 // meta["BLOCK_T"], 4096 // meta["BLOCK_O"]]
    assert got[0][4] >= 1


def test_recording_refuses_interpreter_kernels():
    if not S.ML_INTERPRETED():
        pytest.skip("this session's kernels are built for a GPU")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        S.launches(aot.workload_problems(["W2a"])[0])


def test_specialise_follows_tritons_rules():
    import torch
    t = torch.empty(10, dtype=torch.bfloat16, device="meta")
    names = ["p", "q", "one", "n16", "n17", "big", "eps", "flag"]
    sig, const, div = S.specialise([t, t[3:], 1, 32, 17, 2 ** 40, 1e-8, True], names)
    assert sig == {"p": "*bf16", "q": "*bf16", "one": "constexpr", "n16": "i32", "n17": "i32", "big": "i64",
                   "eps": "fp32", "flag": "u1"}
    assert const == {"one": 1}
    assert div == ["p", "n16", "big"]  # q starts 6 bytes in: not 16-byte aligned
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    for a, name in [(t, "p"), (32, "n16"), (17, "n17"), (2 ** 40, "big"), (1, "one")]:
        ty, attr = native_specialize_impl(BaseBackend, a, False, True, True)[:2]
        assert ty == sig[name]
        if ty != "constexpr":
            assert (attr == "D") == (name in div), (name, attr)


def test_loop_facts_reads_pipelined_and_plain_loops():
    plain = """
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<64x64xf32>) : i32 {
      %a = tt.load %p : tensor<64x64x!tt.ptr<bf16>>
      %s = scf.for %k = %c0 to %K step %c1 iter_args(%m = %z) -> (tensor<64x64xf32>) : i32 {
        %w = tt.load %q : tensor<64x64x!tt.ptr<bf16>>
        scf.yield %m : tensor<64x64xf32>
      } {tt.num_stages = 3 : i32}
      %d = ttng.warp_group_dot %a, %s, %acc {isAsync = true} : tensor<64x64xf32>
      scf.yield %d : tensor<64x64xf32>
    }
    """
    staged = """
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<64x64xf32>) : i32 {
      scf.if %c {
        %t = ttg.async_copy_global_to_local %p, %b {contiguity = 8 : i32} : tensor<64x64x!tt.ptr<bf16>>
      }
      %d = ttng.warp_group_dot %a, %s, %acc {isAsync = true} : tensor<64x64xf32>
      scf.yield %d : tensor<64x64xf32>
    }
    """
    assert CW.loop_facts(plain) == (1, 0)
    assert CW.loop_facts(staged) == (1, 1)
    assert CW.loop_facts("%a = tt.load %p") == (0, 0)


def test_problems_names_each_failure():
    ok = dict(arch=90, shared=1000, registers=100, spill_stores=0, spill_loads=0, dot_loops=1, pipelined_loops=1)
    assert aot.problems(ok) == []
    assert "shared memory" in aot.problems(dict(ok, shared=300000))[0]
    assert "spills" in aot.problems(dict(ok, spill_stores=8, spill_loads=8))[0]
    assert "not pipelined" in aot.problems(dict(ok, pipelined_loops=0))[0]
    assert aot.problems(dict(ok, arch=80, pipelined_loops=0)) == []  # the pipelining gate is sm_90a's
    assert "compile failed" in aot.problems({"arch": 90, "error": "boom"})[0]


_RECORD_CONV1D = """
import dataclasses, json
import torch
from modweights import testing as T
from modweights.aot import specs
c1 = T.Case("mod_conv1d", B=2, I=32, O=48, K=2, W=40, kernel=(5,), coeffs="sample", styles="sample",
            demodulate=True, bias="bank", conv={"padding": 2, "stride": 2})
c2 = c1.spec.canonical_case(c1)
out = [[(p, l.name, sorted(l.flags.items()), list(l.grid), [a for a in l.args if isinstance(a, int)]) for p, l in
        specs.launches(specs.Problem(c.op, c, torch.bfloat16))] for c in (c1, c2)]
print(json.dumps([c2.op, c2.H, c2.conv] + out))
"""


def test_recording_runs_an_op_that_lowers_as_the_op_it_runs_as():
    """The AOT recording asks each op's spec for its Triton launcher and arguments: mod_conv1d
    records exactly the launches of the unit-height conv2d it lowers to (padding (0, p), not
    (p, p): the 1-D geometry is the spec's, not guessed from the case)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _RECORD_CONV1D], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    op, H, conv, got1, got2 = json.loads(r.stdout.strip().splitlines()[-1])
    assert op == "mod_conv2d" and H == 1 and conv["padding"] == [0, 2]
    assert got1 == got2  # kernels, flags, grids and every integer argument (sizes, geometry, strides)
    assert {n for _, n, *_ in got1} >= {"_mod_conv2d_fwd_kernel", "_mod_conv2d_bwd_weight_kernel"}


def test_aot_and_sweep_name_no_op():
    """The AOT report, the count sheet and the kernel sweep iterate over the op registry: the
    per-op facts (launcher, arguments, test shapes, sweep shapes, kernel counts) live in each op's
    spec (modweights/ops/<op>.py), so none of these modules names an op or branches on one."""
    import re
    from pathlib import Path

    from modweights import ops
    root = Path(aot.__file__).resolve().parent.parent
    files = sorted((root / "aot").glob("*.py")) + [root / "benchmarking" / "kernel_sweep.py"]
    names = "|".join(re.escape(n) for n in ops.SPECS)
    pattern = re.compile(rf"\bop\s*==|\"({names})\"|'({names})'")
    hits = [f"{p.name}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits
    assert {p.case.op for p in aot.test_problems()} == {s.name for s in ops.SPECS.values() if s.triton_launcher}
