"""Constructor arguments shared by the layers, checked when the layer is built (not at its
first call, where a typo would surface far from its cause)."""
from __future__ import annotations

import operator

from torch.nn.modules.utils import _pair

from .. import backends
from .._checks import check_eps, check_flag

__all__ = ["layer_args", "conv_padding", "same_padding_pairs", "int_arg", "pair_arg", "conv_geometry"]


def layer_args(cls: str, *, backend, **given) -> None:
    """Raise ValueError / TypeError naming the argument for a bad ``backend`` (a registry name
    or None) and, where given, ``eps`` (finite, >= 0) and ``demodulate`` (a bool)."""
    if backend is not None:
        try:
            backends.check_name(backend)
        except ValueError as e:
            raise ValueError(f"{cls}: `backend`: {e}") from None
    if "eps" in given:
        check_eps(cls, given["eps"])
    if "demodulate" in given:
        check_flag(cls, "demodulate", given["demodulate"])


def int_arg(cls: str, name: str, v, minimum: int) -> int:
    """``v`` as a Python int >= ``minimum``: any integer (``operator.index``: a numpy integer
    too, as ``nn.Conv2d`` takes), not a bool or a float."""
    try:
        if isinstance(v, bool):
            raise TypeError
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{cls}: `{name}` must be an int; got {v!r}") from None
    if i < minimum:
        raise ValueError(f"{cls}: `{name}` must be >= {minimum}; got {i}")
    return i


def pair_arg(cls: str, name: str, v, minimum: int) -> tuple[int, int]:
    """``v`` (an integer or a pair of them) as a pair of Python ints >= ``minimum``."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise TypeError(f"{cls}: `{name}` must be an int or a pair of ints; got {v!r}")
        return int_arg(cls, name, v[0], minimum), int_arg(cls, name, v[1], minimum)
    i = int_arg(cls, name, v, minimum)
    return i, i


def conv_geometry(cls: str, in_channels, out_channels, kernel_size, stride, dilation, groups=1) -> dict:
    """The conv layers' sizes, validated and normalised when the layer is built: Python ints
    and ``(h, w)`` pairs whatever integer type was given (numpy's included). ``groups`` must
    divide both channel counts."""
    geo = dict(in_channels=int_arg(cls, "in_channels", in_channels, 1),
               out_channels=int_arg(cls, "out_channels", out_channels, 1),
               kernel_size=pair_arg(cls, "kernel_size", kernel_size, 1), stride=pair_arg(cls, "stride", stride, 1),
               dilation=pair_arg(cls, "dilation", dilation, 1), groups=int_arg(cls, "groups", groups, 1))
    if geo["in_channels"] % geo["groups"] or geo["out_channels"] % geo["groups"]:
        raise ValueError(f"{cls}: `groups` = {geo['groups']} must divide in_channels = {geo['in_channels']} "
                         f"and out_channels = {geo['out_channels']}")
    return geo


def same_padding_pairs(kernel_size, dilation) -> list[tuple[int, int]]:
    """Per spatial dimension (before, after) padding of ``padding='same'`` at stride 1, as
    ``nn.Conv2d`` pads: the total ``dilation * (k - 1)``, its odd pixel after (right/bottom)."""
    pairs = []
    for d, k in zip(_pair(dilation), _pair(kernel_size)):
        total = d * (k - 1)
        pairs.append((total // 2, total - total // 2))
    return pairs


def conv_padding(cls: str, padding, kernel_size, stride, dilation):
    """``padding`` as ``nn.Conv2d`` takes it (int, pair, ``'valid'`` or ``'same'``) ->
    (the op's symmetric padding, an ``F.pad`` pre-padding ``(left, right, top, bottom)`` or None).

    ``'same'`` with an odd total (an even kernel) cannot be symmetric: the op gets 0 and the
    input is zero-padded first, the extra pixel right/bottom, as ``nn.Conv2d`` does.
    """
    if not isinstance(padding, str):
        return pair_arg(cls, "padding", padding, 0), None
    if padding == "valid":
        return (0, 0), None
    if padding != "same":
        raise ValueError(f"{cls}: `padding` must be an int, a pair of ints, 'valid' or 'same'; got {padding!r}")
    if any(s != 1 for s in _pair(stride)):
        raise ValueError(f"{cls}: padding='same' needs stride 1 (as nn.Conv2d); got stride={stride!r}")
    (top, bottom), (left, right) = same_padding_pairs(kernel_size, dilation)
    if top == bottom and left == right:
        return (top, left), None
    return (0, 0), (left, right, top, bottom)
