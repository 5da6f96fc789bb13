"""The benchmark workloads: one definition, shared by ``modweights bench`` and the
pytest-benchmark suite in ``benchmarks/``.

A workload is a :class:`modweights.testing.Case` (the op, its mode and its sizes) with a
name and the default dtype it is measured in. W1-W7 are GPU-sized workloads
(the regimes of docs/design.md section 4); the ``cpu-*`` workloads are sized for a small CPU
(``cpu-condconv`` and ``cpu-mixlinear`` are the CPU benchmark of benchmarks/results/).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import ops
from ..testing import Case


@dataclass(frozen=True)
class Workload:
    """A named benchmark problem.

    Attributes:
        name: short id used on the command line and in result files.
        case: the op, its mode and sizes (a :class:`~modweights.testing.Case`).
        title: what it models, for tables and plots.
        group: ``"gpu"`` (W1-W7, sized for an H100) or ``"cpu"`` (sized for a few CPU cores);
            the default sweep of a device type is its group.
        gpu_dtype: dtype on a GPU unless ``--dtype`` says otherwise (CPU runs use float32).
    """

    name: str
    case: Case
    title: str
    group: str
    gpu_dtype: str = "bfloat16"

    def dtype_for(self, device: torch.device) -> str:
        return self.gpu_dtype if device.type == "cuda" else "float32"

    @property
    def flops(self) -> int:
        """Dense FLOPs of one forward: ``2*B*T*O*I`` (linear), ``2*B*O*I/g*kh*kw*H'*W'`` (conv)."""
        return dense_flops(self.case)

    @property
    def shape(self) -> str:
        return shape_str(self.case)

    def tiny(self) -> "Workload":
        """The same mode at CI-smoke sizes (a few thousand FLOPs): for `--benchmark-disable`
        runs and tests that exercise the machinery, never for numbers."""
        return dataclasses.replace(self, name=self.name, case=self.case.spec.tiny(self.case))


def out_hw(case: Case) -> tuple[int, int]:
    """Output spatial size of a conv2d case (as :func:`torch.nn.functional.conv2d`)."""
    return ops.get("mod_conv2d").out_hw(case)


def dense_flops(case: Case) -> int:
    """FLOPs of the dense op of the same shape, forward only (fwd+bwd is 3x this): the op spec's."""
    return case.spec.dense_flops(case)


def forward_bytes(case: Case, itemsize: int) -> int:
    """The least memory traffic of one forward: the whole bank once, the input and the output
    once, the conditioning once. The decode workloads (W6) are bound by it."""
    rows = case.B * max(case.T, 1)
    cond = 0
    if case.coeffs != "none":
        cond += (rows if case.coeffs == "token" else case.B) * case.K
    if case.styles != "none":
        cond += (rows if case.styles == "token" else case.B) * case.I
    return itemsize * (case.spec.weight_io_elems(case) + cond)


def shape_str(case: Case) -> str:
    """A compact, human-readable shape, e.g. ``B16xT256 512->512 K4 mix/sample``."""
    cond = []
    if case.coeffs != "none":
        cond.append(f"mix/{case.coeffs}")
    if case.styles != "none":
        cond.append(f"mod/{case.styles}")
    if case.demodulate:
        cond.append("demod")
    return case.spec.shape_str(case, " ".join(cond) or "plain")


def _lin(B, T, I, O, K, **kw):
    return Case("mod_linear", B=B, T=T, I=I, O=O, K=K, **kw)


def _conv(B, I, O, K, H, W, **kw):
    return Case("mod_conv2d", B=B, I=I, O=O, K=K, H=H, W=W, kernel=(3, 3), conv={"padding": 1}, **kw)


