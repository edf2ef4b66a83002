"""The linear transport problem in diffusive scaling (spec KINETIC.md, section 1)."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

from ..reference import transport as _ref
from ._base import KineticProblem
from ..ops import gauss_legendre

__all__ = ["LinearTransport"]


class LinearTransport(KineticProblem):
    """``eps f_t + v f_x = (<f> - f) / eps`` on ``x in [0, 1]``, ``v in [-1, 1]``.

    Data: ``f(0, x, v) = 0``; inflow ``f(t, 0, v > 0) = 1`` and ``f(t, 1, v < 0) = 0``.
    Velocity quadrature: ``nv``-node (default 30) Gauss-Legendre on [-1, 1] with the average
    ``<phi> = 1/2 sum_k w_k phi(v_k)`` (:meth:`average`).

    Model interface for :meth:`evaluate`: ``model_fn(t, x, eps) -> {"rho": tensor}`` with the
    density at the given points (see :meth:`KineticProblem.evaluate`).

    ``reference(eps)`` is :func:`hrgrad_ext.reference.solve_transport` at ``t_final`` on its
    default grid (300 cells, every third centre being a centre of the 100-cell grid of the
    published references; 32 ordinates, or 64 with the exact uncollided part when the fronts
    are still present, e.g. eps = 1), cached on disk; for eps < 1e-6 it is the diffusion limit on
    the same cell centres.  ``reference_options`` are passed to the solver (e.g. a coarse ``nx``
    in tests).
    """

    x_range = (0.0, 1.0)
    v_range = (-1.0, 1.0)

    def __init__(self, t_final: float = 0.1, nv: int = 30, dtype: Optional[torch.dtype] = None,
                 device=None, reference_options: Optional[dict] = None):
        super().__init__(t_final, dtype, device)
        self.nv = int(nv)
        self.v, self.w = gauss_legendre(self.nv, -1.0, 1.0, dtype=self.dtype, device=self.device)
        self.reference_options = dict(reference_options or {})

    @property
    def quadrature(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nodes, weights) of the velocity rule; weights sum to 2."""
        return self.v, self.w

    def average(self, phi: torch.Tensor) -> torch.Tensor:
        """``<phi> = 1/2 sum_k w_k phi[..., k]`` over a trailing velocity axis."""
        return 0.5 * (phi * self.w).sum(-1)

    # -- data ----------------------------------------------------------------------------------
    @staticmethod
    def initial_f(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Initial distribution (zero), broadcast over ``x`` and ``v``."""
        return torch.zeros(torch.broadcast_shapes(x.shape, v.shape), dtype=x.dtype, device=x.device)

    def inflow_mask(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """True where (x, v) is an inflow boundary point: x = 0 with v > 0 or x = 1 with v < 0."""
        return ((x == self.x_range[0]) & (v > 0)) | ((x == self.x_range[1]) & (v < 0))

    def boundary_f(self, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Inflow data: 1 at x = 0 (for v > 0), 0 at x = 1 (for v < 0); broadcast over inputs.

        Only meaningful where :meth:`inflow_mask` is True (it is 0 elsewhere).
        """
        shape = torch.broadcast_shapes(t.shape, x.shape, v.shape)
        left = (x == self.x_range[0]) & (v > 0)
        return torch.where(left, 1.0, 0.0).to(x.dtype).expand(shape)

    @staticmethod
    def diffusion_limit(x: torch.Tensor, t) -> torch.Tensor:
        """The eps -> 0 density (series) at points x and time(s) t, as a tensor like x."""
        rho = _ref.diffusion_limit(x.detach().cpu().double().numpy(),
                                   t.detach().cpu().double().numpy() if torch.is_tensor(t) else t)
        return torch.as_tensor(rho, dtype=x.dtype, device=x.device)

    # -- reference / scoring -------------------------------------------------------------------
    def reference(self, eps: float):
        """The reference solution at ``t_final`` for this eps (a ``TransportResult``)."""
        eps = float(eps)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        key = (eps, self.t_final)
        if key not in self._refs:
            if eps < _ref.EPS_MIN:
                nx = self.reference_options.get("nx", _ref.DEFAULT_NX)
                x = (np.arange(nx) + 0.5) / nx
                self._refs[key] = _ref.TransportResult(
                    x=x, t=np.asarray(self.t_final), rho=_ref.diffusion_limit(x, self.t_final),
                    f=None, mu=None, w=None, eps=eps, nx=nx, nv=0, dt=0.0,
                    method="diffusion-limit", steps=0)
            else:
                opts = {"store_f": False, **self.reference_options}
                self._refs[key] = _ref.solve_transport(eps, self.t_final, **opts)
        return self._refs[key]

    def _reference_fields(self, ref) -> dict[str, np.ndarray]:
        return {"rho": ref.rho}

    def _predicted_fields(self, pred: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "rho" not in pred:
            raise KeyError("model_fn must return {'rho': tensor} for LinearTransport")
        return {"rho": pred["rho"]}
