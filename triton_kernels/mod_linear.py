"""mod_linear in Triton: host launchers (checks, allocation, grids) for the kernels of
:mod:`.mod_linear_fwd` and :mod:`.mod_linear_bwd`.

Canonical inputs (see ``modweights._checks``)::

    x (B, T, I)    bank (K, O, I)    coeffs None | (B, K) | (B, T, K)
    styles None | (B, I) | (B, T, I)    bias None | (O,) | (K, O)

:func:`forward` returns ``(y (B, T, O), d)`` with ``d`` the float32 demodulation
coefficients (``(Bd, O)`` per sample, ``Bd = 1`` without conditioning; ``(B, T, O)`` per
token; empty without demodulation). :func:`backward` returns the five gradients, an empty
tensor for each one not asked for.

Layouts (chosen here, by counting):

per sample, ``MIX_B``
    coefficients (if any) per sample, rows per sample many enough: row tiles inside one
    sample, the sample's mixture formed in the B-tile load, styles loaded as a vector;
    per-sample demodulation accumulated from the mixed tile (no pre-pass) up to
    ``DEMOD_IN_LOOP_MAX_T`` rows per sample, from a pre-pass beyond. FLOPs: one dense GEMM on
    tensor cores plus ``B * cdiv(T, BLOCK_T) * K * O * I`` mixing FMAs on CUDA cores.
stacked
    per-token coefficients, and per-sample ones with few rows per sample (CondConv heads at
    small T, decode): flat row tiles, coefficients (per row, or per sample gathered per row)
    scale the A tile, one dot per expert: K dense GEMMs (1 without coefficients), the bank
    read once per row tile — the decode regime's single pass over the bank.

The count (``MIX_COST``: a CUDA-core FMA costs ~6 tensor-core FLOPs on an H100; K_mix = K
with coefficients, 0 without; K_dots = K with coefficients, 1 without)::

    mix_b   = B * cdiv(T, 64) * (2 * 64 + 2 * MIX_COST * K_mix) * O * I
    stacked = cdiv(B * T, 64) * 64 * 2 * K_dots * O * I      (x 1.05 with per-sample styles/demod)

The weight side of per-sample coefficients in the stacked layout, without demodulation, is
counted too (:func:`choose_weight_stacked`): the fused per-sample kernel (one GEMM plus a fold of
``3 B K O I`` CUDA-core FMAs) or, with few rows per sample (decode), the stacked GEMM with ds
and da as per-row sums of the dx kernel.

Main loops are shaped for Hopper and checked offline (``python -m modweights.aot``): the
mixture is unrolled over a constexpr ``BLOCK_K`` so that the software pipeliner stages every
bank tile; the configs in :mod:`.mod_linear_configs` are the ones the report shows compiling
without spills.

Per-token conditioning (coeffs or styles per token) demodulates per row; the forward
accumulates the row norms from squared operands in the same kernel, and the backward
works per row (see :func:`backward`). In the stacked layout with K > 1 coefficients the
row norms and the backward's ds term (quadratic in the mixture) come instead from the mixed
rows, in ``mod_linear_demod.py`` (the squared-operand pair products cancel when the experts
do: see there).

Nothing of size ``B x O x I`` is allocated on any path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import _record
from .._bias import bias_grads
from .._checks import check_canonical_linear, check_device, check_dtype
from ._host import absent
from . import mod_linear_configs as C
from .mod_linear_bwd import (
    _modlinear_bwd_dx_kernel,
    _modlinear_bwd_prep_sample_kernel,
    _modlinear_bwd_prep_token_kernel,
    _modlinear_bwd_weight_kernel,
    _modlinear_bwd_weight_token_kernel,
)
from .mod_linear_demod import _modlinear_demod_rows_bwd_kernel, _modlinear_demod_rows_kernel
from .mod_linear_fwd import _modlinear_demod_kernel, _modlinear_fwd_kernel

#: whether the kernels above were built for the interpreter (Triton decides at decoration)
INTERPRETED = C.interpreting()

#: cost of one mixing FMA on CUDA cores, in tensor-core FLOPs (DESIGN.md section 4: tensor cores run
#: ~6-7x faster than the CUDA-core FMAs the mixing needs, on an H100)
MIX_COST = 6

#: tests set these to exercise one path: the per-sample mixing layout (True / False) and the
#: number of sample splits of the fused weight kernel
FORCE_MIX_B: bool | None = None
FORCE_SPLIT: int | None = None
#: tests set this to pick the weight side of per-sample coefficients: the stacked GEMM (True) or
#: the fused per-sample kernel (False); None: by counting (:func:`choose_weight_stacked`)
FORCE_WEIGHT_STACKED: bool | None = None

#: with deterministic algorithms, cross-program sums go through this many partial slices
#: (ds over O tiles, da over I tiles), each owned by one program: buffers of
#: ``DET_GROUPS * B * I`` (ds), ``DET_GROUPS * B * T * K`` (per-token da), never per tile
DET_GROUPS = 16

#: per-sample demodulation with row tiles per sample: up to this many rows per sample the
#: forward kernel accumulates d from its mixed B tiles (every row tile redoing ``O * I``
#: FMAs); beyond it a pre-pass computes d once per sample
DEMOD_IN_LOOP_MAX_T = 128

_FWD_KEY = ["rows_bucket", "I", "O", "K", "HAS_COEFFS", "HAS_STYLES", "S_PER_ROW", "MIX_B", "DEMOD", "BIAS"]
_DX_KEY = ["rows_bucket", "I", "O", "K", "HAS_COEFFS", "HAS_STYLES", "S_PER_ROW", "MIX_B", "DEMOD",
           "ROW_DS", "ROW_DA"]
_W_KEY = ["rows_bucket", "I", "O", "K", "HAS_COEFFS", "HAS_STYLES", "S_PER_ROW", "DEMOD",
          "NEED_DW", "NEED_DS", "NEED_DA"]
_WT_KEY = ["I", "O", "K", "HAS_STYLES", "DEMOD"]

#: the tuned kernels: (candidate configs, pruning). With ``MODWEIGHTS_TRITON_AUTOTUNE=0`` a launch
#: runs the first candidate its pruning keeps (the lists in :mod:`.mod_linear_configs` put the
#: default first; the AOT report checks each); the recording (:mod:`._record`) takes them all
_TUNING = {
    _modlinear_fwd_kernel: (C.fwd_configs(), C.prune_fwd),
    _modlinear_bwd_dx_kernel: (C.dx_configs(), C.prune_dx),
    _modlinear_bwd_weight_kernel: (C.weight_configs(), C.prune_weight),
    _modlinear_bwd_weight_token_kernel: (C.weight_token_configs(), C.prune_weight_token),
}

if INTERPRETED:
    _fwd_tuned = _dx_tuned = _weight_tuned = _weight_token_tuned = None
else:
    _fwd_tuned = C.autotuned(_modlinear_fwd_kernel, C.fwd_configs(), _FWD_KEY, C.prune_fwd)
    _dx_tuned = C.autotuned(_modlinear_bwd_dx_kernel, C.dx_configs(), _DX_KEY, C.prune_dx, reset_to_zero=["da_ptr"])
    _weight_tuned = C.autotuned(_modlinear_bwd_weight_kernel, C.weight_configs(), _W_KEY, C.prune_weight,
                                reset_to_zero=["dw_ptr", "ds_ptr", "da_ptr"])
    _weight_token_tuned = C.autotuned(_modlinear_bwd_weight_token_kernel, C.weight_token_configs(), _WT_KEY,
                                      C.prune_weight_token)


def _launch(raw, tuned, grid, args, flags, fixed_meta):
    """Run ``raw`` with fixed tiles under the interpreter (or when it is not tuned: ``tuned`` None,
    ``fixed_meta`` its GPU tiles), with its default config when autotuning is off, else through
    its autotuned wrapper. While the AOT report records (:mod:`._record`), append the launch
    with the configs autotuning would try instead."""
    def call(m):
        meta, warps, stages = _record.as_config(m)
        raw[grid(meta) if callable(grid) else grid](*args, **flags, **meta, num_warps=warps, num_stages=stages)

    if INTERPRETED:
        raw[grid(fixed_meta) if callable(grid) else grid](*args, **flags, **fixed_meta)
        return
    if tuned is None:
        configs = [fixed_meta]
    elif _record.ACTIVE is not None or not C.AUTOTUNE:
        cfgs, prune = _TUNING[raw]
        configs = prune(cfgs, dict(zip(raw.arg_names, args)), **flags)  # the first is the default
    if _record.ACTIVE is not None:
        _record.record(raw, args, flags, configs, configs[0], grid(_record.as_config(configs[0])[0])
                       if callable(grid) else grid)
    elif tuned is None or not C.AUTOTUNE:
        call(configs[0])
    else:
        tuned[grid](*args, **flags)


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """How one call is laid out: the conditioning modes and the chosen formulation."""

    B: int
    T: int
    I: int
    O: int
    K: int
    coeffs: str  # "none" | "sample" | "token"
    styles: str  # "none" | "sample" | "token"
    demod: bool
    mix_b: bool  # row tiles per sample, mixture in the B-tile load (else stacked, flat rows)

    @property
    def token(self) -> bool:
        return self.coeffs == "token" or self.styles == "token"


def _mode(t, B, T) -> str:
    if t is None:
        return "none"
    # (B, 1, C) is per sample (the same memory as (B, C)); (B, 0, C) is per token, with per-token
    # strides: read as (B, C) it would index an empty buffer
    return "token" if t.dim() == 3 and T != 1 else "sample"


def choose_mix_b(B: int, T: int, K: int, has_coeffs: bool, per_sample_vectors: bool) -> bool:
    """Per-sample row tiles with the mixture in the B-tile load (True) or the stacked flat
    layout (False), by counting (module docstring). ``per_sample_vectors``: per-sample styles
    or demodulation, which the per-sample tiles load as vectors and demodulate without a
    pre-pass, and the stacked layout gathers per row: a tie-break of a few percent."""
    if FORCE_MIX_B is not None:
        return FORCE_MIX_B
    bt = 64
    k_mix = K if has_coeffs else 0
    k_dots = K if has_coeffs else 1
    mix_b = B * triton.cdiv(T, bt) * (2 * bt + 2 * MIX_COST * k_mix)
    stacked = triton.cdiv(B * T, bt) * bt * 2 * k_dots * (1.05 if per_sample_vectors else 1.0)
    return mix_b <= stacked


def choose_weight_stacked(B: int, T: int, K: int, has_coeffs: bool, demod: bool, mix_b: bool) -> bool:
    """Weight side of per-sample coefficients in the stacked (flat-row) layout: the stacked GEMM
    ``dW_k = (a_k gz)^T (s x)`` over all rows (K dense GEMMs; ``da`` and ``ds`` as per-row sums
    from the dx kernel) instead of the fused per-sample kernel (one GEMM for ``Q_b`` plus a fold
    of ``3 B K O I`` CUDA-core FMAs). Counted per ``O * I`` in tensor-core FLOPs::

        fused   = B * (2 T + 3 MIX_COST K)
        stacked = cdiv(B T, 64) * 64 * 2 K

    so the stacked GEMM wins with few rows per sample (decode: T = 1). Only without
    demodulation (its per-sample ``c`` term has no per-row form here) and in the stacked
    layout (the forward counted few rows too)."""
    if not has_coeffs or demod or mix_b:
        return False
    if FORCE_WEIGHT_STACKED is not None:
        return FORCE_WEIGHT_STACKED
    fused = B * (2 * T + 3 * MIX_COST * K)
    stacked = triton.cdiv(B * T, 64) * 64 * 2 * K
    return stacked < fused


def layout(x, bank, coeffs, styles, demodulate: bool) -> Layout:
    B, T, I = x.shape
    K, O, _ = bank.shape
    cm, sm = _mode(coeffs, B, T), _mode(styles, B, T)
    vectors = sm == "sample" or (demodulate and sm != "token")
    mix_b = cm != "token" and choose_mix_b(B, T, K, cm == "sample", vectors)
    return Layout(B, T, I, O, K, cm, sm, bool(demodulate), mix_b)


def mixed_rows_demod(lay: Layout, coeffs) -> bool:
    """Per-row demodulation in the stacked layout with K > 1 coefficients: d and the ds
    term from the mixed rows (mod_linear_demod.py), not from squared-operand pair products."""
    return lay.demod and lay.token and not lay.mix_b and coeffs is not None and lay.K > 1


def d_shape(x_shape, bank_shape, coeffs_dim, styles_dim, demodulate: bool):
    """Shape of the float32 demodulation coefficients :func:`forward` returns (for fake tensors)."""
    B, T, _ = x_shape
    O = bank_shape[1]
    if not demodulate:
        return (0,)
    if T != 1 and (coeffs_dim == 3 or styles_dim == 3):
        return (B, T, O)
    return (B if (coeffs_dim or styles_dim) else 1, O)


def _rows_strides(t):
    """(stride_b, stride_t, stride_c) of a (B, C) or (B, T, C) tensor; stride_t = 0 per sample."""
    if t is None:
        return (0, 0, 0)
    if t.dim() == 2:
        return (t.stride(0), 0, t.stride(1))
    return tuple(t.stride())


def _bias_mode(bias, coeffs):
    """(BIAS flag, bias tensor, (stride_k, stride_o)); a (1, O) bias without coeffs is (O,)."""
    if bias is None:
        return 0, None, (0, 0)
    if bias.dim() == 2 and coeffs is None:
        bias = bias[0]
    if bias.dim() == 1:
        return 1, bias, (0, bias.stride(0))
    return 2, bias, tuple(bias.stride())


def _precisions(dtype):
    """(DOT_PREC, SQ_PREC): tl.dot input precision of the float32 operands. float32 inputs:
    exact ("ieee") unless PyTorch allows TF32 matmuls, for the GEMM and the squared operands
    alike. Half inputs: the GEMM operands are half (the setting is moot) and the squared
    float32 operands may use TF32 (its 2^-11 relative error is below the inputs' own)."""
    if dtype == torch.float32:
        p = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return p, p
    return "tf32", "tf32"


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _row_outputs(B, T, I, KK, dtype, dev, nx, row_ds, row_da, det):
    """The dx kernel's outputs in the flat-row layout: dx ``(B, T, I)``, the per-row ds
    ``(B, T, I)`` f32 and da ``(slices, B, T, K)`` f32 (``DET_GROUPS`` slices, stored, when
    deterministic) with da's strides; an absent pointer for each one not asked for."""
    f32 = torch.float32
    dx = torch.empty((B, T, I), dtype=dtype, device=dev) if nx else absent(dev)
    dsr = torch.empty((B, T, I), dtype=f32, device=dev) if row_ds else absent(dev)
    if not row_da:
        return dx, dsr, absent(dev), (0, 0, 0, 0)
    dap = torch.zeros((DET_GROUPS if det else 1, B, T, KK), dtype=f32, device=dev)
    return dx, dsr, dap, (0 if not det else dap.stride(0),) + tuple(dap.stride()[1:])


def _check(op, x, bank, coeffs, styles, bias):
    """Check what the kernels assume (the glue's custom ops, torch.ops.modweights.linear_triton*,
    are public) with the package's one set of checks; returns ``(coeffs, styles)`` with
    ``(B, 1, C)`` conditioning as per sample (``_checks.as_per_sample``)."""
    check_dtype(op, x, (torch.float16, torch.bfloat16, torch.float32), "triton")
    coeffs, styles = check_canonical_linear(op, x, bank, coeffs, styles, bias)
    check_device(op, x, x.is_cuda or (x.device.type == "cpu" and INTERPRETED) or (x.is_meta and _record.active()),
                 "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return coeffs, styles


# ----------------------------------------------------------------------------- forward


def forward(x, bank, coeffs, styles, bias, demodulate: bool, eps: float):
    """``y = d * ((sum_k a_k W_k) * s) x + bias`` without forming any per-sample weight.

    Args:
        x: ``(B, T, I)``. bank: ``(K, O, I)``. coeffs: None | ``(B, K)`` | ``(B, T, K)``.
        styles: None | ``(B, I)`` | ``(B, T, I)``. bias: None | ``(O,)`` | ``(K, O)``.

    Returns:
        ``y (B, T, O)`` in x's dtype and ``d`` (float32, see :func:`d_shape`).

    Cost: the GEMM kernel (one dense GEMM of FLOPs with ``MIX_B`` or without coefficients,
    K when stacked), plus for per-sample demodulation in the stacked layout a pre-pass of
    ``Bd * K * O * I`` CUDA-core FMAs; per-row demodulation adds, with K > 1 coefficients in
    the stacked layout, a pre-pass of ``B * T * K * O * I`` CUDA-core FMAs on the mixed rows
    (mod_linear_demod.py), else one GEMM of squared operands in the same kernel.
    """
    coeffs, styles = _check("mod_linear (triton) forward", x, bank, coeffs, styles, bias)
    B, T, I = x.shape
    K, O, _ = bank.shape
    lay = layout(x, bank, coeffs, styles, demodulate)
    dot_prec, sq_prec = _precisions(x.dtype)
    y = torch.empty((B, T, O), dtype=x.dtype, device=x.device)
    f32 = torch.float32
    bias_flag, bias_t, bias_str = _bias_mode(bias, coeffs)
    a_str, s_str = _rows_strides(coeffs), _rows_strides(styles)
    ph = x  # placeholder pointer for absent tensors (never dereferenced: flags are off)

    with _device_guard(x):
        if not demodulate:
            d, demod_flag, d_str = torch.empty(0, dtype=f32, device=x.device), 0, (0, 0, 0)
        elif mixed_rows_demod(lay, coeffs):
            d = torch.empty((B, T, O), dtype=f32, device=x.device)
            demod_flag, d_str = 1, tuple(d.stride())
            meta = C.demod_rows_meta()
            grid = (triton.cdiv(B * T, meta["BLOCK_R"]), triton.cdiv(O, meta["BLOCK_O"]))
            _launch(_modlinear_demod_rows_kernel, None, grid, (
                bank, coeffs, ph if styles is None else styles, d,
                B, T, I, O, K,
                *bank.stride(), *a_str, *s_str, *d.stride(),
                eps,
            ), dict(HAS_STYLES=styles is not None), meta)
        elif lay.token:
            d = torch.empty((B, T, O), dtype=f32, device=x.device)
            demod_flag, d_str = 2, tuple(d.stride())
        elif lay.mix_b and T <= DEMOD_IN_LOOP_MAX_T:
            # few row tiles per sample: d from the mixed tile in the main loop (each row tile of
            # a sample recomputes it: cheaper than a pre-pass while the tiles are few).
            # Without conditioning every sample computes the same d: all store it to one row.
            Bd = B if (coeffs is not None or styles is not None) else 1
            d = torch.empty((Bd, O), dtype=f32, device=x.device)
            demod_flag, d_str = 3, (O if Bd > 1 else 0, 0, 1)
        else:
            Bd = B if (coeffs is not None or styles is not None) else 1
            d = torch.empty((Bd, O), dtype=f32, device=x.device)
            demod_flag, d_str = 1, (O if Bd > 1 else 0, 0, 1)
            meta = C.demod_meta()
            grid = (Bd, triton.cdiv(O, meta["BLOCK_O"]))
            _launch(_modlinear_demod_kernel, None, grid, (
                bank, ph if coeffs is None else coeffs, ph if styles is None else styles, d,
                I, O, K,
                *bank.stride(), a_str[0], a_str[2], s_str[0], s_str[2], O, 1,
                eps,
            ), dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None), meta)

        rows = T if lay.mix_b else B * T

        def grid(meta):
            bt = meta["BLOCK_T"]
            n_r = B * triton.cdiv(T, bt) if lay.mix_b else triton.cdiv(B * T, bt)
            return (n_r, triton.cdiv(O, meta["BLOCK_O"]))

        args = (
            x, bank, ph if coeffs is None else coeffs, ph if styles is None else styles,
            ph if bias_t is None else bias_t, d, y,
            B, T, I, O, K, triton.next_power_of_2(rows),
            *x.stride(), *bank.stride(), *a_str, *s_str, *bias_str, *d_str, *y.stride(),
            eps,
        )
        flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None,
                     S_PER_ROW=lay.styles == "token", MIX_B=lay.mix_b, DEMOD=demod_flag, BIAS=bias_flag,
                     DOT_PREC=dot_prec, SQ_PREC=sq_prec,
                     BLOCK_K=triton.next_power_of_2(K) if (coeffs is not None and lay.mix_b) else 1)
        _launch(_modlinear_fwd_kernel, _fwd_tuned, grid, args, flags, C.INTERPRET_META)
    return y, d


