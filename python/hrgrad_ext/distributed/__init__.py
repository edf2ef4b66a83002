"""Exact multi-task aggregation across processes with ``torch.distributed`` (gloo, NCCL).

Each rank holds its own share of every task's points. The update must be the one a single
process would compute on the *global* batch: aggregating each rank's local task gradients
separately and averaging the updates is a different algorithm (HRGrad of a mean is not the
mean of HRGrads). So the per-task gradients are summed across ranks *before* aggregation:

``mode="data_parallel"`` (every rank holds the whole model)
    The K local task gradients are all-reduced in buckets (task k's buckets are sent while the
    backward pass of task k + 1 runs), scaled so that each task loss is the mean over all
    ranks' points. Every rank then has the same global Jacobian and computes the same Gram
    matrix, weights and update (bit for bit: a reduced tensor is identical on every rank).
    Communication: K times the gradient bytes of plain DDP.
``mode="sharded"`` (ZeRO / FSDP style)
    The task gradients are reduce-scattered, so each rank keeps the global task gradients of
    its own chunk of the flattened parameters only (``K * n / world_size`` numbers: the memory
    for task gradients falls as ``1 / world_size``). The Gram matrix is a sum over parameter
    chunks: each rank computes the partial Gram matrix of its chunk and only that ``K x K``
    matrix is all-reduced. The weights are then identical on every rank, and each rank
    computes the update of its own chunk. Communication: K reduce-scatters, K^2 numbers, and
    an all-gather of the update (or, with a :class:`Shard`, of the updated parameters).
    Needs a Gramian aggregator (HRGrad, Sum, Mean, PCGrad, UPGrad, MGDA); a matrix-based one
    (ConFIG) needs the whole ``K x n`` matrix on one rank and is refused.

Uneven shares: by default every rank is assumed to hold the same number of points of each
task, and each local loss is the mean over the rank's own points; the global task loss is then
the mean of the local ones. With ``num_points`` (this rank's count per task) the global loss is
``sum_r n_r L_r / sum_r n_r``, the mean over all points, for any split (a rank may hold no
point of a task). A loss that is not a mean over points (a sum, say) needs its own scaling.

A model wrapped in ``DistributedDataParallel`` needs nothing of DDP's gradient reduction:
DDP's reducer acts on gradients that ``.backward()`` accumulates into ``.grad``, while this
function computes the task gradients with ``torch.autograd.grad``, which the reducer does not
see, and writes an update that is already identical on every rank. So call it on the losses of
the wrapped model as they are (tested with the default DDP options), preferably inside
``ddp_model.no_sync()`` (which also skips DDP's per-forward bookkeeping), or use
``ddp_model.module`` / do not wrap at all. What the reducer must not do is reduce the same
step again: do not also call ``.backward()`` through the DDP model in that step (it would
all-reduce ``.grad``, the update included: K + 1 times the bytes, for nothing). Models sharded
by FSDP (``fully_shard`` / ``FullyShardedDataParallel``) are refused: their registered
parameters are shards and their gradients reach the all-gathered copies through FSDP's own
hooks, out of ``torch.autograd.grad``'s sight. Use an unwrapped model with ``mode="sharded"``,
which shards what FSDP's ZeRO-2 level shards (task gradients and, through :class:`Shard`, the
optimizer state) while the parameters stay replicated for the forward pass.
``docs/DISTRIBUTED.md`` has examples.

Every collective is a ``torch.distributed`` call on ``group`` (default: the world); there is no
process-group code here. A collective that fails because another rank stopped, died or timed
out raises :class:`PeerFailureError`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..aggregators import Aggregator, GramianAggregator, HRGrad
from ..backward import BackwardResult, aggregate_jacobians, aggregator_status, check_losses, check_params, task_diagnostics
from ..ops import combine, combine_into_grads, gram_of_list
from ._buckets import Layout, PeerFailureError, TaskGradientReduction, all_gather_into, collective

__all__ = ["MODES", "DistributedBackwardResult", "PeerFailureError", "Shard", "backward", "bucket_numel",
           "gather_chunks", "reduce_gram"]

#: The accepted modes, data-parallel first.
MODES = ("data_parallel", "sharded")

#: Default bucket size per task row, as DDP's ``bucket_cap_mb``.
BUCKET_MB = 25.0


def bucket_numel(bucket_mb: float, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in a bucket of ``bucket_mb`` MiB (at least 1)."""
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    return max(1, int(bucket_mb * 2**20) // torch.empty((), dtype=dtype).element_size())


def _check_group(group, op: str):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "first (torchrun sets up the environment for it), or use hrgrad_ext.backward in one process")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_mode(mode: str, aggregator: Aggregator, op: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}; expected one of {MODES}")
    if mode == "sharded" and not isinstance(aggregator, GramianAggregator):
        raise ValueError(f"{op}: mode='sharded' needs an aggregator that works from the Gram matrix (HRGrad, Sum, "
                         f"Mean, PCGrad, UPGrad, MGDA); {aggregator!r} needs the whole K x n matrix of task gradients "
                         "on one rank. Use mode='data_parallel' with it.")


