"""What the loss-weighting methods share (ReLoBRaLo, GradNorm, SoftAdapt, learning-rate
annealing): state kept between steps as tensors, and, for those that weight by the task losses,
the losses of each step.

Each of these methods is a rule ``w_t = f(state_t, losses_t, gradients_t)`` followed by a state
update. Their state is a few ``[K]`` tensors (plus a step count), returned by ``state_dict()``
so that a checkpoint holds tensors only (it loads with ``weights_only=True``) and a resumed run
continues exactly. The update of the state is computed on the device with ``torch.where``: a
step whose losses or gradient norms are not finite leaves the state as it was (the trainer drops
that step's update), without a host synchronisation.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from ._base import GramianAggregator

__all__ = ["LossWeighting", "TensorState"]


class TensorState:
    """State between steps: the attributes named in ``_state``, each a tensor, ``None`` (before
    the first step) or a plain int."""

    _state: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        """The state (copies), as tensors and plain values."""
        out = {}
        for name in self._state:
            value = getattr(self, name)
            out[name] = value.detach().clone() if isinstance(value, Tensor) else value
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restores what :meth:`state_dict` returned."""
        if set(state) != set(self._state):
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected the keys {sorted(self._state)}, "
                             f"got {sorted(state)}")
        for name in self._state:
            value = state[name]
            if not (value is None or isinstance(value, (Tensor, int))) or isinstance(value, bool):
                raise TypeError(f"{type(self).__name__}.load_state_dict: {name} must be a tensor, an int or None, "
                                f"got {type(value).__name__}")
            setattr(self, name, value.detach().clone() if isinstance(value, Tensor) else value)

    def _state_to(self, device: torch.device) -> None:
        """Moves the state tensors to ``device`` (a checkpoint may have been loaded elsewhere)."""
        for name in self._state:
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.device != device:
                setattr(self, name, value.to(device))


class LossWeighting(TensorState, GramianAggregator):
    """A method whose weights come from the task losses (and at most the gradient norms, the
    diagonal of the Gram matrix). Give it the losses of each step with :meth:`observe_losses`
    before the step's aggregation; each aggregation uses them once, so a step without them
    raises instead of silently reusing the previous ones. Losses are taken to be >= 0 (means of
    squared residuals)."""

    needs_losses = True

    def __init__(self):
        self._losses: Tensor | None = None

    def observe_losses(self, losses: Tensor) -> None:
        losses = torch.as_tensor(losses)
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"{type(self).__name__}: the task losses must be a 1-D tensor [K], got shape "
                             f"{tuple(losses.shape)}")
        if not losses.is_floating_point():
            raise TypeError(f"{type(self).__name__}: the task losses must be floating point, got {losses.dtype}")
        self._losses = losses.detach()

    def weights_from_gram(self, G: Tensor) -> Tensor:
        name = type(self).__name__
        if self._losses is None:
            raise ValueError(f"{name} weights the task losses: give them before every aggregation with "
                             "observe_losses(losses) or aggregator(J, losses=...) (hrgrad_ext.backward, "
                             "hrgrad_ext.distributed.backward and the trainer do)")
        losses, self._losses = self._losses, None
        if G.dim() != 2 or G.shape[0] != G.shape[1]:
            raise ValueError(f"{name}: expected one Gram matrix [K, K], got shape {tuple(G.shape)}")
        K = G.shape[-1]
        if losses.numel() != K:
            raise ValueError(f"{name}: {losses.numel()} task losses for {K} task gradients")
        G = G.to(torch.float64)
        L = losses.to(G.device, torch.float64)
        self._state_to(G.device)
        ok = torch.isfinite(L).all() & torch.isfinite(G.diagonal()).all()
        return self._step(G, L, ok)

    @abstractmethod
    def _step(self, G: Tensor, losses: Tensor, ok: Tensor) -> Tensor:
        """The weights of this step (float64 ``[K]``) from the float64 Gram matrix and losses;
        updates the state where ``ok`` (a 0-d bool tensor: the step's numbers are finite)."""


def keep_if(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the step was finite, else ``old`` (no host synchronisation)."""
    return torch.where(ok, new, old)


def loss_ratio(losses: Tensor, reference: Tensor) -> Tensor:
    """``losses / reference``, 1 where the reference loss is 0 (a task that is already exact)."""
    safe = torch.where(reference > 0, reference, torch.ones_like(reference))
    return torch.where(reference > 0, losses / safe, torch.ones_like(losses))
