"""Tile configurations for the mod_conv2d kernels: autotuned on a GPU (Hopper-sized
candidates), one small fixed configuration under ``TRITON_INTERPRET=1``.

The raw ``@triton.jit`` kernels stay launchable with explicit meta-parameters (the path the
interpreter runs); the one launch path (:mod:`._launch`) wraps them for the GPU. Keys: the
channel sizes, the taps, power-of-two buckets of the pixels per sample and of the reduction
``I * kh * kw``, and the feature flags; Triton adds the dtypes. Batch size, image size, strides and the
conv geometry are deliberately not keys (they would retune for every resolution).
"""
from __future__ import annotations

import dataclasses

from ._host import interpreting, smem_bytes
from ._tiles import GemmTable, config, elem_bytes

#: interpreter tiles: channel blocks small (the odd test sizes exercise the tails), pixel
#: blocks of 64 (the interpreter's cost is per operation, not per element: fewer, fuller
#: pixel blocks run faster). tl.dot needs every dimension >= 16 on a GPU; so do these.
INTERPRET = {
    "fwd": dict(BLOCK_P=64, BLOCK_O=16, BLOCK_I=16),
    "dx": dict(BLOCK_Q=64, BLOCK_I=16, BLOCK_O=16),
    "weight": dict(BLOCK_O=16, BLOCK_I=16, BLOCK_P=64),
    "demod": dict(BLOCK_O=16, BLOCK_R=64),
    "prep": dict(BLOCK_O=16, BLOCK_P=64),
    "dw_fwd": dict(BLOCK_P=64, BLOCK_C=16),
    "dw_dx": dict(BLOCK_Q=64, BLOCK_C=16),
    "dw_weight": dict(BLOCK_C=16, BLOCK_P=64),
}

#: fixed GPU tiles of the bandwidth-bound kernels (no tuning: they read each input once)
GPU_FIXED = {
    "demod": dict(BLOCK_O=64, BLOCK_R=64, num_warps=4),
    "prep": dict(BLOCK_O=32, BLOCK_P=128, num_warps=4),
    "dw_fwd": dict(BLOCK_P=64, BLOCK_C=64, num_warps=4),
    "dw_dx": dict(BLOCK_Q=64, BLOCK_C=64, num_warps=4),
    "dw_weight": dict(BLOCK_C=64, BLOCK_P=64, num_warps=4),
}

#: the smallest BLOCK_O / BLOCK_I any weight-kernel configuration uses: the ds / da partial
#: buffers are sized for them (zero-filled, so larger tiles leave the extra slots at 0)
MIN_WEIGHT_BLOCK_O = 32
MIN_WEIGHT_BLOCK_I = 32


def meta(kind: str) -> dict:
    """Fixed meta-parameters for a kernel that is not autotuned (or for the interpreter)."""
    if interpreting():
        return dict(INTERPRET[kind])
    return dict(GPU_FIXED[kind])


# Shapes (rows, cols, reduction, warps, stages): rows = pixels, cols = output channels (fwd) or
# input channels (dx), reduction = the channel block of the main loop. Short tables, free of
# configs the AOT report (``python -m modweights.aot``) shows spilling or unpipelined on
# sm_90a at W1-W7; the first that fits is the default with autotuning off. (Built by the same
# :class:`._tiles.GemmTable` as mod_linear_configs.py's, on purpose: each op's tiles are its
# own, measured per op.) ``dense``: one filter tile per step (no coefficients); ``mixing``: the
# K-bank mixture formed in the filter-tile load: every stage holds BLOCK_K bank tiles, so the
# reduction block is short; tall pixel tiles amortise the mixing FMAs (CUDA cores).
# (256, 128, 32) mixing spilled at W5 and W7.
FWD = GemmTable("BLOCK_P", "BLOCK_O", "BLOCK_I",
                dense=((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)),
                mixing=((128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)))
#: dx, the transposed convolution: the forward's tiles with input and output channels swapped
DX = dataclasses.replace(FWD, rows="BLOCK_Q", cols="BLOCK_I", red="BLOCK_O")


def fwd_configs():
    return FWD.configs()


def dx_configs():
    return DX.configs()


def _prune_gemm(table: GemmTable, a_ptr_name: str):
    def prune(configs, named_args, **kwargs):
        return table.keep(configs, elem_bytes(named_args, a_ptr_name), int(kwargs.get("BLOCK_K", 1)))
    return prune


prune_fwd = _prune_gemm(FWD, "x_ptr")
prune_dx = _prune_gemm(DX, "w_ptr")


def weight_configs():
    """The weight kernel keeps a ``BLOCK_K x BLOCK_O x BLOCK_I`` float32 accumulator (all K
    experts) plus ~4 float32 ``BLOCK_O x BLOCK_I`` tiles (Q, the bank tile, M, dW) live across
    the sample loop; :func:`prune_weight` drops the tiles that would not fit in registers."""
    out = []
    # (64, 32, 64, 8, 3): at K = 8 with demodulation and styles (W7) every 64x64 tile spilled
    # under Triton 3.8 or 3.6 (AOT report); 64x32 on 8 warps fits under both
    for bo, bi, bp, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
                             (64, 32, 64, 8, 3), (64, 64, 64, 4, 3), (32, 32, 128, 4, 3)):
        out.append(config(w, s, BLOCK_O=bo, BLOCK_I=bi, BLOCK_P=bp))
    return out


#: float32 registers per thread the weight kernel's live tiles may take (of 255; the rest
#: addresses the loads and feeds the MMA pipeline)
WEIGHT_REGS = 192


def _keep_weight(configs, eb: int, bk: int) -> list:
    """The weight-kernel configs whose ``num_stages`` (g, x) tile pairs of ``eb``-byte elements fit
    in shared memory and whose live float32 tiles fit in :data:`WEIGHT_REGS`."""
    smem = smem_bytes()
    keep = []
    for c in configs:
        bo, bi, bp = c.kwargs["BLOCK_O"], c.kwargs["BLOCK_I"], c.kwargs["BLOCK_P"]
        if c.num_stages * (bo + bi) * bp * eb > smem:
            continue
        if (bk + 4) * bo * bi / (32 * c.num_warps) > WEIGHT_REGS:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_I"])]


def prune_weight(configs, named_args, **kwargs):
    return _keep_weight(configs, elem_bytes(named_args, "x_ptr"), kwargs.get("BLOCK_K", 1))
