"""Buckets of task gradients and their reduction across ranks (torch.distributed collectives).

The parameters are grouped into *buckets* of about ``bucket_numel`` elements, in reverse order
(the gradients of the last layers are ready first in a backward pass, so their bucket can be
sent while the backward pass goes on, as in DDP). A bucket is a contiguous range of the
flattened parameters. For the sharded mode it is split into ``world_size`` equal *chunks*
(``ceil(numel / world_size)`` elements, the last ones padded with zeros): rank ``r`` owns chunk
``r`` of every bucket, wherever its boundaries fall, inside a tensor or not.

Task gradients arrive in *row blocks*: ``rows`` task rows of one parameter at a time (one task
after its own backward pass in :func:`hrgrad_ext.distributed.backward`; all K tasks of a
segmented backward pass in the trainer). A bucket's block is launched as one asynchronous
collective as soon as all its parameters have arrived:

* data-parallel: ``all_reduce`` (sum) of the block, laid out parameter by parameter so that
  the reduced Jacobian of each parameter is a contiguous ``[rows, *p.shape]`` view;
* sharded: ``reduce_scatter`` of the block laid out ``[world_size, rows, chunk]``, so that
  each rank receives the summed ``[rows, chunk]`` of its own chunk.

Each task's gradient is multiplied by its scale while it is copied into the bucket (``1 /
world_size`` for the mean over equal shares of points, ``n_local / n_global`` otherwise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Bucket", "Layout", "PeerFailureError", "TaskGradientReduction", "all_gather_into", "collective"]


class PeerFailureError(RuntimeError):
    """A collective failed: another rank stopped, died or timed out (or the group is broken)."""


def collective(what: str, fn, *args, **kwargs):
    """Runs a torch.distributed call; a failure becomes :class:`PeerFailureError` naming ``what``.

    A rank that raises or dies closes its connections, and its peers' pending collectives fail
    (gloo at once, NCCL at the process group's timeout); the error says so instead of leaving a
    bare transport message."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo/NCCL transport errors, timeouts
        raise PeerFailureError(
            f"{what} failed on rank {dist.get_rank()}: another rank probably stopped, died or timed out "
            f"(its own error, printed by that rank or the launcher, says why). Underlying error: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc


def _reduce_scatter(out: Tensor, inp: Tensor, group, async_op: bool):
    # torch 2.14 renamed reduce_scatter_tensor to reduce_scatter_single (same semantics)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _all_gather(out: Tensor, inp: Tensor, group, async_op: bool):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def all_gather_into(out: Tensor, inp: Tensor, group, what: str = "all_gather") -> None:
    """``out [world * m] <- concatenation over ranks of inp [m]`` (blocking)."""
    collective(what, _all_gather, out, inp, group, False)


@dataclass(frozen=True)
class Bucket:
    """A contiguous range of the flattened parameters.

    ``params``: parameter indices in the bucket's order, ``offsets``: where each starts in the
    bucket, ``numel``: its length, ``chunk``: each rank's share ``ceil(numel / world_size)``.
    ``pieces[i]``: ``(r, start, stop)`` for every piece of parameter ``i`` in rank ``r``'s
    chunk (bucket coordinates; a parameter across a chunk boundary has several pieces).
    """

    params: tuple[int, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    numel: int
    chunk: int
    pieces: dict

    def valid(self, rank: int) -> int:
        """Elements of rank ``rank``'s chunk that hold parameters (the rest is padding)."""
        return max(0, min(self.chunk, self.numel - rank * self.chunk))


class Layout:
    """Parameters of sizes ``numels`` in buckets of at most ``bucket_numel`` elements (a larger
    parameter gets a bucket of its own), each split into ``world_size`` chunks."""

    def __init__(self, numels: Sequence[int], world_size: int, bucket_numel: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if bucket_numel < 1:
            raise ValueError(f"bucket size must be >= 1 element, got {bucket_numel}")
        self.numels = [int(n) for n in numels]
        self.world_size = world_size
        groups: list[list[int]] = []
        size = 0
        for i in reversed(range(len(self.numels))):
            if self.numels[i] == 0:
                continue
            if not groups or size + self.numels[i] > bucket_numel:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += self.numels[i]
        self.buckets = [self._bucket(g) for g in groups]
        #: this rank's shard length: the sum of its chunks (padding included)
        self.shard_numel = sum(b.chunk for b in self.buckets)

    def _bucket(self, params: list[int]) -> Bucket:
        R = self.world_size
        numels = [self.numels[i] for i in params]
        offsets = [sum(numels[:j]) for j in range(len(params))]
        numel = sum(numels)
        chunk = -(-numel // R)
        pieces = {}
        for i, o, n in zip(params, offsets, numels):
            pieces[i] = tuple((r, max(r * chunk, o), min((r + 1) * chunk, o + n))
                              for r in range(o // chunk, min(R, -(-(o + n) // chunk))))
        return Bucket(tuple(params), tuple(offsets), tuple(numels), numel, chunk, pieces)

    def shard_offsets(self) -> list[int]:
        """Start of each bucket's chunk in a rank's shard."""
        return [sum(b.chunk for b in self.buckets[:j]) for j in range(len(self.buckets))]


class TaskGradientReduction:
    """One reduction of per-task gradients across the ranks of ``group``.

    Args:
        layout: the buckets (:class:`Layout` of the parameters, for this world size).
        shapes: the parameters' shapes.
        blocks: rows per row block (their sum is the number of task rows).
        sharded: reduce-scatter (sharded mode) instead of all-reduce (data-parallel).
        scales: per block, a float or a ``[rows]`` tensor multiplying the block's gradients.
        dtype, device: of the buffers (the gradients').

    :meth:`add` takes a block's gradient of one parameter (``[rows, *shape]``, or ``None``: a
    parameter that the block's losses do not reach, zeros); :meth:`finish` launches what is
    left, waits, and returns per parameter the reduced ``[T, *shape]`` (data-parallel) or per
    bucket this rank's ``[T, chunk]`` (sharded). ``bytes`` counts the collectives' payload
    (the full tensor each one reduces), ``wait_s`` the time spent blocked in :meth:`finish`.
    ``block_major``: the blocks arrive one after the other (see ``_sequence``).
    """

    def __init__(self, layout: Layout, shapes: Sequence[torch.Size], blocks: Sequence[int], sharded: bool,
                 scales: Sequence[float | Tensor], dtype: torch.dtype, device: torch.device, group=None,
                 block_major: bool = False):
        self.layout, self.shapes, self.blocks = layout, [torch.Size(s) for s in shapes], list(blocks)
        self.sharded, self.scales, self.group = sharded, list(scales), group
        self.dtype, self.device = dtype, torch.device(device)
        self.rank = dist.get_rank(group)
        self.rows = sum(self.blocks)
        self.row_start = [sum(self.blocks[:b]) for b in range(len(self.blocks))]
        self.bucket_of = {i: (j, k) for j, bk in enumerate(layout.buckets) for k, i in enumerate(bk.params)}
        nb = len(layout.buckets)
        self._missing = [[len(bk.params) for bk in layout.buckets] for _ in self.blocks]
        self._arrived = [[set() for _ in range(nb)] for _ in self.blocks]
        self._buffers: dict[tuple[int, int], Tensor] = {}
        self._works: list = []
        # Collectives must be issued in the same order on every rank, whatever order the
        # gradients arrive in (as DDP's reducer): a fixed sequence of (block, bucket), launched
        # as far as it is complete. Block-major when blocks arrive one after the other (one
        # backward pass per task), bucket-major when they arrive together (one pass for all).
        pairs = [(b, j) for b in range(len(self.blocks)) for j in range(nb)]
        self._sequence = pairs if block_major else sorted(pairs, key=lambda bj: (bj[1], bj[0]))
        self._next = 0
        self.bytes = 0
        self.wait_s = 0.0
        R = layout.world_size
        if sharded:
            # each rank's result: per bucket [T, chunk]; a block's rows are a contiguous view
            self.out = [torch.empty(self.rows, bk.chunk, dtype=dtype, device=device) for bk in layout.buckets]
        self._R = R

    # -- filling -----------------------------------------------------------------------------

    def _buffer(self, b: int, j: int) -> Tensor:
        buf = self._buffers.get((b, j))
        if buf is None:
            bk, rows = self.layout.buckets[j], self.blocks[b]
            if self.sharded:
                buf = torch.empty(self._R, rows, bk.chunk, dtype=self.dtype, device=self.device)
                for r in range(self._R):  # zero the padding only
                    v = bk.valid(r)
                    if v < bk.chunk:
                        buf[r, :, v:].zero_()
            else:
                buf = torch.empty(rows * bk.numel, dtype=self.dtype, device=self.device)
            self._buffers[(b, j)] = buf
        return buf

    def _scaled_into(self, dst: Tensor, src: Tensor | None, b: int) -> None:
        if src is None:
            dst.zero_()
            return
        scale = self.scales[b]
        if isinstance(scale, Tensor):
            torch.mul(src, scale.to(src.dtype).reshape(-1, *([1] * (src.dim() - 1))), out=dst)
        elif scale == 1.0:
            dst.copy_(src)
        else:
            torch.mul(src, scale, out=dst)

    def add(self, block: int, index: int, grad: Tensor | None) -> None:
        """Copies block ``block``'s gradient of parameter ``index`` (scaled) into its bucket;
        launches the bucket's collective when it is complete."""
        j, k = self.bucket_of[index]
        if index in self._arrived[block][j]:
            raise RuntimeError(f"gradient of parameter {index} for row block {block} given twice")
        rows = self.blocks[block]
        if grad is not None:
            grad = grad.detach().reshape(rows, -1)
        bk = self.layout.buckets[j]
        buf = self._buffer(block, j)
        if self.sharded:
            o = bk.offsets[k]
            for r, start, stop in bk.pieces[index]:
                dst = buf[r, :, start - r * bk.chunk:stop - r * bk.chunk]
                self._scaled_into(dst, None if grad is None else grad[:, start - o:stop - o], block)
        else:
            o, n = bk.offsets[k], bk.numels[k]
            self._scaled_into(buf[rows * o:rows * (o + n)].view(rows, n), grad, block)
        self._arrived[block][j].add(index)
        self._missing[block][j] -= 1
        seq = self._sequence
        while self._next < len(seq) and self._missing[seq[self._next][0]][seq[self._next][1]] == 0:
            self._launch(*seq[self._next])
            self._next += 1

    def _launch(self, b: int, j: int) -> None:
        buf = self._buffers[(b, j)]
        self.bytes += buf.numel() * buf.element_size()
        if self.sharded:
            out = self.out[j][self.row_start[b]:self.row_start[b] + self.blocks[b]]
            # gloo takes the flat form only: [world * rows * chunk] -> [rows * chunk]
            work = collective("reduce_scatter of task gradients", _reduce_scatter, out.view(-1), buf.view(-1),
                              self.group, True)
        else:
            work = collective("all_reduce of task gradients", dist.all_reduce, buf, group=self.group, async_op=True)
        self._works.append((work, b, j))

    # -- result ------------------------------------------------------------------------------

    def finish(self) -> list[Tensor]:
        """Launches the incomplete buckets (missing gradients are zeros), waits for every
        collective and returns the result (see the class docstring)."""
        for b in range(len(self.blocks)):
            for j, bk in enumerate(self.layout.buckets):
                if self._missing[b][j] > 0:
                    for i in bk.params:
                        if i not in self._arrived[b][j]:
                            self.add(b, i, None)
        t0 = time.perf_counter()
        for work, _, _ in self._works:
            collective("waiting for the reduction of task gradients", work.wait)
        self.wait_s += time.perf_counter() - t0
        if self.sharded:
            self._buffers.clear()  # the full local gradients are gone; only the chunks stay
            return self.out
        per_param: list[list[Tensor]] = [[] for _ in self.shapes]
        for b, rows in enumerate(self.blocks):
            for j, bk in enumerate(self.layout.buckets):
                buf = self._buffers[(b, j)]
                for i, o, n in zip(bk.params, bk.offsets, bk.numels):
                    per_param[i].append(buf[rows * o:rows * (o + n)].view(rows, *self.shapes[i]))
        self._buffers.clear()
        out = []
        for i, parts in enumerate(per_param):
            if not parts:  # an empty parameter
                out.append(torch.zeros(self.rows, *self.shapes[i], dtype=self.dtype, device=self.device))
            else:
                out.append(parts[0] if len(parts) == 1 else torch.cat(parts, 0))
        return out
