"""The explicit eps encoding (the "hidden representation" of the Knudsen number)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["EpsEncoding"]


class EpsEncoding(nn.Module):
    """Maps eps > 0 to a feature vector that every eps-dependent network receives as input.

    The base feature is the normalised logarithm ``z = 2 (log10 eps - lo) / (hi - lo) - 1``,
    which lies in [-1, 1] for eps in [10^lo, 10^hi] (eps spans many decades, so a linear
    input would squash all small values to 0). Optional extras:

    * ``fourier`` > 0 appends ``sin(k pi z), cos(k pi z)`` for k = 1..fourier, letting the
      network resolve regime changes that are sharp in log eps;
    * ``embed_dim`` > 0 appends ``tanh(A phi + b)``, a small learned embedding of the features
      ``phi`` above.

    Args:
        log10_min, log10_max: the range of log10 eps mapped to [-1, 1] (usually the task set's).
        fourier: number of Fourier frequencies.
        embed_dim: width of the learned embedding (0: none).

    ``forward(eps)`` takes eps of any shape ``[...]`` and returns ``[..., out_dim]``.
    """

    def __init__(self, log10_min: float = -8.0, log10_max: float = 0.0, fourier: int = 0, embed_dim: int = 0):
        super().__init__()
        if not (math.isfinite(log10_min) and math.isfinite(log10_max)) or log10_max < log10_min:
            raise ValueError(f"EpsEncoding: need finite log10_min <= log10_max, got {log10_min}, {log10_max}")
        if fourier < 0 or embed_dim < 0:
            raise ValueError("EpsEncoding: fourier and embed_dim must be >= 0")
        self.log10_min = float(log10_min)
        self.log10_max = float(log10_max)
        self.fourier = int(fourier)
        self.embed_dim = int(embed_dim)
        base = 1 + 2 * self.fourier
        self.embed = nn.Linear(base, self.embed_dim) if self.embed_dim > 0 else None
        self.out_dim = base + self.embed_dim
        # k pi for k = 1..fourier; a buffer so that it follows .to(device, dtype)
        self.register_buffer("freqs", math.pi * torch.arange(1, self.fourier + 1, dtype=torch.float32), persistent=False)

    def normalised(self, eps: Tensor) -> Tensor:
        """``z`` in [-1, 1] for eps in the configured range (0 when the range is one point)."""
        span = self.log10_max - self.log10_min
        if span == 0.0:
            return torch.zeros_like(eps)
        return (torch.log10(eps) - self.log10_min) * (2.0 / span) - 1.0

    def forward(self, eps: Tensor) -> Tensor:
        z = self.normalised(eps).unsqueeze(-1)
        feats = [z]
        if self.fourier:
            arg = z * self.freqs.to(z.dtype)
            feats += [torch.sin(arg), torch.cos(arg)]
        phi = torch.cat(feats, -1) if len(feats) > 1 else z
        if self.embed is not None:
            phi = torch.cat([phi, torch.tanh(self.embed(phi))], -1)
        return phi

    def extra_repr(self) -> str:
        return (f"log10 range [{self.log10_min:g}, {self.log10_max:g}], fourier={self.fourier}, "
                f"embed_dim={self.embed_dim}, out_dim={self.out_dim}")
