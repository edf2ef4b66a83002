"""Velocity quadrature rules as torch tensors."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ["gauss_legendre"]


def gauss_legendre(n: int, a: float, b: float, *, dtype: Optional[torch.dtype] = None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n``-point Gauss-Legendre nodes and weights on [a, b] (weights sum to b - a).

    Computed in float64 by numpy and then cast, so float32 rules are correctly rounded.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of quadrature nodes must be a positive integer, got {n!r}")
    if not b > a:
        raise ValueError(f"quadrature interval must have b > a, got [{a}, {b}]")
    x, w = np.polynomial.legendre.leggauss(int(n))
    half = 0.5 * (b - a)
    nodes = torch.as_tensor(half * x + 0.5 * (a + b), dtype=dtype or torch.get_default_dtype(),
                            device=device)
    weights = torch.as_tensor(half * w, dtype=dtype or torch.get_default_dtype(), device=device)
    return nodes, weights
