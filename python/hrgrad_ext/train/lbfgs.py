"""The L-BFGS fine-tuning phase of a training run (``[lbfgs]`` in the config).

After the optimizer steps, :class:`LBFGSPhase` minimises the weighted loss ``sum_i w_i L_i`` of
a fixed, larger batch with :class:`torch.optim.LBFGS` (strong Wolfe line search). ``w`` is what
the run's aggregator gives on that batch when it is drawn (for HRGrad: the weights of the
equal-angle direction at that point), raised to a positive floor (:func:`frozen_weights`), then
frozen: a line search needs one fixed objective,
which an aggregated direction that changes with every evaluation is not. Every
``resample_every`` steps a new batch is drawn, the weights are taken again and the L-BFGS
history restarts.

Each step of the phase is one ``LBFGS.step`` call of up to ``inner`` iterations; its state (the
curvature pairs, the batch and the weights) is part of the run's checkpoints (tensors and plain
values), so an interrupted phase resumes exactly. A step that produces a non-finite loss or
parameters is undone (parameters restored, history dropped) and handed to the run's divergence
policy like any other.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..backward import aggregate_jacobians
from .segmented import segmented_task_gradients

__all__ = ["LBFGSPhase", "frozen_weights"]


def frozen_weights(w: Tensor, min_weight: float) -> Tensor:
    """The aggregator's weights ``w`` [T] made fit for a fixed objective ``sum_i w_i L_i``: each
    raised to at least ``min_weight`` times the mean of their positive parts. A negative weight
    would make the objective unbounded below (``LBFGSConfig`` says more)."""
    positive = w.clamp_min(0)
    if not bool(positive.sum() > 0):
        raise ValueError(f"L-BFGS phase: the aggregator gave no positive weight ({w.tolist()}); "
                         f"no weighted loss to minimise")
    return w.clamp_min(min_weight * float(positive.sum()) / w.numel())


class LBFGSPhase:
    """The L-BFGS phase of ``trainer`` (a :class:`~hrgrad_ext.train.trainer.Trainer`)."""

    def __init__(self, trainer):
        self.tr = trainer
        self.cfg = trainer.cfg.lbfgs
        self.optimizer = self._new_optimizer()
        self.batch: dict | None = None
        self.weights: Tensor | None = None
        self.batch_step = -1  # the phase step at which the batch was drawn
        self.losses: Tensor | None = None  # the task losses of the last evaluation

    def _new_optimizer(self) -> torch.optim.LBFGS:
        return torch.optim.LBFGS(self.tr.params, lr=1.0, max_iter=self.cfg.inner, max_eval=self.cfg.inner * 5 // 4 + 25,
                                 history_size=self.cfg.history, tolerance_grad=0.0, tolerance_change=0.0,
                                 line_search_fn="strong_wolfe")

    @contextlib.contextmanager
    def _points_times(self, factor: int):
        form = self.tr.form
        saved = dict(form.points)
        form.points = {g: n * factor for g, n in saved.items()}
        try:
            yield
        finally:
            form.points = saved

    def start(self) -> None:
        """At the first step of the phase: continue from the parameter average, if there is one."""
        tr = self.tr
        if tr.ema is not None:
            with torch.no_grad():
                for p, a in zip(tr.params, tr.ema):
                    p.copy_(a)

    def _draw(self, phase_step: int) -> None:
        """A new batch, the aggregator's weights on it, a fresh L-BFGS history."""
        tr = self.tr
        with self._points_times(self.cfg.points):
            self.batch = tr.sampler.sample(tr.form, tr.eps_tensor, tr.device, tr.dtype)
        losses, _, jac = segmented_task_gradients(tr.model, tr.form, self.batch, tr.layout, losses_fn=tr.losses_fn)
        agg = tr.aggregator
        if agg.needs_losses:
            agg.observe_losses(losses)
        jac = [torch.nan_to_num(j, 0.0, 0.0, 0.0) for j in jac]
        _, w, _ = aggregate_jacobians(agg, jac)
        self.weights = frozen_weights(w.detach(), self.cfg.min_weight).to(tr.device, tr.dtype)
        self.batch_step = phase_step
        self.optimizer = self._new_optimizer()

    def _objective(self) -> Tensor:
        tr = self.tr
        K = len(tr.layout.eps)
        expanded = [[p.unsqueeze(0).expand(K, *p.shape) for p in tr.params] for _ in range(tr.losses_fn.copies)]
        losses, _ = tr.losses_fn(expanded, self.batch)
        self.losses = losses.detach()
        return (self.weights * losses).sum()

    def step(self, phase_step: int):
        """One step of the phase: ``(losses [T], w [T], finite [T + 1], objective)``; a
        non-finite step leaves the parameters as they were."""
        if self.batch is None or (self.cfg.resample_every and phase_step - self.batch_step >= self.cfg.resample_every):
            self._draw(phase_step)
        tr = self.tr
        saved = [p.detach().clone() for p in tr.params]

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            objective = self._objective()
            objective.backward()
            return objective

        objective = self.optimizer.step(closure)
        task_ok = torch.isfinite(self.losses)
        ok = bool(torch.isfinite(objective)) and all(bool(torch.isfinite(p).all()) for p in tr.params)
        if not ok:
            with torch.no_grad():
                for p, s in zip(tr.params, saved):
                    p.copy_(s)
            self.optimizer = self._new_optimizer()
        if tr.ema is not None:  # the phase's iterates are not averaged: evaluate the current ones
            with torch.no_grad():
                for a, p in zip(tr.ema, tr.params):
                    a.copy_(p)
        finite = torch.cat([task_ok, torch.tensor([ok], device=task_ok.device)])
        return self.losses, self.weights, finite, float(objective.detach())

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "batch": self.batch, "weights": self.weights,
                "batch_step": self.batch_step}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.batch, self.weights, self.batch_step = state["batch"], state["weights"], int(state["batch_step"])
