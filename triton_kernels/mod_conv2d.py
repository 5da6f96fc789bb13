"""mod_conv2d in Triton: host launchers (checks, allocation, grids) for the kernels of
:mod:`.mod_conv2d_fwd` and :mod:`.mod_conv2d_bwd`.

Canonical inputs (see ``modweights._checks``)::

    x (B, I, H, W)    bank (K, O, I/groups, kh, kw)    coeffs None | (B, K)
    styles None | (B, I)    bias None | (O,) | (K, O)

Implemented: ``groups == 1`` (implicit GEMM on tensor cores) and depthwise ``groups == I == O``
(per-channel FMAs); any kernel size, stride, padding, dilation. Other groups raise here and
are reported by :func:`supports` (the backend's ``auto`` then takes the torch backend).

:func:`forward` returns ``(y (B, O, HO, WO), d)`` with ``d`` the float32 demodulation
coefficients ``(B, O)`` (empty without demodulation). :func:`backward` returns the five
gradients, an empty tensor for each one not asked for.

Cost (groups == 1, ``P = HO * WO``, ``R = I * kh * kw``; MMA = tensor-core FLOPs,
FMA = CUDA-core FMAs)::

    forward    2 B P O R MMA  +  B cdiv(P, BLOCK_P) K O R FMA (mixing)      + demod pre-pass B K O R FMA
    dx         2 B H W O R MMA  (x s^2 lanes off the stride grid for stride s) + the same mixing per pixel tile
    weight     2 B P O R MMA  +  ~3 B K O R FMA; dW_k accumulated in registers, stored once per tile
    pre-pass   one read of g and y (dbias, and c for the demodulation)

float32 inputs: the dots run in TF32 exactly when ``torch.backends.cudnn.allow_tf32`` is set, as
``F.conv2d`` does (:func:`_dot_prec`); accumulation is float32 always.

Memory: y, dx, float32 dW (``splits x K x O x R``, ``splits = 1`` unless the tile grid is too
small to fill the GPU), and ``ds``/``dalpha`` partials of ``(O / 32) * kh * kw * B * I`` and
``tiles * B * K`` floats. Nothing of size ``B x O x R``.
"""
from __future__ import annotations

import torch
import triton

from . import _launch as L
from . import _record
from .. import _switches as switches
from .._bias import bias_grads
from .._checks import (
    check_canonical_mod_conv2d, check_device, check_dtype, check_grad_output, check_limits, check_needs,
    conv2d_out_hw)
from ._host import absent, ptr
from . import mod_conv2d_configs as conv_cfg
from .mod_conv2d_bwd import (
    _mod_conv2d_bwd_dx_kernel,
    _mod_conv2d_bwd_prep_kernel,
    _mod_conv2d_bwd_weight_kernel,
    _mod_conv2d_dw_bwd_dx_kernel,
    _mod_conv2d_dw_bwd_weight_kernel,
)
from .mod_linear_layout import _bias_mode  # the same bias modes as the linear kernels
from .mod_conv2d_fwd import _mod_conv2d_demod_kernel, _mod_conv2d_dw_fwd_kernel, _mod_conv2d_fwd_kernel

#: whether the kernels were built for the interpreter (Triton decides at decoration)
INTERPRETED = L.INTERPRETED

#: the weight kernel keeps BLOCK_K experts' dW tiles in registers; more experts than this are
#: processed in chunks, each recomputing the per-sample GEMM (tests lower it to exercise that:
#: the switch ``triton_conv2d_max_block_k``)
MAX_BLOCK_K = 16

#: the float32 dW buffer of the weight kernel is split over samples only while it stays below this
MAX_SPLIT_BYTES = 1 << 30

# Layouts (_cl, _relayout). x (and g) are read channels-last: the implicit-GEMM gathers of a
# shifted tap are then contiguous along the channels and load 16 bytes at a time (NCHW gives one
# 2-byte load per element: the shift breaks alignment along the pixels). Costs one copy of x
# (backward: x and g) when they are not channels-last already; outputs keep x's memory format.
# The bank is copied into a layout whose filter tiles load contiguously along their wide side
# (``K * O * I * kh * kw`` elements per call: small next to the convolution). Both on a GPU, not
# under the interpreter (the kernels honour any strides; tests force both ways: the switches
# ``triton_conv2d_channels_last`` and ``triton_conv2d_bank_relayout``)

