"""Reference solver for the 1D-1V BGK equation in Euler scaling (spec KINETIC.md, section 2).

    Kn (f_t + v f_x) = M[rho, u, T](v) - f,   x in [-0.5, 0.5],  v in [-10, 10]

Discretisation (a discrete velocity method, asymptotic preserving in Kn):

* velocity: ``nv`` Gauss-Legendre nodes on [-10, 10]; moments are ``sum_k w_k phi(v_k) f_k``;
* space: ``nx`` finite-volume cells; MUSCL reconstruction with the van Leer limiter and the exact
  upwind flux ``v f`` per velocity (second order in smooth regions, TVD per velocity);
* time, transport: SSP-RK2 (Heun) with ``dt = cfl * dx / max|v_k|`` (``cfl = 0.5`` keeps every
  stage positive);
* time, collisions: after each transport step the implicit relaxation
  ``f = Kn/(Kn+dt) f* + dt/(Kn+dt) M~[U*]`` where ``U*`` are the discrete moments of ``f*`` and
  ``M~`` is the Maxwellian corrected by ``M (1 + a + b v + c v^2/2)`` so that its *discrete* moments
  equal ``U*`` exactly.  Hence the relaxation conserves mass, momentum and energy to round-off, and
  the scheme is asymptotic preserving: as Kn -> 0 it becomes a kinetic (flux-vector-splitting)
  scheme for the Euler equations with gamma = 3, with no step restriction from Kn.
* boundaries: two ghost cells on each side.  Default ``bc="neumann"`` (zero gradient: the ghosts
  copy the first/last interior cell), which is what the published APNN references use.  Also
  ``bc="dirichlet"`` (ghosts hold the discrete Maxwellians of the fixed left/right states, i.e.
  incoming particles come from the reservoirs) and ``bc="periodic"``.  The net fluxes of mass,
  momentum and energy through the two boundaries are accumulated exactly (same stage weights as
  the update) and returned as ``boundary_inflow`` so conservation can be checked to round-off with
  any boundary condition.

The initial data are cell averages (3-point Gauss quadrature in x per cell) of the Maxwellian with
``q0(x) = q_L + (q_R - q_L) s(x)``; outputs ``density``/``momentum``/``energy`` are cell averages
at the cell centres ``x`` (which coincide with point values to O(dx^2)).

Accuracy of the defaults (``nx = 1500``; ``nv = 80``, 120 for case V; cfl 0.5), as relative L2
differences at the case's final time (table in docs/REFERENCE.md): doubling nx (dt halves too)
changes density by 3e-7 (IV) .. 4e-5 (V) and momentum, the most sensitive field, by at most
3.2e-4 (V); more velocities change momentum by at most 3e-4 (V), halving cfl by at most 1.2e-4
(II).  Everything is below 1e-3.  The choice of boundary condition matters more for case I
(Dirichlet vs zero gradient: 1e-3 in density, 7e-3 in momentum) and is part of the problem
definition, not an error.  Runtime: a 100-cell, 60-velocity run to t = 0.1 takes ~0.05 s; the
default grid ~10-25 s (once; results are cached).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Optional

import numpy as np

from ._common import ResultBase, cached_solve, check_int, check_positive, output_times

__all__ = ["BGKResult", "CASES", "LEFT_STATE", "RIGHT_STATE", "solve_bgk", "case_profile",
           "velocity_grid", "maxwellian"]

#: Bumped whenever a change alters the numbers a given parameter set produces (invalidates cache).
VERSION = "bgk-2"

#: Left and right states (rho, u, T) of the spec.
LEFT_STATE = (1.5, 0.0, 1.5)
RIGHT_STATE = (0.625, 0.0, 0.75)
#: Half width of the velocity interval [-VMAX, VMAX].
VMAX = 10.0
X_RANGE = (-0.5, 0.5)

DEFAULT_NX = 1500
DEFAULT_NV = 80
#: Case V (Riemann step, Kn = 1e-2) needs more velocities: at early times f jumps in v at v = x/t,
#: and 80 nodes leave ~8e-4 in momentum; 120 leave ~3e-4.
CASE_NV = {"V": 120}
DEFAULT_CFL = 0.5


# The profiles take numpy arrays (the solver) or torch tensors (problems, APNN initial data):
# one definition serves both, through the array module of the argument.
def _xp(x):
    import torch

    return torch if isinstance(x, torch.Tensor) else np


def _s_sin(x):
    return 0.5 * (1.0 + _xp(x).sin(np.pi * x))


def _s_cusp(x):
    xp = _xp(x)
    return 0.5 * (1.0 + xp.sign(x) * xp.abs(xp.sin(np.pi * x)) ** (3.0 / 7.0))


def _s_tanh10(x):
    return 0.5 * (1.0 + _xp(x).tanh(10.0 * x))


def _s_tanh20(x):
    return 0.5 * (1.0 + _xp(x).tanh(20.0 * x))


def _s_step(x):
    # Riemann step: left state for x < 0, right state for x > 0 (x = 0 is a cell face for even nx).
    xp = _xp(x)
    x = x if xp is not np else np.asarray(x, dtype=float)
    return xp.where(x > 0.0, xp.ones_like(x), xp.zeros_like(x))


#: case -> (profile s(x), default Kn, default final time), from the spec.
CASES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float, float]] = {
    "I": (_s_sin, 1e-3, 0.1),
    "II": (_s_cusp, 1e-3, 0.1),
    "III": (_s_tanh10, 1e-3, 0.1),
    "IV": (_s_tanh20, 1.0, 0.1),
    "V": (_s_step, 1e-2, 0.05),
}

_BCS = ("neumann", "dirichlet", "periodic")


def _check_case(case) -> str:
    if not isinstance(case, str) or case.upper() not in CASES:
        raise ValueError(f"unknown BGK case {case!r}; expected one of {sorted(CASES)}")
    return case.upper()


def case_profile(case: str) -> Callable:
    """The interpolation profile ``s(x)`` of a spec case ("I" .. "V")."""
    return CASES[_check_case(case)][0]


def velocity_grid(nv: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [-VMAX, VMAX] (weights sum to 2*VMAX)."""
    nodes, weights = np.polynomial.legendre.leggauss(nv)
    return VMAX * nodes, VMAX * weights


