"""Host-side facts shared by the Triton launchers of both ops (written once): whether the
kernels run under the interpreter, whether autotuning is on, the shared memory one block may
use, and the placeholder pointer for an absent tensor (:func:`ptr`: every launcher passes an
absent tensor through it)."""
from __future__ import annotations

import functools
import os

import torch

from . import _interpreter_compat

#: an H100 has 228 KiB of shared memory per SM, 227 KiB usable by one block: the limit when no
#: GPU is there to ask (offline: the AOT report compiles for sm_90a on a CPU machine)
H100_SMEM_BYTES = 227 * 1024


def _on(name: str, default: str) -> bool:
    """An environment switch: off when set to "" or "0", on otherwise."""
    return os.environ.get(name, default) not in ("", "0")


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is set: the kernels run on CPU tensors under Triton's interpreter."""
    return _on("TRITON_INTERPRET", "0")


if interpreting():
    # Triton 3.6's interpreter cannot take a runtime loop bound with NumPy >= 2.4 (see the module)
    _interpreter_compat.install()


#: ``MODWEIGHTS_TRITON_AUTOTUNE=0`` (or empty): one default configuration per kernel, no timing
#: runs (GPU test suites: many shapes, each of which would otherwise be tuned). Read once, here.
AUTOTUNE = _on("MODWEIGHTS_TRITON_AUTOTUNE", "1")


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def smem_bytes() -> int:
    """Shared memory one block may use on the current CUDA device (its opt-in limit, from the
    device's properties); :data:`H100_SMEM_BYTES` without a GPU (offline, AOT, interpreter)."""
    if torch.cuda.is_available():
        return _device_smem(torch.cuda.current_device())
    return H100_SMEM_BYTES


def absent(device) -> torch.Tensor:
    """A 1-element float32 pointer for an absent tensor (its flag is off: never read or
    written). Not one of the inputs: the autotuner zeroes the output buffers it names in
    reset_to_zero before each timing run."""
    return torch.empty(1, dtype=torch.float32, device=device)


def ptr(t, device) -> torch.Tensor:
    """``t``, or the :func:`absent` placeholder where ``t`` is None: the one convention for an
    optional tensor argument of a kernel (its flag says whether it is read)."""
    return absent(device) if t is None else t
