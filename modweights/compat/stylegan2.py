"""Drop-in for StyleGAN2-ADA / StyleGAN3's ``modulated_conv2d`` on modweights' op.

``modulated_conv2d(x, weight, styles, noise, up, down, padding, resample_filter, demodulate,
flip_weight, fused_modconv)`` takes the arguments of ``training/networks.py`` in
NVlabs/stylegan2-ada-pytorch (StyleGAN3 ships the same function in
``training/networks_stylegan2.py``) and computes the same function, with the same gradients::

    V_b   = weight * styles[b][None, :, None, None]              # [O, I, kh, kw] per sample
    d_b   = rsqrt(sum_{i,kh,kw} V_b^2 + 1e-8)                     # [O] (demodulate=True)
    y_b   = resample(conv(x_b, d_b * V_b)) + noise_b              # conv2d_resample semantics

where ``resample`` is their FIR up/down-sampling around the convolution (``up``, ``down``,
``padding`` with respect to the up-sampled image, ``resample_filter``), and ``conv`` is a
correlation (``flip_weight=True``, like :func:`torch.nn.functional.conv2d`) or a true
convolution (``flip_weight=False``, what their synthesis layers pass when up-sampling).

The modulated convolution runs through :func:`modweights.functional.modulated_conv2d`, so
no per-sample weight is formed (their ``fused_modconv=True`` path forms ``B x O x I x kh x
kw`` weights for a grouped conv; their ``fused_modconv=False`` path scales the input, runs
one conv, scales the output). Both settings therefore take the same route here: the flag
is accepted for signature compatibility and changes nothing but is validated. The FIR
resampling is plain PyTorch (:func:`upfirdn2d`): per-channel filtering, cheap next to the
convolution.

Up-sampling: their transposed convolution (stride ``up``) is computed as ``up * up``
polyphase stride-1 convolutions of the input with the sub-kernels ``w[ry::up, rx::up]``
(exactly the transposed convolution's FLOPs, never a zero-stuffed input), each through
modweights without demodulation; the demodulation coefficients, which depend on the full
kernel, are applied once to the interleaved result.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import functional as MF

__all__ = ["modulated_conv2d", "upfirdn2d", "setup_filter"]

_OP = "modweights.compat.stylegan2.modulated_conv2d"


# ----------------------------------------------------------------------------- argument parsing


def _scaling(op: str, name: str, v) -> tuple[int, int]:
    """int or [x, y] -> (sx, sy), each >= 1."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"{op}: `{name}` must be an int or a pair [x, y] of ints; got {v!r}")
    if min(v) < 1:
        raise ValueError(f"{op}: `{name}` must be >= 1; got {v!r}")
    return int(v[0]), int(v[1])


def _padding4(op: str, padding) -> tuple[int, int, int, int]:
    """StyleGAN's padding: int, [x, y] or [x0, x1, y0, y1] -> (x0, x1, y0, y1). Note x first."""
    if isinstance(padding, int) and not isinstance(padding, bool):
        padding = (padding, padding)
    if (not isinstance(padding, (tuple, list)) or len(padding) not in (2, 4)
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in padding)):
        raise TypeError(f"{op}: `padding` must be an int, [x, y] or [x0, x1, y0, y1] of ints; got {padding!r}")
    if len(padding) == 2:
        px, py = padding
        return px, px, py, py
    return tuple(int(p) for p in padding)


