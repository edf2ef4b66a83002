"""Common parts of the problem definitions: point samplers and scoring against references."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .._checks import is_integer

__all__ = ["KineticProblem", "relative_l2"]

TaskValues = Union[None, float, Sequence[float], torch.Tensor]


def relative_l2(pred, ref) -> float:
    """``sqrt(sum (ref - pred)^2 / sum ref^2)`` in float64 (the spec's error measure)."""
    p = torch.as_tensor(pred).detach().to("cpu", torch.float64).reshape(-1).numpy()
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    if p.shape != r.shape:
        raise ValueError(f"prediction has {p.size} values, reference {r.size}")
    return float(np.sqrt(np.sum((r - p) ** 2) / np.sum(r * r)))


def _task_list(eps: TaskValues) -> Optional[list[float]]:
    if eps is None:
        return None
    vals = torch.as_tensor(eps, dtype=torch.float64).reshape(-1).tolist()
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ValueError(f"task parameters (eps / Kn) must be finite and > 0, got {eps!r}")
    return vals


class KineticProblem:
    """Base class: a space-time box ``[0, t_final] x [x_range]`` with point samplers.

    Every sampler returns a tensor of (t, x) rows, shape ``(n, 2)``.  Given ``eps`` (one value or
    a sequence of K values: the task set) it returns ``(K * m, 3)`` rows (t, x, eps) instead, in
    task-major order: rows ``k*m : (k+1)*m`` belong to task ``eps[k]`` and hold the same (t, x)
    points for every task (so per-task losses see identical collocation points).  Random numbers
    come from ``generator`` (a ``torch.Generator``) for reproducibility.
    """

    x_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, t_final: float, dtype: Optional[torch.dtype] = None, device=None):
        if not (isinstance(t_final, (int, float)) and math.isfinite(t_final) and t_final > 0):
            raise ValueError(f"t_final must be a number > 0, got {t_final!r}")
        self.t_final = float(t_final)
        self.dtype = dtype or torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._refs: dict = {}

    @property
    def t_range(self) -> tuple[float, float]:
        return (0.0, self.t_final)

    # -- sampling ----------------------------------------------------------------------------
    def _uniform(self, n: int, lo: float, hi: float, generator) -> torch.Tensor:
        dev = generator.device if generator is not None else self.device
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev)
        return (lo + (hi - lo) * u).to(self.device, self.dtype)

    def _with_tasks(self, pts: torch.Tensor, eps: TaskValues) -> torch.Tensor:
        tasks = _task_list(eps)
        if tasks is None:
            return pts
        col = torch.tensor(tasks, dtype=self.dtype, device=self.device)
        col = col.repeat_interleave(pts.shape[0])[:, None]
        return torch.cat([pts.repeat(len(tasks), 1), col], dim=1)

    @staticmethod
    def _check_n(n) -> int:
        if not is_integer(n, 1):
            raise ValueError(f"number of points must be a positive integer, got {n!r}")
        return int(n)

    def sample_interior(self, n: int, generator: Optional[torch.Generator] = None,
                        eps: TaskValues = None) -> torch.Tensor:
        """``n`` uniform points of ``(0, t_final] x (x_min, x_max)``."""
        n = self._check_n(n)
        t = self._uniform(n, 0.0, self.t_final, generator)
        x = self._uniform(n, *self.x_range, generator)
        return self._with_tasks(torch.stack([t, x], dim=1), eps)

    def sample_boundary(self, n: int, generator: Optional[torch.Generator] = None,
                        eps: TaskValues = None) -> torch.Tensor:
        """``2 n`` points: ``n`` uniform times at ``x_min`` followed by ``n`` at ``x_max``."""
        n = self._check_n(n)
        t = self._uniform(2 * n, 0.0, self.t_final, generator)
        x = torch.full((2 * n,), self.x_range[0], dtype=self.dtype, device=self.device)
        x[n:] = self.x_range[1]
        return self._with_tasks(torch.stack([t, x], dim=1), eps)

    def sample_initial(self, n: int, generator: Optional[torch.Generator] = None,
                       eps: TaskValues = None) -> torch.Tensor:
        """``n`` uniform points of ``{0} x (x_min, x_max)``."""
        n = self._check_n(n)
        x = self._uniform(n, *self.x_range, generator)
        return self._with_tasks(torch.stack([torch.zeros_like(x), x], dim=1), eps)

    # -- scoring -----------------------------------------------------------------------------
    def reference(self, eps: float):
        raise NotImplementedError

    def _reference_fields(self, ref) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _predicted_fields(self, pred: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model_fn: Callable, eps: float) -> dict[str, float]:
        """Relative L2 errors of ``model_fn`` against ``reference(eps)`` at ``t_final``, on the
        reference's own grid (its cell centres), as a dict of floats.

        ``model_fn(t, x, eps)`` gets 1-D tensors ``t`` (all equal to t_final) and ``x`` of the
        problem's dtype and device, and the float ``eps``; it returns a dict of tensors with
        one value per point (any shape with that many elements).  No torch.no_grad() is applied,
        so a model that differentiates internally still works; outputs are detached.
        """
        ref = self.reference(eps)
        x = torch.as_tensor(np.asarray(ref.x), dtype=self.dtype, device=self.device)
        t = torch.full_like(x, self.t_final)
        pred = model_fn(t, x, float(eps))
        if not isinstance(pred, Mapping):
            raise TypeError("model_fn must return a dict of tensors")
        fields = self._predicted_fields(pred)
        want = self._reference_fields(ref)
        return {k: relative_l2(fields[k], want[k]) for k in want}
