"""The `cuda` backend: the compiled kernels of ``csrc/`` (see csrc/README.md).

The extension module ``modweights._cuda`` (pybind11, built by ``setup.py`` with nvcc; see
csrc/README.md) takes one parameter struct, ``ModLinearParams`` (device pointers, sizes,
flags), and the current stream, and raises ValueError / RuntimeError itself when a check
or a launch fails. This module owns everything between the autograd glue and the kernels:
contiguity, allocation, the stream, the kernel limits, and the small reductions that
finish a backward pass. Its per-call path reads no file and repeats none of
``modweights._checks``' validation: the availability per device and the weight kernel's
plan per problem are cached (``clear_caches`` drops them).

Formulation (linear only; docs/design.md sections 1-2), per-sample conditioning:

forward
    ``_mod_linear_demod_kernel`` (demodulation only) computes ``d (B, O)`` from the bank,
    coefficients and styles; ``_mod_linear_fwd_kernel`` is one GEMM per sample with the
    styles folded into the A-tile load (``x * s``), the bank mixed in the B-tile load
    (``sum_k a_k W_k``), demodulation and bias in the epilogue. Tensor cores (WMMA) for
    fp16/bf16 with fp32 accumulation; an exact fp32 FMA path for fp32.
backward
    ``_mod_linear_bwd_stats_kernel`` reduces ``sum_t g`` (bias gradients) and
    ``c = d^2 sum_t g (y - bias)`` (= ``dd * d^3``, demodulation) in one pass over g and y;
    ``_mod_linear_bwd_dx_kernel`` is the transposed GEMM with ``gz = g * d`` in the A load,
    the mixture in the B load and ``s`` in the epilogue; ``_mod_linear_bwd_weight_kernel``
    makes ``dW_k`` for every k, ``ds`` and ``da`` in one pass over ``(gz, x)`` per output
    tile. The bias gradients and the bias part of ``dcoeffs`` are ``(B, O)``-sized torch ops
    here.

Per-token conditioning (coeffs ``(B, T, K)`` and/or styles ``(B, T, I)``, T > 1): every
row has its own weight, so the kernels of ``mod_linear_token*.cu`` take the stacked
formulation (rows ``R = B * T`` flattened; coefficients and styles folded into the row
operand, the bank read as K tiles, or K(K+1)/2 pairwise products where a square of the
weight is needed): demodulation ``d (B, T, O)``, forward, an elementwise prep
(``gz = g d``, ``c = g (y - bias) d^2``), dx (+ the ``x u`` part of ds), the demodulation
part of ds, da (two row-reduced passes), dbank. Per-sample coefficients or styles beside
per-token ones are read per row (``a_div`` / ``s_div`` = T); their per-row gradients are
summed over t (in :mod:`._cuda_mod_linear_token`, the per-token launchers, split from this
file by role). See csrc/mod_linear_token.cuh for the cost.

Determinism: with ``torch.use_deterministic_algorithms(True)`` the weight kernel writes
per-tile partial sums that are added here in a fixed order; otherwise it uses fp32 atomics.
The per-token kernels use no atomics.

Not implemented (``supports`` says so; asking for them by name is a RuntimeError): conv2d,
float64.
"""
from __future__ import annotations

import functools
import sys

import torch

from . import supports_of
from .. import _switches as switches
from .._bias import bias_grads
from .._checks import (
    ModConv2dConfig, ModLinearConfig, as_per_sample, check_canonical_mod_linear, check_dtype, check_limits)
from .._checks import check_device as _require_device
from . import _cuda_extension as _ext
from ._cuda_extension import ABI_VERSION, STATUS_FILE, TOKEN_TILE  # noqa: F401 (the backend's facts)
from ._cuda_extension import device_status as _device_status  # a module global: tests replace it
from . import _cuda_mod_linear_token as _token  # the per-token launchers (a module: imports may cycle)

NAME = "cuda"
DIRECT = False
DIFFERENTIABLE_BACKWARD = False


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

#: kernel limits (csrc/api.cu, check_common): grid.z holds samples, grid.y row tiles of 128
MAX_B = 65535
MAX_T = 65535 * 128
MAX_K = 1024
MAX_IO = 2**31 - 256
#: per-token kernels (csrc/api.cu, check_core): 64-column tiles of I or O on grid.y
MAX_IO_TOKEN = 65535 * 64
MAX_ROWS_TOKEN = 2**37
CONV2D_REASON = "cuda conv2d kernels are not implemented"
#: Decode: per-sample problems with at most this many rows per sample take the per-token
#: kernels, the per-sample coefficients and styles read per row. Those make one pass over
#: the bank per 64 rows of all samples together; the per-sample GEMM mixes the bank again
#: for every sample, in a 128-row tile that T rows fill T/128 of. (Tests change it through the
#: switch ``cuda_decode_rows``.)
DECODE_ROWS = 4


