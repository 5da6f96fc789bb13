"""How each mod_linear kernel is launched (host only): the autotuning table and the one launch
path, and the backward's per-kernel launchers.

:func:`_launch` is the path every launch of :mod:`.mod_linear` takes: fixed tiles under the
interpreter, the default config with ``MODWEIGHTS_TRITON_AUTOTUNE=0``, the autotuned wrapper
otherwise, and the AOT recording (:mod:`._record`) while it is active. The kernel sweep
(``modweights.benchmarking.kernel_sweep``) reads the ``C.autotuned`` calls below from this
file's source and wraps this module's ``_launch``.

The backward launchers (:func:`_dx`, :func:`_dx_rows`, :func:`_weight`, :func:`_weight_token`)
allocate each kernel's outputs and partial buffers, build its grid and arguments, and reduce
the partial slices; :mod:`.mod_linear` decides which of them a call runs.

Main loops are shaped for Hopper and checked offline (``python -m modweights.aot``): the
mixture is unrolled over a constexpr ``BLOCK_K`` so that the software pipeliner stages every
bank tile; the configs in :mod:`.mod_linear_configs` are the ones the report shows compiling
without spills.
"""
from __future__ import annotations

import torch
import triton

from . import _record
from .. import _switches as switches
from . import mod_linear_configs as C
from ._host import absent
from .mod_linear_bwd import (
    _mod_linear_bwd_dx_kernel, _mod_linear_bwd_weight_kernel, _mod_linear_bwd_weight_token_kernel)
from .mod_linear_fwd import _mod_linear_fwd_kernel
from .mod_linear_layout import _rows_strides

#: whether the kernels were built for the interpreter (Triton decides at decoration)
INTERPRETED = C.interpreting()

#: with deterministic algorithms, cross-program sums go through this many partial slices
#: (ds over O tiles, da over I tiles), each owned by one program: buffers of
#: ``DET_GROUPS * B * I`` (ds), ``DET_GROUPS * B * T * K`` (per-token da), never per tile
DET_GROUPS = 16

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
    _mod_linear_fwd_kernel: (C.fwd_configs(), C.prune_fwd),
    _mod_linear_bwd_dx_kernel: (C.dx_configs(), C.prune_dx),
    _mod_linear_bwd_weight_kernel: (C.weight_configs(), C.prune_weight),
    _mod_linear_bwd_weight_token_kernel: (C.weight_token_configs(), C.prune_weight_token),
}

if INTERPRETED:
    _fwd_tuned = _dx_tuned = _weight_tuned = _weight_token_tuned = None
else:
    _fwd_tuned = C.autotuned(_mod_linear_fwd_kernel, C.fwd_configs(), _FWD_KEY, C.prune_fwd)
    _dx_tuned = C.autotuned(_mod_linear_bwd_dx_kernel, C.dx_configs(), _DX_KEY, C.prune_dx, reset_to_zero=["da_ptr"])
    _weight_tuned = C.autotuned(_mod_linear_bwd_weight_kernel, C.weight_configs(), _W_KEY, C.prune_weight,
                                reset_to_zero=["dw_ptr", "ds_ptr", "da_ptr"])
    _weight_token_tuned = C.autotuned(_mod_linear_bwd_weight_token_kernel, C.weight_token_configs(), _WT_KEY,
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


# ----------------------------------------------------------------------------- the backward's kernels


def _n_split(B, O, I, x, det):
    """Sample splits of the fused weight kernel: enough programs to fill the GPU when the
    output has few tiles (each split is a partial dW, reduced afterwards); the switch
    ``triton_split`` (tests) where set."""
    forced = switches.get("triton_split")
    if forced is not None:
        return max(1, min(B, forced))
    if INTERPRETED or not (x.is_cuda or x.is_meta):
        return 1
    n_o = triton.cdiv(O, 64)
    tiles = (min(n_o, DET_GROUPS) if det else n_o) * triton.cdiv(I, 64)
    sms = _record.SMS if x.is_meta else torch.cuda.get_device_properties(x.device).multi_processor_count
    if tiles >= sms:
        return 1
    return max(1, min(B, triton.cdiv(2 * sms, tiles), 16))


def _row_outputs(B, T, I, NBANK, dtype, dev, nx, row_ds, row_da, det):
    """The dx kernel's outputs in the flat-row layout: dx ``(B, T, I)``, the per-row ds
    ``(B, T, I)`` f32 and da ``(slices, B, T, K)`` f32 (``DET_GROUPS`` slices, stored, when
    deterministic) with da's strides; an absent pointer for each one not asked for."""
    f32 = torch.float32
    dx = torch.empty((B, T, I), dtype=dtype, device=dev) if nx else absent(dev)
    dsr = torch.empty((B, T, I), dtype=f32, device=dev) if row_ds else absent(dev)
    if not row_da:
        return dx, dsr, absent(dev), (0, 0, 0, 0)
    dap = torch.zeros((DET_GROUPS if det else 1, B, T, NBANK), dtype=f32, device=dev)
    return dx, dsr, dap, (0 if not det else dap.stride(0),) + tuple(dap.stride()[1:])


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
    _launch(_mod_linear_bwd_dx_kernel, _dx_tuned, grid, args, flags, C.INTERPRET_META)


def _dx_rows(lay, g, bank, coeffs, styles, x, nx, row_ds, row_da, a_str, s_str, det, precs, BK, c=None,
             c_str=(0, 0, 0), demod=0):
    """The dx kernel in the flat-row layout with per-row sums: (dx | None, ds (B, T, I) f32 | None,
    da (B, T, K) f32 | None). Deterministic: da through ``DET_GROUPS`` slices stored, not added."""
    B, T, I = lay.B, lay.T, lay.I
    dev = x.device
    NBANK = lay.K if coeffs is not None else 1  # bank entries mixed: K, or W_0 alone without coefficients
    dx, dsr, dap, dap_str = _row_outputs(B, T, I, NBANK, x.dtype, dev, nx, row_ds, row_da, det)
    _dx(lay, g, bank, coeffs, styles, x, x, x if c is None else c, dx, dsr, dap, a_str, s_str, (0, 0, 0), c_str,
        dap_str, demod, store_dx=nx, row_ds=row_ds, row_da=row_da, atomic=not det, precs=precs, BK=BK)
    return (dx if nx else None), (dsr if row_ds else None), (dap.sum(0) if row_da else None)


def _weight(lay, g, x, bank, coeffs, styles, d, c, c_str, demod, need_dw, need_ds, need_da, det, precs, BK):
    """The fused weight kernel; returns (dbank in bank dtype | None, ds f32 (B, I) | None, da f32 (B, K) | None)."""
    B, T, I, O, K = lay.B, lay.T, lay.I, lay.O, lay.K
    dev, f32 = x.device, torch.float32
    ph = x
    NBANK = K if coeffs is not None else 1  # bank entries mixed: K, or W_0 alone without coefficients
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
        dap = torch.zeros((n_da if det else 1, B, NBANK), dtype=f32, device=dev)
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
                 DOT_PREC=precs[0], SQ_PREC=precs[1], F32_DOT=precs[2], BLOCK_K=BK)
    _launch(_mod_linear_bwd_weight_kernel, _weight_tuned, grid, args, flags, C.INTERPRET_META)
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
    flags = dict(HAS_STYLES=styles is not None, DEMOD=bool(demodulate), DOT_PREC=precs[0], SQ_PREC=precs[1],
                 F32_DOT=precs[2])
    _launch(_mod_linear_bwd_weight_token_kernel, _weight_token_tuned, grid, args, flags, C.INTERPRET_META)
