"""The multi-eps APNN trainer behind ``hrgrad-ext train``.

One step: fresh collocation / boundary / initial points for every task, per-task losses and
gradients (segmented, one backward pass), aggregation (HRGrad by default), a guard against
non-finite values, Adam/SGD step, LR schedule step. Around it: metrics, evaluation against
references, durable checkpoints and exact resume (:mod:`.rundir`), Ctrl-C and SIGTERM
handling, the divergence policy, summary and plots.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..aggregators import Aggregator, GramianAggregator, SolverAggregator, make_aggregator
from ..backward import aggregate_jacobians, task_diagnostics
from ..nn import EpsEncoding
from ..ops import combine_into_grads
from .config import TrainConfig, load_config, task_group_weights, task_windows, to_toml
from .evaluation import evaluate
from .faults import NonfiniteInjection, RankFailure
from .adaptive import ResidualSampler
from .lbfgs import LBFGSPhase
from .losses import BGKFormulation, Formulation, TransportFormulation
from .rundir import (CHECKPOINT, METRICS, PREVIOUS_CHECKPOINT, MetricsLog, RunLock, atomic_write, load_checkpoint,
                     numpy_rng_state, read_metrics, set_numpy_rng_state, truncate_metrics, write_checkpoint)
from .segmented import SegmentedLosses, TaskLayout, keep_freed_memory, segmented_task_gradients, separate_task_gradients
from .distributed import DistributedRun, ShardSampler, broadcast_result

__all__ = ["Trainer", "NonFiniteError", "Preempted", "make_aggregator", "make_formulation", "read_metrics",
           "CHECKPOINT", "PREVIOUS_CHECKPOINT", "METRICS", "SUMMARY", "CONFIG"]

SUMMARY = "summary.json"
CONFIG = "config.toml"


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss or gradient and its divergence policy stopped it."""


class Preempted(BaseException):
    """The run received SIGTERM and stopped at a step boundary after writing a checkpoint.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that a generic ``except Exception``
    does not swallow a request to stop. ``signal``: the signal number; ``checkpoint``: the path.
    """

    def __init__(self, message: str, signum: int, checkpoint: Path):
        super().__init__(message)
        self.signal = signum
        self.checkpoint = checkpoint


class _NoMetrics:
    """The metrics log of a rank that does not write (all but rank 0 of a distributed run)."""

    def write(self, record: dict) -> None:
        pass

    def truncate(self, step: int) -> None:
        pass

    def __enter__(self) -> "_NoMetrics":
        return self

    def __exit__(self, *exc) -> None:
        pass


class _AbortNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, mid-step, without a checkpoint of an inconsistent state."""


class _StopRequests:
    """Within the block SIGTERM and SIGINT only set :attr:`signum`; the training loop checks
    it at each step boundary, writes a checkpoint and stops. A second SIGINT raises at once.
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, abort_on_second_sigint: bool = True):
        self.signum: int | None = None
        self.abort_on_second_sigint = abort_on_second_sigint
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None and self.abort_on_second_sigint:
            raise _AbortNow
        self.signum = signum

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def make_formulation(cfg: TrainConfig) -> Formulation:
    """The loss formulation of ``cfg.problem``."""
    kw = dict(t_final=task_windows(cfg), weights=cfg.loss_weights, group_weights=task_group_weights(cfg),
              points=_points(cfg), eps=cfg.eps,
              causal=(cfg.causal["bins"], float(cfg.causal["tol"])) if cfg.causal else None)
    if cfg.nv:
        kw["nv"] = cfg.nv
    if cfg.problem == "transport":
        sp = cfg.sampling
        return TransportFormulation(front_fraction=float(sp.get("front", 0.0)), front_span=float(sp.get("span", 2.0)),
                                    wall_fraction=float(sp.get("wall", 0.0)), wall_span=float(sp.get("wall_span", 1.0)),
                                    **kw)
    cw = cfg.compression
    cell = tuple(float(cfg.sampling.get(k, d)) for k, d in zip(("cell_dx", "cell_dt"), BGKFormulation.CELL))
    return BGKFormulation(case=cfg.case, compression=(float(cw["k"]), float(cw.get("knee", 0.0))) if cw else None,
                          cell=cell, kinetic_knee=float(cfg.kinetic_knee),
                          weak_closure=float(cfg.weak_closure), **kw)


def _points(cfg: TrainConfig) -> dict:
    form = TransportFormulation if cfg.problem == "transport" else BGKFormulation
    groups = form.point_groups(cfg.loss_weights)
    # a shared config may list a boundary count that BGK (Dirichlet states built in, no inflow
    # term for f) does not use, or a cell count with the integral residual off
    return {g: n for g, n in cfg.points.items() if g in groups or g not in ("interior", "boundary", "initial", "cells")}


