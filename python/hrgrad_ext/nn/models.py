"""APNN models for the linear transport (micro-macro) and BGK equations with eps as input.

Inputs are rescaled to [-1, 1] inside the models (t over the time window, x over the domain,
v by the velocity bound), so derivatives with respect to the *physical* t and x come out of
autograd or forward-mode AD without manual chain rules.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bodies import make_body
from .encoding import EpsEncoding
from .windows import TimeWindows

__all__ = ["APNN", "BGKAPNN", "TransportAPNN"]


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

    def x_length(self, eps: Tensor | None) -> float | Tensor:
        """The length that the network's x input is scaled by (x0 + length maps to +1): the
        domain length here; models whose solutions live on an eps-dependent scale override it."""
        return self.x_range[1] - self.x_range[0]

    def point_features(self, t: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """``[n, 2 + enc]`` network input for points ``t, x, eps`` of shape ``[n]``."""
        ts, xs = self._scale(t, x, eps)
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

    (An input that is discontinuous in (t, x), such as the exact uncollided flux
    1[eps x < v t] exp(-x / (eps v)), must not be used: autograd misses the delta of its jump,
    so the residuals do not see the mass it carries, and training finds spurious solutions
    with rho ~ 0.)

    Args:
        encoding: the eps encoding.
        t_range, x_range: time window and slab (default [0, 0.1] x [0, 1]).
        rho_net, g_net: dicts with ``kind`` ("mlp"/"resnet"), ``width``, ``depth``, ``activation``.
        reach: eps-dependent x scaling (0: the slab length for every eps).
        half_range: add sign(v) to the g network's input.
        time_windows: per-task time windows (:class:`TimeWindows`; None: ``t_range`` for all).
    """

    METHODS = ("rho", "g_raw", "macroscopic")

    def __init__(self, encoding: EpsEncoding, t_range=(0.0, 0.1), x_range=(0.0, 1.0),
                 rho_net: dict | None = None, g_net: dict | None = None, reach: float = 0.0,
                 half_range: bool = False, time_windows: TimeWindows | None = None):
        super().__init__(encoding, t_range, x_range, 1.0, time_windows)
        if not (math.isfinite(reach) and reach >= 0):
            raise ValueError(f"TransportAPNN: reach must be a finite number >= 0, got {reach}")
        self.reach = float(reach)
        self.half_range = bool(half_range)
        default = dict(kind="mlp", width=64, depth=4, activation="tanh")
        e = encoding.out_dim
        self.rho_net = make_body(in_dim=2 + e, out_dim=1, **_body_args(rho_net, default))
        self.g_net = make_body(in_dim=3 + e + int(self.half_range), out_dim=1, **_body_args(g_net, default))

    def x_length(self, eps: Tensor | None) -> float | Tensor:
        """``min(slab length, reach / eps)`` (the slab length when ``reach`` is 0)."""
        full = self.x_range[1] - self.x_range[0]
        if self.reach <= 0 or eps is None:
            return full
        return (self.reach / eps).clamp(max=full)

    def rho(self, t: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """Density ``[n]``."""
        return self.rho_net(self.point_features(t, x, eps)).squeeze(-1)

    def g_raw(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """Un-normalised microscopic part ``[n, V]`` at velocity nodes ``v``."""
        h = self.grid_features(t, x, v, eps)
        if self.half_range:
            sv = torch.sign(v).to(h.dtype).expand(*h.shape[:-1])
            h = torch.cat([h, sv.unsqueeze(-1)], -1)
        return self.g_net(h).squeeze(-1)

    def macroscopic(self, t: Tensor, x: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """The macroscopic quantities scored against references: ``{"rho": [n]}``."""
        return {"rho": self.rho(t, x, eps)}


class BGKAPNN(APNN):
    """BGK APNN (spec KINETIC.md section 2): ``f(t, x, v, Kn)`` with a softplus output (f > 0)
    and ``rho, u, T (t, x, Kn)`` with the Dirichlet states built in:

        rho = exp((1-s) log rho_L + s log rho_R + s (1-s) N_rho)
        u   = (1-s) u_L + s u_R + sqrt(s (1-s)) N_u
        T   = exp((1-s) log T_L + s log T_R + s (1-s) N_T)

    with ``s = (x - x0) / (x1 - x0)`` (for [-0.5, 0.5]: ``s (1-s) = 0.25 - x^2``).

    Args:
        encoding: the Knudsen-number encoding.
        t_range, x_range, v_max: time window, domain and velocity bound.
        left, right: boundary states (rho, u, T).
        f_net, macro_net: body options (``kind``, ``width``, ``depth``, ``activation``); the
            macro options are used for each of the three macro networks.
        time_windows: per-task time windows (:class:`TimeWindows`; None: ``t_range`` for all).
    """

    METHODS = ("f", "macro", "macroscopic")

    def __init__(self, encoding: EpsEncoding, t_range=(0.0, 0.1), x_range=(-0.5, 0.5), v_max: float = 10.0,
                 left=(1.5, 0.0, 1.5), right=(0.625, 0.0, 0.75), f_net: dict | None = None, macro_net: dict | None = None,
                 time_windows: TimeWindows | None = None):
        super().__init__(encoding, t_range, x_range, v_max, time_windows)
        if min(left[0], left[2], right[0], right[2]) <= 0:
            raise ValueError("BGKAPNN: boundary densities and temperatures must be positive")
        e = encoding.out_dim
        self.f_net = make_body(in_dim=3 + e, out_dim=1, **_body_args(f_net, dict(kind="resnet", width=128, depth=3, activation="tanh")))
        mdef = _body_args(macro_net, dict(kind="mlp", width=64, depth=3, activation="tanh"))
        self.rho_net = make_body(in_dim=2 + e, out_dim=1, **mdef)
        self.u_net = make_body(in_dim=2 + e, out_dim=1, **mdef)
        self.T_net = make_body(in_dim=2 + e, out_dim=1, **mdef)
        self.left = tuple(float(a) for a in left)
        self.right = tuple(float(a) for a in right)

    def f(self, t: Tensor, x: Tensor, v: Tensor, eps: Tensor) -> Tensor:
        """Distribution function ``[n, V]`` at the velocity nodes (softplus: positive)."""
        return F.softplus(self.f_net(self.grid_features(t, x, v, eps)).squeeze(-1))

    def macro(self, t: Tensor, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rho, u, T)``, each ``[n]``, equal to the boundary states at both ends of x."""
        h = self.point_features(t, x, eps)
        x0, x1 = self.x_range
        s = (x - x0) / (x1 - x0)
        bump = s * (1.0 - s)
        (rl, ul, Tl), (rr, ur, Tr) = self.left, self.right
        rho = torch.exp((1.0 - s) * math.log(rl) + s * math.log(rr) + bump * self.rho_net(h).squeeze(-1))
        u = (1.0 - s) * ul + s * ur + torch.sqrt(bump.clamp_min(0.0)) * self.u_net(h).squeeze(-1)
        T = torch.exp((1.0 - s) * math.log(Tl) + s * math.log(Tr) + bump * self.T_net(h).squeeze(-1))
        return rho, u, T

    def macroscopic(self, t: Tensor, x: Tensor, eps: Tensor) -> dict[str, Tensor]:
        """``{"rho", "u", "T", "momentum", "energy"}``, each ``[n]``."""
        rho, u, T = self.macro(t, x, eps)
        return {"rho": rho, "u": u, "T": T, "momentum": rho * u, "energy": 0.5 * rho * (u * u + T)}