def _emulation_library() -> str:
    """Tests only: the path of a host-emulation build of the extension (``csrc/emu``, the module
    ``_cuda_emu``), the switch ``cuda_emulation_library``; "" when unset (normal use). While set,
    CPU tensors run through this backend with the very same kernel source and binding executed
    on the CPU, so validation, parameter passing, plans, partial buffers and the reductions here
    are exercised without a GPU."""
    return switches.get("cuda_emulation_library", "")


# ----------------------------------------------------------------------------- the extension


def extension():
    """``(module, '')`` or ``(None, why not)``: ``modweights._cuda``, or the host emulation
    while the switch ``cuda_emulation_library`` is set (loading: :mod:`._cuda_extension`)."""
    return _ext.load(_emulation_library())


def clear_caches() -> None:
    """Forget the loaded extension, build record, availability and weight plans (tests that
    change the build record or the emulated device)."""
    _ext.clear()
    _weight_plan.cache_clear()
    _AVAILABILITY.clear()


# ----------------------------------------------------------------------------- registry contract


def _emulating(device: torch.device) -> bool:
    return device.type == "cpu" and bool(_emulation_library())


#: (emulation library, device type, device index) -> (ok, reason); filled on first ask
_AVAILABILITY: dict = {}


def availability(device) -> tuple[bool, str]:
    """Cached per device and extension: after the first call a dict lookup (this runs on
    every call, in the registry and in the entry points)."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    key = (_emulation_library(), dev.type, dev.index)
    hit = _AVAILABILITY.get(key)
    if hit is None:
        hit = _availability(dev)
        if dev.type != "cuda" or dev.index is not None:  # 'cuda' alone means the current device
            _AVAILABILITY[key] = hit
    return hit


def _availability(device: torch.device) -> tuple[bool, str]:
    ext, why = extension()
    if ext is None:
        return False, why
    if _emulating(device):
        return True, f"host emulation of the kernels ({_emulation_library()}; tests only)"
    if not torch.cuda.is_available():
        extra = "" if torch.version.cuda else "; this torch build has no CUDA support"
        return False, f"built but no CUDA device (torch.cuda.is_available() is False{extra})"
    if device.type != "cuda":
        return False, f"built, but the cuda backend runs on CUDA tensors only; got {device.type} tensors"
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok, why = _device_status(_emulation_library(), index)
    if not ok:
        return False, why
    status = _ext.read_status() or {}
    return True, (f"compiled kernels (targets {status.get('arch', '?')}, nvcc {status.get('nvcc_version', '?')}), "
                  "mod_linear")


def supports(op: str, **problem) -> tuple[bool, str]:
    return supports_of(sys.modules[__name__], op, problem)


def supports_mod_conv2d(**problem) -> tuple[bool, str]:
    return False, CONV2D_REASON


def supports_mod_linear(**problem) -> tuple[bool, str]:
    dtype = problem.get("dtype")
    if dtype is not None and dtype not in _DTYPE_CODE:
        return False, f"dtype {dtype} is not supported by the cuda kernels (float32, float16, bfloat16)"
    return True, ""


# ----------------------------------------------------------------------------- validation


class _Prepared:
    """Checked, contiguous kernel inputs and their sizes. ``token``: some conditioning is per
    token (T > 1); ``a_div`` / ``s_div``: rows of x per row of coeffs / styles (1 or T)."""

    __slots__ = ("x", "bank", "coeffs", "styles", "bias", "B", "T", "I", "O", "K", "dtype", "code", "device",
                 "token", "a_div", "s_div")


def prepare(x, bank, coeffs, styles, bias, *, check_device: bool = True) -> _Prepared:
    """Validate inputs for the kernels; return them canonical and contiguous (:func:`_canonical`).

    ``coeffs`` is None, ``(B, K)`` or ``(B, T, K)``; ``styles`` None, ``(B, I)`` or
    ``(B, T, I)``; a ``(B, 1, C)`` per-token tensor is per-sample (the same maths). Raises
    RuntimeError for non-CUDA tensors, TypeError for a dtype, ValueError for shapes and
    sizes beyond the kernels' index ranges. ``check_device=False`` skips the CUDA-device
    check (for tests on the CPU). The entry points skip this: their inputs come from
    ``modweights._checks``, which has checked all of it but the kernel limits.
    """
    op = "cuda backend"
    check_dtype(op, x, tuple(_DTYPE_CODE), "cuda")
    coeffs, styles = check_canonical_mod_linear(op, x, bank, coeffs, styles, bias)
    if check_device:
        _require_device(op, x, x.device.type == "cuda" or _emulating(x.device), "the kernels run on CUDA tensors")
    return _canonical(x, bank, coeffs, styles, bias)


def _canonical(x, bank, coeffs, styles, bias) -> _Prepared:
    """Checked inputs (``modweights._checks``' forms) -> contiguous kernel inputs and sizes;
    ValueError for sizes beyond the kernels' index ranges (the one check ``_checks`` cannot
    make)."""
    op = "cuda backend"
    B, T, I = x.shape
    K, O, _ = bank.shape
    coeffs, styles = as_per_sample(coeffs, T), as_per_sample(styles, T)  # (B, 1, C) per token is per sample
    token = (coeffs is not None and coeffs.dim() == 3) or (styles is not None and styles.dim() == 3)
    if token:
        limits = (("x", B * T, MAX_ROWS_TOKEN, "B * T (rows)"), ("bank", K, MAX_K, "K (bank entries)"),
                  ("x", I, MAX_IO_TOKEN, "I (input features)"), ("bank", O, MAX_IO_TOKEN, "O (output features)"))
    else:
        limits = (("x", B, MAX_B, "B (samples)"), ("x", T, MAX_T, "T (rows per sample)"),
                  ("bank", K, MAX_K, "K (bank entries)"), ("x", I, MAX_IO, "I (input features)"),
                  ("bank", O, MAX_IO, "O (output features)"))
    check_limits(op, limits, "cuda per-token kernels" if token else "cuda kernels")
    p = _Prepared()
    p.x, p.bank = x.contiguous(), bank.contiguous()
    p.coeffs = None if coeffs is None else coeffs.contiguous()
    p.styles = None if styles is None else styles.contiguous()
    p.bias = bias
    p.B, p.T, p.I, p.O, p.K = B, T, I, O, K
    p.dtype, p.device = x.dtype, x.device
    check_dtype(op, x, tuple(_DTYPE_CODE), "cuda")  # (the registry's supports() says so before this)
    p.code = _DTYPE_CODE[x.dtype]
    p.token = token
    p.a_div = 1 if coeffs is not None and coeffs.dim() == 3 else T
    p.s_div = 1 if styles is not None and styles.dim() == 3 else T
    return p


def _empty_problem(p: _Prepared) -> bool:
    return p.B == 0 or p.T == 0 or p.I == 0


def _decode(p: _Prepared) -> bool:
    """Per-sample conditioning with few rows per sample (see :data:`DECODE_ROWS`)."""
    return (not p.token and 0 < p.T <= switches.get("cuda_decode_rows", DECODE_ROWS) and not _empty_problem(p)
            and p.I <= MAX_IO_TOKEN and p.O <= MAX_IO_TOKEN)  # else the per-sample kernels' wider range


def _require(device: torch.device):
    ok, why = availability(device)
    if not ok:
        raise RuntimeError(f"modweights cuda backend is not available for {device} tensors: {why}")
    return extension()[0]


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    """The current stream of ``device`` as an int (0 under host emulation)."""
    if device.type != "cuda":
        return 0  # host emulation
    if _raw_stream is not None:  # what torch.cuda.current_stream(device).cuda_stream returns, cheaper
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _params(ext, pp: _Prepared, cfg: ModLinearConfig, bias_stride_b: int = 0, a_div: int = 1, s_div: int = 1,
            bias_div: int = 1):
    """The kernels' parameter struct with the sizes and flags of ``pp`` (pointers: 0)."""
    index = pp.device.index if pp.device.type == "cuda" else 0  # 0: host emulation
    return ext.ModLinearParams(pp.B, pp.T, pp.I, pp.O, pp.K, pp.code, index, cfg.eps,
                            torch.are_deterministic_algorithms_enabled(), a_div, s_div, bias_div, bias_stride_b)


