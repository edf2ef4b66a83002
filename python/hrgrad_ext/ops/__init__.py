"""The custom ops of ``torch.ops.hrgrad_ext`` with validated Python wrappers.

Importing this module registers the fake (meta) kernels and the vmap rules of the ops, so
they work with ``torch.compile`` and ``torch.vmap``. Their autograd (reverse and forward
mode, every ``torch.func`` transform) is the C++ library ``csrc/autograd`` under the torch the
extension was built with, and the Python kernels of :mod:`._autograd` (same semantics) under
any other torch: ``hrgrad_ext.build_info()["autograd"]`` says which.

- HRGrad kernels (:mod:`.gram`): ``gram``, ``hrgrad_weights`` / ``hrgrad_weights_ex``,
  ``combine``, ``hrgrad`` / ``hrgrad_ex`` and the per-parameter ``gram_of_list`` /
  ``combine_into_grads``.
- Exact cone solves (:mod:`.cone`): ``dual_cone_weights`` (projection onto the dual cone of the
  task gradients: UPGrad) and ``mgda_weights`` (minimum-norm point of their convex hull).
- Velocity-space quadrature of the APNN residuals (:mod:`.kinetic`): ``velocity_moments``,
  ``maxwellian``, ``bgk_residuals``, ``transport_mm_residuals``, their loss forms
  ``bgk_residuals_sq`` / ``transport_mm_residuals_sq``, plus ``gauss_legendre``.
"""

from .cone import dual_cone_weights, mgda_weights
from .gram import (
    LENGTH_MODELS,
    HRGradResult,
    Status,
    WeightsResult,
    combine,
    combine_into_grads,
    gram,
    gram_of_list,
    hrgrad,
    hrgrad_ex,
    hrgrad_weights,
    hrgrad_weights_ex,
)
from .kinetic import (
    bgk_residuals,
    bgk_residuals_sq,
    gauss_legendre,
    maxwellian,
    transport_mm_residuals,
    transport_mm_residuals_sq,
    velocity_moments,
)

from .._build import AUTOGRAD as _AUTOGRAD

if _AUTOGRAD == "python":
    from . import _autograd

    _autograd.register()

__all__ = [
    "HRGradResult",
    "LENGTH_MODELS",
    "Status",
    "WeightsResult",
    "bgk_residuals",
    "bgk_residuals_sq",
    "combine",
    "combine_into_grads",
    "dual_cone_weights",
    "gauss_legendre",
    "gram",
    "gram_of_list",
    "hrgrad",
    "hrgrad_ex",
    "hrgrad_weights",
    "hrgrad_weights_ex",
    "maxwellian",
    "mgda_weights",
    "transport_mm_residuals",
    "transport_mm_residuals_sq",
    "velocity_moments",
]
