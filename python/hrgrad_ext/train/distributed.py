"""Distributed training runs: ``torchrun --nproc-per-node N -m hrgrad_ext.cli train ...`` or
``hrgrad-ext train --nproc N`` (which runs torchrun's launcher in-process).

* The points of a step come in ``distributed.shards`` equal shares, each drawn from its own
  random stream (:class:`ShardSampler`); each rank draws its own shares. A single process with
  the same number of shares draws the same global batch, which is what makes an N-rank run
  equal to a one-process run (the tests compare them) and lets a run resume with any world
  size that divides the number of shares.
* :class:`DistributedRun` does a step's communication with :mod:`hrgrad_ext.distributed`:
  data-parallel (task gradients all-reduced in buckets during the backward pass, then the
  single-process step on every rank) or sharded (task gradients reduce-scattered, partial Gram
  matrices all-reduced, each rank steps the optimizer on its :class:`~hrgrad_ext.distributed.
  Shard` of the parameters and all-gathers them). A small vector rides along with each step's
  reduction: the global task losses, the stop requests (SIGINT / SIGTERM) of every rank, so
  that all ranks stop at the same step boundary, and each rank's timings for the metrics.
* Only rank 0 writes (config, metrics, checkpoints, summary, plots) and holds ``run.lock``;
  what it writes is what a single process would write: the optimizer state of a sharded run is
  gathered into the single-process layout, the random streams of all shares are gathered.
* :func:`launch` runs ``torchrun --standalone`` in this process; when a rank fails, the
  launcher stops the others and :func:`launch` reports the rank that failed first.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import sys
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..aggregators import GramianAggregator
from ..cli import EXIT_PEER_FAILED
from ..backward import aggregator_status
from ..distributed import Shard, bucket_numel, reduce_gram
from ..distributed._buckets import Layout, PeerFailureError, TaskGradientReduction, all_gather_into, collective
from ..ops import combine, gram_of_list
from .segmented import segmented_task_gradients, separate_task_gradients

__all__ = ["DistributedRun", "ShardSampler", "broadcast_result", "init_from_env", "launch",
           "shard_seed", "started_by_torchrun"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def shard_seed(seed: int, shard: int) -> int:
    """Seed of the random stream of share ``shard`` of a run seeded ``seed``: ``seed + 1`` for
    share 0 (the stream of a single-process run), a hash of both otherwise."""
    if shard == 0:
        return seed + 1
    return int.from_bytes(hashlib.sha256(f"hrgrad-ext/{seed}/{shard}".encode()).digest()[:8], "little") >> 1


class ShardSampler:
    """Draws this rank's shares of every step's points: ``shards // world_size`` shares of
    ``points`` per task and group each, share ``s`` from a generator seeded
    :func:`shard_seed(seed, s) <shard_seed>`, concatenated along the point axis."""

    def __init__(self, seed: int, shards: int, rank: int = 0, world_size: int = 1):
        if shards < 1 or shards % world_size:
            raise ValueError(f"distributed.shards = {shards}: the points of a step come in {shards} share(s), which "
                             f"{world_size} ranks cannot split evenly; use a world size that divides {shards} "
                             f"({', '.join(str(d) for d in range(1, shards + 1) if shards % d == 0)})")
        per = shards // world_size
        self.shards = shards
        self.indices = list(range(rank * per, (rank + 1) * per))
        self.generators = [torch.Generator().manual_seed(shard_seed(seed, s)) for s in self.indices]

    def sample(self, form, eps: Tensor, device, dtype) -> dict:
        batches = [form.sample_batch(g, eps, device, dtype) for g in self.generators]
        if len(batches) == 1:
            return batches[0]
        return {group: {k: torch.cat([b[group][k] for b in batches], 1) if v.dim() >= 2 else v
                        for k, v in pts.items()} for group, pts in batches[0].items()}

    def set_states(self, states: Tensor | Sequence[Tensor]) -> None:
        """Restores the streams from a checkpoint's ``sampler_rng`` (one state, or all shares')."""
        states = [states] if isinstance(states, Tensor) else list(states)
        if len(states) != self.shards:
            raise ValueError(f"resume: the checkpoint holds the random streams of {len(states)} share(s) of the points, "
                             f"the config says distributed.shards = {self.shards}")
        for g, s in zip(self.generators, self.indices):
            g.set_state(states[s].clone())  # a view into a larger storage would be misread


def _reorder_rows(t: Tensor, copies: int, K: int) -> Tensor:
    """Rows ordered (copy, eps) -> task order (eps, copy), as :func:`segmented_task_gradients`."""
    if copies == 1:
        return t
    return t.reshape(copies, K, *t.shape[1:]).transpose(0, 1).reshape(copies * K, *t.shape[1:])


class DistributedRun:
    """The communication of a training run on the default process group (see the module
    docstring). Made by the :class:`~hrgrad_ext.train.trainer.Trainer` when
    ``torch.distributed`` is initialised with more than one rank."""

    def __init__(self, cfg, model: torch.nn.Module, params: Sequence[Tensor], aggregator):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.mode = cfg.distributed.mode
        self.backend = dist.get_backend()
        # tensors are reduced where they live: the training device's backend does it
        self.comm_device = next(iter(params)).device
        kind = self.comm_device.type
        if not ((kind == "cuda" and "nccl" in self.backend) or (kind == "cpu" and "gloo" in self.backend)):
            raise ValueError(f"distributed.backend: the process group's backend {self.backend!r} does not serve a run "
                             f"on {kind}; use 'auto' (gloo for the CPU, NCCL for CUDA)")
        if self.mode == "sharded" and not isinstance(aggregator, GramianAggregator):
            raise ValueError(f"distributed.mode = 'sharded' needs a method that works from the Gram matrix (hrgrad, "
                             f"sum, mean, pcgrad, upgrad, mgda); {cfg.method!r} needs the whole K x n matrix of task "
                             "gradients on one rank: use distributed.mode = 'data_parallel'")
        self.broadcast_module(model)
        self.params = list(params)
        self.bucket_mb = cfg.distributed.bucket_mb
        self.layout = Layout([p.numel() for p in self.params], self.world_size,
                             bucket_numel(self.bucket_mb, self.params[0].dtype))
        self.shard = Shard(self.params, bucket_mb=self.bucket_mb) if self.mode == "sharded" else None
        #: after each step: the agreed stop signal (or None), this step's payload bytes, every
        #: rank's cumulative training time and time blocked in collectives (one step behind)
        self.signal: int | None = None
        self._host = torch.zeros(2 + 2 * self.world_size, dtype=torch.float64)
        self.step_bytes = 0
        self.wait_s = 0.0
        self.rank_train_time = [0.0] * self.world_size
        self.rank_wait_s = [0.0] * self.world_size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # --- one-off synchronisation ----------------------------------------------------------

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Every rank starts from rank 0's parameters and buffers (as DDP does)."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                buf = t.detach().to(self.comm_device)
                collective("broadcast of the initial parameters", dist.broadcast, buf, src=0)
                t.copy_(buf)

    def broadcast_object(self, obj=None):
        """Rank 0's ``obj`` on every rank (a checkpoint state, a config, or an exception that
        every rank should raise)."""
        return _broadcast_object(obj)

    def gather_sampler_states(self, sampler: ShardSampler) -> list[Tensor]:
        """The random-stream states of all shares, in order (on every rank)."""
        mine = torch.stack([g.get_state() for g in sampler.generators]).to(self.comm_device)
        out = torch.empty(self.world_size * mine.numel(), dtype=mine.dtype, device=self.comm_device)
        all_gather_into(out, mine.reshape(-1), None, "all_gather of the sampler states")
        # separate tensors: Generator.set_state reads a state from the start of its storage
        return [t.clone() for t in out.cpu().reshape(sampler.shards, -1).unbind(0)]

    def gather_floats(self, values: Sequence[float]) -> list[list[float]]:
        """``values`` of every rank (a collective: every rank calls it)."""
        mine = torch.tensor(list(values), dtype=torch.float64, device=self.comm_device)
        out = torch.empty(self.world_size * mine.numel(), dtype=torch.float64, device=self.comm_device)
        all_gather_into(out, mine, None, "all_gather of the timings")
        return out.cpu().reshape(self.world_size, -1).tolist()

    # --- the extras vector ----------------------------------------------------------------

    def _pack(self, losses: Tensor, signum: int | None, train_time: float) -> Tensor:
        R, T = self.world_size, losses.numel()
        # made on the device and filled from host scalars: no host-to-device copy to wait for
        extras = torch.zeros(T + 2 + 2 * R, dtype=torch.float64, device=self.comm_device)
        extras[:T] = losses.detach().reshape(-1).to(extras.device, torch.float64) / R
        if signum in _STOP_SIGNALS:
            extras[T + _STOP_SIGNALS.index(signum)] = 1.0
        extras[T + 2 + self.rank] = train_time
        extras[T + 2 + R + self.rank] = self.wait_s
        return extras

    def _unpack(self, extras: Tensor, losses: Tensor) -> Tensor:
        T = losses.numel()
        self._host = extras[T:]  # read by the trainer with its own copy to the host (no extra sync)
        return extras[:T].to(losses.device, losses.dtype)

    def host_values(self) -> Tensor:
        """The step's stop requests and timings, still on the device: the trainer appends them
        to the values it copies to the host after each step and hands them to
        :meth:`take_host_values`."""
        return self._host

    def take_host_values(self, values: Sequence[float]) -> None:
        R = self.world_size
        # SIGTERM wins over SIGINT: the run is being preempted
        self.signal = signal.SIGTERM if values[1] else (signal.SIGINT if values[0] else None)
        self.rank_train_time, self.rank_wait_s = list(values[2:2 + R]), list(values[2 + R:2 + 2 * R])

    def record(self) -> dict:
        """What a metrics record of a distributed run adds: the world size and mode, this
        step's payload bytes, and each rank's training time and time blocked in collectives
        (cumulative, up to the step before)."""
        return {"world_size": self.world_size, "distributed_mode": self.mode, "bytes_communicated": self.step_bytes,
                "rank_train_time_s": self.rank_train_time, "rank_comm_wait_s": self.rank_wait_s}

    def summary(self, steps: int, rank_times: list[list[float]] | None) -> dict:
        """What ``summary.json`` of a distributed run adds."""
        out = {"world_size": self.world_size, "distributed_mode": self.mode, "backend": self.backend,
               "bytes_per_step": self.step_bytes}
        if rank_times is not None:
            out["rank_step_time_ms"] = [1e3 * t / max(1, steps) for t, _ in rank_times]
            out["rank_comm_wait_ms_per_step"] = [1e3 * w / max(1, steps) for _, w in rank_times]
        return out

    # --- a step's gradients ----------------------------------------------------------------

    def _local_gradients(self, tr, batch, sharded: bool):
        """Runs the local forward and backward passes, feeding the reduction; returns the
        local losses and the reduction (made here for the K-pass ``separate`` mode)."""
        K, copies = len(tr.layout.eps), tr.losses_fn.copies
        shapes, dtype, device = [p.shape for p in self.params], self.params[0].dtype, self.params[0].device
        layout = self.shard.layout if sharded else self.layout
        if tr.cfg.grad_mode == "segmented":
            red = TaskGradientReduction(layout, shapes, [K] * copies, sharded, [1.0 / self.world_size] * copies, dtype,
                                        device)
            losses, _, _ = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, losses_fn=tr.losses_fn,
                                                    grad_hook=red.add)
            return losses, red, copies
        losses, jac = separate_task_gradients(tr.model, tr.form, batch, tr.layout)
        red = TaskGradientReduction(layout, shapes, [losses.numel()], sharded, [1.0 / self.world_size], dtype, device)
        for i, j in enumerate(jac):
            red.add(0, i, j)
        return losses, red, 1

    def data_parallel_gradients(self, tr, batch, signum: int | None):
        """The global task losses ``[T]`` and per-parameter Jacobians ``[T, *p.shape]`` of the
        global batch (identical on every rank)."""
        losses, red, copies = self._local_gradients(tr, batch, sharded=False)
        extras = self._pack(losses, signum, tr.train_time)
        work = collective("all_reduce of the task losses", dist.all_reduce, extras, async_op=True)
        jac = red.finish()
        collective("waiting for the task losses", work.wait)
        self.step_bytes = red.bytes + extras.numel() * 8
        self.wait_s += red.wait_s
        K = len(tr.layout.eps)
        return self._unpack(extras, losses), [_reorder_rows(j, copies, K) for j in jac]

    def sharded_gradients(self, tr, batch, signum: int | None, inject):
        """The sharded step up to the optimizer: writes this rank's slice of the (clipped)
        update into ``shard.param.grad`` and returns ``(losses, G, w, status, task_ok, norm)``
        with ``norm`` the update's norm before clipping (identical on every rank)."""
        losses, red, copies = self._local_gradients(tr, batch, sharded=True)
        K = len(tr.layout.eps)
        chunks = [_reorder_rows(c, copies, K) for c in red.finish()]
        if inject is not None:  # testing aid: NaN in this rank's share makes the global ones NaN
            losses, chunks = inject.apply(tr.step + 1, losses, chunks)
        extras = self._pack(losses, signum, tr.train_time)
        G, extras = reduce_gram(gram_of_list(chunks), None, extras.to(torch.float64))
        self.step_bytes = red.bytes + G.numel() * 8 + extras.numel() * 8
        self.wait_s += red.wait_s
        losses = self._unpack(extras, losses)
        agg = tr.aggregator
        if agg.needs_losses:
            agg.observe_losses(losses.detach())
        w = agg.weights_from_gram(G)
        status = aggregator_status(agg)
        task_ok = torch.isfinite(G.diagonal()).to(losses.device)
        grad = torch.zeros_like(self.shard.param)
        for dst, chunk in zip(self.shard.chunks(grad), chunks):
            dst.copy_(combine(chunk, w.to(chunk.device, chunk.dtype)))
        # |J^T w|^2 = w^T G w: the norm of the whole update without another collective
        norm = (w.to(G.dtype) @ G @ w.to(G.dtype)).clamp_min(0).sqrt()
        clip = tr.cfg.optim.clip_norm
        if clip > 0:  # the rule of torch.nn.utils.clip_grad_norm_
            grad.mul_((clip / (norm + 1e-6)).clamp(max=1.0).to(grad.device, grad.dtype))
        self.shard.param.grad = grad
        return losses, G, w, status, task_ok, norm.to(losses.device)

    def gather_parameters(self) -> None:
        """After the optimizer step of a sharded run: every rank's slice into the parameters."""
        self.step_bytes += self.shard.gather()

    # --- checkpoints of a sharded optimizer ------------------------------------------------

    def consolidate_optimizer_state(self, state: dict) -> dict:
        """The sharded optimizer's ``state_dict`` (one flat parameter per rank) as the
        ``state_dict`` of the same optimizer over the model's parameters, which a single process
        would have written (a collective: every rank calls it)."""
        flat = state["state"].get(0, {})
        per_param: list[dict] = [{} for _ in self.params]
        n = self.shard.layout.shard_numel
        for key in sorted(flat):
            v = flat[key]
            if isinstance(v, Tensor) and v.shape == self.shard.param.shape:
                full = torch.empty(self.world_size * n, dtype=v.dtype, device=self.comm_device)
                all_gather_into(full, v.detach().to(self.comm_device), None, "all_gather of the optimizer state")
                values = self._unshard(full.reshape(self.world_size, n))
                for i, t in enumerate(values):
                    per_param[i][key] = t.to(v.device)
            else:  # the step count and other per-parameter scalars
                for d in per_param:
                    d[key] = v.clone() if isinstance(v, Tensor) else v
        groups = [{**g, "params": list(range(len(self.params)))} for g in state["param_groups"]]
        return {"state": {i: d for i, d in enumerate(per_param) if d}, "param_groups": groups}

    def _unshard(self, ranks: Tensor) -> list[Tensor]:
        """Per parameter, its values from the ``[world_size, shard_numel]`` rows of all ranks."""
        out = [torch.empty(p.numel(), dtype=ranks.dtype, device=ranks.device) for p in self.params]
        for bk, off in zip(self.shard.layout.buckets, self.shard.layout.shard_offsets()):
            full = ranks[:, off:off + bk.chunk].reshape(-1)
            for i, o, n in zip(bk.params, bk.offsets, bk.numels):
                out[i].copy_(full[o:o + n])
        return [t.view(p.shape) for t, p in zip(out, self.params)]

    def shard_optimizer_state(self, state: dict) -> dict:
        """The inverse of :meth:`consolidate_optimizer_state`: this rank's slice of a
        single-process optimizer ``state_dict``."""
        per_param = state["state"]
        flat: dict = {}
        if per_param:
            first = per_param[min(per_param)]
            for key, v in first.items():
                if isinstance(v, Tensor) and v.dim() > 0:
                    mine = torch.zeros(self.shard.layout.shard_numel, dtype=v.dtype, device=self.shard.param.device)
                    for bk, dst in zip(self.shard.layout.buckets, self.shard.chunks(mine)):
                        for i, o in zip(bk.params, bk.offsets):
                            src = per_param[i][key].reshape(-1).to(mine.device)
                            for r, start, stop in bk.pieces[i]:
                                if r == self.rank:
                                    dst[start - r * bk.chunk:stop - r * bk.chunk] = src[start - o:stop - o]
                    flat[key] = mine
                else:
                    flat[key] = v
        groups = [{**g, "params": [0]} for g in state["param_groups"]]
        return {"state": {0: flat} if flat else {}, "param_groups": groups}


