"""SoftAdapt: a softmax of the rates of change of the task losses (Heydari, Thompson, Mehmood,
2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_finite_number
from ._base import register
from ._weighting import LossWeighting, keep_if

__all__ = ["SoftAdapt"]

VARIANTS = ("original", "normalized", "loss_weighted")


@register("softadapt")
class SoftAdapt(LossWeighting):
    """SoftAdapt (A. A. Heydari, C. A. Thompson, A. Mehmood, "SoftAdapt: Techniques for Adaptive
    Loss Weighting of Neural Networks with Multi-Part Loss Functions", arXiv:1912.12355, 2019,
    Section 3.1). With ``s_i = L_i(t) - L_i(t - 1)`` the rate of change of each loss (first-order
    finite difference between consecutive steps):

    * ``"original"`` (Section 3.1.1): ``w_i = exp(beta s_i) / sum_j exp(beta s_j)``;
    * ``"normalized"`` (normalised slopes): the same with ``s_i / sum_j |s_j|``;
    * ``"loss_weighted"``: ``w_i = L_i exp(beta s_i) / sum_j L_j exp(beta s_j)``.

    ``beta > 0`` favours the losses that fall slowest or rise; the weights sum to 1 (the update
    is ``sum_i w_i g_i``) and are uniform at the first step. Only the losses enter: O(K) per step
    on top of the task gradients. Default ``beta = 0.1`` (the authors' package and experiments),
    ``variant = "original"``. With that ``beta`` and losses of order 1e-2 the slopes are
    ~1e-4 and the weights stay within ~1e-5 of 1/K: SoftAdapt is then the mean of the
    gradients; the normalised variant makes ``beta`` act on slopes of order 1. The equation
    numbers of the paper could not be checked when this was written; the formulas above are
    the definition used here.

    Needs the task losses of every step (:meth:`observe_losses`); a step whose losses are not
    finite leaves the state unchanged.
    """

    _state = ("previous_losses",)

    def __init__(self, beta: float = 0.1, variant: str = "original"):
        if variant not in VARIANTS:
            raise ValueError(f"SoftAdapt: unknown variant {variant!r}; expected one of {VARIANTS}")
        if not is_finite_number(beta):
            raise ValueError(f"SoftAdapt: beta must be a finite number, got {beta!r}")
        super().__init__()
        self.beta, self.variant = float(beta), variant
        self.previous_losses: Tensor | None = None

    def _step(self, G: Tensor, L: Tensor, ok: Tensor) -> Tensor:
        if self.previous_losses is None:
            self.previous_losses = torch.full_like(L, float("nan"))
        previous = torch.where(torch.isnan(self.previous_losses), L, self.previous_losses)
        slopes = L - previous
        if self.variant == "normalized":
            total = slopes.abs().sum()
            slopes = torch.where(total > 0, slopes / torch.where(total > 0, total, 1.0), slopes)
        z = self.beta * slopes
        e = torch.exp(z - z.max())
        if self.variant == "loss_weighted":
            e = L * e
        total = e.sum()
        w = torch.where(total > 0, e / torch.where(total > 0, total, 1.0), torch.full_like(e, 1.0 / e.numel()))
        self.previous_losses = keep_if(ok, L, self.previous_losses)
        return w

    def __repr__(self) -> str:
        return f"SoftAdapt(beta={self.beta:g}, variant={self.variant!r})"
