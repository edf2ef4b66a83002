"""HRGrad, the project's method (spec HRGRAD.md), through the fused ``hrgrad_weights`` op."""

from __future__ import annotations

from torch import Tensor

from ..ops.gram import LENGTH_MODELS, hrgrad_weights_ex
from ._base import register
from ._cone import SolverAggregator

__all__ = ["HRGrad"]


@register("hrgrad")
class HRGrad(SolverAggregator):
    """Harmonized rotational gradient.

    The update makes the same angle with every task gradient and never conflicts with any
    (``g . g_i >= 0``); its length follows ``length_model``. When the task gradients are
    linearly dependent and the equal-angle direction would conflict, the direction is the exact
    projection of the mean unit gradient onto the cone of non-conflicting updates instead
    (``Status.FALLBACK``), and zero when that cone holds no non-zero update
    (``Status.ZERO_UPDATE``). Computed from the Gram matrix by the fused ``hrgrad_weights``
    kernel; the update does not depend on the order of the tasks.

    Args:
        length_model: ``"projection"`` (default), ``"min"``, ``"max"``, ``"harmonic"``,
            ``"arithmetic"`` or ``"geometric"``.
        rcond, check_finite: see :class:`~hrgrad_ext.aggregators.SolverAggregator`.
    """

    def __init__(self, length_model: str = "projection", rcond: float | None = None, check_finite: bool = True):
        if length_model not in LENGTH_MODELS:
            raise ValueError(f"HRGrad: unknown length_model {length_model!r}; expected one of {LENGTH_MODELS}")
        super().__init__(rcond, check_finite)
        self.length_model = length_model

    def _solve(self, G: Tensor) -> tuple[Tensor, Tensor]:
        return hrgrad_weights_ex(G, self.length_model, self.rcond)

    def __repr__(self) -> str:
        return f"HRGrad(length_model={self.length_model!r})"
