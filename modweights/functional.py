"""The public ops. One general op per layer type underneath (docs/design.md section 1)::

    M_b    = sum_k coeffs[b, k] * bank[k]                  # mixture ("weight of weights")
    V_b    = M_b * styles[b][None, :]                      # modulation of the input channels
    d_b    = rsqrt(sum_i V_b[o, i]^2 + eps)                # demodulation (optional), per output row
    y[b,t] = d_b * (V_b @ x[b, t]) + bias_b                # bias_b = bias, or coeffs[b] @ bias (K, O)

Per-token conditioning (linear only) replaces ``b`` by ``(b, t)`` in coeffs and/or styles.
No backend except ``reference`` forms ``V_b`` in memory for the linear ops' per-sample
modulation; which formulation each backend takes is in its module docstring.

``backend`` picks the implementation (see :mod:`modweights.backends`): ``None`` follows
:func:`modweights.use_backend`, then ``MODWEIGHTS_BACKEND``, then ``"auto"``.

Autocast: inside ``torch.autocast(device_type)`` enabled for the inputs' device, every
floating-point tensor argument except float64 is cast to the autocast dtype (as autocast
does for ``F.linear``/``F.conv2d``), and the op runs with autocast off, so a backend sees one
dtype and the output is in the autocast dtype. This is the one place autocast is handled
(:func:`_autocast`); the casts are differentiable, so float32 parameters get float32
gradients.

Empty batches (``B = 0``, or ``T = 0`` for linear) give an empty output and zero gradients
on every backend, as ``F.linear``/``F.conv2d`` do, with no kernel launched
(:func:`modweights._autograd.run`). Meta tensors give meta outputs of the right shapes
whatever backend is asked for (:func:`modweights.backends.resolve`).
"""
from __future__ import annotations

import contextlib

import torch

from ._autograd import resolve, run
from .ops.mod_conv1d import lower as _lower_conv1d
from ._checks import (ModConv2dConfig, ModLinearConfig, check_mod_conv2d, check_flag, check_mod_linear, check_required,
                      check_shared_bias, check_weight)

__all__ = [
    "mod_linear",
    "mod_conv2d",
    "modulated_linear",
    "mixture_linear",
    "modulated_conv2d",
    "mixture_conv2d",
    "mod_conv1d",
    "modulated_conv1d",
    "mixture_conv1d",
]


def _autocast_candidates() -> dict[str, bool]:
    """Whether each device type torch knows an autocast for has one, asked once at import.

    Asked here, outside any traced region: Dynamo (torch 2.11) cannot trace
    ``torch.amp.is_autocast_available`` (it calls ``torch._C._is_autocast_available``), so
    ``torch.compile(fullgraph=True)`` of an op failed there; a lookup in this dict traces on
    every torch."""
    types = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu", "meta",
             torch._C._get_privateuse1_backend_name())
    return {t: torch.amp.is_autocast_available(t) for t in types}


_HAS_AUTOCAST = _autocast_candidates()


def _has_autocast(device_type: str) -> bool:
    """Whether ``device_type`` has an autocast state (meta has none: asking for it raises)."""
    known = _HAS_AUTOCAST.get(device_type)
    if known is None:  # a device type unknown at import (a privateuse1 backend renamed since): ask once
        known = _HAS_AUTOCAST[device_type] = torch.amp.is_autocast_available(device_type)
    return known


def _autocast(x, *tensors):
    """``(x, *tensors)`` cast to the autocast dtype when autocast is on for ``x``'s device,
    and the context to run the op in (autocast off then, else a null context)."""
    # torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype are constant-folded
    # by Dynamo (guarded on the autocast state) on every supported torch
    if (not isinstance(x, torch.Tensor) or not _has_autocast(x.device.type)
            or not torch.is_autocast_enabled(x.device.type)):
        return (x, *tensors), contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        # autocast leaves float64 (and non-float) tensors alone; so do we
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return tuple(cast(t) for t in (x, *tensors)), torch.autocast(x.device.type, enabled=False)


