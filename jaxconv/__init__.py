"""jaxconv: convnet layers whose backward passes are hand-derived, verified custom_vjp rules."""

from . import reference, verify
from . import matrix
from .conv import conv2d

__version__ = "0.1.0"

__all__ = ["conv2d", "matrix", "reference", "verify", "__version__"]
