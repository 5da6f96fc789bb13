"""Test-only switches: the one way tests force a code path or lower a limit.

Each switch is declared once below (name, accepted type, the module that reads it, what it
forces and why tests need it). Every switch is ``None`` (unset) in normal use (besides tests,
only developer tools set them: the kernel sweep, benchmarks/cuda_host_overhead.py): the code
then decides by itself (its counts, its device, its own limits). Code reads a switch with one dict
lookup, also inside code that ``torch.compile`` traces (Dynamo guards on the value read, so
setting a switch recompiles)::

    plan = switches.get("torch_plan")                        # None: count
    limit = switches.get("triton_conv2d_max_elements", MAX_ELEMENTS)   # the default where unset

Tests set switches only through :func:`override` (the ``switch`` fixture of tests/conftest.py
wraps it for the rest of a test), which rejects unknown names and values of the wrong type::

    with switches.override(torch_plan="stacked", triton_split=2):
        ...

The table in docs/testing.md ("Switches tests use") is :func:`markdown` (``python -m
modweights._switches`` prints it; tests/test_suite_conventions.py checks that it matches).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Switch:
    """One test-only switch: ``kind`` the type a set value must have (``"callable"`` for
    hooks), ``choices`` the allowed values (if limited), ``minimum`` the least allowed number,
    ``where`` the module that reads it, ``doc`` what a set value forces and why tests need it."""

    name: str
    kind: type | str
    where: str
    doc: str
    choices: tuple = ()
    minimum: float | None = None

    def check(self, value: Any) -> None:
        """TypeError / ValueError unless ``value`` (not None) is a valid setting of this switch."""
        if self.kind == "callable":
            ok = callable(value)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind)
        if not ok:
            want = self.kind if isinstance(self.kind, str) else self.kind.__name__
            raise TypeError(f"switch {self.name!r} takes a value of type {want} (or None: unset); got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"switch {self.name!r} must be one of {', '.join(map(repr, self.choices))} "
                             f"(or None: unset); got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"switch {self.name!r} must be at least {self.minimum}; got {value!r}")


_TORCH = "modweights/backends/torch_backend.py"
_DEMOD = "modweights/backends/_torch_demod.py"
_CUDA = "modweights/backends/cuda.py"
_LAYOUT = "triton_kernels/mod_linear_layout.py"
_CONV = "triton_kernels/mod_conv2d.py"

#: every switch, by name
SWITCHES: dict[str, Switch] = {s.name: s for s in (
    Switch("torch_plan", str, _TORCH,
           "the torch backend's formulation for K > 1: `stacked` (one GEMM / conv per expert) or `form` "
           "(mixed weights; conv calls it `grouped`, the same plan), so both are tested on every case "
           "(the count picks one)", choices=("stacked", "form", "grouped")),
    Switch("torch_demod_chunk_elems", int, _DEMOD,
           "elements of one chunk of the exact demodulation terms (`DEMOD_CHUNK_ELEMS`), lowered so "
           "small problems take several chunks", minimum=1),
    Switch("torch_demod_threshold", float, _DEMOD,
           "the guard's threshold on a row's estimated error in the pair-expanded demodulation "
           "(`-inf`: no row takes the exact path), to show the guard is what keeps cancelling rows right"),
    Switch("torch_demod_exact_hook", "callable", _DEMOD,
           "called as `hook(where, exact_rows, rows)` (`'norms'` / `'grads'`) each time the guard "
           "decides, eagerly, so tests see which rows took the exact path"),
    Switch("triton_mix_b", bool, _LAYOUT,
           "the linear kernels' layout: per-sample row tiles with the mixture in the B-tile load (True) "
           "or the stacked flat layout (False), so both run on small shapes"),
    Switch("triton_weight_stacked", bool, _LAYOUT,
           "the linear weight gradient of per-sample coefficients: the stacked GEMM (True) or the fused "
           "per-sample kernel (False)"),
    Switch("triton_split", int, "triton_kernels/mod_linear_launch.py, " + _CONV,
           "sample splits of the linear and conv2d weight-gradient kernels (one under the interpreter), "
           "so the reduction of the partial dW runs on a CPU", minimum=1),
    Switch("triton_demod_in_loop_max_t", int, "triton_kernels/mod_linear.py",
           "rows per sample up to which the linear forward computes d in its main loop "
           "(`DEMOD_IN_LOOP_MAX_T`), lowered to 0 to take the pre-pass on small shapes", minimum=0),
    Switch("triton_conv2d_channels_last", bool, _CONV,
           "read x and g channels-last (on a GPU yes, under the interpreter no), so both run anywhere"),
    Switch("triton_conv2d_bank_relayout", bool, _CONV,
           "copy the bank into the tile-friendly layout (on a GPU yes, under the interpreter no)"),
    Switch("triton_conv2d_max_block_k", int, _CONV,
           "experts whose dW tiles the weight kernel keeps in registers (`MAX_BLOCK_K`), lowered so a "
           "small K is processed in chunks", minimum=1),
    Switch("triton_conv2d_max_elements", int, _CONV,
           "the 32-bit offset limit of the conv2d kernels (`MAX_ELEMENTS`), lowered so small tensors "
           "reach its error", minimum=0),
    Switch("cuda_emulation_library", str, _CUDA,
           "path of a host-emulation build of the cuda extension (csrc/emu): CPU tensors then run "
           "through the cuda backend's kernel source, without a GPU"),
    Switch("cuda_decode_rows", int, _CUDA,
           "rows per sample up to which per-sample problems take the per-token kernels "
           "(`DECODE_ROWS`), 0 to keep small problems on the per-sample kernels", minimum=0),
)}

# the values set now (None: unset); mutated in place, never rebound, so traced reads stay valid
_VALUES: dict[str, Any] = dict.fromkeys(SWITCHES)


def get(name: str, default: Any = None) -> Any:
    """The value a test set for switch ``name``, else ``default`` (one dict lookup: hot paths
    call it; a name not declared is a KeyError, and tests/test_suite_conventions.py checks
    every name the package reads)."""
    value = _VALUES[name]
    return default if value is None else value


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set switches for the ``with`` block (None: unset), restoring the previous values after,
    also on error; nests. Unknown names and invalid values raise before anything changes."""
    for name, value in values.items():
        switch = SWITCHES.get(name)
        if switch is None:
            raise TypeError(f"no switch named {name!r}; declared: {', '.join(SWITCHES)} (modweights/_switches.py)")
        if value is not None:
            switch.check(value)
    old = {name: _VALUES[name] for name in values}
    _VALUES.update(values)
    try:
        yield
    finally:
        _VALUES.update(old)


def markdown() -> str:
    """The table of docs/testing.md: one row per switch."""
    rows = ["| switch | type | read by | what a set value forces, and why tests need it |",
            "| --- | --- | --- | --- |"]
    for s in SWITCHES.values():
        kind = s.kind if isinstance(s.kind, str) else s.kind.__name__
        if s.choices:
            kind = " / ".join(f"`{c}`" for c in s.choices)
        where = ", ".join(f"`{w}`" for w in s.where.split(", "))
        rows.append(f"| `{s.name}` | {kind} | {where} | {s.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
