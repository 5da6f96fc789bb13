"""Swap a pretrained model's ``nn.Linear`` / ``nn.Conv2d`` for modweights layers, condition
them, fine-tune only the modulation, and pick their backend.

- :func:`convert` replaces the layers in place, so the converted model computes the same
  outputs as before; it returns a :class:`ConversionReport`.
- :func:`condition` supplies a latent ``w (B, style_features)`` to every converted layer that
  reads one, without changing the model's forward signature.
- :func:`freeze_base` and :func:`modulation_parameters` for parameter-efficient fine-tuning.
- :func:`set_backend` for every modweights layer of a model.

How a converted layer starts equal to the layer it replaces:

``to="mixture"``
    Every expert is a copy of the pretrained weight (and bias), and the router is a softmax,
    so the coefficients sum to 1 and the mixture equals the pretrained weight (up to
    rounding). The router keeps its random initialisation on purpose: with one that gave
    every sample the same coefficients, the experts would receive identical gradients and
    stay identical forever; varying coefficients break that symmetry as soon as training
    starts. A converted linear routes per its ``routing_mode``: by default each token on
    itself (``"token"``: causal, padding- and batch-independent in any model, the one mode
    convert can know is safe), with ``style_features`` on the latent given by
    :func:`condition` (``"cond"``); causal per-sample and per-segment modes are for decoders
    (docs/sequence-models.md). A converted conv routes each sample on its pooled pixels.
``to="modulated"``
    The weight and bias are the pretrained ones, demodulation is off, and the style affine
    (latent -> styles) starts with weight 0 and bias 1, so the styles are exactly 1 for any
    latent and the layer is the pretrained one; the affine's weight still receives gradients
    (as LoRA's zero-initialised factor does). The latent comes from :func:`condition`.

Shapes: a converted linear accepts whatever ``nn.Linear`` does, ``(*, I)``: dimension 0 is
the sample (conditioning is per sample) and the dimensions between are tokens, flattened
into ``T``; a 1-D input is one sample. Inside a time-major ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` (``batch_first=False``, also as built by ``nn.Transformer*``)
the sample is dimension 1: convert detects those and the report says so. GPT-2's ``Conv1D``
(transformers) converts like an ``nn.Linear`` (its weight is stored transposed). A converted
transformers model records the conversion in its config, and :func:`from_pretrained`
rebuilds it from a ``save_pretrained`` folder. A converted conv2d accepts ``(B, I, H, W)`` and the
unbatched ``(I, H, W)``. String padding (``'same'``, ``'valid'``) and every padding mode
(``'zeros'``, ``'reflect'``, ``'replicate'``, ``'circular'``) are handled as ``nn.Conv2d``
handles them: pad first (``F.pad``), then convolve without padding.

Hooks: a replaced module's forward (pre-)hooks and backward hooks move to its replacement
(the same tables, so existing handles still remove them), and the report's ``notes`` list
them; state-dict hooks do not (the state dict changes) and a warning says so. A module whose
weight is recomputed before each call (old-style ``torch.nn.utils.spectral_norm``,
``weight_norm``, ``prune``, or a parametrization) is skipped with that reason: copying its
weight would freeze it.

Inside ``nn.TransformerEncoderLayer`` (whose eval-mode fused path would read the linears'
weights directly and bypass the converted layers) convert turns that fused path off, and the
nested-tensor path of the ``nn.TransformerEncoder`` around it; the report's ``notes`` say so.
The layer then runs its modules one by one in eval mode too (PyTorch's reference path).

Outside :func:`condition`, a layer that reads a latent and is called without one raises a
``RuntimeError`` naming the layer (no silent styles = 1: a model that forgets its latent
should fail, not quietly compute the unconditioned output). A latent can also be passed
explicitly: ``layer(x, w)``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings

import torch
from torch import nn

from . import backends
from ._checks import check_routing_mode
from .nn import MixtureConv2d, MixtureLinear, ModulatedConv2d, ModulatedLinear, Router
from ._convert_context import carry_hooks, computed_weight, disable_fused_transformer, time_major, time_major_hint
from ._convert_hf import conv1d_type, from_pretrained, record_conversion
from ._convert_build import ConversionReport, Replacement, build, routing_of
from ._converted import (ConvertedMixtureConv2d, ConvertedMixtureLinear, ConvertedModulatedConv2d,  # noqa: F401
                         ConvertedModulatedLinear, _Converted)
from .nn._routing import ROUTING_MODES, STATEFUL_MODES, decoding, masked_mean

__all__ = [
    "convert",
    "condition",
    "freeze_base",
    "modulation_parameters",
    "named_modulation_parameters",
    "set_backend",
    "ConversionReport",
    "Replacement",
    "LAYER_TYPES",
    "ROUTING_MODES",
    "decoding",
    "masked_mean",
    "from_pretrained",
]

#: the modweights layer types (what :func:`set_backend` and :func:`freeze_base` act on)
LAYER_TYPES = (ModulatedLinear, MixtureLinear, ModulatedConv2d, MixtureConv2d)

_TARGETS = ("mixture", "modulated")


# ----------------------------------------------------------------------------- convert


def _patterns(arg, what: str) -> list:
    if arg is None:
        return []
    if isinstance(arg, (str, type)):
        arg = [arg]
    try:
        items = list(arg)
    except TypeError:
        raise TypeError(f"convert: `{what}` must be a list of name patterns (str) and/or module types; "
                        f"got {type(arg).__name__}") from None
    for p in items:
        if isinstance(p, type):
            if not (issubclass(p, (nn.Linear, nn.Conv2d)) or p is conv1d_type()):
                raise ValueError(f"convert: `{what}` names type {p.__name__}, which is not an nn.Linear or "
                                 "nn.Conv2d (sub)class nor transformers' Conv1D; only those can be converted")
        elif not isinstance(p, str):
            raise TypeError(f"convert: `{what}` entries must be name patterns (str) or module types; "
                            f"got {p!r}")
    return items


def _matches(name: str, module: nn.Module, pattern) -> bool:
    # types match exactly: a subclass may override forward (timm's StdConv2d standardises its
    # weight), so converting one is the caller's explicit choice
    if isinstance(pattern, type):
        return type(module) is pattern
    return fnmatch.fnmatchcase(name, pattern)


def _positive_int(v, what: str, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"convert: `{what}` must be a positive int; got {v!r}")
    return v


def convert(model: nn.Module, to: str = "mixture", *, num_experts: int = 4, include=None, exclude=None,
            style_features: int | None = None, routing_mode: str | None = None, segment_length: int | None = None,
            backend: str | None = None) -> ConversionReport:
    """Replace ``model``'s ``nn.Linear`` and ``nn.Conv2d`` modules, in place, by modweights
    layers that compute the same outputs at conversion (see the module docstring).

    Args:
        model: any ``nn.Module`` (not itself an ``nn.Linear``/``nn.Conv2d``: wrap it).
        to: ``"mixture"`` (MixtureLinear / MixtureConv2d, K experts, softmax routing) or
            ``"modulated"`` (ModulatedLinear / ModulatedConv2d, styles from a latent).
        num_experts: K, for ``"mixture"``.
        include: name patterns (``fnmatch``, matched against ``model.named_modules()`` names;
            ``*`` also crosses dots) and/or module types; only matching modules are converted.
            ``None``: every module of type exactly ``nn.Linear`` or ``nn.Conv2d``. Subclasses
            are converted only when their type is named here (they may compute something else).
        exclude: patterns and/or types; matching modules are left alone.
        style_features: size of the latent given by :func:`condition`. Required for
            ``"modulated"``; for ``"mixture"``, routes on the latent instead of the input
            (``routing_mode="cond"``).
        routing_mode: what a converted mixture linear routes on (docs/sequence-models.md):
            ``None`` is ``"cond"`` with ``style_features``, else ``"token"`` (each token on
            itself: safe in any model, the only mode convert can know is safe); or
            ``"prefix_mean"`` / ``"segment"`` (causal, for decoders; see :func:`decoding`),
            ``"noncausal_unpadded_mean"`` (unpadded encoders). Mixture convs route per sample
            on the pooled image whatever this says.
        segment_length: tokens per segment, with ``routing_mode="segment"``.
        backend: the ``backend`` attribute of the new layers (``None``: follow the context).

    Returns:
        A :class:`ConversionReport`: names, old/new types, parameter counts and routing
        (what each layer routes on and why) of the replaced modules, and the candidates it
        skipped with the reason (a grouped conv cannot be modulated; a tied weight; a weight recomputed at each call, as
        ``spectral_norm``, ``weight_norm``, ``prune`` or a parametrization make it; a
        subclass not named in ``include``; the ``out_proj`` of an
        ``nn.MultiheadAttention``, which reads its weight directly), and
        ``notes`` on anything else it changed (a fused transformer fast path turned off, a
        time-major layer, the record written into a transformers model's config).

    Raises:
        ValueError: bad arguments, an ``include`` entry that matches nothing, or nothing to convert.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: `model` must be an nn.Module; got {type(model).__name__}")
    if to not in _TARGETS:
        raise ValueError(f"convert: `to` must be one of {_TARGETS}; got {to!r}")
    K = _positive_int(num_experts, "num_experts")
    style_features = _positive_int(style_features, "style_features", allow_none=True)
    if to == "modulated" and style_features is None:
        raise ValueError("convert: to='modulated' needs `style_features`, the size of the latent w "
                         "that modweights.condition(model, w) will supply")
    given = routing_mode is not None
    if given and to == "modulated":
        raise ValueError("convert: `routing_mode` is for to='mixture' (a modulated layer reads the latent)")
    if not given:
        routing_mode = "cond" if style_features is not None else "token"
    check_routing_mode("convert", routing_mode, segment_length)
    if given:
        if (routing_mode == "cond") != (style_features is not None) and to == "mixture":
            raise ValueError(f"convert: routing_mode='cond' and `style_features` go together (the latent's size); "
                             f"got routing_mode={routing_mode!r}, style_features={style_features!r}")
    if backend is not None:
        backends.check_name(backend)
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")

    # a parameter owned by two different modules is tied (e.g. an embedding and an output head)
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))

    report = ConversionReport(to)
    used = {id(p): False for p in include_p}
    inside = set()  # modules within modweights layers or attention blocks: never candidates
    inner = []  # names of such modules that `include` names (for the error message)
    todo: dict[int, tuple[str, nn.Module]] = {}
    for name, m in model.named_modules():
        if id(m) in inside:
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(_matches(name, m, p) for p in include_p):
                inner.append(name)
            continue
        if isinstance(m, (*LAYER_TYPES, Router, nn.MultiheadAttention)):
            inside.update(id(c) for c in m.modules() if c is not m)
            if isinstance(m, nn.MultiheadAttention) and m.out_proj is not None:
                report.skipped.append((f"{name}.out_proj" if name else "out_proj", type(m.out_proj).__name__,
                                       "nn.MultiheadAttention reads out_proj.weight directly"))
            continue
        if not isinstance(m, (nn.Linear, nn.Conv2d)) and type(m) is not conv1d_type():
            continue
        hits = [p for p in include_p if _matches(name, m, p)]
        for p in hits:
            used[id(p)] = True
        if include_p and not hits:
            continue
        if any(_matches(name, m, p) for p in exclude_p):
            continue
        typ = type(m).__name__
        if type(m) not in (nn.Linear, nn.Conv2d, conv1d_type()) and not any(isinstance(p, type) for p in hits):
            report.skipped.append((name, typ, f"a subclass of nn.{'Linear' if isinstance(m, nn.Linear) else 'Conv2d'}"
                                   " (it may compute something else); name its type in `include` to convert it"))
            continue
        computed = computed_weight(m)
        if computed:
            report.skipped.append((name, typ, computed))
            continue
        tied = [p for p in m.parameters(recurse=False) if len(owners[id(p)]) > 1]
        if tied:
            report.skipped.append((name, typ, "its weight is shared with another module (tied); "
                                              "converting would untie it"))
            continue
        if to == "modulated" and isinstance(m, nn.Conv2d) and m.groups != 1:
            report.skipped.append((name, typ, f"groups={m.groups}: modulation needs groups == 1 "
                                              "(demodulation sums over all input channels)"))
            continue
        if name == "":
            raise ValueError(f"convert: the model itself is an {typ} and cannot be replaced in place; "
                             "wrap it, e.g. nn.Sequential(model)")
        todo[id(m)] = (name, m)

    unused = [p for p in include_p if not used[id(p)]]
    if unused:
        shown = ", ".join(p.__name__ if isinstance(p, type) else repr(p) for p in unused)
        hint = (f" (it names {', '.join(inner)}, inside an nn.MultiheadAttention, which reads out_proj.weight "
                "directly, or inside a modweights layer: never converted)") if inner else ""
        raise ValueError(f"convert: `include` entries matched no nn.Linear / nn.Conv2d module: {shown}{hint}")
    if not todo:
        why = "".join(f"\n  {n} ({t}): {r}" for n, t, r in report.skipped)
        ours = sum(isinstance(m, LAYER_TYPES) for m in model.modules())
        if ours:
            why += (f"\n  {type(model).__name__} already holds {ours} modweights layer(s) (converted before?); "
                    "the nn.Linear inside them (routers, style affines) are never candidates")
        raise ValueError(f"convert: no nn.Linear / nn.Conv2d module to convert to {to!r} in "
                         f"{type(model).__name__}{why}")

    new_of: dict[int, nn.Module] = {}
    layout, head = time_major(model), _output_head(model)
    for key, (name, old) in todo.items():
        mode, seg, why = (routing_mode, segment_length, "as asked (routing_mode)" if given else "")
        if to == "mixture" and key == head and mode in (*STATEFUL_MODES, "noncausal_unpadded_mean"):
            # transformers computes the head on the last positions only when generating
            # (logits_to_keep): a pooled mode would pool over those alone
            mode, seg, why = "token", None, (f"the model's output head, which transformers may call on the last "
                                             f"positions only (generate's logits_to_keep), so not {routing_mode!r}")
        new = build(name, old, to, K, style_features, backend, mode if to == "mixture" else None,
                    seg if to == "mixture" else None)
        routing, why = routing_of(new, to, why, layout.get(key))
        carry_hooks(name, old, new, report.notes)
        new_of[key] = new
        report.replaced.append(Replacement(
            name, type(old).__name__, type(new).__name__,
            sum(p.numel() for p in old.parameters()), sum(p.numel() for p in new.parameters()), routing, why))
    # every reference to a replaced module (a module used twice is replaced at both places)
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                setattr(parent, attr, new_of[id(child)])
    disable_fused_transformer(model, LAYER_TYPES, report.notes)
    if any(r.routing != "token" for r in report.replaced if r.old_type != "Conv2d"):
        time_major_hint(model, report.notes)
    record_conversion(model, dict(to=to, num_experts=K, include=report.names, style_features=style_features,
                                  routing_mode=routing_mode if given else None, segment_length=segment_length,
                                  backend=backend), report.notes)
    return report


