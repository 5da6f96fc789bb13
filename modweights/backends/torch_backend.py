"""The `torch` backend: pure PyTorch, explicit closed-form backward (docs/design.md section 2).

This is the algebra the fused kernels mirror, written in differentiable PyTorch ops so
that double backward works: when a graph is being built (``create_graph=True``) the
backward recomputes ``z`` and ``d`` from the saved inputs instead of using the saved
constants, so every intermediate stays connected to the inputs.

Formulations (chosen by :func:`mod_linear_plan` / :func:`mod_conv2d_plan`, by counting):

``stacked``
    Scale the input by the styles, run one GEMM (conv) against the whole bank viewed as
    ``(K*O, I)``, mix the ``K`` partial outputs with the coefficients, demodulate and add
    the bias in the epilogue. ``K`` times the dense FLOPs, nothing of size ``B x O x I``.
    For ``K = 1`` this is exactly scale-GEMM-scale (StyleGAN2's non-fused path) and costs
    one dense GEMM; the demodulation coefficients come from a small GEMM,
    ``d = rsqrt(a^2 * (s^2 @ (W^2)^T) + eps)``, never from a formed weight. The backward
    costs 2K GEMMs (+ K more to recompute the partial outputs for ``dcoeffs`` when K > 1).

    Linear with demodulation and ``K > 1`` (:mod:`._torch_demod`): the row norms
    ``q[r, o] = sum_i (M_r[o, i] s_r[i])^2`` and the backward's ``ds`` and ``dcoeffs``
    demodulation terms go through the bank's pair products, guarded: rows where the pair sum
    could lose precision (``q < tau * (sum_k |a_k| |W_k s|)^2``) square the *mixed* rows
    ``M_r = sum_k a_rk W_k`` instead (all rows where that is cheaper, or when traced), formed a chunk of
    rows at a time (at most ``DEMOD_CHUNK_ELEMS`` elements, or one ``O x I`` row): an unguarded
    expansion over the pair products ``W_k W_l`` (the first formulation, and what a
    Gram matrix ``a^T W diag(s^2) W^T a`` computes too) cancels catastrophically when the
    experts do (``W`` and ``-W + 1e-3 noise``: 5-10 % error in float32, NaN at 1e-4). The
    ``dW`` term, linear in the mixture, keeps the pairs: ``F_kl = sum_r a_rk a_rl c_r (s_r^2)^T``
    (one GEMM, ``(npairs, O, I)``, ``npairs = K(K+1)/2``) gives ``dW_k -= sum_l W_l * F_kl``.
    Nothing of size ``rows x O x I``; work ``(2K + 8) * Rm * O * I`` elementwise (``Rm`` the
    rows with their own mixture: ``B``, or ``B*T`` with per-token coefficients) + the dense
    GEMMs. Only this case (K > 1 with demodulation) pays for it; the statistics are float32
    for half inputs on every path.
``form``
    Form each sample's mixture ``M_b = sum_k alpha_b[k] W_k`` (``B x O x I``, or per token
    ``B*T x O x I``) and run a batched GEMM (conv2d: one grouped conv over all samples, as
    timm's CondConv does). One dense GEMM of FLOPs plus ``B*K*O*I`` mixing work and the
    ``B x O x I`` memory. Chosen when the rows per sample are many enough that K dense
    GEMMs cost more than the mixing (conv2d: always for K > 1 with demodulation). With
    demodulation and per-token coefficients (linear) it is never chosen: it would hold
    ``B*T x O x I``, the per-row weight this package exists to avoid.

The counting: a GEMM FLOP costs 1, an element of mixing/formed-weight traffic costs
``ELEMENT_COST`` (bandwidth-bound elementwise work runs several times slower per element
than a GEMM FLOP on both CPUs and GPUs). Linear with demodulation and K > 1 counts forward
plus backward (``rows = B*T``, ``G`` the groups of the form path, ``R`` the rows of ``d``,
``sty`` 1 with styles else 0)::

    form    = (3*rows + 2*sty*R) * O*I + ELEMENT_COST * (4K + 14) * G * O*I
              (3 GEMMs of the rows against the formed weights; ~4K+14 passes over G x O x I:
               mixing twice, squaring twice, dM and its correction, mix_t and the inner products)
    stacked = (4K*rows + sty*(npairs + 3)*R) * O*I
              + ELEMENT_COST * (2*npairs*O*I + 2*K*rows*O + (2K + 8)*Rm*O*I)
              (z, dx, dW and the recomputed partials for dcoeffs; the pair GEMM for F and the
               GEMMs against the squared mixed rows; the dW correction; the per-row K-sized
               products; mixing and squaring Rm x O x I twice)

Per sample with many rows the form path wins (``G = B`` is small next to ``rows``); with
one row per sample (decode) or per-token conditioning the stacked path does.

Memory is counted too (:func:`plan_memory`, in elements, the largest temporaries of a forward
plus backward): ``form`` holds a per-sample weight ``G x O x I`` and its gradient ``dM`` (the
same as materialising the weights and one ``bmm``, which holds the weights and their gradient);
``stacked`` holds ``K`` partial outputs per row (``rows x K x O``: forward, the backward's
``gz * a``, the recomputed partials and their product with ``gz``). Where the count of time
picks ``stacked`` but ``stacked`` would hold more than ``form`` (many experts and long rows of
few features), the plan is ``form``: no plan holds more than materialise + ``bmm``. The same
rule holds for conv2d (``grouped`` holds ``B x O x I/g x kh x kw`` filters and their gradient,
``stacked`` ``K`` output maps per sample).

Why form a per-sample weight at all (``form``, ``grouped``): with many rows per sample, ``K``
dense GEMMs cost far more than mixing ``K`` weights once per sample, and the formed weights
are then small next to the activations (docs/design.md section 3).

Under symbolic sizes (torch.export, torch.compile with a dynamic batch or length) and while
torch.jit traces, the plans read the static sizes only (:func:`_known`): the exported graph's
formulation never depends on the traced batch, and a conv forward never takes ``grouped`` (its
group count would be the batch) but ``stacked`` or ``im2col``, counted per sample
(docs/deploy.md lists the rule for each case).

Files, by role: this one (the registry's hooks, the plans, the entry points the glue calls);
:mod:`._torch_mod_linear` and :mod:`._torch_mod_conv2d` (each op's formulations, forward and
backward); :mod:`._torch_demod` (linear demodulation with ``K > 1``); :mod:`._torch_common`
(helpers of both ops); the bias gradients are :func:`modweights._bias.bias_grads`, shared by
every backend.
"""
from __future__ import annotations

