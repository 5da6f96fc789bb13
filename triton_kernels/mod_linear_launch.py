"""How each mod_linear kernel is launched (host only): every kernel of the op registered
with the one launch path (:mod:`._launch`: fixed tiles under the interpreter, the default
config with ``MODWEIGHTS_TRITON_AUTOTUNE=0``, the autotuned wrapper otherwise, the AOT
recording), and the backward's per-kernel launchers.

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

from . import _launch as L
from . import _record
from .. import _switches as switches
from . import mod_linear_configs as lin_cfg
from ._host import absent, ptr
from ._modes import Demod
from .mod_linear_bwd import (
    _mod_linear_bwd_dx_kernel, _mod_linear_bwd_prep_sample_kernel, _mod_linear_bwd_prep_token_kernel,
    _mod_linear_bwd_weight_kernel, _mod_linear_bwd_weight_token_kernel)
from .mod_linear_demod import _mod_linear_demod_rows_bwd_kernel, _mod_linear_demod_rows_kernel
from .mod_linear_fwd import _mod_linear_demod_kernel, _mod_linear_fwd_kernel
from .mod_linear_layout import _rows_strides

#: whether the kernels were built for the interpreter (Triton decides at decoration)
INTERPRETED = L.INTERPRETED

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

_OP = "mod_linear"
# every kernel of the op, registered once with the one launch path (:mod:`._launch`): the tuned
# ones with their candidates (default first: the AOT report checks each), the interpreter's
# tiles and the autotuning key; the memory-bound pre-passes with their fixed tiles
L.register(_OP, _mod_linear_fwd_kernel, lin_cfg.INTERPRET_META, lin_cfg.fwd_configs(), _FWD_KEY, lin_cfg.prune_fwd)
L.register(_OP, _mod_linear_bwd_dx_kernel, lin_cfg.INTERPRET_META, lin_cfg.dx_configs(), _DX_KEY, lin_cfg.prune_dx,
           reset_to_zero=["da_ptr"])
L.register(_OP, _mod_linear_bwd_weight_kernel, lin_cfg.INTERPRET_META, lin_cfg.weight_configs(), _W_KEY,
           lin_cfg.prune_weight, reset_to_zero=["dw_ptr", "ds_ptr", "da_ptr"])
L.register(_OP, _mod_linear_bwd_weight_token_kernel, lin_cfg.INTERPRET_META, lin_cfg.weight_token_configs(), _WT_KEY,
           lin_cfg.prune_weight_token)
L.register(_OP, _mod_linear_demod_kernel, lin_cfg.demod_meta())
L.register(_OP, _mod_linear_demod_rows_kernel, lin_cfg.demod_rows_meta())
L.register(_OP, _mod_linear_demod_rows_bwd_kernel, lin_cfg.demod_rows_meta())
L.register(_OP, _mod_linear_bwd_prep_sample_kernel, lin_cfg.prep_meta())
L.register(_OP, _mod_linear_bwd_prep_token_kernel, lin_cfg.prep_meta())


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
        g, bank, ptr(coeffs, x.device), ptr(styles, x.device), x, d, c, dx, ds, da,
        B, T, I, O, K, triton.next_power_of_2(rows),
        *g.stride(), *bank.stride(), *a_str, *s_str, *x.stride(), *d_str, *c_str, *dx_str, *ds_str, *da_str,
    )
    flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None, S_PER_ROW=lay.styles == "token",
                 MIX_B=lay.mix_b, DEMOD=demod, STORE_DX=store_dx, ROW_DS=row_ds, ROW_DA=row_da, ATOMIC=atomic,
                 DOT_PREC=precs[0], SQ_PREC=precs[1], BLOCK_K=BK)
    L.launch(_mod_linear_bwd_dx_kernel, grid, args, flags)


def _dx_rows(lay, g, bank, coeffs, styles, x, nx, row_ds, row_da, a_str, s_str, det, precs, BK, c=None,
             c_str=(0, 0, 0), demod=Demod.OFF):
    """The dx kernel in the flat-row layout with per-row sums: (dx | None, ds (B, T, I) f32 | None,
    da (B, T, K) f32 | None). Deterministic: da through ``DET_GROUPS`` slices stored, not added."""
    B, T, I = lay.B, lay.T, lay.I
    dev = x.device
    NBANK = lay.K if coeffs is not None else 1  # bank entries mixed: K, or W_0 alone without coefficients
    dx, dsr, dap, dap_str = _row_outputs(B, T, I, NBANK, x.dtype, dev, nx, row_ds, row_da, det)
    _dx(lay, g, bank, coeffs, styles, x, absent(dev), ptr(c, dev), dx, dsr, dap, a_str, s_str, (0, 0, 0), c_str,
        dap_str, demod, store_dx=nx, row_ds=row_ds, row_da=row_da, atomic=not det, precs=precs, BK=BK)
    return (dx if nx else None), (dsr if row_ds else None), (dap.sum(0) if row_da else None)


def _weight(lay, g, x, bank, coeffs, styles, d, c, c_str, demod, need_dw, need_ds, need_da, det, precs, BK):
    """The fused weight kernel; returns (dbank in bank dtype | None, ds f32 (B, I) | None, da f32 (B, K) | None)."""
    B, T, I, O, K = lay.B, lay.T, lay.I, lay.O, lay.K
    dev, f32 = x.device, torch.float32
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
    n_da = DET_GROUPS * triton.cdiv(I, lin_cfg.MIN_BLOCK_I)
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
    d_str = (d.stride(0) if d.dim() == 2 and d.shape[0] > 1 else 0, 1) if demod == Demod.READ else (0, 0)
    a_str = (coeffs.stride(0), coeffs.stride(1)) if coeffs is not None else (0, 0)
    s_str = _rows_strides(styles)

    def grid(meta):
        n_o = triton.cdiv(O, meta["BLOCK_O"])
        # deterministic: DET_GROUPS programs per I tile share out the O tiles, each adding ds/da
        # into its own slice; otherwise one program per tile, all adding into one buffer
        return (triton.cdiv(I, meta["BLOCK_I"]), min(n_o, DET_GROUPS) if det else n_o, n_split)

    args = (
        g, x, bank, ptr(coeffs, x.device), ptr(styles, x.device), d, c, dwp, dsp, dap,
        B, T, I, O, K, b_per_split, triton.next_power_of_2(T),
        *g.stride(), *x.stride(), *bank.stride(), *a_str, *s_str, *d_str, *c_str, *dw_str, *ds_str, *da_str,
    )
    flags = dict(HAS_COEFFS=coeffs is not None, HAS_STYLES=styles is not None, S_PER_ROW=lay.styles == "token",
                 DEMOD=demod, NEED_DW=need_dw, NEED_DS=need_ds, NEED_DA=need_da, DW_ATOMIC=dw_atomic,
                 DOT_PREC=precs[0], SQ_PREC=precs[1], F32_DOT=precs[2], BLOCK_K=BK)
    L.launch(_mod_linear_bwd_weight_kernel, grid, args, flags)
    dbank = None
    if need_dw:
        dbank = dwp[0] if (n_split == 1 or dw_atomic) else dwp.sum(0)
    return dbank, (dsp.sum(0) if need_ds else None), (dap.sum(0) if need_da else None)


def _weight_token(g, x, bank, coeffs, styles, c, c_str, dbank, a_str, s_str, demodulate, precs):
    B, T, I = x.shape
    K, O, _ = bank.shape

    def grid(meta):
        return (triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"]), K)

    args = (
        g, x, bank, coeffs, ptr(styles, x.device), c, dbank,
        B, T, I, O, K,
        *g.stride(), *x.stride(), *bank.stride(), *a_str, *s_str, *c_str, *dbank.stride(),
    )
    flags = dict(HAS_STYLES=styles is not None, DEMOD=bool(demodulate), DOT_PREC=precs[0], SQ_PREC=precs[1],
                 F32_DOT=precs[2])
    L.launch(_mod_linear_bwd_weight_token_kernel, grid, args, flags)
