"""Hugging Face transformers around :func:`modweights.convert.convert`: GPT-2's ``Conv1D`` (a
linear with its weight stored transposed), the record of a conversion in ``config.json``, and
:func:`from_pretrained`, which rebuilds a converted model from a ``save_pretrained`` folder.

transformers is optional: nothing here imports it unless the model or the caller uses it.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

__all__ = ["conv1d_type", "linear_weight", "record_conversion", "from_pretrained", "RECORD"]

#: the ``config.json`` key holding the list of conversions (the keyword arguments of each
#: :func:`convert` call, ``include`` being the exact names it replaced)
RECORD = "modweights_conversions"


def conv1d_type():
    """transformers' ``Conv1D`` class when transformers is loaded, else None (then no model
    can hold one)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The ``(O, I)`` weight of an ``nn.Linear`` or a ``Conv1D`` (stored ``(I, O)``: ``y = x @ W + b``)."""
    c1d = conv1d_type()
    return m.weight.t() if c1d is not None and type(m) is c1d else m.weight


def record_conversion(model: nn.Module, record: dict, notes: list) -> None:
    """Append ``record`` to ``model.config``'s :data:`RECORD` when ``model`` is a transformers
    ``PreTrainedModel``, so that ``save_pretrained`` writes it into ``config.json`` and
    :func:`from_pretrained` can convert a freshly built model the same way."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained") or not hasattr(config, "to_dict"):
        return
    done = list(getattr(config, RECORD, None) or [])
    # the converted module's class: a PreTrainedModel inside another (LlamaModel in
    # LlamaForCausalLM) shares its config, and the names are relative to it
    setattr(config, RECORD, done + [dict(record, module=type(model).__name__)])
    notes.append(f"recorded in {type(model).__name__}.config.{RECORD} (written to config.json by save_pretrained; "
                 "load with modweights.convert.from_pretrained)")


def _state_dict_files(path: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        f = os.path.join(path, index)
        if os.path.exists(f):
            with open(f) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        f = os.path.join(path, single)
        if os.path.exists(f):
            return [f]
    raise ValueError(f"from_pretrained: no model.safetensors / pytorch_model.bin (or its index) in {path!r}")


def _load(f: str) -> dict:
    if f.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(f)
    return torch.load(f, map_location="cpu", weights_only=True)


def from_pretrained(cls, path: str, *, dtype: torch.dtype | None = None, **kwargs):
    """Rebuild a model that was converted with :func:`modweights.convert.convert` and saved with
    ``save_pretrained(path)``: build ``cls`` from the saved config, redo the recorded
    conversions, load the saved tensors (strictly: only tied weights may be absent), and
    return it in eval mode, as transformers' ``from_pretrained`` does::

        model.save_pretrained(path)                                  # a converted model
        again = modweights.convert.from_pretrained(GPT2LMHeadModel, path)

    Args:
        cls: the transformers model class (e.g. ``LlamaForCausalLM``, or an ``AutoModel*`` class).
        path: the folder ``save_pretrained`` wrote.
        dtype: cast the model to this dtype (default: the dtype of the saved floating tensors).
        kwargs: passed to ``cls.from_config`` (e.g. ``attn_implementation="eager"``, which
            transformers does not save in the config).

    Raises:
        ValueError: the config has no conversion record, or the saved tensors do not fit.
    """
    from transformers import AutoConfig

    from .convert import convert

    config = AutoConfig.from_pretrained(path)
    records = getattr(config, RECORD, None)
    if not records:
        raise ValueError(f"from_pretrained: {path!r}/config.json has no {RECORD!r} record: the model was not "
                         "converted by modweights.convert.convert (load it with transformers' from_pretrained)")
    setattr(config, RECORD, [])  # convert records each conversion again as it redoes it
    model = (cls.from_config if hasattr(cls, "from_config") else cls._from_config)(config, **kwargs)
    for record in records:
        record = dict(record)
        cls_name = record.pop("module", None)
        target = next((m for m in model.modules() if type(m).__name__ == cls_name), model)
        convert(target, **record)
    state = {}
    for f in _state_dict_files(path):
        state.update(_load(f))
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    if dtype or floats:
        model.to(dtype or floats[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"from_pretrained: the saved tensors do not fit the rebuilt model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


def _tied_names(model: nn.Module) -> set:
    """State-dict names of parameters that share their tensor with another name (tied weights,
    which save_pretrained stores once)."""
    by_ptr: dict = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault((t.data_ptr(), t.shape), []).append(name)
    return {n for names in by_ptr.values() if len(names) > 1 for n in names}