import torch

from .. import _switches as switches
from .._checks import ModConv2dConfig, ModLinearConfig, conv2d_out_hw
from . import _torch_mod_conv2d as _conv2d
from . import _torch_mod_linear as _linear
from ._torch_common import _rows

NAME = "torch"
DIRECT = False
DIFFERENTIABLE_BACKWARD = True

#: cost of one element of mixing or of formed-weight memory traffic, in GEMM FLOPs (a CPU or GPU
#: elementwise pass; the Triton layout counts in other units: its FMA_COST, CUDA-core FMAs in tensor-core FLOPs)
ELEMENT_COST = 4


def availability(device: torch.device) -> tuple[bool, str]:
    return True, "pure PyTorch, any device"


def supports(op: str, **problem) -> tuple[bool, str]:
    return True, ""


# ----------------------------------------------------------------------------- plans


def plan_memory(rows: int, groups: int, O: int, I: int, K: int) -> dict[str, int]:
    """Elements of the largest temporaries of a forward plus backward under each linear plan
    (``rows = B*T``; ``groups`` the rows' distinct mixtures): ``form`` the formed weights and
    their gradient, ``stacked`` the per-row partial outputs (see the module docstring). conv2d:
    ``rows`` = samples x output pixels, ``I`` = filter size ``I/g * kh * kw``."""
    return {"form": 2 * groups * O * I, "stacked": 4 * rows * K * O}


def _within_memory(choice: str, rows: int, groups: int, O: int, I: int, K: int, form: str = "form") -> str:
    """``choice``, unless it is ``stacked`` and holds more than the formed-weights plan."""
    mem = plan_memory(rows, groups, O, I, K)
    return form if choice == "stacked" and mem["stacked"] > mem["form"] else choice


