"""Custom ops of hrgrad-ext (torch.ops.hrgrad_ext) with their Python wrappers."""

from .kinetic import *  # noqa: F401,F403
from .kinetic import __all__ as _kinetic_all

__all__ = list(_kinetic_all)