# ----------------------------------------------------------------------------- backward


def _n_split(B, O, I, x, det):
    """Sample splits of the fused weight kernel: enough programs to fill the GPU when the
    output has few tiles (each split is a partial dW, reduced afterwards)."""
    if FORCE_SPLIT is not None:
        return max(1, min(B, FORCE_SPLIT))
    if INTERPRETED or not (x.is_cuda or x.is_meta):
        return 1
    n_o = triton.cdiv(O, 64)
    tiles = (min(n_o, DET_GROUPS) if det else n_o) * triton.cdiv(I, 64)
    sms = _record.SMS if x.is_meta else torch.cuda.get_device_properties(x.device).multi_processor_count
    if tiles >= sms:
        return 1
    return max(1, min(B, triton.cdiv(2 * sms, tiles), 16))


def backward(g, x, bank, coeffs, styles, bias, d, y, demodulate: bool, eps: float, needs):
    """Gradients of :func:`forward`: ``(dx, dbank, dcoeffs, dstyles, dbias)``, an empty
    tensor for each one not in ``needs`` (or whose input is None).

    ``d`` and ``y`` are what the forward returned (``y`` only needed with demodulation: the
    pre-demodulation output is recovered as ``z = (y - bias) / d``). ``g`` may have any
    strides (an expanded gradient has stride 0).

    Per sample (coeffs (B, K) | None, styles (B, I) | None): a pre-pass over (g, y) for
    ``G1 = sum_t g`` and ``c = dd d^3``; the dx kernel (one GEMM, mixing on the fly); the
    fused weight kernel (one GEMM + ``3 B K O I`` FMAs) for dW_k, ds and da together.

    Per token: ``gz = g d`` and ``c`` elementwise (demodulation only); the dx kernel also
    produces the per-row ds and (per-token coefficients) da. Per-token coefficients: dx costs
    K dense GEMMs (with demodulation and ds/da, the mixed-rows kernel adds their demodulation
    terms: ``B * T * (2K + 3) * O * I`` CUDA-core FMAs), dW K dense GEMMs (+ K^2 with
    demodulation and styles). Per-sample coefficients with per-token styles: dx one GEMM
    (+1 with demodulation), the fused weight kernel one GEMM (+1 with demodulation).
    """
    op = "mod_linear (triton) backward"
    coeffs_in, styles_in = coeffs, styles
    coeffs, styles = _check(op, x, bank, coeffs, styles, bias)
    nx, nbank, na, ns, nbias = (bool(n) for n in needs)
    B, T, I = x.shape
    K, O, _ = bank.shape
    if tuple(g.shape) != (B, T, O):
        raise ValueError(f"{op}: `g` must have shape (B, T, O) = {(B, T, O)}; got {tuple(g.shape)}")
    if demodulate and (y is None or d.numel() == 0):
        raise ValueError(f"{op}: with demodulate=True, `d` and `y` from the forward are required")
    na = na and coeffs is not None
    ns = ns and styles is not None
    nbias = nbias and bias is not None
    lay = layout(x, bank, coeffs, styles, demodulate)
    dev, dtype, f32 = x.device, x.dtype, torch.float32
    det = torch.are_deterministic_algorithms_enabled()
    dot_prec, sq_prec = _precisions(dtype)
    ph = x
    a_str, s_str = _rows_strides(coeffs), _rows_strides(styles)
    bias_flag, bias_t, bias_str = _bias_mode(bias, coeffs)
    KK = K if coeffs is not None else 1
    BK = triton.next_power_of_2(KK)
    empty = lambda: torch.empty(0, dtype=dtype, device=dev)  # noqa: E731
    dx = dbank = dcoeffs = dstyles = None
    G1 = None  # sum_t g per sample, float32 (B, O)
    da = None  # float32 coefficient gradient before the bias part
    ds = None  # float32 styles gradient

    with _device_guard(x):
        gsrc, c, c_str, demod_dx = g, ph, (0, 0, 0), 0
        if not lay.token:
            # ---- per sample: pre-pass, dx, fused weight kernel
            if demodulate or nbias or (na and bias_flag == 2):
                G1 = torch.empty((B, O), dtype=f32, device=dev)
                c = torch.empty((B, O), dtype=f32, device=dev) if demodulate else G1
                meta = C.prep_meta()
                _launch(_modlinear_bwd_prep_sample_kernel, None, (B, triton.cdiv(O, meta["BLOCK_O"])), (
                    g, ph if y is None else y, d if demodulate else ph, ph if coeffs is None else coeffs,
                    ph if bias_t is None else bias_t, G1, c,
                    T, O, KK,
                    *g.stride(), *((0, 0, 0) if y is None else y.stride()),
                    (d.stride(0) if d.shape[0] > 1 else 0) if demodulate else 0, 1,
                    a_str[0], a_str[2], *bias_str, O, 1, O, 1,
                ), dict(DEMOD=demodulate, BIAS=bias_flag), meta)
                c_str = (O, 0, 1)
            d_str = ((d.stride(0) if d.shape[0] > 1 else 0), 0, 1) if demodulate else (0, 0, 0)
            if choose_weight_stacked(B, T, K, coeffs is not None, demodulate, lay.mix_b):
                # few rows per sample: ds and da as per-row sums of the dx kernel, dW stacked
                dx, ds, da = _dx_rows(lay, g, bank, coeffs, styles, x, nx, ns, na, a_str, s_str, det,
                                      (dot_prec, sq_prec), BK)
                if ds is not None:
                    ds = ds.sum(1)
                if da is not None:
                    da = da.sum(1)
                if nbank:
                    dbank = torch.empty((K, O, I), dtype=bank.dtype, device=dev)
                    _weight_token(g, x, bank, coeffs, styles, ph, (0, 0, 0), dbank, a_str, s_str, False,
                                  (dot_prec, sq_prec))
            elif nx:
                dx = torch.empty((B, T, I), dtype=dtype, device=dev)
                _dx(lay, g, bank, coeffs, styles, x, d if demodulate else ph, ph, dx, absent(dev), absent(dev),
                    a_str, s_str, d_str, (0, 0, 0), (0, 0, 0, 0), 1 if demodulate else 0,
                    store_dx=True, row_ds=False, row_da=False, atomic=False, precs=(dot_prec, sq_prec), BK=BK)
            if (nbank or ns or na) and not choose_weight_stacked(B, T, K, coeffs is not None, demodulate,
                                                                 lay.mix_b):
                dbank, ds, da = _weight(lay, g, x, bank, coeffs, styles, d if demodulate else ph, c, c_str,
                                        1 if demodulate else 0, nbank, ns, na, det, (dot_prec, sq_prec), BK)
        else:
            # ---- per token
            if demodulate:
                gsrc = torch.empty((B, T, O), dtype=dtype, device=dev)
                c = torch.empty((B, T, O), dtype=f32, device=dev)
                c_str = tuple(c.stride())
                meta = C.prep_meta()
                grid = (triton.cdiv(B * T, meta["BLOCK_T"]), triton.cdiv(O, meta["BLOCK_O"]))
                _launch(_modlinear_bwd_prep_token_kernel, None, grid, (
                    g, y, d, ph if coeffs is None else coeffs, ph if bias_t is None else bias_t, gsrc, c,
                    B, T, O, KK,
                    *g.stride(), *y.stride(), *d.stride(), *a_str, *bias_str, *gsrc.stride(), *c.stride(),
                ), dict(BIAS=bias_flag), meta)
                demod_dx = 2
            mixed = mixed_rows_demod(lay, coeffs)
            if mixed:
                demod_dx = 0  # gsrc is gz; the ds and da demodulation terms come from the mixed rows
            row_ds = ns
            row_da = na and lay.coeffs == "token"
            if nx or row_ds or row_da:
                dx, dsr, dap, dap_str = _row_outputs(B, T, I, KK, dtype, dev, nx, row_ds, row_da, det)
                _dx(lay, gsrc, bank, coeffs, styles, x, ph, c, dx, dsr, dap,
                    a_str, s_str, (0, 0, 0), c_str, dap_str, demod_dx,
                    store_dx=nx, row_ds=row_ds, row_da=row_da, atomic=not det, precs=(dot_prec, sq_prec), BK=BK)
                if mixed and (row_ds or row_da):
                    meta = C.demod_rows_meta()
                    n_it = triton.cdiv(I, meta["BLOCK_I"])
                    dad = torch.empty((n_it, B, T, KK) if row_da else (1,), dtype=f32, device=dev)
                    _launch(_modlinear_demod_rows_bwd_kernel, None, (triton.cdiv(B * T, meta["BLOCK_R"]), n_it), (
                        bank, coeffs, ph if styles is None else styles, c, dsr, dad,
                        B, T, I, O, KK,
                        *bank.stride(), *a_str, *s_str, *c_str,
                        *((dsr.stride()) if row_ds else (0, 0, 0)), *(dad.stride() if row_da else (0, 0, 0, 0)),
                    ), dict(HAS_STYLES=styles is not None, NEED_DS=row_ds, NEED_DA=row_da, BLOCK_K=BK), meta)
                    if row_da:
                        dap[0] -= dad.sum(0)
                if not nx:
                    dx = None
                if row_ds:
                    ds = dsr if lay.styles == "token" else dsr.sum(1)
                if row_da:
                    da = dap.sum(0)
            if lay.coeffs == "token":
                if nbank:
                    dbank = torch.empty((K, O, I), dtype=bank.dtype, device=dev)
                    _weight_token(gsrc, x, bank, coeffs, styles, c, c_str, dbank, a_str, s_str, demodulate,
                                  (dot_prec, sq_prec))
            elif nbank or na:
                # per-sample (or no) coefficients, per-token styles: the fused kernel, per-row styles
                dbank, _, da = _weight(lay, gsrc, x, bank, coeffs, styles, ph, c, c_str, 2 if demodulate else 0,
                                       nbank, False, na, det, (dot_prec, sq_prec), BK)

        # ---- bias: dbias and the bias part of dcoeffs (small GEMMs over (B, O) or (B*T, O))
        dbias = None
        if bias is not None and (nbias or (na and bias_flag == 2)):
            if lay.coeffs == "token":  # a coefficient vector per row
                g_rows, a_rows = g.reshape(B * T, O).to(f32), coeffs.reshape(B * T, -1).to(f32)
            else:  # per sample: g summed over the sample's rows
                g_rows = G1 if G1 is not None else g.to(f32).sum(1)
                a_rows = None if coeffs is None else coeffs.to(f32)
            dbias, da_bias = bias_grads(g_rows, a_rows, bias, nbias, na)
            if da_bias is not None:
                da = da + da_bias.view(da.shape)

    def out(t, ref, need):
        if not need or t is None:
            return empty()
        return t.to(ref.dtype).reshape(ref.shape)

    return (
        out(dx, x, nx),
        out(dbank, bank, nbank),
        out(da, coeffs_in, na),
        out(ds, styles_in, ns),
        out(dbias, bias, nbias),
    )


