"""modweights.compat.stylegan2 against StyleGAN2-ADA's definition.

The reference below is written from their definition (training/networks.py
``modulated_conv2d``, torch_utils/ops/conv2d_resample.py, upfirdn2d.py ``_upfirdn2d_ref``) in
plain PyTorch: the fused path forms per-sample weights and runs one grouped conv (with
``conv_transpose2d`` when up-sampling), the non-fused path scales, convolves and scales. Ours
must give the same outputs and gradients (x, weight, styles, noise) in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from modweights import testing as T
from modweights.compat import stylegan2 as SG

# ----------------------------------------------------------------------------- the reference


def _pads(padding):
    if isinstance(padding, int):
        padding = [padding, padding]
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    return tuple(padding)


def ref_upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Zero-stuff (reshape + pad), pad/crop, depthwise FIR conv, keep every down-th pixel."""
    if f is None:
        f = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    B, C, H, W = x.shape
    x0, x1, y0, y1 = _pads(padding)
    x = x.reshape(B, C, H, 1, W, 1)
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(B, C, H * up, W * up)
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    f = (f * gain ** (f.ndim / 2)).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([C, 1] + [1] * f.ndim)
    if f.ndim == 4:
        x = F.conv2d(x, f, groups=C)
    else:
        x = F.conv2d(x, f.unsqueeze(2), groups=C)
        x = F.conv2d(x, f.unsqueeze(3), groups=C)
    return x[:, :, ::down, ::down]


def _fsize(f):
    return (1, 1) if f is None else (f.shape[-1], f.shape[0])


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def ref_conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True):
    O, Ig, kh, kw = w.shape
    # their filter padding (conv2d_resample.py), taken from the package (one implementation;
    # test_resample_padding_is_theirs pins it to their values and their layers' output sizes)
    px0, px1, py0, py1 = SG._resample_padding(_pads(padding), _fsize(f), up, down)
    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = ref_upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1])
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return ref_upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up ** 2)
    if down > 1 and up == 1:
        x = ref_upfirdn2d(x, f, padding=[px0, px1, py0, py1])
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, O // groups, Ig, kh, kw).transpose(1, 2).reshape(groups * Ig, O // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight)
        x = ref_upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up ** 2)
        if down > 1:
            x = ref_upfirdn2d(x, f, down=down)
        return x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    x = ref_upfirdn2d(x, None, padding=[px0, px1, py0, py1])
    return _conv(x, w, groups=groups, flip_weight=flip_weight)


def ref_modulated_conv2d(x, weight, styles, noise=None, up=1, down=1, padding=0, resample_filter=None,
                         demodulate=True, flip_weight=True, fused_modconv=True):
    B = x.shape[0]
    O, I, kh, kw = weight.shape
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / math.sqrt(I * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    w = dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(B, 1, -1, 1, 1)  # [B, O, I, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [B, O]
    if demodulate and fused_modconv:
        w = w * dcoefs.reshape(B, -1, 1, 1, 1)
    kw_ = dict(f=resample_filter, up=up, down=down, padding=padding, flip_weight=flip_weight)
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(B, -1, 1, 1)
        x = ref_conv2d_resample(x, weight.to(x.dtype), **kw_)
        if demodulate:
            x = x * dcoefs.to(x.dtype).reshape(B, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x
    x = x.reshape(1, -1, *x.shape[2:])
    x = ref_conv2d_resample(x, w.reshape(-1, I, kh, kw).to(x.dtype), groups=B, **kw_)
    x = x.reshape(B, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


def ref_setup_filter(f, normalize=True, flip_filter=False, gain=1, separable=None):
    f = torch.as_tensor(f, dtype=torch.float32)
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.ndim)))
    return f * gain ** (f.ndim / 2)


# ----------------------------------------------------------------------------- cases

FIR4 = [1, 3, 3, 1]  # StyleGAN2's resample filter (2-D after setup: 4 taps < 8)
FIR8 = [1, 2, 4, 6, 6, 4, 2, 1]  # separable after setup

