"""The interface every aggregator implements, its input checks, and the method registry."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Callable, TypeVar

import torch
from torch import Tensor

from ..ops.gram import combine, gram

__all__ = ["AGGREGATORS", "Aggregator", "GramianAggregator", "check_matrix", "make_aggregator", "register"]

#: Method name (as in ``method = "..."`` of a training config and ``--method`` of the CLI) ->
#: aggregator class. Filled by :func:`register` when the method's module is imported.
AGGREGATORS: dict[str, type["Aggregator"]] = {}

A = TypeVar("A", bound=type)


def register(name: str) -> Callable[[A], A]:
    """Class decorator: makes an aggregator available as method ``name`` to the training
    config, the CLI and :func:`make_aggregator`. Constructor keyword arguments become the
    method's options (``aggregator.<name>.<option>`` in a config); a constructor parameter named
    ``seed`` receives the run's seed unless the options set it."""

    def decorate(cls: A) -> A:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator method {name!r} is already registered ({AGGREGATORS[name].__name__})")
        AGGREGATORS[name] = cls
        return cls

    return decorate


def make_aggregator(method: str, options: dict | None = None, seed: int = 0) -> "Aggregator":
    """The aggregator registered as ``method``, built with ``options`` (its constructor's
    keyword arguments) and, if it takes one, ``seed``."""
    try:
        cls = AGGREGATORS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(AGGREGATORS)}") from None
    kwargs = dict(options or {})
    if "seed" in inspect.signature(cls).parameters:
        kwargs.setdefault("seed", seed)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"aggregator options for {method!r}: {exc}") from None


def check_matrix(J) -> None:
    """Raises a clear error unless ``J`` is a floating-point ``[K, n]`` tensor with K, n >= 1."""
    if not isinstance(J, Tensor):
        raise TypeError(f"aggregator input must be a torch.Tensor, got {type(J).__name__}")
    if J.dim() != 2:
        raise ValueError(f"aggregator input must be a matrix [K, n], got shape {tuple(J.shape)}")
    if J.shape[0] == 0 or J.shape[1] == 0:
        raise ValueError(f"aggregator input must have K >= 1 tasks and n >= 1 parameters, got {tuple(J.shape)}")
    if not J.is_floating_point():
        raise TypeError(f"aggregator input must be floating point, got {J.dtype}")


class Aggregator(ABC):
    """Maps task gradients ``J [K, n]`` to one update ``[n]``.

    Loss-weighting methods (ReLoBRaLo, GradNorm, SoftAdapt) also need each step's task losses:
    they have ``needs_losses = True`` and take them through :meth:`observe_losses` (or the
    ``losses`` argument of ``__call__``) before the step's :meth:`weights`. Methods that keep
    state between steps (those, and learning-rate annealing) advance it once per call of
    :meth:`weights`: call it once per optimisation step.
    """

    #: Whether :meth:`weights` needs the task losses of the step (see :meth:`observe_losses`).
    needs_losses: bool = False

    def __call__(self, J: Tensor, losses: Tensor | None = None) -> Tensor:
        check_matrix(J)
        if losses is not None:
            self.observe_losses(losses)
        return combine(J, self.weights(J).to(J.dtype))

    def observe_losses(self, losses: Tensor) -> None:
        """Takes the task losses ``[K]`` of the step whose gradients are aggregated next.

        :func:`hrgrad_ext.backward`, :func:`hrgrad_ext.distributed.backward` and the trainer
        call it before every aggregation; methods that do not weight by the losses ignore it.
        """

    @abstractmethod
    def weights(self, J: Tensor) -> Tensor:
        """Weights ``w [K]`` (float64) with ``update = J^T w``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GramianAggregator(Aggregator):
    """An aggregator whose weights are a function of the Gram matrix ``J J^T`` alone."""

    def weights(self, J: Tensor) -> Tensor:
        check_matrix(J)
        return self.weights_from_gram(gram(J, dtype=torch.float64))

    @abstractmethod
    def weights_from_gram(self, G: Tensor) -> Tensor:
        """Weights ``w [K]`` from the Gram matrix ``G [K, K]``."""
