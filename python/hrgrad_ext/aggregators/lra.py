"""Learning-rate annealing: loss weights from gradient statistics (Wang, Teng, Perdikaris,
2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_integer, is_number
from ._base import Aggregator, check_matrix, register
from ._weighting import TensorState, keep_if

__all__ = ["LearningRateAnnealing"]


@register("lra")
class LearningRateAnnealing(TensorState, Aggregator):
    """Learning-rate annealing (S. Wang, Y. Teng, P. Perdikaris, "Understanding and mitigating
    gradient pathologies in physics-informed neural networks", SIAM J. Sci. Comput. 43(5),
    A3055-A3081, 2021; arXiv:2001.04536, Algorithm 1). Each step, with ``g_i`` the gradient of
    task ``i`` over all parameters ``theta``:

    * step (a), the weight estimate: ``lam_hat_i = max_theta |g_ref| / mean_theta |g_i|``;
    * step (b), the moving average: ``lam_i = (1 - alpha) lam_i + alpha lam_hat_i``;

    and the update is ``sum_i lam_i g_i`` with the new weights (``lam_i = 1`` at the start). It
    scales every task so that the mean magnitude of its weighted gradient matches the largest
    gradient entry of the reference. In the paper the reference is the PDE residual, whose
    weight stays 1: give its task index as ``reference``. The task sets here (one task per eps,
    each with its residual, boundary and initial terms) have no such task, so by default
    (``reference=None``) the scale is the largest entry over all task gradients and every task is
    weighted, which balances the tasks against each other in the same way. The paper writes the
    denominator as ``mean |grad (lam_i L_i)|``; with the weight inside, the fixed point of the
    average would be the square root of the ratio, not the balance the text derives, so the
    weight is left out (as in the ReLoBRaLo authors' implementation of the method).

    Defaults: ``alpha = 0.9`` (the paper's recommendation), updated every step (``every = 1``,
    Algorithm 1). The authors' published code updates every 10 steps with weight 0.1 on the new
    estimate (``alpha = 0.1, every = 10``). Needs the task gradients themselves (their largest
    and mean absolute entries), not only the Gram matrix: the cost is O(K n) per step on top of
    them, like the Gram matrix; in sharded distributed training it is refused (as ConFIG).
    Stateful (the weights); a step whose gradients are not finite leaves them unchanged. The
    equation numbers of the paper could not be checked when this was written; the formulas
    above are the definition used here.
    """

    _state = ("lambdas", "steps")

    def __init__(self, alpha: float = 0.9, reference: int | None = None, every: int = 1):
        if not (is_number(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"LearningRateAnnealing: alpha must be in [0, 1], got {alpha}")
        if reference is not None and not is_integer(reference, 0):
            raise ValueError(f"LearningRateAnnealing: reference must be a task index >= 0 or None, got {reference!r}")
        if not is_integer(every, 1):
            raise ValueError(f"LearningRateAnnealing: every must be an integer >= 1, got {every!r}")
        self.alpha, self.reference, self.every = float(alpha), reference, every
        self.lambdas: Tensor | None = None
        self.steps = 0

    def weights(self, J: Tensor) -> Tensor:
        check_matrix(J)
        K = J.shape[0]
        if self.reference is not None and self.reference >= K:
            raise ValueError(f"LearningRateAnnealing: reference task {self.reference} for {K} tasks")
        if self.lambdas is None:
            self.lambdas = torch.ones(K, dtype=torch.float64, device=J.device)
        self._state_to(J.device)
        if self.lambdas.numel() != K:
            raise ValueError(f"LearningRateAnnealing: {K} task gradients, but the weights are for "
                             f"{self.lambdas.numel()} tasks")
        magnitude = J.detach().abs()
        peak = magnitude.amax(dim=1).to(torch.float64)
        mean = magnitude.mean(dim=1, dtype=torch.float64)
        top = peak.max() if self.reference is None else peak[self.reference]
        estimate = torch.where(mean > 0, top / torch.where(mean > 0, mean, 1.0), self.lambdas)
        if self.reference is not None:
            estimate[self.reference] = 1.0
        if self.steps % self.every == 0:
            lambdas = (1.0 - self.alpha) * self.lambdas + self.alpha * estimate
        else:
            lambdas = self.lambdas
        self.lambdas = keep_if(torch.isfinite(lambdas).all(), lambdas, self.lambdas)
        self.steps += 1
        return lambdas

    def __repr__(self) -> str:
        return f"LearningRateAnnealing(alpha={self.alpha:g}, reference={self.reference}, every={self.every})"