def _check_not_fsdp(params: Sequence[Tensor], op: str) -> None:
    # FSDP registers shards as the parameters; the gradients reach the unsharded copies it
    # all-gathers for the forward pass, through its own hooks, so torch.autograd.grad with
    # respect to the registered parameters would see none (silently zero task gradients).
    # A DTensor exists only once its module is imported (importing it here would cost seconds).
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())
    for p in params:
        if isinstance(p, dtensor) or getattr(p, "_is_flat_param", False):
            raise ValueError(f"{op}: the parameters are FSDP / DTensor shards, whose gradients this function cannot "
                             "see; use an unwrapped model (mode='sharded' shards the task gradients and, through "
                             "Shard, the optimizer state)")


def _same_dtype_device(params: Sequence[Tensor], op: str) -> tuple[torch.dtype, torch.device]:
    _check_not_fsdp(params, op)
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"{op}: all parameters must share one dtype and device (the task gradients are reduced in "
                         f"flat buckets), got dtypes {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
    return dtypes.pop(), devices.pop()


def reduce_gram(G: Tensor, group=None, extra: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """All-reduces the partial Gram matrices of the ranks' chunks (and ``extra``, a small
    float64 vector that rides along) into the global ``G``; one collective of ``K^2 (+ m)``
    numbers."""
    flat = G.reshape(-1) if extra is None else torch.cat([G.reshape(-1), extra.to(G.dtype)])
    flat = flat.contiguous()
    collective("all_reduce of the partial Gram matrices", dist.all_reduce, flat, group=group)
    K2 = G.numel()
    return flat[:K2].view_as(G), (None if extra is None else flat[K2:])


class Shard:
    """This rank's share of a list of parameters, for a ZeRO-style sharded optimizer.

    The parameters are flattened into buckets (see :class:`Layout`), each split into
    ``world_size`` chunks, and :attr:`param` holds this rank's chunks (a new leaf tensor,
    ``numel / world_size`` elements plus padding): give it to the optimizer, whose state then
    also falls as ``1 / world_size``. :func:`backward` with ``mode="sharded"`` and the shard in
    place of the parameters writes this rank's slice of the aggregated update into
    ``shard.param.grad``; after ``optimizer.step()``, :meth:`gather` all-gathers every rank's
    slice back into the parameters for the next forward pass::

        shard = hrgrad_ext.distributed.Shard(model.parameters())
        opt = torch.optim.Adam([shard.param], lr=1e-3)
        for batch in data:
            losses = task_losses(model, batch)
            hrgrad_ext.distributed.backward(losses, shard, HRGrad(), mode="sharded")
            opt.step(); opt.zero_grad()
            shard.gather()

    The parameters must hold the same values on every rank when the shard is made (broadcast
    them from rank 0 first if their initialisation is not seeded identically).
    """

    def __init__(self, params: Iterable[Tensor], group=None, bucket_mb: float = BUCKET_MB):
        self.params = check_params(params, "Shard")
        self.world_size, self.rank = _check_group(group, "Shard")
        self.group = group
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError("Shard: every parameter must be contiguous (it is written in place by gather())")
        self.dtype, self.device = _same_dtype_device(self.params, "Shard")
        self.layout = Layout([p.numel() for p in self.params], self.world_size, bucket_numel(bucket_mb, self.dtype))
        #: this rank's chunks of the flattened parameters (give it to the optimizer)
        self.param = torch.nn.Parameter(torch.zeros(self.layout.shard_numel, dtype=self.dtype, device=self.device))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copies this rank's chunks of the parameters into :attr:`param` (after the
        parameters were changed by other means, e.g. loading a checkpoint)."""
        for bk, mine in zip(self.layout.buckets, self.chunks(self.param.detach())):
            for i, o in zip(bk.params, bk.offsets):
                src = self.params[i].detach().reshape(-1)
                for r, start, stop in bk.pieces[i]:
                    if r == self.rank:
                        mine[start - r * bk.chunk:stop - r * bk.chunk] = src[start - o:stop - o]

    def chunks(self, t: Tensor) -> list[Tensor]:
        """``t`` (a tensor like :attr:`param`) as one view per bucket."""
        return [t[off:off + b.chunk] for b, off in zip(self.layout.buckets, self.layout.shard_offsets())]

    @torch.no_grad()
    def gather(self) -> int:
        """All-gathers every rank's chunks into the parameters; returns the bytes gathered."""
        return gather_chunks(self.layout, self.chunks(self.param.detach()), self.params, self.group, accumulate=False)


