"""The kernels' constexpr modes, named once (host and kernels; imports Triton only, so that the
AOT compile worker can load the kernel modules without torch).

Host code passes the plain ints of :class:`Demod` / :class:`Bias` as the ``DEMOD`` / ``BIAS``
meta-parameters; ``@triton.jit`` code compares against their ``tl.constexpr`` twins below (a
kernel may read a module global only when it is a constexpr), so every comparison is resolved
at compile time, as with the literals it replaces.

``DEMOD`` of the mod_linear kernels (the conv kernels, the per-sample pre-pass and the
per-token weight kernel take a plain bool: demodulated or not)::

    OFF   no demodulation
    READ  d computed beforehand and read: the forward scales its output by it; the backward
          forms gz = g * d with per-sample d and c
    ROW   per row: the forward accumulates each row's norm beside the GEMM (and stores d);
          the backward's g is already gz, with c per row
    LOOP  forward only, MIX_B: each sample's norm accumulated from the mixed B tile in the
          main loop (no pre-pass); d stored by the sample's first row tile

``BIAS`` (both ops' forward kernels, the linear pre-passes)::

    NONE    no bias
    SHARED  one (O,) bias
    BANK    a (K, O) bias bank, mixed by the coefficients
"""
from __future__ import annotations

import triton.language as tl


class Demod:
    """``DEMOD`` values of the mod_linear kernels (see the module)."""

    OFF = 0
    READ = 1
    ROW = 2
    LOOP = 3


class Bias:
    """``BIAS`` values (see the module)."""

    NONE = 0
    SHARED = 1
    BANK = 2


# the kernels' twins (compared against inside @triton.jit code)
DEMOD_OFF = tl.constexpr(Demod.OFF)
DEMOD_READ = tl.constexpr(Demod.READ)
DEMOD_ROW = tl.constexpr(Demod.ROW)
DEMOD_LOOP = tl.constexpr(Demod.LOOP)
BIAS_NONE = tl.constexpr(Bias.NONE)
BIAS_SHARED = tl.constexpr(Bias.SHARED)
BIAS_BANK = tl.constexpr(Bias.BANK)