def maxwellian(rho, u, T, v) -> np.ndarray:
    """Maxwellian ``rho / sqrt(2 pi T) exp(-(v - u)^2 / (2 T))``; ``rho, u, T`` broadcast against
    a trailing velocity axis ``v``."""
    rho, u, T = (np.asarray(a, dtype=float)[..., None] for a in (rho, u, T))
    return rho / np.sqrt(2.0 * np.pi * T) * np.exp(-((v - u) ** 2) / (2.0 * T))


@dataclasses.dataclass(eq=False)
class BGKResult(ResultBase):
    """A BGK reference solution.

    Arrays over x are cell averages on the cell centres ``x`` (shape ``(nx,)``).  With a scalar
    ``t_final`` the macroscopic fields have shape ``(nx,)`` and ``f`` ``(nx, nv)``; with a sequence
    of times they get a leading time axis of ``len(t)``.  ``momentum = rho u`` and
    ``energy = rho (u^2 + T) / 2``.  ``boundary_inflow[..., :]`` is the net amount of (mass,
    momentum, energy) that entered through the two boundaries since t = 0, so
    ``dx * sum(U(t)) - dx * sum(U(0)) == boundary_inflow(t)`` to round-off.
    """

    x: np.ndarray
    t: np.ndarray
    density: np.ndarray
    momentum: np.ndarray
    energy: np.ndarray
    f: Optional[np.ndarray]
    v: np.ndarray
    w: np.ndarray
    boundary_inflow: np.ndarray
    case: Optional[str]
    kn: float
    nx: int
    nv: int
    dt: float
    cfl: float
    bc: str
    steps: int

    @property
    def velocity(self) -> np.ndarray:
        """Bulk velocity u = momentum / density."""
        return self.momentum / self.density

    @property
    def temperature(self) -> np.ndarray:
        """Temperature T = 2 energy / density - u^2."""
        u = self.velocity
        return 2.0 * self.energy / self.density - u * u

    @property
    def dx(self) -> float:
        return (X_RANGE[1] - X_RANGE[0]) / self.nx


