"""The triton backend's conv2d kernels against the reference.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py): float32 and
float16 (bf16 dots are wrong under the interpreter; bf16 is tested on the GPU), tiny shapes.
Every output and every gradient is compared with the reference computed in float64 from the
same inputs, with the tolerances of :data:`modweights.testing.TOLERANCE`.
"""
import pytest
import torch

from modweights import _autograd
from modweights import functional as MF
from modweights import testing as T
from modweights.backends.triton import mod_conv2d as TC

from conftest import require_backend

pytest.importorskip("modweights.backends.triton")
MC = pytest.importorskip("modweights.triton_kernels.mod_conv2d")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_available():
    require_backend("triton", DEVICE)


def _supported(case) -> bool:
    return TC.supports_mod_conv2d(dtype=torch.float32, groups=case.conv.get("groups", 1), in_channels=case.I,
                              out_channels=case.O)[0]


C = "mod_conv2d"
EXTRA = [
    # depthwise (groups == I == O): mixture + bank bias + stride; demod + dilation; K = 1 plain
    T.Case(C, B=2, I=6, O=6, K=3, H=7, W=6, coeffs="sample", bias="bank", conv={"groups": 6, "padding": 1, "stride": 2}),
    T.Case(C, B=2, I=5, O=5, K=2, H=6, W=7, coeffs="sample", demodulate=True, bias="shared",
           conv={"groups": 5, "padding": 2, "dilation": 2}),
    T.Case(C, B=1, I=4, O=4, K=1, H=5, W=5, kernel=(3, 3), bias="shared", conv={"groups": 4}),
    # 5x3 kernel, mixed dilation, GigaGAN-style mixture + modulation + demod, 77 output pixels
    # (more than one 64-pixel block: the pixel-tile loop and its tail)
    T.Case(C, B=2, I=3, O=5, K=2, H=11, W=9, kernel=(5, 3), coeffs="sample", styles="sample", demodulate=True,
           conv={"padding": (2, 1), "dilation": (1, 2)}),
    # StyleGAN2 K = 1, stride 2 with demod and bias
    T.Case(C, B=3, I=5, O=6, K=1, H=9, W=8, styles="sample", demodulate=True, bias="shared",
           conv={"stride": 2, "padding": 1}),
    # channel counts past one 16-wide block on both sides
    T.Case(C, B=1, I=19, O=17, K=2, H=5, W=4, coeffs="sample", styles="sample", conv={"padding": 1}),
]
CASES = [c for c in T.op_cases("mod_conv2d") if _supported(c)] + EXTRA
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference(case, dtype):
    expected = T.run_case(case, "reference", dtype, device=DEVICE, compute_dtype=torch.float64)
    actual = T.run_case(case, "triton", dtype, device=DEVICE)
    T.assert_match(actual, expected, dtype, case.id)


def test_every_supported_case_is_covered():
    """Every case of the shared list is either run above or reported as not implemented."""
    for c in T.op_cases("mod_conv2d"):
        ok, reason = TC.supports_mod_conv2d(dtype=torch.float32, groups=c.conv.get("groups", 1), in_channels=c.I,
                                        out_channels=c.O)
        assert ok or "not implemented" in reason, (c.id, reason)
    assert any(not _supported(c) for c in T.op_cases("mod_conv2d"))  # groups = 2 of 4 -> 6: the torch backend's


def test_unsupported_is_said_clearly():
    ok, reason = TC.supports_mod_conv2d(dtype=torch.float32, groups=2, in_channels=4, out_channels=6)
    assert not ok and "not implemented" in reason and "groups = 2" in reason
    ok, reason = TC.supports_mod_conv2d(dtype=torch.float64, groups=1)
    assert not ok and "float64" in reason
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    bank = torch.randn(2, 6, 2, 3, 3, device=DEVICE)
    with pytest.raises(RuntimeError, match="not implemented"):
        MF.mod_conv2d(x, bank, torch.rand(1, 2, device=DEVICE), groups=2, backend="triton")
    # auto never picks a backend that cannot run the problem
    y = MF.mod_conv2d(x, bank, torch.rand(1, 2, device=DEVICE), groups=2)
    assert y.shape == (1, 6, 3, 3)