def _filter_size(op: str, f) -> tuple[int, int]:
    """(fw, fh) of a FIR filter: None -> 1x1; 1-D (separable) -> taps x taps; 2-D [fh, fw]."""
    if f is None:
        return 1, 1
    if not isinstance(f, torch.Tensor) or f.dim() not in (1, 2) or f.numel() == 0:
        raise ValueError(f"{op}: `resample_filter` must be None or a non-empty tensor of shape [taps] "
                         f"(separable) or [fh, fw]; got "
                         f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
    return int(f.shape[-1]), int(f.shape[0])


def _resample_padding(pads, fsize, up: int, down: int) -> tuple[int, int, int, int]:
    """Their padding with respect to the resampled image (conv2d_resample.py): the layer's
    ``pads`` (x0, x1, y0, y1) grown for a FIR filter of ``fsize`` (fw, fh) taps around an
    up-sampling by ``up`` and a down-sampling by ``down``. A 4-tap filter with ``up = 2`` adds
    (2, 1) per axis, with ``down = 2`` (1, 1); tests/test_compat_stylegan2.py's reference
    shares this function and checks it against those values and their layers' output sizes."""
    px0, px1, py0, py1 = pads
    fw, fh = fsize
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
        py0 += (fh + up - 1) // 2
        py1 += (fh - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2
    return px0, px1, py0, py1


# ----------------------------------------------------------------------------- FIR resampling


def setup_filter(f, device=torch.device("cpu"), normalize=True, flip_filter=False, gain=1, separable=None):
    """A FIR filter in the form :func:`upfirdn2d` takes (same conventions as StyleGAN2-ADA).

    Args:
        f: taps ``[n]``, a 2-D filter ``[fh, fw]``, a scalar, or None (identity).
        normalize: divide by the sum so a constant signal keeps its magnitude.
        flip_filter: flip the taps. gain: overall gain (applied as ``gain ** (ndim / 2)``).
        separable: keep 1-D taps separable (default: when there are at least 8 taps).

    Returns:
        float32 ``[n]`` (separable) or ``[fh, fw]``.
    """
    f = torch.as_tensor(1.0 if f is None else f, dtype=torch.float32)
    if f.dim() > 2 or f.numel() == 0:
        raise ValueError(f"setup_filter: `f` must be a scalar, [taps] or [fh, fw]; got shape {tuple(f.shape)}")
    f = f.reshape(1) if f.dim() == 0 else f.clone()
    if separable is None:
        separable = f.dim() == 1 and f.numel() >= 8
    if f.dim() == 1 and not separable:
        f = torch.outer(f, f)
    if separable and f.dim() != 1:
        raise ValueError("setup_filter: `separable=True` needs 1-D taps")
    if normalize:
        f = f / f.sum()
    if flip_filter:
        f = f.flip(list(range(f.dim())))
    f = f * (gain ** (f.dim() / 2))
    return f.to(device=device)


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Up-sample, pad, FIR-filter and down-sample each channel (``scipy.signal.upfirdn`` in 2-D).

    In order: insert ``up - 1`` zeros after every pixel; pad by ``padding`` (negative crops);
    convolve with ``f * gain ** (f.ndim / 2)`` (correlate with ``flip_filter=True``), keeping
    only outputs whose footprint lies inside; keep every ``down``-th pixel. Differentiable
    (plain PyTorch ops).

    Args:
        x: ``[B, C, H, W]``.
        f: None (identity), ``[taps]`` (separable: applied along x, then along y) or ``[fh, fw]``.
        up, down: int or ``[x, y]``. padding: int, ``[x, y]`` or ``[x0, x1, y0, y1]``.

    Returns:
        ``[B, C, (H*upy + py0 + py1 - fh) // downy + 1, (W*upx + px0 + px1 - fw) // downx + 1]``.
    """
    op = "upfirdn2d"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: `x` must be a tensor of shape [B, C, H, W]; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    upx, upy = _scaling(op, "up", up)
    downx, downy = _scaling(op, "down", down)
    px0, px1, py0, py1 = _padding4(op, padding)
    fw, fh = _filter_size(op, f)
    B = x.shape[0]
    C, H, W = (_geometry(v) for v in x.shape[1:])  # static under torch.jit: the filter's expand(C, ...) too
    if upx > 1 or upy > 1:
        z = x.new_zeros(B, C, H * upy, W * upx)
        z[:, :, ::upy, ::upx] = x  # zeros after every pixel
        x = z
    x = F.pad(x, (px0, px1, py0, py1))  # negative pads crop
    if f is not None:
        f = (f * (gain ** (f.dim() / 2))).to(x.dtype)
        if not flip_filter:  # F.conv2d correlates: flip for a convolution
            f = f.flip(list(range(f.dim())))
        if x.shape[2] < fh or x.shape[3] < fw:
            raise ValueError(f"{op}: the padded input {tuple(x.shape[2:])} is smaller than the filter "
                             f"({fh}, {fw}); increase `padding`")
        if f.dim() == 2:
            x = F.conv2d(x, f[None, None].expand(C, 1, fh, fw), groups=C)
        else:
            x = F.conv2d(x, f.view(1, 1, 1, fw).expand(C, 1, 1, fw), groups=C)
            x = F.conv2d(x, f.view(1, 1, fh, 1).expand(C, 1, fh, 1), groups=C)
    elif gain != 1:
        x = x * gain
    if downx > 1 or downy > 1:
        x = x[:, :, ::downy, ::downx]
    return x


# ----------------------------------------------------------------------------- the op


def _mod(x, w, styles, demodulate, pads, stride, backend):
    """Our modulated correlation; ``pads = (x0, x1, y0, y1)`` applied to x first (F.pad only
    when they are not symmetric and non-negative, which the op takes directly)."""
    px0, px1, py0, py1 = pads
    if px0 == px1 >= 0 and py0 == py1 >= 0:
        padding = (py0, px0)
    else:
        x = F.pad(x, (px0, px1, py0, py1))
        padding = 0
    return MF.modulated_conv2d(x, w, styles, demodulate=demodulate, stride=stride, padding=padding,
                               eps=1e-8, backend=backend)


def _geometry(n):
    """A spatial or kernel size that sets paddings and phase sizes. While torch.jit traces (the
    TorchScript ONNX exporter), sizes read from a tensor are traced values, and paddings built
    from them are tensors that the op refuses: there the image size is fixed at export (an int)
    and only the batch stays dynamic."""
    return int(n) if torch.jit.is_tracing() else n


def _demod_coefficients(weight, styles):
    """``d[b, o] = rsqrt(sum_{i,kh,kw} (weight[o, i] * styles[b, i])^2 + 1e-8)`` -> [B, O], computed in
    fp32 at least; no per-sample weight: ``(s^2) @ (sum_kk w^2)^T``."""
    ct = torch.promote_types(weight.dtype, torch.float32)
    w2 = weight.to(ct).square().sum((2, 3))  # [O, I]
    return torch.rsqrt(styles.to(ct).square() @ w2.t() + 1e-8)  # [B, O]


def _mod_conv_transpose(x, w, styles, up, crop, backend):
    """The transposed convolution (stride ``up``) of their up-sampling path, without demodulation.

    ``t[p] = sum_j w[j] * Z[p + j - (k - 1 - crop)]`` per axis, where ``Z`` is x with ``up - 1``
    zeros between pixels (no trailing ones): i.e. ``conv_transpose2d(x, w.flip.transpose(0, 1),
    stride=up, padding=crop)``. Output phase ``r`` (``p = up * q + r``) only meets taps
    ``j = j0 + up * m`` with ``j0 = (k - 1 - crop - r) mod up``, and reads ``x[q + m + c]``: a
    stride-1 correlation of x with the sub-kernel ``w[j0::up]`` after shifting x by ``c``. Each
    phase is one modweights call; the phases are interleaved at the end.

    Args: x [B, I, H, W]; w [O, I, kh, kw] (already flipped as the caller wants); styles [B, I];
    crop = (cy, cx) >= 0. Returns [B, O, (H-1)*up + kh - 2*cy, (W-1)*up + kw - 2*cx].
    """
    B, I = x.shape[:2]
    H, W = _geometry(x.shape[2]), _geometry(x.shape[3])
    O, _, kh, kw = (_geometry(v) for v in w.shape)
    cy, cx = crop

    def phases(n_in, k, c_out):
        P = k - 1 - c_out
        L = (n_in - 1) * up + k - 2 * c_out
        out = []
        for r in range(up):
            j0 = (P - r) % up
            n = len(range(j0, k, up))
            Q = len(range(r, L, up))
            c = (r + j0 - P) // up  # exact: r + j0 - P is a multiple of up
            lo = -c
            hi = (Q + n - 1) - n_in - lo if n else 0
            out.append((j0, n, Q, lo, hi))
        return L, out

    Ly, ph_y = phases(H, kh, cy)
    Lx, ph_x = phases(W, kw, cx)
    Qy, Qx = -(-Ly // up), -(-Lx // up)
    rows = []
    for j0y, ny, qy, loy, hiy in ph_y:
        row = []
        for j0x, nx, qx, lox, hix in ph_x:
            if ny == 0 or nx == 0 or qy == 0 or qx == 0:  # no tap reaches this phase
                t = x.new_zeros(B, O, qy, qx)
            else:
                t = _mod(x, w[:, :, j0y::up, j0x::up], styles, False, (lox, hix, loy, hiy), 1, backend)
            row.append(F.pad(t, (0, Qx - qx, 0, Qy - qy)))  # common phase size, cropped below
        rows.append(torch.stack(row))  # [up_x, B, O, Qy, Qx]
    t = torch.stack(rows)  # [up_y, up_x, B, O, Qy, Qx]
    t = t.permute(2, 3, 4, 0, 5, 1).reshape(B, O, Qy * up, Qx * up)  # t[.., up*q + r] = phase r
    return t[:, :, :Ly, :Lx]


def _check(x, weight, styles, noise, resample_filter):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{_OP}: `x` must be a tensor of shape [batch_size, in_channels, H, W]; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, I = x.shape[:2]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != I:
        raise ValueError(f"{_OP}: `weight` must have shape [out_channels, in_channels = {I}, kh, kw]; got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if not isinstance(styles, torch.Tensor) or tuple(styles.shape) != (B, I):
        raise ValueError(f"{_OP}: `styles` must have shape [batch_size, in_channels] = {(B, I)}; got "
                         f"{tuple(styles.shape) if isinstance(styles, torch.Tensor) else type(styles).__name__}")
    if noise is not None and not isinstance(noise, torch.Tensor):
        raise TypeError(f"{_OP}: `noise` must be None or a tensor; got {type(noise).__name__}")
    _filter_size(_OP, resample_filter)


def modulated_conv2d(x, weight, styles, noise=None, up=1, down=1, padding=0, resample_filter=None,
                     demodulate=True, flip_weight=True, fused_modconv=True, *, backend=None):
    """StyleGAN2-ADA's ``modulated_conv2d`` (same arguments, same function, same gradients).

    Args:
        x: ``[B, I, H, W]``.
        weight: ``[O, I, kh, kw]`` (cast to ``x.dtype``, as they do).
        styles: ``[B, I]`` modulation coefficients.
        noise: None, or a tensor broadcastable to the output (``[B, 1, H', W']`` in their
            synthesis layers), added after demodulation and resampling.
        up, down: integer up/down-sampling factors. padding: int, ``[x, y]`` or
            ``[x0, x1, y0, y1]``, with respect to the up-sampled image.
        resample_filter: FIR filter from ``setup_filter`` (theirs or ours); None = box of 1 tap.
        demodulate: normalise each output filter, ``rsqrt(sum w^2 + 1e-8)``.
        flip_weight: True = correlation (``F.conv2d``), False = convolution.
        fused_modconv: accepted for compatibility; both settings compute the same function
            through modweights, which never forms per-sample weights (module docstring).
        backend: modweights backend for the convolution (None = the usual selection).

    Returns:
        ``[B, O, H', W']``, the sizes theirs gives (``conv2d_resample``: padding is applied once,
        to the up-sampled image, then the kernel and the filter shrink it, then ``down``).
    """
    _check(x, weight, styles, noise, resample_filter)
    for name, v in (("up", up), ("down", down)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{_OP}: `{name}` must be an int >= 1 (as in StyleGAN2-ADA); got {v!r}")
    if not isinstance(fused_modconv, (bool, int)):
        raise TypeError(f"{_OP}: `fused_modconv` must be a bool; got {type(fused_modconv).__name__}")
    px0, px1, py0, py1 = _padding4(_OP, padding)
    B, I = x.shape[:2]
    O, _, kh, kw = (_geometry(v) for v in weight.shape)

    # Their fp16 guard against overflow: rescale weight (per output filter) and styles to a
    # max of 1; the demodulated result is unchanged up to eps, and the gradients flow
    # through the rescaling exactly as in theirs.
    if x.dtype == torch.float16 and demodulate:
        weight = weight * (1 / math.sqrt(I * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    weight = weight.to(x.dtype)
    styles = styles.to(x.dtype)
    w = weight if flip_weight else weight.flip([2, 3])  # as a correlation kernel

    px0, px1, py0, py1 = _resample_padding((px0, px1, py0, py1), _filter_size(_OP, resample_filter), up, down)
    f = resample_filter

    if up == 1 and down == 1:
        y = _mod(x, w, styles, demodulate, (px0, px1, py0, py1), 1, backend)
    elif up == 1:  # down-sampling: filter (with all the padding) first, then a strided conv
        if kh == 1 and kw == 1:
            x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1])
            y = _mod(x, w, styles, demodulate, (0, 0, 0, 0), 1, backend)
        else:
            x = upfirdn2d(x, f, padding=[px0, px1, py0, py1])
            y = _mod(x, w, styles, demodulate, (0, 0, 0, 0), down, backend)
    elif kh == 1 and kw == 1 and down == 1:  # 1x1 up-sampling: convolve, then up-sample
        y = _mod(x, w, styles, demodulate, (0, 0, 0, 0), 1, backend)
        y = upfirdn2d(y, f, up=up, padding=[px0, px1, py0, py1], gain=up * up)
    else:  # up-sampling: transposed conv (polyphase), then filter, then optional down-sampling
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        cx = max(min(-px0, -px1), 0)  # what the transposed conv can crop itself
        cy = max(min(-py0, -py1), 0)
        y = _mod_conv_transpose(x, w, styles, up, (cy, cx), backend)
        if demodulate:  # of the full kernel: applied once to the interleaved phases
            y = y * _demod_coefficients(weight, styles).to(y.dtype)[:, :, None, None]
        y = upfirdn2d(y, f, padding=[px0 + cx, px1 + cx, py0 + cy, py1 + cy], gain=up * up)
        if down > 1:
            y = upfirdn2d(y, f, down=down)

    if noise is not None:
        y = y + noise.to(y.dtype)  # out of place: the op may have saved y for its backward
    return y
