"""modweights: layers whose weights are computed from their input ("weights of weights").

See :mod:`modweights.functional` for the ops, :mod:`modweights.nn` for the layers and
:mod:`modweights.backends` for choosing an implementation, and :mod:`modweights.convert` for
swapping a pretrained model's ``nn.Linear`` / ``nn.Conv2d`` for these layers.
"""
from . import functional
from .backends import BackendStatus, available_backends, use_backend
from .convert import (
    ConversionReport,
    condition,
    convert,
    freeze_base,
    modulation_parameters,
    named_modulation_parameters,
    set_backend,
)
from .functional import (
    mixture_conv2d,
    mixture_linear,
    mod_conv2d,
    mod_linear,
    modulated_conv2d,
    modulated_linear,
)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "available_backends",
    "use_backend",
    "BackendStatus",
    "mod_linear",
    "mod_conv2d",
    "modulated_linear",
    "mixture_linear",
    "modulated_conv2d",
    "mixture_conv2d",
    "convert",
    "condition",
    "freeze_base",
    "modulation_parameters",
    "named_modulation_parameters",
    "set_backend",
    "ConversionReport",
]
