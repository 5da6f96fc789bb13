"""The `triton` backend of mod_linear against the reference: outputs and every gradient.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors,
with small fixed tiles (16): the odd sizes below give partial tiles in every dimension.
bf16 is tested on the GPU only (the interpreter's bf16 tl.dot is wrong).
"""
import pytest
import torch

from modweights import _autograd, backends
from modweights import functional as MF
from modweights import testing as T
from modweights._checks import ModLinearConfig

pytest.importorskip("triton")
ML = pytest.importorskip("modweights.triton_kernels.mod_linear")
from modweights.triton_kernels import mod_linear_launch as MLA  # noqa: E402
from modweights.triton_kernels import mod_linear_layout as MLL  # noqa: E402
from modweights.backends import triton as triton_backend  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not MLA.INTERPRETED:
    pytest.skip("the triton backend needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

LINEAR = T.op_cases("mod_linear")
L = "mod_linear"

# bigger than one 16-tile in every dimension: several row tiles per sample (MIX_B), flat row
# tiles that straddle samples (stacked), several O and I tiles with tails
TILED = [
    T.Case(L, B=2, T=21, I=35, O=18, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case(L, B=3, T=11, I=20, O=18, K=2, coeffs="token", styles="token", demodulate=True, bias="bank"),
    T.Case(L, B=2, T=19, I=33, O=20, K=1, styles="sample", demodulate=True, bias="shared"),
    T.Case(L, B=3, T=9, I=20, O=33, K=3, coeffs="sample", styles="token", demodulate=True),
    T.Case(L, B=5, T=0, I=40, O=19, K=4, coeffs="sample", styles="sample", demodulate=True),
    # per-token conditioning with one token per sample: runs as per-sample
    T.Case(L, B=3, T=1, I=9, O=5, K=3, coeffs="token", styles="token", demodulate=True, bias="bank"),
]


@pytest.fixture
def force(switch):
    """Pin the launcher's layout / split choices for one test."""
    def set_(mix_b=None, split=None, weight_stacked=None):
        switch(triton_mix_b=mix_b, triton_split=split, triton_weight_stacked=weight_stacked)
    return set_


def _check(case, dtype=torch.float32):
    expected = T.run_case(case, "reference", dtype, device=DEV, compute_dtype=torch.float64)
    actual = T.run_case(case, "triton", dtype, device=DEV)
    T.assert_match(actual, expected, dtype, case.id)
    return actual


def _default_mix_b(case):
    t = max(case.T, 1)
    x = torch.empty(case.B, t, case.I, device="meta")
    bank = torch.empty(case.K, case.O, case.I, device="meta")
    a = None if case.coeffs == "none" else torch.empty(
        (case.B, case.K) if case.coeffs == "sample" else (case.B, t, case.K), device="meta")
    s = None if case.styles == "none" else torch.empty(
        (case.B, case.I) if case.styles == "sample" else (case.B, t, case.I), device="meta")
    return MLL.layout(x, bank, a, s, case.demodulate).mix_b


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("case", LINEAR, ids=[c.id for c in LINEAR])
def test_matches_reference(case, dtype):
    _check(case, dtype)


# the other layout than the one the launcher counts its way to (per-sample or no coefficients:
# both layouts exist); the fused weight kernel with two sample splits
OTHER = [c for c in LINEAR if c.coeffs != "token"]


@pytest.mark.parametrize("case", OTHER, ids=[c.id for c in OTHER])
def test_other_layout_and_split(case, force):
    force(mix_b=not _default_mix_b(case), split=2)
    _check(case)


@pytest.mark.parametrize("case", TILED, ids=[c.id for c in TILED])
def test_tiles_and_tails(case, force):
    force(mix_b=True if case.coeffs != "token" else None)
    _check(case)


# per-sample coefficients without demodulation: the weight side as the stacked GEMM with ds / da
# as per-row sums of the dx kernel (what the counting picks for decode-sized rows)
STACKED_W = [c for c in LINEAR if c.coeffs == "sample" and not c.demodulate] + [
    T.Case(L, B=3, T=7, I=35, O=18, K=3, coeffs="sample", styles="sample", bias="bank"),
    T.Case(L, B=20, T=0, I=33, O=40, K=4, coeffs="sample", styles="token"),
]


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", STACKED_W, ids=[c.id for c in STACKED_W])
def test_weight_side_stacked(case, det, force):
    force(mix_b=False, weight_stacked=True)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        _check(case)
    finally:
        torch.use_deterministic_algorithms(old)


def test_weight_side_counting():
    # decode rows (W6-8, W6-64): the stacked GEMM; many rows per sample (W2b) or the mixing
    # layout: the fused per-sample kernel; demodulation: always fused
    assert MLL.choose_weight_stacked(64, 1, 4, True, False, False)
    assert MLL.choose_weight_stacked(8, 1, 4, True, False, False)
    assert not MLL.choose_weight_stacked(256, 49, 8, True, False, False)
    assert not MLL.choose_weight_stacked(64, 1, 4, True, False, True)
    assert not MLL.choose_weight_stacked(64, 1, 4, True, True, False)
    assert not MLL.choose_weight_stacked(64, 1, 1, False, False, False)


def test_tiles_and_tails_stacked(force):
    force(mix_b=False, split=2)
    _check(TILED[0])


def test_tiles_per_sample_with_demod_prepass(force, switch):
    """Row tiles per sample with d from the pre-pass (the long-sequence path)."""
    force(mix_b=True)
    switch(triton_demod_in_loop_max_t=0)
    _check(TILED[0])


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("case", [TILED[0], TILED[1]], ids=["per-sample", "per-token"])
def test_deterministic_bitwise(case, force):
    """With deterministic algorithms requested, cross-program sums go through per-program
    slices reduced in a fixed order: two runs give bitwise-equal gradients."""
    force(split=2)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = _check(case)
        second = T.run_case(case, "triton", torch.float32, device=DEV)
    finally:
        torch.use_deterministic_algorithms(old)
    for k in first:
        assert torch.equal(first[k], second[k]), k


# ----------------------------------------------------------------------------- gradients' forms


def _ref_and_triton(case, fn, dtype=torch.float32):
    out = {}
    for backend in ("reference", "triton"):
        inp = T.make_inputs(case, torch.float64 if backend == "reference" else dtype, DEV)
        leaves = {k: v.requires_grad_() for k, v in inp.items() if v is not None}
        y = T.call(case, {k: leaves.get(k) for k in T.GRAD_NAMES}, backend)
        fn(y)
        out[backend] = {"y": y.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}
    return out["triton"], out["reference"]


def test_expanded_upstream_gradient():
    """y.sum().backward() hands the backward an expanded gradient (stride 0)."""
    case = T.Case(L, B=3, T=5, I=17, O=7, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank")
    actual, expected = _ref_and_triton(case, lambda y: y.sum().backward())
    T.assert_match(actual, expected, torch.float32, case.id)


def test_expanded_upstream_gradient_per_token():
    case = T.Case(L, B=2, T=7, I=9, O=5, K=3, coeffs="token", styles="token", demodulate=True, bias="bank")
    actual, expected = _ref_and_triton(case, lambda y: y.sum().backward())
    T.assert_match(actual, expected, torch.float32, case.id)


def test_noncontiguous_inputs():
    """Kernels honour strides: x and styles as permuted views, the bank a strided slice."""
    g = torch.Generator().manual_seed(3)
    B, Tn, I, O, K = 3, 6, 17, 9, 2
    x = torch.randn(I, Tn, B, generator=g).permute(2, 1, 0)
    bank = (torch.randn(K, O, 2 * I, generator=g) / I ** 0.5)[:, :, ::2]
    a = torch.rand(K, B, generator=g).t()
    s = (torch.rand(I, B, generator=g) + 0.5).t()
    gy = torch.randn(B, Tn, O, generator=g)
    assert not any(t.is_contiguous() for t in (x, bank, a, s))
    res = {}
    for backend in ("reference", "triton"):
        cast = (lambda t: t.double()) if backend == "reference" else (lambda t: t)
        leaves = [cast(t).to(DEV).detach().requires_grad_() for t in (x, bank, a, s)]
        y = MF.mod_linear(*leaves, demodulate=True, backend=backend)
        grads = torch.autograd.grad(y, leaves, cast(gy).to(DEV))
        res[backend] = {"y": y.detach(), **{f"d{i}": gr for i, gr in enumerate(grads)}}
    T.assert_match(res["triton"], res["reference"], torch.float32, "noncontiguous")


@pytest.mark.parametrize("which", ["x", "bank", "coeffs", "styles", "bias"])
def test_one_gradient_at_a_time(which):
    """Only the asked-for gradient is computed (the others' kernels are skipped)."""
    case = T.Case(L, B=3, T=5, I=17, O=7, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank")
    res = {}
    for backend, dt in (("reference", torch.float64), ("triton", torch.float32)):
        inp = T.make_inputs(case, dt, DEV)
        inp[which].requires_grad_()
        y = T.call(case, inp, backend)
        (gr,) = torch.autograd.grad(y, [inp[which]], torch.ones_like(y))
        res[backend] = {"y": y.detach(), f"d{which}": gr}
    T.assert_match(res["triton"], res["reference"], torch.float32, which)


def test_double_backward_uses_the_differentiable_torch_backward():
    case = T.Case(L, B=2, T=3, I=5, O=4, K=2, coeffs="sample", styles="sample", demodulate=False)
    res = {}
    for backend, dt in (("reference", torch.float64), ("triton", torch.float32)):
        inp = T.make_inputs(case, dt, DEV)
        x = inp["x"].requires_grad_()
        y = T.call(case, inp, backend)
        (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), [x])
        res[backend] = {"gx": gx.detach(), "ggx": ggx}
    T.assert_match(res["triton"], res["reference"], torch.float32, "double backward")


# ----------------------------------------------------------------------------- torch integration


def test_torch_compile_fullgraph():
    case = T.Case(L, B=2, T=5, I=9, O=7, K=3, coeffs="sample", styles="sample", demodulate=True, bias="bank")
    inp = T.make_inputs(case, torch.float32, DEV)
    leaves = [inp[k].requires_grad_() for k in T.GRAD_NAMES]

    def f(x, bank, a, s, b):
        return MF.mod_linear(x, bank, a, s, demodulate=True, bias=b, backend="triton")

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    y_e = f(*leaves)
    grads_e = torch.autograd.grad(y_e.square().sum(), leaves)
    torch.testing.assert_close(y, y_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


OPCHECK = [
    ((2, 5, 9), (3, 7, 9), "sample", "sample", "bank", True),
    ((2, 5, 9), (3, 7, 9), "token", "sample", "bank", True),
    ((2, 4, 9), (1, 7, 9), "none", "token", "shared", False),
]


@pytest.mark.parametrize("xs,bs,coeffs,styles,bias,demod", OPCHECK,
                         ids=["sample-demod", "token-demod", "styles-token"])
def test_opcheck(xs, bs, coeffs, styles, bias, demod):
    g = torch.Generator().manual_seed(0)
    B, Tn, I = xs
    K, O, _ = bs
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    x, bank = r(*xs), r(*bs)
    a = {"none": None, "sample": r(B, K), "token": r(B, Tn, K)}[coeffs]
    s = {"none": None, "sample": r(B, I).abs() + 0.5, "token": r(B, Tn, I).abs() + 0.5}[styles]
    b = {"none": None, "shared": r(O), "bank": r(K, O)}[bias]
    # the backend's launchers run inside the shared glue's custom ops (forward, and the kernel backward)
    op, glue = _autograd.custom_op("mod_linear", "triton"), _autograd._glue("mod_linear", "triton")
    torch.library.opcheck(op, (x, bank, a, s, b, demod, 1e-8))
    y, d = op(x, bank, a, s, b, demod, 1e-8)
    needs = [True, True, a is not None, True, b is not None]
    torch.library.opcheck(glue.bwd_op, (r(*y.shape), x, bank, a, s, b, d, y if demod else None, needs, demod, 1e-8))


# ----------------------------------------------------------------------------- registry, input


def test_registry_reports_triton_available():
    st = backends.status("triton", DEV)
    assert st.available, st.reason
    if not CUDA:
        assert "TRITON_INTERPRET" in st.reason
    assert backends.resolve("triton", "mod_linear", torch.device(DEV)) is triton_backend


def test_unavailable_reason(monkeypatch):
    if MLA.INTERPRETED:
        monkeypatch.setattr(MLA, "INTERPRETED", False)
    ok, reason = triton_backend.availability(torch.device("cpu"))
    assert not ok and reason == "needs a CUDA device or TRITON_INTERPRET=1"


def test_conv2d_grouped_not_supported():
    """conv2d kernels exist for groups 1 and depthwise; other groups are refused with the reason."""
    ok, reason = triton_backend.supports("mod_conv2d", dtype=torch.float32, groups=2, kernel_size=(3, 3),
                                         in_channels=4, out_channels=4)
    assert not ok and "use the torch backend" in reason
    x = torch.randn(1, 4, 5, 5, device=DEV)
    with pytest.raises(RuntimeError, match="groups = 2 .* not implemented by the triton conv2d kernels"):
        MF.mod_conv2d(x, torch.randn(1, 4, 2, 3, 3, device=DEV), groups=2, backend="triton")


def test_launcher_rejects_bad_input():
    x, cfg = torch.randn(2, 3, 4, dtype=torch.float64, device=DEV), ModLinearConfig(False, 1e-8)
    bank64 = torch.randn(1, 5, 4, dtype=torch.float64, device=DEV)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        triton_backend.mod_linear_forward(x, bank64, None, None, None, cfg)
    with pytest.raises(ValueError, match="bank"):
        triton_backend.mod_linear_forward(x.float(), torch.randn(1, 5, 3, device=DEV), None, None, None, cfg)


def test_layout_counting():
    """The launcher's count (no kernels run): many rows per sample mix in the B tile, few rows
    (decode) stack; per-token coefficients always stack."""
    def mix_b(B, Tn, I, O, K, coeffs="sample"):
        x = torch.empty(B, Tn, I, device="meta")
        bank = torch.empty(K, O, I, device="meta")
        a = torch.empty((B, K) if coeffs == "sample" else (B, Tn, K), device="meta")
        return MLL.layout(x, bank, a, None, False).mix_b
    assert mix_b(16, 1024, 4096, 4096, 8)  # W2a
    assert mix_b(256, 49, 1024, 1024, 8)  # W2b
    assert not mix_b(64, 1, 4096, 4096, 4)  # W6 decode, 64 rows
    assert not mix_b(8192, 4, 4096, 4096, 4, coeffs="token")


# ----------------------------------------------------------------------------- GPU only

gpu = pytest.mark.gpu

GPU_TOL = {torch.float32: T.TOLERANCE[torch.float32], "tf32": 5e-4, torch.float16: T.TOLERANCE[torch.float16],
           torch.bfloat16: T.TOLERANCE[torch.bfloat16]}


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, "tf32", torch.float16, torch.bfloat16],
                         ids=["f32", "tf32", "f16", "bf16"])
@pytest.mark.parametrize("case", LINEAR + TILED, ids=[c.id for c in LINEAR + TILED])
def test_gpu_matches_reference(case, dtype):
    tf32 = dtype == "tf32"
    dt = torch.float32 if tf32 else dtype
    # set and restored by hand: monkeypatch undoes setattr on this module with delattr, which
    # pytest 9 reports as a teardown error ('cuBLASModule' object has no attribute 'allow_tf32')
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        expected = T.run_case(case, "reference", dt, device="cuda", compute_dtype=torch.float64)
        actual = T.run_case(case, "triton", dt, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    bad = [str(c) for c in (T.compare(k, actual.get(k), expected[k], GPU_TOL[dtype]) for k in expected) if not c.ok]
    assert not bad, f"{case.id}\n  " + "\n  ".join(bad)


LARGE = [
    T.Case(L, B=4, T=300, I=1000, O=520, K=1, styles="sample", demodulate=True, bias="shared"),
    T.Case(L, B=16, T=49, I=512, O=384, K=8, coeffs="sample", bias="bank"),
    T.Case(L, B=4, T=200, I=384, O=640, K=4, coeffs="sample", styles="sample", demodulate=True, bias="bank"),
    T.Case(L, B=2, T=257, I=320, O=200, K=4, coeffs="token", bias="bank"),
    T.Case(L, B=2, T=130, I=256, O=192, K=3, coeffs="token", styles="token", demodulate=True),
    T.Case(L, B=64, T=1, I=1024, O=2048, K=4, coeffs="sample"),
]


@gpu
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", LARGE, ids=[c.id for c in LARGE])
def test_gpu_large(case, dtype, det):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(det)
    try:
        _check(case, dtype)
    finally:
        torch.use_deterministic_algorithms(old)


def _peak_fwd_bwd(B, Tn, I, O, K, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, Tn, I, device="cuda", dtype=dtype, generator=g).requires_grad_()
    bank = (torch.randn(K, O, I, device="cuda", dtype=dtype, generator=g) / I ** 0.5).requires_grad_()
    a = torch.rand(B, K, device="cuda", dtype=dtype, generator=g).requires_grad_()
    s = (torch.rand(B, I, device="cuda", dtype=dtype, generator=g) + 0.5).requires_grad_()
    # warm up (autotuning allocates), then measure
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = MF.mod_linear(x, bank, a, s, demodulate=True, backend="triton")
        y.float().square().sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for t in (x, bank, a, s):
            t.grad = None
        del y
    return peak


@gpu
def test_gpu_peak_memory_scales_with_activations_and_bank_not_samples_times_weight():
    """fwd+bwd peak (above the inputs) ~ B*T*(I+O) + K*O*I, never B*O*I: with many samples
    and few rows each, a formed per-sample weight would dwarf everything else."""
    I = O = 1024
    K, Tn, eb = 4, 4, 2
    peaks = {}
    for B in (64, 256):
        peaks[B] = _peak_fwd_bwd(B, Tn, I, O, K)
        acts = B * Tn * (I + O) * eb
        bankb = K * O * I * eb
        formed = B * O * I * eb
        # generous constants (float32 temporaries, split/partial buffers), still far below formed
        assert peaks[B] <= 12 * acts + 6 * bankb + (64 << 20), (B, peaks[B], acts, bankb)
        assert peaks[B] < formed / 4, (B, peaks[B], formed)
    # quadrupling B adds at most activation-proportional memory
    assert peaks[256] - peaks[64] <= 12 * (256 - 64) * Tn * (I + O) * eb + (16 << 20)


@gpu
def test_gpu_input_over_2_pow_31_elements():
    """x with more than 2^31 elements (int64 offsets): rows far apart are right."""
    B, Tn, I, O, K = 1, (1 << 31) // 2048 + 64, 2048, 16, 2
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * B * Tn * I * 2:
        pytest.skip("not enough GPU memory")
    x = torch.randn(B, Tn, I, device="cuda", dtype=torch.float16)
    assert x.numel() > 2 ** 31
    bank = torch.randn(K, O, I, device="cuda", dtype=torch.float16) / I ** 0.5
    a = torch.rand(B, K, device="cuda", dtype=torch.float16)
    y = MF.mod_linear(x, bank, a, None, backend="triton")
    M = (a.float() @ bank.float().view(K, -1)).view(O, I)
    for rows in (slice(0, 64), slice(Tn - 64, Tn)):
        ref = x[0, rows].float() @ M.t()
        torch.testing.assert_close(y[0, rows].float(), ref, rtol=2e-2, atol=2e-2)


def test_host_facts_written_once(monkeypatch):
    """interpreting(), AUTOTUNE and the shared-memory limit have one definition (triton_kernels/_host.py)
    for both ops' configs, and AUTOTUNE one reader, the one launch path (triton_kernels/_launch.py);
    the limit is the device's own on a GPU, the H100's offline."""
    from modweights.triton_kernels import _host
    from modweights.triton_kernels import _launch as L
    from modweights.triton_kernels import mod_conv2d_configs as CC
    from modweights.triton_kernels import mod_linear_configs as LC
    assert LC.interpreting is CC.interpreting is _host.interpreting
    assert LC.smem_bytes is CC.smem_bytes is _host.smem_bytes and L.AUTOTUNE == _host.AUTOTUNE
    assert not hasattr(LC, "AUTOTUNE") and not hasattr(CC, "AUTOTUNE")
    for value, on in (("", False), ("0", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("MODWEIGHTS_TEST_SWITCH", value)
        assert _host._on("MODWEIGHTS_TEST_SWITCH", "1") is on
    monkeypatch.delenv("MODWEIGHTS_TEST_SWITCH")
    assert _host._on("MODWEIGHTS_TEST_SWITCH", "1") and not _host._on("MODWEIGHTS_TEST_SWITCH", "0")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        assert _host.smem_bytes() == props.shared_memory_per_block_optin
    else:
        assert _host.smem_bytes() == _host.H100_SMEM_BYTES == 227 * 1024


def test_backward_checks_g_and_saved():
    """The launcher's backward refuses a ``g`` of another shape than the output and, with
    demodulation, a missing ``d`` / ``y`` (the rules in ``_checks``), before any kernel runs."""
    x, bank = torch.randn(2, 3, 4, device=DEV), torch.randn(1, 5, 4, device=DEV)
    with pytest.raises(ValueError, match=r"`g` must have shape \(2, 3, 5\) \(the forward output's\); got \(2, 3, 4\)"):
        ML.backward(torch.randn(2, 3, 4, device=DEV), x, bank, None, None, None, None, None, False, 1e-8, [True] * 5)
    with pytest.raises(ValueError, match=r"with demodulate=True, `d` and `y` from the forward are required"):
        ML.backward(torch.randn(2, 3, 5, device=DEV), x, bank, None, None, None, torch.empty(0), None, True, 1e-8,
                    [True] * 5)