def gather_chunks(layout: Layout, chunks: Sequence[Tensor], targets: Sequence[Tensor], group,
                  accumulate: bool) -> int:
    """All-gathers each bucket's chunks (``chunks[j]`` is this rank's ``[chunk]`` of bucket
    ``j``) and writes (or, with ``accumulate``, adds) the parameters' parts into ``targets``.
    Returns the bytes gathered (the full buckets)."""
    total = 0
    for bk, mine in zip(layout.buckets, chunks):
        full = torch.empty(layout.world_size * bk.chunk, dtype=mine.dtype, device=mine.device)
        all_gather_into(full, mine.contiguous(), group, "all_gather of the parameter shards")
        total += full.numel() * full.element_size()
        for i, o, n in zip(bk.params, bk.offsets, bk.numels):
            dst = targets[i].view(-1)
            if accumulate:
                dst.add_(full[o:o + n].to(dst.dtype))
            else:
                dst.copy_(full[o:o + n])
    return total


@dataclass
class DistributedBackwardResult(BackwardResult):
    """:class:`~hrgrad_ext.backward.BackwardResult` (identical on every rank) plus:

    Attributes:
        losses: ``[K]`` the global task losses (the mean over every rank's points).
        mode: the mode used; world_size: the group's size.
        bytes_communicated: payload of this call's collectives in bytes (for each, the size of
            the full tensor it reduces or gathers; a ring algorithm moves about
            ``2 (R - 1) / R`` times that per rank for an all-reduce, ``(R - 1) / R`` for a
            reduce-scatter or an all-gather). Plain DDP: the gradient bytes ``n * itemsize``.
        task_gradient_bytes: memory this rank keeps for the reduced task gradients (``K n``
            numbers in data-parallel mode, ``K n / world_size`` in sharded mode).
        wait_s: seconds spent blocked waiting for the task-gradient reduction.
    """

    losses: Tensor | None = None
    mode: str = "data_parallel"
    world_size: int = 1
    bytes_communicated: int = 0
    task_gradient_bytes: int = 0
    wait_s: float = 0.0