def mod_linear_plan(B, T, I, O, K, per_token_coeffs: bool, demodulate: bool, *,
                has_styles: bool = True, per_token_styles: bool = False) -> str:
    """'stacked' or 'form' for a linear problem, by counting (see the module docstring).

    Without demodulation: ``form = rows*O*I + ELEMENT_COST*G*(K+1)*O*I`` against
    ``stacked = K*rows*O*I + ELEMENT_COST*K*rows*O`` (``rows = B*T``; ``G = B``, or ``B*T`` with
    per-token coefficients). With demodulation and ``K > 1``: per-token coefficients always
    take ``stacked`` (the chunked mixed-row demodulation; form would hold ``B*T x O x I``); per
    sample, the forward + backward count of the module docstring, where ``has_styles`` and
    ``per_token_styles`` size the pair GEMMs (``has_styles`` defaults to True, the dearer
    case for ``stacked``). Then memory: never ``stacked`` where it would hold more than
    ``form`` (:func:`plan_memory`). The switch ``torch_plan`` (tests) overrides both for K > 1.
    """
    forced = switches.get("torch_plan")
    if forced is not None and K > 1:
        return "form" if forced in ("form", "grouped") else "stacked"
    if K == 1:
        return "stacked"
    if B is None or T is None:  # a dynamic size (see _known): the rule on static sizes
        if per_token_coeffs:
            return "stacked"
        if demodulate or T is None:
            return "form"
        B = 1  # T static: both counts are linear in B (no demodulation), so count one sample
    rows = B * T
    groups = rows if per_token_coeffs else B
    OI = O * I
    if demodulate:
        if per_token_coeffs:
            return "stacked"
        sty = 1 if has_styles else 0
        R = rows if per_token_styles else B  # rows of d
        npairs = K * (K + 1) // 2
        form = (3 * rows + 2 * sty * R) * OI + ELEMENT_COST * (4 * K + 14) * groups * OI
        Rm = B  # rows with their own mixture (per-token coefficients returned above)
        stacked = ((4 * K * rows + sty * (npairs + 3) * R) * OI
                   + ELEMENT_COST * (2 * npairs * OI + 2 * K * rows * O + (2 * K + 8) * Rm * OI))
        return _within_memory("form" if form <= stacked else "stacked", rows, groups, O, I, K)
    form = rows * OI + ELEMENT_COST * groups * (K + 1) * OI
    stacked = rows * K * OI + ELEMENT_COST * rows * K * O
    return _within_memory("form" if form <= stacked else "stacked", rows, groups, O, I, K)


