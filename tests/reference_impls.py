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
