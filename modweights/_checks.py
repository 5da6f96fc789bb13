"""Validation and canonical shapes for the modulated-GEMM ops.

Every backend receives its inputs from here, already checked: one implementation of
the shape rules, so a bad argument gets the same clear exception whichever backend was
asked for. The public functions (:func:`check_mod_linear`, :func:`check_mod_conv2d`, the wrappers'
:func:`check_weight`, the layers' :func:`check_eps` / :func:`check_flag`) check what a user
passes; the kernel launchers, whose custom ops are public too, check what they assume with
:func:`check_canonical_mod_linear` / :func:`check_canonical_mod_conv2d`, :func:`check_dtype` and
:func:`check_device` (so the rules and
their messages are written here once).

Exception policy (every message names the op, the argument, what was expected and what came):

``TypeError``
    an argument of the wrong type (not a tensor, not an int, not a bool, not a real number)
    or a tensor of the wrong dtype (not floating point, dtypes that disagree, a dtype the
    chosen backend does not take);
``ValueError``
    a wrong value: a shape, a size out of range (``eps < 0``, ``groups < 1``, a size beyond a
    kernel's index range), tensors on different devices;
``RuntimeError``
    a backend that cannot run here (unavailable, or its kernels given tensors on a device
    they do not run on), as the registry raises.

Canonical forms handed to backends:

linear
    x       (B, T, I)             a 2-D input ``(B, I)`` becomes ``(B, 1, I)``
    bank    (K, O, I)             a single weight ``(O, I)`` becomes ``(1, O, I)``
    coeffs  None | (B, K) | (B, T, K)   with ``T > 1``: a ``(B, 1, K)`` one is per sample, ``(B, K)``
    styles  None | (B, I) | (B, T, I)   likewise ``(B, 1, I)`` becomes ``(B, I)``
    bias    None | (O,) | (K, O)
conv2d
    x       (B, I, H, W)
    bank    (K, O, I // groups, kh, kw)
    coeffs  None | (B, K)
    styles  None | (B, I)         only with ``groups == 1``
    bias    None | (O,) | (K, O)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ModLinearConfig:
    """Non-tensor configuration of one ``mod_linear`` call (hashable: keys the Function cache)."""

    demodulate: bool
    eps: float


@dataclass(frozen=True)
class ModConv2dConfig:
    """Non-tensor configuration of one ``mod_conv2d`` call."""

    demodulate: bool
    eps: float
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _shape(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _expect(cond: bool, op: str, name: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"{op}: `{name}` must have shape {expected}; got {_shape(got)}")


def _has_shape(t, shape: tuple) -> bool:
    """Whether ``t`` has ``shape``: its number of dimensions first, then each size. Not a tuple
    comparison: that compares sizes before lengths, so under torch.export with a symbolic ``T``
    ``(B, T, K) == (B, K)`` would ask ``T == K`` and guard the export on ``T != K``."""
    return t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape))


def _check_tensor(op: str, name: str, t, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor; got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor or None; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: `{name}` must be a floating-point tensor (float16, bfloat16, float32, float64); "
            f"got {t.dtype}"
        )


def _check_same(op: str, named: dict) -> None:
    """All given tensors share the dtype and device of the first (x)."""
    items = [(n, t) for n, t in named.items() if t is not None]
    ref_name, ref = items[0]
    for n, t in items[1:]:
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: `{n}` has dtype {t.dtype} but `{ref_name}` has {ref.dtype}; "
                "all tensor arguments must share one dtype"
            )
        if t.device != ref.device:
            raise ValueError(
                f"{op}: `{n}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                "all tensor arguments must be on one device"
            )


def check_eps(op: str, eps) -> float:
    """``eps`` as a float: any real number (a numpy scalar too; TypeError otherwise), finite and
    >= 0 (ValueError otherwise: eps = inf would make every d = 0)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{op}: `eps` must be a finite non-negative number; got {eps!r}")
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) eps may be a symbolic
    # float (NaN fails both)
    if not 0 <= eps < math.inf:
        raise ValueError(f"{op}: `eps` must be a finite non-negative number; got {eps!r}")
    return float(eps)


def check_flag(op: str, name: str, v) -> bool:
    """A bool flag (``demodulate``): a string such as "no" is truthy, so only a bool is accepted."""
    if not isinstance(v, bool):
        raise TypeError(f"{op}: `{name}` must be a bool (True or False); got {v!r}")
    return v