@functools.lru_cache(maxsize=4096)
def _weight_plan(ext, device: int, B: int, T: int, I: int, O: int, K: int, code: int, wants: tuple):
    """The weight kernel's plan for one problem on one device (tile, bank groups, sample
    split, shared memory): computed by the extension once, then reused."""
    p = ext.ModLinearParams(B, T, I, O, K, code, device)
    p.want_dbank, p.want_dcoeffs, p.want_dstyles = wants
    return ext.mod_linear_bwd_weight_plan(p)


def _demod_then_forward(p, stream, demod, forward, d_shape, y_shape, dev, dtype):
    """The forward launches of both kernel families: ``demod`` (None without demodulation) writes
    the float32 coefficients ``d`` (``d_shape``: ``(B, O)`` per sample, ``(B, T, O)`` per token),
    then ``forward`` writes ``y`` (``y_shape``, ``dtype``); both on ``dev``. Returns ``(y, d or None)``."""
    d = None
    if demod is not None:
        d = torch.empty(d_shape, device=dev, dtype=torch.float32)
        p.d = d.data_ptr()
        demod(p, stream)
    y = torch.empty(y_shape, device=dev, dtype=dtype)
    p.y = y.data_ptr()
    forward(p, stream)
    return y, d


def _mixed_bias(pp: _Prepared):
    """fp32 bias the kernels read: ``(O,)`` shared (stride 0) or ``(B, O)`` per sample."""
    if pp.bias is None:
        return None, 0
    if pp.bias.dim() == 1:
        return pp.bias.float().contiguous(), 0
    if pp.coeffs is None:  # K == 1
        return pp.bias[0].float().contiguous(), 0
    return (pp.coeffs.float() @ pp.bias.float()).contiguous(), pp.O  # [B, O]


