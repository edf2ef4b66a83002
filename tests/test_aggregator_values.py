"""Aggregator weights computed by hand on two small cases.

The property tests (test_aggregators.py) check directions, angles and invariances, which do
not see the length of an update: a Mean that sums, or an UPGrad that adds its projections up
instead of averaging them, passes them. Here the weights themselves are known:

* orthogonal gradients (no conflict): every projection method leaves them alone;
* two conflicting gradients g1 = (1, 0), g2 = (-1/2, 1) (g1 . g2 = -1/2, |g2|^2 = 5/4):
  PCGrad: g1 - (g1.g2 / |g2|^2) g2 = g1 + 2/5 g2 and g2 + 1/2 g1, summed: w = (3/2, 7/5);
  UPGrad: the same two projections (each lands on the other's half-space boundary, inside
  the dual cone), averaged: w = (3/4, 7/10);
  MGDA: a g1 + (1 - a) g2 of least norm, a = g2.(g2 - g1) / |g1 - g2|^2 = (7/4) / (13/4) = 7/13.
"""

import pytest
import torch

from hrgrad_ext import MGDA, Mean, PCGrad, Sum, UPGrad

ORTHOGONAL = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
CONFLICTING = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
# MGDA on orthogonal gradients: a_i proportional to 1 / |g_i|^2
_inv = torch.tensor([1.0, 1 / 4, 1 / 9], dtype=torch.float64)

CASES = [
    (Sum(), ORTHOGONAL, [1.0, 1.0, 1.0]),
    (Mean(), ORTHOGONAL, [1 / 3, 1 / 3, 1 / 3]),
    (PCGrad(), ORTHOGONAL, [1.0, 1.0, 1.0]),
    (UPGrad(), ORTHOGONAL, [1 / 3, 1 / 3, 1 / 3]),
    (MGDA(), ORTHOGONAL, (_inv / _inv.sum()).tolist()),
    (Sum(), CONFLICTING, [1.0, 1.0]),
    (Mean(), CONFLICTING, [0.5, 0.5]),
    (PCGrad(), CONFLICTING, [1.5, 1.4]),
    (UPGrad(), CONFLICTING, [0.75, 0.7]),
    (MGDA(), CONFLICTING, [7 / 13, 6 / 13]),
]


@pytest.mark.parametrize("agg,J,weights", CASES, ids=[f"{a!r}-{'orth' if J.shape[0] == 3 else 'conflict'}"
                                                      for a, J, _ in CASES])
def test_weights_and_update_by_hand(agg, J, weights):
    w = torch.tensor(weights, dtype=torch.float64)
    torch.testing.assert_close(agg.weights(J).double(), w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(agg(J).double(), w @ J, rtol=1e-9, atol=1e-12)
