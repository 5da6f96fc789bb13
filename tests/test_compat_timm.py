"""modweights.compat.timm: swapping timm's CondConv2d for ours changes nothing observable.

Same outputs and gradients (input and every parameter) before and after the swap, in eval
and train mode; the same state_dict keys; the very same parameter objects.
"""
import pytest
import torch

timm = pytest.importorskip("timm")
from timm.layers import CondConv2d  # noqa: E402

from modweights import testing as T  # noqa: E402
from modweights.compat.timm import TimmCondConv2d, swap_condconv  # noqa: E402
from modweights.nn import MixtureConv2d  # noqa: E402

TOL = T.TOLERANCE[torch.float32]


def _fwd_bwd(model, x, seed=0):
    """Output and gradients of (x, every parameter) for a fixed random upstream gradient;
    the RNG is re-seeded so train-mode dropout draws the same masks."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = model(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=y.dtype).to(y.device)
    y.backward(gy)
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"d{n}": p.grad for n, p in model.named_parameters()})
    return out


def _assert_same(after, before, dtype, context):
    """Every output/gradient within the dtype's tolerance of the timm model's. Gradients that
    are zero in exact arithmetic (train-mode BatchNorm cancels some bias gradients exactly:
    the float64 reference holds ~1e-17 of the largest gradient there) carry no relative
    precision; ours must be as small: within 1e-12 of the largest gradient."""
    scale = max(v.abs().max().item() for v in before.values())
    bad = []
    for k, e in before.items():
        a = after[k]
        if e.abs().max().item() <= 1e-12 * scale:
            if a.abs().max().item() > 1e-12 * scale:
                bad.append(f"{k}: zero in exact arithmetic, got max {a.abs().max().item():.3g}")
            continue
        c = T.compare(k, a, e, T.TOLERANCE[dtype])
        if not c.ok:
            bad.append(str(c))
    assert not bad, f"{context}\n  " + "\n  ".join(bad)


# Eval mode in float32. Train mode in float64: with batch statistics the network is
# ill-conditioned at this size (BatchNorm over 8 values per channel in the last stage), so
# two float32 summation orders differ by more than float32's tolerance for reasons that have
# nothing to do with the swap; float64 shows the two models agree to ~1e-13.
@pytest.mark.parametrize("name,mode,dtype", [
    ("efficientnet_cc_b0_4e", "eval", torch.float32),
    ("efficientnet_cc_b0_4e", "train", torch.float64),
    ("tf_efficientnet_cc_b0_4e", "eval", torch.float32),  # TF 'SAME': dynamic padding when strided
], ids=["cc_b0_4e-eval-f32", "cc_b0_4e-train-f64", "tf_cc_b0_4e-eval-f32"])
def test_swap_efficientnet_cc(name, mode, dtype):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(dtype)
    getattr(model, mode)()
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    n_condconv = sum(isinstance(m, CondConv2d) for m in model.modules())
    keys = list(model.state_dict().keys())
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}  # train passes move BN statistics

    before = _fwd_bwd(model, x)
    count = swap_condconv(model)
    model.load_state_dict(state)
    after = _fwd_bwd(model, x)

    assert count == n_condconv > 0
    assert not any(isinstance(m, CondConv2d) for m in model.modules())
    assert sum(isinstance(m, TimmCondConv2d) for m in model.modules()) == count
    assert all(isinstance(m, MixtureConv2d) for m in model.modules() if isinstance(m, TimmCondConv2d))
    assert all(m.training == (mode == "train") for m in model.modules())
    assert list(model.state_dict().keys()) == keys
    now = dict(model.named_parameters())
    assert now.keys() == params.keys() and all(now[k] is params[k] for k in params)
    _assert_same(after, before, dtype, f"{name} {mode}")


# one layer at a time: bias, groups (depthwise), stride, dilation, dynamic 'same' padding
CONDCONV_CONFIGS = [
    dict(in_channels=5, out_channels=7, kernel_size=3, padding="", bias=True, num_experts=3),
    dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, padding="same", groups=6, num_experts=4),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding="same", groups=2, num_experts=2),
    dict(in_channels=4, out_channels=5, kernel_size=3, dilation=2, padding="valid", bias=True, num_experts=2),
    dict(in_channels=3, out_channels=4, kernel_size=1, num_experts=1),
]


@pytest.mark.parametrize("kw", CONDCONV_CONFIGS, ids=[str(i) for i in range(len(CONDCONV_CONFIGS))])
def test_adapter_matches_condconv(kw):
    torch.manual_seed(0)
    src = CondConv2d(**kw)
    ours = TimmCondConv2d.from_timm(src)
    assert ours.weight is src.weight and ours.bias is src.bias
    x = torch.randn(3, kw["in_channels"], 9, 8)
    r = torch.rand(3, kw["num_experts"])
    results = []
    for m in (src, ours):
        m.zero_grad(set_to_none=True)
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = m(xi, ri)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(y, [xi, ri] + [p for p in m.parameters()], gy)
        results.append({"y": y.detach(), **{f"g{i}": g for i, g in enumerate(grads)}})
    T.assert_match(results[1], results[0], torch.float32, str(kw))


def test_adapter_channels_last_and_repr():
    torch.manual_seed(0)
    src = CondConv2d(4, 6, 3, padding="", num_experts=2)
    ours = TimmCondConv2d.from_timm(src)
    x = torch.randn(2, 4, 7, 7).to(memory_format=torch.channels_last)
    r = torch.rand(2, 2)
    torch.testing.assert_close(ours(x, r), src(x, r), rtol=TOL, atol=TOL)
    assert "num_experts=2" in repr(ours)


def test_bad_input():
    src = CondConv2d(4, 6, 3, num_experts=2)
    with pytest.raises(TypeError, match="routing_weights"):
        TimmCondConv2d.from_timm(src)(torch.randn(1, 4, 5, 5), None)
    with pytest.raises(TypeError, match="`model`"):
        swap_condconv(src)
    with pytest.raises(TypeError, match="`source`"):
        TimmCondConv2d(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="`coeffs`"):
        TimmCondConv2d.from_timm(src)(torch.randn(2, 4, 5, 5), torch.rand(2, 3))


def test_compat_import_is_lazy():
    import subprocess
    import sys
    code = "import sys, modweights.compat; assert 'timm' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.gpu
def test_swap_efficientnet_cc_gpu():
    """On a GPU the swapped layers run modweights' fused kernels (backend="triton" for the 1x1
    and depthwise CondConv layers); eval-mode float32 outputs and gradients as timm's."""
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_cc_b0_4e", pretrained=False).cuda().eval()
    x = torch.randn(4, 3, 96, 96, device="cuda")
    before = _fwd_bwd(model, x)
    swap_condconv(model, backend="triton")
    after = _fwd_bwd(model, x)
    _assert_same(after, before, torch.float32, "gpu eval")