# ----------------------------------------------------------------------------- linear


def mod_linear_forward(x, bank, coeffs, styles, bias, cfg: ModLinearConfig):
    """Canonical, checked inputs (``modweights._checks``) -> ``(y (B, T, O), d (B, O) float32
    or None)``."""
    ext = _require(x.device)
    pp = _canonical(x, bank, coeffs, styles, bias)
    B, T, O = pp.B, pp.T, pp.O
    if pp.token:
        return _token.forward(ext, pp, cfg)
    if _decode(pp):  # d is the same for every row of a sample: (B, O) as the per-sample path
        y, d = _token.forward(ext, pp, cfg)
        return y, (None if d is None else d[:, 0].contiguous())
    if _empty_problem(pp):  # nothing to launch: the same algebra in torch ops
        from . import torch_backend

        y, d = torch_backend.mod_linear_forward(x, bank, coeffs, styles, bias, cfg)
        return y, (None if d is None else d.float().expand(B, -1, O).reshape(B, O).contiguous())
    dev = x.device
    stream = _stream(dev)
    bb, bias_stride_b = _mixed_bias(pp)
    p = _params(ext, pp, cfg, bias_stride_b)
    p.x, p.bank, p.coeffs, p.styles, p.bias = _ptr(pp.x), _ptr(pp.bank), _ptr(pp.coeffs), _ptr(pp.styles), _ptr(bb)
    demod = ext.mod_linear_demod if cfg.demodulate else None
    return _demod_then_forward(p, stream, demod, ext.mod_linear_forward, (B, O), (B, T, O), dev, x.dtype)


def mod_linear_forward_fake(x, bank, coeffs, styles, bias, cfg: ModLinearConfig):
    """Shapes and dtypes of :func:`mod_linear_forward` (for the custom op's fake tensors)."""
    B, T, _ = x.shape
    O = bank.shape[1]
    d = None
    if cfg.demodulate:
        token = T != 1 and any(t is not None and t.dim() == 3 for t in (coeffs, styles))
        d = x.new_empty((B, T, O) if token else (B, O), dtype=torch.float32)
    return x.new_empty((B, T, O)), d


