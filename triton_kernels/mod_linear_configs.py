"""Tile configurations for the mod_linear kernels: autotuned on a GPU (Hopper-sized
candidates), one small fixed configuration under ``TRITON_INTERPRET=1``.

The raw ``@triton.jit`` kernels stay importable and launchable with explicit meta-parameters
(that is the path the interpreter runs); the one launch path (:mod:`._launch`) wraps them for
the GPU.

Autotuning keys (``key=``): the problem sizes that change the best tile (a power-of-two
bucket of the rows, ``I``, ``O``, ``K``) and the feature flags that change the kernel body
(mixing layout, demodulation mode, styles/coefficients present); Triton adds the tensor
dtypes itself. Batch size and strides are deliberately not keys.
"""
from __future__ import annotations

from ._host import interpreting, smem_bytes  # noqa: F401 (smem_bytes: API)
from ._tiles import GemmTable, config, elem_bytes, gemm_smem  # noqa: F401 (gemm_smem: API)

#: under the interpreter every kernel runs with these tiles (small: CPU time, and tails are
#: exercised by the odd test sizes); tl.dot needs every dimension >= 16 on a GPU
INTERPRET_META = dict(BLOCK_T=16, BLOCK_O=16, BLOCK_I=16)

#: the smallest BLOCK_I any configuration uses: the fused weight kernel's deterministic da
#: buffer, whose first dimension counts I tiles, is sized for it (and zero-filled)
MIN_BLOCK_I = 16


# ----------------------------------------------------------------------------- GEMM-like kernels
# (forward: rows x O, reduce over I; dx: rows x I, reduce over O). Each table is kept short and
# free of configs the AOT report (``python -m modweights.aot``) shows spilling or unpipelined on
# sm_90a at W1-W7; the first that fits is the default with autotuning off. Shapes are
# (BLOCK_T, N, R, warps, stages): N the output tile's column block, R the reduction block.
# ``dense``: one bank tile per step (no coefficients, or the stacked layout); ``mixing``: the
# per-sample mixture formed in the B-tile load (``MIX_B`` with coefficients): every stage holds
# BLOCK_K bank tiles, so the reduction block is short; tall row tiles amortise the mixing FMAs
# (CUDA cores) over more MMA work. The few-row shapes (16 rows: decode, small T) make one pass
# over the bank with many programs and wide reduction blocks.
FWD = GemmTable("BLOCK_T", "BLOCK_O", "BLOCK_I",
                dense=((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                       (16, 32, 256, 4, 3), (16, 64, 128, 4, 4)),
                mixing=((128, 128, 32, 8, 3), (256, 128, 32, 8, 3), (128, 64, 32, 4, 3), (16, 64, 64, 4, 3)))
# dx: (64, 64, 64) on 8 warps for per-row ds / da (W3: 4 warps spilled under Triton 3.6);
# (16, 32, 256) spilled at W6-64
DX = GemmTable("BLOCK_T", "BLOCK_I", "BLOCK_O",
               dense=((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 8, 3), (64, 64, 64, 4, 4),
                      (16, 32, 128, 4, 3)),
               mixing=((128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (16, 64, 64, 4, 3)))


def fwd_configs():
    return FWD.configs()


def dx_configs():
    return DX.configs()


def mix_depth(flags) -> int:
    """Bank tiles loaded per main-loop step: ``BLOCK_K`` when the mixture is formed in the B-tile
    load (``MIX_B`` with coefficients), else 1."""
    return int(flags.get("BLOCK_K", 1)) if flags.get("MIX_B") and flags.get("HAS_COEFFS") else 1


def _prune_gemm(table: GemmTable):
    def prune(configs, named_args, **kwargs):
        rows = named_args.get("rows_bucket", 1 << 30)
        row_tiles = kwargs.get("ROW_DS") or kwargs.get("ROW_DA")

        def also(c):
            t, n = c.kwargs["BLOCK_T"], c.kwargs[table.cols]
            # a row tile mostly empty is never the fastest; per-row ds / da keep two more
            # [BLOCK_T, BLOCK_I] float32 tiles live across the main loop: larger tiles spill
            # (AOT report, W3 dx)
            return t <= max(16, rows) * 2 and not (row_tiles and t * n > 64 * 64)

        return table.keep(configs, elem_bytes(named_args, "w_ptr"), mix_depth(kwargs), also)
    return prune


prune_fwd = _prune_gemm(FWD)
prune_dx = _prune_gemm(DX)


# ----------------------------------------------------------------------------- weight side

def weight_configs():
    """Fused per-sample weight kernel: the K float32 accumulators ``BLOCK_K x BLOCK_O x BLOCK_I``
    live in registers across the sample loop (the bank tiles are re-read one at a time), so the
    tile shrinks with K. The first that :func:`prune_weight` keeps is the default."""
    out = []
    # (at K = 8 a 64x64 tile needs 128 accumulator registers per thread at 8 warps and spills,
    # 16 warps cap the registers at 128 and spill more: 64x32 on 8 warps is the largest
    # spill-free wgmma tile there, AOT report)
    for bo, bi, w, s in ((128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3),
                         (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 3)):
        out.append(config(w, s, BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=64))
    return out


#: float32 registers per thread the weight kernel's accumulators and live tiles may take (of
#: 255; the rest addresses the loads and feeds the MMA)
WEIGHT_REGS = 160


def prune_weight(configs, named_args, **kwargs):
    bk = kwargs.get("BLOCK_K", 1)
    keep = []
    for c in configs:
        bo, bi, w = c.kwargs["BLOCK_O"], c.kwargs["BLOCK_I"], c.num_warps
        # the K-deep float32 accumulators and ~3 live float32 tiles (Q, M, dWs)
        per_thread = (bk + 3) * bo * bi / (32 * w)
        if per_thread > WEIGHT_REGS:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_I"])]


def weight_token_configs():
    # (128x64 on 4 warps and 128x256 on 8 spilled at W3 / W6, AOT report)
    return [
        config(8, 3, BLOCK_O=128, BLOCK_I=128, BLOCK_T=64),
        config(4, 4, BLOCK_O=64, BLOCK_I=128, BLOCK_T=64),
        config(4, 4, BLOCK_O=64, BLOCK_I=64, BLOCK_T=64),
        config(4, 4, BLOCK_O=64, BLOCK_I=64, BLOCK_T=32),
    ]


def prune_weight_token(configs, named_args, **kwargs):
    """With per-token demodulation the kernel adds K more reductions with their own float32
    tile per expert pair: 128x128 tiles spilled there (AOT report, test shapes); keep 64x64."""
    if kwargs.get("DEMOD"):
        keep = [c for c in configs if c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_I"] <= 64 * 64]
        return keep or configs[-1:]
    return configs


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
