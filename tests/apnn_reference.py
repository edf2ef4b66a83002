"""Plain-PyTorch APNN losses written from the spec (KINETIC.md sections 1 and 2), independent of
``hrgrad_ext.train.losses`` and of the fused residual ops: the reference that the segmented and
separate task gradients of real networks are compared with.

Input derivatives are taken the textbook way (reverse mode with ``create_graph`` on the
model's own methods, the f / g network on the [n, V] grid of coordinates), residuals and mean
squares are spelled out, and each task's gradient is its own ``autograd.grad``.
"""

from __future__ import annotations

import math

import torch


def average(phi, w):
    """``<phi> = sum w phi / sum w`` over the trailing velocity axis (kept)."""
    return (phi * w).sum(-1, keepdim=True) / w.sum()


def spec_transport_residuals(G, G_t, G_x, rho_t, rho_x, v, w, eps):
    """micro = eps^2 g_t + eps (v g_x - <v g_x>) + v rho_x + g, macro = rho_t + <v g_x>, with
    g = G - <G> (and its derivatives likewise)."""
    g, g_t, g_x = G - average(G, w), G_t - average(G_t, w), G_x - average(G_x, w)
    v_gx = average(v * g_x, w)
    micro = eps ** 2 * g_t + eps * (v * g_x - v_gx) + v * rho_x[:, None] + g
    return micro, rho_t + v_gx[:, 0]


def maxwellian(rho, u, T, v):
    return rho / torch.sqrt(2 * math.pi * T) * torch.exp(-(v - u) ** 2 / (2 * T))


def case_iv_profile(x):
    """Spec case IV: s(x) = (1 + tanh(20 x)) / 2."""
    return 0.5 * (1 + torch.tanh(20 * x))


LEFT, RIGHT = (1.5, 0.0, 1.5), (0.625, 0.0, 0.75)


def _leaf(a):
    return a.detach().clone().requires_grad_(True)


def _on_grid(a, V):
    return _leaf(a.detach()[:, None].expand(a.shape[0], V))


def transport_group_losses(model, v, w, W, pts, eps):
    """``{group: loss}`` of one task (eps) of the micro-macro APNN; ``pts[group]`` holds that
    task's ``t``, ``x`` ([n])."""
    V = v.shape[0]
    e = torch.as_tensor(eps, dtype=v.dtype)
    t, x = _leaf(pts["interior"]["t"]), _leaf(pts["interior"]["x"])
    rho_t, rho_x = torch.autograd.grad(model.rho(t, x, e).sum(), (t, x), create_graph=True)
    tg, xg = _on_grid(t, V), _on_grid(x, V)
    G = model.g_raw(tg, xg, v, e)
    G_t, G_x = torch.autograd.grad(G.sum(), (tg, xg), create_graph=True)
    micro, macro = spec_transport_residuals(G, G_t, G_x, rho_t, rho_x, v, w, e)
    out = {"interior": W["micro"] * (micro ** 2).mean() + W["macro"] * (macro ** 2).mean()}

    def f(group):
        t, x = pts[group]["t"], pts[group]["x"]
        G = model.g_raw(t, x, v, e)
        return model.rho(t, x, e)[:, None] + e * (G - average(G, w)), x[:, None]

    fb, xb = f("boundary")
    # inflow: f = 1 at x = 0 for v > 0, f = 0 at x = 1 for v < 0; the outgoing half is free
    incoming = ((xb == 0) & (v > 0)) | ((xb == 1) & (v < 0))
    data = (xb == 0).to(fb.dtype).expand_as(fb)
    out["boundary"] = W["bc"] * ((fb - data)[incoming] ** 2).mean()
    assert W.get("ic_corner", 0.0) == 0.0, "the reference has no initial-data ramp"
    out["initial"] = W["ic"] * (f("initial")[0] ** 2).mean()  # f(0, x, v) = 0
    return out


