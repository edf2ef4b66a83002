"""vmap rules of the ops (``torch.func.vmap``, nested vmap, ``vmap`` of ``grad``/``jacrev``).

Every op of the library already works on a batch: the gram family on a leading batch
dimension ``[B, K, n]``, the kinetic family on rows ``[N, V]``. So a vmapped dimension is
folded into that batch (one kernel call for the whole vmap) instead of PyTorch's fallback of
one call per batch entry. Nested vmap applies the rules level by level.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _to_front(x: Tensor, bdim: int | None, batch: int) -> Tensor:
    return x.movedim(bdim, 0) if bdim is not None else x.expand(batch, *x.shape)


def _outputs(outs, lead: Sequence[int]):
    """Un-flattens the leading dimension of every output into ``lead``; out_dims 0."""

    def unflatten(o: Tensor) -> Tensor:
        return o.reshape(*lead, *o.shape[1:])

    if isinstance(outs, Tensor):
        return unflatten(outs), 0
    return tuple(unflatten(o) for o in outs), (0,) * len(outs)


def register_leading_batch_rule(op, bases: Sequence[int | None]) -> None:
    """vmap rule of a gram-family op. ``bases[i]`` is the unbatched rank of tensor argument
    ``i`` (``J [K, n]``: 2, ``w [K]``: 1) or ``None`` for a non-tensor argument; a tensor with
    one more dimension carries the op's own batch dimension, which the vmapped one joins."""

    def rule(info, in_dims, *args, **kwargs):
        batch = info.batch_size
        moved = [a if base is None else _to_front(a, d, batch) for a, d, base in zip(args, in_dims, bases)]
        first = next(i for i, base in enumerate(bases) if base is not None)
        lead = tuple(moved[first].shape[: moved[first].dim() - bases[first]])
        flat = [a if base is None else a.reshape(-1, *a.shape[len(lead):]) for a, base in zip(moved, bases)]
        return _outputs(op(*flat, **kwargs), lead)

    torch.library.register_vmap(op, rule)


# Argument kinds of the kinetic ops: rows first ([N, ...]: fields, per-row values and their
# gradients), nodes (v, w: [V], the same for every row), a per-row parameter that may be 0-d
# (kn, eps), or anything else (the moment order).
ROWS, NODES, PARAM, OTHER = "rows", "nodes", "param", "other"


def register_row_fold_rule(op, kinds: Sequence[str]) -> None:
    """vmap rule of a kinetic op: the vmapped dimension is folded into the rows, so a vmap
    over B problems of N rows is one call with B * N rows. Only batched quadrature nodes
    (a different velocity grid per batch entry) take one call per entry."""

    def rule(info, in_dims, *args, **kwargs):
        batch = info.batch_size
        if any(d is not None for d, k in zip(in_dims, kinds) if k == NODES):
            per_entry = [
                op(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)], **kwargs)
                for b in range(batch)
            ]
            if isinstance(per_entry[0], Tensor):
                return torch.stack(per_entry), 0
            return tuple(torch.stack(o) for o in zip(*per_entry)), (0,) * len(per_entry[0])
        first = kinds.index(ROWS)
        rows = _to_front(args[first], in_dims[first], batch).shape[1]
        flat = []
        for a, d, k in zip(args, in_dims, kinds):
            if k == ROWS or (k == PARAM and a.dim() - (d is not None) == 1):
                a = _to_front(a, d, batch)
                a = a.reshape(batch * rows, *a.shape[2:])
            elif k == PARAM and d is not None:  # a 0-d parameter that differs per batch entry
                a = a.movedim(d, 0).unsqueeze(1).expand(batch, rows).reshape(batch * rows)
            flat.append(a)
        return _outputs(op(*flat, **kwargs), (batch, rows))

    torch.library.register_vmap(op, rule)


def register_refusal(op, why: str) -> None:
    """vmap of an op that cannot be batched: a clear error instead of a wrong result."""
    name = op.name()

    def rule(info, in_dims, *args, **kwargs):
        raise RuntimeError(f"{name} does not support torch.vmap: {why}")

    torch.library.register_vmap(op, rule)
