"""Plain-PyTorch float64 reference implementations the kernels are tested against."""

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