def check_routing_mode(op: str, mode, segment_length) -> tuple[str, int | None]:
    """A mixture linear's ``routing_mode`` (one of :data:`modweights.nn.ROUTING_MODES`) and its
    ``segment_length`` (a positive int with ``"segment"``, None otherwise)."""
    from .nn._routing import ROUTING_MODES

    if mode not in ROUTING_MODES:
        raise ValueError(f"{op}: `routing_mode` must be one of {ROUTING_MODES}; got {mode!r}")
    if mode != "segment":
        if segment_length is not None:
            raise ValueError(f"{op}: `segment_length` is for routing_mode='segment' only; got routing_mode={mode!r}")
        return mode, None
    if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 1:
        raise ValueError(f"{op}: routing_mode='segment' needs `segment_length`, a positive int (tokens per "
                         f"segment); got {segment_length!r}")
    return mode, segment_length


def _pair(op: str, name: str, v, minimum: int) -> tuple[int, int]:
    if isinstance(v, bool):
        raise TypeError(f"{op}: `{name}` must be an int or a pair of ints; got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    if (
        not isinstance(v, (tuple, list))
        or len(v) != 2
        or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)
    ):
        raise TypeError(f"{op}: `{name}` must be an int or a pair of ints; got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{op}: `{name}` must be >= {minimum}; got {tuple(v)}")
    return (int(v[0]), int(v[1]))


def _check_bias(op: str, bias, K: int, O: int) -> None:
    if bias is None:
        return
    _expect(
        (bias.dim() == 1 and bias.shape[0] == O) or (bias.dim() == 2 and tuple(bias.shape) == (K, O)),
        op, "bias", f"(O,) = ({O},) or (K, O) = ({K}, {O})", bias,
    )


def _check_coeffs_k1(op: str, coeffs, bank) -> None:
    if coeffs is None and bank.shape[0] != 1:
        raise ValueError(
            f"{op}: `coeffs` is None, which needs a single weight (K = 1), but `bank` holds "
            f"K = {bank.shape[0]} weights (shape {_shape(bank)}); pass coeffs of shape (B, K)"
        )


def check_mod_linear(op, x, bank, coeffs, styles, bias, eps):
    """Validate ``mod_linear`` arguments; return canonical tensors and whether x was 2-D.

    Returns:
        (x (B, T, I), bank (K, O, I), coeffs, styles, bias, eps, squeeze) where ``squeeze``
        says the caller must drop the T dimension of the output.
    """
    for name, t, opt in (("x", x, False), ("bank", bank, False), ("coeffs", coeffs, True),
                         ("styles", styles, True), ("bias", bias, True)):
        _check_tensor(op, name, t, opt)
    _check_same(op, {"x": x, "bank": bank, "coeffs": coeffs, "styles": styles, "bias": bias})
    eps = check_eps(op, eps)
    _expect(x.dim() in (2, 3), op, "x", "(B, I) or (B, T, I)", x)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(1)
    B, T, I = x.shape
    _expect(bank.dim() == 3 and bank.shape[2] == I, op, "bank", f"(K, O, I) with I = {I}", bank)
    K, O, _ = bank.shape
    if K < 1 or O < 1:
        raise ValueError(f"{op}: `bank` must have K >= 1 and O >= 1; got {_shape(bank)}")
    _check_coeffs_k1(op, coeffs, bank)
    if coeffs is not None:
        per_sample = (B, K)
        per_token = (B, T, K)
        ok = _has_shape(coeffs, per_sample) or (not squeeze and _has_shape(coeffs, per_token))
        if not ok:  # the message only on failure: torch.compile cannot concatenate symbolic-size strings
            _expect(ok, op, "coeffs", f"(B, K) = {per_sample}" + ("" if squeeze else f" or (B, T, K) = {per_token}"),
                    coeffs)
    if styles is not None:
        per_sample = (B, I)
        per_token = (B, T, I)
        ok = _has_shape(styles, per_sample) or (not squeeze and _has_shape(styles, per_token))
        if not ok:
            _expect(ok, op, "styles", f"(B, I) = {per_sample}" + ("" if squeeze else f" or (B, T, I) = {per_token}"),
                    styles)
    _check_bias(op, bias, K, O)
    return x, bank, as_per_sample(coeffs, T), as_per_sample(styles, T), bias, eps, squeeze


