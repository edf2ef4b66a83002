"""Per-task time windows: the end time t_final of each task's window, looked up from eps.

The tasks of a multi-eps run need not share one time window. The anchor trains linear transport
on t in [0, 0.1] for small eps but on [0, 1] for eps = 1: at eps = 1 and t = 0.1 the solution
is still a thin transport wedge next to the inflow wall (behind the incompatible corner of the
data), while by t = 1 it fills the slab. The window of a task enters in two places: its points
are drawn in [0, t_final(eps)], and the networks see time scaled by that window, so every task
uses the whole time input range.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["TimeWindows", "nearest_in_log10"]


def nearest_in_log10(keys: Sequence[float], eps: float) -> int:
    """Index of the key nearest to ``eps`` in log10 (the first on a tie): how a table keyed by
    eps (time windows, group weights) gives a value to every task eps."""
    le = math.log10(eps)
    return min(range(len(keys)), key=lambda k: abs(math.log10(keys[k]) - le))


class TimeWindows(nn.Module):
    """``t_final`` per task eps; at other eps, the window of the task nearest in log10 eps.

    ``TimeWindows(eps, t_final)`` with ``t_final`` one number (every task) or one per eps.
    ``windows(eps_tensor)`` returns a tensor of window ends shaped like ``eps_tensor`` (works
    under ``torch.func`` transforms), or a float when all windows are equal (the common case,
    which keeps the arithmetic of a single window). ``windows.end(eps)`` is the float version.
    """

    def __init__(self, eps: Sequence[float], t_final: float | Sequence[float]):
        super().__init__()
        eps = [float(e) for e in eps]
        if not eps or any(not (math.isfinite(e) and e > 0) for e in eps):
            raise ValueError(f"TimeWindows: eps must be a non-empty list of finite numbers > 0, got {eps}")
        ends = [float(t_final)] * len(eps) if isinstance(t_final, (int, float)) else [float(t) for t in t_final]
        if len(ends) != len(eps):
            raise ValueError(f"t_final: give one number or one per eps ({len(eps)}), got {len(ends)} values")
        if any(not (math.isfinite(t) and t > 0) for t in ends):
            raise ValueError(f"t_final: every window end must be a finite number > 0, got {ends}")
        self.eps = eps
        self.ends = ends
        self.constant = ends[0] if all(t == ends[0] for t in ends) else None
        self.register_buffer("_log_eps", torch.tensor([math.log10(e) for e in eps], dtype=torch.float64), persistent=False)
        self.register_buffer("_ends", torch.tensor(ends, dtype=torch.float64), persistent=False)

    @property
    def longest(self) -> float:
        return max(self.ends)

    def _nearest(self, eps: float) -> int:
        return nearest_in_log10(self.eps, eps)

    def end(self, eps: float) -> float:
        """The window end of ``eps`` as a float."""
        return self.ends[self._nearest(float(eps))] if self.constant is None else self.constant

    def forward(self, eps: Tensor) -> Tensor | float:
        if self.constant is not None:
            return self.constant
        log_eps = self._log_eps.to(eps.dtype)
        dist = (torch.log10(eps).unsqueeze(-1) - log_eps).abs()
        # a one-hot pick rather than indexing, so that it batches under vmap
        pick = (dist.argmin(-1).unsqueeze(-1) == torch.arange(len(self.ends), device=eps.device)).to(eps.dtype)
        return (pick * self._ends.to(eps.dtype)).sum(-1)

    def extra_repr(self) -> str:
        return ", ".join(f"eps={e:g}: {t:g}" for e, t in zip(self.eps, self.ends))
