"""Tile configurations for the mod_linear kernels: autotuned on a GPU (Hopper-sized
candidates), one small fixed configuration under ``TRITON_INTERPRET=1``.

The raw ``@triton.jit`` kernels stay importable and launchable with explicit meta-parameters
(that is the path the interpreter runs); :func:`autotuned` wraps them for the GPU.

Autotuning keys (``key=``): the problem sizes that change the best tile (a power-of-two
bucket of the rows, ``I``, ``O``, ``K``) and the feature flags that change the kernel body
(mixing layout, demodulation mode, styles/coefficients present); Triton adds the tensor
dtypes itself. Batch size and strides are deliberately not keys.
"""
from __future__ import annotations

import os

import triton

#: under the interpreter every kernel runs with these tiles (small: CPU time, and tails are
#: exercised by the odd test sizes); tl.dot needs every dimension >= 16 on a GPU
INTERPRET_META = dict(BLOCK_T=16, BLOCK_O=16, BLOCK_I=16)

#: the smallest BLOCK_I any configuration uses: the fused weight kernel's deterministic da
#: buffer, whose first dimension counts I tiles, is sized for it (and zero-filled)
MIN_BLOCK_I = 16

#: an H100 has 228 KiB of shared memory per SM, 227 KiB usable by one block
SMEM_BYTES = 227 * 1024


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _c(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- GEMM-like kernels
# (forward: rows x O, reduce over I; dx: rows x I, reduce over O). N is the output tile's
# column block, R the reduction block.

_GEMM_SHAPES = [
    # (BLOCK_T, N, R, warps, stages)
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (256, 128, 64, 8, 3),  # K > 1 mixed in the B tile: a tall tile amortises the mixing
    # few rows (decode, small T): one pass over the bank, wide reduction blocks
    (16, 64, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 128, 64, 4, 4),
    (16, 32, 256, 4, 3),  # many programs for a single pass over a large bank
]


def fwd_configs():
    return [_c(w, s, BLOCK_T=t, BLOCK_O=n, BLOCK_I=r) for t, n, r, w, s in _GEMM_SHAPES]


def dx_configs():
    return [_c(w, s, BLOCK_T=t, BLOCK_I=n, BLOCK_O=r) for t, n, r, w, s in _GEMM_SHAPES]


def _elem_bytes(named_args) -> int:
    w = named_args.get("w_ptr")
    return w.element_size() if w is not None else 2


def _prune_gemm(n_name, r_name):
    def prune(configs, named_args, **kwargs):
        rows = named_args.get("rows_bucket", 1 << 30)
        eb = _elem_bytes(named_args)
        keep = []
        for c in configs:
            t, n, r = c.kwargs["BLOCK_T"], c.kwargs[n_name], c.kwargs[r_name]
            smem = c.num_stages * (t * r + n * r) * eb
            if smem > SMEM_BYTES:
                continue
            if t > max(16, rows) * 2:  # a row tile mostly empty: never the fastest
                continue
            keep.append(c)
        return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_T"])]
    return prune


prune_fwd = _prune_gemm("BLOCK_O", "BLOCK_I")
prune_dx = _prune_gemm("BLOCK_I", "BLOCK_O")


# ----------------------------------------------------------------------------- weight side

def weight_configs():
    """Fused per-sample weight kernel: the K accumulators and the bank tile (both
    ``BLOCK_K x BLOCK_O x BLOCK_I`` float32) live in registers, so the tile shrinks with K."""
    out = []
    for bo, bi in ((128, 64), (64, 128), (64, 64), (64, 32), (32, 64), (32, 32), (16, 32)):
        for w in (4, 8):
            out.append(_c(w, 3, BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=64))
    return out


def prune_weight(configs, named_args, **kwargs):
    bk = kwargs.get("BLOCK_K", 1)
    eb = _elem_bytes(named_args)
    keep = []
    for c in configs:
        bo, bi, w = c.kwargs["BLOCK_O"], c.kwargs["BLOCK_I"], c.num_warps
        # registers per thread for the K-deep float32 accumulators, the K-deep bank tile (bank
        # dtype) and ~2 live float32 tiles (Q, M or dVs): keep them within ~128 (4 warps) / 160
        # (8 warps) of the 255, leaving the rest for addressing and the dot pipeline
        per_thread = (bk * (4 + eb) + 8) / 4 * bo * bi / (32 * w)
        if per_thread > (128 if w == 4 else 160):
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_I"])]


def weight_token_configs():
    return [
        _c(8, 3, BLOCK_O=128, BLOCK_I=128, BLOCK_T=64),
        _c(4, 4, BLOCK_O=128, BLOCK_I=64, BLOCK_T=64),
        _c(4, 4, BLOCK_O=64, BLOCK_I=128, BLOCK_T=64),
        _c(4, 4, BLOCK_O=64, BLOCK_I=64, BLOCK_T=64),
        _c(8, 3, BLOCK_O=128, BLOCK_I=256, BLOCK_T=64),
        _c(4, 4, BLOCK_O=64, BLOCK_I=64, BLOCK_T=32),
    ]


#: fixed tiles of the memory-bound pre-passes (no tuning: they read each input once)
PREP_META_GPU = dict(BLOCK_T=32, BLOCK_O=128)
DEMOD_META_GPU = dict(BLOCK_O=64, BLOCK_I=64)


def prep_meta():
    return dict(BLOCK_T=16, BLOCK_O=16) if interpreting() else dict(PREP_META_GPU, num_warps=4)


def demod_meta():
    return dict(BLOCK_O=16, BLOCK_I=16) if interpreting() else dict(DEMOD_META_GPU, num_warps=4)


#: the mixed-rows demodulation kernels (mod_linear_demod.py): a [BLOCK_R, BLOCK_O, BLOCK_I]
#: float32 tile in registers (4096 elements: 32 per thread with 4 warps)
DEMOD_ROWS_META_GPU = dict(BLOCK_R=16, BLOCK_O=16, BLOCK_I=16)


def demod_rows_meta():
    return dict(BLOCK_R=8, BLOCK_O=16, BLOCK_I=16) if interpreting() else dict(DEMOD_ROWS_META_GPU, num_warps=4)


#: ``MODWEIGHTS_TRITON_AUTOTUNE=0``: one safe default configuration per kernel, no timing runs
#: (GPU test suites: many shapes, each of which would otherwise be tuned)
AUTOTUNE = os.environ.get("MODWEIGHTS_TRITON_AUTOTUNE", "1") != "0"


def autotuned(kernel, configs, key, prune, reset_to_zero=None, default=0):
    """Wrap a raw kernel with triton.autotune (GPU only; the interpreter cannot time).
    ``default``: the index of the configuration used when autotuning is off."""
    if not AUTOTUNE:
        configs = [configs[default]]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset_to_zero)(kernel)