def _lr_groups(model: torch.nn.Module, params: list, factors: dict, lr: float) -> list[dict]:
    """The optimizer's parameter groups for ``optim.lr_factors``: one per distinct factor (the
    parameters of factor 1 first), each with ``lr * factor`` and its ``lr_factor`` (kept in the
    optimizer's state, which :meth:`Trainer._apply_lr_scale` reads)."""
    nets = {name: {id(p) for p in m.parameters()} for name, m in model.named_children()
            if any(True for _ in m.parameters())}
    unknown = set(factors) - set(nets)
    if unknown:
        raise ValueError(f"optim.lr_factors: unknown network(s) {sorted(unknown)}; the {type(model).__name__}'s "
                         f"networks are {sorted(nets)}")
    factor_of = {i: float(factors[name]) for name, ids in nets.items() if name in factors for i in ids}
    groups: dict[float, list] = {1.0: []}
    for p in params:
        groups.setdefault(factor_of.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * f, "lr_factor": f} for f, ps in groups.items() if ps]


def make_encoding(cfg: TrainConfig) -> EpsEncoding:
    """The eps encoding: log10 range of the task set unless the config fixes it."""
    opts = dict(cfg.model.get("encoding", {}))
    unknown = set(opts) - {"fourier", "embed_dim", "log10_min", "log10_max"}
    if unknown:
        raise ValueError(f"model.encoding: unknown option(s) {sorted(unknown)}")
    logs = [math.log10(e) for e in cfg.eps]
    return EpsEncoding(float(opts.get("log10_min", min(logs))), float(opts.get("log10_max", max(logs))),
                       int(opts.get("fourier", 0)), int(opts.get("embed_dim", 0)))


