"""GradNorm: task weights trained so that the weighted gradient norms follow the training rates
(Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_finite_number
from ._base import register
from ._weighting import LossWeighting, keep_if, loss_ratio

__all__ = ["GradNorm"]


@register("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm (Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, Section
    3.2 and Algorithm 1). With trainable task weights ``w_i`` (``w_i(0) = 1``):

    * ``G_i = |grad w_i L_i| = w_i |g_i|``, ``G_bar = mean_i G_i``;
    * the inverse training rates ``L~_i = L_i(t) / L_i(0)``, ``r_i = L~_i / mean_j L~_j``;
    * Eq. (1): the target of each weighted norm is ``G_bar r_i^alpha``;
    * Eq. (2): ``L_grad = sum_i |G_i - G_bar r_i^alpha|``, the targets held constant; the
      weights take a gradient step on it and are renormalised to ``sum_i w_i = K``.

    The update of the step is ``sum_i w_i(t) g_i`` with the weights before their own step
    (Algorithm 1). Two choices the paper leaves open, made here: the norms are those of the
    gradients with respect to all shared parameters (the paper uses the last shared layer to
    save a backward pass; here the full task gradients exist anyway, and ``|g_i|^2`` is the
    diagonal of the Gram matrix, so GradNorm costs O(K) on top of them and works from ``G``
    alone, also in sharded distributed training); and the weights take an Adam step (betas
    0.9, 0.999, as common implementations do, the ReLoBRaLo authors' among them) of size
    ``lr`` on ``L_grad / G_bar``, whose gradient ``sign(G_i - target_i) |g_i| / G_bar`` is the
    paper's made independent of the scale of the gradients. Weights are kept >= 0 before the
    renormalisation.

    Defaults: ``alpha = 1.5`` (the paper's NYUv2 experiments; 0.12 on its synthetic tasks),
    ``lr = 0.025`` (the paper gives no step size for the weights). Needs the task losses of every
    step (:meth:`observe_losses`); a step whose losses or gradient norms are not finite leaves
    the weights and their optimiser state unchanged.
    """

    _state = ("task_weights", "initial_losses", "exp_avg", "exp_avg_sq", "steps")
    BETAS = (0.9, 0.999)

    def __init__(self, alpha: float = 1.5, lr: float = 0.025):
        if not (is_finite_number(alpha) and alpha >= 0):
            raise ValueError(f"GradNorm: alpha must be a finite number >= 0, got {alpha!r}")
        if not (is_finite_number(lr) and lr > 0):
            raise ValueError(f"GradNorm: lr must be a finite number > 0, got {lr!r}")
        super().__init__()
        self.alpha, self.lr = float(alpha), float(lr)
        self.task_weights: Tensor | None = None
        self.initial_losses: Tensor | None = None
        self.exp_avg: Tensor | None = None
        self.exp_avg_sq: Tensor | None = None
        self.steps = 0

    def _step(self, G: Tensor, L: Tensor, ok: Tensor) -> Tensor:
        K = L.numel()
        if self.task_weights is None:
            self.task_weights = torch.ones_like(L)
            self.initial_losses = torch.full_like(L, float("nan"))
            self.exp_avg = torch.zeros_like(L)
            self.exp_avg_sq = torch.zeros_like(L)
        first = torch.isnan(self.initial_losses)
        initial = torch.where(first, L, self.initial_losses)
        w = self.task_weights
        norms = G.diagonal().clamp_min(0).sqrt()
        weighted = w * norms
        mean_norm = weighted.mean()
        rates = loss_ratio(L, initial)
        mean_rate = rates.mean()
        r = torch.where(mean_rate > 0, rates / torch.where(mean_rate > 0, mean_rate, 1.0), torch.ones_like(rates))
        target = mean_norm * r ** self.alpha
        scale = torch.where(mean_norm > 0, 1.0 / torch.where(mean_norm > 0, mean_norm, 1.0), 0.0)
        grad = torch.sign(weighted - target) * norms * scale
        # Adam; t counts every call (whether the step was finite is known on the device only)
        b1, b2 = self.BETAS
        t = self.steps + 1
        exp_avg = b1 * self.exp_avg + (1 - b1) * grad
        exp_avg_sq = b2 * self.exp_avg_sq + (1 - b2) * grad * grad
        step = self.lr * (exp_avg / (1 - b1**t)) / ((exp_avg_sq / (1 - b2**t)).sqrt() + 1e-8)
        stepped = (w - step).clamp_min(0.0)
        total = stepped.sum()
        renormalised = torch.where(total > 0, stepped * (K / torch.where(total > 0, total, 1.0)), torch.ones_like(w))
        self.task_weights = keep_if(ok, renormalised, w)
        self.exp_avg = keep_if(ok, exp_avg, self.exp_avg)
        self.exp_avg_sq = keep_if(ok, exp_avg_sq, self.exp_avg_sq)
        self.initial_losses = keep_if(ok & first, L, self.initial_losses)
        self.steps += 1
        return w

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha:g}, lr={self.lr:g})"
