"""What :func:`modweights.convert.convert` builds: the converted layer for one ``nn.Linear`` /
``nn.Conv2d`` / GPT-2 ``Conv1D`` (equal to it at conversion), what it routes on and why, and the
report of a conversion."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._convert_hf import linear_weight
from ._converted import (ConvertedMixtureConv2d, ConvertedMixtureLinear, ConvertedModulatedConv2d,
                         ConvertedModulatedLinear)
from .nn._args import same_padding_pairs

__all__ = ["Replacement", "ConversionReport", "build", "routing_of"]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@dataclass
class Replacement:
    """One replaced module."""

    name: str
    old_type: str
    new_type: str
    old_params: int
    new_params: int
    #: what the router reads (a mixture linear's routing_mode, "pooled input" or "latent") and why
    routing: str = ""
    why: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert` replaced, and what it left alone (with the reason)."""

    to: str
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, reason)
    #: what convert changed besides the replaced modules, and why (e.g. a fused fast path turned off)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.replaced]

    @property
    def old_params(self) -> int:
        return sum(r.old_params for r in self.replaced)

    @property
    def new_params(self) -> int:
        return sum(r.new_params for r in self.replaced)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"converted {len(self.replaced)} module(s) to {self.to!r}: "
                 f"{self.old_params:,} -> {self.new_params:,} parameters"]
        w = max([len(r.name) for r in self.replaced] + [4])
        whys: dict[str, str] = {}  # each reason once, after the table
        for r in self.replaced:
            ref = whys.setdefault(f"{r.routing}: {r.why}", f"[{len(whys) + 1}]")
            lines.append(f"  {r.name:<{w}}  {r.old_type} -> {r.new_type}  {r.old_params:,} -> {r.new_params:,}"
                         f"  routing={r.routing} {ref}")
        lines += [f"  {ref} routing={why}" for why, ref in whys.items()]
        for name, typ, why in self.skipped:
            lines.append(f"  skipped {name} ({typ}): {why}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _conv_padding(conv: nn.Conv2d):
    """(padding for the op, pre-pad for F.pad or None, F.pad mode) reproducing ``conv``."""
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pairs = [(0, 0), (0, 0)]
        else:  # 'same' (stride 1, which nn.Conv2d enforces): the extra pixel goes right/bottom
            pairs = same_padding_pairs((kh, kw), conv.dilation)
    else:
        pairs = [(p, p) for p in conv.padding]
    mode = _PAD_MODES.get(conv.padding_mode)
    if mode is None:
        raise ValueError(f"convert: cannot reproduce padding_mode={conv.padding_mode!r}")
    if conv.padding_mode == "zeros" and all(a == b for a, b in pairs):
        return (pairs[0][0], pairs[1][0]), None, mode
    (top, bottom), (left, right) = pairs
    return (0, 0), (left, right, top, bottom), mode


def routing_of(new, to, why: str, container: str | None) -> tuple[str, str]:
    """(what the converted layer routes on, why) for the report; ``why`` the reason for a
    mixture linear's mode when convert did not pick it by default ("" when it did)."""
    if isinstance(new, ConvertedMixtureConv2d):
        mode, why = ("cond", "the latent from condition()") if new.reads_latent else (
            "pooled input", "per sample on the average-pooled image (no token order in a conv)")
    elif to == "modulated":
        mode, why = "latent", "styles from the latent given by condition()"
    elif new.routing_mode == "cond":
        mode, why = "cond", f"per sample on the latent from condition() (style_features={new.style_features})"
    else:
        mode = new.routing_mode
        why = why or ("the default: each token on itself, safe in any model (causal, padding- and "
                      "batch-independent); convert cannot tell whether the model is causal or padded")
        if mode == "noncausal_unpadded_mean":
            why += "; assumes every token may see every other and no padding"
    if container is not None and hasattr(new, "sample_dim"):
        new.sample_dim = 1
        why += f"; time-major ({container} has batch_first=False): sample dimension 1"
    return mode, why


def build(name, old, to, K, style_features, backend, routing_mode, segment_length):
    """The converted module for ``old``, equal to it at conversion."""
    w = linear_weight(old) if not isinstance(old, nn.Conv2d) else old.weight
    has_bias = old.bias is not None
    with torch.device(w.device):
        if not isinstance(old, nn.Conv2d):  # nn.Linear or Conv1D
            O, I = w.shape
            if to == "mixture":
                new = ConvertedMixtureLinear(I, O, K, style_features=style_features, routing="softmax",
                                             routing_mode=routing_mode, segment_length=segment_length,
                                             bias=has_bias, backend=backend)
            else:
                new = ConvertedModulatedLinear(I, O, style_features, demodulate=False, bias=has_bias,
                                               backend=backend)
        else:
            padding, pre_pad, mode = _conv_padding(old)
            geo = dict(stride=old.stride, padding=padding, dilation=old.dilation)
            if to == "mixture":
                new = ConvertedMixtureConv2d(old.in_channels, old.out_channels, old.kernel_size, K,
                                             groups=old.groups, bias=has_bias, routing="softmax",
                                             style_features=style_features, backend=backend, **geo)
            else:
                new = ConvertedModulatedConv2d(old.in_channels, old.out_channels, old.kernel_size, style_features,
                                               demodulate=False, bias=has_bias, backend=backend, **geo)
            new._mw_pre_pad, new._mw_pad_mode = pre_pad, mode
    new.to(dtype=w.dtype)
    with torch.no_grad():
        if to == "mixture":
            new.weight.copy_(w.unsqueeze(0).expand_as(new.weight))  # every expert = the pretrained weight
            if has_bias:
                new.bias.copy_(old.bias.unsqueeze(0).expand_as(new.bias))
        else:
            new.weight.copy_(w)
            if has_bias:
                new.bias.copy_(old.bias)
            new.affine.weight.zero_()  # styles = affine(w) = 1 for every latent
            new.affine.bias.fill_(1.0)
    new.weight.requires_grad_(old.weight.requires_grad)
    if has_bias:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    new._mw_name = name
    return new
