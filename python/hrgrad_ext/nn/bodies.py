"""Fully connected network bodies (MLP and residual) with configurable width, depth and
activation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "AdaptiveTanh", "MLP", "ResNet", "make_body"]


class Sine(nn.Module):
    """``sin(x)`` as a module (SIREN-style activation)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


class AdaptiveTanh(nn.Module):
    """``tanh(n a z)`` with a trainable slope ``a`` of its own per layer, ``n = SCALE`` and ``a``
    initialised to ``1 / n`` (so that it starts as ``tanh``): the layer-wise adaptive activation
    of Jagtap, Kawaguchi & Karniadakis (Proc. R. Soc. A 476, 2020, doi:10.1098/rspa.2020.0334),
    without its slope-recovery loss term.

    Why: Adam moves each parameter by about the learning rate per step, so a tanh network that
    has to draw a front much steeper than at initialisation (a shock at small Kn) must grow many
    weights together over thousands of steps; a step on ``a`` changes the slope of a whole layer
    by ``n`` times the learning rate."""

    SCALE = 10.0

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0 / self.SCALE))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh((self.SCALE * self.a).to(x.dtype) * x)


#: Activation name -> module class (one module, and for "adaptive_tanh" one trainable slope,
#: per layer).
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "adaptive_tanh": AdaptiveTanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "sin": Sine,
    "softplus": nn.Softplus,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with ``activation``, then a linear output.

    Maps ``[..., in_dim]`` to ``[..., out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, width: int = 64, depth: int = 4, activation: str = "tanh"):
        super().__init__()
        if in_dim < 1 or out_dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLP: in_dim, out_dim, width and depth must be >= 1, got {in_dim}, {out_dim}, {width}, {depth}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), _activation(activation)]
            d = width
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)
        # one module per layer (a layer-wise adaptive activation has a slope of its own)
        self.act1 = _activation(activation)
        self.act2 = _activation(activation)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.act2(self.l2(self.act1(self.l1(h))))


class ResNet(nn.Module):
    """An input layer, ``depth`` residual blocks ``h + act(W2 act(W1 h))`` of ``width`` units,
    and a linear output. Maps ``[..., in_dim]`` to ``[..., out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, width: int = 128, depth: int = 3, activation: str = "tanh"):
        super().__init__()
        if in_dim < 1 or out_dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"ResNet: in_dim, out_dim, width and depth must be >= 1, got {in_dim}, {out_dim}, {width}, {depth}")
        self.inp = nn.Linear(in_dim, width)
        self.act = _activation(activation)
        self.blocks = nn.Sequential(*[_Block(width, activation) for _ in range(depth)])
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.blocks(self.act(self.inp(x))))


def make_body(kind: str, in_dim: int, out_dim: int, width: int, depth: int, activation: str) -> nn.Module:
    """``kind`` "mlp" or "resnet" -> the corresponding body."""
    if kind == "mlp":
        return MLP(in_dim, out_dim, width, depth, activation)
    if kind == "resnet":
        return ResNet(in_dim, out_dim, width, depth, activation)
    raise ValueError(f"unknown network body {kind!r}; expected 'mlp' or 'resnet'")