def as_per_sample(t, T: int):
    """A per-token ``(B, 1, C)`` conditioning tensor with one row per sample is per sample:
    ``(B, C)`` (the same maths; a view, so autograd gives its gradient the caller's shape).
    Anything else is returned as it is. The one place this canonicalisation is written."""
    return t[:, 0] if t is not None and t.dim() == 3 and T == 1 else t


def check_canonical_mod_linear(op, x, bank, coeffs, styles, bias):
    """What a linear kernel launcher assumes, checked with :func:`check_mod_linear`'s rules and
    messages: ``x`` is 3-D (canonical) and the rest fits it. Returns ``(coeffs, styles)`` with
    :func:`as_per_sample` applied (the launchers' custom ops are public, so they may be handed a
    ``(B, 1, C)`` tensor that the front door would have canonicalised)."""
    _check_tensor(op, "x", x)
    _expect(x.dim() == 3, op, "x", "(B, T, I) (canonical)", x)
    _, _, coeffs, styles, _, _, _ = check_mod_linear(op, x, bank, coeffs, styles, bias, 0.0)
    return coeffs, styles


def check_canonical_mod_conv2d(op, x, bank, coeffs, styles, bias, stride, padding, dilation, groups) -> None:
    """What a conv2d kernel launcher assumes, checked with :func:`check_mod_conv2d`'s rules and
    messages (the launchers' custom ops are public)."""
    check_mod_conv2d(op, x, bank, coeffs, styles, bias, 0.0, stride, padding, dilation, groups)


def check_needs(op: str, needs) -> tuple[bool, bool, bool, bool, bool]:
    """A backward's ``needs``: which of the 5 input gradients (x, bank, coeffs, styles, bias)
    to compute, as 5 bools (the backward custom ops are public: a caller may pass anything)."""
    try:
        flags = tuple(bool(n) for n in needs)
    except TypeError:
        raise TypeError(f"{op}: `needs` must be a sequence of 5 bools (x, bank, coeffs, styles, bias); "
                        f"got {needs!r}") from None
    if len(flags) != 5:
        raise ValueError(f"{op}: `needs` must hold 5 bools (x, bank, coeffs, styles, bias); got {needs!r}")
    return flags


def check_grad_output(op: str, g, shape: tuple) -> None:
    """A backward's output gradient ``g`` has the forward output's shape (any strides)."""
    _expect(tuple(g.shape) == tuple(shape), op, "g", f"{tuple(shape)} (the forward output's)", g)


def check_limits(op: str, limits, kernels: str) -> None:
    """ValueError for a size beyond a backend's index range. ``limits``: ``(argument, value,
    largest value, what the value counts)`` tuples; ``kernels`` names whose limit it is (and
    what to do instead, where there is something)."""
    for name, val, limit, what in limits:
        if val > limit:
            raise ValueError(f"{op}: `{name}` has {what} = {val}; the {kernels} take at most {limit}")


def check_saved(op: str, d, y) -> None:
    """With demodulation, a backward needs what its forward saved: ``d`` (non-empty) and ``y``."""
    if y is None or d is None or d.numel() == 0:
        raise ValueError(f"{op}: with demodulate=True, `d` and `y` from the forward are required")


def check_dtype(op: str, x, dtypes, backend: str) -> None:
    """TypeError unless ``x.dtype`` is one of ``dtypes`` (what ``backend``'s kernels take). Called
    first, so an unsupported dtype is named as such (a non-tensor is left to the shape checks)."""
    if isinstance(x, torch.Tensor) and x.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise TypeError(f"{op}: dtype {x.dtype} is not supported: the {backend} backend takes {names}")


def check_device(op: str, x, ok: bool, needs: str) -> None:
    """RuntimeError unless ``ok``: the kernels cannot run on ``x``'s device; ``needs`` says what
    they run on (e.g. "the kernels run on CUDA tensors")."""
    if not ok:
        raise RuntimeError(f"{op}: {needs}; got {x.device} tensors")


# ----------------------------------------------------------------------------- named wrappers


def check_weight(op: str, weight, dims: int, expected: str):
    """A single weight (``dims``-D, shape ``expected``) as a bank of one: ``weight[None]``."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: `weight` must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dim() != dims:
        raise ValueError(f"{op}: `weight` must have shape {expected}; got {tuple(weight.shape)}")
    return weight.unsqueeze(0)


def check_shared_bias(op: str, bias):
    """A wrapper's bias is shared, ``(O,)`` (its length is checked with the bank's O later)."""
    if bias is not None and isinstance(bias, torch.Tensor) and bias.dim() != 1:
        raise ValueError(f"{op}: `bias` must have shape (O,); got {tuple(bias.shape)}")
    return bias


def check_required(op: str, name: str, t) -> None:
    """A wrapper's required conditioning tensor (``styles`` / ``coeffs``) is not None."""
    if t is None:
        raise TypeError(f"{op}: `{name}` is required; got None")