def _output_head(model: nn.Module):
    """id of a transformers model's output head (``get_output_embeddings()``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return id(head) if isinstance(head, nn.Module) else None


# ----------------------------------------------------------------------------- condition


def _latent_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, _Converted) and m.reads_latent]


@contextlib.contextmanager
def condition(model: nn.Module, w: torch.Tensor):
    """Supply the latent ``w`` to every converted layer of ``model`` that reads one, for
    the calls inside the ``with`` block::

        with modweights.condition(model, w):   # w: (B, style_features)
            y = model(x)                       # the model's own forward signature

    Contexts nest (the inner latent wins, the outer one is restored on exit). The latent is a
    plain attribute of each layer, so autograd reaches ``w`` and ``torch.compile`` reads it as
    an input (a new ``w`` of the same shape does not recompile).

    Raises:
        ValueError: ``model`` has no layer that reads a latent, or ``w``'s last dimension is
            not a layer's ``style_features``.
        TypeError: ``w`` is not a floating-point tensor.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"condition: `w` must be a floating-point torch.Tensor (B, style_features); got "
                        f"{type(w).__name__ if not isinstance(w, torch.Tensor) else w.dtype}")
    layers = _latent_layers(model)
    if not layers:
        raise ValueError(f"condition: {type(model).__name__} has no layer that reads a latent; convert it with "
                         "modweights.convert(model, to='modulated', style_features=S) (or to='mixture' "
                         "with style_features) first")
    for m in layers:
        if w.dim() < 2 or w.shape[-1] != m.style_features:
            raise ValueError(f"condition: `w` must have shape (B, {m.style_features}) for layer {m._mw_name!r} "
                             f"(style_features={m.style_features}); got {tuple(w.shape)}")
    old = [m._mw_latent for m in layers]
    # object.__setattr__: nn.Module's would adopt an nn.Parameter latent as the layer's own
    for m in layers:
        object.__setattr__(m, "_mw_latent", w)
    try:
        yield model
    finally:
        for m, o in zip(layers, old):
            object.__setattr__(m, "_mw_latent", o)


