"""ConFIG as in the ``conflictfree`` package: a reference for HRGrad and a baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregator, check_matrix, register

__all__ = ["ConFIG"]


@register("config")
class ConFIG(Aggregator):
    """ConFIG (Liu, Chu, Thuerey, 2025): pseudo-inverse of the K x n matrix.

    ``u = normalise(pinv(Jhat) 1)`` with ``Jhat`` the row-normalised Jacobian, and the update
    is ``u * sum_i g_i . u`` (projection length). Computed in float64 with
    ``torch.linalg.pinv`` on the whole matrix: a reference for :class:`HRGrad` and a baseline
    whose cost grows with ``n``, not a fast path. Like the package it has no fallback: on
    linearly dependent gradients ``pinv(Jhat) 1`` may conflict with a task (HRGrad does not).
    """

    def _update64(self, J: Tensor) -> Tensor:
        J64 = J.to(torch.float64)
        norms = J64.norm(dim=1)
        active = norms > 0
        if not bool(active.any()):
            return torch.zeros(J.shape[1], dtype=torch.float64, device=J.device)
        units = J64[active] / norms[active, None]
        direction = torch.linalg.pinv(units) @ torch.ones(units.shape[0], dtype=torch.float64, device=J.device)
        dn = direction.norm()
        if dn == 0:
            return torch.zeros_like(direction)
        u = direction / dn
        return u * (J64[active] @ u).sum()

    def __call__(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        check_matrix(J)
        return self._update64(J).to(J.dtype)

    def weights(self, J: Tensor) -> Tensor:
        check_matrix(J)
        # The update lies in the row space of J, so these weights reproduce it exactly.
        return torch.linalg.pinv(J.to(torch.float64).T) @ self._update64(J)