_FWD_KEY = ["I", "O", "K", "KH", "KW", "p_bucket", "r_bucket", "HAS_COEFFS", "HAS_STYLES", "DEMOD", "BIAS"]
_DX_KEY = ["I", "O", "K", "KH", "KW", "q_bucket", "r_bucket", "HAS_COEFFS", "HAS_STYLES", "DEMOD"]
_W_KEY = ["I", "O", "K", "KH", "KW", "p_bucket", "HAS_COEFFS", "HAS_STYLES", "DEMOD", "NEED_DW", "NEED_DS",
          "NEED_DA"]

_OP = "mod_conv2d"
# every kernel of the op, registered once with the one launch path (:mod:`._launch`): the
# implicit GEMMs tuned over their candidates (the interpreter's tiles otherwise), the
# bandwidth-bound ones with fixed tiles
L.register(_OP, _mod_conv2d_fwd_kernel, conv_cfg.INTERPRET["fwd"], conv_cfg.fwd_configs(), _FWD_KEY, conv_cfg.prune_fwd)
L.register(_OP, _mod_conv2d_bwd_dx_kernel, conv_cfg.INTERPRET["dx"], conv_cfg.dx_configs(), _DX_KEY, conv_cfg.prune_dx)
# the partial slots a larger tile leaves unused must stay 0: every trial starts from zeros
L.register(_OP, _mod_conv2d_bwd_weight_kernel, conv_cfg.INTERPRET["weight"], conv_cfg.weight_configs(), _W_KEY,
           conv_cfg.prune_weight, reset_to_zero=["ds_ptr", "da_ptr"])
L.register(_OP, _mod_conv2d_demod_kernel, conv_cfg.meta("demod"))
L.register(_OP, _mod_conv2d_bwd_prep_kernel, conv_cfg.meta("prep"))
L.register(_OP, _mod_conv2d_dw_fwd_kernel, conv_cfg.meta("dw_fwd"))
L.register(_OP, _mod_conv2d_dw_bwd_dx_kernel, conv_cfg.meta("dw_dx"))
L.register(_OP, _mod_conv2d_dw_bwd_weight_kernel, conv_cfg.meta("dw_weight"))


def _mix_block_k(K: int, coeffs) -> int:
    """The bank tiles the forward and dx main loops mix per step (unrolled): K rounded up to a
    power of two, 1 without coefficients."""
    return triton.next_power_of_2(K) if coeffs is not None else 1


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------- checks


def is_depthwise(I: int, O: int, groups: int) -> bool:
    return groups > 1 and groups == I == O


def supports(dtype=None, groups: int = 1, in_channels: int | None = None, out_channels: int | None = None,
             **_) -> tuple[bool, str]:
    """(supported, reason) for a conv2d problem (keys as the registry passes them)."""
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"the triton conv2d kernels take float16, bfloat16 or float32 inputs; got {dtype}"
    if groups == 1:
        return True, ""
    if in_channels is None or out_channels is None:
        return False, (f"groups = {groups}: the triton conv2d kernels implement groups == 1 and depthwise "
                       "(groups == in_channels == out_channels), and this problem does not say its channel counts")
    if is_depthwise(in_channels, out_channels, groups):
        return True, ""
    return False, (f"groups = {groups} with in_channels = {in_channels}, out_channels = {out_channels} is not "
                   "implemented by the triton conv2d kernels (they implement groups == 1 and depthwise, "
                   "groups == in_channels == out_channels); use the torch backend")


#: the kernels address inside one sample (and inside the bank) with int32 offsets (tests lower
#: it: the switch ``triton_conv2d_max_elements``)
MAX_ELEMENTS = 2 ** 31 - 1
_LIMITS_OF = "triton conv2d kernels (32-bit offsets; use the torch backend)"


def _max_elements() -> int:
    return switches.get("triton_conv2d_max_elements", MAX_ELEMENTS)


