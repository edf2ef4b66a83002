"""Plain-PyTorch float64 reference implementations the kernels are tested against."""

import math

import torch


def gram_ref(J):
    J = J.to(torch.float64)
    return J @ J.transpose(-1, -2)


def combine_ref(J, w):
    return (w.to(torch.float64).unsqueeze(-1) * J.to(torch.float64)).sum(-2)


def hrgrad_pinv_ref(J, length_model="projection"):
    """HRGrad/ConFIG with an explicit pseudo-inverse of the K x n matrix (float64)."""
    J = J.to(torch.float64)
    d = J.norm(dim=1)
    units = J / d[:, None]
    direction = torch.linalg.pinv(units) @ torch.ones(J.shape[0], dtype=torch.float64)
    u = direction / direction.norm()
    cos = units @ u
    if length_model == "projection":
        length = (J @ u).sum()
    else:
        scale = {
            "min": d.min(),
            "max": d.max(),
            "harmonic": len(d) / (1.0 / d).sum(),
            "arithmetic": d.mean(),
            "geometric": d.log().mean().exp(),
        }[length_model]
        length = scale * cos.sum()
    return u * length



def hrgrad_weights_ref(G, length_model="projection"):
    """The rotation solve of spec HRGRAD.md from the Gram matrix, for full-rank G (float64):
    d = sqrt(diag G), C = D^-1 G D^-1, a = C^-1 1, |x|^2 = a^T C a, w = len a / (d |x|)."""
    G = 0.5 * (G + G.transpose(-1, -2)).to(torch.float64)  # the kernel reads G's symmetric part
    d = G.diagonal(0, -2, -1).sqrt()
    C = G / (d.unsqueeze(-1) * d.unsqueeze(-2))
    a = torch.linalg.solve(C, torch.ones_like(d))
    Ca = (C @ a.unsqueeze(-1)).squeeze(-1)
    xn = (a * Ca).sum(-1, keepdim=True).sqrt()
    if length_model == "projection":
        length = (d * Ca).sum(-1, keepdim=True) / xn
    else:
        scale = {
            "min": lambda: d.amin(-1, keepdim=True),
            "max": lambda: d.amax(-1, keepdim=True),
            "harmonic": lambda: d.shape[-1] / (1.0 / d).sum(-1, keepdim=True),
            "arithmetic": lambda: d.mean(-1, keepdim=True),
            "geometric": lambda: d.log().mean(-1, keepdim=True).exp(),
        }[length_model]()
        length = scale * (Ca / xn).sum(-1, keepdim=True)
    return length * a / (d * xn)

# --- kinetic ops (from the formulas of issue 3) --------------------------------------------------


def ref_moments(F, v, w, order):
    return torch.stack([(w * v**k * F).sum(-1) for k in range(order + 1)], -1)


def ref_maxwellian(rho, u, T, v):
    rho, u, T = rho[:, None], u[:, None], T[:, None]
    return rho / torch.sqrt(2 * math.pi * T) * torch.exp(-((v - u) ** 2) / (2 * T))


def ref_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    k = kn if kn.dim() == 0 else kn[:, None]
    M = ref_maxwellian(rho, u, T, v)
    kinetic = k * (Ft + v * Fx) - (M - F)
    E = 0.5 * rho * (u**2 + T)
    rhou_t = rho_t * u + rho * u_t
    E_t = 0.5 * rho_t * (u**2 + T) + 0.5 * rho * (2 * u * u_t + T_t)
    conservation = torch.stack(
        [rho_t + (w * v * Fx).sum(-1), rhou_t + (w * v**2 * Fx).sum(-1), E_t + 0.5 * (w * v**3 * Fx).sum(-1)], -1
    )
    consistency = torch.stack(
        [rho - (w * F).sum(-1), rho * u - (w * v * F).sum(-1), E - 0.5 * (w * v**2 * F).sum(-1)], -1
    )
    return kinetic, conservation, consistency


def ref_transport(G, Gt, Gx, rho_t, rho_x, v, w, eps):
    def avg(phi):
        return (w * phi).sum(-1, keepdim=True) / w.sum()

    g, gt, gx = G - avg(G), Gt - avg(Gt), Gx - avg(Gx)
    e = eps if eps.dim() == 0 else eps[:, None]
    vgx = avg(v * gx)
    micro = e**2 * gt + e * (v * gx - vgx) + v * rho_x[:, None] + g
    macro = rho_t + vgx[:, 0]
    return g, micro, macro


def _subsets(K):
    for mask in range(1 << K):
        yield [i for i in range(K) if mask >> i & 1]


def dual_cone_projection_ref(J, y, tol=1e-9):
    """Euclidean projection of ``y [n]`` onto ``{x : J x >= 0}`` (float64), by enumerating the
    active sets S: x = y + J_S^T lam with J_S x = 0 (lam from the pseudo-inverse) is the
    projection when lam >= 0 and J x >= 0 (the KKT conditions). Exact; 2^K solves (K <= 8)."""
    J, y = J.to(torch.float64), y.to(torch.float64)
    norms = J.norm(dim=1)
    for S in _subsets(J.shape[0]):
        x, lam = y, torch.zeros(0, dtype=torch.float64)
        if S:
            JS = J[S]
            lam = -torch.linalg.pinv(JS @ JS.T) @ (JS @ y)
            x = y + JS.T @ lam
        scale = y.norm() + (lam.abs() * norms[S]).sum()
        if (lam >= -tol * scale).all() and (J @ x >= -tol * norms * scale).all():
            return x
    raise AssertionError("no active set satisfies the KKT conditions")


def min_norm_hull_ref(J, tol=1e-9):
    """Minimum-norm point of the convex hull of the rows of J (float64), by enumerating the
    supports S: the minimum-norm point of the affine hull of J_S (a KKT solve) is the answer
    when its weights are >= 0 and g_i . u >= |u|^2 for every row. Exact; 2^K solves."""
    J = J.to(torch.float64)
    G = J @ J.T
    scale = G.diagonal().max()
    for S in _subsets(J.shape[0]):
        if not S:
            continue
        k = len(S)
        kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        kkt[:k, :k] = G[S][:, S]
        kkt[:k, k] = 1.0
        kkt[k, :k] = 1.0
        rhs = torch.zeros(k + 1, dtype=torch.float64)
        rhs[k] = 1.0
        alpha = (torch.linalg.pinv(kkt) @ rhs)[:k]
        if (alpha < -tol).any() or abs(alpha.sum() - 1) > tol:
            continue
        u = J[S].T @ alpha
        if (J @ u >= u @ u - tol * scale).all():
            return u
    raise AssertionError("no support satisfies the KKT conditions")


def ref_bgk_sq(*args):
    """bgk_residuals_sq: the kinetic residual as its row sums of squares."""
    kinetic, conservation, consistency = ref_bgk(*args)
    return (kinetic * kinetic).sum(1), conservation, consistency


def ref_transport_sq(*args):
    """transport_mm_residuals_sq: (sum_j micro_ij^2, macro)."""
    _, micro, macro = ref_transport(*args)
    return (micro * micro).sum(1), macro