def mod_linear(x, bank, coeffs=None, styles=None, *, demodulate=False, bias=None, eps=1e-8, backend=None):
    """The general modulated / mixture linear op.

    Args:
        x: ``(B, T, I)`` or ``(B, I)`` input.
        bank: ``(K, O, I)`` weight bank.
        coeffs: ``(B, K)`` per-sample or ``(B, T, K)`` per-token mixing coefficients;
            ``None`` needs ``K == 1``.
        styles: ``(B, I)`` per-sample or ``(B, T, I)`` per-token input-channel styles; ``None``
            for no modulation.
        demodulate: normalise each output row of the effective weight to unit norm.
        bias: ``(O,)`` shared, or ``(K, O)`` mixed by ``coeffs`` like the weights.
        eps: added inside the rsqrt of the demodulation.
        backend: ``"reference" | "torch" | "triton" | "cuda" | "auto"`` or ``None``.

    Returns:
        ``(B, T, O)`` (or ``(B, O)`` for 2-D ``x``) in the dtype of ``x``.
    """
    op = "mod_linear"
    check_flag(op, "demodulate", demodulate)
    (x, bank, coeffs, styles, bias), ctx = _autocast(x, bank, coeffs, styles, bias)
    with ctx:
        x3, bank, coeffs, styles, bias, eps, squeeze = check_mod_linear(op, x, bank, coeffs, styles, bias, eps)
        impl = resolve(
            backend, "mod_linear", x.device, dtype=x.dtype,
            per_token=(coeffs is not None and coeffs.dim() == 3) or (styles is not None and styles.dim() == 3),
            rows=x3.shape[1],  # rows per sample (1 for 2-D x): auto's shape class (backends.auto_table)
        )
        y = run("mod_linear", impl, x3, bank, coeffs, styles, bias, ModLinearConfig(demodulate, eps))
    return y.squeeze(1) if squeeze else y


def mod_conv2d(x, bank, coeffs=None, styles=None, *, demodulate=False, bias=None,
               stride=1, padding=0, dilation=1, groups=1, eps=1e-8, backend=None):
    """The general modulated / mixture 2-D convolution.

    Args:
        x: ``(B, I, H, W)`` input.
        bank: ``(K, O, I // groups, kh, kw)`` filter bank.
        coeffs: ``(B, K)`` mixing coefficients (per sample); ``None`` needs ``K == 1``.
        styles: ``(B, I)`` input-channel styles (only with ``groups == 1``), or ``None``.
        demodulate: normalise each output filter over ``(i, kh, kw)``.
        bias: ``(O,)`` or ``(K, O)`` (mixed by ``coeffs``).
        stride, padding, dilation: int or pair, as :func:`torch.nn.functional.conv2d`.
        groups: channel groups, as :func:`torch.nn.functional.conv2d`.

    Returns:
        ``(B, O, H', W')`` in the dtype of ``x``; channels_last when ``x`` or the bank's
        filters are (as ``F.conv2d``).
    """
    return _conv2d("mod_conv2d", x, bank, coeffs, styles, demodulate, bias, stride, padding, dilation, groups, eps,
                   backend)


def _conv2d(op, x, bank, coeffs, styles, demodulate, bias, stride, padding, dilation, groups, eps, backend):
    """:func:`mod_conv2d`, with ``op`` naming the public op in error messages."""
    check_flag(op, "demodulate", demodulate)
    (x, bank, coeffs, styles, bias), ctx = _autocast(x, bank, coeffs, styles, bias)
    with ctx:
        x, bank, coeffs, styles, bias, eps, (stride, padding, dilation, groups) = check_mod_conv2d(
            op, x, bank, coeffs, styles, bias, eps, stride, padding, dilation, groups)
        impl = resolve(backend, "mod_conv2d", x.device, dtype=x.dtype, groups=groups,
                       kernel_size=tuple(bank.shape[-2:]), in_channels=bank.shape[2] * groups,
                       out_channels=bank.shape[1])  # from the bank: static under torch.compile
        cfg = ModConv2dConfig(demodulate, eps, stride, padding, dilation, groups)
        y = run("mod_conv2d", impl, x, bank, coeffs, styles, bias, cfg)
    return _conv_memory_format(y, x, bank)


def _channels_last(t: torch.Tensor) -> bool:
    """``t`` (4-D) is stored channels_last, and not also plainly contiguous (one channel, 1x1)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _conv_memory_format(y: torch.Tensor, x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``y`` in the memory format ``F.conv2d`` gives: channels_last when the input or the
    weights (each expert ``bank[k]``) are channels_last (``model.to(memory_format=...)``), so a
    channels_last network stays channels_last through these layers whatever the formulation."""
    if not y.is_contiguous(memory_format=torch.channels_last) and (_channels_last(x) or _channels_last(bank[0])):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _modulated_args(op: str, weight, styles, bias, dims: int, weight_shape: str):
    """The checks every ``modulated_*`` wrapper makes before its general op (one weight, so
    ``coeffs`` None): ``styles`` given, ``weight`` a single ``dims``-D weight ``weight_shape``,
    ``bias`` ``(O,)`` or None. Returns ``(bank, bias)`` as the general op takes them."""
    check_required(op, "styles", styles)
    return check_weight(op, weight, dims, weight_shape), check_shared_bias(op, bias)


def modulated_linear(x, weight, styles, *, demodulate=True, bias=None, eps=1e-8, backend=None):
    """StyleGAN2-style modulated linear: ``y = d * ((W * s) @ x) + bias``.

    Args:
        x: ``(B, T, I)`` or ``(B, I)``. weight: ``(O, I)``. styles: ``(B, I)`` or ``(B, T, I)``.
        bias: ``(O,)`` or None.

    Returns:
        ``(B, T, O)`` or ``(B, O)``.
    """
    weight, bias = _modulated_args("modulated_linear", weight, styles, bias, 2, "(O, I)")
    return mod_linear(x, weight, None, styles, demodulate=demodulate, bias=bias, eps=eps, backend=backend)