def _conv1d(B, I, O, K, L, k, **kw):
    return Case("mod_conv1d", B=B, I=I, O=O, K=K, W=L, kernel=(k,), conv={"padding": k // 2}, **kw)


_ALL = [
    # ---- GPU-sized workloads, one per regime
    Workload("W1", _lin(16, 1024, 4096, 4096, 1, styles="sample", demodulate=True),
             "modulated linear + demod, 16x1024 tokens, 4096->4096", "gpu"),
    Workload("W2a", _lin(16, 1024, 4096, 4096, 8, coeffs="sample"),
             "mixture per sample K=8, 16x1024 tokens, 4096->4096", "gpu"),
    Workload("W2b", _lin(256, 49, 1024, 1024, 8, coeffs="sample"),
             "mixture per sample K=8, 256 samples x 49 tokens, 1024->1024", "gpu"),
    Workload("W3", _lin(8, 1024, 4096, 4096, 4, coeffs="token"),
             "per-token mixture K=4, 8192 tokens, 4096->4096", "gpu"),
    Workload("W4", _conv(32, 512, 512, 1, 64, 64, styles="sample", demodulate=True),
             "StyleGAN2 modconv + demod 512->512 3x3 64x64, batch 32", "gpu"),
    Workload("W5", _conv(64, 256, 256, 8, 56, 56, coeffs="sample"),
             "CondConv K=8 256->256 3x3 56x56, batch 64", "gpu"),
    # decode: each row is its own sample with its own mixture of the bank (2-D input, T = 0)
    Workload("W6-1", _lin(1, 0, 4096, 4096, 4, coeffs="sample"),
             "decode fp16: 1 row, its own mixture of K=4 4096x4096", "gpu", gpu_dtype="float16"),
    Workload("W6-8", _lin(8, 0, 4096, 4096, 4, coeffs="sample"),
             "decode fp16: 8 rows, each its own mixture of K=4 4096x4096", "gpu", gpu_dtype="float16"),
    Workload("W6-64", _lin(64, 0, 4096, 4096, 4, coeffs="sample"),
             "decode fp16: 64 rows, each its own mixture of K=4 4096x4096", "gpu", gpu_dtype="float16"),
    Workload("W7", _conv(32, 512, 512, 8, 64, 64, coeffs="sample", styles="sample", demodulate=True),
             "GigaGAN adaptive conv: K=8 selection + modulation + demod 512->512 3x3 64x64, batch 32", "gpu"),
    # ---- CPU-sized (the CPU benchmark of benchmarks/results/ first)
    Workload("cpu-condconv", _conv(16, 64, 64, 4, 32, 32, coeffs="sample"),
             "CondConv K=4 64->64 3x3 32x32, batch 16", "cpu"),
    Workload("cpu-mixlinear", _lin(16, 256, 512, 512, 4, coeffs="sample"),
             "mixture linear per sample K=4, 16x256 tokens, 512->512", "cpu"),
    Workload("cpu-modconv", _conv(8, 64, 64, 1, 32, 32, styles="sample", demodulate=True),
             "StyleGAN2 modconv + demod 64->64 3x3 32x32, batch 8", "cpu"),
    Workload("cpu-modlinear", _lin(16, 256, 512, 512, 1, styles="sample", demodulate=True),
             "modulated linear + demod, 16x256 tokens, 512->512", "cpu"),
    # (small: the naive per-token path forms a (B, T, O, I) weight)
    Workload("cpu-tokmix", _lin(4, 64, 256, 256, 4, coeffs="token"),
             "per-token mixture K=4, 4x64 tokens, 256->256", "cpu"),
    Workload("cpu-gigagan", _conv(8, 64, 64, 4, 32, 32, coeffs="sample", styles="sample", demodulate=True),
             "GigaGAN adaptive conv K=4 + modulation + demod 64->64 3x3 32x32, batch 8", "cpu"),
    # dynamic 1-D convolution over a sequence (ODConv / CondConv for audio and text)
    Workload("cpu-condconv1d", _conv1d(16, 128, 128, 4, 256, 5, coeffs="sample"),
             "CondConv1d K=4 128->128 k5 over 256 steps, batch 16", "cpu"),
]

#: every workload by name, in sweep order
WORKLOADS: dict[str, Workload] = {w.name: w for w in _ALL}

#: selectors accepted by :func:`select` besides names
GROUPS = ("all", "gpu", "cpu")


def default_names(device: torch.device) -> list[str]:
    """The default sweep of a device type: W1-W7 on a GPU, the cpu-* workloads on a CPU."""
    group = "gpu" if device.type == "cuda" else "cpu"
    return [w.name for w in _ALL if w.group == group]


def select(names=None, device: torch.device | None = None) -> list[Workload]:
    """Workloads by name (or group: ``all``, ``gpu``, ``cpu``, or a prefix such as ``W6``),
    in definition order. ``None`` means the device's default sweep."""
    device = device or torch.device("cpu")
    if not names:
        return [WORKLOADS[n] for n in default_names(device)]
    chosen: list[str] = []
    for n in names:
        if n == "all":
            hits = list(WORKLOADS)
        elif n in ("gpu", "cpu"):
            hits = [w.name for w in _ALL if w.group == n]
        elif n in WORKLOADS:
            hits = [n]
        else:
            # "W6" selects W6-1, W6-8 and W6-64
            hits = [w for w in WORKLOADS if w.startswith(n + "-")]
        if not hits:
            raise ValueError(f"unknown workload {n!r}; choose from {', '.join(list(WORKLOADS) + list(GROUPS))}")
        chosen += [h for h in hits if h not in chosen]
    return [w for w in _ALL if w.name in chosen]
