"""HRGrad in a plain PyTorch training loop with named losses.

The only change to an ordinary loop is the backward call: instead of ``sum(losses).backward()``
the named task losses go to ``hrgrad_ext.backward``, which writes a non-conflicting update into
``.grad`` (every task's loss decreases to first order), and reports the weight and cosine of
each task by name. Optimiser, scheduler, gradient clipping and checkpoints stay as they are.

The tasks here are the steady linear transport equation ``v f_x = (<f> - f) / eps`` on the
rod ``0 < x < 1`` with inflow ``f = 1`` at ``x = 0`` (``v > 0``) and ``f = 0`` at ``x = 1`` (``v < 0``),
for two values of eps (a kinetic and a near-diffusive regime) plus the boundary condition:
three losses that pull one small network in different directions.

    python docs/examples/hrgrad_training_loop.py [--steps 300] [--points 256]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import hrgrad_ext


class TransportNet(nn.Module):
    """f(x, v, eps): one network for every eps (eps is an input, as in an APNN)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x, v, eps):  # x [N, V], v [V], eps float -> f [N, V]
        e = torch.full_like(x, eps)
        return self.net(torch.stack([x, v.expand_as(x), e.log10()], dim=-1)).squeeze(-1)


def interior_loss(model, x, v, w, eps):
    N, V = x.shape[0], v.shape[0]
    xg = x[:, None].expand(N, V).clone().requires_grad_(True)
    f = model(xg, v, eps)
    (f_x,) = torch.autograd.grad(f.sum(), xg, create_graph=True)
    average = (w * f).sum(1, keepdim=True) / w.sum()
    residual = eps * v * f_x - (average - f)
    return (residual**2).mean()


def boundary_loss(model, v, eps_values):
    V = v.shape[0]
    loss = 0.0
    for eps in eps_values:
        left = model(torch.zeros(1, V, dtype=v.dtype), v, eps)[0]
        right = model(torch.ones(1, V, dtype=v.dtype), v, eps)[0]
        loss = loss + ((left - 1)[v > 0] ** 2).mean() + (right[v < 0] ** 2).mean()
    return loss / len(eps_values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--points", type=int, default=256, help="interior collocation points per step")
    parser.add_argument("--velocities", type=int, default=16)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = torch.float64
    model = TransportNet().to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    v, w = hrgrad_ext.ops.gauss_legendre(args.velocities, dtype=dtype)
    eps_values = (1.0, 1e-2)
    aggregator = hrgrad_ext.HRGrad()

    def losses_at(x):
        out = {f"interior eps={eps:g}": interior_loss(model, x, v, w, eps) for eps in eps_values}
        out["boundary"] = boundary_loss(model, v, eps_values)
        return out

    x_eval = torch.linspace(0.01, 0.99, 64, dtype=dtype)
    first = {k: float(l.detach()) for k, l in losses_at(x_eval).items()}
    for step in range(args.steps):
        x = torch.rand(args.points, dtype=dtype)
        losses = losses_at(x)
        optimizer.zero_grad(set_to_none=True)
        # was: sum(losses.values()).backward()
        info = hrgrad_ext.backward(losses, model.parameters(), aggregator=aggregator)
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            weights = ", ".join(f"{k}: {float(v_):.3f}" for k, v_ in info.named_weights.items())
            cosines = ", ".join(f"{k}: {float(c):+.3f}" for k, c in info.named_update_cosines.items())
            print(f"step {step:4d}  weights [{weights}]  cos(update, task) [{cosines}]")

    last = {k: float(l.detach()) for k, l in losses_at(x_eval).items()}
    for k in first:
        print(f"{k:>20s}: {first[k]:.3e} -> {last[k]:.3e}")
    # HRGrad's update never conflicts with a task: at this step size every task improves.
    worse = [k for k in first if last[k] >= first[k]]
    if worse:
        raise SystemExit(f"losses did not decrease: {worse}")


if __name__ == "__main__":
    main()
