"""Mean of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator, register

__all__ = ["Mean"]


@register("mean")
class Mean(GramianAggregator):
    """Mean of the task gradients."""

    def weights_from_gram(self, G: Tensor) -> Tensor:
        K = G.shape[-1]
        return torch.full((K,), 1.0 / K, dtype=torch.float64, device=G.device)
