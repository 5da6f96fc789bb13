"""Bad input gets a ValueError/TypeError naming the argument and the expected shape."""
import pytest
import torch

from modweights import functional as MF

x3 = torch.randn(2, 5, 4)
bank = torch.randn(3, 6, 4)
coeffs = torch.rand(2, 3)
styles = torch.rand(2, 4)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(4)), ValueError, r"`x` must have shape \(B, I\) or \(B, T, I\); got \(4,\)"),
        (dict(bank=torch.randn(6, 4)), ValueError, r"`bank` must have shape \(K, O, I\) with I = 4"),
        (dict(bank=torch.randn(3, 6, 5)), ValueError, r"`bank`.*I = 4.*got \(3, 6, 5\)"),
        (dict(coeffs=torch.rand(2, 2)), ValueError, r"`coeffs` must have shape \(B, K\) = \(2, 3\)"),
        (dict(coeffs=torch.rand(3, 3)), ValueError, r"`coeffs`.*got \(3, 3\)"),
        (dict(coeffs=torch.rand(2, 4, 3)), ValueError, r"\(B, T, K\) = \(2, 5, 3\)"),
        (dict(coeffs=None), ValueError, r"`coeffs` is None, which needs a single weight \(K = 1\)"),
        (dict(styles=torch.rand(2, 5)), ValueError, r"`styles` must have shape \(B, I\) = \(2, 4\)"),
        (dict(styles=torch.rand(2, 3, 4)), ValueError, r"`styles`.*\(B, T, I\) = \(2, 5, 4\)"),
        (dict(bias=torch.randn(5)), ValueError, r"`bias` must have shape \(O,\) = \(6,\) or \(K, O\) = \(3, 6\)"),
        (dict(bias=torch.randn(2, 6)), ValueError, r"`bias`.*got \(2, 6\)"),
        (dict(coeffs=coeffs.double()), TypeError, r"`coeffs` has dtype torch.float64 but `x` has torch.float32"),
        (dict(x=x3.long()), TypeError, r"`x` must be a floating-point tensor"),
        (dict(styles=[1.0, 2.0]), TypeError, r"`styles` must be a torch.Tensor or None; got list"),
        (dict(eps=-1.0), ValueError, r"`eps` must be a finite non-negative number"),
        (dict(backend="nope"), ValueError, r"unknown modweights backend 'nope'; choose one of reference, torch"),
    ],
)
def test_mod_linear_bad_input(kwargs, exc, match):
    args = dict(x=x3, bank=bank, coeffs=coeffs, styles=styles, bias=None, eps=1e-8, backend=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MF.mod_linear(args["x"], args["bank"], args["coeffs"], args["styles"], bias=args["bias"], eps=args["eps"],
                      backend=args["backend"])


def test_2d_input_rejects_per_token_coeffs():
    with pytest.raises(ValueError, match=r"`coeffs` must have shape \(B, K\) = \(2, 3\); got \(2, 1, 3\)"):
        MF.mod_linear(x3[:, 0], bank, coeffs[:, None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="`bank` is on"):
        MF.mod_linear(x3, bank.cuda(), coeffs)


def test_device_mismatch_meta():
    """Device checks without a GPU: a meta tensor is another device."""
    with pytest.raises(ValueError, match=r"`bank` is on meta but `x` is on cpu"):
        MF.mod_linear(x3, bank.to("meta"), coeffs)


xc = torch.randn(2, 4, 6, 6)
bankc = torch.randn(3, 8, 4, 3, 3)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(2, 4, 6)), ValueError, r"`x` must have shape \(B, I, H, W\); got \(2, 4, 6\)"),
        (dict(bank=torch.randn(8, 4, 3, 3)), ValueError, r"`bank` must have shape \(K, O, I // groups, kh, kw\)"),
        (dict(groups=3), ValueError, r"`groups` = 3 must divide the input channels I = 4"),
        (dict(groups=2), ValueError, r"`bank` must have shape \(K, O, I // groups, kh, kw\) with I // groups = 2"),
        (dict(groups=0), ValueError, r"`groups` must be a positive int"),
        (dict(groups=1.0), TypeError, r"`groups` must be a positive int; got 1.0"),
        (dict(groups=True), TypeError, r"`groups` must be a positive int; got True"),
        (dict(styles=torch.rand(2, 4), groups=2, bank=torch.randn(3, 8, 2, 3, 3)), ValueError,
         r"`styles` need groups == 1"),
        (dict(styles=torch.rand(2, 5)), ValueError, r"`styles` must have shape \(B, I\) = \(2, 4\)"),
        (dict(coeffs=torch.rand(2, 6, 3)), ValueError, r"`coeffs` must have shape \(B, K\) = \(2, 3\) \(per sample\)"),
        (dict(stride=0), ValueError, r"`stride` must be >= 1"),
        (dict(padding=(1, 2, 3)), TypeError, r"`padding` must be an int or a pair of ints"),
        (dict(dilation=1.5), TypeError, r"`dilation` must be an int or a pair of ints"),
        (dict(x=torch.randn(2, 4, 2, 2)), ValueError, r"the output would be empty"),
        (dict(bias=torch.randn(3, 7)), ValueError, r"`bias` must have shape \(O,\) = \(8,\) or \(K, O\) = \(3, 8\)"),
        (dict(x=xc.half()), TypeError, r"`bank` has dtype torch.float32 but `x` has torch.float16"),
    ],
)
def test_mod_conv2d_bad_input(kwargs, exc, match):
    args = dict(x=xc, bank=bankc, coeffs=torch.rand(2, 3), styles=None, bias=None, stride=1, padding=0,
                dilation=1, groups=1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MF.mod_conv2d(args["x"], args["bank"], args["coeffs"], args["styles"], bias=args["bias"],
                      stride=args["stride"], padding=args["padding"], dilation=args["dilation"], groups=args["groups"])


def test_wrapper_bad_input():
    with pytest.raises(ValueError, match=r"modulated_linear: `weight` must have shape \(O, I\)"):
        MF.modulated_linear(x3, bank, styles)
    with pytest.raises(TypeError, match=r"modulated_linear: `styles` is required"):
        MF.modulated_linear(x3, bank[0], None)
    with pytest.raises(TypeError, match=r"mixture_linear: `coeffs` is required"):
        MF.mixture_linear(x3, bank, None)
    with pytest.raises(ValueError, match=r"modulated_conv2d: `weight` must have shape \(O, I, kh, kw\)"):
        MF.modulated_conv2d(xc, bankc, torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"modulated_linear: `bias` must have shape \(O,\)"):
        MF.modulated_linear(x3, bank[0], styles, bias=torch.randn(1, 6))


def test_single_row_per_token_conditioning_is_per_sample():
    """``(B, 1, C)`` coefficients / styles with ``T = 1`` reach the backends as ``(B, C)`` (the
    canonicalisation is written once, in _checks), with gradients in the caller's shape."""
    from modweights import _checks
    x1 = x3[:, :1]
    _, _, a, s, _, _, _ = _checks.check_mod_linear("op", x1, bank, coeffs[:, None], styles[:, None], None, 1e-8)
    assert a.shape == (2, 3) and s.shape == (2, 4)
    _, _, a, s, _, _, _ = _checks.check_mod_linear("op", x3, bank, torch.rand(2, 5, 3), styles, None, 1e-8)
    assert a.shape == (2, 5, 3) and s.shape == (2, 4)  # T > 1: per token stays per token
    a1 = coeffs[:, None].clone().requires_grad_()
    MF.mod_linear(x1, bank, a1, styles, backend="torch").sum().backward()
    assert a1.grad.shape == (2, 1, 3)


def test_launcher_checks():
    """The checks the kernel launchers call: canonical shapes with check_mod_linear's messages, the
    backend's dtypes (TypeError), the device (RuntimeError)."""
    from modweights import _checks
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, T, I\) \(canonical\); got \(2, 4\)"):
        _checks.check_canonical_mod_linear("op", x3[:, 0], bank, coeffs, styles, None)
    with pytest.raises(ValueError, match=r"`coeffs` must have shape \(B, K\) = \(2, 3\)"):
        _checks.check_canonical_mod_linear("op", x3, bank, torch.rand(2, 2), styles, None)
    a, s = _checks.check_canonical_mod_linear("op", x3[:, :1], bank, coeffs[:, None], styles, None)
    assert a.shape == (2, 3) and s is styles
    with pytest.raises(TypeError, match="dtype torch.float64 is not supported: the k backend takes float16 or float32"):
        _checks.check_dtype("op", x3.double(), (torch.float16, torch.float32), "k")
    with pytest.raises(RuntimeError, match="op: the kernels run on CUDA tensors; got cpu tensors"):
        _checks.check_device("op", x3, False, "the kernels run on CUDA tensors")