# (id, kernel, up, down, padding, filter, flip_weight)
CONFIGS = [
    ("plain-k3-pad1", 3, 1, 1, 1, None, True),
    ("plain-k3-asym", 3, 1, 1, [1, 0, 2, 1], None, True),
    ("plain-k3-conv", 3, 1, 1, 1, None, False),
    ("up2-k3-synthesis", 3, 2, 1, 1, FIR4, False),  # what SynthesisLayer(up=2) passes
    ("up2-k3-corr", 3, 2, 1, 1, FIR4, True),
    ("up2-k3-fir8-pad0", 3, 2, 1, 0, FIR8, False),
    ("up2-k2x3-pad-list", (2, 3), 2, 1, [1, 0], FIR4, False),
    ("down2-k3", 3, 1, 2, 1, FIR4, True),
    ("down2-k1", 1, 1, 2, 0, FIR4, True),
    ("up2-k1", 1, 2, 1, 0, FIR4, True),
    ("up2-down2-k3", 3, 2, 2, 1, FIR4, False),
    ("up3-k3", 3, 3, 1, 1, FIR4, False),
    ("up2-down2-k1", 1, 2, 2, 0, FIR4, True),  # phases no tap reaches
    ("up2-k1x3", (1, 3), 2, 1, [1, 0], FIR4, False),
]


def _inputs(kernel, up, down, padding, fir, flip, dtype, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    B, I, O, H, W = 2, 3, 4, 5, 6

    def rnd(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + offset).to(dtype)

    x = rnd(B, I, H, W)
    weight = rnd(O, I, kh, kw)
    styles = rnd(B, I, scale=0.5, offset=1.0)
    f = None if fir is None else ref_setup_filter(fir)
    kwargs = dict(up=up, down=down, padding=padding, resample_filter=f, flip_weight=flip)
    out_shape = ref_modulated_conv2d(x, weight, styles, **kwargs).shape
    n = rnd(B, 1, *out_shape[2:]) if noise else None
    return {"x": x, "weight": weight, "styles": styles, "noise": n}, kwargs, out_shape


def _run(fn, t, kwargs, demodulate, fused, seed=1):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items() if v is not None}
    y = fn(leaves["x"], leaves["weight"], leaves["styles"], noise=leaves.get("noise"), demodulate=demodulate,
           fused_modconv=fused, **kwargs)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    grads = torch.autograd.grad(y, list(leaves.values()), gy)
    return {"y": y.detach(), **{f"d{k}": gv for k, gv in zip(leaves, grads)}}


@pytest.mark.parametrize("noise", [False, True], ids=["nonoise", "noise"])
@pytest.mark.parametrize("demodulate", [True, False], ids=["demod", "nodemod"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_stylegan2_float64(cfg, fused, demodulate, noise):
    _, kernel, up, down, padding, fir, flip = cfg
    t, kwargs, _ = _inputs(kernel, up, down, padding, fir, flip, torch.float64, noise)
    expected = _run(ref_modulated_conv2d, t, kwargs, demodulate, fused)
    actual = _run(SG.modulated_conv2d, t, kwargs, demodulate, fused)
    T.assert_match(actual, expected, torch.float64, f"{cfg[0]} fused={fused} demod={demodulate} noise={noise}")


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], CONFIGS[7]], ids=[CONFIGS[i][0] for i in (0, 3, 7)])
def test_matches_stylegan2_float32(cfg):
    _, kernel, up, down, padding, fir, flip = cfg
    t, kwargs, _ = _inputs(kernel, up, down, padding, fir, flip, torch.float32, True)
    expected = _run(ref_modulated_conv2d, {k: v.double() for k, v in t.items()}, kwargs, True, True)
    actual = _run(SG.modulated_conv2d, t, kwargs, True, False)
    T.assert_match(actual, expected, torch.float32, cfg[0])


def test_float16_overflow_guard():
    """Their fp16 + demod path rescales weight and styles to a max of 1 first, so squares that
    would overflow fp16 stay finite. With weights whose squared filter norms pass 65504, ours is
    finite, y / dx / dweight match the float64 definition at the fp16 tolerance, and dstyles
    (a cancelling difference of two terms, ~0.5% off in fp16 for any PyTorch formulation,
    the reference backend included) is at least as accurate as their own code run in fp16."""
    t, kwargs, _ = _inputs(3, 1, 1, 1, None, True, torch.float16, False)
    t = {k: v for k, v in t.items() if v is not None}
    t["weight"] = t["weight"] * 200  # sum w^2 s^2 over 27 taps ~ 1e6 > fp16 max
    assert not torch.isfinite(t["weight"].square().sum((1, 2, 3))).all()
    exact = _run(ref_modulated_conv2d, {k: v.double() for k, v in t.items()}, kwargs, True, True)
    ours = _run(SG.modulated_conv2d, t, kwargs, True, True)
    theirs = _run(ref_modulated_conv2d, t, kwargs, True, True)
    assert all(torch.isfinite(v).all() for v in ours.values())
    T.assert_match({k: ours[k] for k in ("y", "dx", "dweight")}, {k: exact[k] for k in ("y", "dx", "dweight")},
                   torch.float16, "fp16 overflow guard")
    err = {k: T.compare(k, r["dstyles"], exact["dstyles"], 1.0).worst for k, r in (("ours", ours), ("theirs", theirs))}
    assert err["ours"] <= max(2 * err["theirs"], T.TOLERANCE[torch.float16]), err


