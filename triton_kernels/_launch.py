"""The one launch path of every Triton kernel of the package (host only), written once for
all ops.

Each op's launcher module registers its kernels once, at import (:func:`register`): the raw
``@triton.jit`` function, the fixed tiles it runs with where it is not tuned, and, for a tuned
kernel, its candidate configs, autotuning key and pruning (the autotuned wrapper is built
here, on a GPU only). Every launch then goes through :func:`launch`, keyed by the raw kernel:

* under the interpreter (``TRITON_INTERPRET=1``), or for a kernel without candidates: its
  fixed tiles;
* with ``MODWEIGHTS_TRITON_AUTOTUNE=0``: its default config, the first candidate its pruning
  keeps for the launch (:func:`candidates`; the tables put the default first, the AOT report
  checks each);
* otherwise: its autotuned wrapper;
* while the AOT report records (:mod:`._record`): nothing runs; the launch is appended with
  the configs autotuning would try and the default.

The kernel sweep (``modweights.benchmarking.kernel_sweep``) reads :data:`KERNELS` and wraps
:func:`launch`; launchers therefore call it as ``L.launch(...)`` (module attribute), never
through a name imported from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import _record
from ._host import AUTOTUNE, interpreting
from ._tiles import autotuned

#: whether the kernels were built for the interpreter (Triton decides at decoration)
INTERPRETED = interpreting()


@dataclass(frozen=True)
class Kernel:
    """One registered kernel.

    Attributes:
        raw: the ``@triton.jit`` function (the key of :data:`KERNELS`).
        op: the op whose launcher registered it.
        fixed: its meta-parameters where it is not tuned: under the interpreter, and on a GPU
            for a kernel without candidates (``num_warps`` / ``num_stages`` keys optional).
        configs: the candidate ``triton.Config`` list autotuning times (empty: not tuned).
        prune: ``prune(configs, named_args, **flags)``, the configs that fit a launch (None: all).
        tuned: the autotuned wrapper (None under the interpreter and without candidates).
    """

    raw: object
    op: str
    fixed: dict
    configs: tuple = ()
    prune: Callable | None = None
    tuned: object = None

    @property
    def name(self) -> str:
        return self.raw.fn.__name__ if hasattr(self.raw, "fn") else getattr(self.raw, "__name__", str(self.raw))


#: every registered kernel, by raw kernel, in registration order
KERNELS: dict = {}


def register(op: str, raw, fixed: dict, configs=(), key=None, prune=None, reset_to_zero=None) -> Kernel:
    """Register ``raw`` (once, by the launcher module of ``op``). With ``configs`` it is tuned
    over them by ``key`` (the autotuning key), ``prune`` and ``reset_to_zero`` (the output
    buffers every timing run must start from zero)."""
    configs = tuple(configs)
    tuned = None
    if configs and not INTERPRETED:
        tuned = autotuned(raw, list(configs), key, prune or (lambda cfgs, named_args, **kw: cfgs),
                          reset_to_zero=reset_to_zero)
    k = Kernel(raw, op, dict(fixed), configs, prune, tuned)
    KERNELS[raw] = k
    return k


def by_name(name: str) -> Kernel:
    """The registered kernel whose raw function is called ``name``."""
    for k in KERNELS.values():
        if k.name == name:
            return k
    raise KeyError(f"no registered Triton kernel named {name!r}")


def fixed_meta(raw) -> dict:
    """The fixed meta-parameters of ``raw`` (a launcher sizes its buffers by them)."""
    return dict(KERNELS[raw].fixed)


def candidates(raw, args, flags) -> list:
    """The configs autotuning would time for this launch (after the kernel's pruning; the
    fixed tiles for an untuned kernel). The first is the default with autotuning off."""
    k = KERNELS[raw]
    if not k.configs:
        return [k.fixed]
    cfgs = list(k.configs)
    return k.prune(cfgs, dict(zip(raw.arg_names, args)), **flags) if k.prune is not None else cfgs


def default_meta(raw, args, flags) -> dict:
    """The meta-parameters (``num_warps`` / ``num_stages`` included) a launch runs with when
    autotuning is off."""
    meta, warps, stages = _record.as_config(candidates(raw, args, flags)[0])
    return dict(meta, num_warps=warps, num_stages=stages)


def _grid(grid, meta):
    return grid(meta) if callable(grid) else grid


def run(raw, grid, args, flags, meta) -> None:
    """Launch the raw kernel with explicit meta-parameters (``num_warps`` / ``num_stages``
    optional)."""
    raw[_grid(grid, meta)](*args, **flags, **meta)


def launch(raw, grid, args, flags) -> None:
    """Launch the registered kernel ``raw`` on ``grid`` (a tuple, or a function of the chosen
    meta-parameters) with the positional ``args`` and constexpr ``flags``; see the module."""
    k = KERNELS[raw]
    if _record.ACTIVE is not None:
        configs = candidates(raw, args, flags)
        _record.record(raw, args, flags, configs, configs[0], _grid(grid, _record.as_config(configs[0])[0]))
    elif INTERPRETED or k.tuned is None:
        run(raw, grid, args, flags, k.fixed)
    elif not AUTOTUNE:
        run(raw, grid, args, flags, default_meta(raw, args, flags))
    else:
        k.tuned[grid](*args, **flags)


def tuned_kernels() -> list[Kernel]:
    """The registered kernels with candidate configs (what autotuning and the sweep cover)."""
    return [k for k in KERNELS.values() if k.configs]