def mixture_linear(x, bank, coeffs, *, bias=None, backend=None):
    """CondConv / SMEAR-style mixture linear: ``y = (sum_k coeffs[k] W_k) @ x + bias``.

    Args:
        x: ``(B, T, I)`` or ``(B, I)``. bank: ``(K, O, I)``. coeffs: ``(B, K)`` or ``(B, T, K)``.
        bias: ``(O,)`` or ``(K, O)``.

    Returns:
        ``(B, T, O)`` or ``(B, O)``.
    """
    check_required("mixture_linear", "coeffs", coeffs)
    return mod_linear(x, bank, coeffs, None, bias=bias, backend=backend)


def modulated_conv2d(x, weight, styles, *, demodulate=True, bias=None, stride=1, padding=0,
                     dilation=1, eps=1e-8, backend=None):
    """StyleGAN2 modulated convolution.

    Args:
        x: ``(B, I, H, W)``. weight: ``(O, I, kh, kw)``. styles: ``(B, I)``. bias: ``(O,)`` or None.

    Returns:
        ``(B, O, H', W')``.
    """
    weight, bias = _modulated_args("modulated_conv2d", weight, styles, bias, 4, "(O, I, kh, kw)")
    return mod_conv2d(x, weight, None, styles, demodulate=demodulate, bias=bias, stride=stride, padding=padding,
                      dilation=dilation, eps=eps, backend=backend)


def mixture_conv2d(x, bank, coeffs, *, bias=None, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """CondConv / DynamicConv mixture convolution: ``y = conv2d(x, sum_k coeffs[k] W_k) + bias``.

    Args:
        x: ``(B, I, H, W)``. bank: ``(K, O, I // groups, kh, kw)``. coeffs: ``(B, K)``.
        bias: ``(O,)`` or ``(K, O)``.

    Returns:
        ``(B, O, H', W')``.
    """
    check_required("mixture_conv2d", "coeffs", coeffs)
    return mod_conv2d(x, bank, coeffs, None, bias=bias, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, backend=backend)


def mod_conv1d(x, bank, coeffs=None, styles=None, *, demodulate=False, bias=None,
               stride=1, padding=0, dilation=1, groups=1, eps=1e-8, backend=None):
    """The general modulated / mixture 1-D convolution (runs as :func:`mod_conv2d` with a unit
    height on every backend: :mod:`modweights.ops.mod_conv1d`).

    Args:
        x: ``(B, I, L)`` input.
        bank: ``(K, O, I // groups, k)`` filter bank.
        coeffs: ``(B, K)`` mixing coefficients (per sample); ``None`` needs ``K == 1``.
        styles: ``(B, I)`` input-channel styles (only with ``groups == 1``), or ``None``.
        demodulate: normalise each output filter over ``(i, k)``.
        bias: ``(O,)`` or ``(K, O)`` (mixed by ``coeffs``).
        stride, padding, dilation: int, as :func:`torch.nn.functional.conv1d`.
        groups: channel groups, as :func:`torch.nn.functional.conv1d`.

    Returns:
        ``(B, O, L')`` in the dtype of ``x``.
    """
    op = "mod_conv1d"
    x, bank, stride, padding, dilation = _lower_conv1d(op, x, bank, stride, padding, dilation)
    return _conv2d(op, x, bank, coeffs, styles, demodulate, bias, stride, padding, dilation, groups, eps,
                   backend).squeeze(2)


def modulated_conv1d(x, weight, styles, *, demodulate=True, bias=None, stride=1, padding=0,
                     dilation=1, eps=1e-8, backend=None):
    """Modulated 1-D convolution (StyleGAN2's, over a sequence).

    Args:
        x: ``(B, I, L)``. weight: ``(O, I, k)``. styles: ``(B, I)``. bias: ``(O,)`` or None.

    Returns:
        ``(B, O, L')``.
    """
    weight, bias = _modulated_args("modulated_conv1d", weight, styles, bias, 3, "(O, I, k)")
    return mod_conv1d(x, weight, None, styles, demodulate=demodulate, bias=bias, stride=stride, padding=padding,
                      dilation=dilation, eps=eps, backend=backend)


def mixture_conv1d(x, bank, coeffs, *, bias=None, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """CondConv / ODConv-style mixture 1-D convolution: ``y = conv1d(x, sum_k coeffs[k] W_k) + bias``.

    Args:
        x: ``(B, I, L)``. bank: ``(K, O, I // groups, k)``. coeffs: ``(B, K)``.
        bias: ``(O,)`` or ``(K, O)``.

    Returns:
        ``(B, O, L')``.
    """
    check_required("mixture_conv1d", "coeffs", coeffs)
    return mod_conv1d(x, bank, coeffs, None, bias=bias, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, backend=backend)
