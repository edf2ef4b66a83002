"""Reference solvers for linear transport in diffusive scaling (spec KINETIC.md, section 1).

    eps f_t + v f_x = (rho - f) / eps,   rho = <f> = 1/2 int_{-1}^{1} f dv,
    x in [0, 1], f(0, x, v) = 0, f(t, 0, v > 0) = 1, f(t, 1, v < 0) = 0.

Main solver, :func:`solve_transport`:

* velocity: discrete ordinates S_N, ``nv`` Gauss-Legendre directions (even, so no v = 0 direction);
* space: diamond differencing (DD) on ``nx`` uniform cells.  Unknowns are the outgoing cell-edge
  fluxes of each direction; the cell average is the mean of the two edge values.  DD has the
  correct interior thick-diffusion limit (Larsen, Morel & Miller 1987) and, because the inflow here
  is isotropic (1 or 0), also the right boundary values rho(0) = 1, rho(1) = 0 in that limit;
* time: BDF2 (variable-step form; the first step is implicit Euler).  The step grows
  geometrically from ``0.5 eps dx`` (resolving the transport fronts, which move at speed up to
  1/eps) to ``dt_max`` once the fronts have decayed (after 20 eps^2, when the uncollided flux is
  below e^-20); a user ``dt`` gives uniform steps instead;
* the scattering coupling is solved exactly each step: the full (x, v) system, block tridiagonal
  with dense nv x nv blocks, is factorised once per distinct step size by sparse LU (SuperLU) and
  reused.  Rows are scaled by eps so entries stay O(1) as eps -> 0.

Check scheme, :func:`solve_transport_ld`, independent in space and time: linear discontinuous
(upwind DG, P1 in each cell) which also has a robust thick-diffusion limit (Larsen & Morel 1989),
with the L-stable two-stage SDIRK2 (Alexander) time integrator.

:func:`diffusion_limit` is the eps -> 0 solution (series).

First-collision split (eps ~ 1): while the uncollided fronts psi_u = exp(-x/(eps v)) H(v t/eps - x)
are present they are treated exactly (continuous in v, see :func:`uncollided_rho_cells`) and the
S_N solver handles only the continuous collided part; this removes the ray effects of S_N (1-2e-2
in rho at eps = 1 with 32 ordinates) and the front smearing.

The third scheme, :func:`solve_transport_explicit` (MUSCL + SSP-RK2, not AP), is for eps ~ 1 only.

Accuracy of the defaults (``nx = 300``; ``nv = 32``, 64 with the first-collision split) is stated
in :func:`solve_transport`'s docstring and tabulated in docs/REFERENCE.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ._common import ResultBase, cached_solve, check_int, check_positive, output_times

__all__ = ["TransportResult", "solve_transport", "solve_transport_ld", "solve_transport_explicit",
           "diffusion_limit", "ordinates", "uncollided_rho_cells", "uncollided_rho_points",
           "uncollided_psi_cells", "EPS_MIN"]

VERSION = "transport-2"

DEFAULT_NX = 300
DEFAULT_NV = 32
#: Ordinates used by default when the uncollided fronts are present (first-collision regime):
#: there the collided flux still carries angular structure and 32 ordinates leave ~1.5e-3.
DEFAULT_NV_FRONTS = 64
DEFAULT_DT_MAX = 2e-4
#: Below this eps the kinetic solvers lose digits (the diffusive mode of the O(1)-scaled system is
#: O(eps^2)); use diffusion_limit() there.
EPS_MIN = 1e-6
F_LEFT, F_RIGHT = 1.0, 0.0          # inflow data for v > 0 at x = 0 and v < 0 at x = 1


def ordinates(nv: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre directions ``mu`` and weights ``w`` on [-1, 1]; ``<f> = 0.5 * sum w f``."""
    return np.polynomial.legendre.leggauss(nv)


@dataclasses.dataclass(eq=False)
class TransportResult(ResultBase):
    """A linear-transport reference solution.

    ``x`` are the cell centres of [0, 1] (shape ``(nx,)``), ``rho`` the cell averages of the
    density: shape ``(nx,)`` for a scalar ``t_final`` and ``(len(t), nx)`` for a sequence.  ``f``
    holds the cell averages of each direction ``mu`` (extra trailing axis of length nv), or is None
    (diffusion-limit results, or ``store_f=False``).  ``dt`` is the largest step taken.
    """

    x: np.ndarray
    t: np.ndarray
    rho: np.ndarray
    f: Optional[np.ndarray]
    mu: Optional[np.ndarray]
    w: Optional[np.ndarray]
    eps: float
    nx: int
    nv: int
    dt: float
    method: str
    steps: int


