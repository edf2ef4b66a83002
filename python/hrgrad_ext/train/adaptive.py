"""Residual-based adaptive sampling of the interior points (config ``adaptive``).

RAD, the residual-based adaptive distribution of Wu, Zhu, Tan, Kartha & Lu ("A comprehensive
study of non-adaptive and residual-based adaptive sampling for physics-informed neural
networks", CMAME 403, 2023): the collocation points are drawn with density

    p(x) ~ r(x)^k / E[r(x)^k] + c

where ``r`` is the point's residual loss under the current network, so that points gather where
the equation is least satisfied (BGK's fronts, transport's inflow layer) while ``c`` keeps a
share of the base density everywhere. ``k = 1, c = 1`` are the paper's recommended defaults
(half the mass on the base density, half proportional to the residual).

Here the density is realised on a pool: every ``every`` steps ``pool * n`` interior points per
task are drawn from the formulation's own sampling density (uniform, or transport's front and
wall-layer placement), their per-point interior loss evaluated once without a gradient, and until
the next refresh each step takes its ``n`` points per task from that pool, without replacement,
with the probabilities above. Each step thus still sees a fresh subset of points at the cost of
one forward pass over the pool every ``every`` steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rad_probabilities", "ResidualSampler"]


def rad_probabilities(rows: Tensor, k: float, c: float) -> Tensor:
    """Per-task sampling probabilities ``[K, M]`` of pool points with residual losses ``rows``
    ``[K, M]`` (>= 0): ``r^k / mean(r^k) + c``, normalised per task. A task whose residuals are
    all zero (with ``c = 0``) or not finite falls back to equal probabilities: its losses then
    say nothing about where to put the points (a non-finite loss is the divergence guard's
    business, reported there)."""
    r = rows.double().clamp(min=0.0) ** k
    mean = r.mean(1, keepdim=True)
    dens = torch.where(mean > 0, r / mean, torch.zeros_like(r)) + c
    total = dens.sum(1, keepdim=True)
    ok = torch.isfinite(total) & (total > 0)
    return torch.where(ok, dens / total.where(ok, torch.ones_like(total)), torch.full_like(dens, 1.0 / r.shape[1]))


class ResidualSampler:
    """RAD on a pool of interior points (see the module docstring).

    Args:
        every: steps between two pool refreshes (>= 1).
        pool: pool size as a multiple of the interior points per task (>= 1).
        k, c: the density's exponent and constant (>= 0).

    The pool (points and probabilities) is part of the trainer's checkpoint, so a resumed run
    draws the same points as an uninterrupted one.
    """

    def __init__(self, every: int = 100, pool: int = 8, k: float = 1.0, c: float = 1.0):
        if every < 1 or pool < 1 or not (k >= 0 and c >= 0):
            raise ValueError(f"adaptive: need every >= 1, pool >= 1, k >= 0, c >= 0; got {every}, {pool}, {k}, {c}")
        self.every, self.pool_factor, self.k, self.c = int(every), int(pool), float(k), float(c)
        self.points: dict[str, Tensor] | None = None  # {"t", "x"}: [K, M] float64, CPU
        self.probs: Tensor | None = None  # [K, M]
        self.built_at = -1

    @torch.no_grad()
    def refresh(self, model, form, gen: torch.Generator, eps: Tensor, step: int, device, dtype) -> None:
        """Draws a new pool from ``form``'s interior density and scores it with ``model``."""
        K, n = eps.shape[0], form.points["interior"]
        pts = form.sample("interior", gen, K, self.pool_factor * n, eps)
        inp = {k: v.to(device=device, dtype=dtype) for k, v in pts.items()}
        inp["eps"] = eps.to(device=device, dtype=dtype)
        flat = form.forward_tasks("interior", model, inp, "fast")
        rows = form.interior_rows(flat, inp, K).reshape(K, -1)
        self.points = {key: val.to(torch.float64) for key, val in pts.items()}
        self.probs = rad_probabilities(rows.cpu(), self.k, self.c)
        self.built_at = int(step)

    def due(self, step: int) -> bool:
        return self.points is None or step - self.built_at >= self.every

    def draw(self, gen: torch.Generator, interior: dict[str, Tensor]) -> dict[str, Tensor]:
        """``interior`` (a batch's group: ``t``, ``x`` ``[K, n]`` and ``eps``) with its points
        replaced by ``n`` per task drawn from the pool."""
        n = interior["t"].shape[1]
        idx = torch.multinomial(self.probs, n, replacement=False, generator=gen)
        out = dict(interior)
        for key, val in self.points.items():
            out[key] = val.gather(1, idx).to(device=interior[key].device, dtype=interior[key].dtype)
        return out

    def state_dict(self) -> dict:
        return {"points": self.points, "probs": self.probs, "built_at": self.built_at}

    def load_state_dict(self, state: dict) -> None:
        self.points, self.probs, self.built_at = state["points"], state["probs"], int(state["built_at"])
