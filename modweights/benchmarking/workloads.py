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

from .._checks import conv2d_out_hw
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
        c = self.case
        small = dataclasses.replace(
            c, B=min(c.B, 2), T=min(c.T, 8), I=min(c.I, 16), O=min(c.O, 16),
            H=min(c.H, 8) if c.op == "mod_conv2d" else c.H, W=min(c.W, 8) if c.op == "mod_conv2d" else c.W,
        )
        return dataclasses.replace(self, name=self.name, case=small)


def out_hw(case: Case) -> tuple[int, int]:
    """Output spatial size of a conv2d case (as :func:`torch.nn.functional.conv2d`)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return conv2d_out_hw(case.H, case.W, *case.kernel, pair(case.conv.get("stride", 1)),
                         pair(case.conv.get("padding", 0)), pair(case.conv.get("dilation", 1)))


def dense_flops(case: Case) -> int:
    """FLOPs of the dense op of the same shape, forward only (fwd+bwd is 3x this)."""
    if case.op == "mod_linear":
        return 2 * case.B * max(case.T, 1) * case.O * case.I
    g = case.conv.get("groups", 1)
    ho, wo = out_hw(case)
    kh, kw = case.kernel
    return 2 * case.B * case.O * (case.I // g) * kh * kw * ho * wo


def forward_bytes(case: Case, itemsize: int) -> int:
    """The least memory traffic of one forward: the whole bank once, the input and the output
    once, the conditioning once. The decode workloads (W6) are bound by it."""
    rows = case.B * max(case.T, 1)
    cond = 0
    if case.coeffs != "none":
        cond += (rows if case.coeffs == "token" else case.B) * case.K
    if case.styles != "none":
        cond += (rows if case.styles == "token" else case.B) * case.I
    if case.op == "mod_linear":
        return itemsize * (case.K * case.O * case.I + rows * (case.I + case.O) + cond)
    g = case.conv.get("groups", 1)
    kh, kw = case.kernel
    ho, wo = out_hw(case)
    return itemsize * (case.K * case.O * (case.I // g) * kh * kw + case.B * (case.I * case.H * case.W
                                                                            + case.O * ho * wo) + cond)


def shape_str(case: Case) -> str:
    """A compact, human-readable shape, e.g. ``B16xT256 512->512 K4 mix/sample``."""
    cond = []
    if case.coeffs != "none":
        cond.append(f"mix/{case.coeffs}")
    if case.styles != "none":
        cond.append(f"mod/{case.styles}")
    if case.demodulate:
        cond.append("demod")
    cond = " ".join(cond) or "plain"
    if case.op == "mod_linear":
        rows = f"B{case.B}xT{case.T}" if case.T else f"B{case.B}"
        return f"{rows} {case.I}->{case.O} K{case.K} {cond}"
    kh, kw = case.kernel
    extra = "".join(f" {k}={v}" for k, v in sorted(case.conv.items()))
    return f"B{case.B} {case.I}->{case.O} {kh}x{kw} {case.H}x{case.W}{extra} K{case.K} {cond}"


def _lin(B, T, I, O, K, **kw):
    return Case("mod_linear", B=B, T=T, I=I, O=O, K=K, **kw)


def _conv(B, I, O, K, H, W, **kw):
    return Case("mod_conv2d", B=B, I=I, O=O, K=K, H=H, W=W, kernel=(3, 3), conv={"padding": 1}, **kw)


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
