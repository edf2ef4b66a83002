"""``hrgrad_ext.backward``: the multi-task counterpart of ``loss.backward()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .aggregators import Aggregator, GramianAggregator, HRGrad, SolverAggregator
from .ops.gram import Status, combine_into_grads, gram_of_list

__all__ = ["BackwardResult", "aggregate_jacobians", "aggregator_status", "backward", "task_diagnostics"]


@dataclass
class BackwardResult:
    """What one aggregated backward pass did (tensors stay on the device; nothing is synced).

    Attributes:
        weights: ``[K]`` float64, the update is ``sum_k weights[k] * grad(loss_k)``.
        gram: ``[K, K]`` float64 Gram matrix of the task gradients.
        norms: ``[K]`` task gradient norms.
        cosines: ``[K, K]`` cosines between task gradients (0 where a gradient is zero).
        update_cosines: ``[K]`` cosine between the update and each task gradient.
        update_norm: 0-d norm of the update.
        status: int32 :class:`~hrgrad_ext.ops.Status` flags of the solver aggregators (HRGrad,
            UPGrad, MGDA), else ``None``.
        names: the task names, in the order of the rows above: the keys of a mapping of
            losses, ``"0"``, ``"1"``, ... for a sequence.

    The ``named_*`` properties give the same per task by name (0-d tensors, still unsynced).
    """

    weights: Tensor
    gram: Tensor
    norms: Tensor
    cosines: Tensor
    update_cosines: Tensor
    update_norm: Tensor
    status: Tensor | None = None
    names: tuple[str, ...] | None = None

    def _names(self) -> tuple[str, ...]:
        return self.names if self.names is not None else tuple(str(k) for k in range(self.weights.shape[0]))

    @property
    def named_weights(self) -> dict[str, Tensor]:
        """``{task: weight}``: the update is ``sum_task weight * grad(loss_task)``."""
        return dict(zip(self._names(), self.weights.unbind(0)))

    @property
    def named_norms(self) -> dict[str, Tensor]:
        """``{task: norm of its gradient}``."""
        return dict(zip(self._names(), self.norms.unbind(0)))

    @property
    def named_update_cosines(self) -> dict[str, Tensor]:
        """``{task: cosine between the update and the task's gradient}``."""
        return dict(zip(self._names(), self.update_cosines.unbind(0)))

    @property
    def named_cosines(self) -> dict[str, dict[str, Tensor]]:
        """``{task_a: {task_b: cosine between their gradients}}``."""
        names = self._names()
        return {a: dict(zip(names, row.unbind(0))) for a, row in zip(names, self.cosines.unbind(0))}

    @property
    def fallback_used(self) -> bool:
        """True when HRGrad had to leave the equal-angle solution (reads the status: syncs)."""
        return self.status is not None and bool(int(self.status) & int(Status.FALLBACK))

    @property
    def conflicting(self) -> bool:
        """True when some pair of task gradients conflicts (negative cosine; syncs)."""
        return bool((self.cosines < 0).any())


def task_diagnostics(
    G: Tensor, w: Tensor, status: Tensor | None = None, names: Sequence[str] | None = None
) -> BackwardResult:
    """Cosines and norms of the task gradients and of the update ``J^T w``, from ``G`` alone."""
    G = G.to(torch.float64)
    w = w.to(torch.float64)
    norms = G.diagonal().clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = G / (safe[:, None] * safe[None, :])
    cos = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.zeros_like(cos))
    Gw = G @ w
    update_norm = (w @ Gw).clamp_min(0).sqrt()
    denom = safe * torch.where(update_norm > 0, update_norm, torch.ones_like(update_norm))
    update_cos = torch.where((norms > 0) & (update_norm > 0), Gw / denom, torch.zeros_like(Gw))
    return BackwardResult(w, G, norms, cos, update_cos, update_norm, status, None if names is None else tuple(names))