@pytest.mark.parametrize("case", [EXTRA[3], EXTRA[1]], ids=["dense-demod", "depthwise-demod"])
def test_sample_splits(case, switch):
    """The weight-side kernels split the batch into sample ranges on a GPU; force it here."""
    case = T.Case(**{**case.__dict__, "B": 3})
    switch(triton_split=2)
    expected = T.run_case(case, "reference", torch.float32, device=DEVICE, compute_dtype=torch.float64)
    T.assert_match(T.run_case(case, "triton", torch.float32, device=DEVICE), expected, torch.float32, case.id)


def test_expert_chunks(switch):
    """More experts than the weight kernel's register budget: K is processed in chunks."""
    case = T.Case(C, B=3, I=5, O=7, K=5, H=6, W=5, coeffs="sample", styles="sample", demodulate=True, bias="bank",
                  conv={"padding": 1})
    switch(triton_conv2d_max_block_k=2)
    expected = T.run_case(case, "reference", torch.float32, device=DEVICE, compute_dtype=torch.float64)
    T.assert_match(T.run_case(case, "triton", torch.float32, device=DEVICE), expected, torch.float32, case.id)


@pytest.mark.parametrize("gpu_layouts", [True, False], ids=["gpu-layouts", "as-is"])
@pytest.mark.parametrize("case", [EXTRA[3], EXTRA[0], EXTRA[5]], ids=["dense-demod", "depthwise", "wide"])
def test_layouts(case, gpu_layouts, switch):
    """On a GPU the launchers read x and g channels-last and copy the bank into a tile-friendly
    layout (not under the interpreter); the kernels honour any strides, so both agree with
    the reference, and outputs keep the caller's memory format."""
    switch(triton_conv2d_bank_relayout=gpu_layouts, triton_conv2d_channels_last=gpu_layouts)
    expected = T.run_case(case, "reference", torch.float32, device=DEVICE, compute_dtype=torch.float64)
    actual = T.run_case(case, "triton", torch.float32, device=DEVICE)
    assert actual["y"].is_contiguous() and actual["dx"].is_contiguous()
    T.assert_match(actual, expected, torch.float32, case.id)


def test_deterministic():
    """No atomics: two backward passes agree bit for bit, deterministic mode on or off."""
    case = CASES[0]
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        a = T.run_case(case, "triton", torch.float32, device=DEVICE)
        b = T.run_case(case, "triton", torch.float32, device=DEVICE)
    finally:
        torch.use_deterministic_algorithms(old)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_and_expanded_gradient():
    """channels_last input: same values, output and dx channels_last like F.conv2d's; a
    stride-0 upstream gradient (``y.sum()``) is read through its strides."""
    case = T.Case(C, B=2, I=5, O=6, K=2, H=6, W=5, coeffs="sample", styles="sample", demodulate=True,
                  bias="bank", conv={"padding": 1})
    inputs = T.make_inputs(case, torch.float32, DEVICE)
    results = {}
    for name, fmt in (("reference", torch.contiguous_format), ("triton", torch.channels_last)):
        t = {k: None if v is None else v.detach().clone() for k, v in inputs.items()}
        t["x"] = t["x"].to(memory_format=fmt)
        leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}
        y = T.call(case, {k: leaves.get(k) for k in T.GRAD_NAMES}, name)
        grads = torch.autograd.grad(y.sum(), list(leaves.values()))
        results[name] = {"y": y.detach(), **{f"d{k}": gv for k, gv in zip(leaves, grads)}}
        if name == "triton":
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert results[name]["dx"].is_contiguous(memory_format=torch.channels_last)
    T.assert_match(results["triton"], results["reference"], torch.float32, "channels_last")