def _dx(lay, g, bank, coeffs, styles, x, d, c, dx, ds, da, a_str, s_str, d_str, c_str, da_str, demod,
        store_dx, row_ds, row_da, atomic, precs, BK):
    B, T, I, O, K = lay.B, lay.T, lay.I, lay.O, lay.K
    ph = x
    rows = T if lay.mix_b else B * T

    def grid(meta):
        bt = meta["BLOCK_T"]
        n_r = B * triton.cdiv(T, bt) if lay.mix_b else triton.cdiv(B * T, bt)
        n_i = triton.cdiv(I, meta["BLOCK_I"])
        # deterministic per-row da: one slice per group of I tiles (summed afterwards)
        return (n_r, min(n_i, DET_GROUPS) if (row_da and not atomic) else n_i)

    dx_str = tuple(dx.stride()) if store_dx else (0, 0, 0)
    ds_str = tuple(ds.stride()) if row_ds else (0, 0, 0)
    args = (
        g, bank, ph if coeffs is None else coeffs, ph if styles is None else styles, x, d, c, dx, ds, da,
        B, T, I, O, K, triton.next_power_of_2(rows),
        *g.stride(), *bank.stride(), *a_str, *s_str, *x.stride(), *d_str, *c_str, *dx_str, *ds_str, *da_str,
    )
    flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None, S_PER_ROW=lay.styles == "token",
                 MIX_B=lay.mix_b, DEMOD=demod, STORE_DX=store_dx, ROW_DS=row_ds, ROW_DA=row_da, ATOMIC=atomic,
                 DOT_PREC=precs[0], SQ_PREC=precs[1], BLOCK_K=BK)
    _launch(_modlinear_bwd_dx_kernel, _dx_tuned, grid, args, flags, C.INTERPRET_META)


