"""The op registry: one spec per op, in one module per op (``modweights/ops/<op>.py``).

A spec (:class:`OpSpec`) says everything about an op that is not a backend's kernel: its
configuration and how it travels through a custom-op schema, its empty-input rule, how its bias
broadcasts, its test cases and its benchmark shapes. The autograd glue, :mod:`modweights.testing`,
``verify``, the benchmarks and the AOT report ask the registry (:func:`get`, :data:`SPECS`) and
hold no ``op == ...`` branch of their own.

An op that ``lowers_to`` another (``mod_conv1d``: a conv2d with a unit height) is checked and
reshaped by its spec and runs as that op on every backend, so it needs no backend code.
Adding an op: docs/design.md, section "Adding an op".
"""
from __future__ import annotations

from ._spec import OpSpec

#: every registered op by name, in registration order
SPECS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry (one call per op module)."""
    SPECS[spec.name] = spec
    return spec


def get(op: str) -> OpSpec:
    """The spec of ``op``; a ValueError naming the registered ops otherwise."""
    try:
        return SPECS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; registered ops: {', '.join(SPECS)}") from None


def kernel_ops() -> tuple[str, ...]:
    """The ops backends implement (the others lower to one of these)."""
    return tuple(n for n, s in SPECS.items() if s.lowers_to is None)


# one registration line per op
from . import mod_linear, mod_conv2d, mod_conv1d  # noqa: E402,F401

__all__ = ["OpSpec", "SPECS", "get", "kernel_ops", "register"]