def test_double_backward_runs_torch_composite(monkeypatch):
    """create_graph=True: the glue hands the backward to the torch backend's differentiable
    composite (the kernels' backward is not differentiable); second-order gradients match the
    reference's. Without create_graph the kernels' backward runs."""
    case = T.Case(C, B=2, I=3, O=4, K=2, H=5, W=5, coeffs="sample", styles="sample", demodulate=True,
                  bias="bank", conv={"padding": 1})
    calls = []
    kernel_backward = MC.backward
    monkeypatch.setattr(MC, "backward", lambda *a, **k: calls.append(1) or kernel_backward(*a, **k))

    def second_order(backend, create_graph):
        t = T.make_inputs(case, torch.float64 if backend == "reference" else torch.float32, DEVICE)
        leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}
        y = T.call(case, {k: leaves.get(k) for k in T.GRAD_NAMES}, backend)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
        g1 = torch.autograd.grad(y, list(leaves.values()), gy, create_graph=create_graph)
        if not create_graph:
            return None
        loss = sum((g.square() * (i + 1)).sum() for i, g in enumerate(g1))
        g2 = torch.autograd.grad(loss, list(leaves.values()))
        return {f"d2{k}": g for k, g in zip(leaves, g2)}

    second_order("triton", create_graph=False)
    assert calls == [1]
    actual = second_order("triton", create_graph=True)
    assert calls == [1], "create_graph=True must not run the (non-differentiable) kernel backward"
    expected = second_order("reference", create_graph=True)
    T.assert_match(actual, expected, torch.float32, "double backward")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_custom_ops_opcheck(memory_format):
    """The kernels run inside the shared glue's custom ops (forward, kernel backward), whose fake
    implementations (mod_conv2d_forward_fake, mod_conv2d_backward_fake) must match them, strides included:
    y and dx come back in x's memory format."""
    case = T.Case(C, B=2, I=3, O=4, K=2, H=5, W=4, coeffs="sample", styles="sample", demodulate=True,
                  bias="bank", conv={"padding": 1, "stride": (2, 1)})
    t = T.make_inputs(case, torch.float32, DEVICE)
    op, glue = _autograd.custom_op("mod_conv2d", "triton"), _autograd._glue("mod_conv2d", "triton")
    cfg = (True, 1e-8, [2, 1], [1, 1], [1, 1], 1)
    args = (t["x"].contiguous(memory_format=memory_format), t["bank"], t["coeffs"], t["styles"], t["bias"], *cfg)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    y, d = op(*args)
    g = torch.randn_like(y)
    bargs = (g, *args[:5], d, y, [True] * 5, *cfg)
    torch.library.opcheck(glue.bwd_op, bargs, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """torch.compile traces through the shared glue's custom ops without a graph break."""
    case = T.Case(C, B=2, I=3, O=4, K=2, H=6, W=6, coeffs="sample", styles="sample", demodulate=True,
                  conv={"padding": 1})
    t = T.make_inputs(case, torch.float32, DEVICE)
    leaves = [t[k].requires_grad_() for k in ("x", "bank", "coeffs", "styles")]

    def f(x, bank, a, s):
        return MF.mod_conv2d(x, bank, a, s, demodulate=True, padding=1, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(*leaves), leaves)
    actual = torch.autograd.grad(compiled(*leaves), leaves)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [
    T.Case(C, B=4, I=64, O=96, K=1, H=17, W=19, styles="sample", demodulate=True, bias="shared",
           conv={"padding": 1}),
    T.Case(C, B=5, I=48, O=40, K=4, H=15, W=13, coeffs="sample", bias="bank", conv={"padding": 1, "stride": 2}),
    T.Case(C, B=3, I=96, O=80, K=3, H=16, W=16, coeffs="sample", styles="sample", demodulate=True, bias="bank",
           conv={"padding": 2, "dilation": 2}),
    T.Case(C, B=2, I=130, O=70, K=2, H=9, W=9, kernel=(1, 1), coeffs="sample"),
    T.Case(C, B=4, I=72, O=72, K=4, H=21, W=20, kernel=(5, 5), coeffs="sample", demodulate=True,
           conv={"groups": 72, "padding": 2, "stride": 2}),
    T.Case(C, B=3, I=64, O=64, K=2, H=14, W=14, coeffs="sample", bias="shared", conv={"groups": 64, "padding": 1}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=[c.id for c in CASES + GPU_CASES])
def test_matches_reference_gpu(case, dtype):
    expected = T.run_case(case, "reference", dtype, device="cuda", compute_dtype=torch.float64)
    actual = T.run_case(case, "triton", dtype, device="cuda")
    T.assert_match(actual, expected, dtype, case.id)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 3])
