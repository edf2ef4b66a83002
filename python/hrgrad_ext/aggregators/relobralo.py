"""ReLoBRaLo: relative loss balancing with random lookback (Bischof and Kraus, 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_finite_number, is_integer, is_number
from ._base import register
from ._weighting import LossWeighting, keep_if, loss_ratio

__all__ = ["ReLoBRaLo"]


@register("relobralo")
class ReLoBRaLo(LossWeighting):
    """ReLoBRaLo (R. Bischof, M. Kraus, "Multi-Objective Loss Balancing for Physics-Informed
    Deep Learning", arXiv:2110.09813, 2021; Comput. Methods Appl. Mech. Engrg. 439, 2025),
    Section "Relative Loss Balancing with Random Lookback". With ``m = K`` losses ``L_i(t)``:

    * balancing against a past step ``t'`` (a softmax of the loss ratios, temperature ``T``)::

          lam_bal_i(t, t') = m exp(L_i(t) / (T L_i(t'))) / sum_j exp(L_j(t) / (T L_j(t')))

    * the random lookback: ``rho`` is a Bernoulli draw with mean ``expected_rho`` each step;
      ``rho = 0`` looks back to the first step::

          lam_hist_i(t) = rho lam_i(t - 1) + (1 - rho) lam_bal_i(t, 0)

    * the exponential average with the step before::

          lam_i(t) = alpha lam_hist_i(t) + (1 - alpha) lam_bal_i(t, t - 1)

    ``lam_i(0) = 1``; the update is ``sum_i lam_i(t) grad L_i(t)`` (weights sum to ``m``). A task
    whose loss fell least relative to the previous step (and to the start) gets the largest
    weight. Only the losses enter: the gradients are not looked at, so the cost per step is
    O(K) on top of the task gradients.

    Defaults: ``alpha = 0.999``, ``expected_rho = 0.999``, ``temperature = 0.1``, the values of
    the paper's experiments as we read them (NVIDIA PhysicsNeMo ships ``alpha = 0.95``,
    ``beta = 0.99``, ``tau = 1``). The equation numbers of the paper could not be checked when
    this was written; the formulas above are the definition used here.

    The Bernoulli draws come from a CPU generator seeded with ``seed`` (no device
    synchronisation; its state is part of a training checkpoint, as PCGrad's). A step whose
    losses are not finite leaves the state unchanged. Needs the task losses of every step
    (:meth:`observe_losses`).
    """

    _state = ("lambdas", "previous_losses", "initial_losses")

    def __init__(self, alpha: float = 0.999, expected_rho: float = 0.999, temperature: float = 0.1, seed: int = 0):
        for name, value in (("alpha", alpha), ("expected_rho", expected_rho)):
            if not (is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"ReLoBRaLo: {name} must be a number in [0, 1], got {value!r}")
        if not (is_finite_number(temperature) and temperature > 0):
            raise ValueError(f"ReLoBRaLo: temperature must be a finite number > 0, got {temperature!r}")
        if not is_integer(seed, 0):
            raise ValueError(f"ReLoBRaLo: seed must be an integer >= 0, got {seed!r}")
        super().__init__()
        self.alpha, self.expected_rho, self.temperature, self.seed = float(alpha), float(expected_rho), float(temperature), seed
        self.generator = torch.Generator().manual_seed(seed)
        self.lambdas: Tensor | None = None
        self.previous_losses: Tensor | None = None
        self.initial_losses: Tensor | None = None

    def _balance(self, losses: Tensor, reference: Tensor) -> Tensor:
        return losses.numel() * torch.softmax(loss_ratio(losses, reference) / self.temperature, dim=0)

    def _step(self, G: Tensor, L: Tensor, ok: Tensor) -> Tensor:
        if self.lambdas is None:
            self.lambdas = torch.ones_like(L)
            self.previous_losses = torch.full_like(L, float("nan"))
            self.initial_losses = torch.full_like(L, float("nan"))
        # before the first finite step there is nothing to look back to: the ratios are 1
        first = torch.isnan(self.initial_losses)
        initial = torch.where(first, L, self.initial_losses)
        previous = torch.where(torch.isnan(self.previous_losses), L, self.previous_losses)
        rho = float(torch.rand((), generator=self.generator) < self.expected_rho)
        history = rho * self.lambdas + (1.0 - rho) * self._balance(L, initial)
        lambdas = self.alpha * history + (1.0 - self.alpha) * self._balance(L, previous)
        self.lambdas = keep_if(ok, lambdas, self.lambdas)
        self.previous_losses = keep_if(ok, L, self.previous_losses)
        self.initial_losses = keep_if(ok & first, L, self.initial_losses)
        return lambdas

    def __repr__(self) -> str:
        return (f"ReLoBRaLo(alpha={self.alpha:g}, expected_rho={self.expected_rho:g}, "
                f"temperature={self.temperature:g}, seed={self.seed})")
