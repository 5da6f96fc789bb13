"""How a :class:`~modweights.nn.MixtureLinear` turns a sequence into mixing coefficients when it
is not given ``cond`` or ``coeffs``: its routing mode (docs/sequence-models.md says which to use).

``"token"``
    each token ``x[b, t]`` is routed on itself: coefficients ``(B, T, K)``. Position ``t``
    reads only token ``t``, so the layer is causal, padding cannot reach real tokens and
    samples never meet, whatever the model around it. The safe default.
``"cond"``
    per sample from ``cond (B, routing_features)``, which the caller must give (SMEAR with a
    pooled representation the caller computes, mask-aware: :func:`masked_mean`).
``"prefix_mean"``
    causal per sample: token ``t`` is routed on the mean of tokens ``0..t`` of its sample
    (coefficients ``(B, T, K)``).
``"segment"``
    causal per segment (after Lory, Zhong et al. 2024): the sequence is cut into segments of
    ``segment_length`` tokens; segment ``s`` is mixed by the router applied to the mean of
    segment ``s - 1``. The first segment has no predecessor: it is mixed by the router at a
    zero input (its bias, a learned input-independent mix), so it reads no token at all. The
    weights are mixed once per segment (see :func:`segment_chunks`).
``"noncausal_unpadded_mean"``
    per sample on the mean over all its tokens (the CondConv / SMEAR pooling). It assumes what
    its name says: every token may see every other (not a decoder), there is no padding, and
    dimension 0 is the sample. Use it for unpadded batch-first encoders only.

Incremental decoding (a KV cache feeds one new token per call): ``"prefix_mean"`` and
``"segment"`` need the tokens before the call. :func:`decoding` gives each layer a running
state for that; without it every call is a new sequence.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

ROUTING_MODES = ("token", "cond", "prefix_mean", "segment", "noncausal_unpadded_mean")
#: the modes whose coefficients at a position depend on earlier tokens (they need :func:`decoding`)
STATEFUL_MODES = ("prefix_mean", "segment")

__all__ = ["ROUTING_MODES", "STATEFUL_MODES", "masked_mean", "decoding", "segment_chunks", "prefix_mean_input"]


class _Stream:
    """The running state of one layer inside :func:`decoding`: tokens seen ``n``, and the sum
    of the tokens of the prefix (``prefix_mean``) or of the unfinished segment (``segment``),
    and the mean of the last finished segment."""

    def __init__(self):
        self.n, self.sum, self.prev = 0, None, None

    def check_batch(self, B: int, name: str) -> None:
        for t in (self.sum, self.prev):
            if t is not None and t.shape[0] != B:
                raise ValueError(f"{name}: the batch size changed from {t.shape[0]} to {B} inside "
                                 "modweights.convert.decoding(); the running routing state is per sample "
                                 "(beam search, which reorders and expands samples, is not supported)")


@contextlib.contextmanager
def decoding(model: nn.Module):
    """Keep a running routing state in every ``"prefix_mean"`` / ``"segment"`` mixture layer of
    ``model`` for the calls inside the block, so that a call continues the sequence of the
    previous calls (a KV-cached decoder: the prompt, then one token per call)::

        with modweights.convert.decoding(model):
            out = model.generate(ids, max_new_tokens=20)   # or a manual loop with past_key_values

    Each block starts new sequences (the state is fresh at entry and dropped at exit). Layers
    in the other modes need no state and are left alone.
    """
    from .linear import MixtureLinear

    layers = [m for m in model.modules() if isinstance(m, MixtureLinear) and m.routing_mode in STATEFUL_MODES]
    old = [m._mw_stream for m in layers]
    for m in layers:
        m._mw_stream = _Stream()
    try:
        yield model
    finally:
        for m, o in zip(layers, old):
            m._mw_stream = o


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the tokens of each sample that ``mask`` marks as real: the pooled
    representation to route on with ``cond`` / :func:`modweights.convert.condition`
    (padding then reaches no real token's output).

    Args:
        x: ``(B, T, F)`` (batch-first).
        mask: ``(B, T)``, true / nonzero for real tokens (an HF ``attention_mask``); ``None``:
            every token is real. A sample with no real token pools to zeros.

    Returns:
        ``(B, F)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"masked_mean: `x` must be a (B, T, F) tensor; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if mask is None:
        # T = 0: zeros like a fully masked sample, not the NaN of a mean of nothing (a router
        # would turn it into NaN coefficients, and 0 * NaN into NaN gradients of every parameter)
        return x.mean(1) if x.shape[1] > 0 else x.sum(1)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"masked_mean: `mask` must be a (B, T) = {tuple(x.shape[:2])} tensor; got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    m = (mask != 0).to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def prefix_mean_input(x: torch.Tensor, stream: _Stream | None) -> torch.Tensor:
    """``(B, T, I)`` -> ``(B, T, I)``: at ``t`` the mean of the sample's tokens up to ``t``
    (those of earlier calls included when ``stream`` carries them; the stream is advanced)."""
    csum = x.cumsum(1)
    n0 = 0
    if stream is not None:
        if stream.sum is not None:
            csum = csum + stream.sum.unsqueeze(1)
        n0 = stream.n
        if x.shape[1]:  # an empty call leaves the state as it was
            stream.sum, stream.n = csum[:, -1], n0 + x.shape[1]
    count = torch.arange(n0 + 1, n0 + x.shape[1] + 1, device=x.device, dtype=x.dtype)
    return csum / count.view(1, -1, 1)


def segment_chunks(x: torch.Tensor, length: int, router: nn.Module, stream: _Stream | None) -> list:
    """Cut ``x (B, T, I)`` at the segment boundaries into ``(start, stop, coeffs (B, K))``:
    the chunk's tokens all belong to one segment, mixed by ``router`` on the previous
    segment's mean (the first segment by ``router`` at zero). With ``stream`` the positions
    continue the earlier calls' and the stream is advanced.

    Count: ceil(T / length) chunks (plus one when a stream resumes mid-segment; one empty chunk
    for T = 0, so that the layer's output and gradients keep their shapes), so a layer
    mixes ``B * chunks`` weight matrices, not ``B * T`` as per-token coefficients would.
    """
    st = stream if stream is not None else _Stream()
    B, T, _ = x.shape
    if T == 0:  # no token: one empty chunk, routed as the next token would be; the stream unchanged
        return [(0, 0, router(st.prev if st.prev is not None else x.new_zeros(B, x.shape[-1])))]
    chunks, t = [], 0
    while t < T:
        L = min(length - st.n % length, T - t)
        prev = st.prev if st.prev is not None else x.new_zeros(B, x.shape[-1])
        chunks.append((t, t + L, router(prev)))
        part = x[:, t:t + L].sum(1)
        st.sum = part if st.sum is None else st.sum + part
        st.n += L
        if st.n % length == 0:  # the segment is finished: the next one routes on its mean
            st.prev, st.sum = st.sum / length, None
        t += L
    return chunks