# ----------------------------------------------------------------------------- fine-tuning


def _layers(model: nn.Module, what: str) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: `model` must be an nn.Module; got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, LAYER_TYPES)]
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} contains no modweights layer "
                         "(ModulatedLinear, MixtureLinear, ModulatedConv2d, MixtureConv2d)")
    return layers


def named_modulation_parameters(model: nn.Module, *, experts: bool = False):
    """Yield ``(name, parameter)`` for the routing (every :class:`~modweights.nn.Router`) and
    style (the ``affine`` of modulated layers) parameters of ``model``; with ``experts``
    also the banks and biases of the mixture layers."""
    _layers(model, "modulation_parameters")
    seen = set()
    for mname, m in model.named_modules():
        params = []
        if isinstance(m, Router):
            params = list(m.named_parameters())
        elif isinstance(m, (ModulatedLinear, ModulatedConv2d)):
            params = list(m.affine.named_parameters(prefix="affine"))
        elif experts and isinstance(m, (MixtureLinear, MixtureConv2d)):
            params = [(n, p) for n, p in m.named_parameters(recurse=False) if n in ("weight", "bias")]
        for n, p in params:
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{mname}.{n}" if mname else n), p


def modulation_parameters(model: nn.Module, *, experts: bool = False) -> list[nn.Parameter]:
    """The parameters :func:`named_modulation_parameters` yields, for an optimizer."""
    return [p for _, p in named_modulation_parameters(model, experts=experts)]


