"""Taylor mode for the network bodies: a value and its input derivatives in one forward pass.

The loss of an APNN needs the macro networks' t and x derivatives at every point (and, with the
Chapman-Enskog term of the BGK model, two of their second derivatives). ``torch.func.jvp`` gives
them exactly, but each of its operations pays the functorch layers (vmapped over the tangent
directions, nested for second derivatives, inside the training's vmap over per-task
parameters): on 256 points the three 64-wide macro MLPs took 36 ms for the nested jvp against
9 ms here (one thread), 1.4 ms for a plain forward. A :class:`Jet` carries the derivatives
through each layer by the chain rule instead, as a handful of ordinary tensor operations, so
that autograd (and vmap) see a plain forward pass.

Only what the bodies of :mod:`hrgrad_ext.nn.bodies` are made of is covered (linear layers, the
activations of :data:`~hrgrad_ext.nn.bodies.ACTIVATIONS`, MLP, ResNet); anything else raises.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bodies import MLP, AdaptiveTanh, ResNet, Sine

__all__ = ["Jet", "body_jet", "jet_of", "ACTIVATION_DERIVATIVES"]


class Jet(NamedTuple):
    """A function of the point coordinates and its derivatives at the points.

    ``value`` ``[...]``; ``first`` ``[D, ...]``, the derivatives along the D input directions;
    ``second`` ``[P, ...]``, the second derivatives along the direction pairs ``pairs`` (indices
    into the D directions), or None when only first derivatives are carried."""

    value: Tensor
    first: Tensor
    second: Tensor | None = None
    pairs: tuple[tuple[int, int], ...] = ()

    def map(self, d0: Tensor, d1: Tensor, d2: Tensor | None) -> "Jet":
        """``g(self)`` for an elementwise g given ``g, g', g''`` at ``self.value`` (``d2`` only
        needed with second derivatives)."""
        first = d1 * self.first
        second = None
        if self.second is not None:
            second = torch.stack([d2 * self.first[i] * self.first[j] for i, j in self.pairs]) + d1 * self.second
        return Jet(d0, first, second, self.pairs)

    def __add__(self, other: "Jet") -> "Jet":
        second = None if self.second is None else self.second + other.second
        return Jet(self.value + other.value, self.first + other.first, second, self.pairs)

    def __mul__(self, other: "Jet") -> "Jet":
        a, b = self, other
        first = a.first * b.value + a.value * b.first
        second = None
        if a.second is not None:
            cross = torch.stack([a.first[i] * b.first[j] + a.first[j] * b.first[i] for i, j in a.pairs])
            second = a.second * b.value + cross + a.value * b.second
        return Jet(a.value * b.value, first, second, a.pairs)

    def squeeze(self, dim: int) -> "Jet":
        """The jet of ``value.squeeze(dim)`` (``dim`` counted on ``value``, negative)."""
        return Jet(self.value.squeeze(dim), self.first.squeeze(dim),
                   None if self.second is None else self.second.squeeze(dim), self.pairs)


def _linear(layer: nn.Linear, j: Jet) -> Jet:
    # derivatives are linear in the input: the weight without the bias
    return Jet(layer(j.value), F.linear(j.first, layer.weight),
               None if j.second is None else F.linear(j.second, layer.weight), j.pairs)


# Each rule takes the value from the module itself, so that a jet's value is bit for bit the
# module's output.
def _tanh(module, z, second):
    a = module(z)
    d1 = 1.0 - a * a
    return a, d1, (-2.0 * a * d1 if second else None)


def _adaptive_tanh(module, z, second):
    s = (module.SCALE * module.a).to(z.dtype)
    a = module(z)
    d1 = s * (1.0 - a * a)
    return a, d1, (-2.0 * s * a * d1 if second else None)


def _sin(module, z, second):
    s = module(z)
    return s, torch.cos(z), (-s if second else None)


def _silu(module, z, second):
    sig = torch.sigmoid(z)
    d1 = sig * (1.0 + z * (1.0 - sig))
    return module(z), d1, (sig * (1.0 - sig) * (2.0 + z * (1.0 - 2.0 * sig)) if second else None)


def _gelu(module, z, second):
    if module.approximate != "none":
        raise NotImplementedError("Jet: GELU with approximate != 'none'")
    cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
    pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
    return module(z), cdf + z * pdf, (pdf * (2.0 - z * z) if second else None)


def _softplus(module, z, second):
    # torch's softplus is linear above its threshold (beta z > threshold), in value and derivative
    beta, threshold = module.beta, module.threshold
    linear = beta * z > threshold
    sig = torch.sigmoid(beta * z)
    value = module(z)
    d1 = torch.where(linear, torch.ones_like(z), sig)
    d2 = torch.where(linear, torch.zeros_like(z), beta * sig * (1.0 - sig)) if second else None
    return value, d1, d2


#: activation module class -> ``(module, z, second) -> (g(z), g'(z), g''(z) or None)``; every
#: entry of :data:`~hrgrad_ext.nn.bodies.ACTIVATIONS` has one (a test holds them to that)
ACTIVATION_DERIVATIVES = {
    nn.Tanh: _tanh,
    AdaptiveTanh: _adaptive_tanh,
    Sine: _sin,
    nn.SiLU: _silu,
    nn.GELU: _gelu,
    nn.Softplus: _softplus,
}


def body_jet(module: nn.Module, j: Jet) -> Jet:
    """The jet of ``module(x)`` given the jet of its input ``x`` (``[..., in_dim]``), for the
    bodies of :mod:`hrgrad_ext.nn.bodies` and their layers."""
    if isinstance(module, nn.Linear):
        return _linear(module, j)
    if isinstance(module, nn.Sequential):
        for layer in module:
            j = body_jet(layer, j)
        return j
    if isinstance(module, MLP):
        return body_jet(module.net, j)
    if isinstance(module, ResNet):
        h = body_jet(module.act, _linear(module.inp, j))
        for block in module.blocks:
            inner = body_jet(block.act2, _linear(block.l2, body_jet(block.act1, _linear(block.l1, h))))
            h = h + inner
        return _linear(module.out, h)
    rule = ACTIVATION_DERIVATIVES.get(type(module))
    if rule is None:
        raise NotImplementedError(f"Jet: no derivative rule for {type(module).__name__}")
    return j.map(*rule(module, j.value, j.second is not None))


def jet_of(fn, primals: tuple[Tensor, ...], pairs: tuple[tuple[int, int], ...] = ()) -> tuple[Jet, ...]:
    """Jets of ``fn(*primals)`` (a tuple of tensors, each output element depending on the
    same element of the primals) along each primal, by ``torch.func.jvp`` (nested for the
    second derivatives of ``pairs``). For cheap parameter-free functions (a model's fixed
    boundary and initial-data frame); the networks go through :func:`body_jet`."""
    def unit(i):
        return tuple(torch.ones_like(p) if k == i else torch.zeros_like(p) for k, p in enumerate(primals))

    def along(i):
        return lambda *p: torch.func.jvp(fn, p, unit(i))

    # forward mode cannot make an expanded (stride-0) view dual, as [n, V] coordinates are
    primals = tuple(p.clone() for p in primals)
    D = len(primals)
    value = fn(*primals)
    firsts = [along(i)(*primals)[1] for i in range(D)]
    seconds = []
    for i, k in pairs:
        # d_k of (d_i fn): the tangent of the tangent
        seconds.append(torch.func.jvp(lambda *p: along(i)(*p)[1], primals, unit(k))[1])
    out = []
    for m, v in enumerate(value):
        first = torch.stack([f[m] for f in firsts])
        second = torch.stack([s[m] for s in seconds]) if pairs else None
        out.append(Jet(v, first, second, tuple(pairs)))
    return tuple(out)