class _BGKStepper:
    """The discrete operators of one (nx, nv, bc) configuration; state ``f`` has shape (nx, nv)."""

    def __init__(self, nx: int, nv: int, bc: str):
        self.nx, self.nv, self.bc = nx, nv, bc
        self.dx = (X_RANGE[1] - X_RANGE[0]) / nx
        self.x = X_RANGE[0] + (np.arange(nx) + 0.5) * self.dx
        self.v, self.w = velocity_grid(nv)
        # Collision invariants phi = (1, v, v^2/2) and the weighted moment map Phi = w * phi.
        self.phi = np.stack([np.ones(nv), self.v, 0.5 * self.v ** 2], axis=1)
        self.Phi = self.w[:, None] * self.phi
        # phi_i phi_j per node, weighted, for the Gram matrices of the moment projection.
        self.PhiPhi = (self.Phi[:, :, None] * self.phi[:, None, :]).reshape(nv, 9)
        # Nodes are sorted ascending and symmetric, so negative velocities come first.
        self.neg = slice(0, int(np.sum(self.v < 0)))
        self.pos = slice(nv - int(np.sum(self.v > 0)), nv)
        self.pad = np.empty((nx + 4, nv))
        self.ghost_left = self.ghost_right = None
        if bc == "dirichlet":
            self.ghost_left = self.discrete_maxwellian(self.state_moments(*LEFT_STATE)[None])[0]
            self.ghost_right = self.discrete_maxwellian(self.state_moments(*RIGHT_STATE)[None])[0]

    @staticmethod
    def state_moments(rho, u, T) -> np.ndarray:
        return np.array([rho, rho * u, 0.5 * rho * (u * u + T)])

    def moments(self, f: np.ndarray) -> np.ndarray:
        """Discrete (mass, momentum, energy) per cell, shape (..., 3)."""
        return f @ self.Phi

    def discrete_maxwellian(self, U: np.ndarray) -> np.ndarray:
        """Maxwellian at the nodes whose discrete moments equal ``U`` (shape (n, 3)) exactly.

        The continuous Maxwellian's quadrature moments differ from U by the (tiny) quadrature
        error; we correct it by the weighted least-squares smallest change M (1 + alpha . phi),
        which needs one 3x3 solve per cell.  This is what makes the relaxation step conservative
        to round-off rather than to quadrature accuracy.
        """
        rho = U[:, 0]
        u = U[:, 1] / rho
        T = 2.0 * U[:, 2] / rho - u * u
        if not (np.all(rho > 0) and np.all(T > 0)):
            raise RuntimeError("BGK solver lost positivity (density or temperature <= 0); "
                               "reduce cfl/dt")
        M = maxwellian(rho, u, T, self.v)
        gram = (M @ self.PhiPhi).reshape(-1, 3, 3)
        alpha = np.linalg.solve(gram, (U - M @ self.Phi)[:, :, None])[:, :, 0]
        return M * (1.0 + alpha @ self.phi.T)

    def flux_divergence(self, f: np.ndarray):
        """``-(F_{i+1/2} - F_{i-1/2}) / dx`` of the MUSCL/van Leer upwind flux, and the boundary
        fluxes (left face, right face) as (nv,) arrays."""
        nx = self.nx
        fp = self.pad
        fp[2:-2] = f
        if self.bc == "neumann":
            fp[:2] = f[0]
            fp[-2:] = f[-1]
        elif self.bc == "periodic":
            fp[:2] = f[-2:]
            fp[-2:] = f[:2]
        else:
            fp[:2] = self.ghost_left
            fp[-2:] = self.ghost_right
        d = np.diff(fp, axis=0)          # d[j] = fp[j+1] - fp[j], shape (nx+3, nv)
        dl, dr = d[:-1], d[1:]           # one-sided differences of padded cells 1 .. nx+2
        prod = dl * dr
        # van Leer: harmonic mean of the one-sided slopes where they agree in sign, else 0.
        slope = np.divide(2.0 * prod, dl + dr, out=np.zeros_like(prod), where=prod > 0.0)
        # Face k (k = 0..nx) is the left face of interior cell k (between padded k+1 and k+2).
        flux = np.empty((nx + 1, self.nv))
        pos, neg = self.pos, self.neg
        flux[:, pos] = self.v[pos] * (fp[1:nx + 2, pos] + 0.5 * slope[0:nx + 1, pos])
        flux[:, neg] = self.v[neg] * (fp[2:nx + 3, neg] - 0.5 * slope[1:nx + 2, neg])
        if pos.start > neg.stop:         # odd nv: the node v = 0 carries no flux
            flux[:, neg.stop:pos.start] = 0.0
        return (flux[:-1] - flux[1:]) / self.dx, flux[0], flux[-1]

    def step(self, f: np.ndarray, dt: float, kn: float):
        """One SSP-RK2 transport step followed by the implicit relaxation.

        Returns the new f and the net (mass, momentum, energy) that entered through the boundaries.
        """
        r0, l0, r_0 = self.flux_divergence(f)
        f1 = f + dt * r0
        r1, l1, r_1 = self.flux_divergence(f1)
        fstar = 0.5 * (f + f1 + dt * r1)
        inflow = 0.5 * dt * ((l0 + l1) - (r_0 + r_1)) @ self.Phi
        # Implicit Euler for Kn f_t = M[U] - f: U is invariant under the collision operator, so
        # M[U^{n+1}] = M[U*] and the update is explicit in form (this is the AP property).
        U = self.moments(fstar)
        a = kn / (kn + dt)
        return a * fstar + (1.0 - a) * self.discrete_maxwellian(U), inflow


