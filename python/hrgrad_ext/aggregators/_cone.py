"""What the aggregators built on the exact Gram-form solvers (HRGrad, UPGrad, MGDA) share:
the ``rcond`` cut-off, the status of the last call, and the optional check for non-finite
gradients."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from ..ops.gram import Status
from ._base import GramianAggregator

__all__ = ["SolverAggregator"]


class SolverAggregator(GramianAggregator):
    """A Gramian aggregator whose weights come from one of the float64 K x K solver ops.

    Args:
        rcond: eigenvalues of the (cosine) Gram matrix below ``rcond`` times the largest count
            as zero; default ``10 * K * eps(G.dtype)``.
        check_finite: raise ``ValueError`` on NaN/Inf gradients. This reads the status on the
            host (one synchronisation); pass ``False`` inside CUDA graphs, where non-finite
            gradients then give NaN weights.

    After each call, ``last_status`` holds the :class:`~hrgrad_ext.ops.Status` tensor.
    """

    def __init__(self, rcond: float | None = None, check_finite: bool = True):
        self.rcond = rcond
        self.check_finite = check_finite
        self.last_status: Tensor | None = None

    @abstractmethod
    def _solve(self, G: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, status)`` for the float64 Gram matrix ``G``."""

    def weights_from_gram(self, G: Tensor) -> Tensor:
        w, status = self._solve(G.to(torch.float64))
        self.last_status = status
        if self.check_finite and bool((status & int(Status.NON_FINITE)).any()):
            raise ValueError(f"{type(self).__name__}: the task gradients contain NaN or Inf")
        return w