def backward(
    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
    params: Iterable[Tensor],
    aggregator: Aggregator | None = None,
    retain_graph: bool = False,
) -> BackwardResult:
    """Aggregates the gradients of several task losses into ``.grad``, like ``loss.backward()``.

    Computes each loss's gradient with respect to ``params`` (one reverse pass per loss over
    the shared graph), combines them with ``aggregator`` (default :class:`HRGrad`), and
    *accumulates* the result into ``p.grad`` of every parameter. Parameters that a loss does
    not reach get a zero gradient from it. For a Gramian-based aggregator the per-parameter
    gradients are never concatenated: the Gram matrix is a sum of per-parameter Gram matrices
    and the update is written into each ``.grad`` by a fused kernel.

    Args:
        losses: K scalar losses: a mapping ``{name: loss}`` (the result then reports the
            weights and cosines by name, see :class:`BackwardResult`), a sequence, or a 1-D
            tensor.
        params: the parameters to differentiate (e.g. ``model.parameters()``).
        aggregator: any :class:`~hrgrad_ext.aggregators.Aggregator` (loss-weighting ones
            get ``losses`` through ``observe_losses``).
        retain_graph: keep the graph after the last reverse pass.

    Returns a :class:`BackwardResult` with the weights and conflict diagnostics.
    """
    losses, names = check_losses(losses)
    params = check_params(params)
    aggregator = aggregator if aggregator is not None else HRGrad()

    K = len(losses)
    per_task = []
    for k, loss in enumerate(losses):
        keep = retain_graph or k < K - 1
        grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
        per_task.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    jacobians = [torch.stack([per_task[k][i] for k in range(K)]) for i in range(len(params))]

    if aggregator.needs_losses:
        aggregator.observe_losses(torch.stack([loss.detach().reshape(()) for loss in losses]))
    G, w, status = aggregate_jacobians(aggregator, jacobians)
    combine_into_grads(jacobians, w, params)
    return task_diagnostics(G, w, status, names)


def check_losses(losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
                 op: str = "backward") -> tuple[list[Tensor], tuple[str, ...] | None]:
    """``(losses, names)``: the task losses as a list of scalar tensors that require grad
    (clear errors otherwise) and their names (the keys of a mapping, else ``None``)."""
    names = None
    if isinstance(losses, Mapping):
        names = tuple(str(name) for name in losses)
        losses = list(losses.values())
    elif isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"{op}: a tensor of losses must be 1-D, got shape {tuple(losses.shape)}")
        losses = list(losses.unbind(0))
    losses = list(losses)
    if not losses:
        raise ValueError(f"{op}: no losses given")
    labels = names if names is not None else range(len(losses))
    for k, loss in zip(labels, losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"{op}: loss {k!r} must be a scalar tensor")
        if not loss.requires_grad:
            raise ValueError(f"{op}: loss {k!r} does not require grad (is it detached from the model?)")
    return losses, names


def check_params(params: Iterable[Tensor], op: str = "backward") -> list[Tensor]:
    """The parameters as a non-empty list of tensors that require grad."""
    params = [p for p in params]
    if not params:
        raise ValueError(f"{op}: no parameters given")
    if any(not p.requires_grad for p in params):
        raise ValueError(f"{op}: every parameter must require grad")
    return params


def aggregate_jacobians(aggregator: Aggregator, jacobians: Sequence[Tensor]):
    """``(G, w, status)`` for per-parameter Jacobians ``[K, *p.shape]``.

    Gramian aggregators work from the sum of per-parameter Gram matrices (``J`` is never
    concatenated); the others get the concatenated ``J``. ``G`` is float64, ``w`` the weights
    (``update = J^T w``), ``status`` the :class:`~hrgrad_ext.ops.Status` flags of a solver
    aggregator (HRGrad, UPGrad, MGDA) or ``None``.
    """
    if isinstance(aggregator, GramianAggregator):
        G = gram_of_list(jacobians)
        w = aggregator.weights_from_gram(G)
    else:
        K = jacobians[0].shape[0]
        J = torch.cat([Jp.reshape(K, -1) for Jp in jacobians], dim=1)
        J64 = J.to(torch.float64)
        G = J64 @ J64.T
        w = aggregator.weights(J)
    return G, w, aggregator_status(aggregator)


def aggregator_status(aggregator: Aggregator) -> Tensor | None:
    """The :class:`~hrgrad_ext.ops.Status` flags of the last call of a solver aggregator (HRGrad,
    UPGrad, MGDA), else ``None``."""
    return aggregator.last_status if isinstance(aggregator, SolverAggregator) else None
