"""Recording kernel launches instead of running them: how the AOT report
(:mod:`modweights.aot`) learns which kernel specialisations the launchers use.

While :class:`recording` is active, the launchers of :mod:`.mod_linear` and
:mod:`.mod_conv2d` accept ``device="meta"`` tensors and run their ordinary host logic (layout,
flags, strides, splits), and the one launch path (:func:`._launch.launch`: config pruning, the
default) appends a :class:`Launch` here where it would launch a kernel. Nothing is compiled or run; no GPU is needed. The report then
compiles each recorded launch for a target of its choice.

The same code picks the flags and configs for a real launch and for the report: there is
no second copy of the launchers' logic to drift.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: the launches recorded so far while :class:`recording` is active (None: launch for real)
ACTIVE: list | None = None

#: streaming multiprocessors of the GPU the recorded launches are sized for (the weight
#: kernels split the batch until the grid fills the GPU): an H100 / H200 SXM has 132
SMS = 132


@dataclass
class Launch:
    """One kernel launch as the launcher would issue it.

    Attributes:
        kernel: the raw ``@triton.jit`` function.
        args: the positional arguments (tensors, ints, floats) in the kernel's order.
        flags: the constexpr keyword arguments chosen by the launcher (features, precisions).
        configs: the tile configurations autotuning would time for this launch (after the
            launcher's pruning), each ``(meta, num_warps, num_stages)``.
        default: the configuration used with ``MODWEIGHTS_TRITON_AUTOTUNE=0`` (or the fixed
            one of an untuned kernel), ``(meta, num_warps, num_stages)``.
        grid: the launch grid of the default configuration.
    """

    kernel: object
    args: tuple
    flags: dict
    configs: list
    default: tuple
    grid: tuple = ()
    notes: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)

    def named_args(self) -> dict:
        return dict(zip(self.kernel.arg_names, self.args))


def active() -> bool:
    return ACTIVE is not None


class recording:
    """``with recording() as launches:`` run launchers on meta tensors; ``launches`` fills up."""

    def __enter__(self):
        global ACTIVE
        self._old = ACTIVE
        ACTIVE = []
        return ACTIVE

    def __exit__(self, *exc):
        global ACTIVE
        ACTIVE = self._old
        return False


def as_config(c, default_stages: int = 3) -> tuple:
    """``(meta, num_warps, num_stages)`` of a ``triton.Config`` or of a fixed meta dict
    (``num_warps`` / ``num_stages`` keys optional: Triton's defaults 4 and 3)."""
    if hasattr(c, "kwargs"):
        return dict(c.kwargs), int(c.num_warps), int(c.num_stages)
    meta = dict(c)
    return meta, int(meta.pop("num_warps", 4)), int(meta.pop("num_stages", default_stages))


def record(kernel, args, flags, configs, default, grid=()) -> None:
    """Append one launch (called by the launchers while :class:`recording` is active)."""
    ACTIVE.append(Launch(kernel, tuple(args), dict(flags), [as_config(c) for c in configs], as_config(default),
                         tuple(grid)))