UPFIRDN = [
    dict(up=2, padding=[2, 1, 2, 1], f=FIR4, gain=4),
    dict(down=2, padding=1, f=FIR4),
    dict(up=2, down=2, padding=[3, 2, 3, 2], f=FIR8, flip_filter=True),
    dict(padding=[-1, 2, 1, -2], f=None),
    dict(up=3, padding=[1, 1, 2, 2], f=[[1, 2], [3, 4]]),
]


@pytest.mark.parametrize("kw", UPFIRDN, ids=[str(i) for i in range(len(UPFIRDN))])
def test_upfirdn2d_matches(kw):
    kw = dict(kw)
    fir = kw.pop("f")
    f = None if fir is None else ref_setup_filter(fir)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    expected = ref_upfirdn2d(x, f, **kw)
    actual = SG.upfirdn2d(x, f, **kw)
    T.assert_match({"y": actual}, {"y": expected}, torch.float64, str(kw))


def test_setup_filter_matches():
    for f, kw in [(FIR4, {}), (FIR8, {}), (FIR4, dict(flip_filter=True, gain=4)), (FIR8, dict(separable=False))]:
        assert torch.allclose(SG.setup_filter(f, **kw), ref_setup_filter(f, **kw))


def test_resample_padding_is_theirs():
    """The filter padding the reference shares with the package: their values (upfirdn2d.py's
    upsample2d / downsample2d pads for StyleGAN2's 4-tap filter, and an 8 x 4 filter), and the
    output sizes of their layers: a synthesis conv (3x3, padding 1, up 2) doubles H and W, a
    discriminator conv (3x3, padding 1, down 2) halves them."""
    assert SG._resample_padding((1, 1, 1, 1), (4, 4), 2, 1) == (3, 2, 3, 2)
    assert SG._resample_padding((1, 1, 1, 1), (4, 4), 1, 2) == (2, 2, 2, 2)
    assert SG._resample_padding((0, 0, 0, 0), (8, 4), 2, 2) == (7, 6, 3, 2)
    assert SG._resample_padding((1, 0, 2, 1), (1, 1), 1, 1) == (1, 0, 2, 1)  # no resampling: as given
    f = SG.setup_filter(FIR4)
    x, w, s = torch.randn(2, 3, 8, 6), torch.randn(4, 3, 3, 3), torch.rand(2, 3) + 0.5
    for fused in (True, False):
        assert SG.modulated_conv2d(x, w, s, up=2, padding=1, resample_filter=f,
                                   fused_modconv=fused).shape == (2, 4, 16, 12)
        assert SG.modulated_conv2d(x, w, s, down=2, padding=1, resample_filter=f,
                                   fused_modconv=fused).shape == (2, 4, 4, 3)


def test_bad_input():
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="`styles`"):
        SG.modulated_conv2d(x, w, s[:1])
    with pytest.raises(ValueError, match="`weight`"):
        SG.modulated_conv2d(x, w[:, :2], s)
    with pytest.raises(ValueError, match="`x`"):
        SG.modulated_conv2d(x[0], w, s)
    with pytest.raises(ValueError, match="`up`"):
        SG.modulated_conv2d(x, w, s, up=0)
    with pytest.raises(TypeError, match="`padding`"):
        SG.modulated_conv2d(x, w, s, padding="same")
    with pytest.raises(ValueError, match="`resample_filter`"):
        SG.modulated_conv2d(x, w, s, up=2, resample_filter=torch.ones(1, 2, 2))


# ----------------------------------------------------------------------------- GPU (fused kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3], CONFIGS[7], CONFIGS[10]],
                         ids=[CONFIGS[i][0] for i in (0, 3, 7, 10)])
def test_matches_stylegan2_gpu_triton(cfg, fused, dtype):
    _, kernel, up, down, padding, fir, flip = cfg
    t, kwargs, _ = _inputs(kernel, up, down, padding, fir, flip, torch.float64, True)
    kwargs["resample_filter"] = None if kwargs["resample_filter"] is None else kwargs["resample_filter"].cuda()
    exact = _run(ref_modulated_conv2d, {k: v.cuda() for k, v in t.items()}, kwargs, True, True)
    low = {k: v.to("cuda", dtype) for k, v in t.items()}
    actual = _run(lambda *a, **k: SG.modulated_conv2d(*a, backend="triton", **k), low, kwargs, True, fused)
    T.assert_match(actual, exact, dtype, cfg[0])
