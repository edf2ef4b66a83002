"""HRGrad with PyTorch Lightning manual optimisation.

Lightning's automatic optimisation calls ``loss.backward()`` on one loss. HRGrad needs the
named task losses, so the LightningModule switches to manual optimisation
(``automatic_optimization = False``) and calls ``hrgrad_ext.backward`` in ``training_step``
between ``optimizer.zero_grad()`` and ``optimizer.step()``. Logging, checkpoints and the
Trainer work as usual; the weights and update cosines of the tasks are logged by name.

Scope: one process, float32/float64. ``hrgrad_ext.backward`` calls ``torch.autograd.grad``
itself, so Lightning's ``manual_backward`` (loss scaling of mixed precision, DDP gradient
sync) is not involved; for several processes use ``hrgrad_ext.distributed`` (docs/DISTRIBUTED.md).

Same tasks as hrgrad_training_loop.py (steady linear transport at two eps plus the boundary).
Needs ``pip install lightning``; without it the script says so and exits 0.

    python docs/examples/hrgrad_lightning.py [--steps 200] [--points 256]
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import lightning as L
except ImportError:  # pragma: no cover - depends on the environment
    L = None

import torch

import hrgrad_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hrgrad_training_loop import TransportNet, boundary_loss, interior_loss  # noqa: E402


def make_module_class():
    class TransportAPNN(L.LightningModule):
        def __init__(self, velocities: int, eps_values=(1.0, 1e-2), lr: float = 2e-3):
            super().__init__()
            self.automatic_optimization = False  # the multi-task backward is ours
            self.model = TransportNet().double()
            v, w = hrgrad_ext.ops.gauss_legendre(velocities, dtype=torch.float64)
            self.register_buffer("v", v)
            self.register_buffer("w", w)
            self.eps_values = eps_values
            self.lr = lr
            self.aggregator = hrgrad_ext.HRGrad()

        def task_losses(self, x):
            out = {f"interior eps={e:g}": interior_loss(self.model, x, self.v, self.w, e) for e in self.eps_values}
            out["boundary"] = boundary_loss(self.model, self.v, self.eps_values)
            return out

        def training_step(self, batch, batch_idx):
            (x,) = batch
            losses = self.task_losses(x.double())
            opt = self.optimizers()
            opt.zero_grad()
            info = hrgrad_ext.backward(losses, self.model.parameters(), aggregator=self.aggregator)
            opt.step()
            for name, loss in losses.items():
                self.log(f"loss/{name}", loss.detach())
            for name, weight in info.named_weights.items():
                self.log(f"weight/{name}", weight)
            for name, cos in info.named_update_cosines.items():
                self.log(f"cos/{name}", cos)

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    return TransportAPNN


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--velocities", type=int, default=16)
    args = parser.parse_args(argv)
    if L is None:
        print("skipped: PyTorch Lightning is not installed (pip install lightning)")
        return

    torch.manual_seed(0)
    module = make_module_class()(args.velocities)
    points = torch.rand(args.steps * args.points, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(points), batch_size=args.points, shuffle=True)
    x_eval = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    first = {k: float(l.detach()) for k, l in module.task_losses(x_eval).items()}
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, loader)
    last = {k: float(l.detach()) for k, l in module.task_losses(x_eval).items()}
    for k in first:
        print(f"{k:>20s}: {first[k]:.3e} -> {last[k]:.3e}")
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("weight/")}
    print("last HRGrad weights:", ", ".join(f"{k[7:]}: {v:.3f}" for k, v in logged.items()))
    worse = [k for k in first if last[k] >= first[k]]
    if worse:
        raise SystemExit(f"losses did not decrease: {worse}")


if __name__ == "__main__":
    main()
