"""APNN models for the linear transport (micro-macro) and BGK equations with eps as input.

Inputs are rescaled to [-1, 1] inside the models (t over the time window, x over the domain,
v by the velocity bound), so derivatives with respect to the *physical* t and x come out of
autograd or forward-mode AD without manual chain rules.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import is_finite_number
from .bodies import make_body
from .encoding import EpsEncoding
from .jets import Jet, body_jet, jet_of
from .windows import TimeWindows

__all__ = ["APNN", "BGKAPNN", "TransportAPNN", "log_maxwellian", "maxwellian_exp_derivatives"]


def _column(a: Tensor) -> Tensor:
    """A per-point ``[n]`` tensor as ``[n, 1]``, to broadcast against ``[n, V]`` node values;
    anything else (0-d, or already per node) as it is."""
    return a.unsqueeze(-1) if a.dim() == 1 else a


def _body_args(spec: dict | None, default: dict) -> dict:
    out = dict(default)
    if spec:
        unknown = set(spec) - {"kind", "width", "depth", "activation"}
        if unknown:
            raise ValueError(f"unknown network option(s) {sorted(unknown)}; expected kind, width, depth, activation")
        out.update(spec)
    return out


class APNN(nn.Module):
    """Common machinery: the eps encoding and the input scaling.

    ``forward(method, *args)`` calls ``getattr(self, method)(*args)`` for one of the names in
    :attr:`METHODS`; this is the entry point used with :func:`torch.func.functional_call`,
    which always goes through ``forward``.
    """

    METHODS: tuple[str, ...] = ()

    def __init__(self, encoding: EpsEncoding, t_range: Sequence[float], x_range: Sequence[float], v_max: float,
                 time_windows: TimeWindows | None = None):
        super().__init__()
        self.encoding = encoding
        # per-task window ends (None: every task uses t_range); time is scaled by the task's own
        # window so that each task spans the whole time input
        self.time_windows = time_windows
        self.t_range = (float(t_range[0]), float(t_range[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))
        self.v_max = float(v_max)
        if not self.t_range[1] > self.t_range[0] or not self.x_range[1] > self.x_range[0] or not self.v_max > 0:
            raise ValueError(f"{type(self).__name__}: empty t/x range or v_max <= 0")

    def forward(self, method: str, *args):
        if method not in self.METHODS:
            raise ValueError(f"{type(self).__name__}: unknown method {method!r}; expected one of {self.METHODS}")
        return getattr(self, method)(*args)

    def _scale(self, t: Tensor, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t0, t1 = self.t_range
        if self.time_windows is not None and eps is not None:
            t1 = self.time_windows(eps)
        x0, _ = self.x_range
        length = self.x_length(eps)

        def per_row(a):
            # a per-point [n] scale against [n, V] grid coordinates
            return a.unsqueeze(-1) if isinstance(a, Tensor) and a.dim() == 1 and x.dim() == 2 else a

        t1, length = per_row(t1), per_row(length)
        return (t - t0) * (2.0 / (t1 - t0)) - 1.0, (x - x0) * (2.0 / length) - 1.0

    def _scale_slopes(self, t: Tensor, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The derivatives of :meth:`_scale`'s two outputs, ``d ts / dt`` and ``d xs / dx``,
        each like ``t``."""
        t0, t1 = self.t_range
        if self.time_windows is not None and eps is not None:
            t1 = self.time_windows(eps)
        length = self.x_length(eps)

        def like(a, ref):
            a = a if isinstance(a, Tensor) else ref.new_tensor(a)
            if a.dim() == 1 and ref.dim() == 2:  # a per-point [n] scale against [n, V] coordinates
                a = a.unsqueeze(-1)
            return a.to(ref.dtype).expand_as(ref)

        return like(2.0 / (t1 - t0), t), like(2.0 / length, x)

    def x_length(self, eps: Tensor | None) -> float | Tensor:
        """The length that the network's x input is scaled by (x0 + length maps to +1): the
        domain length here; models whose solutions live on an eps-dependent scale override it."""
        return self.x_range[1] - self.x_range[0]

    def point_features(self, t: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """``[*t.shape, 2 + enc]`` network input for points ``t, x`` of shape ``[n]`` or ``[n,
        V]`` (per-node coordinates); ``eps`` 0-d or ``[n]``, one value per point (row)."""
        ts, xs = self._scale(t, x, eps)
        if eps.dim() == 1 and t.dim() == 2:
            # a per-point [n] eps against [n, V] coordinates: broadcast along the row (a plain
            # expand_as would align it with the node axis, silently so when n == V)
            eps = eps.unsqueeze(-1)
        return torch.cat([ts.unsqueeze(-1), xs.unsqueeze(-1), self.encoding(eps.expand_as(t))], -1)

    def grid_features(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """``[n, V, 3 + enc]`` input at every (point, velocity node) pair.

        ``t, x`` are ``[n]`` or already ``[n, V]`` (the latter lets reverse-mode AD give a
        derivative per node); ``eps`` is ``[n]`` or 0-d, ``v`` is ``[V]``.
        """
        n, V = t.shape[0], v.shape[0]
        ts, xs = self._scale(t, x, eps.expand(n))
        ts = ts.unsqueeze(-1).expand(n, V) if ts.dim() == 1 else ts
        xs = xs.unsqueeze(-1).expand(n, V) if xs.dim() == 1 else xs
        enc = self.encoding(eps.expand(n)).unsqueeze(1).expand(n, V, self.encoding.out_dim)
        vs = (v / self.v_max).to(ts.dtype).expand(n, V)
        return torch.cat([ts.unsqueeze(-1), xs.unsqueeze(-1), vs.unsqueeze(-1), enc], -1)


class TransportAPNN(APNN):
    """Micro-macro APNN for linear transport in diffusive scaling (spec KINETIC.md section 1).

    ``f = rho(t, x, eps) + eps g`` with ``g = g_raw - <g_raw>`` (the average is taken by the loss
    with the quadrature rule, which makes ``<g> = 0`` exact). Two networks:

    * ``rho(t, x, eps)``: ``[n]`` -> ``[n]``;
    * ``g_raw(t, x, v, eps)``: ``[n]``, ``[V]`` -> ``[n, V]``.

    Two options adapt the inputs to the structure of the inflow problem at eps = O(1), where
    the data f(0, x, v) = 0 and f(t, 0, v > 0) = 1 are incompatible at the corner (0, 0) and the
    solution is a transport wedge that has travelled only x < t / eps (eps = 1, t = 0.1: x < 0.1):

    * ``reach`` > 0: x enters the networks scaled by ``L(eps) = min(x1 - x0, reach / eps)``
      instead of the slab length, so the wedge spans O(1) of the network's input for every eps
      (with the slab scaling it spans 0.1 of it and smooth networks smear it over its whole
      width). For eps <= reach / (x1 - x0) nothing changes; ``reach`` is a time window times a
      safety factor (e.g. 2 t_final).
    * ``half_range``: g also receives sign(v). At the inflow wall f jumps in v at v = 0
      (f = 1 for v > 0, the outgoing f(v < 0) is O(eps)-close to 1 for small eps but ~0 for
      eps = 1); with v alone a smooth g smears that jump and lets f(v < 0) be pulled towards
      1, which adds spurious inflow. The velocities are quadrature nodes (never 0) and are not
      differentiated, so the input is exact.

    * ``wall_layer`` > 0: the networks also receive the shapes of the kinetic boundary layers
      at the two walls, ``exp(-(x - x0) / eps)`` and ``exp(-(x1 - x) / eps)`` (their depth is
      the mean free path eps), for the tasks with ``eps >= wall_layer``, and zeros for the
      others. At eps = 0.1 the density drops from 0.82 at the wall to 0.65 at x = 0.05 while
      at eps = 1e-2 it is 0.975 at the wall: with (x, log10 eps) alone, a smooth network has to
      draw a layer whose depth changes tenfold between two neighbouring tasks. Below the
      threshold the layer is thinner than the collocation resolves, and a feature that is 1 at
      the wall and ~0 at every interior point would let the boundary loss be met at the wall
      alone, cut off from the interior solution; so it is 0 there (eps is a task constant and
      is never differentiated, so the switch is exact).

    * ``first_collision`` > 0: for the tasks with ``eps >= first_collision``, f is the exact
      uncollided flux ``f_u = 1[eps x < v t] exp(-x / (eps v))`` plus a collided part
      ``rho + eps g`` drawn by the networks (the first-collision split of the reference
      solver). At eps = 1 f_u is a fan of fronts, discontinuous in v at v = x / t; the collided
      part is continuous, so the networks and the velocity quadrature no longer have to draw
      the fronts. f_u never enters the networks or the quadrature: it solves the streaming
      and absorption part of the equation exactly, and what it leaves is its velocity average
      ``<f_u>`` (:meth:`uncollided_density`, continuous in (t, x) for t > 0), a source in
      the collided part's macro equation; the loss adds it (``TransportFormulation``), and
      :meth:`macroscopic` adds it to the density. The inflow data move to f_u, so the
      collided part's inflow is 0. For small eps f_u is a layer of depth eps at the wall and
      the source ``<f_u> / eps^2`` is stiff, hence the threshold.

    (An input that is discontinuous in (t, x), such as the exact uncollided flux
    1[eps x < v t] exp(-x / (eps v)), must not be used: autograd misses the delta of its jump,
    so the residuals do not see the mass it carries, and training finds spurious solutions
    with rho ~ 0. ``first_collision`` keeps f_u out of the networks for that reason.)

    Args:
        encoding: the eps encoding.
        t_range, x_range: time window and slab (default [0, 0.1] x [0, 1]).
        rho_net, g_net: dicts with ``kind`` ("mlp"/"resnet"), ``width``, ``depth``, ``activation``.
        reach: eps-dependent x scaling (0: the slab length for every eps).
        half_range: add sign(v) to the g network's input.
        wall_layer: smallest eps that gets the two wall-layer inputs (0: no such inputs).
        first_collision: smallest eps whose f is split into the exact uncollided flux and the
            collided part the networks draw (0: no split).
        time_windows: per-task time windows (:class:`TimeWindows`; None: ``t_range`` for all).
    """

    METHODS = ("rho", "g_raw", "macroscopic", "uncollided_density")
    #: Gauss-Legendre nodes of the velocity integral of the uncollided flux (in log v)
    UNCOLLIDED_NODES = 64

    def __init__(self, encoding: EpsEncoding, t_range=(0.0, 0.1), x_range=(0.0, 1.0),
                 rho_net: dict | None = None, g_net: dict | None = None, reach: float = 0.0,
                 half_range: bool = False, wall_layer: float = 0.0, first_collision: float = 0.0,
                 time_windows: TimeWindows | None = None):
        super().__init__(encoding, t_range, x_range, 1.0, time_windows)
        if not (math.isfinite(reach) and reach >= 0):
            raise ValueError(f"TransportAPNN: reach must be a finite number >= 0, got {reach}")
        if not (math.isfinite(wall_layer) and wall_layer >= 0):
            raise ValueError(f"TransportAPNN: wall_layer must be a finite number >= 0, got {wall_layer}")
        self.reach = float(reach)
        self.half_range = bool(half_range)
        self.wall_layer = float(wall_layer)
        if not (math.isfinite(first_collision) and first_collision >= 0):
            raise ValueError(f"TransportAPNN: first_collision must be a finite number >= 0, got {first_collision}")
        self.first_collision = float(first_collision)
        z, w = np.polynomial.legendre.leggauss(self.UNCOLLIDED_NODES)
        # a plain attribute, not a buffer: a constant of the method, not model state
        self._log_v_rule = (torch.tensor((z + 1.0) / 2.0), torch.tensor(w / 2.0))
        default = dict(kind="mlp", width=64, depth=4, activation="tanh")
        e = encoding.out_dim + (2 if self.wall_layer > 0 else 0)
        self.rho_net = make_body(in_dim=2 + e, out_dim=1, **_body_args(rho_net, default))
        self.g_net = make_body(in_dim=3 + e + int(self.half_range), out_dim=1, **_body_args(g_net, default))

    def x_length(self, eps: Tensor | None) -> float | Tensor:
        """``min(slab length, reach / eps)`` (the slab length when ``reach`` is 0)."""
        full = self.x_range[1] - self.x_range[0]
        if self.reach <= 0 or eps is None:
            return full
        return (self.reach / eps).clamp(max=full)

    def wall_layer_features(self, x: Tensor, eps: Tensor) -> Tensor:
        """``[..., 2]``: ``exp(-(x - x0) / eps)`` and ``exp(-(x1 - x) / eps)`` where
        ``eps >= wall_layer``, zeros elsewhere. ``x`` is ``[n]`` or ``[n, V]``; ``eps`` is 0-d
        or ``[n]`` (one value per point)."""
        x0, x1 = self.x_range
        e = eps.to(x.dtype)
        if e.dim() == 1 and x.dim() == 2:
            e = e.unsqueeze(-1)
        on = e >= self.wall_layer
        # the distances are >= 0 in the domain; clamping keeps exp finite for the tasks that are
        # off (a tiny eps) and for points a caller places outside the slab
        e_on = torch.where(on, e, torch.ones_like(e))
        left = torch.exp(-((x - x0) / e_on).clamp(min=0.0))
        right = torch.exp(-((x1 - x) / e_on).clamp(min=0.0))
        return torch.where(on.unsqueeze(-1), torch.stack([left, right], -1), torch.zeros((), dtype=x.dtype, device=x.device))

    def rho(self, t: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """Density ``[n]``."""
        h = self.point_features(t, x, eps)
        if self.wall_layer > 0:
            h = torch.cat([h, self.wall_layer_features(x, eps)], -1)
        return self.rho_net(h).squeeze(-1)

    def g_raw(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """Un-normalised microscopic part ``[n, V]`` at velocity nodes ``v``."""
        h = self.grid_features(t, x, v, eps)
        if self.wall_layer > 0:
            n, V = t.shape[0], v.shape[0]
            # per point, then broadcast over the nodes (per node only when x is per node)
            layer = self.wall_layer_features(x, eps.expand(n))
            h = torch.cat([h, layer if x.dim() == 2 else layer.unsqueeze(1).expand(n, V, 2)], -1)
        if self.half_range:
            sv = torch.sign(v).to(h.dtype).expand(*h.shape[:-1])
            h = torch.cat([h, sv.unsqueeze(-1)], -1)
        return self.g_net(h).squeeze(-1)

    def split(self, eps: Tensor) -> Tensor:
        """Whether the tasks ``eps`` (any shape) have the first-collision split (``first_collision``)."""
        return (eps >= self.first_collision) if self.first_collision > 0 else torch.zeros_like(eps, dtype=torch.bool)

    def uncollided_density(self, t: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """``<f_u> = 1/2 int_a^1 exp(-(x - x0) / (eps v)) dv`` with ``a = eps (x - x0) / (t - t0)``,
        ``[n]`` (``t, x``: ``[n]``, ``eps``: 0-d or ``[n]``), for the tasks with the split and 0
        for the others. No parameters, no derivatives: a source of the loss and a part of the
        density. Exact to ~1e-12 (tests/test_nn.py, against the exponential-integral form of
        :func:`hrgrad_ext.reference.transport.uncollided_rho_points`): Gauss-Legendre in log v
        from ``max(a, c / 40, 1e-12)`` (``c = (x - x0) / eps``; below ``c / 40`` the integrand is
        under e^-40) to 1, where the integrand ``v exp(-c / v)`` is smooth."""
        e = eps.expand_as(t).double()
        on = self.split(e)
        e = torch.where(on, e, torch.ones_like(e))
        tt = (t.double() - self.t_range[0]).clamp(min=0.0)
        xx = (x.double() - self.x_range[0]).clamp(min=0.0)
        c = xx / e
        # where t = 0 the fronts have not left the wall: a = inf, nothing to integrate
        a = torch.where(tt > 0, e * xx / tt.clamp(min=1e-300), torch.full_like(tt, math.inf))
        lo = torch.maximum(torch.maximum(a, c / 40.0), torch.full_like(a, 1e-12))
        log_lo = torch.log(lo.clamp(max=1.0)).unsqueeze(-1)
        z, w = (r.to(device=t.device) for r in self._log_v_rule)
        v = torch.exp(log_lo * (1.0 - z))  # from lo (z = 0) to 1 (z = 1)
        integral = (-log_lo.squeeze(-1)) * (w * v * torch.exp(-c.unsqueeze(-1) / v)).sum(-1)
        return torch.where(on & (lo < 1.0), 0.5 * integral, torch.zeros_like(integral)).to(t.dtype)

    def macroscopic(self, t: Tensor, x: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """The macroscopic quantities scored against references: ``{"rho": [n]}`` (with the
        first-collision split, the collided density plus :meth:`uncollided_density`)."""
        rho = self.rho(t, x, eps)
        if self.first_collision > 0:
            rho = rho + self.uncollided_density(t, x, eps)
        return {"rho": rho}


def log_maxwellian(log_rho: Tensor, u: Tensor, log_T: Tensor, v: Tensor) -> Tensor:
    """``log M[rho, u, T](v) = log rho - log(2 pi T) / 2 - (v - u)^2 / (2 T)`` at the nodes.

    ``log_rho, u, log_T``: ``[...]`` (one value per point); ``v``: ``[V]``; returns ``[..., V]``.
    A plain broadcasting formula (not the fused ``maxwellian`` op), so that it composes with
    ``torch.func`` transforms to any order, as the f network does.
    """
    c = v - u.unsqueeze(-1)
    return (log_rho - 0.5 * (log_T + math.log(2.0 * math.pi))).unsqueeze(-1) - 0.5 * c * c * torch.exp(-log_T).unsqueeze(-1)


def _log_maxwellian_per_node(log_rho: Tensor, u: Tensor, log_T: Tensor, v: Tensor) -> Tensor:
    """:func:`log_maxwellian` with one state per (point, node) pair: ``log_rho, u, log_T``
    ``[n, V]`` (e.g. the macro fields at per-node coordinates), ``v`` ``[V]``."""
    c = v - u
    return log_rho - 0.5 * (log_T + math.log(2.0 * math.pi)) - 0.5 * c * c * torch.exp(-log_T)


def maxwellian_exp_derivatives(rho: Tensor, u: Tensor, T: Tensor, d_macro: Sequence[tuple[Tensor, Tensor, Tensor]],
                               D: Tensor, d_D: Sequence[Tensor], v: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``f = M[rho, u, T](v) exp(D)`` and its derivatives along input directions, by the chain
    rule (exact): ``df = f (drho / rho + (v - u) du / T + ((v - u)^2 / T - 1) dT / (2 T) + dD)``.

    Args:
        rho, u, T: ``[n]``; ``d_macro``: per direction the tuple ``(drho, du, dT)`` of ``[n]``.
        D: ``[n, V]`` log deviation from the Maxwellian; ``d_D``: its derivative per direction.
        v: ``[V]`` nodes.

    Returns ``(f, [df per direction])``, each ``[n, V]``. This is how
    :class:`hrgrad_ext.train.losses.BGKFormulation` gets f_t and f_x of the ``"maxwellian"`` f
    form with the macro networks evaluated once per point (differentiating ``BGKAPNN.f``
    on the ``[n, V]`` grid would run them once per point and node).
    """
    c = v - u.unsqueeze(-1)
    Ti = 1.0 / T.unsqueeze(-1)
    f = torch.exp(log_maxwellian(torch.log(rho), u, torch.log(T), v) + D)
    outs = []
    for (dr, du, dT), dD in zip(d_macro, d_D):
        dlog = (dr / rho).unsqueeze(-1) + c * Ti * du.unsqueeze(-1) + 0.5 * (c * c * Ti - 1.0) * Ti * dT.unsqueeze(-1)
        outs.append(f * (dlog + dD))
    return f, outs


class BGKAPNN(APNN):
    """BGK APNN (spec KINETIC.md section 2): ``f(t, x, v, Kn)`` and ``rho, u, T (t, x, Kn)``.

    Macro networks, ``hard_ic=False`` (the spec): the Dirichlet states built in,

        rho = exp((1-s) log rho_L + s log rho_R + s (1-s) N_rho)
        u   = (1-s) u_L + s u_R + sqrt(s (1-s)) N_u
        T   = exp((1-s) log T_L + s log T_R + s (1-s) N_T)

    with ``s = (x - x0) / (x1 - x0)`` (for [-0.5, 0.5]: ``s (1-s) = 0.25 - x^2``); the initial
    data are a loss term.

    ``hard_ic=True``: the initial data ``(rho0, u0, T0)(x)`` hold exactly as well, with
    ``tau = (t - t0) / (t1 - t0)``:

        rho = exp(log rho0(x) + tau s (1-s) N_rho)
        u   = u0(x) + tau sqrt(s (1-s)) N_u
        T   = exp(log T0(x) + tau s (1-s) N_T)

    The IC loss terms of rho, u, T are then identically zero, and the networks spend their
    capacity on the dynamics instead of on reproducing the initial profile against residuals
    that pull the other way (with the spec form, IC weights 10, training reproduces the initial
    data and the wall states but leaves u ~ 0 at t = 0.1). The values at the walls are then
    ``q0(x0), q0(x1)`` for all t instead of the Dirichlet states: the same for cases I, II and
    V, within 2e-9 for IV (tanh(20 x)) and 9e-5 for III (tanh(10 x)). The initial profile must
    be continuous (the x derivatives of f see no jump), so case V's Riemann step is refused by
    the formulation.

    f network, ``f_form="free"`` (the spec): ``f = softplus(N_f(t, x, v, Kn))`` (positive).
    ``f_form="maxwellian"``: ``f = M[rho, u, T](v) exp(D)`` with ``D = N_f`` (``hard_ic``:
    ``D = tau N_f``, so ``f(t0) = M[rho0, u0, T0] = f0`` exactly). f is the local
    equilibrium of the macro networks times a learned deviation, which vanishes as Kn -> 0
    (the Chapman-Enskog expansion gives ``f = M (1 + O(Kn))``), so the network is
    asymptotic-preserving by construction: the consistency residuals then tie the macro fields
    to the moments of f only through the O(Kn) deviation, and the conservation residuals
    become the Euler equations of the macro networks (at small Kn this is what drives u).
    f is positive for both forms.

    Args:
        encoding: the Knudsen-number encoding.
        t_range, x_range, v_max: time window, domain and velocity bound.
        left, right: boundary states (rho, u, T).
        f_net, macro_net: body options (``kind``, ``width``, ``depth``, ``activation``); the
            macro options are used for each of the three macro networks.
        hard_ic: build the initial data into the macro networks (needs ``initial_profile``).
        f_form: ``"free"`` or ``"maxwellian"``.
        initial_profile: ``s(x)`` with ``q0 = q_L + (q_R - q_L) s(x)`` (a torch-traceable
            function, e.g. :func:`hrgrad_ext.reference.bgk.case_profile`).
        time_windows: per-task time windows (:class:`TimeWindows`; None: ``t_range`` for all).
        characteristic: give the f network the foot of the characteristic through (t, x) at
            velocity v, ``x - v (t - t0)`` (scaled as x), as a fourth input. Without collisions
            f is constant along characteristics, ``f = f0(x - v t, v)``; at Kn = 1 over the
            window [0, 0.1] the solution is close to that, and for case IV's tanh(20 x) data
            its log deviation from the local Maxwellian is a front along ``x = v t`` that
            sharpens in v as t grows, which a tanh network in (t, x, v) can only draw through
            products of its inputs. At small Kn f is near the Maxwellian and the input is
            unused.
        deviation_knee: ``kappa > 0`` (``f_form="maxwellian"`` only; 0 = off) scales the log
            deviation by the Chapman-Enskog factor ``Kn / (Kn + kappa)``: ``D = Kn / (Kn +
            kappa) N_f``. f = M (1 + O(Kn)) as Kn -> 0, so the deviation the network has to draw
            is then of one size at every Kn instead of spanning three decades (case IV's
            reference: |f - M| / |M| = 7 %, 5 %, 1 %, 0.1 % at Kn = 1, 0.1, 1e-2, 1e-3, i.e.
            0.08, 0.1, 0.11, 0.1 after dividing by the factor with kappa = 0.1), and f -> M
            holds by construction in the Euler limit, whatever N_f.
        uncollided: split f into the part that has not collided since t0 and the rest (the
            Duhamel form of BGK with collision rate 1 / Kn):

                f = a U + (1 - a) f_c,   a = exp(-(t - t0) / Kn),   U = f0(x - v (t - t0), v),

            ``f0 = M[rho0, u0, T0]`` the initial data (needs ``initial_profile``), the foot
            clamped to the domain (a particle from beyond a wall carries the wall state) and
            ``f_c`` the ``f_form``'s own f. ``U`` is exact free streaming, ``Kn (d_t + v d_x)
            (a U) = -a U``, so the networks only draw the collided part. At Kn = 1 over [0,
            0.1] that is a tenth of f: the reference there is close to free streaming, which
            the maxwellian form has to draw as a large log deviation (without this option the
            networks end with Euler-like fronts at Kn = 1 and 0.1). ``f(t0) = f0`` holds
            exactly, and ``a -> 0`` as Kn -> 0 for t > t0, so the Euler limit is the
            ``f_form``'s own.
        peculiar: give the f network the peculiar velocity of the macro networks, ``xi = (v -
            u) / sqrt(T)`` (times 1/4), as one more input (``f_form="maxwellian"`` only). The
            Chapman-Enskog deviation of this 1D-1V BGK model is ``log(f / M) = -Kn T_x / (2
            sqrt(T)) (xi^3 - 3 xi)`` (the u_x terms cancel for one velocity dimension): one
            fixed shape in xi times a field of (t, x). In v that shape moves and stretches with
            u and T across every front, which the network then has to draw point by point. The
            deviation then depends on the macro networks, so its t and x derivatives go
            through theirs as well.
        chapman_enskog: ``kappa > 0`` (``f_form="maxwellian"`` only; 0 = off) adds that
            first-order deviation, computed from the macro networks, to the log deviation:

                D += 3 tanh(g(Kn) A (xi^3 - 3 xi) / 3),   A = -Kn sqrt(T) (log T)_x / 2,
                g(Kn) = kappa^2 / (kappa^2 + Kn^2),

            so the f network only draws what the expansion misses. From case IV's reference
            fields at t = 0.1 this term alone is the reference's ``f - M`` within 11 % at Kn =
            1e-3 and 38 % at 1e-2 (L2 over x and v), while the networks' own deviation was off
            by 90-120 % at 1e-2; at Kn >= 0.1 the expansion is wrong (150 % at 0.1), hence the
            gate g (0.9 at Kn = kappa / 3, 0.08 at 3.3 kappa). ``3 tanh(. / 3)`` bounds the
            cubic where M has no mass (the exponential of an unbounded cubic overflows at the
            outer nodes) and changes it by under 4 % where it is below 1. ``(log T)_x`` is
            taken inside the model (Taylor mode, :meth:`macro_log_jets`), so the t and x
            derivatives of D hold the macro networks' second derivatives.
    """

    METHODS = ("f", "f_dev", "network_deviation", "chapman_enskog_term", "macro", "macro_derivatives",
               "macro_and_chapman_enskog_derivatives", "macroscopic", "uncollided", "uncollided_fraction")
    F_FORMS = ("free", "maxwellian")

    def __init__(self, encoding: EpsEncoding, t_range=(0.0, 0.1), x_range=(-0.5, 0.5), v_max: float = 10.0,
                 left=(1.5, 0.0, 1.5), right=(0.625, 0.0, 0.75), f_net: dict | None = None, macro_net: dict | None = None,
                 hard_ic: bool = False, f_form: str = "free", initial_profile=None,
                 time_windows: TimeWindows | None = None, characteristic: bool = False,
                 deviation_knee: float = 0.0, uncollided: bool = False, peculiar: bool = False,
                 chapman_enskog: float = 0.0):
        super().__init__(encoding, t_range, x_range, v_max, time_windows)
        if min(left[0], left[2], right[0], right[2]) <= 0:
            raise ValueError("BGKAPNN: boundary densities and temperatures must be positive")
        if not isinstance(hard_ic, bool):
            raise ValueError(f"BGKAPNN: hard_ic must be true or false, got {hard_ic!r}")
        if f_form not in self.F_FORMS:
            raise ValueError(f"BGKAPNN: unknown f_form {f_form!r}; expected one of {self.F_FORMS}")
        if hard_ic and not callable(initial_profile):
            raise ValueError("BGKAPNN: hard_ic needs the initial profile s(x) (initial_profile)")
        for name, flag in (("characteristic", characteristic), ("uncollided", uncollided), ("peculiar", peculiar)):
            if not isinstance(flag, bool):
                raise ValueError(f"BGKAPNN: {name} must be true or false, got {flag!r}")
        for name, value in (("deviation_knee", deviation_knee), ("chapman_enskog", chapman_enskog)):
            if not (is_finite_number(value) and value >= 0):
                raise ValueError(f"BGKAPNN: {name} must be a finite number >= 0 (0 = off), got {value!r}")
        # the options that act on the log deviation D of f = M exp(D), or read the macro networks' M
        for name, on in (("deviation_knee", deviation_knee > 0), ("peculiar", peculiar), ("chapman_enskog", chapman_enskog > 0)):
            if on and f_form != "maxwellian":
                raise ValueError(f"BGKAPNN: {name} acts on the log deviation of f_form = 'maxwellian'; "
                                 f"f_form = {f_form!r} has none")
        if uncollided and not callable(initial_profile):
            raise ValueError("BGKAPNN: uncollided needs the initial profile s(x) (initial_profile)")
        self.characteristic = characteristic
        self.deviation_knee = float(deviation_knee)
        self.uncollided_part = uncollided
        self.peculiar = peculiar
        self.chapman_enskog = float(chapman_enskog)
        e = encoding.out_dim
        self.f_net = make_body(in_dim=3 + e + int(characteristic) + int(peculiar), out_dim=1, **_body_args(f_net, dict(kind="resnet", width=128, depth=3, activation="tanh")))
        mdef = _body_args(macro_net, dict(kind="mlp", width=64, depth=3, activation="tanh"))
        self.rho_net = make_body(in_dim=2 + e, out_dim=1, **mdef)
        self.u_net = make_body(in_dim=2 + e, out_dim=1, **mdef)
        self.T_net = make_body(in_dim=2 + e, out_dim=1, **mdef)
        self.left = tuple(float(a) for a in left)
        self.right = tuple(float(a) for a in right)
        self.hard_ic = hard_ic
        self.f_form = f_form
        self.initial_profile = initial_profile

    def initial_state(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rho0, u0, T0)`` at ``x`` from ``initial_profile`` (``hard_ic`` only)."""
        s = self.initial_profile(x)
        return tuple(a + (b - a) * s for a, b in zip(self.left, self.right))

    def _tau(self, t: Tensor) -> Tensor:
        t0, t1 = self.t_range
        return (t - t0) / (t1 - t0)

    def f_dev(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """``f_form="maxwellian"``: the log deviation ``D = log(f / M[rho, u, T])``, ``[n, V]``
        (``N_f``, times tau with ``hard_ic``, times ``Kn / (Kn + deviation_knee)`` with a
        knee, plus :meth:`chapman_enskog_deviation` with ``chapman_enskog``).
        ``f_form="free"``: the raw network output."""
        return self._deviation(t, x, v, eps, self._macro_state(t, x, eps) if self.reads_macro else None)

    def network_deviation(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """The part of :meth:`f_dev` that the f network draws, ``[n, V]``: all of it but the
        :meth:`chapman_enskog_term`."""
        return self._network_deviation(t, x, v, eps, self._macro_log(t, x, eps) if self.peculiar else None)

    def chapman_enskog_term(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """What ``chapman_enskog`` adds to :meth:`f_dev`, ``[n, V]``: the
        :meth:`chapman_enskog_deviation`, times tau with ``hard_ic`` (so that ``f(t0) = f0``
        exactly, as for the network's part)."""
        return self._chapman_enskog_term_of(t, self._macro_state(t, x, eps), v, eps)

    def _chapman_enskog_term_of(self, t: Tensor, state, v: Tensor, eps: Tensor) -> Tensor:
        """:meth:`chapman_enskog_term` given :meth:`_macro_state` at ``(t, x)``."""
        ce = self._chapman_enskog_of(state, v, eps)
        if self.hard_ic:
            tau = self._tau(t)
            ce = _column(tau) * ce
        return ce

    def _macro_state(self, t: Tensor, x: Tensor, eps: Tensor) -> tuple[Tensor, ...]:
        """``(log rho, u, log T)`` at ``(t, x)`` and, with ``chapman_enskog``, ``(log T)_x``
        (one first-order Taylor-mode pass through the macro networks instead of a second run
        of them under forward mode)."""
        if self.chapman_enskog <= 0:
            return self._macro_log(t, x, eps)
        log_rho, u, log_T = self.macro_log_jets(t, x, eps)
        return log_rho.value, u.value, log_T.value, log_T.first[1]

    @property
    def reads_macro(self) -> bool:
        """Whether the log deviation reads the macro networks (``peculiar`` or
        ``chapman_enskog``)."""
        return self.peculiar or self.chapman_enskog > 0

    def chapman_enskog_deviation(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """The bounded first-order Chapman-Enskog log deviation of ``chapman_enskog`` (the
        class docstring), ``[n, V]``, from the macro networks at ``(t, x)`` (``[n]`` or ``[n,
        V]``; ``eps`` 0-d or ``[n]``)."""
        return self._chapman_enskog_of(self._macro_state(t, x, eps), v, eps)

    def _chapman_enskog_of(self, state, v: Tensor, eps: Tensor) -> Tensor:
        """:meth:`chapman_enskog_deviation` given :meth:`_macro_state` (per point or per node)."""
        _, u, log_T, log_T_x = (_column(a) for a in state)
        return self._chapman_enskog_parts(u, log_T, log_T_x, v, eps)[0]

    def _chapman_enskog_parts(self, u: Tensor, log_T: Tensor, log_T_x: Tensor, v: Tensor, eps: Tensor):
        """``(C, gain, P, xi)``: the bounded deviation ``C = 3 tanh(gain (log T)_x P / 3)``,
        ``[n, V]``, with ``P = xi^3 - 3 xi``, ``xi = (v - u) exp(-log T / 2)`` and ``gain =
        -Kn g(Kn) sqrt(T) / 2`` (``u, log_T, log_T_x``: ``[n, 1]`` or ``[n, V]``)."""
        xi = self._xi(v, u, log_T)
        kn = _column(eps)
        kappa2 = self.chapman_enskog ** 2
        gain = -0.5 * kn * kappa2 / (kappa2 + kn * kn) * torch.exp(0.5 * log_T)
        cubic = xi * xi * xi - 3.0 * xi
        return 3.0 * torch.tanh(gain * log_T_x * cubic / 3.0), gain, cubic, xi

    # |xi| <= 4 holds all but 6e-5 of a Maxwellian's mass: the input's working range onto [-1, 1]
    PECULIAR_SCALE = 0.25

    def peculiar_velocity(self, v: Tensor, u: Tensor, log_T: Tensor) -> Tensor:
        """``(v - u) / sqrt(T)`` times :attr:`PECULIAR_SCALE`, ``[n, V]`` (``u, log_T``: ``[n]``
        or ``[n, V]``)."""
        return self._xi(v, u, log_T) * self.PECULIAR_SCALE

    @staticmethod
    def _xi(v: Tensor, u: Tensor, log_T: Tensor) -> Tensor:
        """``xi = (v - u) / sqrt(T)``, ``[n, V]`` (``u, log_T``: ``[n]`` or ``[n, V]``)."""
        u = _column(u)
        log_T = _column(log_T)
        return (v.to(u.dtype) - u) * torch.exp(-0.5 * log_T)

    def _deviation(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor, state, network_share=None) -> Tensor:
        """:meth:`f_dev` given :meth:`_macro_state` at ``(t, x)`` (read with ``peculiar`` and
        ``chapman_enskog``), the network's part times ``network_share`` when one is given."""
        D = self._network_deviation(t, x, v, eps, state)
        if network_share is not None:
            D = _column(network_share) * D
        return D + self._chapman_enskog_term_of(t, state, v, eps) if self.chapman_enskog > 0 else D

    def _network_deviation(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor, macro_log) -> Tensor:
        """:meth:`network_deviation` given ``(log rho, u, log T)`` at ``(t, x)`` (read with
        ``peculiar``)."""
        feats = self.grid_features(t, x, v, eps)
        extra = []
        if self.characteristic:
            extra.append(self.characteristic_foot(t, x, v))
        if self.peculiar:
            extra.append(self.peculiar_velocity(v, macro_log[1], macro_log[2]))
        if extra:
            feats = torch.cat([feats, *(a.unsqueeze(-1) for a in extra)], -1)
        D = self.f_net(feats).squeeze(-1)
        if self.hard_ic and self.f_form == "maxwellian":
            tau = self._tau(t)
            D = _column(tau) * D
        if self.deviation_knee > 0:
            factor = eps / (eps + self.deviation_knee)
            D = _column(factor) * D
        return D

    def characteristic_foot(self, t: Tensor, x: Tensor, v: Tensor) -> Tensor:
        """``x - v (t - t0)``, scaled as the x input (the domain onto [-1, 1]), ``[n, V]``; ``t,
        x``: ``[n]`` or ``[n, V]``."""
        t = _column(t)
        x = _column(x)
        x0, x1 = self.x_range
        foot = x - v.to(x.dtype) * (t - self.t_range[0])
        return (foot - x0) * (2.0 / (x1 - x0)) - 1.0

    def f(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor, network_share: Tensor | None = None) -> Tensor:
        """Distribution function ``[n, V]`` at the velocity nodes (positive).

        ``t, x``: ``[n]`` or ``[n, V]``. For the maxwellian form with ``[n, V]`` coordinates
        the macro networks run at every (point, node) pair, so that per-node input derivatives
        of this method stay exact; the formulation avoids that cost with
        :func:`maxwellian_exp_derivatives`.

        ``network_share`` (maxwellian form only; 0-d or ``[n]``, like ``eps``): a factor on the
        f network's part of the log deviation. 0 gives the closure of the macro networks
        alone, ``M exp(C)`` with the Chapman-Enskog term ``C`` (``M`` without
        ``chapman_enskog``), plus the uncollided part."""
        if self.f_form == "free":
            if network_share is not None:
                raise ValueError("BGKAPNN.f: network_share needs f_form='maxwellian' (the free form has no closure)")
            f = F.softplus(self.f_dev(t, x, v, eps))
        else:
            state = self._macro_state(t, x, eps)
            log_rho, u, log_T = state[:3]
            D = self._deviation(t, x, v, eps, state, network_share)
            if log_rho.dim() == 2:  # [n, V] coordinates: one Maxwellian per node
                logM = _log_maxwellian_per_node(log_rho, u, log_T, v)
            else:
                logM = log_maxwellian(log_rho, u, log_T, v)
            f = torch.exp(logM + D)
        if not self.uncollided_part:
            return f
        a = self.uncollided_fraction(t, eps)
        a = _column(a)
        return a * self.streamed_initial(t, x, v) + (1.0 - a) * f

    def uncollided_fraction(self, t: Tensor, eps: Tensor) -> Tensor:
        """``a = exp(-(t - t0) / Kn)``, like ``t``: the fraction of f that has not collided since
        t0 (``uncollided``)."""
        if eps.dim() == 1 and t.dim() == 2:
            eps = eps.unsqueeze(-1)
        return torch.exp(-(t - self.t_range[0]) / eps)

    def uncollided(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """``a U = exp(-(t - t0) / Kn) f0(x - v (t - t0), v)``, ``[n, V]`` (``t, x``: ``[n]`` or
        ``[n, V]``): the initial data carried along the characteristics and damped by the
        collisions. No parameters; ``Kn (d_t + v d_x)(a U) = -a U`` wherever the foot is inside
        the domain."""
        a = self.uncollided_fraction(t, eps)
        return _column(a) * self.streamed_initial(t, x, v)

    def streamed_initial(self, t: Tensor, x: Tensor, v: Tensor) -> Tensor:
        """``U = f0(x - v (t - t0), v)``, ``[n, V]``: the initial Maxwellian carried along the
        characteristics, the foot clamped to the domain (:meth:`f` weighs it with the
        uncollided fraction it has already computed)."""
        if not callable(self.initial_profile):
            raise ValueError("BGKAPNN.uncollided needs the initial profile s(x) (initial_profile)")
        t = _column(t)
        x = _column(x)
        vv = v.to(x.dtype)
        foot = (x - vv * (t - self.t_range[0])).clamp(*self.x_range)
        rho0, u0, T0 = self.initial_state(foot)
        return torch.exp(_log_maxwellian_per_node(torch.log(rho0), u0, torch.log(T0), vv))

    def _macro_log(self, t: Tensor, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log rho, u, log T)`` with the built-in boundary (and, ``hard_ic``, initial) data."""
        h = self.point_features(t, x, eps)
        a_rho, b_rho, a_u, b_u, a_T, b_T = self._macro_frame(t, x)
        n_rho, n_u, n_T = (net(h).squeeze(-1) for net in self.macro_nets())
        return a_rho + b_rho * n_rho, a_u + b_u * n_u, a_T + b_T * n_T

    def macro_nets(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The networks of log rho, u and log T."""
        return self.rho_net, self.u_net, self.T_net

    def _macro_frame(self, t: Tensor, x: Tensor) -> tuple[Tensor, ...]:
        """``(A_rho, B_rho, A_u, B_u, A_T, B_T)``, like ``x``: the parameter-free frame of
        :meth:`_macro_log`, ``log rho = A_rho + B_rho N_rho`` (u and log T alike), which puts
        the boundary states (and, ``hard_ic``, the initial data) in."""
        x0, x1 = self.x_range
        s = (x - x0) / (x1 - x0)
        bump = s * (1.0 - s)
        root = torch.sqrt(bump.clamp_min(0.0))
        if self.hard_ic:
            rho0, u0, T0 = self.initial_state(x)
            tau = self._tau(t)
            tb = tau * bump
            return torch.log(rho0), tb, u0, tau * root, torch.log(T0), tb
        (rl, ul, Tl), (rr, ur, Tr) = self.left, self.right
        return ((1.0 - s) * math.log(rl) + s * math.log(rr), bump, (1.0 - s) * ul + s * ur, root,
                (1.0 - s) * math.log(Tl) + s * math.log(Tr), bump)

    def _macro_frame_jets(self, t: Tensor, x: Tensor, pairs: tuple[tuple[int, int], ...]) -> tuple[Jet, ...]:
        """Jets of :meth:`_macro_frame`'s six outputs along (t, x). Without ``hard_ic`` they are
        functions of x of known form, differentiated here by hand: through torch.func (as
        :func:`~hrgrad_ext.nn.jets.jet_of` does for the initial profile of ``hard_ic``) these
        few elementwise operations cost more than the three networks' Taylor-mode pass."""
        if self.hard_ic:
            return jet_of(self._macro_frame, (t, x), pairs)
        a_rho, bump, a_u, root, a_T, _ = self._macro_frame(t, x)
        x0, x1 = self.x_range
        length = x1 - x0
        s = (x - x0) / length
        zero = torch.zeros_like(x)

        def of_x(value, d_x, d_xx):
            # a function of x alone: nothing along t; of the second derivatives only d_x d_x
            second = torch.stack([d_xx if (i, j) == (1, 1) else zero for i, j in pairs]) if pairs else None
            return Jet(value, torch.stack([zero, d_x]), second, tuple(pairs))

        (rl, ul, Tl), (rr, ur, Tr) = self.left, self.right
        bump_x = (1.0 - 2.0 * s) / length
        bump_xx = zero - 2.0 / length ** 2
        root_x = bump_x / (2.0 * root)
        root_xx = (bump_xx - 2.0 * root_x * root_x) / (2.0 * root)  # from root^2 = bump
        bump_jet = of_x(bump, bump_x, bump_xx)
        linear = lambda value, a, b: of_x(value, zero + (b - a) / length, zero)
        return (linear(a_rho, math.log(rl), math.log(rr)), bump_jet, linear(a_u, ul, ur), of_x(root, root_x, root_xx),
                linear(a_T, math.log(Tl), math.log(Tr)), bump_jet)

    def macro_log_jets(self, t: Tensor, x: Tensor, eps: Tensor,
                       pairs: tuple[tuple[int, int], ...] = ()) -> tuple[Jet, Jet, Jet]:
        """Jets (:class:`~hrgrad_ext.nn.jets.Jet`) of ``(log rho, u, log T)`` at points ``t, x``
        (``[n]``; ``eps`` 0-d or ``[n]``) along the directions (t, x), with the second
        derivatives of ``pairs`` (e.g. ``((1, 0), (1, 1))``: d_t d_x and d_x d_x): the values
        of :meth:`_macro_log` and their exact derivatives, in one Taylor-mode pass through the
        macro networks."""
        h = self.point_features(t, x, eps)
        # the network input is (ts, xs, enc(eps)): ts linear in t, xs linear in x, the rest
        # constant in both, so the input's derivatives are the two slopes at their positions
        t_slope, x_slope = self._scale_slopes(t, x, eps)
        width = h.shape[-1]
        unit = torch.eye(2, width, dtype=h.dtype, device=h.device)
        first = torch.stack([unit[0] * t_slope.unsqueeze(-1), unit[1] * x_slope.unsqueeze(-1)])
        second = h.new_zeros((len(pairs),) + h.shape) if pairs else None
        inp = Jet(h, first, second, tuple(pairs))
        frame = self._macro_frame_jets(t, x, pairs)
        nets = [body_jet(net, inp).squeeze(-1) for net in self.macro_nets()]
        return tuple(frame[2 * q] + frame[2 * q + 1] * nets[q] for q in range(3))

    def macro_derivatives(self, t: Tensor, x: Tensor, eps: Tensor):
        """``((rho, u, T), ((rho_t, u_t, T_t), (rho_x, u_x, T_x)))`` at points ``t, x``
        (``[n]``): :meth:`macro` and its t and x derivatives (Taylor mode, see
        :meth:`macro_log_jets`)."""
        return self._macro_of_jets(*self.macro_log_jets(t, x, eps))

    @staticmethod
    def _macro_of_jets(log_rho: Jet, u: Jet, log_T: Jet):
        """:meth:`macro_derivatives`' layout from the jets of ``(log rho, u, log T)``."""
        rho, T = torch.exp(log_rho.value), torch.exp(log_T.value)
        return (rho, u.value, T), tuple((rho * log_rho.first[d], u.first[d], T * log_T.first[d]) for d in range(2))

    def macro_and_chapman_enskog_derivatives(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor):
        """:meth:`macro_derivatives` and ``(C, (C_t, C_x))``, the :meth:`chapman_enskog_term`
        ``[n, V]`` and its t and x derivatives, from one Taylor-mode pass through the macro
        networks (the term reads (log T)_x, so its derivatives hold two second derivatives)."""
        log_rho, u, log_T = self.macro_log_jets(t, x, eps, pairs=((1, 0), (1, 1)))
        macro = self._macro_of_jets(log_rho, u, log_T)
        col = lambda a: a.unsqueeze(-1)  # per point against the [n, V] nodes
        lT, lT_x = col(log_T.value), col(log_T.first[1])
        C, gain, cubic, xi = self._chapman_enskog_parts(col(u.value), lT, lT_x, v, eps)
        # C = 3 tanh(A P / 3), A = gain (log T)_x, P = xi^3 - 3 xi, xi = (v - u) exp(-log T / 2)
        A = gain * lT_x
        slope = 1.0 - (C / 3.0) ** 2
        derivs = []
        for d in range(2):
            lT_d = col(log_T.first[d])
            A_d = 0.5 * lT_d * A + gain * col(log_T.second[d])  # second[d]: d_d (log T)_x
            xi_d = -col(u.first[d]) * torch.exp(-0.5 * lT) - 0.5 * xi * lT_d
            derivs.append(slope * (A_d * cubic + A * 3.0 * (xi * xi - 1.0) * xi_d))
        if self.hard_ic:  # the term times tau(t)
            tau = col(self._tau(t))
            derivs = [tau * derivs[0] + C / (self.t_range[1] - self.t_range[0]), tau * derivs[1]]
            C = tau * C
        return macro, (C, tuple(derivs))

    def macro(self, t: Tensor, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rho, u, T)``, each like ``t``, equal to the boundary states at both ends of x
        (``hard_ic``: also to the initial data at t0)."""
        log_rho, u, log_T = self._macro_log(t, x, eps)
        return torch.exp(log_rho), u, torch.exp(log_T)

    def macroscopic(self, t: Tensor, x: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """``{"rho", "u", "T", "momentum", "energy"}``, each ``[n]``."""
        rho, u, T = self.macro(t, x, eps)
        return {"rho": rho, "u": u, "T": T, "momentum": rho * u, "energy": 0.5 * rho * (u * u + T)}