def _initial_f(stepper: _BGKStepper, s: Callable) -> np.ndarray:
    """Cell averages of f0 = M[q0(x)] by 3-point Gauss-Legendre quadrature in each cell."""
    gx, gw = np.polynomial.legendre.leggauss(3)
    xs = stepper.x[:, None] + 0.5 * stepper.dx * gx[None, :]          # (nx, 3)
    sv = np.asarray(s(xs), dtype=float)
    if sv.shape != xs.shape or not np.all(np.isfinite(sv)):
        raise ValueError("profile s(x) must return finite values with the shape of x")
    q = [l + (r - l) * sv for l, r in zip(LEFT_STATE, RIGHT_STATE)]
    if np.any(q[0] <= 0) or np.any(q[2] <= 0):
        raise ValueError("profile s(x) gives a non-positive initial density or temperature")
    M = maxwellian(q[0], q[1], q[2], stepper.v)                        # (nx, 3, nv)
    return 0.5 * np.einsum("g,xgk->xk", gw, M)


def solve_bgk(case: Optional[str] = "IV", kn: Optional[float] = None, t_final=None, *,
              nx: int = DEFAULT_NX, nv: Optional[int] = None, dt: Optional[float] = None,
              profile: Optional[Callable[[np.ndarray], np.ndarray]] = None,
              cfl: float = DEFAULT_CFL, bc: str = "neumann", store_f: bool = True,
              cache: bool = True) -> BGKResult:
    """Solve the BGK problem of spec case ``case`` ("I" .. "V") and return a :class:`BGKResult`.

    Parameters
    ----------
    case : "I" .. "V", or None with ``profile``
        Selects the initial profile s(x) and, when ``kn``/``t_final`` are None, the spec's Kn and
        final time (I-III: Kn 1e-3, t 0.1; IV: Kn 1, t 0.1; V: Kn 1e-2, t 0.05).
    kn : float > 0
        Knudsen number.  Any value works with the same dt (asymptotic preserving).
    t_final : float or increasing sequence of floats >= 0
        Output time(s); a sequence adds a leading time axis to the outputs (0 gives the data).
    nx, nv : int
        Cells in x (>= 4, default 1500) and Gauss-Legendre velocities on [-10, 10] (>= 4,
        default 80; 120 for case V).
    dt : float, optional
        Time step; default ``cfl * dx / max|v|``.  Steps are shortened to hit output times.
        Values above the stability limit ``dx / max|v|`` are refused.
    profile : callable, optional
        A custom s(x) (numpy in, numpy out) replacing the case's; the result's ``case`` is then
        None.  It is cached keyed by its values at the quadrature points of the grid.
    bc : "neumann" (default), "dirichlet" or "periodic"
        Ghost-cell treatment, see the module docstring.
    store_f : bool
        Keep the distribution function in the result (``f`` is None otherwise).
    cache : bool
        Look the result up in / store it to the on-disk cache (see :mod:`.cache`).

    Accuracy of the defaults: refinement differences (cells x2, velocities x1.5-2, cfl / 2) below
    4e-4 relative L2 in density, momentum and energy for every case, below 5e-5 in density
    (docs/REFERENCE.md has the measured table).
    """
    if profile is None:
        case = _check_case(case)
        s, kn_default, t_default = CASES[case]
    else:
        if not callable(profile):
            raise ValueError("profile must be a callable s(x)")
        case, s, kn_default, t_default = None, profile, None, None
    if kn is None:
        if kn_default is None:
            raise ValueError("kn must be given with a custom profile")
        kn = kn_default
    if t_final is None:
        if t_default is None:
            raise ValueError("t_final must be given with a custom profile")
        t_final = t_default
    kn = check_positive("kn", kn)
    times, scalar = output_times(t_final)
    nx = check_int("nx", nx, 4)
    nv = check_int("nv", CASE_NV.get(case, DEFAULT_NV) if nv is None else nv, 4)
    cfl = check_positive("cfl", cfl)
    if bc not in _BCS:
        raise ValueError(f"unknown boundary condition {bc!r}; expected one of {_BCS}")
    dx = (X_RANGE[1] - X_RANGE[0]) / nx
    vmax = float(np.max(np.abs(velocity_grid(nv)[0])))
    dt = cfl * dx / vmax if dt is None else check_positive("dt", dt)
    if dt * vmax / dx > 1.0 + 1e-12:
        raise ValueError(f"dt = {dt:g} exceeds the transport stability limit dx/max|v| = "
                         f"{dx / vmax:g} for nx = {nx}, nv = {nv}")

    stepper = _BGKStepper(nx, nv, bc)
    f0 = None
    params = dict(case=case, kn=kn, t=times, nx=nx, nv=nv, dt=dt, bc=bc, store_f=bool(store_f))
    if profile is not None:
        # A callable cannot be hashed; the discrete initial data it defines can.
        f0 = _initial_f(stepper, s)
        params["f0_sha"] = hashlib.sha256(f0.tobytes()).hexdigest()

    def compute() -> BGKResult:
        f = _initial_f(stepper, s) if f0 is None else f0
        t, steps = 0.0, 0
        inflow = np.zeros(3)
        out_U, out_f, out_in = [], [], []
        for T in times:
            while T - t > 1e-12 * dt:
                h = T - t if T - t <= dt * (1.0 + 1e-9) else dt
                f, d_in = stepper.step(f, h, kn)
                inflow += d_in
                t = T if h == T - t else t + h
                steps += 1
            out_U.append(stepper.moments(f))
            out_in.append(inflow.copy())
            if store_f:
                out_f.append(f.copy())
        U = np.stack(out_U)
        pick = (lambda a: a[0]) if scalar else (lambda a: a)
        return BGKResult(
            x=stepper.x, t=np.asarray(times[0] if scalar else times),
            density=pick(U[..., 0]), momentum=pick(U[..., 1]), energy=pick(U[..., 2]),
            f=pick(np.stack(out_f)) if store_f else None, v=stepper.v, w=stepper.w,
            boundary_inflow=pick(np.stack(out_in)), case=case, kn=kn, nx=nx, nv=nv, dt=dt,
            cfl=dt * vmax / dx, bc=bc, steps=steps)

    return cached_solve("bgk", params, VERSION, BGKResult, compute, cache)
