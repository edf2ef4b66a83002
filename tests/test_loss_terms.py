"""Every loss term of the two APNN formulations against values derived by hand.

The "networks" here are closed-form fields (small ``nn.Module`` s with the APNN method
interface and a few scalar parameters), so that each residual, and each loss, is known in
closed form; nothing in the expected values goes through ``form.forward``, ``form.loss`` or the
fused ops. The fields go through the code under test both ways: the segmented path
(``torch.func.vmap`` over per-task parameter copies, forward/reverse-mode input derivatives)
and the eager single-task path (``task_losses``, reverse mode). The parameters are the
amplitudes of the deviations from an exact solution, so the task gradients are checked against
the hand derivative of the closed-form loss as well.

* transport (micro-macro): an exact solution of the micro-macro system (every residual term
  non-zero on its own, the sum zero), perturbations with closed-form residuals, the inflow loss
  where only the incoming (or only the outgoing) half of the velocities is wrong, the initial
  data on a hand-built field;
* BGK: ``F = M + (F0 - M) exp(-t/kn)`` with a constant macroscopic state (exact), a local
  Maxwellian of linear (t, x) macro fields scaled by ``1 + kappa`` (closed-form kinetic,
  conservation and consistency residuals, both ``f_form``s), the initial data of case IV
  (profile written out here, not taken from the package) with known offsets;
* symmetric (Gauss-Legendre) and asymmetric quadrature rules.

Tolerances: float64 throughout; the BGK closed forms use the continuous moments of the
Maxwellian, which the 64-node rules reproduce to ~1e-12 (relative 1e-9 on the losses).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from apnn_reference import case_iv_profile, maxwellian, spec_transport_residuals

from hrgrad_ext.train.losses import BGKFormulation, TransportFormulation
from hrgrad_ext.train.segmented import TaskLayout, segmented_task_gradients, task_losses

f64 = torch.float64


def _param(x) -> nn.Parameter:
    return nn.Parameter(torch.tensor(float(x), dtype=f64))


def _on(t, x):
    """0 * (t + x): the eager path differentiates every field with respect to t and x in
    reverse mode, which needs the inputs in the graph even where a field is constant."""
    return 0 * (t + x)


def gauss_rule(n: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    return (torch.tensor(lo + 0.5 * (hi - lo) * (x + 1), dtype=f64), torch.tensor(0.5 * (hi - lo) * w, dtype=f64))


def skewed_rule(n_neg: int, n_pos: int, lo: float, hi: float, tilt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A rule with more nodes on one side of 0 and its weights tilted to the other, so that
    ``<v> != 0``: the odd moments that a symmetric rule hides are non-zero."""
    vn, wn = gauss_rule(n_neg, lo, 0.0)
    vp, wp = gauss_rule(n_pos, 0.0, hi)
    return torch.cat([vn, vp]), torch.cat([wn * (1 + tilt), wp * (1 - tilt)])


def losses_both_paths(model, form, eps, mode="eps", deriv="fast"):
    """``(segmented group losses {group: [K]}, jacobians, eager group losses {group: [K]})``."""
    layout = TaskLayout(tuple(eps), form.groups, mode)
    batch = form.sample_batch(torch.Generator().manual_seed(7), torch.tensor(eps, dtype=f64), "cpu", f64)
    _, seg, jac = segmented_task_gradients(model, form, batch, layout, deriv)
    eager = [task_losses(model, form, batch, layout, k) for k in range(len(eps))]
    eager = {g: torch.stack([e[g] for e in eager]).detach() for g in form.groups}
    return batch, seg, jac, eager


def assert_losses(got: torch.Tensor, want: torch.Tensor, rtol=1e-11, atol=1e-24):
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)


# ============================================================================================
# transport: eps^2 g_t + eps (v g_x - <v g_x>) + v rho_x + g = 0, rho_t + <v g_x> = 0
# ============================================================================================


class TransportFields(nn.Module):
    """An exact solution of the micro-macro system for a rule with <v> = <v^3> = 0 and
    <v^2> = m2, plus two perturbations of amplitudes ``a`` (in rho) and ``b`` (in g):

        rho   = c (x^2 + 2 m2 t) + 1/4 + a x t
        g_raw = -2 c x v + 2 c eps (v^2 - m2) + D v exp(-t/eps^2) + sin(3x + t) + b t x v^3

    (sin(3x + t) is constant in v: the normalisation g = g_raw - <g_raw> must remove it). With
    a = b = 0 each residual term is non-zero (eps^2 g_t = -D v exp(..), eps (v g_x - <v g_x>) =
    -2 c eps (v^2 - m2), v rho_x = 2 c x v, g) and they cancel."""

    METHODS = ("rho", "g_raw")

    def __init__(self, c=0.7, D=0.4, a=0.0, b=0.0, m2=1.0 / 3.0):
        super().__init__()
        self.c, self.a, self.b = _param(c), _param(a), _param(b)
        self.D, self.m2 = D, m2

    def forward(self, method, *args):
        return getattr(self, method)(*args)

    def rho(self, t, x, eps):
        return self.c * (x * x + 2 * self.m2 * t) + 0.25 + self.a * x * t

    def g_raw(self, t, x, v, eps):
        if t.dim() == 1:
            t, x = t[:, None], x[:, None]
        return (-2 * self.c * x * v + 2 * self.c * eps * (v * v - self.m2) + self.D * v * torch.exp(-t / (eps * eps))
                + torch.sin(3 * x + t) + self.b * t * x * v ** 3)


def transport_interior_by_hand(t, x, v, e, a, b, m4):
    """The residuals of :class:`TransportFields` on a rule with <v> = <v^3> = 0 and <v^4> =
    m4: micro = a t v + b (eps^2 x v^3 + eps t (v^4 - m4) + t x v^3), macro = a x + b t m4."""
    t, x = t[:, None], x[:, None]
    micro = a * t * v + b * (e * e * x * v ** 3 + e * t * (v ** 4 - m4) + t * x * v ** 3)
    macro = a * x[:, 0] + b * t[:, 0] * m4
    return micro, macro


TRANSPORT_EPS = [1.0, 0.5, 0.2]
TRANSPORT_WEIGHTS = {"micro": 2.0, "macro": 5.0, "bc": 3.0, "ic": 7.0}  # distinct, so a mix-up shows


def transport_form(v, w, weights=TRANSPORT_WEIGHTS, only: str | None = None):
    """The formulation on the rule (v, w); ``only``: the terms of that group alone (the other
    weights 0), so that the task gradients are that group's."""
    if only is not None:
        keep = {"interior": ("micro", "macro"), "boundary": ("bc",), "initial": ("ic",)}[only]
        weights = {k: (val if k in keep else 0.0) for k, val in weights.items()}
    form = TransportFormulation(points={"interior": 6, "boundary": 4, "initial": 5}, nv=len(v), weights=weights)
    form.v, form.w = v, w
    return form


