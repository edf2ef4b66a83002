"""UPGrad (TorchJD): the mean of the projections of the task gradients onto the dual cone."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.cone import dual_cone_weights
from ..ops.gram import Status
from ._base import register
from ._cone import SolverAggregator

__all__ = ["UPGrad"]


@register("upgrad")
class UPGrad(SolverAggregator):
    """UPGrad (Quinton and Rey, 2024): the mean of the projections of every task gradient onto
    the cone ``{x : J x >= 0}`` of updates that conflict with no task.

    Each projection is an exact non-negative least-squares solve on the Gram matrix
    (:func:`~hrgrad_ext.ops.dual_cone_weights`, one batched op on G's device, no host
    synchronisation besides ``check_finite``). Non-conflicting, independent of the order of the
    tasks, linear under positive scaling of the gradients, and non-zero whenever some
    non-conflicting update improves a task. ``last_status`` holds the flags of the K
    projections combined: ``ZERO_UPDATE`` when all of them are zero, the other flags when any
    has them. Not differentiable (as in TorchJD): on gradients that require grad it raises;
    use it under ``torch.no_grad()`` or on detached gradients.

    Args: ``rcond``, ``check_finite``, see :class:`~hrgrad_ext.aggregators.SolverAggregator`.
    """

    def _solve(self, G: Tensor) -> tuple[Tensor, Tensor]:
        K = G.shape[-1]
        eye = torch.eye(K, dtype=G.dtype, device=G.device).expand(*G.shape[:-2], K, K)
        W, status = dual_cone_weights(G, eye, self.rcond)
        # One status per aggregation: a flag when any projection has it, ZERO_UPDATE when all do.
        combined = torch.zeros_like(status[..., 0])
        for flag in (Status.ZERO_TASKS, Status.RANK_DEFICIENT, Status.NON_FINITE):
            combined |= ((status & int(flag)) != 0).any(dim=-1).to(status.dtype) * int(flag)
        zero = int(Status.ZERO_UPDATE)
        combined |= ((status & zero) != 0).all(dim=-1).to(status.dtype) * zero
        return W.mean(dim=-2), combined