def mod_conv2d_plan(B, I, O, K, kh, kw, groups, out_pixels, demodulate: bool, *, backward: bool = False) -> str:
    """'stacked' or 'grouped' (form per-sample filters + one grouped conv), by counting.

    ``B`` or ``out_pixels`` None (a dynamic size, see :func:`_known`): never ``grouped`` in the
    forward (a grouped conv has ``B`` groups, which an exported graph would fix): ``stacked`` or
    ``im2col`` (the formed filters ``(B, O, I*kh*kw)`` times the unfolded input, one batched
    GEMM), counted per sample when the output size is static, else ``stacked``; with
    demodulation and ``K > 1``, ``d`` from the squares of the formed mixture. The backward
    (traced by torch.compile with a dynamic batch) keeps ``grouped`` for demodulation with
    ``K > 1``, the one formulation whose backward has that case, else ``stacked``."""
    forced = switches.get("torch_plan")
    if forced is not None and K > 1 and not demodulate:
        return "grouped" if forced in ("form", "grouped") else "stacked"
    if K == 1:
        return "stacked"
    if B is None or out_pixels is None:
        if backward:
            return "grouped" if demodulate else "stacked"
        if out_pixels is None:
            return "stacked"
        # per sample (both counts are linear in B), forward only: K convs against the stacked
        # bank, or one batched GEMM of the formed filters with the unfolded input (unfolding
        # writes I*kh*kw values per output pixel, mixing (K+1) filter-sized passes)
        wsize = O * (I // groups) * kh * kw
        stacked = K * wsize * out_pixels
        im2col = wsize * out_pixels + ELEMENT_COST * (I * kh * kw * out_pixels + (K + 1) * wsize)
        return "im2col" if im2col < stacked else "stacked"
    if demodulate:
        return "grouped"
    wsize = O * (I // groups) * kh * kw
    conv = B * wsize * out_pixels
    # fwd + bwd: the stacked path runs 4 K-wide convs (fwd, dx, dW, recompute for dcoeffs)
    stacked = 4 * K * conv
    grouped = 3 * conv + ELEMENT_COST * 3 * B * (K + 1) * wsize
    return _within_memory("grouped" if grouped <= stacked else "stacked", B * out_pixels, B,
                          O, wsize // O, K, form="grouped")


# ----------------------------------------------------------------------------- entry points
# (the formulations themselves: _torch_mod_linear.py and _torch_mod_conv2d.py)


def _known(*sizes):
    """``sizes`` with None for each one a plan must not read: a symbolic size (torch.export, or
    torch.compile with a dynamic batch or length; comparing two counts of it would guard the
    graph on the traced sizes, e.g. ``7680*B + 384*B*T <= 1920*B*T``), and every batch, length
    and image size while torch.jit traces (its graph, and the ONNX graph made from it, must serve
    every batch). The plans then decide by the static sizes alone."""
    if torch.jit.is_tracing():
        return (None,) * len(sizes)
    if not any(isinstance(v, torch.SymInt) for v in sizes):
        return sizes
    # imported here: symbolic_shapes costs ~0.3 s to import, and tracing has loaded it by now
    from torch.fx.experimental.symbolic_shapes import has_static_value
    return tuple(None if isinstance(v, torch.SymInt) and not has_static_value(v) else v for v in sizes)


def _norm_mod_linear(x, bank, coeffs, styles):
    """Conditioning as rows: a (B, 1|T, K), s (B, 1|T, I); and whether coeffs are per token."""
    a = _rows(coeffs)
    s = _rows(styles)
    per_token = a is not None and a.shape[1] == x.shape[1] and x.shape[1] > 1
    return a, s, per_token


def _mod_linear_plan_for(x, bank, s, K, per_token, cfg: ModLinearConfig):
    B, T = _known(*x.shape[:2])
    return mod_linear_plan(B, T, x.shape[2], bank.shape[1], K, per_token, cfg.demodulate,
                       has_styles=s is not None, per_token_styles=s is not None and s.shape[1] > 1)


def mod_linear_forward(x, bank, coeffs, styles, bias, cfg: ModLinearConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, T, O), d or None)."""
    a, s, per_token = _norm_mod_linear(x, bank, coeffs, styles)
    plan = _mod_linear_plan_for(x, bank, s, bank.shape[0], per_token, cfg)
    y, _, d = _linear.forward(x, bank, a, s, bias, cfg, plan)
    return y, d


def mod_linear_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: ModLinearConfig, needs):
    """(dx, dbank, dcoeffs, dstyles, dbias) under the forward's plan (see
    :func:`._torch_mod_linear.backward`)."""
    a, s, per_token = _norm_mod_linear(x, bank, coeffs, styles)
    plan = _mod_linear_plan_for(x, bank, s, bank.shape[0], per_token, cfg)
    return _linear.backward(g, x, bank, coeffs, styles, a, s, bias, d, y, cfg, needs, plan)


def _conv_plan_for(x, bank, cfg, backward: bool = False):
    B, I, H, W = x.shape
    K, O, Ig, kh, kw = bank.shape
    ho, wo = conv2d_out_hw(H, W, kh, kw, cfg.stride, cfg.padding, cfg.dilation)
    B, px = _known(B, ho * wo)
    return mod_conv2d_plan(B, I, O, K, kh, kw, cfg.groups, px, cfg.demodulate, backward=backward)


def mod_conv2d_forward(x, bank, coeffs, styles, bias, cfg: ModConv2dConfig):
    """Canonical inputs (see ``_checks``) -> (y (B, O, H', W'), d (B|1, O) or None)."""
    y, _, d = _conv2d.forward(x, bank, coeffs, styles, bias, cfg, _conv_plan_for(x, bank, cfg))
    return y, d


def mod_conv2d_backward(g, x, bank, coeffs, styles, bias, d, y, cfg: ModConv2dConfig, needs):
    """Closed-form gradients under the forward's plan; returns (dx, dbank, dcoeffs, dstyles, dbias)."""
    return _conv2d.backward(g, x, bank, coeffs, styles, bias, d, y, cfg, needs, _conv_plan_for(x, bank, cfg, True))
