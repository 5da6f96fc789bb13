"""modweights: layers whose weights are computed from their input ("weights of weights").

See :mod:`modweights.functional` for the ops, :mod:`modweights.nn` for the layers and
:mod:`modweights.backends` for choosing an implementation, and :mod:`modweights.convert` for
swapping a pretrained model's ``nn.Linear`` / ``nn.Conv2d`` for these layers.
"""
from . import functional
from .backends import BackendStatus, available_backends, use_backend
# the package re-exports the ops and the conversion API; each module's __all__ is the one list
from .convert import *  # noqa: F401,F403
from .convert import __all__ as _convert_all
from .functional import *  # noqa: F401,F403

__version__ = "0.1.0"

__all__ = ["functional", "available_backends", "use_backend", "BackendStatus", *functional.__all__, *_convert_all]