def _check(x, bank, coeffs, styles, bias, stride, padding, dilation, groups):
    """Check what the kernels assume (the glue's custom ops are public) with the package's one
    set of checks, then what only these kernels need: their dtypes, a CUDA device (or the
    interpreter), groups 1 or depthwise, 32-bit offsets inside one sample."""
    op = "mod_conv2d (triton)"
    check_dtype(op, x, (torch.float16, torch.bfloat16, torch.float32), "triton")
    check_canonical_mod_conv2d(op, x, bank, coeffs, styles, bias, stride, padding, dilation, groups)
    check_device(op, x, x.is_cuda or INTERPRETED or (x.is_meta and _record.active()),
                 "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 (set before importing "
                 "modweights) for CPU tensors")
    B, I, H, W = x.shape
    ok, reason = supports(groups=groups, in_channels=I, out_channels=bank.shape[1])
    if not ok:  # what the registry says before choosing this backend
        raise RuntimeError(f"{op}: {reason}")
    check_limits(op, (("x", I * H * W, _max_elements(), "I * H * W (elements of one sample)"),
                      ("bank", bank.numel(), _max_elements(), "K * O * I / groups * kh * kw (elements)")), _LIMITS_OF)


def _channels_last(x) -> bool:
    """x stored channels-last (and not also plain-contiguous): outputs follow it, as F.conv2d's do."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def new_output(x, shape, dtype=None):
    """An uninitialised ``(B, C, h, w)`` tensor in x's memory format (usable with fake tensors)."""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _dot_prec(dtype) -> str:
    """tl.dot input precision of float32 operands: TF32 (``"tf32"``) exactly when
    ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default: on), exact float32
    (``"ieee"``) otherwise. That is the switch that governs ``F.conv2d``, the dense convolution
    these kernels stand in for, so both compute float32 convolutions alike;
    ``torch.backends.cuda.matmul.allow_tf32`` (the matmul switch, which the linear kernels
    follow) plays no part here. Half operands: moot (their dots are half-precision MMAs)."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32"


def _s2(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _relayout(bank, inner: str):
    """The bank, same shape ``(K, O, I/g, kh, kw)``, stored ``(K, kh, kw, I/g, O)`` (``inner='o'``:
    the forward's ``[I, O]`` filter tiles) or ``(K, kh, kw, O, I/g)`` (``inner='i'``: the ``[O, I]``
    tiles of dx and the weight kernel; depthwise, where I/g = 1, its channel vectors)."""
    on = switches.get("triton_conv2d_bank_relayout", not INTERPRETED)
    if not on:
        return bank
    perm = (0, 3, 4, 2, 1) if inner == "o" else (0, 3, 4, 1, 2)
    inv = sorted(range(5), key=perm.__getitem__)
    return bank.permute(perm).contiguous().permute(inv)


def _cl(t):
    """t read channels-last on a GPU or where the switch ``triton_conv2d_channels_last`` says so
    (a copy only if it is not already)."""
    on = switches.get("triton_conv2d_channels_last", not INTERPRETED)
    return t.contiguous(memory_format=torch.channels_last) if on else t


def _demod(bank, coeffs, styles, eps, B):
    """d (B, O) float32 = rsqrt(sum_{i,ky,kx} (M_b s_b)^2 + eps), by the pre-pass kernel."""
    K, O, Ig, KH, KW = bank.shape
    d = torch.empty((B, O), dtype=torch.float32, device=bank.device)
    a = ptr(coeffs, bank.device)
    s = ptr(styles, bank.device)
    L.launch(_mod_conv2d_demod_kernel, lambda m: (B, triton.cdiv(O, m["BLOCK_O"])),
             (bank, a, s, d, Ig, O, K, KH, KW, *bank.stride(), *_s2(coeffs), *_s2(styles), *d.stride(), float(eps)),
             dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None))
    return d


# ----------------------------------------------------------------------------- forward


def forward(x, bank, coeffs, styles, bias, demodulate: bool, eps: float, stride, padding, dilation, groups: int):
    """(y (B, O, HO, WO) in x's dtype and memory format, d (B, O) float32 or empty)."""
    _check(x, bank, coeffs, styles, bias, stride, padding, dilation, groups)
    B, I, H, W = x.shape
    K, O, Ig, KH, KW = bank.shape
    HO, WO = conv2d_out_hw(H, W, KH, KW, stride, padding, dilation)
    P = HO * WO
    check_limits("mod_conv2d (triton)", (("x", O * P, _max_elements(), "O * HO * WO (elements of one output)"),),
                 _LIMITS_OF)
    y = new_output(x, (B, O, HO, WO))
    d = _demod(bank, coeffs, styles, eps, B) if demodulate else torch.empty(0, dtype=torch.float32, device=x.device)
    bias_flag, bias_t, bias_st = _bias_mode(bias, coeffs)
    a = ptr(coeffs, x.device)
    bp = ptr(bias_t, x.device)
    dp = d if demodulate else absent(x.device)
    dst = (d.stride(0), d.stride(1)) if demodulate else (0, 0)
    geo = (*stride, *padding, *dilation)
    bank = _relayout(bank, "i" if is_depthwise(I, O, groups) else "o")
    x = _cl(x)  # (y was allocated in the caller's format above)
    if is_depthwise(I, O, groups):
        L.launch(_mod_conv2d_dw_fwd_kernel, lambda m: (B * triton.cdiv(P, m["BLOCK_P"]), triton.cdiv(O, m["BLOCK_C"])),
                 (x, bank, a, bp, dp, y, B, O, H, W, K, KH, KW, HO, WO, *geo,
                  *x.stride(), bank.stride(0), bank.stride(1), bank.stride(3), bank.stride(4),
                  *_s2(coeffs), *bias_st, *dst, *y.stride()),
                 dict(HAS_COEFFS=coeffs is not None, DEMOD=bool(demodulate), BIAS=bias_flag))
        return y, d
    s = ptr(styles, x.device)
    args = (x, bank, a, s, bp, dp, y, B, I, H, W, O, K, KH, KW, HO, WO, *geo, _bucket(P), _bucket(I * KH * KW),
            *x.stride(), *bank.stride(), *_s2(coeffs), *_s2(styles), *bias_st, *dst, *y.stride())
    flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None, DEMOD=bool(demodulate),
                 BIAS=bias_flag, DOT_PREC=_dot_prec(x.dtype), BLOCK_K=_mix_block_k(K, coeffs),
                 # float16 with demodulation: x * s can pass 65504 where y cannot (docs/numerics.md)
                 F32_DOT=bool(demodulate) and x.dtype == torch.float16)

    def grid(m):
        return (B * triton.cdiv(P, m["BLOCK_P"]), triton.cdiv(O, m["BLOCK_O"]))

    L.launch(_mod_conv2d_fwd_kernel, grid, args, flags)
    return y, d