# --------------------------------------------------------------------------------------------
# diffusion limit
# --------------------------------------------------------------------------------------------

def diffusion_limit(x, t, n_terms: Optional[int] = None) -> np.ndarray:
    """The eps -> 0 density, solving ``rho_t = rho_xx / 3``, ``rho(t, 0) = 1``, ``rho(t, 1) = 0``,
    ``rho(0, x) = 0``:

        rho = 1 - x - sum_{n=1}^{N} (2 / (n pi)) sin(n pi x) exp(-n^2 pi^2 t / 3).

    ``x`` is any array; a scalar ``t`` gives ``x``'s shape, a 1-D ``t`` a leading time axis.
    ``n_terms`` defaults to the number of terms after which the remainder is below 1e-17 for the
    smallest positive t (at t = 0 the series converges slowly; 20000 terms are used).
    """
    x = np.asarray(x, dtype=float)
    tt = np.asarray(t, dtype=float)
    if tt.ndim > 1 or np.any(tt < 0) or not np.all(np.isfinite(tt)):
        raise ValueError(f"t must be a number >= 0 or a 1-D sequence of them, got {t!r}")
    if n_terms is None:
        tpos = tt[tt > 0]
        if tpos.size == tt.size:
            # exp(-n^2 pi^2 t / 3) < 1e-17 for n^2 > 3 * 39.2 / (pi^2 t).
            n_terms = int(math.ceil(math.sqrt(3.0 * 39.2 / (math.pi ** 2 * float(tpos.min()))))) + 1
            n_terms = min(max(n_terms, 8), 200000)
        else:
            n_terms = 20000
    n_terms = check_int("n_terms", n_terms, 1)
    n = np.arange(1, n_terms + 1, dtype=float)
    decay = np.exp(-np.multiply.outer(np.atleast_1d(tt), n ** 2) * (math.pi ** 2 / 3.0))
    coef = decay * (2.0 / (n * math.pi))                         # (nt, N)
    # Sum in chunks of n so sin(n pi x) never needs an (x.size, N) array larger than ~8 MB.
    xf = x.ravel()
    out = np.zeros((coef.shape[0], xf.size))
    chunk = max(1, 1_000_000 // max(xf.size, 1))
    for lo in range(0, n_terms, chunk):
        s = np.sin(np.multiply.outer(n[lo:lo + chunk], math.pi * xf))    # (chunk, nx)
        out += coef[:, lo:lo + chunk] @ s
    rho = (1.0 - xf)[None, :] - out
    rho = rho.reshape((coef.shape[0],) + x.shape)
    return rho[0] if tt.ndim == 0 else rho


# --------------------------------------------------------------------------------------------
# uncollided flux (first-collision source), exact in the continuous velocity variable
# --------------------------------------------------------------------------------------------
# Particles entering at x = 0 with direction mu > 0 travel at speed mu/eps and are removed at rate
# 1/eps^2, so the uncollided flux is psi_u(t, x, mu) = exp(-x/(eps mu)) H(mu t/eps - x): a family of
# discontinuous fronts.  Treated exactly, they leave the S_N solver only the collided part, which
# is continuous, so neither the ray effects of S_N (1-2e-2 in rho at eps = 1 with 32 ordinates)
# nor the smearing of the fronts in x limit the accuracy at eps ~ 1.
# Primitives used:  G_c(mu) = int e^{-c/mu} dmu      = mu e^{-c/mu} - c E1(c/mu),
#                   F_c(mu) = int mu e^{-c/mu} dmu   = e^{-c/mu} (mu^2 - c mu)/2 + c^2 E1(c/mu)/2,
# both 0 at mu = 0 for c > 0.

def _prim(c: np.ndarray, m: np.ndarray, first: bool) -> np.ndarray:
    from scipy.special import exp1
    c, m = np.broadcast_arrays(np.asarray(c, float), np.asarray(m, float))
    out = np.zeros(c.shape)
    zc = (c == 0.0) & (m > 0.0)
    out[zc] = (m[zc] ** 2 / 2.0) if first else m[zc]
    ok = (c > 0.0) & (m > 0.0)
    cc, mm = c[ok], m[ok]
    z = cc / mm
    e = np.exp(-z)
    if first:
        out[ok] = 0.5 * e * (mm * mm - cc * mm) + 0.5 * cc * cc * exp1(z)
    else:
        out[ok] = mm * e - cc * exp1(z)
    return out


def uncollided_rho_cells(t: float, eps: float, edges: np.ndarray) -> np.ndarray:
    """Exact cell averages over [edges[i], edges[i+1]] of the uncollided density
    ``1/2 int_0^1 psi_u dmu`` at time t (x-integral done analytically, then mu-integral by
    the primitives F above, split where the front enters/leaves the cell)."""
    xl, xr = edges[:-1], edges[1:]
    dx = xr - xl
    if t <= 0.0:
        return np.zeros_like(dx)
    a = np.clip(eps * xl / t, 0.0, 1.0)     # front reaches the cell's left edge
    b = np.clip(eps * xr / t, 0.0, 1.0)     # ... and its right edge
    cl, cr = xl / eps, xr / eps
    # front inside the cell (a < mu < b): int eps mu (e^{-cl/mu} - e^{-t/eps^2}) dmu
    mid = eps * (_prim(cl, b, True) - _prim(cl, a, True)) \
        - eps * math.exp(-t / eps ** 2) * 0.5 * (b * b - a * a)
    # cell fully behind the front (b < mu < 1): int eps mu (e^{-cl/mu} - e^{-cr/mu}) dmu
    full = eps * ((_prim(cl, 1.0, True) - _prim(cl, b, True))
                  - (_prim(cr, 1.0, True) - _prim(cr, b, True)))
    return (mid + full) / (2.0 * dx)


def uncollided_rho_points(t: float, eps: float, x: np.ndarray) -> np.ndarray:
    """The uncollided density at points: ``1/2 int_{max(0, eps x/t)}^1 e^{-x/(eps mu)} dmu``."""
    x = np.asarray(x, float)
    if t <= 0.0:
        return np.zeros_like(x)
    m0 = np.clip(eps * x / t, 0.0, 1.0)
    c = x / eps
    return 0.5 * (_prim(c, 1.0, False) - _prim(c, m0, False))


def uncollided_psi_cells(t: float, eps: float, edges: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Cell averages of the uncollided flux in the directions ``mu``, shape (nx, nv)."""
    xl, xr = edges[:-1, None], edges[1:, None]
    m = np.where(mu > 0, mu, 1.0)[None, :]
    if t <= 0.0:
        return np.zeros((xl.size, mu.size))
    hi = np.minimum(xr, m * t / eps)
    val = eps * m * (np.exp(-xl / (eps * m)) - np.exp(-hi / (eps * m))) / (xr - xl)
    return np.where((mu > 0)[None, :] & (hi > xl), val, 0.0)


# --------------------------------------------------------------------------------------------
# shared: argument checks and the time grid
# --------------------------------------------------------------------------------------------

def _check_args(eps, t_final, nx, nv, dt, dt_max):
    eps = check_positive("eps", eps)
    if eps < EPS_MIN:
        raise ValueError(f"eps = {eps:g} is below {EPS_MIN:g}, where the kinetic solvers lose "
                         "accuracy to round-off; use diffusion_limit() (exact to O(eps)) instead")
    if eps > 1e3:
        raise ValueError(f"eps must be <= 1e3, got {eps}")
    times, scalar = output_times(t_final)
    nx = check_int("nx", nx, 4)
    if nv is not None:
        nv = check_int("nv", nv, 2)
        if nv % 2:
            raise ValueError(f"nv must be even (no direction v = 0), got {nv}")
    dt = None if dt is None else check_positive("dt", dt)
    dt_max = check_positive("dt_max", dt_max)
    return eps, times, scalar, nx, nv, dt, dt_max


def _steps(times: np.ndarray, dt: Optional[float], eps: float, dx: float,
           dt_max: float) -> Iterator[tuple[float, bool]]:
    """Yield ``(h, False)`` per time step and ``(0, True)`` at each output time.

    With ``dt`` given the nominal step is uniform.  Otherwise it starts at ``0.5 eps dx`` and
    doubles every 8 steps once t > 20 eps^2 (fronts decayed), up to ``dt_max``.  Between two
    outputs (and within a level) the steps are equal, rem / ceil(rem / h_nom), and bit-identical so
    the integrators reuse one LU factorisation; a step is never more than twice the previous one,
    which keeps variable-step BDF2 zero-stable (ratio < 1 + sqrt 2).
    """
    if dt is not None:
        h_nom, grow_after, h_cap = dt, math.inf, dt
    else:
        h_cap = dt_max
        h_nom = min(0.5 * eps * dx, h_cap)
        grow_after = 20.0 * eps * eps
    t, h_prev, level_steps = 0.0, math.inf, 0
    for T in times:
        h = None
        while T - t > 1e-12 * max(h_nom, T):
            rem = T - t
            if h is None:
                n = max(1, math.ceil(rem / h_nom - 1e-9))
                h = rem / n
                clamped = h > 2.0 * h_prev
                if clamped:
                    h = 2.0 * h_prev
            if rem <= h * (1.0 + 1e-9):
                # final step of the interval: keep the bit-identical h unless truly shorter
                step = h if rem >= h * (1.0 - 1e-9) else rem
                t = T
            else:
                step = h
                t += h
            h_prev = step
            level_steps += 1
            yield step, False
            if t > grow_after and level_steps >= 8 and h_nom < h_cap:
                h_nom, level_steps, h = min(2.0 * h_nom, h_cap), 0, None
            elif clamped:
                h = None
        yield 0.0, True


def _use_first_collision(first_collision: Optional[bool], eps: float, times: np.ndarray,
                         nx: int) -> bool:
    """Whether to split off the uncollided flux (see uncollided_rho_cells).

    Automatic choice: only while the fronts still matter at an output time, i.e. when some output
    time t > 0 has t < 10 eps^2 (front amplitude exp(-t/eps^2) > 5e-5).  Otherwise the plain S_N
    solution is *more* accurate: the collided flux born in the thin uncollided layer at x = 0 is
    itself hard to resolve in angle.  It is refused when the layer (width ~ eps) is not resolved
    by the grid, where the discrete leakage of that source through x = 0 is wrong by O(1/eps).
    """
    dx = 1.0 / nx
    if first_collision is None:
        tpos = times[times > 0]
        return bool(tpos.size) and float(tpos.min()) < 10.0 * eps * eps and eps >= 10.0 * dx
    if first_collision and eps < 10.0 * dx:
        raise ValueError(f"first_collision needs eps >= 10 dx (the uncollided layer resolved); "
                         f"got eps = {eps:g} with nx = {nx}")
    return bool(first_collision)


class _Factorisations:
    """Sparse LU factors keyed by the matrix coefficient (few distinct step sizes occur)."""

    def __init__(self, build: Callable[[float], sp.spmatrix], size: int = 6):
        self.build, self.size, self.store = build, size, {}

    def __call__(self, coeff: float):
        lu = self.store.get(coeff)
        if lu is None:
            if len(self.store) >= self.size:
                self.store.pop(next(iter(self.store)))
            lu = self.store[coeff] = spla.splu(self.build(coeff).tocsc())
        return lu


def _prepare(eps, t_final, nx, nv, dt, dt_max, first_collision, store_f):
    """Checked arguments of the implicit solvers, the first-collision choice, the default
    ordinate count that goes with it, and the cache-key parameters."""
    eps, times, scalar, nx, nv, dt, dt_max = _check_args(eps, t_final, nx, nv, dt, dt_max)
    fc = _use_first_collision(first_collision, eps, times, nx)
    nv = nv if nv is not None else (DEFAULT_NV_FRONTS if fc else DEFAULT_NV)
    params = dict(eps=eps, t=times, nx=nx, nv=nv, dt=dt, dt_max=dt_max, fc=fc, store_f=bool(store_f))
    return eps, times, scalar, nx, nv, dt, dt_max, fc, params


def _shift(nx: int, k: int) -> sp.spmatrix:
    """nx x nx matrix with ones on diagonal ``k`` (k = -1: picks cell i-1 for row i)."""
    return sp.eye(nx, k=k, format="csr")


def _t_out(times: np.ndarray, scalar: bool) -> np.ndarray:
    return np.asarray(times[0] if scalar else times)


def _run(times, scalar, steps, advance, rho_of, f_of, store_f):
    """Drive a one-step/two-step integrator over ``steps`` and collect outputs."""
    out_rho, out_f, count, hmax = [], [], 0, 0.0
    for h, at_output in steps:
        if at_output:
            out_rho.append(rho_of())
            if store_f:
                out_f.append(f_of())
            continue
        advance(h)
        count += 1
        hmax = max(hmax, h)
    rho = np.stack(out_rho)
    f = np.stack(out_f) if store_f else None
    if scalar:
        rho = rho[0]
        f = None if f is None else f[0]
    return rho, f, count, hmax


# --------------------------------------------------------------------------------------------
# main solver: S_N + diamond differencing + BDF2
# --------------------------------------------------------------------------------------------

def solve_transport(eps: float, t_final=0.1, *, nx: int = DEFAULT_NX, nv: Optional[int] = None,
                    dt: Optional[float] = None, dt_max: float = DEFAULT_DT_MAX,
                    first_collision: Optional[bool] = None, store_f: bool = True,
                    cache: bool = True) -> TransportResult:
    """Solve the linear-transport problem with S_N / diamond differencing / BDF2.

    Parameters
    ----------
    eps : float in [1e-6, 1e3]
        Knudsen number of the diffusive scaling.  Below ``EPS_MIN = 1e-6`` a ValueError points
        to :func:`diffusion_limit` (which is within O(eps) there).
    t_final : float or increasing sequence of floats >= 0
        Output time(s); a sequence gives ``rho`` (and ``f``) a leading time axis.
    nx : int >= 4
        Uniform cells on [0, 1]; ``x`` are the cell centres.
    nv : even int >= 2, optional
        Gauss-Legendre ordinates; default 32, or 64 when the first-collision split is active.
    dt : float, optional
        Uniform time step; by default a graded step (``0.5 eps dx`` growing to ``dt_max``).
    dt_max : float
        Largest step of the graded plan.
    first_collision : bool, optional
        Split off the uncollided flux and treat it exactly (continuous in v).  Default: only
        while the fronts matter at an output time (some t_out < 10 eps^2, e.g. eps = 1); see
        :func:`_use_first_collision`.  Then ``rho`` is the continuous-velocity density and ``f``
        holds the angular flux at the ordinates.
    store_f, cache : bool
        Keep the angular flux (cell averages, trailing axis nv) in the result; use the cache.

    Accuracy of the defaults (nx = 300, dt_max = 2e-4), measured as relative L2 differences of
    rho at t_final (docs/REFERENCE.md has the table): doubling nx changes rho by 1e-5 (eps <=
    1e-2) to 1e-4 (eps = 1); dt_max / 4 by < 4e-6; doubling the ordinates by 4.2e-4 (eps = 1,
    t = 1, 64 -> 128 with the split), 2e-4 (eps = 0.1) and < 1e-5 for eps <= 1e-2; the
    independent LD/SDIRK2 scheme agrees to 8e-6 .. 1.2e-4.  All below 1e-3.

    Diamond differencing with BDF2 is not positivity preserving: where the exact density is ~0
    (ahead of fronts) it undershoots by up to ~7e-4 (eps = 0.1, t = 0.01), 1.5e-4 (eps = 1) and
    3e-5 (diffusive regime).
    """
    eps, times, scalar, nx, nv, dt, dt_max, fc, params = _prepare(
        eps, t_final, nx, nv, dt, dt_max, first_collision, store_f)

    def compute() -> TransportResult:
        mu, w = ordinates(nv)
        dx = 1.0 / nx
        edges = np.linspace(0.0, 1.0, nx + 1)
        f_left = 0.0 if fc else F_LEFT        # with FC the inflow is carried by psi_u
        pos = (mu > 0).astype(float)
        neg = 1.0 - pos
        Ix, Iv = sp.identity(nx, format="csr"), sp.identity(nv, format="csr")
        Sm, Sp_ = _shift(nx, -1), _shift(nx, 1)
        Dp, Dn = sp.diags(pos), sp.diags(neg)
        # Unknown u[i, k] is the outgoing edge flux of cell i in direction k: the right edge for
        # mu > 0, the left edge for mu < 0.  Cell average c = P u + c_b, edge difference
        # (right - left) = D u + d_b, where c_b, d_b carry the inflow data.
        P = 0.5 * (sp.kron(Ix, Iv) + sp.kron(Sm, Dp) + sp.kron(Sp_, Dn))
        D = sp.kron(Ix, Dp) - sp.kron(Sm, Dp) + sp.kron(Sp_, Dn) - sp.kron(Ix, Dn)
        Mu = sp.kron(Ix, sp.diags(mu))
        R = sp.kron(Ix, sp.csr_matrix(np.outer(np.ones(nv), 0.5 * w)))  # c -> rho per direction
        c_b = np.zeros((nx, nv))
        d_b = np.zeros((nx, nv))
        c_b[0, mu > 0] = 0.5 * f_left
        d_b[0, mu > 0] = -f_left
        c_b[-1, mu < 0] = 0.5 * F_RIGHT
        d_b[-1, mu < 0] = F_RIGHT
        c_b, d_b = c_b.ravel(), d_b.ravel()
        base = ((eps / dx) * (Mu @ D) + (P - R @ P)).tocsr()
        base_b = (eps / dx) * (Mu @ d_b) + (c_b - R @ c_b)
        # Row (i, k), multiplied by eps:  eps^2 (a0 c - hist) / h + eps mu (D u + d_b) / dx
        #                                + (c - rho) = 0.   sigma = eps^2 a0 / h.
        lu = _Factorisations(lambda sigma: sigma * P + base)

        state = {"c": np.zeros(nx * nv), "c_old": None, "h_old": None, "t": 0.0}

        def advance(h: float) -> None:
            c, c_old, h_old = state["c"], state["c_old"], state["h_old"]
            t_new = state["t"] + h
            if c_old is None:                                    # implicit Euler start
                a0, hist = 1.0, c
            else:                                                # variable-step BDF2
                om = h / h_old
                a0 = (1.0 + 2.0 * om) / (1.0 + om)
                hist = (1.0 + om) * c - (om * om / (1.0 + om)) * c_old
            sigma = eps * eps * a0 / h
            rhs = (eps * eps / h) * hist - sigma * c_b - base_b
            if fc:   # first-collision source rho_u / eps (rows scaled by eps), implicit in time
                rhs += np.repeat(uncollided_rho_cells(t_new, eps, edges), nv)
            u = lu(sigma).solve(rhs)
            state.update(c=P @ u + c_b, c_old=c, h_old=h, t=t_new)

        def f_of():
            f = state["c"].reshape(nx, nv).copy()
            if fc:
                f += uncollided_psi_cells(state["t"], eps, edges, mu)
            return f

        def rho_of():
            rho = state["c"].reshape(nx, nv) @ (0.5 * w)
            if fc:
                rho += uncollided_rho_cells(state["t"], eps, edges)
            return rho

        steps = _steps(times, dt, eps, dx, dt_max)
        rho, f, count, hmax = _run(times, scalar, steps, advance, rho_of, f_of, store_f)
        return TransportResult(x=(np.arange(nx) + 0.5) * dx, t=_t_out(times, scalar),
                               rho=rho, f=f, mu=mu, w=w, eps=eps, nx=nx, nv=nv, dt=hmax,
                               method="dd-bdf2", steps=count)

    return cached_solve("transport", params, VERSION, TransportResult, compute, cache)


# --------------------------------------------------------------------------------------------
# check scheme: linear discontinuous (upwind DG P1) + SDIRK2
# --------------------------------------------------------------------------------------------

_GAMMA = 1.0 - 1.0 / math.sqrt(2.0)     # SDIRK2 (Alexander), L-stable, stiffly accurate


def solve_transport_ld(eps: float, t_final=0.1, *, nx: int = DEFAULT_NX, nv: Optional[int] = None,
                       dt: Optional[float] = None, dt_max: float = DEFAULT_DT_MAX,
                       first_collision: Optional[bool] = None, store_f: bool = False,
                       cache: bool = False) -> TransportResult:
    """Independent check scheme: S_N + linear discontinuous Galerkin (upwind, P1) + SDIRK2.

    Same arguments and result type as :func:`solve_transport` (``f`` holds cell averages).  It
    shares only the equation, the ordinates and the step-size plan with the main solver; it is
    used by the tests to confirm the main solver at eps = 1 and eps = 1e-3.
    """
    eps, times, scalar, nx, nv, dt, dt_max, fc, params = _prepare(
        eps, t_final, nx, nv, dt, dt_max, first_collision, store_f)

    def compute() -> TransportResult:
        mu, w = ordinates(nv)
        dx = 1.0 / nx
        x = (np.arange(nx) + 0.5) * dx
        pos = mu > 0
        f_left = 0.0 if fc else F_LEFT
        # Legendre moments (average, slope) of the uncollided density in each cell by 8-point
        # Gauss quadrature of its pointwise closed form (the main solver integrates it exactly).
        gq, gw = np.polynomial.legendre.leggauss(8)
        xq = x[:, None] + 0.5 * dx * gq[None, :]

        def source(t):
            r = uncollided_rho_points(t, eps, xq)
            q = np.stack([0.5 * r @ gw, 1.5 * r @ (gw * gq)], axis=1)      # (nx, 2)
            return np.broadcast_to(q[:, None, :], (nx, nv, 2)).ravel()
        # Unknown vector index ((i * nv) + k) * 2 + m, m = 0 cell average, m = 1 Legendre slope
        # (psi = c + s xi on xi in [-1, 1]).  Upwind traces: for mu > 0 the value at the right
        # edge of cell i is c_i + s_i; for mu < 0 the value at its left edge is c_i - s_i.
        Ix, Sm, Sp_ = sp.identity(nx, format="csr"), _shift(nx, -1), _shift(nx, 1)
        # eps^2 d/dt y = -(eps/dx) T y + ...; T's 2x2 blocks act on (c, s) of one direction:
        # mu>0:  c-row  mu (c_i + s_i - c_{i-1} - s_{i-1})
        #        s-row  3 mu (c_i + s_i + c_{i-1} + s_{i-1} - 2 c_i)
        # mu<0:  c-row  mu (c_{i+1} - s_{i+1} - c_i + s_i)
        #        s-row  3 mu (c_{i+1} - s_{i+1} + c_i - s_i - 2 c_i)
        own_p = np.array([[1.0, 1.0], [-3.0, 3.0]])      # mu > 0, from cell i
        up_p = np.array([[-1.0, -1.0], [3.0, 3.0]])      # mu > 0, from cell i-1
        own_n = np.array([[-1.0, 1.0], [-3.0, -3.0]])    # mu < 0, from cell i
        up_n = np.array([[1.0, -1.0], [3.0, -3.0]])      # mu < 0, from cell i+1
        blocks_own = sp.block_diag([mu_k * (own_p if mu_k > 0 else own_n) for mu_k in mu])
        blocks_up_p = sp.block_diag([mu_k * up_p if mu_k > 0 else np.zeros((2, 2)) for mu_k in mu])
        blocks_up_n = sp.block_diag([mu_k * up_n if mu_k < 0 else np.zeros((2, 2)) for mu_k in mu])
        T = sp.kron(Ix, blocks_own) + sp.kron(Sm, blocks_up_p) + sp.kron(Sp_, blocks_up_n)
        # Scattering: (rho0, rho1) = 0.5 sum_k w_k (c_k, s_k), broadcast to every direction.
        Rv = np.kron(np.outer(np.ones(nv), 0.5 * w), np.eye(2))
        R = sp.kron(Ix, sp.csr_matrix(Rv))
        I = sp.identity(2 * nv * nx, format="csr")
        # eps^2 * (d/dt y) = -(eps/dx) T y + (R - I) y - (eps/dx) t_b   (t_b: inflow traces)
        L = (-(eps / dx) * T + (R - I)).tocsr()
        t_b = np.zeros((nx, nv, 2))
        t_b[0, pos, 0] = -mu[pos] * f_left                 # c-row: -(psi_in) at the left edge
        t_b[0, pos, 1] = 3.0 * mu[pos] * f_left            # s-row: +(psi_in) at the left edge
        t_b[-1, ~pos, 0] = mu[~pos] * F_RIGHT
        t_b[-1, ~pos, 1] = 3.0 * mu[~pos] * F_RIGHT
        g = -(eps / dx) * t_b.ravel()                      # eps^2 * source
        eps2 = eps * eps
        # Stage matrix (scaled by eps^2): eps^2 I - gamma h L.
        lu = _Factorisations(lambda gh: eps2 * I - gh * L)
        state = {"y": np.zeros(2 * nv * nx), "t": 0.0}

        def g_at(t):
            return g + source(t) if fc else g

        def advance(h: float) -> None:
            y, t = state["y"], state["t"]
            gh = _GAMMA * h
            solver = lu(gh)
            y1 = solver.solve(eps2 * y + gh * g_at(t + gh))
            k1 = (y1 - y) / gh                             # = y'(Y1), without the stiff product
            state["y"] = solver.solve(eps2 * (y + (1.0 - _GAMMA) * h * k1) + gh * g_at(t + h))
            state["t"] = t + h

        def cells():
            return state["y"].reshape(nx, nv, 2)[:, :, 0]

        def rho_of():
            rho = cells() @ (0.5 * w)
            if fc:
                r = uncollided_rho_points(state["t"], eps, xq)
                rho = rho + 0.5 * r @ gw
            return rho

        steps = _steps(times, dt, eps, dx, dt_max)
        def f_of():
            f = cells().copy()
            if fc:
                f += uncollided_psi_cells(state["t"], eps, np.linspace(0.0, 1.0, nx + 1), mu)
            return f

        rho, f, count, hmax = _run(times, scalar, steps, advance, rho_of, f_of, store_f)
        return TransportResult(x=(np.arange(nx) + 0.5) * dx, t=_t_out(times, scalar),
                               rho=rho, f=f, mu=mu, w=w, eps=eps, nx=nx, nv=nv, dt=hmax,
                               method="ld-sdirk2", steps=count)

    return cached_solve("transport-ld", params, VERSION, TransportResult, compute, cache)


# --------------------------------------------------------------------------------------------
# explicit scheme for eps ~ 1: MUSCL upwind + SSP-RK2, exact relaxation (Strang splitting)
# --------------------------------------------------------------------------------------------

def solve_transport_explicit(eps: float, t_final=0.1, *, nx: int = DEFAULT_NX,
                             nv: int = DEFAULT_NV, cfl: float = 0.5, store_f: bool = False,
                             cache: bool = False) -> TransportResult:
    """Explicit scheme: MUSCL (van Leer) upwind finite volumes + SSP-RK2 for the transport,
    exact solution of the relaxation ``psi = rho + (psi - rho) exp(-h / eps^2)`` (rho is invariant
    under it), combined by Strang splitting.  ``dt = cfl * eps * dx``.

    Positive and sharp at the uncollided fronts, so it is the method of choice for eps ~ 1.  It is
    *not* asymptotic preserving: its numerical diffusion relative to the physical one grows like
    dx^2 / eps (and the step like eps dx shrinks), so do not use it for eps << 0.1.
    """
    eps, times, scalar, nx, nv, _, _ = _check_args(eps, t_final, nx, nv, None, 1.0)
    cfl = check_positive("cfl", cfl)
    if cfl > 1.0:
        raise ValueError(f"cfl must be <= 1 for the explicit scheme, got {cfl}")
    params = dict(eps=eps, t=times, nx=nx, nv=nv, cfl=cfl, store_f=bool(store_f))

    def compute() -> TransportResult:
        mu, w = ordinates(nv)
        dx = 1.0 / nx
        h_nom = cfl * eps * dx / float(np.max(np.abs(mu)))
        pos, neg = mu > 0, mu < 0
        speed = mu / eps
        fp = np.empty((nx + 4, nv))
        state = {"f": np.zeros((nx, nv))}

        def rhs(f):
            fp[2:-2] = f
            # inflow ghosts hold the boundary data; outgoing ghosts copy the last cell (they
            # only enter the limited slope of the boundary cell).
            fp[:2] = np.where(pos, F_LEFT, f[0])
            fp[-2:] = np.where(neg, F_RIGHT, f[-1])
            d = np.diff(fp, axis=0)
            dl, dr = d[:-1], d[1:]
            prod = dl * dr
            slope = np.divide(2.0 * prod, dl + dr, out=np.zeros_like(prod), where=prod > 0.0)
            face = np.where(pos, fp[1:nx + 2] + 0.5 * slope[0:nx + 1],
                            fp[2:nx + 3] - 0.5 * slope[1:nx + 2])
            flux = speed * face
            return (flux[:-1] - flux[1:]) / dx

        def relax(f, h):
            rho = f @ (0.5 * w)
            return rho[:, None] + (f - rho[:, None]) * math.exp(-h / (eps * eps))

        def advance(h):
            f = relax(state["f"], 0.5 * h)
            f1 = f + h * rhs(f)
            f = 0.5 * (f + f1 + h * rhs(f1))
            state["f"] = relax(f, 0.5 * h)

        steps = _steps(times, h_nom, eps, dx, h_nom)
        rho, f, count, hmax = _run(times, scalar, steps, advance,
                                   lambda: state["f"] @ (0.5 * w), lambda: state["f"].copy(),
                                   store_f)
        return TransportResult(x=(np.arange(nx) + 0.5) * dx, t=_t_out(times, scalar),
                               rho=rho, f=f, mu=mu, w=w, eps=eps, nx=nx, nv=nv, dt=hmax,
                               method="muscl-ssprk2", steps=count)

    return cached_solve("transport-explicit", params, VERSION, TransportResult, compute, cache)