def freeze_base(model: nn.Module, *, train_experts: bool = False) -> list[str]:
    """Freeze every parameter of ``model`` except the routing and style parameters (and,
    with ``train_experts``, the mixture layers' expert banks and biases).

    Returns:
        The names of the parameters left trainable.

    Warns:
        UserWarning when ``train_experts`` is False and a mixture layer's experts are all
        equal (as :func:`convert` makes them): the mixture then equals each expert whatever
        the routing, so its router would get zero gradient.
    """
    layers = _layers(model, "freeze_base")
    keep = dict(named_modulation_parameters(model, experts=train_experts))
    ids = {id(p) for p in keep.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    if not train_experts:
        equal = [getattr(m, "_mw_name", "") or type(m).__name__ for m in layers
                 if isinstance(m, (MixtureLinear, MixtureConv2d)) and m.num_experts > 1 and not m.weight.is_meta
                 and bool((m.weight == m.weight[:1]).all())]
        if equal:
            warnings.warn(f"freeze_base: the experts of {', '.join(equal)} are all equal and frozen, so their "
                          "routers get zero gradient; pass train_experts=True", UserWarning, stacklevel=2)
    return list(keep)


def set_backend(model: nn.Module, name: str | None) -> int:
    """Set the ``backend`` attribute of every modweights layer in ``model`` (``None``: follow
    :func:`modweights.use_backend` / ``MODWEIGHTS_BACKEND`` / auto). Returns how many layers.

    Raises:
        ValueError: an unknown backend name, or no modweights layer in ``model``.
    """
    if name is not None:
        backends.check_name(name)
    layers = _layers(model, "set_backend")
    for m in layers:
        m.backend = name
    return len(layers)
