"""What :func:`modweights.convert.convert` does around the modules it replaces: refuse a
weight that is recomputed at each call, carry hooks over, and turn off PyTorch's fused
transformer path where it would bypass the converted layers. Each function appends what it
did to the report's ``notes`` (a list of str)."""
from __future__ import annotations

import warnings

from torch import nn

__all__ = ["computed_weight", "carry_hooks", "disable_fused_transformer", "time_major", "time_major_hint"]


def computed_weight(m: nn.Module) -> str:
    """Why ``m``'s weight cannot be copied (it is recomputed from other tensors at every call),
    or "". Converting would freeze the weight as last computed and drop the recomputation."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(m):
        return ("its weight is parametrized (torch.nn.utils.parametrize, e.g. parametrizations.spectral_norm): "
                "converting would freeze it; remove the parametrization first (parametrize.remove_parametrizations)")
    if "weight" not in m._parameters:
        hooks = ", ".join(sorted({type(h).__name__ for h in m._forward_pre_hooks.values()})) or "none"
        owners = ", ".join(n for n, _ in m.named_parameters(recurse=False)) or "none"
        return (f"its weight is not a parameter but computed before each call (forward pre-hooks: {hooks}; "
                f"parameters: {owners}), as torch.nn.utils.spectral_norm / weight_norm / prune do: converting "
                "would freeze it; remove that first (e.g. torch.nn.utils.remove_spectral_norm)")
    return ""


#: the hook tables of an nn.Module that convert hands to the replacement (see carry_hooks)
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


def carry_hooks(name: str, old: nn.Module, new: nn.Module, notes: list) -> None:
    """Give ``new`` the forward (pre-)hooks and backward hooks of ``old``: the very same tables,
    so the handles the user holds still remove them. A hook then receives the converted module
    (same inputs and output shapes; its ``weight`` is the converted layer's). State-dict hooks
    are not carried (the state dict's keys and shapes change): a warning says so."""
    for attr in _CALL_HOOKS:
        table = getattr(old, attr, None)
        if table is not None:
            setattr(new, attr, table)
    # the other tables only flag entries of these four
    carried = sum(len(getattr(old, a, None) or ()) for a in ("_forward_pre_hooks", "_forward_hooks",
                                                              "_backward_pre_hooks", "_backward_hooks"))
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    if carried:
        notes.append(f"{name}: {carried} forward/backward hook(s) carried over to the converted module")
    dropped = [a for a in _STATE_HOOKS if getattr(old, a, None)]
    if dropped:
        warnings.warn(f"convert: {name} has state-dict hooks ({', '.join(dropped)}); they are not carried over "
                      "to the converted module, whose state dict has other keys and shapes", UserWarning,
                      stacklevel=3)


def disable_fused_transformer(model: nn.Module, layer_types: tuple, notes: list) -> None:
    """Turn off the fused inference path of every ``nn.TransformerEncoderLayer`` whose
    feed-forward linears were converted, and the nested-tensor path of the
    ``nn.TransformerEncoder`` holding it.

    In eval mode under ``no_grad`` ``TransformerEncoderLayer.forward`` hands
    ``linear1.weight`` / ``linear2.weight`` to ``torch._transformer_encoder_layer_fwd``, a
    fused kernel that cannot call a converted layer: a modulated weight would be used without
    its styles, a mixture bank is refused ("2d weights expected"). The layer takes that path
    only when ``activation_relu_or_gelu`` (which PyTorch stashes from ``activation`` for its
    fast-path checks; the layer's own computation calls ``activation``) is non-zero, so it is
    set to 0 and the layer runs its modules one by one, as in training. The encoder's nested
    tensors (``use_nested_tensor``, with a padding mask) would reach the converted layers,
    which take dense tensors only, so that is turned off too. ``nn.TransformerDecoderLayer``
    has no such path (it calls its linears); ``nn.MultiheadAttention``'s own fast path reads
    ``out_proj.weight``, which is why convert never replaces ``out_proj``."""
    changed = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.TransformerEncoderLayer):
            continue
        converted = [a for a in ("linear1", "linear2") if isinstance(getattr(m, a, None), layer_types)]
        if converted and getattr(m, "activation_relu_or_gelu", 0):
            m.activation_relu_or_gelu = 0
            changed.add(id(m))
            notes.append(f"{name or type(m).__name__}: the fused inference fast path of "
                         f"nn.TransformerEncoderLayer is off (it reads {'/'.join(converted)}.weight "
                         "directly and would bypass the converted layers); the layer runs its modules")
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and any(
                id(layer) in changed for layer in m.layers):
            m.use_nested_tensor = False
            notes.append(f"{name or type(m).__name__}: nn.TransformerEncoder's nested-tensor path is off "
                         "(converted layers take dense tensors)")


def time_major(model: nn.Module) -> dict:
    """``{id(linear): container name}`` for the linears of every ``nn.TransformerEncoderLayer`` /
    ``nn.TransformerDecoderLayer`` built with ``batch_first=False`` (PyTorch's default, which
    ``nn.Transformer``, ``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` pass their
    layers): they receive ``(T, B, E)``, so their sample dimension is 1. (The layer keeps the
    flag on its attention, ``self_attn.batch_first``.) The linears inside an
    ``nn.MultiheadAttention`` are never converted, whatever its layout."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.self_attn.batch_first:
            for child in m.children():
                if isinstance(child, nn.Linear):
                    found[id(child)] = name or type(m).__name__
    return found


def time_major_hint(model: nn.Module, notes: list) -> None:
    """Note every ``nn.MultiheadAttention`` with ``batch_first=False`` outside the
    ``nn.Transformer*`` layers :func:`time_major` handles: the code around it likely feeds
    ``(T, B, E)`` to its linears too, which convert cannot see, and only per-token routing is
    correct whatever the layout (called when a converted layer routes otherwise)."""
    handled = {id(m.self_attn) for m in model.modules()
               if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))}
    handled |= {id(m.multihead_attn) for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and not m.batch_first and id(m) not in handled:
            notes.append(f"{name or type(m).__name__}: an nn.MultiheadAttention with batch_first=False outside "
                         "nn.Transformer* layers; if the code around it gives the converted linears (T, B, E), "
                         "their sample dimension is not 0: only routing_mode='token' is correct there")
