"""One fix to Triton's CPU interpreter (``TRITON_INTERPRET=1``), so the kernels run unchanged
under Triton 3.6 with NumPy >= 2.4. GPU compilation never reaches this code.

Why: the interpreter holds every scalar (a runtime int argument, ``tl.cdiv(R, BLOCK_R)``, a
loop bound) as a one-element NumPy array of shape ``(1,)``, and a kernel's
``for rb in range(0, n)`` calls ``int()`` on it. NumPy 2.4 turned that conversion of a
non-0-d array (deprecated since 1.25) into ``TypeError: only 0-dimensional arrays can be
converted to Python scalars``. Triton 3.8's interpreter squeezes the array first; Triton 3.6's
does not, so every kernel with a loop over a runtime bound failed there.

Computing trip counts on the host does not help: a runtime int argument is such an array
too, and a ``tl.constexpr`` trip count would change (and multiply) the GPU specialisations.
So the interpreter's scalar-to-index conversion is given Triton 3.8's behaviour instead: the
interpreter installs its tensor patches at every launch through
``triton.runtime.interpreter._patch_lang_tensor``; :func:`install` wraps that function so
that, after it, ``__index__`` squeezes the one-element array. With Triton 3.8 this replaces the
conversion by the same one.
"""
from __future__ import annotations

import numpy as np


def _index(self) -> int:
    """``operator.index`` of an interpreter scalar: its one element as an int."""
    data = np.asarray(self.handle.data)
    if data.size != 1:
        raise TypeError(f"only a scalar can be used as an index, got a block of shape {data.shape}")
    return int(data.reshape(()))


def install() -> bool:
    """Wrap the interpreter's tensor patching (once). Returns whether the wrapper is in place
    (False when this Triton has no such hook: nothing to fix there, or a layout we do not know,
    in which case the interpreter is left as it is)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:
        return False
    if getattr(patch, "_modweights_index", False):
        return True

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    _patch_lang_tensor._modweights_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
