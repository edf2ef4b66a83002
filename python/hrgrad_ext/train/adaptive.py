"""Residual-based adaptive sampling of the interior points and BGK's cells (config ``adaptive``).

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

The same law places BGK's space-time cells of the integral conservation residual (``groups``
with ``"cells"``): a cell is one unit of ``4 q`` points (the quadrature nodes of its edges,
:meth:`~hrgrad_ext.train.losses.BGKFormulation.residual_scores`), scored by its squared cell
residual and drawn whole, so that the cells gather at the shock, where the conservative jump
is what the networks miss.
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
    """RAD on a pool of points per point group (see the module docstring).

    Args:
        every: steps between two pool refreshes (>= 1).
        pool: pool size as a multiple of the units (points, or BGK's cells) per task (>= 1).
        k, c: the density's exponent and constant (>= 0).
        groups: the point groups placed this way (``"interior"``; ``"cells"`` for BGK with
            its integral conservation residual on).

    The pools (points and probabilities) are part of the trainer's checkpoint, so a resumed run
    draws the same points as an uninterrupted one.
    """

    def __init__(self, every: int = 100, pool: int = 8, k: float = 1.0, c: float = 1.0,
                 groups: tuple[str, ...] | list[str] = ("interior",)):
        if every < 1 or pool < 1 or not (k >= 0 and c >= 0):
            raise ValueError(f"adaptive: need every >= 1, pool >= 1, k >= 0, c >= 0; got {every}, {pool}, {k}, {c}")
        if not groups or len(set(groups)) != len(groups):
            raise ValueError(f"adaptive.groups: need distinct point groups, got {groups!r}")
        self.every, self.pool_factor, self.k, self.c = int(every), int(pool), float(k), float(c)
        self.groups = tuple(groups)
        # per group: {"t", "x"} [K, M units x unit points] float64 on the CPU, and the units'
        # probabilities [K, M]
        self.points: dict[str, dict[str, Tensor]] = {}
        self.probs: dict[str, Tensor] = {}
        self.built_at = -1

    @torch.no_grad()
    def refresh(self, model, form, gen: torch.Generator, eps: Tensor, step: int, device, dtype) -> None:
        """Draws new pools from ``form``'s densities, group by group, and scores them with ``model``."""
        K = eps.shape[0]
        for group in self.groups:
            pts = form.sample(group, gen, K, self.pool_factor * form.points[group], eps)
            inp = {key: val.to(device=device, dtype=dtype) for key, val in pts.items()}
            inp["eps"] = eps.to(device=device, dtype=dtype)
            flat = form.forward_tasks(group, model, inp, "fast")
            scores = form.residual_scores(group, flat, inp, K)
            self.points[group] = {key: val.to(torch.float64) for key, val in pts.items()}
            self.probs[group] = rad_probabilities(scores.cpu(), self.k, self.c)
        self.built_at = int(step)

    def due(self, step: int) -> bool:
        return not self.points or step - self.built_at >= self.every

    def draw(self, gen: torch.Generator, batch: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
        """``batch`` (per group: ``t``, ``x`` ``[K, n]`` and ``eps``) with the points of each of
        this sampler's groups replaced by as many drawn from its pool, whole units at a time."""
        out = dict(batch)
        for group in self.groups:
            probs, pool = self.probs[group], self.points[group]
            have = batch[group]
            unit = pool["t"].shape[1] // probs.shape[1]  # points per unit (1, or a cell's 4 q)
            idx = torch.multinomial(probs, have["t"].shape[1] // unit, replacement=False, generator=gen)
            idx = (idx.unsqueeze(-1) * unit + torch.arange(unit)).flatten(1)
            drawn = dict(have)
            for key, val in pool.items():
                drawn[key] = val.gather(1, idx).to(device=have[key].device, dtype=have[key].dtype)
            out[group] = drawn
        return out

    def state_dict(self) -> dict:
        return {"points": self.points, "probs": self.probs, "built_at": self.built_at}

    def load_state_dict(self, state: dict) -> None:
        points, probs = state["points"], state["probs"]
        if probs is None:  # saved before the first refresh
            points, probs = {}, {}
        elif isinstance(probs, Tensor):  # a checkpoint from before the per-group pools: the interior's
            points, probs = {"interior": points}, {"interior": probs}
        self.points, self.probs, self.built_at = dict(points), dict(probs), int(state["built_at"])
