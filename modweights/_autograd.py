"""The autograd glue shared by every non-reference backend (written once).

A backend supplies ``<op>_forward(x, bank, coeffs, styles, bias, cfg) -> (y, d)`` and
``<op>_backward(g, x, bank, coeffs, styles, bias, d, y, cfg, needs) -> 5 grads``. The
Function saves the inputs, the demodulation coefficients ``d`` (``(B, O)``-sized), and,
with demodulation only, the output ``y`` (from which the backward recovers the
pre-demodulation output ``z = (y - bias) / d`` for ``dd = sum_t g * z``). Never a
per-sample weight.

Double backward: when a graph is being built (``create_graph=True``), the backward runs
with grad mode on. Then a backend whose backward is not differentiable (fused kernels)
hands over to the `torch` backend's backward, which is written in differentiable ops and
recomputes ``z`` and ``d`` from the inputs.
"""
from __future__ import annotations

import functools

import torch

from . import backends
from ._checks import Conv2dConfig, LinearConfig


@functools.lru_cache(maxsize=None)
def function_for(op: str, backend_name: str, cfg) -> type[torch.autograd.Function]:
    """One autograd.Function class per (op, backend, config); only tensors go through apply."""
    impl = backends.load(backend_name)
    fwd = getattr(impl, f"{op}_forward")
    bwd = getattr(impl, f"{op}_backward")
    fallback_bwd = getattr(backends.load("torch"), f"{op}_backward")
    differentiable = getattr(impl, "DIFFERENTIABLE_BACKWARD", False)

    class ModGemm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bank, coeffs, styles, bias):
            y, d = fwd(x, bank, coeffs, styles, bias, cfg)
            ctx.save_for_backward(x, bank, coeffs, styles, bias, d, y if cfg.demodulate else None)
            return y

        @staticmethod
        def backward(ctx, g):
            x, bank, coeffs, styles, bias, d, y = ctx.saved_tensors
            use = bwd
            if torch.is_grad_enabled() and not differentiable:
                use = fallback_bwd  # create_graph=True: the differentiable composite
            grads = use(g, x, bank, coeffs, styles, bias, d, y, cfg, ctx.needs_input_grad[:5])
            return tuple(grads)

    ModGemm.__name__ = ModGemm.__qualname__ = f"ModGemm_{op}_{backend_name}"
    return ModGemm


def run(op: str, impl, x, bank, coeffs, styles, bias, cfg):
    """Run ``op`` on backend module ``impl`` with canonical, checked inputs."""
    if getattr(impl, "DIRECT", False):
        return getattr(impl, op)(x, bank, coeffs, styles, bias, cfg)
    return function_for(op, impl.NAME, cfg).apply(x, bank, coeffs, styles, bias)


__all__ = ["function_for", "run", "LinearConfig", "Conv2dConfig"]