class _Schedule:
    """LR factor per step: linear warm-up then constant / cosine / exponential / step decay.
    A class (not a lambda) so that the scheduler's state is picklable."""

    def __init__(self, kind: str, iters: int, warmup: int, min_factor: float, gamma: float, step_size: int):
        self.kind, self.iters, self.warmup = kind, iters, warmup
        self.min_factor, self.gamma, self.step_size = min_factor, gamma, step_size

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        s = step - self.warmup
        span = max(1, self.iters - self.warmup)
        if self.kind == "cosine":
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span))
        if self.kind == "exponential":
            return self.gamma ** (s / self.step_size)
        if self.kind == "step":
            return self.gamma ** (s // self.step_size)
        return 1.0


def _distributed() -> bool:
    """Whether this process is one rank of several (torch.distributed initialised)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _aggregator_state(agg: Aggregator) -> dict:
    """The aggregator's state for a checkpoint: the state of every ``torch.Generator``
    attribute (PCGrad's task order), and under ``"state_dict"`` whatever its ``state_dict()``
    returns if it has one (tensors and plain values only: checkpoints load with
    ``weights_only=True``)."""
    state = {k: v.get_state() for k, v in vars(agg).items() if isinstance(v, torch.Generator)}
    if callable(getattr(agg, "state_dict", None)):
        state["state_dict"] = agg.state_dict()
    return state


def _load_aggregator_state(agg: Aggregator, state: dict) -> None:
    for k, s in state.items():
        if k == "state_dict":
            agg.load_state_dict(s)
        else:
            getattr(agg, k).set_state(s)


class Trainer:
    """A training run: ``Trainer(cfg).run()``; ``Trainer.resume(dir).run()`` continues one.

    The run writes to ``cfg.out``: ``config.toml`` (resolved), ``metrics.jsonl``,
    ``checkpoint.pt`` and ``checkpoint.prev.pt``, ``summary.json`` and ``*.png``, holding
    ``run.lock`` while it runs (see :mod:`.rundir`). A fresh run into a directory that holds
    another run replaces it (its checkpoints are removed when training starts); use
    :meth:`resume` to continue one.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and _distributed():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"device: a distributed CUDA run needs one GPU per process on each machine; this "
                                 f"process has LOCAL_RANK {local_rank} and sees {torch.cuda.device_count()} GPU(s)")
            self.device = torch.device("cuda", local_rank)  # this rank's GPU
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but torch sees no CUDA device")
        self.dtype = getattr(torch, cfg.dtype)
        self.out = Path(cfg.out)
        # model init from the global RNG; points from a private generator (both checkpointed)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        self.form = make_formulation(cfg).to(self.device, self.dtype)
        nets = {k: v for k, v in cfg.model.items() if k != "encoding"}
        self.model = self.form.build_model(make_encoding(cfg), nets).to(self.device, self.dtype)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.aggregator = make_aggregator(cfg.method, cfg.aggregator.get(cfg.method), cfg.seed)
        # a run started by torchrun (hrgrad-ext train --nproc N): the default process group
        self.dist = DistributedRun(cfg, self.model, self.params, self.aggregator) if _distributed() else None
        self.is_writer = self.dist is None or self.dist.is_writer  # rank 0 writes the run's files
        if cfg.distributed.shards == 0:  # one share of the points per rank, recorded in config.toml
            cfg.distributed.shards = 1 if self.dist is None else self.dist.world_size
        self.sampler = ShardSampler(cfg.seed, cfg.distributed.shards, *((self.dist.rank, self.dist.world_size)
                                                                         if self.dist is not None else (0, 1)))
        self.shard = self.dist.shard if self.dist is not None else None
        if self.dist is not None and cfg.lbfgs.steps:
            raise ValueError("lbfgs: the L-BFGS phase runs in one process; set lbfgs.steps = 0 for a distributed run")
        if self.dist is not None and cfg.causal:
            # each rank would weigh its time bins by the losses of its own points only: not the
            # loss of one process over the same points
            raise ValueError("causal: the causal weighting runs in one process; remove it for a distributed run")
        if self.dist is not None and cfg.adaptive:
            # the pool would be scored and drawn per rank, from each rank's share of the stream
            raise ValueError("adaptive: the adaptive sampling runs in one process; remove it for a distributed run")
        o = cfg.optim
        # The non-finite guard drops a bad step's update. On CUDA it must not wait for the
        # device: the fused optimizers skip their update on the device when their found_inf
        # input is non-zero (the mechanism of mixed-precision training). On the CPU the flag is
        # read directly (no device to wait for) and the default optimizer implementation kept.
        self._guard_on_device = self._guards_on_device()
        fused = {"fused": True} if self._guard_on_device else {}
        # a sharded run steps this rank's slice of the parameters only
        stepped = [self.shard.param] if self.shard is not None else self.params
        if o.lr_factors:
            if self.shard is not None:
                raise ValueError("optim.lr_factors: a sharded distributed run steps one flat slice of all "
                                 "parameters, which cannot take per-network learning rates; use "
                                 "distributed.mode = 'replicated' or leave lr_factors out")
            stepped = _lr_groups(self.model, self.params, o.lr_factors, o.lr)
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(stepped, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused)
        else:
            cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
            self.optimizer = cls(stepped, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _Schedule(o.schedule, cfg.iters, o.warmup, o.min_factor, o.gamma, o.step_size))
        # the parameter average that evaluation uses (optim.ema > 0)
        self.ema = [p.detach().clone() for p in self.params] if o.ema > 0 else None
        if isinstance(self.aggregator, SolverAggregator):
            # the trainer's own guard handles NaN/Inf gradients without a host sync per step
            self.aggregator.check_finite = False
        self.layout = TaskLayout(tuple(cfg.eps), self.form.groups, cfg.tasks)
        self.losses_fn = SegmentedLosses(self.model, self.form, self.layout,
                                         compile=None if cfg.compile == "off" else cfg.compile)
        if self.device.type == "cpu":
            keep_freed_memory()  # the K-fold activations of a segmented step: see keep_freed_memory
        self.lbfgs = LBFGSPhase(self) if cfg.lbfgs.steps else None
        self.adaptive = ResidualSampler(**cfg.adaptive) if cfg.adaptive else None
        self.eps_tensor = torch.tensor(cfg.eps, dtype=torch.float64)
        self.gen = self.sampler.generators[0]  # the points' random stream (of this rank's first share)
        self.step = 0
        self.train_time = 0.0
        self.wall_time = 0.0
        self.running: list[float] | None = None
        self.last_eval: dict | None = None
        self.last_losses: list[float] | None = None
        # divergence policy state (checkpointed): learning-rate factor and count of rollbacks,
        # skipped steps in a row and in all
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self._inject = NonfiniteInjection.from_env(len(self.layout.names))
        self._rank_failure = RankFailure.from_env(0 if self.dist is None else self.dist.rank)
        self._lock = RunLock(self.out)
        self._resumed = False
        self._started = False
        self._checkpoint_step: int | None = None  # the step of the newest checkpoint on disk
        self._stop_signal: int | None = None  # this rank's pending stop request (distributed runs)
        self._objective: float | None = None  # the weighted loss of the last L-BFGS step

    # --- one optimisation step ----------------------------------------------------------

    def _guards_on_device(self) -> bool:
        """Whether a non-finite step's update is dropped on the device (the fused optimizers'
        ``found_inf``), so that the guard never waits for it: on CUDA. (Tests run that path on
        the CPU through a subclass.)"""
        return self.device.type == "cuda"

    def task_gradients(self, batch: dict):
        """``(losses [T], jacobians)`` for a batch, by the configured gradient mode (in a
        data-parallel run: of the global batch, every rank's share of it reduced)."""
        if self.dist is not None:
            return self.dist.data_parallel_gradients(self, batch, self._stop_signal)
        if self.cfg.grad_mode == "segmented":
            losses, _, jac = segmented_task_gradients(self.model, self.form, batch, self.layout,
                                                      losses_fn=self.losses_fn)
        else:
            losses, jac = separate_task_gradients(self.model, self.form, batch, self.layout)
        return losses, jac

    def train_step(self):
        """Samples, computes task gradients, aggregates and steps. Returns
        ``(losses [T], G [T, T], w [T], status, finite [T + 1])`` (tensors on the device, not
        synced); ``finite[i]``: task i's loss and gradient are finite, ``finite[T]``: the
        update is. A step with any flag false changes neither the parameters, the optimizer
        state nor the parameter average (the LR schedule and the samplers do advance)."""
        batch = self.sampler.sample(self.form, self.eps_tensor, self.device, self.dtype)
        if self.adaptive is not None:
            if self.adaptive.due(self.step):
                self.adaptive.refresh(self.model, self.form, self.gen, self.eps_tensor, self.step, self.device,
                                      self.dtype)
            batch = self.adaptive.draw(self.gen, batch)
        if self.shard is not None:
            losses, G, w, status, task_ok, norm = self.dist.sharded_gradients(self, batch, self._stop_signal,
                                                                              self._inject)
        else:
            losses, G, w, status, task_ok, norm = self._update_from_jacobians(batch)
        task_ok = task_ok & torch.isfinite(losses.detach())
        finite = torch.cat([task_ok, torch.isfinite(norm).reshape(1).to(losses.device)])
        ok = finite.all()
        if self._guard_on_device:
            self.optimizer.found_inf = (~ok).to(torch.float32)
            self.optimizer.step()
        else:
            step_ok = bool(ok)  # a CPU tensor: reading it waits for nothing
            if not step_ok:
                self.optimizer.zero_grad(set_to_none=True)  # a step without gradients changes nothing
            self.optimizer.step()
        if self.shard is not None:
            self.dist.gather_parameters()
        self.scheduler.step()
        if self.ema is not None:
            # warm-up of the decay (as in TensorFlow's ExponentialMovingAverage), so that the
            # average does not hold on to the random initialisation for ~1/(1-decay) steps
            decay = min(self.cfg.optim.ema, (1 + self.step) / (10 + self.step))
            params = [p.detach() for p in self.params]
            with torch.no_grad():
                if self._guard_on_device:
                    weight = ok.to(self.dtype) * (1.0 - decay)  # 0 for a dropped step
                    torch._foreach_lerp_(self.ema, params, [weight] * len(params))
                elif step_ok:
                    torch._foreach_lerp_(self.ema, params, 1.0 - decay)
        return losses, G, w, status, finite

    def _update_from_jacobians(self, batch: dict):
        """Task gradients, aggregation and the (clipped) update in ``.grad``: ``(losses, G, w,
        status, task_ok, norm)`` with ``norm`` the update's norm before clipping."""
        losses, jac = self.task_gradients(batch)
        if self._inject is not None:
            losses, jac = self._inject.apply(self.step + 1, losses, jac)
        if self.aggregator.needs_losses:  # loss-weighting methods (ReLoBRaLo, GradNorm, SoftAdapt)
            self.aggregator.observe_losses(losses.detach())
        if isinstance(self.aggregator, GramianAggregator):
            G, w, status = aggregate_jacobians(self.aggregator, jac)
            # G's diagonal holds |g_i|^2: a NaN/Inf anywhere in task i's gradient shows there
            task_ok = torch.isfinite(G.diagonal()).to(losses.device)
        else:
            # these factorise J itself (ConFIG's pseudo-inverse), which fails on NaN/Inf: they
            # see zeros there, and the flags (from the real J) drop the step
            task_ok = torch.stack([torch.isfinite(j).reshape(j.shape[0], -1).all(1) for j in jac]).all(0)
            G, w, status = aggregate_jacobians(self.aggregator, [torch.nan_to_num(j, 0.0, 0.0, 0.0) for j in jac])
        self.optimizer.zero_grad(set_to_none=True)
        combine_into_grads(jac, w, self.params)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.cfg.optim.clip_norm > 0:
            # foreach implementation, no host sync; returns the norm before clipping
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return losses, G, w, status, task_ok, norm

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the model holds the parameter average (no-op without ``optim.ema``)."""
        if self.ema is None:
            yield self.model
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.ema):
                p.copy_(a)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resume needs, as tensors and plain values (loadable with
        ``weights_only=True``)."""
        return {
            "step": self.step,
            "train_time": self.train_time,
            "wall_time": self.wall_time,
            "running": self.running,
            "last_eval": self.last_eval,
            "last_losses": self.last_losses,
            "model": self.model.state_dict(),
            "ema": self.ema,
            # a sharded run's optimizer state is gathered into the single-process layout, so
            # that it resumes in either mode and with any world size
            "optimizer": (self.optimizer.state_dict() if self.shard is None
                          else self.dist.consolidate_optimizer_state(self.optimizer.state_dict())),
            "scheduler": self.scheduler.state_dict(),
            "sampler_rng": self._sampler_states(),
            "world_size": 1 if self.dist is None else self.dist.world_size,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy_rng": numpy_rng_state(),
            "python_rng": random.getstate(),
            "aggregator": _aggregator_state(self.aggregator),
            "divergence": {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                           "consecutive_skips": self.consecutive_skips, "skipped_steps": self.skipped_steps},
            "lbfgs": None if self.lbfgs is None else self.lbfgs.state_dict(),
            "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.train_time = float(state["train_time"])
        self.wall_time = float(state["wall_time"])
        self.running = state["running"]
        self.last_eval = state["last_eval"]
        self.last_losses = state["last_losses"]
        self.model.load_state_dict(state["model"])
        if self.shard is not None:
            self.shard.refresh()
        if self.ema is not None:
            saved = state.get("ema")
            if saved is None:
                raise ValueError("resume: optim.ema is on but the checkpoint holds no parameter average")
            for a, b in zip(self.ema, saved):
                a.copy_(b)
        # the implementation follows this trainer's device, not the checkpoint's (fused where
        # the guard runs on the device), so that a run can move between CPU and CUDA
        opt = state["optimizer"] if self.shard is None else self.dist.shard_optimizer_state(state["optimizer"])
        fused = True if self._guard_on_device else None
        self.optimizer.load_state_dict({**opt, "param_groups": [{**g, "fused": fused} for g in opt["param_groups"]]})
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.set_states(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        set_numpy_rng_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        _load_aggregator_state(self.aggregator, state["aggregator"])
        dv = state["divergence"]
        self.lr_scale, self.rollbacks = float(dv["lr_scale"]), int(dv["rollbacks"])
        self.consecutive_skips, self.skipped_steps = int(dv["consecutive_skips"]), int(dv["skipped_steps"])
        if self.lbfgs is not None and state.get("lbfgs") is not None:
            self.lbfgs.load_state_dict(state["lbfgs"])
        if self.adaptive is not None and state.get("adaptive") is not None:
            self.adaptive.load_state_dict(state["adaptive"])

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoint.pt`` durably and keeps the previous one as ``checkpoint.prev.pt``
        (:func:`.rundir.write_checkpoint`); raises :class:`.rundir.CheckpointWriteError`, with
        the earlier checkpoints intact, when the disk is full."""
        state = self.state_dict()  # in a distributed run, every rank takes part
        path = self.out / CHECKPOINT
        if self.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
            path = write_checkpoint(self.out, state)
        self._checkpoint_step = self.step
        return path

    def _sampler_states(self):
        """The points' random stream(s): one state, or those of all shares of the points."""
        if self.sampler.shards == 1:
            return self.gen.get_state()
        if self.dist is None:
            return [g.get_state() for g in self.sampler.generators]
        return self.dist.gather_sampler_states(self.sampler)

    def _load_checkpoint(self, take_lock: bool = False) -> tuple[dict, Path]:
        """:func:`.rundir.load_checkpoint` of the run directory; in a distributed run rank 0
        reads it (taking the lock first with ``take_lock``) and sends it, or its error, to
        every rank."""
        result = error = None
        if self.is_writer:
            try:
                if take_lock:
                    self._lock.acquire()
                result = load_checkpoint(self.out)
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if self.dist is not None:
            result, error = self.dist.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def _checkpoint_now(self) -> Path:
        """A checkpoint of the current step (written unless the newest one already is)."""
        if self._checkpoint_step == self.step:
            return self.out / CHECKPOINT
        return self.save_checkpoint()

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None) -> "Trainer":
        """A trainer restored from ``run_dir`` (its ``config.toml`` and newest complete
        checkpoint; ``checkpoint.prev.pt`` when ``checkpoint.pt`` is torn, with a warning).

        The trainer holds the run directory's lock from here on (released when :meth:`run`
        ends), so this raises :class:`.rundir.RunDirectoryInUse` while another process trains
        there. Checkpoints load with ``weights_only=True``; a file referencing anything but
        tensors and plain values raises :class:`.rundir.UnsafeCheckpointError` and nothing in it
        runs. ``overrides`` (``key=value``) may change e.g. ``iters`` or ``log.progress``;
        changing the model or problem makes the checkpoint unloadable and raises.
        """
        from .config import apply_overrides

        run_dir = Path(run_dir)

        def read_config():
            if not any((run_dir / n).is_file() for n in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
                raise FileNotFoundError(f"resume: no {CHECKPOINT} in {run_dir}")
            cfg = load_config(run_dir / CONFIG)
            cfg.out = str(run_dir)
            if overrides:
                cfg = apply_overrides(cfg, overrides)
                cfg.out = str(run_dir)
            return cfg

        # in a distributed run rank 0 reads the files and sends what it read to the others
        cfg = read_config() if not _distributed() else broadcast_result(read_config)
        trainer = cls(cfg)
        try:
            state, path = trainer._load_checkpoint(take_lock=True)
            trainer.load_state_dict(state)
            if trainer.is_writer:
                # records written after the checkpoint belong to steps that will be redone
                truncate_metrics(run_dir / METRICS, trainer.step)
            if trainer.is_writer and path.name != CHECKPOINT and (run_dir / CHECKPOINT).exists():
                # keep the bad file for inspection, out of the way of the next rotation (which
                # would otherwise make it the "previous" checkpoint)
                (run_dir / CHECKPOINT).replace(run_dir / (CHECKPOINT + ".bad"))
        except BaseException:
            trainer._lock.release()
            raise
        trainer._resumed = True
        trainer._checkpoint_step = trainer.step if path.name == CHECKPOINT else None
        return trainer

    def _start_in_directory(self) -> None:
        """Before the first step of :meth:`run` (the lock held): a fresh run clears the files of
        an earlier run; every run drops metrics records beyond its step and writes its config."""
        if self.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self._resumed and not self._started and self.step == 0:
                for name in (CHECKPOINT, PREVIOUS_CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".bad", SUMMARY):
                    (self.out / name).unlink(missing_ok=True)
            text = to_toml(self.cfg)
            path = self.out / CONFIG
            if not path.is_file() or path.read_text() != text:
                atomic_write(path, text)
            truncate_metrics(self.out / METRICS, self.step)
        self._started = True
        if self.cfg.divergence.on_nonfinite == "rollback" and self._checkpoint_step is None:
            self.save_checkpoint()  # a rollback needs a checkpoint to go back to

    # --- the divergence policy ------------------------------------------------------------

    def _apply_lr_scale(self) -> None:
        """Sets the schedule's base learning rate to ``optim.lr * lr_scale`` (and the current
        learning rate to match it at the schedule's position)."""
        sched, base = self.scheduler, self.cfg.optim.lr * self.lr_scale
        sched.base_lrs = [base * g.get("lr_factor", 1.0) for g in self.optimizer.param_groups]
        for group, group_base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"] = group_base
            group["lr"] = group_base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _on_nonfinite(self, losses: list[float], flags: list[float], metrics: MetricsLog, bar) -> bool:
        """Applies ``divergence.on_nonfinite`` to the step just taken (its update was dropped).
        Returns True after a rollback; raises :class:`NonFiniteError` to stop."""
        dv, names = self.cfg.divergence, self.layout.names
        bad = [n for n, ok in zip(names, flags) if not ok]
        where = (", ".join(f"task {n} (loss {v:.3g})" for n, v, ok in zip(names, losses, flags) if not ok)
                 if bad else "the aggregated update (every task loss and gradient finite)")
        what = f"non-finite loss or gradient at step {self.step} in {where}"
        last = (f"the last checkpoint ({self.out / CHECKPOINT}) is at step {self._checkpoint_step}"
                if self._checkpoint_step is not None else "no checkpoint was written yet")
        if dv.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}. The step's update was dropped and no checkpoint of it written; {last}. "
                                 "divergence.on_nonfinite = 'skip' or 'rollback' recovers automatically; a lower "
                                 "optim.lr or optim.clip_norm may avoid it.")
        if dv.on_nonfinite == "skip":
            self.consecutive_skips += 1
            self.skipped_steps += 1
            metrics.write({"step": self.step, "kind": "skip", "tasks": bad, "consecutive": self.consecutive_skips})
            self._say(bar, f"{what}: update skipped ({self.consecutive_skips} in a row)")
            if self.consecutive_skips >= dv.max_skips:
                raise NonFiniteError(f"{what}: {dv.max_skips} consecutive steps skipped "
                                     f"(divergence.max_skips); giving up; {last}.")
            return False
        if self.rollbacks >= dv.max_rollbacks:
            raise NonFiniteError(f"{what} after {self.rollbacks} rollbacks (divergence.max_rollbacks); giving up; "
                                 f"{last}.")
        bad_step = self.step
        state, path = self._load_checkpoint()
        kept = (self.train_time, self.wall_time, self.rollbacks + 1, self.lr_scale * dv.lr_factor)
        self.load_state_dict(state)
        self.train_time, self.wall_time, self.rollbacks, self.lr_scale = kept
        self.consecutive_skips = 0
        self._apply_lr_scale()
        metrics.truncate(self.step)
        metrics.write({"step": self.step, "kind": "rollback", "nonfinite_step": bad_step, "tasks": bad,
                       "checkpoint": path.name, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks})
        self._checkpoint_step = None
        self.save_checkpoint()  # the new learning rate and the count survive a restart
        self._say(bar, f"{what}: rolled back to step {self.step} ({path.name}), learning rate x{self.lr_scale:g} "
                  f"(rollback {self.rollbacks} of {dv.max_rollbacks})")
        return True

    # --- the loop -------------------------------------------------------------------------

    def _log_record(self, losses, G, w, status) -> dict:
        if G is None:  # the L-BFGS phase: frozen weights, no task gradients
            return {"step": self.step, "kind": "train", "phase": "lbfgs", "loss": losses.double().cpu().tolist(),
                    "weight": w.double().cpu().tolist(), "objective": self._objective, "time": self.train_time}
        d = task_diagnostics(G, w, status)
        record = {
            "step": self.step,
            "kind": "train",
            "lr": self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0].get("lr_factor", 1.0),
            "loss": losses.double().cpu().tolist(),
            "grad_norm": d.norms.cpu().tolist(),
            "cos_update": d.update_cosines.cpu().tolist(),
            "weight": w.double().cpu().tolist(),
            "update_norm": float(d.update_norm),
            "cosines": d.cosines.cpu().tolist(),
            "status": None if status is None else int(status),
            "time": self.train_time,
        }
        if self.dist is not None:
            record.update(self.dist.record())
        return record

    def evaluate(self) -> dict:
        """Relative L2 errors per eps and quantity against the references (with the parameter
        average when ``optim.ema`` is on)."""
        with self.averaged_weights() as model:
            return evaluate(model, self.form, self.cfg.eps)

    def run(self, max_steps: int | None = None, callback: Callable[["Trainer"], None] | None = None) -> dict | None:
        """Trains until ``cfg.iters`` (or ``max_steps``, then checkpoints and returns ``None``).

        ``callback(trainer)`` runs after every step. Ctrl-C (SIGINT) and SIGTERM stop the run
        at the next step boundary after writing a checkpoint: SIGINT then raises
        ``KeyboardInterrupt``, SIGTERM :class:`Preempted` (a second Ctrl-C stops at once,
        without a checkpoint). A ``KeyboardInterrupt`` raised by ``callback`` also saves. A
        non-finite loss or gradient is handled by ``divergence.on_nonfinite``
        (:class:`NonFiniteError` when it stops the run). Holds the run directory's lock
        (:class:`.rundir.RunDirectoryInUse` if another process has it). Returns the summary
        dict when finished.
        """
        if self.is_writer:
            self._lock.acquire()
        try:
            return self._run(max_steps, callback)
        finally:
            self._lock.release()

    def _run(self, max_steps, callback) -> dict | None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._start_in_directory()
        start_wall = time.perf_counter() - self.wall_time
        total = cfg.total_steps
        bar = tqdm(total=total, initial=self.step, disable=not cfg.log.progress or not self.is_writer,
                   dynamic_ncols=True, desc=f"{cfg.problem}/{cfg.method}")
        # under torchrun the launcher passes a Ctrl-C on to the ranks, which then see it twice
        stop = _StopRequests(abort_on_second_sigint=self.dist is None)
        try:
            with (MetricsLog(self.out / METRICS) if self.is_writer else _NoMetrics()) as metrics, stop:
                while self.step < total:
                    # a distributed run stops where every rank has heard of the request
                    signum = stop.signum if self.dist is None else self.dist.signal
                    if signum == signal.SIGINT:
                        raise KeyboardInterrupt
                    if signum is not None:
                        self.wall_time = time.perf_counter() - start_wall
                        path = self._checkpoint_now()
                        msg = (f"stopped by signal {signal.Signals(signum).name} at step {self.step}: checkpoint "
                               f"saved to {path}; continue with: {self._resume_command()}")
                        self._say(bar, msg)
                        raise Preempted(msg, signum, path)
                    if max_steps is not None and self.step >= max_steps:
                        self.wall_time = time.perf_counter() - start_wall
                        self._checkpoint_now()
                        return None
                    if self._rank_failure is not None:
                        self._rank_failure.at_step(self.step + 1)
                    t0 = time.perf_counter()
                    self._stop_signal = stop.signum
                    in_lbfgs = self.step >= cfg.iters
                    if in_lbfgs:
                        phase_step = self.step - cfg.iters
                        if phase_step == 0 and self.lbfgs.batch is None:
                            self.lbfgs.start()
                        losses, w, finite, self._objective = self.lbfgs.step(phase_step)
                        G = status = None
                    else:
                        losses, G, w, status, finite = self.train_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.train_time += time.perf_counter() - t0
                    self.step += 1
                    # one copy to the host, as for the progress bar alone: losses, the flags and
                    # (distributed) what came with the step's reduction
                    parts = [losses.detach().double(), finite.double()]
                    if self.dist is not None:
                        parts.append(self.dist.host_values().to(losses.device))
                    host = torch.cat(parts).cpu().tolist()
                    T = losses.numel()
                    vals, flags = host[:T], host[T:T + finite.numel()]
                    if self.dist is not None:
                        self.dist.take_host_values(host[T + finite.numel():])
                    if all(flags):
                        self.consecutive_skips = 0
                        self.last_losses = vals
                        self.running = vals if self.running is None else [0.9 * r + 0.1 * v for r, v in zip(self.running, vals)]
                    elif self._on_nonfinite(vals, flags, metrics, bar):
                        bar.reset(total=total)
                        bar.update(self.step)
                        continue
                    bar.update(1)
                    if self.running is not None:
                        bar.set_postfix_str(_postfix(self.running), refresh=False)
                    last = self.step in (cfg.iters, total)
                    lb_every = cfg.lbfgs.eval_every
                    if in_lbfgs:  # the phase's steps are long: its own cadence
                        log_now = eval_now = save_now = last or (self.step - cfg.iters) % lb_every == 0
                    else:
                        log_now = self.step % cfg.log.log_every == 0 or last
                        eval_now = self.step % cfg.log.eval_every == 0 or last
                        save_now = self.step % cfg.log.checkpoint_every == 0 or (self.step == cfg.iters < total)
                    if self.is_writer and log_now:
                        metrics.write(self._log_record(losses, G, w, status))
                    if self.is_writer and eval_now:
                        self.last_eval = self.evaluate()
                        metrics.write({"step": self.step, "kind": "eval", "rel_l2": self.last_eval})
                        bar.write(f"step {self.step}: rel L2 " + _eval_line(self.last_eval))
                    self.wall_time = time.perf_counter() - start_wall
                    if save_now:
                        self.save_checkpoint()
                    if callback is not None:
                        callback(self)
        except KeyboardInterrupt as exc:
            if isinstance(exc, _AbortNow):
                self._say(bar, f"aborted during step {self.step + 1}: the newest checkpoint is the last one written")
                raise
            if self.dist is not None and self.dist.signal != signal.SIGINT:
                # raised on this rank alone (by a callback): the others would not join the checkpoint
                self._say(bar, f"interrupted at step {self.step} on this rank only: no checkpoint written; the newest "
                               "one is the last one written")
                raise
            self.wall_time = time.perf_counter() - start_wall
            path = self._checkpoint_now()
            self._say(bar, f"interrupted at step {self.step}: checkpoint saved to {path}; "
                           f"continue with: {self._resume_command()}")
            raise
        finally:
            bar.close()
        self.wall_time = time.perf_counter() - start_wall
        self._checkpoint_now()
        rank_times = None if self.dist is None else self.dist.gather_floats([self.train_time, self.dist.wait_s])
        if not self.is_writer:
            return None
        summary = self.write_summary(rank_times)
        if cfg.log.plots:
            from .plots import write_plots

            write_plots(self)
        return summary

    def _say(self, bar, msg: str) -> None:
        """A message for the user (from rank 0 alone in a distributed run)."""
        if self.is_writer:
            bar.write(msg)

    def _resume_command(self) -> str:
        nproc = "" if self.dist is None else f" --nproc {self.dist.world_size}"
        return f"hrgrad-ext train --resume {self.out}{nproc}"

    def _lbfgs_summary(self) -> dict:
        """What the L-BFGS phase changed: the evaluation and training time at the end of the
        optimizer steps (the same run without the phase) against the run's end."""
        it = self.cfg.iters
        records = read_metrics(self.out)
        before = next((r["rel_l2"] for r in records if r.get("kind") == "eval" and r["step"] == it), None)
        time_at = next((r["time"] for r in records if r.get("kind") == "train" and r["step"] == it), None)
        return {"steps": self.step - it, "rel_l2_before": before,
                "optimizer_time_s": time_at, "time_s": None if time_at is None else self.train_time - time_at}

    def write_summary(self, rank_times: list[list[float]] | None = None) -> dict:
        """Writes and returns ``summary.json`` (``rank_times``: each rank's training time and
        time blocked in collectives, for a distributed run)."""
        if self.last_eval is None:
            self.last_eval = self.evaluate()
        dev = self.device
        summary = {
            "problem": self.cfg.problem,
            "case": self.cfg.case if self.cfg.problem == "bgk" else None,
            "method": self.cfg.method,
            "seed": self.cfg.seed,
            "tasks": self.layout.names,
            "eps": self.cfg.eps,
            "iters": self.step,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "dtype": self.cfg.dtype,
            "grad_mode": self.cfg.grad_mode,
            "weights_evaluated": f"parameter average (ema {self.cfg.optim.ema:g})" if self.ema is not None else "last step",
            "parameters": sum(p.numel() for p in self.params),
            "wall_time_s": self.wall_time,
            "train_time_s": self.train_time,
            "step_time_ms": 1e3 * self.train_time / max(1, self.step),
            "final_task_losses": dict(zip(self.layout.names, self.last_losses or [])),
            "rel_l2": self.last_eval,
        }
        if self.cfg.lbfgs.steps and self.step > self.cfg.iters:
            summary["lbfgs"] = self._lbfgs_summary()
        if self.dist is not None:
            summary.update(self.dist.summary(self.step, rank_times))
        atomic_write(self.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return summary



def _postfix(running: list[float]) -> str:
    if len(running) <= 8:
        return "L=" + " ".join(f"{v:.1e}" for v in running)
    return f"L max {max(running):.1e} mean {sum(running) / len(running):.1e}"


def _eval_line(ev: dict) -> str:
    return ", ".join(f"eps={k}: " + " ".join(f"{q} {v:.2e}" for q, v in d.items()) for k, d in ev.items())

