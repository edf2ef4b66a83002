"""PCGrad: projecting conflicting gradients, in a seeded random order."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator, register

__all__ = ["PCGrad"]


@register("pcgrad")
class PCGrad(GramianAggregator):
    """PCGrad (Yu et al., 2020): project each gradient off the gradients it conflicts with.

    Written on the Gram matrix: each projected gradient ``g_i' = J^T c_i`` is tracked by its
    coefficients ``c_i`` and its dot products ``h_i = G c_i`` with every task gradient. The
    projection order is a random permutation per task, drawn from a CPU generator seeded with
    ``seed``: the same seed gives the same sequence of updates on every device, and the
    generator's state is part of a training checkpoint. The order makes PCGrad depend on the
    order of the tasks, and it can conflict with a task; it is linear under positive scaling of
    the gradients for a fixed draw. Runs on the CPU in float64 (one host synchronisation).
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def weights_from_gram(self, G: Tensor) -> Tensor:
        G64 = G.to(torch.float64).cpu()
        K = G64.shape[0]
        diag = G64.diagonal()
        coeffs = torch.eye(K, dtype=torch.float64)
        for i in range(K):
            h = G64[i].clone()  # g_i' . g_j for every j
            for j in torch.randperm(K, generator=self.generator).tolist():
                if j == i or diag[j] <= 0 or h[j] >= 0:
                    continue
                step = h[j] / diag[j]
                coeffs[i, j] -= step
                h -= step * G64[j]
        return coeffs.sum(0).to(G.device)

    def __repr__(self) -> str:
        return f"PCGrad(seed={self.seed})"
