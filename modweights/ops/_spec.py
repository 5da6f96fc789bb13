"""The base of every op spec (see :mod:`modweights.ops`)."""
from __future__ import annotations

import math


class OpSpec:
    """What the shared machinery needs to know about one op.

    Attributes:
        name: the op's name (``modweights.functional.<name>``; backends implement
            ``<name>_forward`` / ``<name>_backward`` unless the op ``lowers_to`` another).
        config: the frozen dataclass of the op's non-tensor arguments (keys the Function cache).
        schema_extra: the custom-op schema's arguments after ``demodulate, eps``.
        lowers_to: the op this one runs as, or None for an op the backends implement.
        wrappers: ``(modulated, mixture)`` public wrapper names, or None where there is none.
        triton_launcher: the module of ``triton_kernels`` holding the op's Triton host
            launchers, ``forward(x, bank, coeffs, styles, bias, demodulate, eps, *extra)`` and
            ``backward(g, x, bank, coeffs, styles, bias, d, y, demodulate, eps, *extra, needs)``
            (``extra``: :meth:`launcher_args`); importing it registers the op's kernels with the
            one launch path (``triton_kernels/_launch.py``). None for an op that lowers to another.
    """

    name: str = ""
    config: type = object
    schema_extra: str = ""
    lowers_to: str | None = None
    wrappers: tuple[str | None, str | None] = (None, None)
    triton_launcher: str | None = None

    @property
    def runs_as(self) -> str:
        """The op a backend is asked to run (``supports``, ``auto``): this one, or the one it lowers to."""
        return self.lowers_to or self.name

    # ------------------------------------------------------------------ autograd glue
    def cfg_args(self, cfg) -> tuple:
        """The custom-op schema's non-tensor arguments for ``cfg``."""
        return (cfg.demodulate, cfg.eps)

    def triton_module(self):
        """The imported :attr:`triton_launcher` module (ImportError without Triton)."""
        import importlib
        return importlib.import_module(f"..triton_kernels.{self.triton_launcher}", __package__)

    def launcher_args(self, case) -> tuple:
        """The non-tensor arguments after ``demodulate, eps`` that ``case`` passes to the op's
        launchers (its Triton ``forward`` / ``backward``)."""
        return ()

    def cfg_from_args(self, args):
        """Rebuild the config from the schema's non-tensor arguments (inverse of :meth:`cfg_args`)."""
        demod, eps = args[:2]
        return self.config(bool(demod), float(eps))

    def is_empty(self, x) -> bool:
        """Whether the output on canonical ``x`` has no element (``B = 0``; the checks keep the
        other output sizes >= 1 unless the op says otherwise)."""
        return x.shape[0] == 0

    def bias_view(self, b):
        """``b`` (``(O,)``, or mixed: ``(B, O)`` / ``(B, T, O)``) broadcastable to the canonical output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ auto's measured table
    #: the shape classes of the op (docs/design.md section 4), in the order :meth:`auto_class` tests them
    auto_classes: tuple[str, ...] = ("per-sample",)

    def auto_class(self, problem: dict) -> str | None:
        """The shape class of a call from the keywords the registry receives, or None when
        they do not say enough (see :func:`modweights.backends.auto_table.shape_class`)."""
        return self.auto_classes[0]

    # ------------------------------------------------------------------ test cases (modweights.testing)
    def cases(self) -> list:
        """Every mode of the op at small odd sizes (:class:`modweights.testing.Case` objects)."""
        raise NotImplementedError

    def canonical_case(self, case):
        """``case`` as the backends receive it (what :mod:`modweights._checks` hands them)."""
        return case

    def case_shape(self, case) -> str:
        """The shape part of a case id."""
        raise NotImplementedError

    def make_x_bank(self, case, rnd) -> tuple:
        """``(x, bank, rows)``: the random input and bank of ``case`` (``rnd(*shape, scale=)``),
        and the leading dims a per-token conditioning tensor has."""
        raise NotImplementedError

    def public_ops(self, case) -> list[str]:
        """The public ops that can express ``case``: the general op, then the named wrappers."""
        modulated, mixture = self.wrappers
        ops = [self.name]
        if (modulated and case.K == 1 and case.coeffs == "none" and case.styles != "none" and case.bias != "bank"
                and case.conv.get("groups", 1) == 1):
            ops.append(modulated)
        if mixture and case.coeffs != "none" and case.styles == "none" and not case.demodulate:
            ops.append(mixture)
        return ops

    def call(self, case, t: dict, backend: str, api: str):
        """Run ``case`` with tensors ``t`` through the public op ``api`` (one of :meth:`public_ops`):
        the general op, or a wrapper (the modulated one takes the single weight ``bank[0]``)."""
        from .. import functional as MF
        modulated, mixture = self.wrappers
        conv = dict(case.conv)  # the conv geometry as keywords (none for linear)
        if api == modulated:
            conv.pop("groups", None)
            return getattr(MF, api)(t["x"], t["bank"][0], t["styles"], demodulate=case.demodulate, bias=t["bias"],
                                    backend=backend, **conv)
        if api == mixture:
            return getattr(MF, api)(t["x"], t["bank"], t["coeffs"], bias=t["bias"], backend=backend, **conv)
        return getattr(MF, self.name)(t["x"], t["bank"], t["coeffs"], t["styles"], demodulate=case.demodulate,
                                      bias=t["bias"], backend=backend, **conv)

    def problem_kwargs(self, case, dtype) -> dict:
        """The keywords :mod:`modweights.functional` passes to a backend's ``supports``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ benchmarks
    def dense_flops(self, case) -> int:
        """FLOPs of the dense op of the same shape, forward only."""
        raise NotImplementedError

    def dense(self, case, x, w):
        """The dense op of the same shape (``torch.nn.functional``) on ``x`` and one weight ``w``."""
        raise NotImplementedError

    def formed_weight_elems(self, case) -> int:
        """Elements of the per-sample weights the ``reference`` backend forms for ``case``."""
        return case.B * case.O * (case.I // case.conv.get("groups", 1)) * math.prod(case.kernel)

    def weight_io_elems(self, case) -> int:
        """Elements of the least forward traffic besides the conditioning: bank, input, output."""
        raise NotImplementedError

    def shape_str(self, case, cond: str) -> str:
        """A compact, human-readable shape (``cond``: the conditioning words)."""
        raise NotImplementedError

    def tiny(self, case):
        """``case`` at CI-smoke sizes (same mode)."""
        raise NotImplementedError

    def aot_test_cases(self) -> list:
        """The GPU tests' large shapes of the op (odd sizes, tails in every dimension, bias modes):
        the AOT report compiles their default configs (``modweights.aot.test_problems``)."""
        raise NotImplementedError

    def sanitizer_cases(self, dry: bool) -> list:
        """The GPU check's compute-sanitizer cases of the op's kernels (``gpu_check small-cases``):
        tails in every dimension, every conditioning mode, sized for the GPU tiles; tiny for
        ``dry`` runs."""
        raise NotImplementedError

    def sweep_cases(self, dry: bool) -> list:
        """``(label, case, force_mix_b)`` the kernel sweep (``modweights.benchmarking.kernel_sweep``)
        runs every tuned kernel config of the op on: GPU shapes crossing the largest tiles of every
        list (rows / pixels per sample > 256, channels > 256 with tails), tiny ones for ``dry``
        runs; ``force_mix_b`` the mixing layout to force (None: the count decides)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Triton kernel counts
    # (modweights.aot.counts) on the case the kernels run (:meth:`canonical_case`), for an op with
    # a ``triton_launcher``
    def gemm_dims(self, case) -> tuple[int, int, int]:
        """``(M, N, K)`` of the dense op of the same shape as one GEMM (an implicit GEMM for a conv)."""
        raise NotImplementedError

    def kernel_work(self, case, launch) -> tuple[float, float, str]:
        """(tensor-core FLOPs, CUDA-core FMAs, why these tiles) of one recorded launch
        (:class:`triton_kernels._record.Launch`) at its default tiles."""
        raise NotImplementedError

    def kernel_operand_bytes(self, case, launch, eb: int = 2) -> float:
        """Operand bytes the launch's programs load at its default tiles (each program its A and
        B tiles over the whole reduction; 0 for a kernel that is not GEMM-like)."""
        raise NotImplementedError