def conv2d_out_hw(H: int, W: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    """The output height and width of a 2-D convolution (as :func:`torch.nn.functional.conv2d`):
    ``(H + 2 p - d (kh - 1) - 1) // s + 1``, likewise for W; ``stride``, ``padding`` and
    ``dilation`` are ``(h, w)`` pairs."""
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def check_mod_conv2d(op, x, bank, coeffs, styles, bias, eps, stride, padding, dilation, groups):
    """Validate ``mod_conv2d`` arguments; return canonical tensors and the config fields."""
    for name, t, opt in (("x", x, False), ("bank", bank, False), ("coeffs", coeffs, True),
                         ("styles", styles, True), ("bias", bias, True)):
        _check_tensor(op, name, t, opt)
    _check_same(op, {"x": x, "bank": bank, "coeffs": coeffs, "styles": styles, "bias": bias})
    eps = check_eps(op, eps)
    stride = _pair(op, "stride", stride, 1)
    padding = _pair(op, "padding", padding, 0)
    dilation = _pair(op, "dilation", dilation, 1)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{op}: `groups` must be a positive int; got {groups!r}")
    if groups < 1:
        raise ValueError(f"{op}: `groups` must be a positive int; got {groups!r}")
    _expect(x.dim() == 4, op, "x", "(B, I, H, W)", x)
    B, I, H, W = x.shape
    if I < 1 or H < 1 or W < 1:  # (F.conv2d refuses empty images, and its zero-channel output has 0 channels)
        raise ValueError(f"{op}: `x` must have I, H, W >= 1 (only the batch may be empty); got {_shape(x)}")
    if I % groups:
        raise ValueError(f"{op}: `groups` = {groups} must divide the input channels I = {I}")
    _expect(bank.dim() == 5 and bank.shape[2] == I // groups, op, "bank",
            f"(K, O, I // groups, kh, kw) with I // groups = {I // groups}", bank)
    K, O, _, kh, kw = bank.shape
    if K < 1 or O < 1 or kh < 1 or kw < 1:
        raise ValueError(f"{op}: `bank` must have K, O, kh, kw >= 1; got {_shape(bank)}")
    if O % groups:
        raise ValueError(f"{op}: `groups` = {groups} must divide the output channels O = {O}")
    _check_coeffs_k1(op, coeffs, bank)
    if coeffs is not None:
        _expect(tuple(coeffs.shape) == (B, K), op, "coeffs", f"(B, K) = {(B, K)} (per sample)", coeffs)
    if styles is not None:
        if groups != 1:
            raise ValueError(f"{op}: `styles` need groups == 1 (demodulation sums over all input "
                             f"channels); got groups = {groups}")
        _expect(tuple(styles.shape) == (B, I), op, "styles", f"(B, I) = {(B, I)}", styles)
    _check_bias(op, bias, K, O)
    ho, wo = conv2d_out_hw(H, W, kh, kw, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"{op}: the output would be empty: input {H}x{W}, kernel {kh}x{kw}, stride {stride}, "
            f"padding {padding}, dilation {dilation} give {ho}x{wo}"
        )
    cfg = (stride, padding, dilation, groups)
    return x, bank, coeffs, styles, bias, eps, cfg


def check_layer_tensor(layer: str, name: str, t, ndims: tuple, dim: int, size: int, expected: str,
                       batch: int | None = None) -> None:
    """A layer's input ``name`` (``x``, ``w``, ``cond``, ``coeffs``) against the layer's own
    sizes, before any op sees it, so that the error names the layer and the argument: a
    floating-point tensor with one of ``ndims`` dimensions, ``size`` along ``dim`` and, where
    ``batch`` is given, ``batch`` samples. ``expected()`` is the shape as the message shows it
    (a function: formatting a size would specialise it under torch.compile)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{layer}: `{name}` must be a torch.Tensor of shape {expected()}; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{layer}: `{name}` must be a floating-point tensor; got {t.dtype}")
    if t.dim() not in ndims or t.shape[dim] != size or (batch is not None and t.shape[0] != batch):
        raise ValueError(f"{layer}: `{name}` must have shape {expected()}; got {_shape(t)}")
