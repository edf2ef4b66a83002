"""Drop-in: the BGK residuals of an existing APNN loss, replaced by one fused op.

An APNN for the BGK equation (Euler scaling, 1D in x and v) has a network F(t, x, v) for the
distribution function and a network for the macroscopic fields (rho, u, T)(t, x). Its loss
penalises, at every collocation point and velocity node,

    kinetic      = kn (F_t + v F_x) - (M[rho, u, T] - F)
    conservation = (rho, rho u, E)_t + (sum w v F_x, sum w v^2 F_x, 1/2 sum w v^3 F_x)
    consistency  = (rho, rho u, E) - (sum w F, sum w v F, 1/2 sum w v^2 F)

Below, ``residuals_before`` is how such a loss is written in plain PyTorch; ``residuals_after``
is the same loss with ``hrgrad_ext.ops.bgk_residuals`` (one fused forward kernel and one fused
backward kernel instead of dozens of element-wise ops). Nothing else in the loss changes: the
network, the input derivatives (autograd with create_graph) and the optimiser stay as they are.
The script checks that both give the same loss and the same parameter gradients, and prints
the time of a forward + backward of each.

    python docs/examples/bgk_residual_dropin.py [--points 4096] [--velocities 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import hrgrad_ext


class BGKModel(nn.Module):
    """F(t, x, v) and (rho, u, T)(t, x): the two networks of a BGK APNN (tiny here)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.f_net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
        self.macro_net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 3))

    def macro(self, t, x):
        out = self.macro_net(torch.stack([t, x], dim=-1))
        rho = nn.functional.softplus(out[:, 0]) + 0.1
        u = out[:, 1]
        T = nn.functional.softplus(out[:, 2]) + 0.1
        return rho, u, T

    def f(self, t, x, v):  # t, x [N, V] (the points repeated on the velocity grid), v [V]
        tv = torch.stack([t, x, v.expand_as(t)], dim=-1)
        return nn.functional.softplus(self.f_net(tv).squeeze(-1))


def fields(model, t, x, v):
    """Network values and their input derivatives (reverse mode, create_graph), as any APNN
    loss computes them."""
    N, V = t.shape[0], v.shape[0]
    t = t.detach().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    rho, u, T = model.macro(t, x)
    rho_t, u_t, T_t = (torch.autograd.grad(q.sum(), t, create_graph=True)[0] for q in (rho, u, T))
    tg = t.detach()[:, None].expand(N, V).clone().requires_grad_(True)
    xg = x.detach()[:, None].expand(N, V).clone().requires_grad_(True)
    F = model.f(tg, xg, v)
    Ft, Fx = torch.autograd.grad(F.sum(), (tg, xg), create_graph=True)
    return F, Ft, Fx, rho, u, T, rho_t, u_t, T_t


# ---- before: the residuals in plain PyTorch -------------------------------------------------
def residuals_before(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    M = rho[:, None] / torch.sqrt(2 * math.pi * T[:, None]) * torch.exp(-((v - u[:, None]) ** 2) / (2 * T[:, None]))
    kinetic = kn[:, None] * (Ft + v * Fx) - (M - F)
    E = rho * (u**2 + T) / 2
    mom_t = rho_t * u + rho * u_t
    E_t = rho_t * (u**2 + T) / 2 + rho * (2 * u * u_t + T_t) / 2
    conservation = torch.stack(
        [rho_t + (w * v * Fx).sum(1), mom_t + (w * v**2 * Fx).sum(1), E_t + 0.5 * (w * v**3 * Fx).sum(1)], dim=1
    )
    consistency = torch.stack(
        [rho - (w * F).sum(1), rho * u - (w * v * F).sum(1), E - 0.5 * (w * v**2 * F).sum(1)], dim=1
    )
    return kinetic, conservation, consistency


# ---- after: one fused op (same arguments, same outputs) -------------------------------------
def residuals_after(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    return hrgrad_ext.ops.bgk_residuals(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)


def apnn_loss(residuals, model, t, x, v, w, kn):
    kinetic, conservation, consistency = residuals(*fields(model, t, x, v), v, w, kn)
    return (kinetic**2).mean() + (conservation**2).mean() + (consistency**2).mean()


def loss_and_grads(residuals, model, t, x, v, w, kn):
    model.zero_grad(set_to_none=True)
    loss = apnn_loss(residuals, model, t, x, v, w, kn)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def time_step(residuals, model, t, x, v, w, kn, repeats: int) -> float:
    loss_and_grads(residuals, model, t, x, v, w, kn)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        loss_and_grads(residuals, model, t, x, v, w, kn)
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=4096, help="collocation points N")
    parser.add_argument("--velocities", type=int, default=64, help="velocity nodes V")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward + backward passes of each")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = BGKModel().to(dtype)
    t = torch.rand(args.points, dtype=dtype) * 0.1
    x = torch.rand(args.points, dtype=dtype) * 2 - 1
    v, w = hrgrad_ext.ops.gauss_legendre(args.velocities, -10.0, 10.0, dtype=dtype)
    kn = torch.full((args.points,), 1e-2, dtype=dtype)  # per point: rows may belong to different tasks

    loss_b, grads_b = loss_and_grads(residuals_before, model, t, x, v, w, kn)
    loss_a, grads_a = loss_and_grads(residuals_after, model, t, x, v, w, kn)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=0.0)
    for p_a, p_b in zip(grads_a, grads_b):
        torch.testing.assert_close(p_a, p_b, rtol=rtol, atol=rtol * max(1.0, p_b.abs().max().item()))
    print(f"loss: plain PyTorch {loss_b.item():.12e}  hrgrad_ext.ops.bgk_residuals {loss_a.item():.12e}  (equal)")
    print(f"parameter gradients: equal to rtol {rtol:g} ({len(grads_a)} tensors)")

    before = time_step(residuals_before, model, t, x, v, w, kn, args.repeats)
    after = time_step(residuals_after, model, t, x, v, w, kn, args.repeats)
    print(
        f"forward + backward of the whole loss (N={args.points}, V={args.velocities}, {args.dtype}, "
        f"{torch.get_num_threads()} threads): plain PyTorch {before * 1e3:.2f} ms, fused op {after * 1e3:.2f} ms "
        f"(the networks and input derivatives are the same in both and dominate at small V)"
    )


if __name__ == "__main__":
    main()