def _device_vector(values: Sequence[float], device) -> Tensor:
    """A float64 vector on ``device`` filled from host numbers by kernels (a copy of host
    memory to a GPU would wait for the GPU)."""
    out = torch.zeros(len(values), dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        if v:
            out[i] = float(v)
    return out


def _scales(num_points, K: int, R: int, group, device) -> tuple[list, Tensor | None, list[bool], int]:
    """Per task: the factor of the local gradient, and whether this rank has points of it."""
    if num_points is None:
        return [1.0 / R] * K, None, [True] * K, 0
    if isinstance(num_points, Tensor):
        counts = num_points.reshape(-1).tolist()
    else:
        counts = [num_points] * K if isinstance(num_points, int) else list(num_points)
    if len(counts) != K or any(isinstance(c, bool) or int(c) != c or c < 0 for c in counts):
        raise ValueError(f"distributed.backward: num_points must be one count >= 0 or {K} of them (one per task), "
                         f"got {num_points!r}")
    local = _device_vector(counts, device)
    total = local.clone()
    collective("all_reduce of the point counts", dist.all_reduce, total, group=group)
    # a task with no point anywhere has a zero gradient (and loss)
    scale = torch.where(total > 0, local / total.clamp_min(1), torch.zeros_like(local))
    return [scale[k:k + 1] for k in range(K)], scale, [c > 0 for c in counts], total.numel() * 8


def backward(
    losses: Mapping[str, Tensor] | Sequence[Tensor] | Tensor,
    params: Iterable[Tensor] | Shard,
    aggregator: Aggregator | None = None,
    group=None,
    mode: str = "data_parallel",
    *,
    num_points: int | Sequence[int] | Mapping[str, int] | Tensor | None = None,
    retain_graph: bool = False,
    bucket_mb: float = BUCKET_MB,
) -> DistributedBackwardResult:
    """:func:`hrgrad_ext.backward` across the ranks of ``group``: the update that one process
    would compute from the global task losses, accumulated into ``.grad`` on every rank.

    Call it on every rank of ``group`` with the same number of losses in the same order (each
    rank's losses over its own points), the same parameters, and aggregators in the same state
    (PCGrad: the same seed). Returns a :class:`DistributedBackwardResult`, identical on every
    rank.

    Args:
        losses: K scalar local task losses, each the mean over this rank's points of that
            task: a mapping ``{name: loss}`` (the result then reports by name), a sequence, or
            a 1-D tensor.
        params: the parameters (every rank's ``.grad`` gets the full update); in
            ``mode="sharded"`` also a :class:`Shard`, whose ``param.grad`` then gets this
            rank's slice of the update only.
        aggregator: default :class:`~hrgrad_ext.HRGrad`; ``mode="sharded"`` needs a Gramian one.
        group: the process group (default: the world).
        mode: one of :data:`MODES`.
        num_points: this rank's number of points of each task (one int for all, K of them,
            or ``{name: count}`` with named losses); by default every rank is taken to hold
            equally many. See the module docstring.
        retain_graph: keep the graph after the last reverse pass.
        bucket_mb: bucket size per task (MiB), as DDP's ``bucket_cap_mb``.
    """
    op = "distributed.backward"
    aggregator = aggregator if aggregator is not None else HRGrad()
    _check_mode(mode, aggregator, op)
    R, rank = _check_group(group, op)
    shard = params if isinstance(params, Shard) else None
    if shard is not None:
        if mode != "sharded":
            raise ValueError(f"{op}: a Shard holds one rank's slice of the parameters; it needs mode='sharded'")
        if shard.world_size != R:
            raise ValueError(f"{op}: the Shard was made for {shard.world_size} ranks, the group has {R}")
        params = shard.params
        layout = shard.layout
    else:
        params = check_params(params, op)
    losses, names = check_losses(losses, op)
    dtype, device = _same_dtype_device(params, op)
    if shard is None:
        layout = Layout([p.numel() for p in params], R, bucket_numel(bucket_mb, dtype))
    K = len(losses)
    if isinstance(num_points, Mapping):
        if names is None or set(num_points) != set(names):
            raise ValueError(f"{op}: num_points as a mapping needs named losses with the same names, got "
                             f"{sorted(num_points)} for losses {names}")
        num_points = [num_points[n] for n in names]
    scales, scale_vec, has_points, nbytes = _scales(num_points, K, R, group, device)

    # the global losses ride in one small all-reduce launched before the backward passes
    local = torch.stack([l.detach().reshape(()).to(torch.float64) for l in losses])
    if scale_vec is None:
        local = local / R
    else:  # a task without points here has a NaN loss (an empty mean): it counts 0
        scale_vec = scale_vec.to(local.device)
        local = torch.where(scale_vec > 0, local * scale_vec, torch.zeros_like(local))
    loss_work = collective("all_reduce of the task losses", dist.all_reduce, local, group=group, async_op=True)
    nbytes += local.numel() * 8

    red = TaskGradientReduction(layout, [p.shape for p in params], [1] * K, mode == "sharded", scales, dtype, device,
                                group, block_major=True)
    last = max((k for k in range(K) if has_points[k]), default=-1)
    for k, loss in enumerate(losses):
        if not has_points[k]:  # its loss is a mean over no points here: no backward, zeros
            for i in range(len(params)):
                red.add(k, i, None)
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph or k < last, allow_unused=True)
        for i, g in enumerate(grads):
            red.add(k, i, None if g is None else g.unsqueeze(0))
    result = red.finish()
    nbytes += red.bytes
    collective("waiting for the task losses", loss_work.wait)
    if aggregator.needs_losses:  # the global losses, identical on every rank
        aggregator.observe_losses(local)

    if mode == "data_parallel":
        G, w, status = aggregate_jacobians(aggregator, result)
        combine_into_grads(result, w, params)
        kept = sum(j.numel() * j.element_size() for j in result)
    else:
        G, _ = reduce_gram(gram_of_list(result), group)
        nbytes += G.numel() * G.element_size()
        w = aggregator.weights_from_gram(G)
        status = aggregator_status(aggregator)
        updates = [combine(chunk, w.to(chunk.dtype)) for chunk in result]
        if shard is not None:
            if shard.param.grad is None:
                shard.param.grad = torch.zeros_like(shard.param)
            for dst, u in zip(shard.chunks(shard.param.grad), updates):
                dst.add_(u)
        else:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
                elif not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()
            nbytes += gather_chunks(layout, updates, [p.grad for p in params], group, accumulate=True)
        kept = sum(c.numel() * c.element_size() for c in result)
    diag = task_diagnostics(G, w, status, names)
    return DistributedBackwardResult(**{f.name: getattr(diag, f.name) for f in fields(BackwardResult)}, losses=local,
                                     mode=mode, world_size=R, bytes_communicated=nbytes, task_gradient_bytes=kept,
                                     wait_s=red.wait_s)
