"""Python autograd of the ops: used where the C++ autograd library (csrc/autograd) cannot load.

The compiled kernels use the LibTorch stable ABI and run on every torch >= 2.10; the stable ABI
has no autograd, so the C++ autograd is a separate library tied to the torch it was built with
(see :mod:`hrgrad_ext._build`). Under any other torch, :func:`register` installs this module's
Autograd-key kernels instead. They have the same semantics as the C++ ones, formula for
formula (csrc/autograd/*.cpp):

* reverse mode: first-order backward through the fused ``*_backward`` kernels; when the
  backward must itself be differentiable (``create_graph``, torch.func transforms, forward
  over reverse) the same vector-Jacobian products as differentiable torch expressions, so
  double backward, hessian and jacrev are exact;
* forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``): the tangent formulas;
* vmap: the ops' own vmap rules (a torch.autograd.Function with ``generate_vmap_rule``);
* refusals: gradients or tangents on the quadrature nodes, on the cone ops, on
  ``combine_accumulate_`` and on the fused backward kernels raise a clear error.

Host overhead is higher than with the C++ autograd (a Python Function per call), the results
are the same. ``HRGRAD_EXT_AUTOGRAD=python`` selects this path on any torch (tests).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction

_ops = torch.ops.hrgrad_ext
_NODES_WHY = "v and w are a fixed quadrature rule"
_LENGTH_MODELS = ("projection", "min", "max", "harmonic", "arithmetic", "geometric")


# --- helpers ---------------------------------------------------------------------------------


def _has_tangent(t) -> bool:
    return isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None


def _check_not_differentiable(op: str, name: str, t: Tensor, why: str) -> None:
    grad = torch.is_grad_enabled() and t.requires_grad
    if grad or _has_tangent(t):
        what = "requires grad" if grad else "has a forward-mode tangent"
        raise RuntimeError(
            f"hrgrad_ext.{op} is not differentiable with respect to {name} ({why}), but {name} {what}; "
            "pass it detached (the derivative would silently be taken as zero)"
        )


def _fused_backward_allowed(*tensors) -> bool:
    """Whether the first-order fused kernel may compute a backward: not when the backward is
    itself differentiated (create_graph, functorch transforms, forward over reverse)."""
    if torch.is_grad_enabled():
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(isinstance(t, Tensor) and (is_wrapped(t) or _has_tangent(t)) for t in tensors)


def _zeros_if_none(g, shape, like: Tensor) -> Tensor:
    return like.new_zeros(shape) if g is None else g


def _tangent_or_zeros(t, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


def _col(row: Tensor) -> Tensor:  # [N] -> [N, 1]
    return row.unsqueeze(1)


def _per_row(p: Tensor) -> Tensor:  # kn / eps: [N] -> [N, 1], 0-d stays
    return p if p.dim() == 0 else p.unsqueeze(1)


def _node_row(v: Tensor) -> Tensor:  # [V] -> [1, V]
    return v.unsqueeze(0)


def _param_grad(rows: Tensor, p: Tensor) -> Tensor:
    return rows.sum() if p.dim() == 0 else rows


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return op(*args)


class _Outputs:
    """The op's outputs, computed before the Function is applied and handed to its forward as
    a non-tensor argument (so they are not inputs of the node)."""

    def __init__(self, value):
        self.value = value


class _OpFunction(_SingleLevelFunction):
    """A graph node for an op whose outputs are already computed (see :meth:`call`)."""

    op = None

    @staticmethod
    def forward(*args):  # noqa: D102
        return args[-1].value

    @classmethod
    def call(cls, *args):
        """What an Autograd-key kernel does. The op runs first, below autograd but in the
        caller's grad mode (as the C++ kernels redispatch): a Function's forward runs with grad
        disabled, which would hide the call from an enclosing torch.func level. Then, when
        something is differentiated, a node at the current autograd level gets the outputs.
        Under torch.func transforms the inputs are functorch's wrapped tensors of the current
        level (as for a C++ kernel), so the node is made by the single-level apply that functorch
        itself uses for a Function at one level (a _SingleLevelFunction; Function.apply's
        functorch route would dispatch a higher-order op that has no kernel at the Autograd key
        this runs at)."""
        out = _below_autograd(cls.op, *args)
        functorch = torch._C._are_functorch_transforms_active()
        grad = torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        if not functorch and not grad and not any(_has_tangent(a) for a in args):
            return out
        with enable_single_level_autograd_function():
            return cls.apply(*args, _Outputs(out))


# --- gram family -----------------------------------------------------------------------------


class _Gram(_OpFunction):
    op = _ops.gram.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        J, _, _ = inputs
        ctx.save_for_backward(J)
        ctx.save_for_forward(J)
        ctx.out_dtype = output.dtype

    @staticmethod
    def backward(ctx, gG):
        (J,) = ctx.saved_tensors
        return torch.matmul((gG + gG.mT).to(J.dtype), J), None, None

    @staticmethod
    def jvp(ctx, dJ, _, _outputs):
        (J,) = ctx.saved_tensors
        P = torch.matmul(dJ.to(ctx.out_dtype), J.to(ctx.out_dtype).mT)
        return P + P.mT


class _Combine(_OpFunction):
    op = _ops.combine.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        J, w, _ = inputs
        ctx.save_for_backward(J, w)
        ctx.save_for_forward(J, w)

    @staticmethod
    def backward(ctx, g):
        J, w = ctx.saved_tensors
        gJ = gw = None
        if ctx.needs_input_grad[0]:
            gJ = (w.to(J.dtype).unsqueeze(-1) * g.unsqueeze(-2)).to(J.dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.matmul(J, g.to(J.dtype).unsqueeze(-1)).squeeze(-1).to(w.dtype)
        return gJ, gw, None

    @staticmethod
    def jvp(ctx, dJ, dw, _outputs):
        J, w = ctx.saved_tensors
        out = None
        if dJ is not None:  # the op is linear in each argument
            out = _ops.combine.default(dJ, w)
        if dw is not None:
            tw = _ops.combine.default(J, dw)
            out = tw if out is None else out + tw
        return out


def _weights_pieces(G: Tensor, status: Tensor, length_model: str) -> dict:
    """The closed form of the generic branch of hrgrad_weights (csrc/autograd/gram_autograd.cpp)."""
    G64 = G.to(torch.float64)
    K = G.shape[-1]
    ok = (status == 0).unsqueeze(-1)
    eye = torch.eye(K, dtype=G64.dtype, device=G64.device)
    Gs = torch.where(ok.unsqueeze(-1), (G64 + G64.mT) * 0.5, eye)
    d = Gs.diagonal(0, -2, -1).sqrt()
    s = d.reciprocal()
    C = Gs * s.unsqueeze(-1) * s.unsqueeze(-2)
    a = torch.linalg.solve_ex(C, torch.ones_like(d).unsqueeze(-1))[0].squeeze(-1)
    sigma = a.sum(-1, keepdim=True)
    if length_model in ("projection", "arithmetic"):
        phi, dphi = d.sum(-1, keepdim=True), torch.ones_like(d)
    elif length_model in ("min", "max"):
        ext = d.amin(-1, keepdim=True) if length_model == "min" else d.amax(-1, keepdim=True)
        phi = ext * K
        hit = (d == ext).to(torch.float64)
        dphi = hit * K / hit.sum(-1, keepdim=True)
    elif length_model == "harmonic":
        phi = (K * K) / s.sum(-1, keepdim=True)
        dphi = (phi * s / K).square()
    else:  # geometric
        phi = d.log().mean(-1, keepdim=True).exp() * K
        dphi = phi * s / K
    return dict(ok=ok, Gs=Gs, d=d, s=s, C=C, a=a, sigma=sigma, phi=phi, dphi=dphi, w=phi * s * a / sigma)


def _nan_where_not_ok(x: Tensor, ok: Tensor, perturbed: Tensor) -> Tensor:
    # Off the generic branch the derivative is not implemented: NaN where it is asked for.
    undefined = torch.where(perturbed, torch.nan, 0.0).to(x.dtype)
    return torch.where(ok, x, undefined)


def _weights_jvp(p: dict, dG: Tensor) -> Tensor:
    s, Gs, a, C = p["s"], p["Gs"], p["a"], p["C"]
    dG64 = dG.to(torch.float64)
    dGs = torch.where(p["ok"].unsqueeze(-1), (dG64 + dG64.mT) * 0.5, 0.0)
    dd = dGs.diagonal(0, -2, -1) * s * 0.5
    ds = -dd * s * s
    sds = ds.unsqueeze(-1) * s.unsqueeze(-2)
    dC = dGs * (s.unsqueeze(-1) * s.unsqueeze(-2)) + Gs * (sds + sds.mT)
    da = -torch.linalg.solve_ex(C, torch.matmul(dC, a.unsqueeze(-1)))[0].squeeze(-1)
    dsigma = da.sum(-1, keepdim=True)
    dphi = (p["dphi"] * dd).sum(-1, keepdim=True)
    dw = p["w"] * (dphi / p["phi"] - dsigma / p["sigma"]) + p["phi"] * (ds * a + s * da) / p["sigma"]
    return _nan_where_not_ok(dw, p["ok"], (dG64.abs().sum((-2, -1)) != 0).unsqueeze(-1))


def _weights_vjp(p: dict, gw: Tensor) -> Tensor:
    s, Gs, a, C, phi, sigma = p["s"], p["Gs"], p["a"], p["C"], p["phi"], p["sigma"]
    g = gw.to(torch.float64)
    Q = (g * p["w"]).sum(-1, keepdim=True)
    gphi, gsigma = Q / phi, -Q / sigma
    gs = g * phi * a / sigma
    ga = g * phi * s / sigma + gsigma
    b = torch.linalg.solve_ex(C, ga.unsqueeze(-1))[0]
    gC = -b * a.unsqueeze(-2)
    gGs = gC * s.unsqueeze(-1) * s.unsqueeze(-2)
    gs = gs + ((gC + gC.mT) * Gs * s.unsqueeze(-2)).sum(-1)
    gd = -gs * s * s + gphi * p["dphi"]
    gGs = gGs + torch.diag_embed(gd * s * 0.5)
    gG = (gGs + gGs.mT) * 0.5
    return _nan_where_not_ok(gG, p["ok"].unsqueeze(-1), (g.abs().sum(-1, keepdim=True) != 0).unsqueeze(-1))


class _HRGradWeights(_OpFunction):
    op = _ops.hrgrad_weights.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        G, length_model, _, _ = inputs
        w, status = output
        ctx.mark_non_differentiable(status)
        ctx.save_for_backward(G, status)
        ctx.save_for_forward(G, status)
        ctx.length_model = length_model

    @staticmethod
    def backward(ctx, gw, _gstatus):
        G, status = ctx.saved_tensors
        return _weights_vjp(_weights_pieces(G, status, ctx.length_model), gw).to(G.dtype), None, None, None

    @staticmethod
    def jvp(ctx, dG, _lm, _rcond, _outputs):
        G, status = ctx.saved_tensors
        return _weights_jvp(_weights_pieces(G, status, ctx.length_model), dG).to(G.dtype), None


# --- kinetic family (formulas: python/hrgrad_ext/ops/kinetic.py) ------------------------------


class _Moments(_OpFunction):
    op = _ops.velocity_moments.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, v, w, order, _ = inputs
        ctx.save_for_backward(v, w)
        ctx.save_for_forward(v, w)
        ctx.order = order

    @staticmethod
    def backward(ctx, g):
        v, w = ctx.saved_tensors
        if _fused_backward_allowed(g, v, w):
            return _ops.velocity_moments_backward.default(g, v, w), None, None, None, None
        k = torch.arange(g.shape[1], dtype=v.dtype, device=v.device).unsqueeze(1)
        return torch.matmul(g, torch.pow(_node_row(v), k) * _node_row(w)), None, None, None, None

    @staticmethod
    def jvp(ctx, dF, _dv, _dw, _order, _outputs):
        v, w = ctx.saved_tensors
        return _ops.velocity_moments.default(dF, v, w, ctx.order)  # linear in F


def _maxwellian_vjp(gM, rho, u, T, v):
    M = _ops.maxwellian.default(rho, u, T, v)
    c = _node_row(v) - _col(u)
    gMM = gM * M
    return gMM.sum(1) / rho, (gMM * c).sum(1) / T, (gMM * (c * c / _col(T) - 1)).sum(1) / (2 * T)


def _maxwellian_jvp(M, rho, u, T, v, drho, du, dT):
    c = _node_row(v) - _col(u)
    return M * (_col(drho / rho) + c * _col(du / T) + (c * c / _col(T) - 1) * _col(dT / (2 * T)))


class _Maxwellian(_OpFunction):
    op = _ops.maxwellian.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        rho, u, T, v, _ = inputs
        ctx.save_for_backward(rho, u, T, v)
        ctx.save_for_forward(rho, u, T, v, output)

    @staticmethod
    def backward(ctx, g):
        rho, u, T, v = ctx.saved_tensors
        if _fused_backward_allowed(g, rho, u, T):
            return (*_ops.maxwellian_backward.default(g, rho, u, T, v), None, None)
        return (*_maxwellian_vjp(g, rho, u, T, v), None, None)

    @staticmethod
    def jvp(ctx, drho, du, dT, _dv, _outputs):
        rho, u, T, v, M = ctx.saved_tensors
        return _maxwellian_jvp(M, rho, u, T, v, _tangent_or_zeros(drho, rho), _tangent_or_zeros(du, u),
                               _tangent_or_zeros(dT, T))


def _bgk_vjp(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    """The vector-Jacobian product of bgk_residuals in differentiable torch ops: the gradients of
    F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn."""
    vv, ww, knb = _node_row(v), _node_row(w), _per_row(kn)
    gC0, gC1, gC2 = gC.unbind(1)
    gS0, gS1, gS2 = gS.unbind(1)
    dF = gK - ww * (_col(gS0) + _col(gS1) * vv + _col(gS2) * (vv * vv * 0.5))
    dFt = knb * gK
    dFx = knb * vv * gK + ww * vv * (_col(gC0) + _col(gC1) * vv + _col(gC2) * (vv * vv * 0.5))
    dkn = _param_grad((gK * (Ft + vv * Fx)).sum(1), kn)
    mrho, mu, mT = _maxwellian_vjp(-gK, rho, u, T, v)
    E2 = u * u + T
    drho = mrho + gS0 + gS1 * u + gS2 * E2 * 0.5 + gC1 * u_t + gC2 * (2 * u * u_t + T_t) * 0.5
    du = mu + gS1 * rho + gS2 * rho * u + gC1 * rho_t + gC2 * (rho_t * u + rho * u_t)
    dT = mT + (gS2 * rho + gC2 * rho_t) * 0.5
    drho_t = gC0 + gC1 * u + gC2 * E2 * 0.5
    du_t = gC1 * rho + gC2 * rho * u
    dT_t = gC2 * rho * 0.5
    return dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn


def _bgk_jvp(tangents, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    """The tangents of bgk_residuals' outputs (``tangents``: those of its 9 field inputs and kn,
    ``None`` for none; the other arguments are primal values)."""
    dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn = tangents
    dF = _tangent_or_zeros(dF, Ft)
    dFt, dFx = _tangent_or_zeros(dFt, Ft), _tangent_or_zeros(dFx, Fx)
    drho, du, dT = _tangent_or_zeros(drho, rho), _tangent_or_zeros(du, u), _tangent_or_zeros(dT, T)
    drho_t, du_t = _tangent_or_zeros(drho_t, rho_t), _tangent_or_zeros(du_t, u_t)
    dT_t, dkn = _tangent_or_zeros(dT_t, T_t), _tangent_or_zeros(dkn, kn)
    vv = _node_row(v)
    M = _ops.maxwellian.default(rho, u, T, v)
    dM = _maxwellian_jvp(M, rho, u, T, v, drho, du, dT)
    t_kin = _per_row(dkn) * (Ft + vv * Fx) + _per_row(kn) * (dFt + vv * dFx) - dM + dF
    mx = _ops.velocity_moments.default(dFx, v, w, 3)  # <v^k dFx>, k = 0..3
    mf = _ops.velocity_moments.default(dF, v, w, 2)  # <v^k dF>, k = 0..2
    E2, dE2 = u * u + T, 2 * u * du + dT
    dC0 = drho_t + mx[:, 1]
    dC1 = drho_t * u + rho_t * du + drho * u_t + rho * du_t + mx[:, 2]
    dEt = (drho_t * E2 + rho_t * dE2 + drho * (2 * u * u_t + T_t) + rho * (2 * du * u_t + 2 * u * du_t + dT_t)) * 0.5
    t_cons = torch.stack([dC0, dC1, dEt + mx[:, 3] * 0.5], 1)
    dS0 = drho - mf[:, 0]
    dS1 = drho * u + rho * du - mf[:, 1]
    dS2 = (drho * E2 + rho * dE2 - mf[:, 2]) * 0.5
    return t_kin, t_cons, torch.stack([dS0, dS1, dS2], 1)


class _Bgk(_OpFunction):
    op = _ops.bgk_residuals.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        _F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, _ = inputs
        ctx.save_for_backward(Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
        ctx.save_for_forward(Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)

    @staticmethod
    def backward(ctx, gK, gC, gS):
        Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn = ctx.saved_tensors
        N = Ft.shape[0]
        if gK is None and gC is None and gS is None:
            return (None,) * 13
        gK = _zeros_if_none(gK, Ft.shape, Ft)
        gC = _zeros_if_none(gC, (N, 3), Ft)
        gS = _zeros_if_none(gS, (N, 3), Ft)
        if _fused_backward_allowed(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn):
            dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn = _ops.bgk_residuals_backward.default(
                gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
            return dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, None, None, _param_grad(dkn, kn), None
        dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn = _bgk_vjp(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t,
                                                                      T_t, v, w, kn)
        return dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, None, None, dkn, None

    @staticmethod
    def jvp(ctx, dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, _dv, _dw, dkn, _outputs):
        Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn = ctx.saved_tensors
        return _bgk_jvp((dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn), Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)


class _BgkSq(_OpFunction):
    """bgk_residuals_sq: the derivatives of bgk_residuals with grad_kinetic = 2 grad_kinetic_sq
    kinetic (the fused backward recomputes kinetic; the differentiable one recomputes it with the
    differentiable op)."""

    op = _ops.bgk_residuals_sq.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:12])
        ctx.save_for_forward(*inputs[:12])

    @staticmethod
    def backward(ctx, gQ, gC, gS):
        F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn = args = ctx.saved_tensors
        N = F.shape[0]
        if gQ is None and gC is None and gS is None:
            return (None,) * 13
        gQ = _zeros_if_none(gQ, (N,), F)
        gC = _zeros_if_none(gC, (N, 3), F)
        gS = _zeros_if_none(gS, (N, 3), F)
        if _fused_backward_allowed(gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn):
            *d, dkn = _ops.bgk_residuals_sq_backward.default(gQ, gC, gS, *args)
            return (*d, None, None, _param_grad(dkn, kn), None)
        kin = _ops.bgk_residuals.default(*args)[0]
        *d, dkn = _bgk_vjp(2 * _col(gQ) * kin, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
        return (*d, None, None, dkn, None)

    @staticmethod
    def jvp(ctx, dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, _dv, _dw, dkn, _outputs):
        F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn = args = ctx.saved_tensors
        kin = _ops.bgk_residuals.default(*args)[0]
        t_kin, t_cons, t_consis = _bgk_jvp((dF, dFt, dFx, drho, du, dT, drho_t, du_t, dT_t, dkn), Ft, Fx, rho, u, T,
                                           rho_t, u_t, T_t, v, w, kn)
        return 2 * (kin * t_kin).sum(1), t_cons, t_consis


def _average_weights(w: Tensor) -> Tensor:  # [1, V] w / sum w
    return _node_row(w / w.sum())


def _project(x: Tensor, pw: Tensor) -> Tensor:  # P x = x - <x>
    return x - (x * pw).sum(1, keepdim=True)


def _project_adjoint(y: Tensor, pw: Tensor) -> Tensor:  # P* y = y - (w / sum w) sum_j y_j
    return y - pw * y.sum(1, keepdim=True)


def _transport_vjp(g_sum, gm, gc, Gt, Gx, v, w, eps):
    """The vector-Jacobian product of transport_mm_residuals in differentiable torch ops (g_sum:
    grad_g + grad_micro): the gradients of Graw, Graw_t, Graw_x, rho_t, rho_x, eps."""
    pw, vv, e = _average_weights(w), _node_row(v), _per_row(eps)
    dG = _project_adjoint(g_sum, pw)
    dGt = _project_adjoint(e * e * gm, pw)
    dGx = _project_adjoint(vv * (_project_adjoint(e * gm, pw) + _col(gc) * pw), pw)
    drho_x = (gm * vv).sum(1)
    deps = _param_grad((gm * (2 * e * _project(Gt, pw) + _project(vv * _project(Gx, pw), pw))).sum(1), eps)
    return dG, dGt, dGx, gc, drho_x, deps


def _transport_jvp(tangents, Gt, Gx, v, w, eps):
    """The tangents of transport_mm_residuals' outputs (``tangents``: those of Graw, Graw_t,
    Graw_x, rho_t, rho_x, eps or ``None``; primal Gt, Gx, eps). Linear in every input but eps:
    the op itself at the tangents, plus the eps term."""
    dG, dGt, dGx, drho_t, drho_x, deps = tangents
    N = Gt.shape[0]
    tg, tmicro, tmacro = _ops.transport_mm_residuals.default(
        _tangent_or_zeros(dG, Gt), _tangent_or_zeros(dGt, Gt), _tangent_or_zeros(dGx, Gx),
        Gt.new_zeros(N) if drho_t is None else drho_t, Gt.new_zeros(N) if drho_x is None else drho_x, v, w, eps)
    if deps is not None:
        pw, e = _average_weights(w), _per_row(eps)
        tmicro = tmicro + _per_row(deps) * (2 * e * _project(Gt, pw) + _project(_node_row(v) * _project(Gx, pw), pw))
    return tg, tmicro, tmacro


class _Transport(_OpFunction):
    op = _ops.transport_mm_residuals.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        _G, Gt, Gx, _rho_t, _rho_x, v, w, eps, _ = inputs
        ctx.save_for_backward(Gt, Gx, v, w, eps)
        ctx.save_for_forward(Gt, Gx, v, w, eps)

    @staticmethod
    def backward(ctx, gg, gm, gc):
        Gt, Gx, v, w, eps = ctx.saved_tensors
        if gg is None and gm is None and gc is None:
            return (None,) * 9
        N = Gt.shape[0]
        gg = _zeros_if_none(gg, Gt.shape, Gt)
        gm = _zeros_if_none(gm, Gt.shape, Gt)
        gc = _zeros_if_none(gc, (N,), Gt)
        if _fused_backward_allowed(gg, gm, gc, Gt, Gx, eps):
            dG, dGt, dGx, drho_x, deps = _ops.transport_mm_residuals_backward.default(gg, gm, gc, Gt, Gx, v, w, eps)
            # macro = rho_t + ...: its gradient passes through unchanged.
            return dG, dGt, dGx, gc, drho_x, None, None, _param_grad(deps, eps), None
        dG, dGt, dGx, drho_t, drho_x, deps = _transport_vjp(gg + gm, gm, gc, Gt, Gx, v, w, eps)
        return dG, dGt, dGx, drho_t, drho_x, None, None, deps, None

    @staticmethod
    def jvp(ctx, dG, dGt, dGx, drho_t, drho_x, _dv, _dw, deps, _outputs):
        Gt, Gx, v, w, eps = ctx.saved_tensors
        return _transport_jvp((dG, dGt, dGx, drho_t, drho_x, deps), Gt, Gx, v, w, eps)


class _TransportSq(_OpFunction):
    """transport_mm_residuals_sq: the derivatives of transport_mm_residuals with grad_g = 0 and
    grad_micro = 2 grad_micro_sq micro (see _BgkSq)."""

    op = _ops.transport_mm_residuals_sq.default

    @staticmethod
    def setup_context(ctx, inputs, output):
        G, Gt, Gx, _rho_t, rho_x, v, w, eps, _ = inputs
        ctx.save_for_backward(G, Gt, Gx, rho_x, v, w, eps)
        ctx.save_for_forward(G, Gt, Gx, rho_x, v, w, eps)

    @staticmethod
    def backward(ctx, gQ, gc):
        G, Gt, Gx, rho_x, v, w, eps = ctx.saved_tensors
        if gQ is None and gc is None:
            return (None,) * 9
        N = G.shape[0]
        gQ = _zeros_if_none(gQ, (N,), G)
        gc = _zeros_if_none(gc, (N,), G)
        if _fused_backward_allowed(gQ, gc, G, Gt, Gx, rho_x, eps):
            dG, dGt, dGx, drho_x, deps = _ops.transport_mm_residuals_sq_backward.default(gQ, gc, G, Gt, Gx, rho_x, v,
                                                                                         w, eps)
            return dG, dGt, dGx, gc, drho_x, None, None, _param_grad(deps, eps), None
        # micro does not depend on rho_t: any [N] tensor stands in for it.
        gm = 2 * _col(gQ) * _ops.transport_mm_residuals.default(G, Gt, Gx, rho_x, rho_x, v, w, eps)[1]
        dG, dGt, dGx, drho_t, drho_x, deps = _transport_vjp(gm, gm, gc, Gt, Gx, v, w, eps)
        return dG, dGt, dGx, drho_t, drho_x, None, None, deps, None

    @staticmethod
    def jvp(ctx, dG, dGt, dGx, drho_t, drho_x, _dv, _dw, deps, _outputs):
        G, Gt, Gx, rho_x, v, w, eps = ctx.saved_tensors
        micro = _ops.transport_mm_residuals.default(G, Gt, Gx, rho_x, rho_x, v, w, eps)[1]
        _, tmicro, tmacro = _transport_jvp((dG, dGt, dGx, drho_t, drho_x, deps), Gt, Gx, v, w, eps)
        return 2 * (micro * tmicro).sum(1), tmacro


# --- Autograd-key kernels --------------------------------------------------------------------


def _gram_kernel(J, dtype=None):
    return _Gram.call(J, dtype)


def _combine_kernel(J, w):
    return _Combine.call(J, w)


def _hrgrad_weights_kernel(G, length_model="projection", rcond=None):
    return _HRGradWeights.call(G, length_model, rcond)


def _combine_accumulate_kernel(out, J, w):
    why = "an in-place accumulation into gradient buffers; use combine"
    for name, t in (("out", out), ("J", J), ("w", w)):
        _check_not_differentiable("combine_accumulate_", name, t, why)
    with torch._C._AutoDispatchBelowADInplaceOrView():
        _ops.combine_accumulate_.default(out, J, w)
    torch.autograd.graph.increment_version(out)  # saved copies of out become stale, as in place ops do


_CONE_WHY = "an exact active-set solve; its derivative is not implemented"


def _dual_cone_weights_kernel(G, U, rcond=None):
    _check_not_differentiable("dual_cone_weights", "G", G, _CONE_WHY)
    _check_not_differentiable("dual_cone_weights", "U", U, _CONE_WHY)
    return _below_autograd(_ops.dual_cone_weights.default, G, U, rcond)


def _mgda_weights_kernel(G, rcond=None):
    _check_not_differentiable("mgda_weights", "G", G, _CONE_WHY)
    return _below_autograd(_ops.mgda_weights.default, G, rcond)


def _moments_kernel(F, v, w, order):
    _check_not_differentiable("velocity_moments", "v", v, _NODES_WHY)
    _check_not_differentiable("velocity_moments", "w", w, _NODES_WHY)
    return _Moments.call(F, v, w, order)


def _maxwellian_kernel(rho, u, T, v):
    _check_not_differentiable("maxwellian", "v", v, "v are fixed velocity nodes")
    return _Maxwellian.call(rho, u, T, v)


def _residual_kernel(name: str, function):
    """The Autograd kernel of a residual op (bgk_residuals, transport_mm_residuals and their loss
    forms): its last three arguments are v, w and kn / eps."""

    def kernel(*args):
        _check_not_differentiable(name, "v", args[-3], _NODES_WHY)
        _check_not_differentiable(name, "w", args[-2], _NODES_WHY)
        return function.call(*args)

    return kernel


def _fused_backward_kernel(name: str):
    op = getattr(_ops, name).default

    def kernel(*args):
        for t in args:
            if isinstance(t, Tensor) and ((torch.is_grad_enabled() and t.requires_grad) or _has_tangent(t)):
                raise RuntimeError(
                    f"hrgrad_ext::{name} is the fused first-order backward kernel and is not differentiable; "
                    "differentiate the forward op (its double backward and forward mode use differentiable formulas)"
                )
        return _below_autograd(op, *args)

    return kernel


_library = None


def register() -> None:
    """Installs the Python Autograd-key kernels of every op (once per process)."""
    global _library
    if _library is not None:
        return
    lib = torch.library.Library("hrgrad_ext", "IMPL")
    kernels = {
        "gram": _gram_kernel,
        "combine": _combine_kernel,
        "hrgrad_weights": _hrgrad_weights_kernel,
        "combine_accumulate_": _combine_accumulate_kernel,
        "dual_cone_weights": _dual_cone_weights_kernel,
        "mgda_weights": _mgda_weights_kernel,
        "velocity_moments": _moments_kernel,
        "maxwellian": _maxwellian_kernel,
        "bgk_residuals": _residual_kernel("bgk_residuals", _Bgk),
        "transport_mm_residuals": _residual_kernel("transport_mm_residuals", _Transport),
        "bgk_residuals_sq": _residual_kernel("bgk_residuals_sq", _BgkSq),
        "transport_mm_residuals_sq": _residual_kernel("transport_mm_residuals_sq", _TransportSq),
    }
    for name in ("velocity_moments_backward", "maxwellian_backward", "bgk_residuals_backward",
                 "transport_mm_residuals_backward", "bgk_residuals_sq_backward",
                 "transport_mm_residuals_sq_backward"):
        kernels[name] = _fused_backward_kernel(name)
    for name, kernel in kernels.items():
        lib.impl(name, kernel, "Autograd")
    _library = lib
