"""Multi-task gradient aggregators with one interface.

Every aggregator maps a Jacobian ``J`` (``[K, n]``, one task gradient per row) to an update
``[n]`` via :meth:`Aggregator.__call__`, and can report the weights ``w`` with
``update = J^T w`` (:meth:`Aggregator.weights`). Aggregators whose weights depend on ``J`` only
through its Gram matrix ``G = J J^T`` derive from :class:`GramianAggregator` and also accept
``G`` directly (:meth:`GramianAggregator.weights_from_gram`): that is what lets
:func:`hrgrad_ext.backward` work on models whose parameters live in many tensors without ever
concatenating their gradients.

``ConFIG`` is the pseudo-inverse formulation of the ``conflictfree`` package on the K x n
matrix (a reference and a baseline); ``HRGrad`` computes the same update from the Gram matrix
with the fused kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .ops.gram import LENGTH_MODELS, Status, combine, gram, hrgrad_weights_ex

__all__ = [
    "Aggregator",
    "ConFIG",
    "GramianAggregator",
    "HRGrad",
    "MGDA",
    "Mean",
    "PCGrad",
    "Sum",
    "UPGrad",
]


def _check_matrix(J) -> None:
    if not isinstance(J, Tensor):
        raise TypeError(f"aggregator input must be a torch.Tensor, got {type(J).__name__}")
    if J.dim() != 2:
        raise ValueError(f"aggregator input must be a matrix [K, n], got shape {tuple(J.shape)}")
    if J.shape[0] == 0 or J.shape[1] == 0:
        raise ValueError(f"aggregator input must have K >= 1 tasks and n >= 1 parameters, got {tuple(J.shape)}")
    if not J.is_floating_point():
        raise TypeError(f"aggregator input must be floating point, got {J.dtype}")


class Aggregator(ABC):
    """Maps task gradients ``J [K, n]`` to one update ``[n]``."""

    def __call__(self, J: Tensor) -> Tensor:
        _check_matrix(J)
        return combine(J, self.weights(J).to(J.dtype))

    @abstractmethod
    def weights(self, J: Tensor) -> Tensor:
        """Weights ``w [K]`` (float64) with ``update = J^T w``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GramianAggregator(Aggregator):
    """An aggregator whose weights are a function of the Gram matrix ``J J^T`` alone."""

    def weights(self, J: Tensor) -> Tensor:
        _check_matrix(J)
        return self.weights_from_gram(gram(J, dtype=torch.float64))

    @abstractmethod
    def weights_from_gram(self, G: Tensor) -> Tensor:
        """Weights ``w [K]`` from the Gram matrix ``G [K, K]``."""


class Sum(GramianAggregator):
    """Plain sum of the task gradients (ordinary multi-task / plain APNN training)."""

    def weights_from_gram(self, G: Tensor) -> Tensor:
        return torch.ones(G.shape[-1], dtype=torch.float64, device=G.device)


class Mean(GramianAggregator):
    """Mean of the task gradients."""

    def weights_from_gram(self, G: Tensor) -> Tensor:
        K = G.shape[-1]
        return torch.full((K,), 1.0 / K, dtype=torch.float64, device=G.device)


class HRGrad(GramianAggregator):
    """Harmonized rotational gradient (the project's method; spec HRGRAD.md).

    The update makes the same angle with every task gradient and never conflicts with any
    (``g . g_i > 0``) when the task gradients are linearly independent; its length follows
    ``length_model``. Computed from the Gram matrix by the fused ``hrgrad_weights`` kernel.

    Args:
        length_model: ``"projection"`` (default), ``"min"``, ``"max"``, ``"harmonic"``,
            ``"arithmetic"`` or ``"geometric"``.
        rcond: relative eigenvalue cut-off of the pseudo-inverse (default from G's dtype).
        check_finite: raise ``ValueError`` on NaN/Inf gradients. This reads the status on
            the host (one synchronisation); pass ``False`` inside CUDA graphs, where
            non-finite gradients then give NaN weights.

    After each call, ``last_status`` holds the :class:`~hrgrad_ext.ops.Status` tensor.
    """

    def __init__(self, length_model: str = "projection", rcond: float | None = None, check_finite: bool = True):
        if length_model not in LENGTH_MODELS:
            raise ValueError(f"HRGrad: unknown length_model {length_model!r}; expected one of {LENGTH_MODELS}")
        self.length_model = length_model
        self.rcond = rcond
        self.check_finite = check_finite
        self.last_status: Tensor | None = None

    def weights_from_gram(self, G: Tensor) -> Tensor:
        w, status = hrgrad_weights_ex(G.to(torch.float64), self.length_model, self.rcond)
        self.last_status = status
        if self.check_finite and bool((status & int(Status.NON_FINITE)).any()):
            raise ValueError("HRGrad: the task gradients contain NaN or Inf")
        return w

    def __repr__(self) -> str:
        return f"HRGrad(length_model={self.length_model!r})"


