"""Linear layers: ModulatedLinear (StyleGAN2-style) and MixtureLinear (CondConv / SMEAR)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import functional as MF
from .._checks import check_flag, check_layer_tensor, check_routing_mode
from ._args import layer_args
from ._routing import STATEFUL_MODES, masked_mean, prefix_mean_input, segment_chunks
from ._init import init_bank_, modulated_params_, reset_modulated_
from ._layer import LayerMixin, leaf_forward
from .routers import Router


class ModulatedLinear(LayerMixin, nn.Module):
    """Linear layer modulated by a latent: ``y = d * ((W * s) @ x) + bias``, ``s = affine(w)``.

    Args:
        in_features: I. out_features: O. style_features: size of the latent ``w``.
        demodulate: normalise each output row of ``W * s`` (StyleGAN2).
        bias: learn an ``(O,)`` bias. eps: added inside the demodulation's rsqrt (finite, >= 0).
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, T, I) or (B, I), w (B, style_features)) -> (B, T, O) or (B, O)``;
    unbatched, as ``nn.Linear``: ``x (I,)`` with ``w (style_features,)`` -> ``(O,)``.
    The affine's bias starts at 1, so the layer starts as the plain linear (as StyleGAN2).
    """

    def __init__(self, in_features: int, out_features: int, style_features: int, *, demodulate: bool = True,
                 bias: bool = True, eps: float = 1e-8, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        layer_args("ModulatedLinear", backend=backend, eps=eps, demodulate=demodulate)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.style_features = in_features, out_features, style_features
        self.demodulate, self.eps, self.backend = demodulate, eps, backend
        modulated_params_(self, (out_features, in_features), in_features, style_features, bias, factory)

    def reset_parameters(self) -> None:
        """Re-initialise as at construction (the same draws under the same seed): weight and
        bias as ``nn.Linear``'s, the style affine as ``nn.Linear``'s with its bias at 1."""
        reset_modulated_(self)

    @leaf_forward
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        I = self.in_features
        check_layer_tensor(self._label(), "x", x, (1, 2, 3), -1, I,
                           lambda: f"(B, T, {I}), (B, {I}) or ({I},) (in_features = {I})")
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
        w = self._check_cond("w", w, self.style_features, "style_features", x.shape[0], unbatched)
        y = MF.modulated_linear(x, self.weight, self.affine(w), demodulate=self.demodulate, bias=self.bias,
                                eps=self.eps, backend=self.backend)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"style_features={self.style_features}, demodulate={self.demodulate}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class MixtureLinear(LayerMixin, nn.Module):
    """Linear layer whose weight is a mixture of K experts chosen by a router.

    ``y = (sum_k alpha_k W_k) @ x + sum_k alpha_k b_k``, ``alpha = router(...)``.

    Args:
        in_features: I. out_features: O. num_experts: K.
        routing_features: size of ``cond`` when it is given to ``forward``; default I.
        routing_mode: what the router reads when ``forward`` gets neither ``cond`` nor
            ``coeffs`` (docs/sequence-models.md): ``"token"`` (default: each token on itself,
            ``alpha (B, T, K)``; causal, padding- and batch-independent in any model),
            ``"cond"`` (``cond`` is required), ``"prefix_mean"`` (token ``t`` on the mean of
            tokens ``0..t``: causal), ``"segment"`` (segment ``s`` of ``segment_length`` tokens on
            the mean of segment ``s - 1``, the first on a zero input: causal, weights mixed once
            per segment), ``"noncausal_unpadded_mean"`` (each sample on the mean of all its
            tokens: only for unpadded, batch-first, non-causal models).
        segment_length: tokens per segment, for ``routing_mode="segment"`` (required there).
        per_token: deprecated; ``True`` is ``routing_mode="token"``, ``False``
            ``routing_mode="noncausal_unpadded_mean"`` (the old per-sample mean).
        routing: ``"softmax"`` or ``"sigmoid"``. temperature: divides the router logits.
        bias: a per-expert ``(K, O)`` bias, mixed like the weights.
        backend: a backend name, or None (follow the context). device, dtype: of the
            parameters, as for ``torch.nn`` layers.

    Shapes: ``forward(x (B, T, I) or (B, I), cond=None, *, coeffs=None) -> (B, T, O) or (B, O)``.
    ``cond`` is the router's input, ``(B, routing_features)`` (one mix per sample) or
    ``(B, T, routing_features)`` (per token); ``coeffs`` are the mixing coefficients
    themselves, ``(B, K)`` or ``(B, T, K)``, bypassing the router. Giving both is an error.
    A 2-D ``x`` is one token per sample.
    """

    _mw_stream = None  # the running state inside modweights.nn.decoding() (prefix_mean / segment)

    def __init__(self, in_features: int, out_features: int, num_experts: int, *, routing_features: int | None = None,
                 routing_mode: str | None = None, segment_length: int | None = None, per_token: bool | None = None,
                 routing: str = "softmax", temperature: float = 1.0, bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MixtureLinear: `num_experts` must be >= 1; got {num_experts}")
        layer_args("MixtureLinear", backend=backend)
        if per_token is not None:
            if routing_mode is not None:
                raise ValueError("MixtureLinear: give `routing_mode` only (`per_token` is its deprecated alias)")
            check_flag("MixtureLinear", "per_token", per_token)
            warnings.warn("MixtureLinear: `per_token` is deprecated; use routing_mode='token' (per_token=True) or "
                          "routing_mode='noncausal_unpadded_mean' (per_token=False)", DeprecationWarning, stacklevel=2)
            routing_mode = "token" if per_token else "noncausal_unpadded_mean"
        self.routing_mode, self.segment_length = check_routing_mode("MixtureLinear", routing_mode or "token",
                                                                    segment_length)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **factory)) if bias else None
        init_bank_(self.weight, self.bias)  # then the router: the draws of reset_parameters
        self.router = Router(routing_features or in_features, num_experts, routing, temperature, **factory)

    def reset_parameters(self) -> None:
        """Re-initialise as at construction (the same draws under the same seed): every expert
        as ``nn.Linear``'s weight and bias, the router as ``nn.Linear``."""
        init_bank_(self.weight, self.bias)
        self.router.reset_parameters()

    def __setstate__(self, state: dict) -> None:
        # a layer pickled before routing_mode existed kept `per_token` (False: the token mean)
        if "routing_mode" not in state:
            state["routing_mode"] = "token" if state.pop("per_token", False) else "noncausal_unpadded_mean"
            state.setdefault("segment_length", None)
        super().__setstate__(state)

    @property
    def per_token(self) -> bool:
        """Deprecated: whether ``routing_mode`` is ``"token"``."""
        return self.routing_mode == "token"

    def _input_router(self, x: torch.Tensor) -> None:
        if self.routing_mode == "cond":
            raise ValueError(f"MixtureLinear: routing_mode='cond' needs `cond` (B, {self.router.fc.in_features}) "
                             "or `coeffs`; got neither")
        if self.router.fc.in_features != x.shape[-1]:
            raise ValueError(f"MixtureLinear: routing_mode={self.routing_mode!r} routes on the input, but the router "
                             f"reads routing_features={self.router.fc.in_features} != in_features={x.shape[-1]}; "
                             "pass `cond` or `coeffs`")

    def coefficients(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The mixing coefficients the layer would use: ``(B, K)`` (``cond`` ``(B, F)``,
        ``"noncausal_unpadded_mean"``, or a 2-D ``x``) or ``(B, T, K)`` (the other modes;
        ``"segment"``'s expanded to its tokens). Inside :func:`decoding` this advances the state."""
        if cond is not None:
            return self.router(cond)
        self._input_router(x)
        if self.routing_mode == "token" or x.dim() == 2 and self.routing_mode not in STATEFUL_MODES:
            return self.router(x)  # a 2-D x is one token per sample: nothing to pool
        if self.routing_mode == "noncausal_unpadded_mean":
            return self.router(masked_mean(x))  # zeros for T = 0, not NaN
        x3 = x.unsqueeze(1) if x.dim() == 2 else x
        stream = self._stream(x3)
        if self.routing_mode == "prefix_mean":
            a = self.router(prefix_mean_input(x3, stream))
        else:
            a = torch.cat([c.unsqueeze(1).expand(-1, stop - start, -1)
                           for start, stop, c in segment_chunks(x3, self.segment_length, self.router, stream)], 1)
        return a.squeeze(1) if x.dim() == 2 else a

    def _stream(self, x3: torch.Tensor):
        if self._mw_stream is not None:
            self._mw_stream.check_batch(x3.shape[0], "MixtureLinear")
        return self._mw_stream

    @leaf_forward
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                coeffs: torch.Tensor | None = None) -> torch.Tensor:
        self._cond_or_coeffs(cond, coeffs)
        I = self.in_features
        check_layer_tensor(self._label(), "x", x, (1, 2, 3), -1, I,
                           lambda: f"(B, T, {I}), (B, {I}) or ({I},) (in_features = {I})")
        if x.dim() == 1:  # unbatched, as nn.Linear: one sample of one token
            one = [None if t is None else (t.unsqueeze(0) if t.dim() == 1 else t) for t in (cond, coeffs)]
            return self.forward(x.unsqueeze(0), one[0], coeffs=one[1]).squeeze(0)
        self._check_routing_input("cond", cond, self.router.fc.in_features, "routing_features", x)
        self._check_routing_input("coeffs", coeffs, self.num_experts, "num_experts", x)
        if coeffs is None and cond is None and self.routing_mode == "segment" and x.dim() == 3:
            return self._segment_forward(x)
        return self._mix(x, self.coefficients(x, cond) if coeffs is None else coeffs)

    def _check_routing_input(self, name: str, t, size: int, what: str, x: torch.Tensor) -> None:
        """``cond`` / ``coeffs``: ``(B, size)`` (one mix per sample) or, for a 3-D ``x``,
        ``(B, T, size)`` (per token), with ``x``'s ``B`` (and ``T``)."""
        if t is None:
            return
        B = x.shape[0]
        ndims = (2, 3) if x.dim() == 3 else (2,)

        def expected():
            per_token = f" or (B, T, {size}) = ({B}, {x.shape[1]}, {size})" if x.dim() == 3 else ""
            return f"(B, {size}) = ({B}, {size}){per_token} ({what} = {size})"

        check_layer_tensor(self._label(), name, t, ndims, -1, size, expected, batch=B)
        if t.dim() == 3 and t.shape[1] != x.shape[1]:
            raise ValueError(f"{self._label()}: `{name}` must have shape {expected()}; got {tuple(t.shape)}")

    def _segment_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the weights once per segment: the whole segments in one per-sample call on
        ``x`` viewed as ``(B * segments, segment_length, I)``, a partial first or last one
        (a stream resuming mid-segment, ``T`` not a multiple) in a call of its own."""
        self._input_router(x)
        chunks = segment_chunks(x, self.segment_length, self.router, self._stream(x))
        B, L = x.shape[0], self.segment_length
        groups, whole = [], []
        for chunk in chunks + [None]:
            if chunk is not None and chunk[1] - chunk[0] == L:
                whole.append(chunk)
                continue
            if whole:  # consecutive whole segments: one call
                n = len(whole)
                xs = x[:, whole[0][0]:whole[-1][1]].reshape(B * n, L, x.shape[-1])
                a = torch.stack([c for _, _, c in whole], 1).reshape(B * n, -1)
                groups.append(self._mix(xs, a).reshape(B, n * L, -1))
                whole = []
            if chunk is not None:
                groups.append(self._mix(x[:, chunk[0]:chunk[1]], chunk[2]))
        return groups[0] if len(groups) == 1 else torch.cat(groups, 1)

    def _mix(self, x, coeffs):
        return MF.mixture_linear(x, self.weight, coeffs, bias=self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        seg = f", segment_length={self.segment_length}" if self.routing_mode == "segment" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, routing_mode={self.routing_mode!r}{seg}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")