def mod_linear_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: ModLinearConfig, needs):
    """Closed-form gradients of docs/design.md section 2 on the kernels; returns
    ``(dx, dbank, dcoeffs, dstyles, dbias)`` with None for what ``needs`` leaves out."""
    nx, nbank, na, ns, nbias = (bool(n) for n in needs)
    na = na and coeffs is not None
    ns = ns and styles is not None
    nbias = nbias and bias is not None
    ext = _require(x.device)
    pp = _canonical(x, bank, coeffs, styles, bias)
    B, T, I, O, K = pp.B, pp.T, pp.I, pp.O, pp.K
    if pp.token or _decode(pp):
        if d is not None and not pp.token:  # decode: the per-sample d of every row
            d = d.reshape(B, 1, O).expand(B, T, O)
        return _token.backward(ext, pp, g, d, y, cfg, (nx, nbank, na, ns, nbias), coeffs, styles)
    if _empty_problem(pp):
        from . import torch_backend

        grads = torch_backend.mod_linear_backward(g, x, bank, coeffs, styles, bias, None, None, cfg,
                                              (nx, nbank, na, ns, nbias))
        return tuple(None if t is None else t.contiguous() for t in grads)
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    det = torch.are_deterministic_algorithms_enabled()
    # g may be expanded (stride 0) or non-contiguous: the kernels read it densely
    g = g.reshape(B, T, O).to(x.dtype).contiguous()
    dx = dbank = da = ds = dbias = None
    stream = _stream(dev)
    bb, bias_stride_b = _mixed_bias(pp)
    p = _params(ext, pp, cfg, bias_stride_b)
    p.x, p.bank, p.coeffs, p.styles, p.bias = _ptr(pp.x), _ptr(pp.bank), _ptr(pp.coeffs), _ptr(pp.styles), _ptr(bb)
    p.g = g.data_ptr()
    if cfg.demodulate:
        if d is None or y is None:  # not saved: recompute (y too, for z = (y - bias) / d)
            y, d = mod_linear_forward(pp.x, pp.bank, pp.coeffs, pp.styles, pp.bias, cfg)
        d = d.reshape(B, O).float().contiguous()
        y = y.reshape(B, T, O).to(x.dtype).contiguous()
        p.d, p.y = d.data_ptr(), y.data_ptr()

    # ---- row statistics: sum_t g (bias grads) and c = dd * d^3 (demodulation)
    need_c = cfg.demodulate and (nbank or na or ns)
    need_gsum = bias is not None and (nbias or (na and bias.dim() == 2))
    c = gsum = None
    if need_c or need_gsum:
        if need_c:
            c = torch.empty((B, O), **f32)
            p.c = c.data_ptr()
        if need_gsum:
            gsum = torch.empty((B, O), **f32)
            p.gsum = gsum.data_ptr()
        ext.mod_linear_bwd_stats(p, stream)

    if nx:
        dx = torch.empty((B, T, I), device=dev, dtype=x.dtype)
        p.dx = dx.data_ptr()
        ext.mod_linear_bwd_dx(p, stream)

    # ---- weight side: dW_k, ds, da in one pass over (gz, x) per output tile
    if nbank or na or ns:
        wants = (int(nbank), int(na), int(ns))
        p.want_dbank, p.want_dcoeffs, p.want_dstyles = wants
        plan = _weight_plan(ext, p.device, B, T, I, O, K, pp.code, wants)
        nsplit, n_ot, n_tiles = plan.nsplit, plan.n_otiles, plan.n_otiles * plan.n_itiles
        alloc = torch.empty if det else torch.zeros  # atomics add into zeros
        dbank_acc = da_acc = ds_acc = None
        if nbank:
            if nsplit == 1:
                dbank = torch.empty((K, O, I), device=dev, dtype=x.dtype)
                p.dbank = dbank.data_ptr()
            else:
                dbank_acc = alloc((nsplit, K, O, I) if det else (K, O, I), **f32)
                p.dbank_acc = dbank_acc.data_ptr()
        if na:
            da_acc = alloc((n_tiles, B, K) if det else (B, K), **f32)
            p.dcoeffs_acc = da_acc.data_ptr()
        if ns:
            ds_acc = alloc((n_ot, B, I) if det else (B, I), **f32)
            p.dstyles_acc = ds_acc.data_ptr()
        ext.mod_linear_bwd_weight(p, plan, stream)
        if dbank_acc is not None:
            dbank = (dbank_acc.sum(0) if det else dbank_acc).to(x.dtype)
        if da_acc is not None:
            da = da_acc.sum(0) if det else da_acc  # [B, K] fp32
        if ns:
            ds = (ds_acc.sum(0) if det else ds_acc).to(styles.dtype).reshape(styles.shape)

    # ---- bias: (B, O)-sized torch ops (rows: the samples)
    db, da_bias = bias_grads(gsum, None if pp.coeffs is None else pp.coeffs.float(), bias, nbias, na)
    if db is not None:
        dbias = db.to(bias.dtype).contiguous()
    if na:
        if da_bias is not None:
            da = da + da_bias
        da = da.to(coeffs.dtype).reshape(coeffs.shape).contiguous()
    return dx, dbank, da, ds, dbias


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- conv2d


def mod_conv2d_forward(x, bank, coeffs, styles, bias, cfg: ModConv2dConfig):
    raise RuntimeError(f"modweights cuda backend: {CONV2D_REASON}")


def mod_conv2d_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: ModConv2dConfig, needs):
    raise RuntimeError(f"modweights cuda backend: {CONV2D_REASON}")