def test_backward_checks():
    """The checks every backward entry calls: ``needs`` is 5 bools, ``g`` has the output's shape."""
    from modweights import _checks
    assert _checks.check_needs("op", [1, 0, True, False, 0]) == (True, False, True, False, False)
    with pytest.raises(ValueError, match=r"op: `needs` must hold 5 bools \(x, bank, coeffs, styles, bias\)"):
        _checks.check_needs("op", [True] * 4)
    with pytest.raises(TypeError, match=r"op: `needs` must be a sequence of 5 bools"):
        _checks.check_needs("op", 5)
    _checks.check_grad_output("op", torch.empty(2, 5, 6).expand(2, 5, 6), (2, 5, 6))
    with pytest.raises(ValueError, match=r"op: `g` must have shape \(2, 5, 6\) \(the forward output's\); "
                                         r"got \(2, 5, 7\)"):
        _checks.check_grad_output("op", torch.empty(2, 5, 7), (2, 5, 6))


def test_backward_custom_op_checks_needs():
    """The backward custom ops are public: a wrong ``needs`` is refused at the op itself (the glue
    every kernel backend shares), before any backend code runs."""
    pytest.importorskip("triton")
    from modweights import _autograd
    glue = _autograd._glue("mod_linear", "triton")
    g = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"mod_linear_backward_triton: `needs` must hold 5 bools"):
        glue.bwd_op(g, x3, bank, coeffs, styles, None, None, None, [True] * 3, False, 1e-8)


@pytest.mark.parametrize("geo", [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 1)), ((2, 3), (0, 1), (2, 1))])
def test_conv2d_out_hw_is_f_conv2d(geo):
    """One output-size rule for every conv launcher, the checks and the benchmarks: F.conv2d's."""
    from modweights._checks import conv2d_out_hw
    stride, padding, dilation = geo
    x, w = torch.randn(1, 1, 11, 9), torch.randn(1, 1, 3, 2)
    expected = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, dilation=dilation).shape[-2:]
    assert conv2d_out_hw(11, 9, 3, 2, stride, padding, dilation) == tuple(expected)


def test_limit_checks():
    """Backend index ranges, one rule for every backend: the argument, what is counted, the limit."""
    from modweights import _checks
    _checks.check_limits("op", (("x", 3, 3, "B (samples)"),), "k kernels")
    with pytest.raises(ValueError, match=r"op: `bank` has K \(bank entries\) = 5; the k kernels take at most 4"):
        _checks.check_limits("op", (("x", 3, 3, "B (samples)"), ("bank", 5, 4, "K (bank entries)")), "k kernels")
