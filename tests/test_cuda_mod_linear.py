"""The `cuda` backend (csrc/ kernels through modweights/backends/cuda.py).

Three groups:

* GPU tests (``@pytest.mark.gpu``; skipped without a CUDA device or without the built
  library): every linear case (per sample and per token) against the float64 reference in
  fp32, fp16 and bf16, tails, large shapes, bank groups, determinism, expanded gradients.
* Host-emulation tests (CPU, need g++): the same kernel source compiled for the CPU by
  ``csrc/emu/build_emu.py`` and run through this backend on CPU tensors, so the kernels'
  index math, tails, plans, partial buffers and the Python side are checked on every CI run.
  They cannot check the GPU itself (see csrc/emu/README.md).
* CPU tests that always run: availability reasons and their caching, refusals, the
  Python-side validation, the built extension's self-description, the build script's
  target parsing and its Python.h check.
"""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

import modweights
from modweights import functional as MF
from modweights import testing as T
from modweights._checks import ModLinearConfig
from modweights.backends import _cuda_extension as CX
from modweights.backends import cuda as CB

from conftest import load_script, skip_unavailable

ROOT = Path(__file__).resolve().parents[1]
L = "mod_linear"

PER_SAMPLE = [c for c in T.op_cases("mod_linear") if c.coeffs != "token" and c.styles != "token"]
PER_TOKEN = [c for c in T.op_cases("mod_linear") if c.coeffs == "token" or c.styles == "token"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]