def _object_device() -> torch.device:
    """Where object collectives stage their bytes: the CPU when gloo is there (alone or as the
    CPU half of ``"cpu:gloo,cuda:nccl"``), the current GPU under NCCL alone."""
    return torch.device("cpu") if "gloo" in dist.get_backend() else torch.device("cuda", torch.cuda.current_device())


def _broadcast_object(obj=None):
    box = [obj if dist.get_rank() == 0 else None]
    collective("broadcast of the run state", dist.broadcast_object_list, box, src=0, device=_object_device())
    return box[0]


def broadcast_result(fn):
    """``fn()`` computed on rank 0 and sent to every rank; an exception it raises is raised on
    every rank (so that a bad ``--resume`` directory stops all ranks with the same error)."""
    result = error = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    result, error = _broadcast_object((result, error))
    if error is not None:
        raise error
    return result


# --- process group and launcher ---------------------------------------------------------------


def started_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(backend: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Initialises the default process group when this process was started by ``torchrun``
    (:func:`started_by_torchrun`); returns whether it did. ``backend="auto"``: gloo for CPU
    tensors and, where CUDA is available, NCCL for CUDA tensors (``"cpu:gloo,cuda:nccl"``),
    so that the choice does not depend on a config that only rank 0 may be able to read (a
    resumed run). A rank's GPU is ``cuda:LOCAL_RANK``. ``timeout_s``: the group's timeout."""
    if not started_by_torchrun():
        return False
    if dist.is_initialized():
        return True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def launch(nproc: int, argv: list[str]) -> int:
    """Runs ``hrgrad-ext <argv>`` in ``nproc`` processes on this machine through torchrun's
    launcher (``torch.distributed.run``, ``--standalone``: a free port, no restarts). When a
    rank fails, the launcher stops the others (SIGTERM, then SIGKILL). Returns 0, or the exit
    code of the rank that failed first (one that failed because another did comes last)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {nproc}")
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--monitor-interval=0.2",
                       "-m", "hrgrad_ext.cli", *argv])
    # the launcher sets environment variables (OMP_NUM_THREADS, ...) and signal handlers for
    # its own process; this one goes on afterwards (a caller of main(), a test)
    environ = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        run(args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=lambda kv: (kv[1].exitcode == EXIT_PEER_FAILED, kv[1].timestamp))
        rank, failure = failures[0]
        how = (f"was killed by signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        others = ", ".join(str(r) for r, _ in failures[1:])
        print(f"hrgrad-ext: rank {rank} of {nproc} {how} (its error is above); the launcher stopped the other ranks"
              + (f" ({others} failed in turn)" if others else ""), file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:
        # the launcher was sent SIGTERM / SIGINT: it passed the signal on to the ranks, which
        # stopped at a step boundary after writing a checkpoint
        print(f"hrgrad-ext: stopped by signal {signal.Signals(exc.sigval).name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)
    return 0


__all__ += ["PeerFailureError"]
