"""The 1D-1V BGK problem in Euler scaling, cases I-V (spec KINETIC.md, section 2)."""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import torch

from ..reference import bgk as _ref
from ._base import KineticProblem
from ..ops import gauss_legendre

__all__ = ["BGK"]


class BGK(KineticProblem):
    """``Kn (f_t + v f_x) = M[rho, u, T] - f`` on ``x in [-0.5, 0.5]``, ``v in [-10, 10]``.

    ``case`` selects the initial profile, the default Kn and the time window: I-III Kn 1e-3,
    IV Kn 1, V (Riemann step) Kn 1e-2; t_final 0.1 (V: 0.05).  The initial state is
    ``q0(x) = q_L + (q_R - q_L) s(x)`` for q in (rho, u, T) with the left state (1.5, 0, 1.5) and
    the right state (0.625, 0, 0.75); ``f0 = M[q0]``.  The same states are the Dirichlet values at
    x = -0.5 / 0.5 (:meth:`boundary_state`), which the spec's networks build in.

    Velocity quadrature: ``nv``-node (default 64) Gauss-Legendre on [-10, 10], integrals
    ``sum_k w_k phi(v_k)`` (no 1/2; :meth:`moments`).

    Model interface for :meth:`evaluate`: ``model_fn(t, x, eps)`` (eps = Kn) returning either
    ``{"density", "momentum", "energy"}`` (rho, rho u, rho (u^2 + T) / 2) or the primitive
    ``{"rho", "u", "T"}``, which are converted.  Errors are reported for density, momentum and
    energy.  Task columns of the samplers hold Kn values.

    ``reference(kn)`` is :func:`hrgrad_ext.reference.solve_bgk` for this case at ``t_final``
    (default grid 1500 cells x 80 velocities, 120 for case V; zero-gradient boundaries like the
    published references; cached on disk).  ``reference_options`` are passed on to it, e.g.
    ``{"bc": "dirichlet"}`` for reservoirs at the boundaries (which the spec's networks mimic
    by building in the boundary states; for case I this changes the reference by ~1e-3).
    """

    x_range = (-0.5, 0.5)
    v_range = (-_ref.VMAX, _ref.VMAX)
    left_state = _ref.LEFT_STATE
    right_state = _ref.RIGHT_STATE

    def __init__(self, case: str = "IV", kn: Optional[float] = None,
                 t_final: Optional[float] = None, nv: int = 64,
                 dtype: Optional[torch.dtype] = None, device=None,
                 reference_options: Optional[dict] = None):
        case = _ref._check_case(case)
        _, kn_default, t_default = _ref.CASES[case]
        super().__init__(t_default if t_final is None else t_final, dtype, device)
        self.case = case
        self.kn = float(kn_default if kn is None else kn)
        if not self.kn > 0:
            raise ValueError(f"kn must be > 0, got {kn!r}")
        self.nv = int(nv)
        self.v, self.w = gauss_legendre(self.nv, *self.v_range, dtype=self.dtype,
                                        device=self.device)
        self.reference_options = dict(reference_options or {})

    @property
    def quadrature(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nodes, weights) of the velocity rule; weights sum to 20."""
        return self.v, self.w

    def moments(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(density, momentum, energy) = sum_k w_k (1, v_k, v_k^2 / 2) f[..., k]."""
        wf = f * self.w
        return wf.sum(-1), (wf * self.v).sum(-1), 0.5 * (wf * self.v ** 2).sum(-1)

    @staticmethod
    def maxwellian(rho: torch.Tensor, u: torch.Tensor, T: torch.Tensor,
                   v: torch.Tensor) -> torch.Tensor:
        """``rho / sqrt(2 pi T) exp(-(v - u)^2 / (2 T))`` (arguments broadcast)."""
        return rho / torch.sqrt(2.0 * math.pi * T) * torch.exp(-(v - u) ** 2 / (2.0 * T))

    # -- data ----------------------------------------------------------------------------------
    def profile(self, x: torch.Tensor) -> torch.Tensor:
        """The case's interpolation profile s(x) (0 at the left state, 1 at the right)."""
        return _ref.case_profile(self.case)(x)

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rho0, u0, T0) at points x."""
        s = self.profile(x)
        return tuple(ql + (qr - ql) * s for ql, qr in zip(self.left_state, self.right_state))

    def initial_f(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``M[rho0, u0, T0](v)`` broadcast over ``x`` and ``v`` (e.g. x[:, None], v[None, :])."""
        return self.maxwellian(*self.initial_state(x), v)

    def boundary_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dirichlet values (rho, u, T): the left state for x <= 0, the right one for x > 0."""
        right = x > 0
        return tuple(torch.where(right, qr, ql).to(x.dtype)
                     for ql, qr in zip(self.left_state, self.right_state))

    # -- reference / scoring -------------------------------------------------------------------
    def reference(self, eps: Optional[float] = None):
        """The reference at ``t_final`` for Kn = ``eps`` (default: the problem's kn)."""
        kn = self.kn if eps is None else float(eps)
        if not kn > 0:
            raise ValueError(f"Kn must be > 0, got {eps!r}")
        key = (kn, self.t_final)
        if key not in self._refs:
            opts = {"store_f": False, **self.reference_options}
            self._refs[key] = _ref.solve_bgk(self.case, kn, self.t_final, **opts)
        return self._refs[key]

    def evaluate(self, model_fn, eps: Optional[float] = None) -> dict[str, float]:
        """Relative L2 errors of density, momentum and energy at t_final (eps = Kn, default the
        problem's kn); see :meth:`KineticProblem.evaluate`."""
        return super().evaluate(model_fn, self.kn if eps is None else eps)

    def _reference_fields(self, ref) -> dict[str, np.ndarray]:
        return {"density": ref.density, "momentum": ref.momentum, "energy": ref.energy}

    def _predicted_fields(self, pred: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if all(k in pred for k in ("density", "momentum", "energy")):
            return {k: pred[k] for k in ("density", "momentum", "energy")}
        if all(k in pred for k in ("rho", "u", "T")):
            rho, u, T = (pred[k].reshape(-1) for k in ("rho", "u", "T"))
            return {"density": rho, "momentum": rho * u, "energy": 0.5 * rho * (u * u + T)}
        raise KeyError("model_fn must return {'density', 'momentum', 'energy'} or "
                       "{'rho', 'u', 'T'} for BGK")
