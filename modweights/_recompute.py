"""The latent a converted layer reads under gradient checkpointing.

A converted layer reads its latent from :func:`modweights.convert.condition`, which is module
state: it changes when the ``with`` block ends or another one starts. Checkpointing
(``torch.utils.checkpoint``, both ``use_reentrant`` modes, and what HF's
``gradient_checkpointing_enable()`` calls) runs a block's forward again inside
``backward()``, when that state may be gone (the block ended) or another latent (a second
``condition`` block, as in a GAN step). The recomputation must use the latent of the forward it
recomputes, so each checkpointed forward records, per layer and in call order, the latents
its layers read, on the checkpoint's own per-region object, and its recomputation replays
them in the same order (checkpointing already requires the recomputation to make the same
calls in the same order). The record lives exactly as long as that object, i.e. as long as
the autograd graph that can still recompute; nothing is recorded outside checkpointing.

The region objects (torch.utils.checkpoint internals, read here only):

- ``use_reentrant=False``: the ``_CheckpointFrame`` of the region. Its forward runs under a
  saved-tensors hook whose pack function closes over ``frame``; its recomputation under one
  that closes over ``target_frame_ref`` (a weak reference to the frame) and ``gid`` (the
  backward's graph task).
- ``use_reentrant=True``: the ``CheckpointFunction`` node (``ctx``), found as the ``ctx`` local
  of ``CheckpointFunction.forward`` (run under ``no_grad``) or ``.backward`` (inside the engine:
  ``torch._C._current_graph_task_id() != -1``) on the Python stack.

Nested checkpoint regions (a checkpointed block inside another) read the latent of the
innermost region's forward as set at that time.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch.utils import checkpoint as _cp

_REENTRANT_FORWARD = _cp.CheckpointFunction.forward.__code__
_REENTRANT_BACKWARD = _cp.CheckpointFunction.backward.__code__


def _closure(fn) -> dict:
    fn = inspect.unwrap(fn)  # the recomputation's pack hook is wrapped by torch._dynamo.disable
    cells = getattr(fn, "__closure__", None) or ()
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    out = {}
    for name, cell in zip(names, cells):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    return out


def _is_checkpoint_hook(fn) -> bool:
    """Whether ``fn`` is a pack hook of torch.utils.checkpoint (``use_reentrant=False``): torch
    2.14 marks them ``_checkpoint_internal``; torch 2.11 does not, so they are told by where
    they are defined (the ``pack_hook`` of ``_checkpoint_hook`` / ``_recomputation_hook``)."""
    if getattr(fn, "_checkpoint_internal", False):
        return True
    fn = inspect.unwrap(fn)
    return (getattr(fn, "__module__", None) == _cp.__name__
            and getattr(fn, "__qualname__", "") in _CHECKPOINT_PACK_HOOKS)


_CHECKPOINT_PACK_HOOKS = ("_checkpoint_hook.__init__.<locals>.pack_hook",
                          "_recomputation_hook.__init__.<locals>.pack_hook")


def _region():
    """``(region, gid)``: the checkpoint region this call runs in and, in its recomputation,
    the backward's graph task (``None`` in the original forward); ``(None, None)`` outside
    checkpointing."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is not None and _is_checkpoint_hook(hooks[0]):
        cells = _closure(hooks[0])
        if "frame" in cells:
            return cells["frame"], None
        if "target_frame_ref" in cells:
            return cells["target_frame_ref"](), cells.get("gid")
    gid = torch._C._current_graph_task_id()
    if torch.is_grad_enabled() and gid == -1:
        return None, None  # a plain forward (a reentrant region's forward runs under no_grad)
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is _REENTRANT_FORWARD:
            return f.f_locals.get("ctx"), None
        if f.f_code is _REENTRANT_BACKWARD:
            return f.f_locals.get("ctx"), gid
        f = f.f_back
    return None, None


def latent(layer, current: torch.Tensor | None) -> torch.Tensor | None:
    """The latent ``layer`` uses in this call: ``current`` (what :func:`condition` set, or
    None), recorded when this is a checkpointed forward; in a checkpoint's recomputation the
    one its original forward recorded (``current`` where nothing was recorded)."""
    if torch.compiler.is_compiling():
        return current  # a compiled graph checkpoints by itself; no Python frames to read
    region, gid = _region()
    if region is None:
        return current
    key = id(layer)
    if gid is None:
        if current is not None:
            if getattr(region, "_mw_latents", None) is None:
                region._mw_latents = {}
            region._mw_latents.setdefault(key, []).append(current)
        return current
    records = (getattr(region, "_mw_latents", None) or {}).get(key)
    if not records:
        return current
    # one cursor per backward: a retained graph recomputes again in its next backward
    cursor_gid, cursors = getattr(region, "_mw_cursor", (None, None))
    if cursor_gid != gid:
        cursors = {}
        region._mw_cursor = (gid, cursors)
    i = cursors.get(key, 0)
    cursors[key] = i + 1
    return records[i] if i < len(records) else current