@pytest.mark.parametrize("deriv", ["fast", "jvp"])
@pytest.mark.parametrize("nv", [8, 30])
def test_transport_exact_micro_macro_solution_has_zero_interior_loss(nv, deriv):
    v, w = gauss_rule(nv, -1.0, 1.0)
    form = transport_form(v, w, only="interior")
    model = TransportFields()
    _, seg, jac, eager = losses_both_paths(model, form, TRANSPORT_EPS, deriv=deriv)
    assert_losses(seg["interior"], torch.zeros(3), atol=1e-26)
    assert_losses(eager["interior"], torch.zeros(3), atol=1e-26)
    # at a zero of a sum of squares every gradient vanishes (boundary, initial weighted 0)
    for J in jac:
        assert J.abs().max() < 1e-12


@pytest.mark.parametrize("deriv", ["fast", "jvp"])
def test_transport_interior_loss_and_gradient_equal_the_closed_form(deriv):
    v, w = gauss_rule(8, -1.0, 1.0)  # exact for degree 15: <v^2> = 1/3, <v^4> = 1/5
    form = transport_form(v, w, only="interior")
    a, b = 0.3, -0.8
    model = TransportFields(a=a, b=b)
    batch, seg, jac, eager = losses_both_paths(model, form, TRANSPORT_EPS, deriv=deriv)
    want, dA, dB = [], [], []
    for k, e in enumerate(TRANSPORT_EPS):
        t, x = batch["interior"]["t"][k], batch["interior"]["x"][k]
        micro, macro = transport_interior_by_hand(t, x, v, e, a, b, 0.2)
        want.append(2.0 * (micro ** 2).mean() + 5.0 * (macro ** 2).mean())
        # the residuals are linear in (a, b): dL/da = 2 sum_terms W mean(r dr/da)
        ma, Ma = transport_interior_by_hand(t, x, v, e, 1.0, 0.0, 0.2)
        mb, Mb = transport_interior_by_hand(t, x, v, e, 0.0, 1.0, 0.2)
        dA.append(2 * (2.0 * (micro * ma).mean() + 5.0 * (macro * Ma).mean()))
        dB.append(2 * (2.0 * (micro * mb).mean() + 5.0 * (macro * Mb).mean()))
    want = torch.stack(want)
    assert want.min() > 1e-3
    assert_losses(seg["interior"], want)
    assert_losses(eager["interior"], want)
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(jac[names.index("a")], torch.stack(dA), rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(jac[names.index("b")], torch.stack(dB), rtol=1e-11, atol=1e-14)


def test_transport_interior_loss_on_an_asymmetric_rule_equals_the_spec_formula():
    # <v> != 0: the exact solution above is not one of this rule, and the odd moments enter
    v, w = skewed_rule(3, 5, -1.0, 1.0, 0.4)
    assert abs(float((w * v).sum())) > 0.1
    form = transport_form(v, w)
    c, D, a, b, m2 = 0.7, 0.4, 0.3, -0.8, 1.0 / 3.0
    model = TransportFields(c, D, a, b, m2)
    batch, seg, _, eager = losses_both_paths(model, form, TRANSPORT_EPS)
    want = []
    for k, e in enumerate(TRANSPORT_EPS):
        t, x = batch["interior"]["t"][k][:, None], batch["interior"]["x"][k][:, None]
        E = torch.exp(-t / e ** 2)
        # derivatives of g_raw and rho by hand
        G = -2 * c * x * v + 2 * c * e * (v * v - m2) + D * v * E + torch.sin(3 * x + t) + b * t * x * v ** 3
        G_t = -D * v * E / e ** 2 + torch.cos(3 * x + t) + b * x * v ** 3
        G_x = -2 * c * v + 3 * torch.cos(3 * x + t) + b * t * v ** 3
        rho_t, rho_x = (2 * c * m2 + a * x)[:, 0], (2 * c * x + a * t)[:, 0]
        micro, macro = spec_transport_residuals(G, G_t, G_x, rho_t, rho_x, v, w, e)
        want.append(2.0 * (micro ** 2).mean() + 5.0 * (macro ** 2).mean())
    want = torch.stack(want)
    assert_losses(seg["interior"], want)
    assert_losses(eager["interior"], want)


class WallFields(nn.Module):
    """f = rho + eps (g_raw - <g_raw>) equal to a chosen F(x, v) at the walls x = 0 and 1:
    rho = <F(x, .)>, g_raw = F / eps. On the incoming half (x = 0, v > 0; x = 1, v < 0) F is
    the inflow data plus ``d_left`` / ``d_right``; on the outgoing half it is far from it."""

    METHODS = ("rho", "g_raw")

    def __init__(self, v, w, d_left=0.0, d_right=0.0):
        super().__init__()
        self.nodes, self.weights = v, w
        self.d_left, self.d_right = _param(d_left), _param(d_right)

    def forward(self, method, *args):
        return getattr(self, method)(*args)

    def F(self, x, v):
        left = torch.where(v > 0, 1.0 + self.d_left, 0.3 + v * v)
        right = torch.where(v < 0, 0.0 + self.d_right, 0.7 - v)
        return (1 - x) * left + x * right

    def rho(self, t, x, eps):
        return (self.F(x[:, None], self.nodes) * self.weights).sum(-1) / self.weights.sum() + _on(t, x)

    def g_raw(self, t, x, v, eps):
        if t.dim() == 1:
            t, x = t[:, None], x[:, None]
        return self.F(x, v) / eps + _on(t, x)


@pytest.mark.parametrize("rule", ["symmetric", "asymmetric"])
def test_transport_inflow_loss_sees_only_the_incoming_half(rule):
    v, w = gauss_rule(8, -1.0, 1.0) if rule == "symmetric" else skewed_rule(3, 5, -1.0, 1.0, 0.4)
    n_pos, n_neg = int((v > 0).sum()), int((v < 0).sum())
    form = transport_form(v, w, only="boundary")
    # outgoing half far from the data, incoming half exact: zero loss
    _, seg, _, eager = losses_both_paths(WallFields(v, w), form, TRANSPORT_EPS)
    assert_losses(seg["boundary"], torch.zeros(3), atol=1e-28)
    assert_losses(eager["boundary"], torch.zeros(3), atol=1e-28)
    # incoming half off by d_left (x = 0) and d_right (x = 1): the boundary points alternate
    # between the walls, so the mean over incoming (point, node) pairs is
    # (n_pos d_left^2 + n_neg d_right^2) / (n_pos + n_neg), times the bc weight 3
    dl, dr = 0.2, -0.5
    model = WallFields(v, w, dl, dr)
    _, seg, jac, eager = losses_both_paths(model, form, TRANSPORT_EPS)
    den = n_pos + n_neg
    want = torch.full((3,), 3.0 * (n_pos * dl ** 2 + n_neg * dr ** 2) / den, dtype=f64)
    assert_losses(seg["boundary"], want)
    assert_losses(eager["boundary"], want)
    # the task gradients: d/d(d_left) = 2 * 3 n_pos d_left / den
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(jac[names.index("d_left")], torch.full((3,), 6.0 * n_pos * dl / den, dtype=f64),
                               rtol=1e-11, atol=0)
    torch.testing.assert_close(jac[names.index("d_right")], torch.full((3,), 6.0 * n_neg * dr / den, dtype=f64),
                               rtol=1e-11, atol=0)


class SplitFields(TransportFields):
    """:class:`TransportFields` as the collided part of a first-collision split, with a
    closed-form stand-in for the uncollided density, ``S = 0.2 + 0.3 t x + 0.1 x^2`` for the
    tasks with eps >= 0.4 and 0 below (the model's contract); the loss takes it as given."""

    METHODS = ("rho", "g_raw", "uncollided_density")

    def uncollided_density(self, t, x, eps):
        return torch.where(eps >= 0.4, 0.2 + 0.3 * t * x + 0.1 * x * x, torch.zeros_like(t))


@pytest.mark.parametrize("deriv", ["fast", "jvp"])
def test_transport_first_collision_source_enters_the_macro_residual_only(deriv):
    # rho_t + <v g_x> = <f_u> / eps^2 for the collided part: the macro residual by hand minus
    # S / eps^2, the micro residual unchanged; the task below the threshold (0.2) as before
    v, w = gauss_rule(8, -1.0, 1.0)
    form = transport_form(v, w, only="interior")
    form.first_collision = 0.4
    a, b = 0.3, -0.8
    model = SplitFields(a=a, b=b)
    batch, seg, jac, eager = losses_both_paths(model, form, TRANSPORT_EPS, deriv=deriv)
    want, dA = [], []
    for k, e in enumerate(TRANSPORT_EPS):
        t, x = batch["interior"]["t"][k], batch["interior"]["x"][k]
        micro, macro = transport_interior_by_hand(t, x, v, e, a, b, 0.2)
        if e >= 0.4:
            macro = macro - (0.2 + 0.3 * t * x + 0.1 * x * x) / e ** 2
        want.append(2.0 * (micro ** 2).mean() + 5.0 * (macro ** 2).mean())
        ma, Ma = transport_interior_by_hand(t, x, v, e, 1.0, 0.0, 0.2)
        dA.append(2 * (2.0 * (micro * ma).mean() + 5.0 * (macro * Ma).mean()))
    want = torch.stack(want)
    assert_losses(seg["interior"], want)
    assert_losses(eager["interior"], want)
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(jac[names.index("a")], torch.stack(dA), rtol=1e-11, atol=1e-14)
    # the exact micro-macro solution is not one of the split tasks' system (the source is
    # not balanced), but it still is of the task below the threshold
    _, seg, _, _ = losses_both_paths(SplitFields(), form, TRANSPORT_EPS, deriv=deriv)
    assert float(seg["interior"][2]) < 1e-26 and float(seg["interior"][:2].min()) > 1e-3


def test_transport_first_collision_moves_the_inflow_to_the_uncollided_flux():
    # with the split the collided part's inflow at x = 0 is 0 (f_u carries the 1); x = 1 and
    # the task below the threshold unchanged
    v, w = gauss_rule(8, -1.0, 1.0)
    n_pos, n_neg = int((v > 0).sum()), int((v < 0).sum())
    form = transport_form(v, w, only="boundary")
    form.first_collision = 0.4
    dl, dr = 0.2, -0.5

    class SplitWallFields(WallFields):
        METHODS = ("rho", "g_raw", "uncollided_density")

        def uncollided_density(self, t, x, eps):  # read by the interior group only
            return torch.zeros_like(t)

    _, seg, _, eager = losses_both_paths(SplitWallFields(v, w, dl, dr), form, TRANSPORT_EPS)
    den = n_pos + n_neg
    want = torch.tensor([3.0 * (n_pos * (1 + dl) ** 2 + n_neg * dr ** 2) / den] * 2
                        + [3.0 * (n_pos * dl ** 2 + n_neg * dr ** 2) / den], dtype=f64)
    assert_losses(seg["boundary"], want)
    assert_losses(eager["boundary"], want)


class InitialFields(nn.Module):
    """rho = a0 + a1 x, g_raw = beta v + sin(x): f(0, x, v) = a0 + a1 x + eps beta (v - <v>)."""

    METHODS = ("rho", "g_raw")

    def __init__(self, a0=0.4, a1=-0.3, beta=1.5):
        super().__init__()
        self.a0, self.a1, self.beta = _param(a0), _param(a1), _param(beta)

    def forward(self, method, *args):
        return getattr(self, method)(*args)

    def rho(self, t, x, eps):
        return self.a0 + self.a1 * x + _on(t, x)

    def g_raw(self, t, x, v, eps):
        if t.dim() == 1:
            t, x = t[:, None], x[:, None]
        return self.beta * v + torch.sin(x) + _on(t, x)


@pytest.mark.parametrize("rule", ["symmetric", "asymmetric"])
def test_transport_initial_loss_on_a_hand_built_field(rule):
    v, w = gauss_rule(8, -1.0, 1.0) if rule == "symmetric" else skewed_rule(3, 5, -1.0, 1.0, 0.4)
    form = transport_form(v, w, only="initial")
    vbar = float((w * v).sum() / w.sum())
    a0, a1, beta = 0.4, -0.3, 1.5
    model = InitialFields(a0, a1, beta)
    batch, seg, jac, eager = losses_both_paths(model, form, TRANSPORT_EPS)
    want, d_beta = [], []
    for k, e in enumerate(TRANSPORT_EPS):
        x = batch["initial"]["x"][k][:, None]
        f = a0 + a1 * x + e * beta * (v - vbar)
        want.append(7.0 * (f ** 2).mean())
        d_beta.append(7.0 * (2 * f * e * (v - vbar)).mean())
    assert_losses(seg["initial"], torch.stack(want))
    assert_losses(eager["initial"], torch.stack(want))
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(jac[names.index("beta")], torch.stack(d_beta), rtol=1e-11, atol=0)


# ============================================================================================
# BGK: kn (f_t + v f_x) = M[rho, u, T] - f, with conservation and consistency residuals
# ============================================================================================


class RelaxationFields(nn.Module):
    """The exact solution ``F = M + (F0 - M) exp(-t/kn)`` for a constant state: ``F0 - M =
    M r(v)``, r a combination of bounded functions of ``c = (v - u) / sqrt(T)`` orthogonal to
    1, v, v^2 in the rule's weights ``w M`` (so F0 has the moments of M and the consistency
    residuals vanish), with ``|r| < 1`` (F > 0)."""

    METHODS = ("f", "f_dev", "macro")

    def __init__(self, v, w, state=(1.2, 0.3, 0.8)):
        super().__init__()
        self.state = state
        self.scale = _param(1.0)  # a parameter for the segmented path; the solution is exact at 1
        M = maxwellian(*(torch.tensor(q, dtype=f64) for q in state), v)
        phi = self.basis(v)  # r = phi_0 - sum_k a_k phi_k with sum_j w M r v^p = 0, p = 0, 1, 2
        moments = torch.stack([(w * M * v ** p)[:, None] * phi for p in range(3)]).sum(1)  # [3, 4]
        self.a = torch.linalg.solve(moments[:, 1:], moments[:, 0])

    def basis(self, v):
        c = (v - self.state[1]) / math.sqrt(self.state[2])
        return torch.stack([0.3 * torch.sin(2 * c), torch.cos(c / 2), torch.sin(c / 2), torch.cos(c)], -1)

    def forward(self, method, *args):
        return getattr(self, method)(*args)

    def r(self, v):
        phi = self.basis(v)
        return phi[..., 0] - (phi[..., 1:] * self.a).sum(-1)

    def macro(self, t, x, eps):
        return tuple(self.scale * q + _on(t, x) for q in self.state)

    def f_dev(self, t, x, v, eps):
        if t.dim() == 1:
            t, x = t[:, None], x[:, None]
        return torch.log1p(self.r(v) * torch.exp(-t / eps)) + _on(t, x)

    def f(self, t, x, v, eps):
        rho, u, T = self.macro(t, x, eps)
        rho, u, T = (q if q.dim() == 2 else q[:, None] for q in (rho, u, T))
        return maxwellian(rho, u, T, v) * torch.exp(self.f_dev(t, x, v, eps))


BGK_KN = [1.0, 0.1, 1e-3]
BGK_WEIGHTS = {"kinetic": 2.0, "cons_rho": 3.0, "cons_mom": 5.0, "cons_energy": 7.0, "consist_rho": 11.0,
               "consist_mom": 13.0, "consist_energy": 17.0, "ic_rho": 19.0, "ic_u": 23.0, "ic_T": 29.0, "ic_f": 31.0}
BGK_RULES = {"symmetric": lambda: gauss_rule(64, -10.0, 10.0), "asymmetric": lambda: skewed_rule(40, 56, -10.0, 10.0, 0.0)}


def bgk_form(v, w, f_form, weights=BGK_WEIGHTS):
    form = BGKFormulation(case="IV", points={"interior": 5, "initial": 6}, nv=len(v), weights=weights)
    form.v, form.w = v, w
    form.f_form = f_form  # what build_model records for its model
    return form


@pytest.mark.parametrize("f_form", ["free", "maxwellian"])
@pytest.mark.parametrize("rule", ["symmetric", "asymmetric"])
def test_bgk_relaxation_to_the_maxwellian_has_zero_interior_loss(rule, f_form):
    v, w = BGK_RULES[rule]()
    model = RelaxationFields(v, w)
    # F0 > 0, and the relaxing part is visible: F0 differs from M by O(0.1) of M
    M = maxwellian(*(torch.tensor(q, dtype=f64) for q in model.state), v)
    assert model.r(v).abs().max() < 1 and (model.r(v).abs() * M).max() > 1e-2
    _, seg, jac, eager = losses_both_paths(model, bgk_form(v, w, f_form), BGK_KN)
    assert_losses(seg["interior"], torch.zeros(3), atol=1e-22)
    assert_losses(eager["interior"], torch.zeros(3), atol=1e-22)


class LocalMaxwellianFields(nn.Module):
    """rho, u, T linear in t and x and ``f = (1 + kappa) M[rho, u, T]``: every BGK residual in
    closed form (see :func:`bgk_interior_by_hand`)."""

    METHODS = ("f", "f_dev", "macro")
    Q0 = (1.1, 0.2, 0.9)         # values at t = x = 0
    Q_T = (0.4, -0.7, 0.3)       # d/dt
    Q_X = (-0.5, 0.6, -0.4)      # d/dx

    def __init__(self, kappa=0.1):
        super().__init__()
        self.kappa = _param(kappa)

    def forward(self, method, *args):
        return getattr(self, method)(*args)

    def macro(self, t, x, eps):
        return tuple(q + qt * t + qx * x for q, qt, qx in zip(self.Q0, self.Q_T, self.Q_X))

    def f_dev(self, t, x, v, eps):
        if t.dim() == 1:
            t, x = t[:, None], x[:, None]
        return torch.log1p(self.kappa) + _on(t, x) + 0 * v

    def f(self, t, x, v, eps):
        rho, u, T = self.macro(t, x, eps)
        rho, u, T = (q if q.dim() == 2 else q[:, None] for q in (rho, u, T))
        return (1 + self.kappa) * maxwellian(rho, u, T, v)


def bgk_interior_by_hand(t, x, v, kn, kappa, W):
    """Loss of :class:`LocalMaxwellianFields` (continuous Maxwellian moments)."""
    (r0, u0, T0), (rt, ut, Tt), (rx, ux, Tx) = LocalMaxwellianFields.Q0, LocalMaxwellianFields.Q_T, LocalMaxwellianFields.Q_X
    rho, u, T = r0 + rt * t + rx * x, u0 + ut * t + ux * x, T0 + Tt * t + Tx * x
    M = maxwellian(rho[:, None], u[:, None], T[:, None], v)
    c = v - u[:, None]

    def dlogM(dr, du, dT):
        return dr / rho[:, None] + c * du / T[:, None] + (c * c / T[:, None] - 1) * dT / (2 * T[:, None])

    M_t, M_x = M * dlogM(rt, ut, Tt), M * dlogM(rx, ux, Tx)
    s = 1 + kappa
    kinetic = kn * s * (M_t + v * M_x) + kappa * M
    # moments of M: <1, v, v^2, v^3> = rho (1, u, u^2 + T, u^3 + 3 u T)
    flux_x = [rx * u + rho * ux,
              rx * (u * u + T) + rho * (2 * u * ux + Tx),
              rx * (u ** 3 + 3 * u * T) + rho * (3 * u * u * ux + 3 * ux * T + 3 * u * Tx)]
    cons = [rt + s * flux_x[0],
            rt * u + rho * ut + s * flux_x[1],
            0.5 * rt * (u * u + T) + 0.5 * rho * (2 * u * ut + Tt) + 0.5 * s * flux_x[2]]
    consist = [-kappa * rho, -kappa * rho * u, -kappa * 0.5 * rho * (u * u + T)]
    L = W["kinetic"] * (kinetic ** 2).mean()
    for name, c_, s_ in zip(("rho", "mom", "energy"), cons, consist):
        L = L + W["cons_" + name] * (c_ ** 2).mean() + W["consist_" + name] * (s_ ** 2).mean()
    return L


@pytest.mark.parametrize("f_form", ["free", "maxwellian"])
@pytest.mark.parametrize("rule", ["symmetric", "asymmetric"])
def test_bgk_interior_loss_and_gradient_equal_the_closed_form(rule, f_form):
    v, w = BGK_RULES[rule]()
    kappa = 0.1
    model = LocalMaxwellianFields(kappa)
    form = bgk_form(v, w, f_form, {**BGK_WEIGHTS, **{k: 0.0 for k in BGK_WEIGHTS if k.startswith("ic")}})
    batch, seg, jac, eager = losses_both_paths(model, form, BGK_KN)
    want, grad = [], []
    for k, kn in enumerate(BGK_KN):
        t, x = batch["interior"]["t"][k], batch["interior"]["x"][k]
        want.append(bgk_interior_by_hand(t, x, v, kn, kappa, BGK_WEIGHTS))
        h = 1e-6  # the loss is a quadratic in kappa: a central difference is exact up to rounding
        grad.append((bgk_interior_by_hand(t, x, v, kn, kappa + h, BGK_WEIGHTS)
                     - bgk_interior_by_hand(t, x, v, kn, kappa - h, BGK_WEIGHTS)) / (2 * h))
    want = torch.stack(want)
    assert_losses(seg["interior"], want, rtol=1e-9)
    assert_losses(eager["interior"], want, rtol=1e-9)
    torch.testing.assert_close(jac[0], torch.stack(grad), rtol=1e-7, atol=0)


def case_iv_state(x):
    """Spec case IV: q0 = q_L + (q_R - q_L) s(x), left (1.5, 0, 1.5), right (0.625, 0, 0.75)."""
    s = case_iv_profile(x)
    return 1.5 + (0.625 - 1.5) * s, 0.0 * s, 1.5 + (0.75 - 1.5) * s


class InitialBGKFields(nn.Module):
    """At t = 0: (rho, u, T) = case IV data + (d_rho, d_u, d_T), f = (1 + kappa) M0."""

    METHODS = ("f", "macro")

    def __init__(self, d_rho=0.05, d_u=-0.2, d_T=0.1, kappa=0.3):
        super().__init__()
        self.d_rho, self.d_u, self.d_T, self.kappa = _param(d_rho), _param(d_u), _param(d_T), _param(kappa)

    def forward(self, method, *args):
        return getattr(self, method)(*args)

    def macro(self, t, x, eps):
        return tuple(q + d + _on(t, x) for q, d in zip(case_iv_state(x), (self.d_rho, self.d_u, self.d_T)))

    def f(self, t, x, v, eps):
        if t.dim() == 1:
            t, x = t[:, None], x[:, None]
        return (1 + self.kappa) * maxwellian(*case_iv_state(x), v) + _on(t, x)


@pytest.mark.parametrize("rule", ["symmetric", "asymmetric"])
def test_bgk_initial_losses_on_hand_built_fields(rule):
    v, w = BGK_RULES[rule]()
    model = InitialBGKFields()
    interior_off = {k: 0.0 for k in BGK_WEIGHTS if not k.startswith("ic")}  # task gradients = the IC's
    # distinct weights, and the spec's: 10 (rho), 1 (u), 10 (T), 10 (f)
    for weights, (wr, wu, wT, wf) in ((BGK_WEIGHTS, (19.0, 23.0, 29.0, 31.0)), ({}, (10.0, 1.0, 10.0, 10.0))):
        form = bgk_form(v, w, "free", {**weights, **interior_off})
        batch, seg, jac, eager = losses_both_paths(model, form, BGK_KN)
        want, d_kappa = [], []
        for k in range(len(BGK_KN)):
            x = batch["initial"]["x"][k]
            M0 = maxwellian(*(q[:, None] for q in case_iv_state(x)), v)
            want.append(wr * 0.05 ** 2 + wu * 0.2 ** 2 + wT * 0.1 ** 2 + wf * 0.3 ** 2 * (M0 ** 2).mean())
            d_kappa.append(wf * 2 * 0.3 * (M0 ** 2).mean())
        assert_losses(seg["initial"], torch.stack(want))
        assert_losses(eager["initial"], torch.stack(want))
        # gradients: 2 W delta for the three macro offsets, and for kappa
        names = [n for n, _ in model.named_parameters()]
        for name, W_, d in (("d_rho", wr, 0.05), ("d_u", wu, -0.2), ("d_T", wT, 0.1)):
            torch.testing.assert_close(jac[names.index(name)], torch.full((3,), 2 * W_ * d, dtype=f64), rtol=1e-12, atol=0)
        torch.testing.assert_close(jac[names.index("kappa")], torch.stack(d_kappa), rtol=1e-12, atol=0)


class WallBGKFields(nn.Module):
    """At the walls: f = M[wall state] (1 + k_in [v incoming] + k_out [v outgoing]); rho, u, T the
    wall states (the spec's built-in Dirichlet values)."""

    METHODS = ("f", "macro")

    def __init__(self, k_in=0.3, k_out=-0.7):
        super().__init__()
        self.k_in, self.k_out = _param(k_in), _param(k_out)

    def forward(self, method, *args):
        return getattr(self, method)(*args)

    @staticmethod
    def wall_state(x):
        left = x < 0
        return tuple(torch.where(left, torch.tensor(a, dtype=f64), torch.tensor(b, dtype=f64))
                     for a, b in zip((1.5, 0.0, 1.5), (0.625, 0.0, 0.75)))

    def macro(self, t, x, eps):
        return tuple(q + _on(t, x) for q in self.wall_state(x))

    def f(self, t, x, v, eps):
        if t.dim() == 1:
            t, x = t[:, None], x[:, None]
        incoming = torch.where(x < 0, v > 0, v < 0).to(f64)
        M = maxwellian(*self.wall_state(x), v)
        return M * (1 + self.k_in * incoming + self.k_out * (1 - incoming)) + _on(t, x)


@pytest.mark.parametrize("rule", ["symmetric", "asymmetric"])
def test_bgk_inflow_loss_sees_only_the_incoming_half_at_each_wall(rule):
    v, w = BGK_RULES[rule]()
    weights = {**{k: 0.0 for k in BGK_WEIGHTS}, "bc_f": 3.0}
    assert BGKFormulation.point_groups(weights) == ("interior", "initial", "boundary")
    assert BGKFormulation.point_groups(BGK_WEIGHTS) == ("interior", "initial")  # off by default: the spec's loss
    form = BGKFormulation(case="IV", points={"interior": 5, "initial": 6, "boundary": 4}, nv=len(v), weights=weights)
    form.v, form.w = v, w
    form.f_form = "free"
    model = WallBGKFields(k_in=0.0)
    # the outgoing half far from the reservoir's Maxwellian, the incoming half exact: zero loss
    batch, seg, _, eager = losses_both_paths(model, form, BGK_KN)
    assert sorted(batch["boundary"]["x"].unique().tolist()) == [-0.5, 0.5]
    assert_losses(seg["boundary"], torch.zeros(3), atol=1e-28)
    assert_losses(eager["boundary"], torch.zeros(3), atol=1e-28)
    # incoming half off by k_in M: the points alternate between the walls (2 each), so the mean
    # over incoming (point, node) pairs is k^2 (sum_{v>0} M_L^2 + sum_{v<0} M_R^2) / (n_pos + n_neg)
    k = 0.3
    model = WallBGKFields(k_in=k)
    _, seg, jac, eager = losses_both_paths(model, form, BGK_KN)
    ML = maxwellian(torch.tensor(1.5, dtype=f64), torch.tensor(0.0, dtype=f64), torch.tensor(1.5, dtype=f64), v)
    MR = maxwellian(torch.tensor(0.625, dtype=f64), torch.tensor(0.0, dtype=f64), torch.tensor(0.75, dtype=f64), v)
    s2 = float((ML[v > 0] ** 2).sum() + (MR[v < 0] ** 2).sum())
    den = int((v > 0).sum() + (v < 0).sum())
    assert_losses(seg["boundary"], torch.full((3,), 3.0 * k * k * s2 / den, dtype=f64))
    assert_losses(eager["boundary"], torch.full((3,), 3.0 * k * k * s2 / den, dtype=f64))
    names = [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(jac[names.index("k_in")], torch.full((3,), 6.0 * k * s2 / den, dtype=f64),
                               rtol=1e-11, atol=0)
    torch.testing.assert_close(jac[names.index("k_out")], torch.zeros(3, dtype=f64), rtol=0, atol=1e-30)


def test_causal_weighting_of_the_interior_loss_by_hand():
    # 2 tasks with windows 1 and 0.1, 4 bins; rows placed so that task 0 has bins 0, 1, 3
    # filled (bin 2 empty) and task 1 every bin
    form = TransportFormulation(t_final={"1": 1.0, "0.1": 0.1}, eps=[1.0, 0.1],
                                points={"interior": 4, "boundary": 2, "initial": 2}, causal=(4, 2.0))
    eps = torch.tensor([1.0, 0.1], dtype=f64)
    t = torch.tensor([[0.1, 0.3, 0.9, 0.2], [0.01, 0.03, 0.06, 0.09]], dtype=f64)
    rows = torch.tensor([[1.0, 2.0, 3.0, 5.0], [0.5, 0.25, 4.0, 1.0]], dtype=f64, requires_grad=True)
    got = form.interior_mean(rows.reshape(-1), {"t": t.reshape(-1), "eps": eps}, 2)
    # task 0: bin means L = [mean(1, 5), 2, 0 (empty), 3] -> weights exp(-2 * [0, 3, 5, 5])
    w0 = {0: 1.0, 1: math.exp(-6.0), 3: math.exp(-10.0)}
    want0 = (w0[0] * 1.0 + w0[1] * 2.0 + w0[3] * 3.0 + w0[0] * 5.0) / 4
    # task 1: one row per bin, L = [0.5, 0.25, 4, 1] -> weights exp(-2 * [0, 0.5, 0.75, 4.75])
    w1 = [math.exp(-2.0 * c) for c in (0.0, 0.5, 0.75, 4.75)]
    want1 = sum(a * b for a, b in zip(w1, (0.5, 0.25, 4.0, 1.0))) / 4
    torch.testing.assert_close(got, torch.tensor([want0, want1], dtype=f64), rtol=1e-14, atol=0)
    # the weights are not differentiated: d loss_k / d row = weight / n
    got.sum().backward()
    torch.testing.assert_close(rows.grad, torch.tensor([[w0[0] / 4, w0[1] / 4, w0[3] / 4, w0[0] / 4],
                                                        [w / 4 for w in w1]], dtype=f64), rtol=1e-14, atol=0)
    # off: the plain mean
    form.causal = None
    torch.testing.assert_close(form.interior_mean(rows.reshape(-1), {"t": t, "eps": eps}, 2), rows.mean(1))


@pytest.mark.parametrize("knee", [0.0, 0.1])
def test_bgk_compression_weights_by_hand(knee):
    # f the Maxwellian of rho = 1, T = 1 and a velocity u; f_x = d_u M u_x', so that the moments
    # give u and u_x = u_x' (rho_x = 0): the weight is 1 / (k_Kn (|u_x| - u_x) + 1), 1 where the
    # flow expands, and the interior loss is the mean of the weighted rows, the weights taken
    # without a gradient
    v, w = gauss_rule(48, -10.0, 10.0)
    k = 2.0
    form = BGKFormulation(eps=[1.0, 1e-3], points={"interior": 3, "initial": 2}, compression=(k, knee))
    form.v, form.w = v, w
    u = torch.tensor([0.3, -0.2, 0.1, 0.4, 0.0, -0.1], dtype=f64)
    u_x = torch.tensor([-5.0, 2.0, 0.0, -0.5, -12.0, 3.0], dtype=f64)
    kn = torch.tensor([1.0, 1e-3], dtype=f64)
    M = maxwellian(torch.ones(6, 1, dtype=f64), u[:, None], torch.ones(6, 1, dtype=f64), v)
    out = {"F": M.clone().requires_grad_(True), "Fx": (M * (v - u[:, None]) * u_x[:, None]).requires_grad_(True),
           "Ft": torch.zeros_like(M), "rho": torch.ones(6, dtype=f64), "u": u, "T": torch.ones(6, dtype=f64),
           "rho_t": torch.zeros(6, dtype=f64), "u_t": torch.zeros(6, dtype=f64), "T_t": torch.zeros(6, dtype=f64)}
    inp = {"t": torch.full((6,), 0.05, dtype=f64), "x": torch.zeros(6, dtype=f64), "eps": kn}
    lam = form.compression_weights(out, inp, 2)
    k_kn = torch.full((2,), k, dtype=f64) if knee == 0 else k * knee / (kn + knee)
    want = 1.0 / (k_kn.repeat_interleave(3) * (u_x.abs() - u_x) + 1.0)
    torch.testing.assert_close(lam, want, rtol=1e-10, atol=0)
    assert not lam.requires_grad and bool((lam[u_x >= 0] == 1).all()) and bool((lam[u_x < 0] < 1).all())
    # the loss: the weighted rows' mean per task, and its gradient that of the rows alone
    loss = form.loss("interior", out, inp, 2)
    form.compression = None
    rows = form.interior_rows(out, inp, 2)
    torch.testing.assert_close(loss, (want * rows).reshape(2, 3).mean(1), rtol=1e-12, atol=0)
    gF, gFx = torch.autograd.grad(loss.sum(), (out["F"], out["Fx"]))
    hF, hFx = torch.autograd.grad((want * rows).sum() / 3, (out["F"], out["Fx"]))
    torch.testing.assert_close(gF, hF, rtol=1e-12, atol=1e-30)
    torch.testing.assert_close(gFx, hFx, rtol=1e-12, atol=1e-30)
    with pytest.raises(ValueError, match="compression"):
        BGKFormulation(eps=[1.0], points={"interior": 3, "initial": 2}, compression=(0.0, 0.1))


@pytest.mark.parametrize("causal", [None, (2, 1.0)])
def test_bgk_kinetic_knee_weights_the_kinetic_residual_by_kn(causal):
    # kinetic_knee = c: the squared kinetic residual of a point at Kn weighted ((1 + c) / (Kn + c))^2,
    # the conservation and consistency terms untouched, on both loss paths (plain and through
    # the interior rows that causal weighting takes). Fields chosen so that every term is
    # nonzero; the reference is the residual computed here from its definition
    v, w = gauss_rule(32, -10.0, 10.0)
    kn = torch.tensor([1.0, 0.1, 1e-3], dtype=f64)
    weights = {"cons_rho": 0.5, "consist_mom": 2.0}
    forms = [BGKFormulation(eps=kn.tolist(), points={"interior": 2, "initial": 2}, weights=weights, causal=causal,
                            kinetic_knee=c) for c in (0.0, 0.1)]
    for form in forms:
        form.v, form.w = v, w
    n = 6
    g = torch.Generator().manual_seed(3)
    rho, T = 1.0 + 0.2 * torch.rand(n, generator=g, dtype=f64), 1.0 + 0.3 * torch.rand(n, generator=g, dtype=f64)
    u = 0.4 * torch.rand(n, generator=g, dtype=f64) - 0.2
    F = maxwellian(rho[:, None], u[:, None], T[:, None], v) * (1 + 0.05 * torch.sin(v))
    Ft, Fx = 0.3 * F * torch.cos(v), -0.2 * F * v / 10
    out = {"F": F.requires_grad_(True), "Ft": Ft, "Fx": Fx, "rho": rho, "u": u, "T": T,
           "rho_t": torch.full((n,), 0.1, dtype=f64), "u_t": torch.full((n,), -0.3, dtype=f64),
           "T_t": torch.full((n,), 0.2, dtype=f64)}
    inp = {"t": torch.tensor([0.01, 0.09] * 3, dtype=f64), "x": torch.zeros(n, dtype=f64), "eps": kn}
    kn_rows = kn.repeat_interleave(2)
    kin = (kn_rows[:, None] * (Ft + v * Fx) - (maxwellian(rho[:, None], u[:, None], T[:, None], v) - F)).pow(2).sum(1)
    factor = ((1.0 + 0.1) / (kn_rows + 0.1)) ** 2
    torch.testing.assert_close(forms[1].kinetic_weights(kn_rows), factor, rtol=1e-15, atol=0)
    torch.testing.assert_close(forms[0].kinetic_weights(kn_rows), torch.ones_like(kn_rows))
    assert float(factor[0]) == 1.0 and float(factor[-1]) > 100  # 1 at Kn = 1, ~(1.1 / 0.101)^2 at 1e-3
    rows0, rows1 = (f.interior_rows(out, inp, 3) for f in forms)
    torch.testing.assert_close(rows1 - rows0, (factor - 1.0) * kin / v.shape[0], rtol=1e-10, atol=1e-15)
    assert float((rows0 - kin / v.shape[0]).detach().abs().min()) > 0  # the other terms are in the rows too
    L0, L1 = (f.loss("interior", out, inp, 3) for f in forms)
    if causal is None:
        torch.testing.assert_close(L1 - L0, ((factor - 1.0) * kin).reshape(3, 2).mean(1) / v.shape[0], rtol=1e-10,
                                   atol=1e-15)
    else:  # the causal loss weighs the weighted rows (its bin weights see the kinetic weights too)
        torch.testing.assert_close(L1, forms[0].interior_mean(rows0 + (factor - 1.0) * kin / v.shape[0], inp, 3),
                                   rtol=1e-10, atol=1e-15)
    # its gradient: that of the weighted rows (the weights are constants in the fields)
    (gL,) = torch.autograd.grad(L1.sum(), out["F"])
    (g0,) = torch.autograd.grad(L0.sum(), out["F"])
    assert float((gL - g0).abs().max()) > 0
    with pytest.raises(ValueError, match="kinetic_knee"):
        BGKFormulation(eps=[1.0], points={"interior": 3, "initial": 2}, kinetic_knee=-0.1)


def test_bgk_cell_residuals_are_the_cell_means_of_the_conservation_laws():
    # polynomial fields, for which the 3-node edge quadrature is exact: the integral residual
    # of each cell equals the mean over the cell of d_t U + d_x G (U from the macro fields, G
    # the moments of f), computed here independently as an 8 x 8 Gauss mean of the analytic
    # derivatives (the divergence theorem checks the signs and the dx dt scaling)
    v, w = gauss_rule(24, -10.0, 10.0)
    form = BGKFormulation(eps=[1.0, 1e-3], t_final=[0.1, 0.05], weights={"weak": 2.0},
                          points={"interior": 3, "initial": 2, "cells": 5}, cell=(0.1, 0.5))
    form.v, form.w = v, w
    K, n, q = 2, 5, form.CELL_NODES
    eps = torch.tensor([1.0, 1e-3], dtype=f64)
    inp = form.sample("cells", torch.Generator().manual_seed(3), K, n, eps)
    t, x = inp["t"], inp["x"]
    assert t.shape == x.shape == (K, 4 * n * q)
    assert float(x.min()) >= -0.5 and float(x.max()) <= 0.5 and float(t.min()) >= 0
    assert float(t[0].max()) <= 0.1 and float(t[1].max()) <= 0.05  # each task's own window

    def macro(t, x):
        rho = 1 + 0.3 * x + 0.2 * t + 0.5 * x * t
        u = 0.1 + 0.2 * x - t
        T = 1 + 0.1 * t + 0.2 * x
        return rho, u, T

    def conserved(t, x):
        rho, u, T = macro(t, x)
        return torch.stack([rho, rho * u, 0.5 * rho * (u * u + T)], -1)

    base = maxwellian(torch.ones(1, 1, dtype=f64), torch.zeros(1, 1, dtype=f64), torch.ones(1, 1, dtype=f64), v)[0]
    base = base * (1 + 0.1 * v)
    amp = lambda t, x: 1 + x + 2 * t * t + t * x  # noqa: E731
    moments = torch.stack([(base * v * w).sum(), (base * v * v * w).sum(), 0.5 * (base * v ** 3 * w).sum()])
    flux = lambda t, x: amp(t, x).unsqueeze(-1) * moments  # noqa: E731

    tm, xm = t.reshape(K, n, 2, 2, q)[:, :, 0].reshape(-1), x.reshape(K, n, 2, 2, q)[:, :, 0].reshape(-1)
    tf, xf = t.reshape(K, n, 2, 2, q)[:, :, 1].reshape(-1), x.reshape(K, n, 2, 2, q)[:, :, 1].reshape(-1)
    rho, u, T = macro(tm, xm)
    F = (amp(tf, xf).unsqueeze(-1) * base).requires_grad_(True)
    rho = rho.clone().requires_grad_(True)
    out = {"rho": rho, "u": u, "T": T, "F": F}
    R = form.cell_residuals(out, {"t": t, "x": x, "eps": eps}, K)
    assert R.shape == (K, n, 3)

    s, gw = np.polynomial.legendre.leggauss(8)
    s, gw = torch.tensor((s + 1) / 2, dtype=f64), torch.tensor(gw / 2, dtype=f64)
    cells = t.reshape(K, n, 2, 2, q), x.reshape(K, n, 2, 2, q)
    want = torch.empty(K, n, 3, dtype=f64)
    for k in range(K):
        for c in range(n):
            ta, tb = cells[0][k, c, 0, 0, 0], cells[0][k, c, 0, 1, 0]
            xa, xb = cells[1][k, c, 1, 0, 0], cells[1][k, c, 1, 1, 0]
            tt = (ta + (tb - ta) * s).reshape(-1, 1).expand(8, 8).reshape(-1)
            xx = (xa + (xb - xa) * s).reshape(1, -1).expand(8, 8).reshape(-1)
            ww = (gw.reshape(-1, 1) * gw.reshape(1, -1)).reshape(-1)
            dU = torch.func.vmap(torch.func.jacfwd(conserved, argnums=0))(tt, xx)
            dG = torch.func.vmap(torch.func.jacfwd(flux, argnums=1))(tt, xx)
            want[k, c] = ((dU + dG) * ww.unsqueeze(-1)).sum(0)
    torch.testing.assert_close(R, want, rtol=1e-10, atol=1e-12)
    # each cell's points are contiguous, so the first three cells alone (a share of the points
    # that distributed.shards concatenates with others) are three cells of their own
    first = {k: val.reshape(K, n, 2 * q, *val.shape[1:])[:, :3].reshape(K * 3 * 2 * q, *val.shape[1:])
             for k, val in out.items()}
    share = {k: val[:, :3 * 4 * q] for k, val in (("t", t), ("x", x))}
    torch.testing.assert_close(form.cell_residuals(first, {**share, "eps": eps}, K), R[:, :3], rtol=1e-12, atol=0)
    assert float(want.abs().max()) > 0.1  # these fields are no solution: the residual is not small
    # the loss: the weight times the per-task mean of R^2, differentiable in both fields
    loss = form.loss("cells", out, {"t": t, "x": x, "eps": eps}, K)
    torch.testing.assert_close(loss, 2.0 * want.pow(2).reshape(K, -1).mean(1), rtol=1e-10, atol=0)
    gF, grho = torch.autograd.grad(loss.sum(), (F, rho))
    assert float(gF.abs().max()) > 0 and float(grho.abs().max()) > 0
    # a uniform state (any constant U and f) is a solution: zero residual in every cell
    const = {"rho": torch.full_like(tm, 1.3), "u": torch.full_like(tm, 0.2), "T": torch.full_like(tm, 0.8),
             "F": base.expand(tf.shape[0], -1)}
    assert float(form.cell_residuals(const, {"t": t, "x": x, "eps": eps}, K).abs().max()) < 1e-12
    assert "cells" in BGKFormulation.point_groups({"weak": 1.0}) and "cells" not in BGKFormulation.point_groups()
    for bad in ((0.0, 0.25), (1.0, 0.25), (0.05, 0.0), (0.05, 1.5)):
        with pytest.raises(ValueError, match="integral conservation residual"):
            BGKFormulation(eps=[1.0], points={"interior": 3, "initial": 2}, cell=bad)


def test_group_weights_scale_each_tasks_group_loss_and_its_gradients():
    # per-task factors on whole group losses: on the same batch, every path (segmented per
    # task and per task-group, eager per task) gives the unweighted group loss of task k times
    # its factor, and the task gradients follow: a factor 0 removes that group from that task
    v, w = gauss_rule(8, -1.0, 1.0)
    model = TransportFields(a=0.3, b=-0.8)
    factors = {"interior": [2.0, 0.5, 0.0], "initial": 3.0}
    forms = []
    for gw in (None, factors):
        form = TransportFormulation(points={"interior": 6, "boundary": 4, "initial": 5}, nv=8,
                                    weights=TRANSPORT_WEIGHTS, eps=TRANSPORT_EPS, group_weights=gw)
        form.v, form.w = v, w
        forms.append(form)
    plain, weighted = forms
    assert weighted.group_weights == {"interior": [2.0, 0.5, 0.0], "initial": [3.0, 3.0, 3.0]}
    F = {"interior": torch.tensor([2.0, 0.5, 0.0], dtype=f64), "boundary": torch.ones(3, dtype=f64),
         "initial": torch.full((3,), 3.0, dtype=f64)}
    _, seg0, jac0, eager0 = losses_both_paths(model, plain, TRANSPORT_EPS, mode="eps_group")
    _, seg1, jac1, eager1 = losses_both_paths(model, weighted, TRANSPORT_EPS, mode="eps_group")
    _, seg2, jac2, _ = losses_both_paths(model, weighted, TRANSPORT_EPS, mode="eps")
    for g in plain.groups:
        assert float(seg0[g].min()) > 1e-4  # every unweighted group loss is there to be scaled
        assert_losses(seg1[g], F[g] * seg0[g])
        assert_losses(eager1[g], F[g] * eager0[g])
        assert_losses(seg2[g], F[g] * seg0[g])
    scale = torch.stack([F[g] for g in plain.groups], 1).reshape(-1)  # task k*G + g
    for J0, J1, J2 in zip(jac0, jac1, jac2):
        assert float(J0.abs().max()) > 0
        torch.testing.assert_close(J1, scale * J0, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(J2, (scale * J0).reshape(3, len(plain.groups)).sum(1), rtol=1e-11, atol=1e-14)
    # `to` moves the factors with the quadrature rule (the trainer calls it once; task_loss then
    # copies nothing per step)
    weighted.to("cpu", torch.float32)
    assert {g: f.dtype for g, f in weighted._factor_tensors.items()} == \
        {"interior": torch.float32, "initial": torch.float32}
    assert weighted.v.dtype == torch.float32
    torch.testing.assert_close(weighted._factor_tensors["interior"], F["interior"].float())
    with pytest.raises(ValueError, match="unknown point group 'cells'"):
        TransportFormulation(points={"interior": 6, "boundary": 4, "initial": 5}, eps=TRANSPORT_EPS,
                             group_weights={"cells": 2.0})
    with pytest.raises(ValueError, match="one per task eps"):
        TransportFormulation(points={"interior": 6, "boundary": 4, "initial": 5}, eps=TRANSPORT_EPS,
                             group_weights={"interior": [1.0, 2.0]})
    with pytest.raises(ValueError, match="finite number >= 0"):
        TransportFormulation(points={"interior": 6, "boundary": 4, "initial": 5}, eps=TRANSPORT_EPS,
                             group_weights={"interior": [1.0, -2.0, 1.0]})
    with pytest.raises(ValueError, match="eps = 0.2 has weight 0"):
        TransportFormulation(points={"interior": 6, "boundary": 4, "initial": 5}, eps=TRANSPORT_EPS,
                             group_weights={g: [1.0, 1.0, 0.0] for g in ("interior", "boundary", "initial")})
