"""Problem definitions (domains, data, quadrature, samplers, scoring) for the kinetic equations.

* :class:`LinearTransport` - linear transport in diffusive scaling (spec section 1).
* :class:`BGK` - the BGK equation, cases I-V (spec section 2).

Both score a model against the cached reference solutions of :mod:`hrgrad_ext.reference` with
``evaluate(model_fn, eps)``; ``model_fn(t, x, eps)`` returns a dict of macroscopic tensors.
"""

from ._base import KineticProblem, relative_l2
from .bgk import BGK
from ..ops import gauss_legendre
from .transport import LinearTransport

__all__ = ["BGK", "KineticProblem", "LinearTransport", "gauss_legendre", "relative_l2"]
