"""The tile-table builder both ops' configuration modules use (written once, for
:mod:`.mod_linear_configs` and :mod:`.mod_conv2d_configs`): a GEMM-like kernel's candidate
configs from its ``(rows, cols, reduction, warps, stages)`` shapes, the shared memory Triton
lays them out in, the pruning that keeps the shapes of one regime that fit, and the autotune
wrapper. The tables themselves stay in each op's module: each op's tiles are measured per op
(AOT report, ``python -m modweights.aot``).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

from ._host import smem_bytes


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def gemm_smem(t, n, r, stages, eb, mix) -> int:
    """Shared memory of a GEMM-like config as Triton lays it out (checked by the AOT report):
    ``stages - 1`` buffers of the A tile and of the ``mix`` bank tiles, the A tile once more
    (scaled in registers, written for the MMA) and, when mixing, the mixed B tile."""
    return ((stages - 1) * (t * r + mix * n * r) + t * r + (n * r if mix > 1 else 0)) * eb


def elem_bytes(named_args: dict, name: str) -> int:
    """Element size of the tensor argument ``name`` (2 when it is not given: the offline default)."""
    t = named_args.get(name)
    return t.element_size() if t is not None else 2


@dataclass(frozen=True)
class GemmTable:
    """The candidate tiles of one GEMM-like kernel: ``rows`` x ``cols`` output tiles reduced in
    blocks of ``red`` (the meta-parameter names), ``dense`` shapes for one bank tile per main-loop
    step and ``mixing`` shapes for ``BLOCK_K`` bank tiles per step (the mixture formed in the
    B-tile load). Each shape is ``(rows, cols, reduction, warps, stages)``; within a regime the
    first that fits is the default with autotuning off."""

    rows: str
    cols: str
    red: str
    dense: tuple
    mixing: tuple

    def configs(self) -> list:
        return [config(w, s, **{self.rows: t, self.cols: n, self.red: r})
                for t, n, r, w, s in self.dense + self.mixing]

    def smem(self, c, eb: int, mix: int) -> int:
        return gemm_smem(c.kwargs[self.rows], c.kwargs[self.cols], c.kwargs[self.red], c.num_stages, eb, mix)

    def keep(self, configs, eb: int, mix: int, also=None) -> list:
        """The configs of the regime (mixing when ``mix`` > 1 bank tiles per step) that fit in the
        device's shared memory and pass ``also(config)``; else the one needing the least memory."""
        shapes = set(self.mixing if mix > 1 else self.dense)
        smem = smem_bytes()
        keep = [c for c in configs
                if (c.kwargs[self.rows], c.kwargs[self.cols], c.kwargs[self.red], c.num_warps, c.num_stages) in shapes
                and self.smem(c, eb, mix) <= smem and (also is None or also(c))]
        return keep or [min(configs, key=lambda c: self.smem(c, eb, mix))]


def autotuned(kernel, configs, key, prune, reset_to_zero=None):
    """Wrap a raw kernel with triton.autotune (GPU only; the interpreter cannot time). With
    autotuning off the launcher runs the raw kernel with the first config the pruning keeps."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset_to_zero)(kernel)
