"""MGDA: the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from torch import Tensor

from ..ops.cone import mgda_weights
from ._base import register
from ._cone import SolverAggregator

__all__ = ["MGDA"]


@register("mgda")
class MGDA(SolverAggregator):
    """MGDA (Desideri 2012; Sener and Koltun 2018): ``J^T a`` with ``a`` the convex weights of
    the minimum-norm point of the convex hull of the task gradients.

    Solved exactly on the Gram matrix (:func:`~hrgrad_ext.ops.mgda_weights`: least-distance
    form, finite active-set solve, float64, on G's device). The update conflicts with no task
    (``g_i . u >= |u|^2``) and is zero exactly when the hull contains 0, even if some
    non-conflicting update would improve a task. Not differentiable: on gradients that require
    grad it raises; use it under ``torch.no_grad()`` or on detached gradients.

    Args: ``rcond``, ``check_finite``, see :class:`~hrgrad_ext.aggregators.SolverAggregator`.
    """

    def _solve(self, G: Tensor) -> tuple[Tensor, Tensor]:
        return mgda_weights(G, self.rcond)