# ----------------------------------------------------------------------------- backward


def _splits(B: int, n_tiles: int, dw_bytes_per_split: int, device) -> int:
    """How many sample ranges the weight kernel splits the batch into: enough programs to fill
    the GPU (2 per SM), within the float32 dW buffer budget; 1 under the interpreter; the
    switch ``triton_split`` (tests) where set."""
    forced = switches.get("triton_split")
    if forced is not None:
        return max(1, min(forced, B))
    if INTERPRETED or device.type not in ("cuda", "meta"):
        return 1
    sms = _record.SMS if device.type == "meta" else torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(n_tiles, 1))
    cap = max(1, MAX_SPLIT_BYTES // max(dw_bytes_per_split, 1))
    return max(1, min(want, cap, B))


def backward(g, x, bank, coeffs, styles, bias, d, y, demodulate: bool, eps: float, stride, padding, dilation,
             groups: int, needs):
    """(dx, dbank, dcoeffs, dstyles, dbias): docs/design.md section 2; an empty tensor where not needed.

    ``d`` (B, O) float32 and ``y`` are the forward's results (``y`` read only with demodulation,
    for ``c = (sum_p g * (y - bias_b)) * d^2``). ``g`` may have any strides (an expanded
    ``y.sum()`` gradient included): the kernels honour them.
    """
    _check(x, bank, coeffs, styles, bias, stride, padding, dilation, groups)
    nx, nbank, na, ns, nbias = check_needs("mod_conv2d (triton) backward", needs)
    na = na and coeffs is not None
    ns = ns and styles is not None
    nbias = nbias and bias is not None
    B, I, H, W = x.shape
    K, O, Ig, KH, KW = bank.shape
    HO, WO = conv2d_out_hw(H, W, KH, KW, stride, padding, dilation)
    check_grad_output("mod_conv2d (triton) backward", g, (B, O, HO, WO))
    P = HO * WO
    TAPS = KH * KW
    dev = x.device
    f32 = torch.float32
    depthwise = is_depthwise(I, O, groups)
    if demodulate and (d is None or d.numel() == 0 or y is None):
        d = _demod(bank, coeffs, styles, eps, B)  # not saved: recompute (cheap, B K O R FMAs)
        if y is None:
            y, _ = forward(x, bank, coeffs, styles, bias, demodulate, eps, stride, padding, dilation, groups)

    # pre-pass: gsum (dbias, the bias part of dcoeffs, c) and gy (c) in one read of g and y
    gsum = gy = None
    if nbias or (na and bias is not None and bias.dim() == 2) or demodulate:
        gsum = torch.empty((B, O), dtype=f32, device=dev)
        gy = torch.empty((B, O), dtype=f32, device=dev) if demodulate else gsum
        yv = y if demodulate else g
        L.launch(_mod_conv2d_bwd_prep_kernel, lambda m: (B, triton.cdiv(O, m["BLOCK_O"])),
                 (g, yv, gsum, gy, O, HO, WO, *g.stride(), *yv.stride()), dict(DEMOD=bool(demodulate)))
    bias_b = None
    if bias is not None:
        bias_b = bias.to(f32).expand(B, O) if bias.dim() == 1 else (
            coeffs.to(f32) @ bias.to(f32) if coeffs is not None else bias[0].to(f32).expand(B, O))
    c = None
    if demodulate:
        # c = dd * d^3 with dd = sum_p g z = (sum_p g y - bias_b sum_p g) / d
        c = gy - gsum * bias_b if bias_b is not None else gy
        c = (c * d.square()).contiguous()

    a = ptr(coeffs, x.device)
    s = ptr(styles, x.device)
    dp = d if demodulate else absent(x.device)
    cp = c if demodulate else absent(x.device)
    dst = (d.stride(0), d.stride(1)) if demodulate else (0, 0)
    cst = (c.stride(0), c.stride(1)) if demodulate else (0, 0)
    geo = (*stride, *padding, *dilation)

    # distinct empty tensors: a custom op's outputs may not alias each other
    dx, dbank, da, ds, dbias = (x.new_empty(0) for _ in range(5))
    w_in = bank
    if nx or nbank or na or ns:
        bank = _relayout(bank, "i")
        dx_format_of = x  # dx in the caller's format
        x, g = _cl(x), _cl(g)
    if nx:
        dx = new_output(dx_format_of, (B, I, H, W))
        if depthwise:
            L.launch(_mod_conv2d_dw_bwd_dx_kernel,
                     lambda m: (B * triton.cdiv(H * W, m["BLOCK_Q"]), triton.cdiv(O, m["BLOCK_C"])),
                     (g, bank, a, dp, dx, B, O, H, W, K, KH, KW, HO, WO, *geo,
                      *g.stride(), bank.stride(0), bank.stride(1), bank.stride(3), bank.stride(4),
                      *_s2(coeffs), *dst, *dx.stride()),
                     dict(HAS_COEFFS=coeffs is not None, DEMOD=bool(demodulate)))
        else:
            args = (g, bank, a, s, dp, dx, B, I, H, W, O, K, KH, KW, HO, WO, *geo, _bucket(H * W),
                    _bucket(O * TAPS), *g.stride(), *bank.stride(), *_s2(coeffs), *_s2(styles), *dst, *dx.stride())
            flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None, DEMOD=bool(demodulate),
                         DOT_PREC=_dot_prec(x.dtype), BLOCK_K=_mix_block_k(K, coeffs))

            def grid(m):
                return (B * triton.cdiv(H * W, m["BLOCK_Q"]), triton.cdiv(I, m["BLOCK_I"]))

            L.launch(_mod_conv2d_bwd_dx_kernel, grid, args, flags)

    if nbank or na or ns:
        dw_elems = K * O * Ig * TAPS
        if depthwise:
            n_ct = triton.cdiv(O, L.fixed_meta(_mod_conv2d_dw_bwd_weight_kernel)["BLOCK_C"])
            n_split = _splits(B, n_ct * TAPS, 4 * dw_elems, dev)
            sps = triton.cdiv(B, n_split)
            n_split = triton.cdiv(B, sps)
            dw = torch.empty((n_split, K, O, TAPS), dtype=f32, device=dev) if nbank else absent(x.device)
            da_ws = torch.zeros((n_ct * TAPS, B, K), dtype=f32, device=dev) if na else absent(x.device)
            dws = dw.stride() if nbank else (0, 0, 0, 0)
            das = da_ws.stride() if na else (0, 0, 0)
            L.launch(_mod_conv2d_dw_bwd_weight_kernel, (n_ct, TAPS, n_split),
                     (g, x, bank, a, dp, cp, dw, da_ws, B, O, H, W, K, KH, KW, HO, WO, *geo, sps,
                      *g.stride(), *x.stride(), bank.stride(0), bank.stride(1), bank.stride(3), bank.stride(4),
                      *_s2(coeffs), *dst, *cst, *dws, *das),
                     dict(HAS_COEFFS=coeffs is not None, DEMOD=bool(demodulate), NEED_DW=nbank, NEED_DA=na,
                          BLOCK_K=triton.next_power_of_2(K)))
        else:
            if INTERPRETED:
                bo_min = conv_cfg.INTERPRET["weight"]["BLOCK_O"]
                bi_min = conv_cfg.INTERPRET["weight"]["BLOCK_I"]
            else:
                bo_min, bi_min = conv_cfg.MIN_WEIGHT_BLOCK_O, conv_cfg.MIN_WEIGHT_BLOCK_I
            n_ot, n_it = triton.cdiv(O, bo_min), triton.cdiv(I, bi_min)
            most_k = switches.get("triton_conv2d_max_block_k", MAX_BLOCK_K)
            bk = min(triton.next_power_of_2(K), most_k) if coeffs is not None else 1
            n_kc = triton.cdiv(K, bk) if coeffs is not None else 1
            n_split = _splits(B, n_ot * n_it * TAPS * n_kc, 4 * dw_elems, dev)
            sps = triton.cdiv(B, n_split)
            n_split = triton.cdiv(B, sps)
            dw = torch.empty((n_split, K, O, I, TAPS), dtype=f32, device=dev) if nbank else absent(x.device)
            ds_ws = torch.zeros((n_ot * TAPS, B, I), dtype=f32, device=dev) if ns else absent(x.device)
            da_ws = torch.zeros((n_ot * n_it * TAPS, B, K), dtype=f32, device=dev) if na else absent(x.device)
            args = (g, x, bank, a, s, dp, cp, dw, ds_ws, da_ws, B, I, H, W, O, K, KH, KW, HO, WO, *geo, sps, n_kc,
                    _bucket(P), *g.stride(), *x.stride(), *bank.stride(), *_s2(coeffs), *_s2(styles), *dst, *cst,
                    *(dw.stride() if nbank else (0,) * 5), *(ds_ws.stride() if ns else (0,) * 3),
                    *(da_ws.stride() if na else (0,) * 3))
            flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None, DEMOD=bool(demodulate),
                         NEED_DW=nbank, NEED_DS=ns, NEED_DA=na, DOT_PREC=_dot_prec(x.dtype), BLOCK_K=bk)

            def grid(m):
                return (triton.cdiv(O, m["BLOCK_O"]), triton.cdiv(I, m["BLOCK_I"]) * TAPS, n_split * n_kc)

            L.launch(_mod_conv2d_bwd_weight_kernel, grid, args, flags)
            if ns:
                ds = ds_ws.sum(0).to(x.dtype)
        if nbank:
            dbank = (dw[0] if dw.shape[0] == 1 else dw.sum(0)).view(K, O, Ig, KH, KW).to(w_in.dtype)
        if na:
            da = da_ws.sum(0)

    if bias is not None and (nbias or na):
        db, da_bias = bias_grads(gsum, None if coeffs is None else coeffs.to(f32), bias, nbias, na)  # rows: samples
        if db is not None:
            dbias = db.to(bias.dtype)
        if da_bias is not None:
            da = da + da_bias
    if na:
        da = da.to(coeffs.dtype)
    return dx, dbank, da, ds, dbias
