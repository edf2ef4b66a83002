"""Sum of the task gradients: plain multi-task (plain APNN) training."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator, register

__all__ = ["Sum"]


@register("sum")
class Sum(GramianAggregator):
    """Plain sum of the task gradients (ordinary multi-task / plain APNN training)."""

    def weights_from_gram(self, G: Tensor) -> Tensor:
        return torch.ones(G.shape[-1], dtype=torch.float64, device=G.device)