class ConFIG(Aggregator):
    """ConFIG as in the ``conflictfree`` package: pseudo-inverse of the K x n matrix.

    ``u = normalise(pinv(Jhat) 1)`` with ``Jhat`` the row-normalised Jacobian, and the update
    is ``u * sum_i g_i . u`` (projection length). Computed in float64 with
    ``torch.linalg.pinv`` on the whole matrix: a reference for :class:`HRGrad` and a baseline
    whose cost grows with ``n``, not a fast path.
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

    def __call__(self, J: Tensor) -> Tensor:
        _check_matrix(J)
        return self._update64(J).to(J.dtype)

    def weights(self, J: Tensor) -> Tensor:
        _check_matrix(J)
        # The update lies in the row space of J, so these weights reproduce it exactly.
        return torch.linalg.pinv(J.to(torch.float64).T) @ self._update64(J)


class PCGrad(GramianAggregator):
    """PCGrad (Yu et al., 2020): project each gradient off the gradients it conflicts with.

    Written on the Gram matrix: each projected gradient is tracked by its coefficients in the
    task basis, so ``g_i' . g_j = (G c_i)_j``. The projection order is a random permutation per
    task, drawn from a generator seeded with ``seed`` (reproducible runs).
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def weights_from_gram(self, G: Tensor) -> Tensor:
        G64 = G.to(torch.float64).cpu()
        K = G64.shape[0]
        coeffs = torch.eye(K, dtype=torch.float64)
        for i in range(K):
            for j in torch.randperm(K, generator=self.generator).tolist():
                if j == i or G64[j, j] <= 0:
                    continue
                dot = (G64 @ coeffs[i])[j]
                if dot < 0:
                    coeffs[i, j] -= dot / G64[j, j]
        return coeffs.sum(0).to(G.device)


def _nonneg_qp(G: Tensor, q: Tensor, sweeps: int = 500) -> Tensor:
    """Solves ``min_{x >= 0} 1/2 x^T G x + q^T x`` for each column of ``q`` [K, m] by projected
    Gauss-Seidel (converges for positive semi-definite G). Rows with G_ii = 0 stay at 0."""
    K = G.shape[0]
    x = torch.zeros_like(q)
    diag = G.diagonal()
    for _ in range(sweeps):
        prev = x.clone()
        for i in range(K):
            if diag[i] <= 0:
                continue
            gi = G[i] @ x + q[i]
            x[i] = torch.clamp(x[i] - gi / diag[i], min=0.0)
        if torch.max(torch.abs(x - prev)) <= 1e-13 * (1.0 + torch.max(torch.abs(x))):
            break
    return x


class UPGrad(GramianAggregator):
    """UPGrad (TorchJD): the mean of the projections of every task gradient onto the dual
    cone ``{x : J x >= 0}``, solved as K non-negative quadratic programs on the Gram matrix."""

    def weights_from_gram(self, G: Tensor) -> Tensor:
        G64 = G.to(torch.float64).cpu()
        K = G64.shape[0]
        eye = torch.eye(K, dtype=torch.float64)
        # project g_i: x = J^T (e_i + lam), lam >= 0 minimising 1/2 lam^T G lam + lam^T G e_i
        lam = _nonneg_qp(G64, G64 @ eye)
        return ((eye + lam).sum(1) / K).to(G.device)


class MGDA(GramianAggregator):
    """MGDA (Desideri; Sener & Koltun): the minimum-norm point of the convex hull of the task
    gradients, ``J^T a`` with ``a`` minimising ``a^T G a`` over the simplex.

    Solved through the equivalent non-negative problem ``min_{l >= 0} 1/2 l^T G l - 1^T l``
    (the min-norm point is proportional to ``J^T l``), by projected Gauss-Seidel: exact
    coordinate steps are invariant to the gradients' scales, so a 1000x norm imbalance does
    not slow it down the way Frank-Wolfe is slowed.
    """

    def __init__(self, sweeps: int = 2000):
        self.sweeps = sweeps

    def weights_from_gram(self, G: Tensor) -> Tensor:
        G64 = G.to(torch.float64).cpu()
        K = G64.shape[0]
        lam = _nonneg_qp(G64, -torch.ones(K, 1, dtype=torch.float64), self.sweeps)[:, 0]
        total = lam.sum()
        if not bool(total > 0) or not bool(torch.isfinite(total)):
            # 0 lies in the hull (or all gradients vanish): the min-norm point is 0
            return torch.zeros(K, dtype=torch.float64, device=G.device)
        a = lam / total
        return a.to(G.device)
