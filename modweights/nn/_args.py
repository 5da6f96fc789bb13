"""Constructor arguments shared by the layers, checked when the layer is built (not at its
first call, where a typo would surface far from its cause)."""
from __future__ import annotations

from torch.nn.modules.utils import _pair

from .. import backends
from .._checks import check_eps, check_flag

__all__ = ["layer_args", "conv_padding", "same_padding_pairs"]


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
        return padding, None  # numbers: checked (and paired) by the op
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