def bgk_group_losses(model, v, w, W, pts, kn):
    """``{group: loss}`` of one task (Kn) of the BGK APNN (spec case IV initial data)."""
    V = v.shape[0]
    k = torch.as_tensor(kn, dtype=v.dtype)
    t, x = _leaf(pts["interior"]["t"]), pts["interior"]["x"]
    tg, xg = _on_grid(t, V), _on_grid(x, V)
    F = model.f(tg, xg, v, k)
    F_t, F_x = torch.autograd.grad(F.sum(), (tg, xg), create_graph=True)
    rho, u, T = model.macro(t, x, k)
    rho_t, u_t, T_t = (torch.autograd.grad(q.sum(), t, create_graph=True)[0] for q in (rho, u, T))
    kinetic = k * (F_t + v * F_x) - (maxwellian(rho[:, None], u[:, None], T[:, None], v) - F)

    def moment(p, G):
        return (w * v ** p * G).sum(-1)

    E = 0.5 * rho * (u * u + T)
    conservation = {"rho": rho_t + moment(1, F_x),
                    "mom": rho_t * u + rho * u_t + moment(2, F_x),
                    "energy": 0.5 * rho_t * (u * u + T) + 0.5 * rho * (2 * u * u_t + T_t) + 0.5 * moment(3, F_x)}
    consistency = {"rho": rho - moment(0, F), "mom": rho * u - moment(1, F), "energy": E - 0.5 * moment(2, F)}
    L = W["kinetic"] * (kinetic ** 2).mean()
    for name in ("rho", "mom", "energy"):
        L = L + W["cons_" + name] * (conservation[name] ** 2).mean() + W["consist_" + name] * (consistency[name] ** 2).mean()
    t0, x0 = pts["initial"]["t"], pts["initial"]["x"]
    s = case_iv_profile(x0)
    q0 = [a + (b - a) * s for a, b in zip(LEFT, RIGHT)]
    rho, u, T = model.macro(t0, x0, k)
    F0 = model.f(t0, x0, v, k)
    initial = (W["ic_rho"] * ((rho - q0[0]) ** 2).mean() + W["ic_u"] * ((u - q0[1]) ** 2).mean()
               + W["ic_T"] * ((T - q0[2]) ** 2).mean()
               + W["ic_f"] * ((F0 - maxwellian(*(q[:, None] for q in q0), v)) ** 2).mean())
    out = {"interior": L, "initial": initial}
    if W.get("bc_f", 0.0) > 0:
        # inflow: f = M[left state] at x = -0.5 for v > 0, M[right state] at x = 0.5 for v < 0
        tb, xb = pts["boundary"]["t"], pts["boundary"]["x"]
        Fb, xb = model.f(tb, xb, v, k), xb[:, None]
        incoming = ((xb == -0.5) & (v > 0)) | ((xb == 0.5) & (v < 0))
        wall = [torch.where(xb == -0.5, xb.new_tensor(a), xb.new_tensor(b)) for a, b in zip(LEFT, RIGHT)]
        out["boundary"] = W["bc_f"] * ((Fb - maxwellian(*wall, v))[incoming] ** 2).mean()
    return out


def reference_task_gradients(model, form, batch, layout):
    """``(losses [T], jacobians)`` like :func:`hrgrad_ext.train.segmented.separate_task_gradients`,
    from the spec losses above (``form`` supplies only the rule, the weights and the problem)."""
    v, w = form.v, form.w
    if form.name == "bgk":
        assert form.case == "IV", "the reference writes out case IV's initial data"
        group_losses = bgk_group_losses
    else:
        group_losses = transport_group_losses
    params = [p for p in model.parameters() if p.requires_grad]
    losses, rows = [], []
    for k, eps in enumerate(layout.eps):
        pts = {g: {name: a[k] for name, a in batch[g].items()} for g in layout.groups}
        groups = group_losses(model, v, w, form.weights, pts, eps)
        tasks = [sum(groups.values())] if layout.mode == "eps" else [groups[g] for g in layout.groups]
        for L in tasks:
            grads = torch.autograd.grad(L, params, retain_graph=True, allow_unused=True)
            rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
            losses.append(L.detach())
    return torch.stack(losses), [torch.stack([r[i] for r in rows]) for i in range(len(params))]