def test_sample_splits_gpu(split, switch):
    switch(triton_split=split)
    for case in GPU_CASES[:3] + GPU_CASES[4:5]:
        expected = T.run_case(case, "reference", torch.float32, device="cuda", compute_dtype=torch.float64)
        T.assert_match(T.run_case(case, "triton", torch.float32, device="cuda"), expected, torch.float32, case.id)


def test_default_config_counts_the_element_size(monkeypatch):
    """With autotuning off each kernel runs the first config its pruning keeps for the launch's
    inputs (the one launch path, ``triton_kernels/_launch.py``): the default counts their element
    size in the shared-memory fit, the weight kernel's included (it used to assume 2-byte
    elements there)."""
    from modweights.triton_kernels import _host
    from modweights.triton_kernels import _launch as L
    from modweights.triton_kernels import mod_conv2d_configs as CC
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_host, "H100_SMEM_BYTES", 100_000)  # a 128x64 weight tile fits in 2 bytes, not in 4
    kernels = (MC._mod_conv2d_fwd_kernel, MC._mod_conv2d_bwd_dx_kernel, MC._mod_conv2d_bwd_weight_kernel)
    tables = ((CC.prune_fwd, CC.fwd_configs, "x_ptr"), (CC.prune_dx, CC.dx_configs, "w_ptr"),
              (CC.prune_weight, CC.weight_configs, "x_ptr"))

    def default(raw, t, bk):
        args = [t if n.endswith("_ptr") else 1 for n in raw.arg_names if n[0].islower()]
        return L.default_meta(raw, args, dict(BLOCK_K=bk))

    for dtype in (torch.float16, torch.float32):
        t = torch.empty(1, dtype=dtype)
        for raw, (prune, configs, ptr) in zip(kernels, tables):
            for bk in (1, 4):
                first = prune(configs(), {ptr: t}, BLOCK_K=bk)[0]
                want = dict(first.kwargs, num_warps=first.num_warps, num_stages=first.num_stages)
                assert default(raw, t, bk) == want, (dtype, raw, bk)
    w2 = default(MC._mod_conv2d_bwd_weight_kernel, torch.empty(1, dtype=torch.float16), 1)
    w4 = default(MC._mod_conv2d_bwd_weight_kernel, torch.empty(1, dtype=torch.float32), 1)
    assert (w2["BLOCK_O"], w2["BLOCK_I"]) == (128, 64) and (w4["BLOCK_O"], w4["BLOCK_I"]) == (64, 32)