# shapes that cross tile boundaries (tiles: 128 rows x 128 columns, chunks of 32; weight
# tiles 128 / 64 / 32), with 16-byte aligned rows (I, O multiples of 8) or not
TAILS = [
    T.Case(L, B=2, T=130, I=70, O=140, K=1, styles="sample", demodulate=True, bias="shared"),
    T.Case(L, B=3, T=37, I=64, O=96, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case(L, B=2, T=33, I=72, O=80, K=8, coeffs="sample", bias="shared"),
    T.Case(L, B=4, T=0, I=40, O=24, K=2, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case(L, B=1, T=1, I=8, O=8, K=1),
]
# K beyond what one 32 x 32 tile holds on chip: the bank is cut into groups
GROUPS = T.Case(L, B=2, T=9, I=40, O=36, K=40, coeffs="sample", styles="sample", demodulate=True, bias="bank")
# per-token kernels (64 x 64 tiles, chunks of 32): rows R = B * T and I, O across tiles,
# aligned and unaligned rows, every mix of per-token and per-sample conditioning
TOKEN_TAILS = [
    T.Case(L, B=2, T=70, I=72, O=136, K=3, coeffs="token", styles="token", demodulate=True, bias="bank"),
    T.Case(L, B=3, T=45, I=67, O=65, K=2, coeffs="token", demodulate=True, bias="shared"),
    T.Case(L, B=2, T=33, I=80, O=40, K=5, coeffs="sample", styles="token", demodulate=False, bias="bank"),
    T.Case(L, B=2, T=40, I=24, O=72, K=1, styles="token", demodulate=False),
    T.Case(L, B=1, T=130, I=16, O=8, K=4, coeffs="token", styles="sample", demodulate=True, bias="bank"),
]


def _check(case, dtype, device="cpu", context=""):
    """Every output and gradient of ``case`` on the cuda backend against the float64 reference."""
    expected = T.run_case(case, "reference", dtype, compute_dtype=torch.float64)
    actual = T.run_case(case, "cuda", dtype, device=device)
    T.assert_match(actual, expected, dtype, f"{case.id} {dtype} {context}")


def _check_expanded_gradient(x, w, s):
    """modulated_linear on the cuda backend against torch, outputs and gradients, with the
    stride-0 upstream gradient that ``y.sum().backward()`` hands over."""
    out = {}
    for backend in ("torch", "cuda"):
        x.grad = w.grad = s.grad = None
        y = MF.modulated_linear(x, w, s, backend=backend)
        y.sum().backward()  # a stride-0 upstream gradient
        out[backend] = (y.detach(), x.grad.clone(), w.grad.clone(), s.grad.clone())
    for a, b in zip(out["torch"], out["cuda"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# ============================================================================= GPU tests


def _gpu_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA device"
    ok, why = CB.availability(torch.device("cuda"))
    return ok, why


gpu = pytest.mark.gpu


@pytest.fixture
def on_gpu():
    ok, why = _gpu_ready()
    if not ok:
        skip_unavailable(f"cuda backend not available: {why}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", PER_SAMPLE, ids=[c.id for c in PER_SAMPLE])
def test_gpu_matches_reference(case, dtype, on_gpu):
    _check(case, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", TAILS + [GROUPS], ids=[c.id for c in TAILS + [GROUPS]])
def test_gpu_tails_and_groups(case, dtype, on_gpu):
    _check(case, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", [
    T.Case(L, B=4, T=512, I=1024, O=768, K=1, styles="sample", demodulate=True, bias="shared"),
    T.Case(L, B=4, T=384, I=512, O=1024, K=8, coeffs="sample", bias="bank"),
], ids=["W1-like", "W2a-like"])
def test_gpu_large(case, dtype, on_gpu):
    _check(case, dtype, "cuda")


@gpu
def test_gpu_deterministic_is_bitwise_repeatable(on_gpu):
    case = T.Case(L, B=3, T=200, I=96, O=80, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank")
    torch.use_deterministic_algorithms(True)
    try:
        a = T.run_case(case, "cuda", torch.float32, device="cuda")
        b = T.run_case(case, "cuda", torch.float32, device="cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    _check(case, torch.float32, "cuda", context="deterministic")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", PER_TOKEN + TOKEN_TAILS, ids=[c.id for c in PER_TOKEN + TOKEN_TAILS])
def test_gpu_per_token_matches_reference(case, dtype, on_gpu):
    _check(case, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", [
    T.Case(L, B=2, T=512, I=512, O=768, K=4, coeffs="token", bias="bank"),
    T.Case(L, B=2, T=256, I=256, O=256, K=2, coeffs="token", styles="token", demodulate=True),
], ids=["W3-like", "token-demod"])
def test_gpu_per_token_large(case, dtype, on_gpu):
    _check(case, dtype, "cuda")


@gpu
def test_gpu_expanded_gradient_and_2d_input(on_gpu):
    x = torch.randn(3, 40, device="cuda", requires_grad=True)
    w = torch.randn(24, 40, device="cuda", requires_grad=True)
    s = torch.rand(3, 40, device="cuda", requires_grad=True)
    _check_expanded_gradient(x, w, s)


# (the stream test, a CUDA-graph capture on new inputs, is tests/test_gpu.py's, for every fused backend)


# ============================================================================= host emulation


@pytest.fixture
def emulated(cuda_emulation_library, switch, monkeypatch):
    switch(cuda_emulation_library=cuda_emulation_library)
    yield CB.extension()[0]
    monkeypatch.delenv("MW_EMU_SMEM", raising=False)
    monkeypatch.delenv("MW_EMU_SMS", raising=False)
    CB.clear_caches()  # plans made for an emulated device that the environment changed


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", PER_SAMPLE + PER_TOKEN, ids=[c.id for c in PER_SAMPLE + PER_TOKEN])
def test_emulated_matches_reference(case, dtype, emulated):
    _check(case, dtype, context="(host emulation)")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", TOKEN_TAILS, ids=[c.id for c in TOKEN_TAILS])
def test_emulated_per_token_tails(case, dtype, emulated):
    _check(case, dtype, context="(host emulation, per-token tiles)")


def _record_launches(ext, monkeypatch) -> list:
    """Wrap every launch function of the extension; returns the list of names called."""
    seen = []
    for name in [n for n in dir(ext) if n.startswith("mod_linear_")]:
        fn = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, _fn=fn, _n=name: (seen.append(_n), _fn(*a))[1])
    return seen


def test_emulated_per_token_runs_the_token_kernels(emulated, monkeypatch):
    """Per-token inputs go through every per-token entry point (and no per-sample one);
    per-sample coefficients with more than DECODE_ROWS rows take the per-sample kernels."""
    seen = _record_launches(emulated, monkeypatch)
    T.run_case(TOKEN_TAILS[0], "cuda", torch.float32)
    assert set(seen) == {"mod_linear_token_demod", "mod_linear_token_forward", "mod_linear_token_prep",
                         "mod_linear_token_dx", "mod_linear_token_ds_demod", "mod_linear_token_da_demod",
                         "mod_linear_token_weight"}
    seen.clear()
    x, bank, a = torch.randn(3, 9, 8), torch.randn(2, 4, 8), torch.rand(3, 2)
    y = MF.mixture_linear(x, bank, a, backend="cuda")
    assert all("token" not in fn for fn in seen) and seen
    torch.testing.assert_close(y, MF.mixture_linear(x, bank, a, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [
    T.Case(L, B=5, T=1, I=24, O=40, K=4, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case(L, B=3, T=4, I=16, O=72, K=1, styles="sample", demodulate=True, bias="shared"),
    T.Case(L, B=70, T=2, I=8, O=16, K=3, coeffs="sample", bias="bank"),
], ids=["decode-T1-demod", "decode-T4-modulated", "decode-T2-70-samples"])
def test_emulated_decode_takes_the_one_pass_kernels(case, dtype, emulated, monkeypatch):
    """Few rows per sample (T <= DECODE_ROWS): the per-token kernels (one pass over the bank
    for the rows of all samples), never the per-sample GEMMs; the same results."""
    seen = _record_launches(emulated, monkeypatch)
    _check(case, dtype, context="(host emulation, decode)")
    assert seen and all(fn.startswith("mod_linear_token_") for fn in seen), seen
    assert "mod_linear_token_forward" in seen and (not case.demodulate or "mod_linear_token_demod" in seen)
    # (B, 1, K) coefficients are per sample: the same routing
    seen.clear()
    x, bank, a = torch.randn(3, 1, 8), torch.randn(2, 4, 8), torch.rand(3, 1, 2)
    y = MF.mixture_linear(x, bank, a, backend="cuda")
    assert seen == ["mod_linear_token_forward"]
    torch.testing.assert_close(y, MF.mixture_linear(x, bank, a, backend="reference"), rtol=1e-5, atol=1e-5)


# (case, emulated device): H100-like by default; an A100's shared memory picks smaller
# weight tiles; one SM splits the samples less; an sm_86-sized limit cuts K = 12 into groups
STRUCTURE = [
    (TAILS[0], {}),
    (TAILS[1], {}),
    (TAILS[1], {"MW_EMU_SMS": "1"}),
    (TAILS[2], {}),
    (TAILS[2], {"MW_EMU_SMEM": "166912"}),
    (TAILS[3], {}),
    (TAILS[4], {}),
    (GROUPS, {}),
    (T.Case(L, B=2, T=9, I=40, O=36, K=12, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
     {"MW_EMU_SMEM": "100000"}),
]


@pytest.mark.parametrize("dtype,deterministic", [(torch.float32, False), (torch.bfloat16, False),
                                                  (torch.float32, True)], ids=["f32", "bf16", "f32-deterministic"])
@pytest.mark.parametrize("case,env", STRUCTURE, ids=[f"{c.id}{''.join(f'-{k}={v}' for k, v in e.items())}"
                                                     for c, e in STRUCTURE])
def test_emulated_structure(case, env, dtype, deterministic, emulated, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    CB.clear_caches()  # the emulated device changed: plans are per device
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _check(case, dtype, context=f"(host emulation, {env}, deterministic={deterministic})")
    finally:
        torch.use_deterministic_algorithms(old)


def test_emulated_weight_plans(emulated, monkeypatch):
    """The tile choice follows the shared memory (W1: 128 x 128; W2a: 64 x 64 on an H100)."""

    def plan(K, dtype_code, smem=None):
        if smem:
            monkeypatch.setenv("MW_EMU_SMEM", str(smem))
        else:
            monkeypatch.delenv("MW_EMU_SMEM", raising=False)
        p = emulated.ModLinearParams(16, 1024, 4096, 4096, K, dtype_code, 0)
        p.x = p.bank = p.coeffs = 1
        p.want_dbank = 1
        w = emulated.mod_linear_bwd_weight_plan(p)
        return w.bo, w.kg, w.ngroups, w.nsplit

    assert plan(1, 2) == (128, 1, 1, 1)
    assert plan(8, 2) == (64, 8, 1, 1)
    assert plan(8, 2, 166912) == (32, 8, 1, 1)
    bo, kg, ngroups, _ = plan(40, 2)
    assert bo == 32 and kg < 40 and ngroups == -(-40 // kg)


def test_emulated_plans_and_availability_are_cached(emulated, monkeypatch):
    """The per-call path opens no file and plans the weight kernel once per problem."""
    case = T.Case(L, B=2, T=5, I=16, O=8, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank")
    T.run_case(case, "cuda", torch.float32)  # first call: loads, checks, plans
    seen = _record_launches(emulated, monkeypatch)
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
    for _ in range(2):
        T.run_case(case, "cuda", torch.float32)
    monkeypatch.setattr(builtins, "open", real_open)
    assert opened == []
    assert seen.count("mod_linear_bwd_weight") == 2 and "mod_linear_bwd_weight_plan" not in seen


def test_emulated_errors_name_the_argument(emulated):
    """Failures in C++ are Python exceptions that name the argument and the value expected."""
    ext = emulated
    with pytest.raises(ValueError, match="`B` must be >= 1; got 0"):
        ext.ModLinearParams(0, 1, 8, 8, 1, 0, 0)
    with pytest.raises(ValueError, match=r"`dtype` must be 0 \(float32\), 1 \(float16\) or 2 \(bfloat16\); got 7"):
        ext.ModLinearParams(1, 1, 8, 8, 1, 7, 0)
    with pytest.raises(ValueError, match="`bias_stride_b` must be 0 or O = 8; got 3"):
        ext.ModLinearParams(1, 1, 8, 8, 1, 0, 0, 1e-8, False, 1, 1, 1, 3)
    x, w, y = torch.randn(1, 1, 8), torch.randn(1, 8, 8), torch.empty(1, 1, 8)
    p = ext.ModLinearParams(1, 1, 8, 8, 2, 0, 0)
    p.x, p.y = x.data_ptr(), y.data_ptr()
    with pytest.raises(ValueError, match="mod_linear_forward: `bank` must be a device pointer; got 0"):
        ext.mod_linear_forward(p, 0)
    p.bank = w.data_ptr()
    with pytest.raises(ValueError, match="mod_linear_forward: `coeffs` must be a device pointer with K = 2 > 1; got 0"):
        ext.mod_linear_forward(p, 0)
    with pytest.raises(TypeError):
        p.x = "not a pointer"
    with pytest.raises(TypeError):
        ext.mod_linear_forward(p, "not a stream")
    # a plan made for other sizes is refused, not launched
    q = ext.ModLinearParams(2, 3, 8, 8, 1, 0, 0)
    q.x, q.bank, q.g, q.want_dbank = x.data_ptr(), w.data_ptr(), y.data_ptr(), 1
    big = ext.ModLinearParams(2, 3, 8, 8, 40, 0, 0)
    big.want_dbank = 1
    with pytest.raises(ValueError, match="`plan` must be the one mod_linear_bwd_weight_plan gives"):
        ext.mod_linear_bwd_weight(q, ext.mod_linear_bwd_weight_plan(big), 0)


@pytest.mark.parametrize("coeffs,styles,bias,demod", [
    ("sample", "sample", "bank", True),
    ("token", "token", "bank", True),
    ("token", "none", "shared", False),
    ("sample", "token", "none", True),
], ids=["sample-demod", "token-both-demod", "token-coeffs", "token-styles-demod"])
def test_emulated_opcheck(coeffs, styles, bias, demod, emulated):
    """The glue's custom ops around the cuda launchers (what torch.compile runs) pass opcheck:
    the fakes give the kernels' shapes (d is (B, T, O) per token, (B, O) per sample)."""
    from modweights import _autograd

    g = torch.Generator().manual_seed(0)
    B, Tn, I, O, K = 2, 5, 16, 8, 3
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, bank = r(B, Tn, I), r(K, O, I)
    a = {"sample": r(B, K), "token": r(B, Tn, K)}[coeffs]
    s = {"none": None, "sample": r(B, I).abs() + 0.5, "token": r(B, Tn, I).abs() + 0.5}[styles]
    b = {"none": None, "shared": r(O), "bank": r(K, O)}[bias]
    op, glue = _autograd.custom_op("mod_linear", "cuda"), _autograd._glue("mod_linear", "cuda")
    torch.library.opcheck(op, (x, bank, a, s, b, demod, 1e-8))
    y, d = op(x, bank, a, s, b, demod, 1e-8)
    if demod:
        assert d.shape == ((B, Tn, O) if "token" in (coeffs, styles) else (B, O))
    needs = [True, True, True, s is not None, b is not None]
    torch.library.opcheck(glue.bwd_op, (r(*y.shape), x, bank, a, s, b, d, y if demod else None, needs, demod, 1e-8))


def test_emulated_expanded_gradient_and_noncontiguous(emulated):
    x = torch.randn(5, 3, 40).transpose(0, 1).requires_grad_()  # non-contiguous
    w = torch.randn(24, 40, requires_grad=True)
    s = torch.rand(3, 40, requires_grad=True)
    _check_expanded_gradient(x, w, s)


def test_emulated_empty_batch(emulated):
    x = torch.randn(0, 4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    s = torch.rand(0, 8)
    y = MF.modulated_linear(x, w, s, backend="cuda")
    assert y.shape == (0, 4, 6)
    y.sum().backward()
    assert w.grad.shape == w.shape and torch.all(w.grad == 0)


# ============================================================================= CPU, always


def test_cpu_reports_unavailable_with_reason():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    st = modweights.available_backends()["cuda"]
    assert not st.available
    assert st.reason.startswith(("extension not built", "built but no CUDA device")), st.reason


def test_cpu_tensors_are_refused_with_the_reason():
    x, w, s = torch.randn(2, 3, 8), torch.randn(4, 8), torch.rand(2, 8)
    reason = CB.availability(torch.device("cpu"))[1]
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors") as e:
        MF.modulated_linear(x, w, s, backend="cuda")
    assert reason in str(e.value)
    with pytest.raises(RuntimeError, match="cuda backend is not available for cpu tensors"):
        CB.mod_linear_forward(x, w[None], None, s, None, ModLinearConfig(True, 1e-8))


def test_supports_says_what_is_missing():
    assert CB.supports("mod_linear", dtype=torch.bfloat16, per_token=False) == (True, "")
    ok, why = CB.supports("mod_conv2d", dtype=torch.float32)
    assert not ok and why == "cuda conv2d kernels are not implemented"
    assert CB.supports("mod_linear", dtype=torch.float32, per_token=True) == (True, "")
    ok, why = CB.supports("mod_linear", dtype=torch.float64, per_token=False)
    assert not ok and "float64" in why


def _args(B=2, T=3, I=8, O=4, K=2, dtype=torch.float32):
    return (torch.randn(B, T, I, dtype=dtype), torch.randn(K, O, I, dtype=dtype), torch.rand(B, K, dtype=dtype),
            torch.rand(B, I, dtype=dtype), torch.randn(K, O, dtype=dtype))


def test_validation_makes_inputs_contiguous():
    x, bank, a, s, b = _args()
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    pp = CB.prepare(xt, bank, a.t().contiguous().t(), s, b, check_device=False)
    assert pp.x.is_contiguous() and pp.coeffs.is_contiguous()
    assert (pp.B, pp.T, pp.I, pp.O, pp.K) == (2, 3, 8, 4, 2)
    torch.testing.assert_close(pp.x, x)


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(2, 3, 8, dtype=torch.float64)), TypeError, "dtype torch.float64 is not supported"),
    (dict(bank=torch.randn(2, 4, 8, dtype=torch.float16)), TypeError, "`bank` has dtype torch.float16"),
    (dict(coeffs=None), ValueError, r"`coeffs` is None, which needs a single weight \(K = 1\)"),
    (dict(coeffs=torch.rand(3, 2)), ValueError, r"`coeffs` must have shape \(B, K\) = \(2, 2\) or \(B, T, K\)"),
    (dict(coeffs=torch.rand(2, 4, 2)), ValueError, r"`coeffs` must have shape .* \(B, T, K\) = \(2, 3, 2\)"),
    (dict(styles=torch.rand(2, 3, 7)), ValueError, r"`styles` must have shape \(B, I\) = \(2, 8\) or"),
    (dict(bias=torch.randn(5)), ValueError, "`bias` must have shape"),
    (dict(bank=torch.randn(2, 4, 7)), ValueError, r"`bank` must have shape \(K, O, I\) with I = 8"),
    (dict(bank=torch.randn(2, 4, 8, device="meta")), ValueError, "`bank` is on meta"),
])
def test_validation_errors(change, exc, match):
    x, bank, a, s, b = _args()
    args = dict(x=x, bank=bank, coeffs=a, styles=s, bias=b)
    args.update(change)
    with pytest.raises(exc, match=match):
        CB.prepare(**args, check_device=False)


def test_validation_per_token_layout():
    """Per-token tensors set the row divisors; (B, 1, C) ones are per sample."""
    x, bank, a, s, b = _args()
    pp = CB.prepare(x, bank, torch.rand(2, 3, 2), s, b, check_device=False)
    assert pp.token and (pp.a_div, pp.s_div) == (1, 3)
    pp = CB.prepare(x, bank, a, torch.rand(2, 3, 8), b, check_device=False)
    assert pp.token and (pp.a_div, pp.s_div) == (3, 1)
    pp = CB.prepare(x[:, :1], bank, torch.rand(2, 1, 2), torch.rand(2, 1, 8), b, check_device=False)
    assert not pp.token and pp.coeffs.shape == (2, 2) and pp.styles.shape == (2, 8)


def test_validation_refuses_sizes_beyond_the_kernels():
    x = torch.empty((CB.MAX_B + 1, 1, 8), device="meta")
    bank = torch.empty((1, 4, 8), device="meta")
    with pytest.raises(ValueError, match="B \\(samples\\) = 65536; the cuda kernels take at most 65535"):
        CB.prepare(x, bank, None, None, None, check_device=False)
    bank = torch.empty((CB.MAX_K + 1, 4, 8), device="meta")
    with pytest.raises(ValueError, match="K \\(bank entries\\)"):
        CB.prepare(torch.empty((2, 1, 8), device="meta"), bank, torch.empty((2, CB.MAX_K + 1), device="meta"),
                   None, None, check_device=False)
    with pytest.raises(RuntimeError, match="run on CUDA tensors"):
        CB.prepare(torch.empty((2, 1, 8)), torch.empty((1, 4, 8)), None, None, None)
    # per token: the column tiles of I and O sit on grid.y
    big = CB.MAX_IO_TOKEN + 1
    with pytest.raises(ValueError, match=f"O \\(output features\\) = {big}; the cuda per-token kernels"):
        CB.prepare(torch.empty((2, 3, 8), device="meta"), torch.empty((1, big, 8), device="meta"), None,
                   torch.empty((2, 3, 8), device="meta"), None, check_device=False)


def test_status_file_reason(tmp_path, monkeypatch):
    """Without the extension, the build record says why (here: nvcc was not found)."""
    (tmp_path / CB.STATUS_FILE).write_text(json.dumps({"built": False, "reason": "extension not built: nvcc not found"}))
    monkeypatch.setattr(CX, "_PKG_DIR", tmp_path)
    CB.clear_caches()
    try:
        assert CB.availability(torch.device("cuda")) == (False, "extension not built: nvcc not found")
        (tmp_path / CB.STATUS_FILE).unlink()
        CB.clear_caches()
        monkeypatch.setattr(CX, "MODULE", "modweights._cuda_not_there")
        ok, why = CB.availability(torch.device("cpu"))
        assert not ok and why.startswith("extension not built: no build record")
    finally:
        monkeypatch.undo()
        CB.clear_caches()


def test_availability_is_cached_per_device(monkeypatch):
    """A GPU's availability is worked out once: later calls read no file (the build record)
    and ask the extension nothing."""
    ext, why = CB.extension()
    if ext is None:
        pytest.skip(f"extension not built: {why}")
    CB.clear_caches()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    checks = []
    monkeypatch.setattr(CB, "_device_status", lambda lib, i: (checks.append(i), (True, ""))[1])
    try:
        first = CB.availability(torch.device("cuda", 0))
        assert first[0] and checks == [0]
        opened = []
        real_open = builtins.open
        monkeypatch.setattr(builtins, "open", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
        for _ in range(3):
            assert CB.availability(torch.device("cuda", 0)) == first
        monkeypatch.setattr(builtins, "open", real_open)
        assert opened == [] and checks == [0]
    finally:
        monkeypatch.undo()
        CB.clear_caches()


def test_built_extension_describes_itself():
    """When the extension is built (CI has nvcc), it imports without a GPU as a real Python
    extension module, reports this ABI, and the device check says why there is no device."""
    ext, why = CB.extension()
    if ext is None:
        pytest.skip(f"extension not built: {why}")
    assert ext.__name__ == "modweights._cuda"
    assert Path(ext.__file__).name.startswith("_cuda.") and Path(ext.__file__).suffix == ".so"
    assert ext.abi_version() == CB.ABI_VERSION and ext.TOKEN_TILE == CB.TOKEN_TILE
    if not torch.cuda.is_available():
        assert ext.device_check(0)
    with pytest.raises(ValueError, match="`K` must be >= 1; got 0"):
        ext.ModLinearParams(1, 1, 8, 8, 0, 0, 0)


def _builder():
    return load_script("csrc/build.py")


def test_build_needs_python_headers(monkeypatch, tmp_path):
    """A pybind11 module needs Python.h: without it the build fails at once with that reason."""
    build = _builder()
    ok, where = build.python_headers()
    if ok:
        assert (Path(where) / "Python.h").is_file()
    monkeypatch.setattr(build.sysconfig, "get_paths", lambda: {"include": str(tmp_path), "platinclude": str(tmp_path)})
    ok, why = build.python_headers()
    assert not ok and "Python.h not found" in why and str(tmp_path) in why and "-dev" in why
    monkeypatch.setattr(build, "find_nvcc", lambda: "/bin/true")
    with pytest.raises(build.BuildError, match="Python.h not found"):
        build.build(tmp_path / build.module_filename(), tmp_path / "obj")
    assert not list(tmp_path.iterdir())  # nothing compiled


def test_build_script_targets():
    build = _builder()
    assert build.arch_flags("80;90a") == ["-gencode=arch=compute_80,code=sm_80",
                                          "-gencode=arch=compute_90a,code=sm_90a"]
    assert build.arch_flags("sm_86, 9.0a") == ["-gencode=arch=compute_86,code=sm_86",
                                               "-gencode=arch=compute_90a,code=sm_90a"]
    assert build.arch_flags("90a+PTX") == ["-gencode=arch=compute_90a,code=sm_90a",
                                           "-gencode=arch=compute_90a,code=compute_90a"]
    with pytest.raises(build.BuildError, match="older than sm_80"):
        build.arch_flags("75")
    with pytest.raises(build.BuildError, match="cannot read target"):
        build.arch_flags("hopper")