def _dx_rows(lay, g, bank, coeffs, styles, x, nx, row_ds, row_da, a_str, s_str, det, precs, BK, c=None,
             c_str=(0, 0, 0), demod=0):
    """The dx kernel in the flat-row layout with per-row sums: (dx | None, ds (B, T, I) f32 | None,
    da (B, T, K) f32 | None). Deterministic: da through ``DET_GROUPS`` slices stored, not added."""
    B, T, I = lay.B, lay.T, lay.I
    dev = x.device
    KK = lay.K if coeffs is not None else 1
    dx, dsr, dap, dap_str = _row_outputs(B, T, I, KK, x.dtype, dev, nx, row_ds, row_da, det)
    _dx(lay, g, bank, coeffs, styles, x, x, x if c is None else c, dx, dsr, dap, a_str, s_str, (0, 0, 0), c_str,
        dap_str, demod, store_dx=nx, row_ds=row_ds, row_da=row_da, atomic=not det, precs=precs, BK=BK)
    return (dx if nx else None), (dsr if row_ds else None), (dap.sum(0) if row_da else None)


def _weight(lay, g, x, bank, coeffs, styles, d, c, c_str, demod, need_dw, need_ds, need_da, det, precs, BK):
    """The fused weight kernel; returns (dbank in bank dtype | None, ds f32 (B, I) | None, da f32 (B, K) | None)."""
    B, T, I, O, K = lay.B, lay.T, lay.I, lay.O, lay.K
    dev, f32 = x.device, torch.float32
    ph = x
    KK = K if coeffs is not None else 1
    need_ds = need_ds and styles is not None and lay.styles == "sample"
    need_da = need_da and coeffs is not None
    n_split = _n_split(B, O, I, x, det)
    b_per_split = triton.cdiv(B, n_split)
    n_split = triton.cdiv(B, b_per_split)
    dw_atomic = False
    dwp = absent(dev)
    dw_str = (0, 0, 0, 0)
    if need_dw:
        if n_split == 1:
            dwp = torch.empty((1, K, O, I), dtype=bank.dtype, device=dev)
        elif det:
            dwp = torch.empty((n_split, K, O, I), dtype=f32, device=dev)
        else:
            dwp = torch.zeros((1, K, O, I), dtype=f32, device=dev)
            dw_atomic = True
        dw_str = (0 if dw_atomic else dwp.stride(0),) + tuple(dwp.stride()[1:])
    n_da = DET_GROUPS * triton.cdiv(I, C.MIN_BLOCK_I)
    if need_ds:
        dsp = torch.zeros((DET_GROUPS if det else 1, B, I), dtype=f32, device=dev)
        ds_str = (dsp.stride(0) if det else 0, dsp.stride(1), dsp.stride(2))
    else:
        dsp, ds_str = absent(dev), (0, 0, 0)
    if need_da:
        dap = torch.zeros((n_da if det else 1, B, KK), dtype=f32, device=dev)
        da_str = (dap.stride(0) if det else 0, dap.stride(1), dap.stride(2))
    else:
        dap, da_str = absent(dev), (0, 0, 0)
    d_str = (d.stride(0) if d.dim() == 2 and d.shape[0] > 1 else 0, 1) if demod == 1 else (0, 0)
    a_str = (coeffs.stride(0), coeffs.stride(1)) if coeffs is not None else (0, 0)
    s_str = _rows_strides(styles)

    def grid(meta):
        n_o = triton.cdiv(O, meta["BLOCK_O"])
        # deterministic: DET_GROUPS programs per I tile share out the O tiles, each adding ds/da
        # into its own slice; otherwise one program per tile, all adding into one buffer
        return (triton.cdiv(I, meta["BLOCK_I"]), min(n_o, DET_GROUPS) if det else n_o, n_split)

    args = (
        g, x, bank, ph if coeffs is None else coeffs, ph if styles is None else styles, d, c, dwp, dsp, dap,
        B, T, I, O, K, b_per_split, triton.next_power_of_2(T),
        *g.stride(), *x.stride(), *bank.stride(), *a_str, *s_str, *d_str, *c_str, *dw_str, *ds_str, *da_str,
    )
    flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None, S_PER_ROW=lay.styles == "token",
                 DEMOD=demod, NEED_DW=need_dw, NEED_DS=need_ds, NEED_DA=need_da, DW_ATOMIC=dw_atomic,
                 DOT_PREC=precs[0], SQ_PREC=precs[1], BLOCK_K=BK)
    _launch(_modlinear_bwd_weight_kernel, _weight_tuned, grid, args, flags, C.INTERPRET_META)
    dbank = None
    if need_dw:
        dbank = dwp[0] if (n_split == 1 or dw_atomic) else dwp.sum(0)
    return dbank, (dsp.sum(0) if need_ds else None), (dap.sum(0) if need_da else None)


def _weight_token(g, x, bank, coeffs, styles, c, c_str, dbank, a_str, s_str, demodulate, precs):
    B, T, I = x.shape
    K, O, _ = bank.shape
    ph = x

    def grid(meta):
        return (triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"]), K)

    args = (
        g, x, bank, coeffs, ph if styles is None else styles, c, dbank,
        B, T, I, O, K,
        *g.stride(), *x.stride(), *bank.stride(), *a_str, *s_str, *c_str, *dbank.stride(),
    )
    flags = dict(HAS_STYLES=styles is not None, DEMOD=bool(demodulate), DOT_PREC=precs[0], SQ_PREC=precs[1])
    _launch(_modlinear_bwd_weight_token_kernel, _weight_token_tuned, grid, args, flags, C.INTERPRET_META)