@pytest.mark.parametrize("cudnn_tf32, matmul_tf32", [(False, False), (True, False), (False, True), (True, True)])
def test_float32_dots_follow_the_cudnn_tf32_switch(cudnn_tf32, matmul_tf32, monkeypatch):
    """float32 conv dots run in TF32 exactly when torch.backends.cudnn.allow_tf32 is set (the
    switch F.conv2d follows; PyTorch's default is on), whatever the matmul switch says: every
    dot kernel of forward and backward is launched with that precision. Half inputs: moot."""
    torch.backends.cudnn.allow_tf32 = cudnn_tf32  # conftest.py restores both switches
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    want = "tf32" if cudnn_tf32 else "ieee"
    assert MC._dot_prec(torch.float32) == want and MC._dot_prec(torch.float16) == "tf32"
    from modweights.triton_kernels import _launch as L
    launched = {}
    monkeypatch.setattr(L, "launch", lambda raw, grid, args, flags: launched.setdefault(
        L.KERNELS[raw].name.split("_")[-2], flags))
    x, bank = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3, 3)
    coeffs, styles = torch.rand(2, 2), torch.rand(2, 3)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    y, d = MC.forward(x, bank, coeffs, styles, None, False, 1e-8, *geo)
    MC.backward(torch.ones_like(y), x, bank, coeffs, styles, None, d, y, False, 1e-8, *geo, (True,) * 5)
    assert {k: f["DOT_PREC"] for k, f in launched.items() if "DOT_PREC" in f} == {"fwd": want, "dx": want,
                                                                                 "weight": want}


def test_backward_checks_g_and_needs():
    """The launcher's backward takes the output size from the geometry (the shared rule in
    ``_checks``), not from ``g``: a ``g`` of another shape is a ValueError naming it, before any
    kernel runs, as is a ``needs`` that is not 5 bools."""
    x, bank = torch.randn(1, 2, 5, 5, device=DEVICE), torch.randn(1, 3, 2, 3, 3, device=DEVICE)
    geo = ((1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match=r"`g` must have shape \(1, 3, 5, 5\) \(the forward output's\); "
                                         r"got \(1, 3, 3, 3\)"):
        MC.backward(torch.randn(1, 3, 3, 3, device=DEVICE), x, bank, None, None, None, None, None, False, 1e-8,
                    *geo, [True] * 5)
    with pytest.raises(ValueError, match=r"`needs` must hold 5 bools"):
        MC.backward(torch.randn(1, 3, 5, 5, device=DEVICE), x, bank, None, None, None, None, None, False, 1e-8,
                    *geo, [True] * 2)


def test_sizes_beyond_the_offsets_are_refused(switch):
    """Sizes past the kernels' 32-bit offsets are a ValueError naming the argument (the limit is
    lowered here so that small tensors reach it)."""
    x, bank = torch.randn(1, 2, 5, 5, device=DEVICE), torch.randn(1, 3, 2, 3, 3, device=DEVICE)
    switch(triton_conv2d_max_elements=49)
    with pytest.raises(ValueError, match=r"`x` has I \* H \* W \(elements of one sample\) = 50; the triton conv2d "
                                         r"kernels \(32-bit offsets; use the torch backend\) take at most 49"):
        MC.forward(x, bank, None, None, None, False, 1e-8, (1, 1), (1, 1), (1, 1), 1)
    switch(triton_conv2d_max_elements=70)
    with pytest.raises(ValueError, match=r"`x` has O \* HO \* WO \(elements of one output\) = 75"):
        MC.forward(x, bank, None, None, None, False, 1e-8, (1, 1), (1, 1), (1, 1), 1)


def test_interpreter_takes_runtime_loop_bounds():
    """A loop over a runtime bound (a kernel argument, and tl.cdiv of one) runs under the
    interpreter: Triton 3.6's interpreter with NumPy >= 2.4 raised "only 0-dimensional arrays
    can be converted to Python scalars" there, in every kernel (triton_kernels/_interpreter_compat.py).
    The GPU compiles the same source."""
    import triton
    import triton.language as tl

    from modweights.triton_kernels import _host

    if DEVICE != "cpu" or not _host.interpreting():
        pytest.skip("the interpreter runs on the CPU only")

    @triton.jit
    def _count(o_ptr, N, BLOCK: tl.constexpr):
        acc = 0
        for i in range(0, N):
            acc += i
        for b in range(0, tl.cdiv(N, BLOCK)):
            acc += 100
        tl.store(o_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    _count[(1,)](out, 7, BLOCK=4)
    assert out.item() == sum(range(7)) + 2 * 100
