"""The multi-eps APNN trainer behind ``hrgrad-ext train``.

One step: fresh collocation / boundary / initial points for every task, per-task losses and
gradients (segmented, one backward pass), aggregation (HRGrad by default), Adam/SGD step, LR
schedule step. Around it: metrics, evaluation against references, atomic checkpoints, exact
resume, Ctrl-C handling, summary and plots.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..aggregators import Aggregator, make_aggregator
from ..backward import aggregate_jacobians, task_diagnostics
from ..nn import EpsEncoding
from ..ops import combine_into_grads
from .config import TrainConfig, load_config, task_windows, to_toml
from .evaluation import evaluate
from .losses import BGKFormulation, Formulation, TransportFormulation
from .segmented import SegmentedLosses, TaskLayout, segmented_task_gradients, separate_task_gradients

__all__ = ["Trainer", "make_aggregator", "make_formulation", "CHECKPOINT", "METRICS", "SUMMARY", "CONFIG"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"


def make_formulation(cfg: TrainConfig) -> Formulation:
    """The loss formulation of ``cfg.problem``."""
    kw = dict(t_final=task_windows(cfg), weights=cfg.loss_weights, points=_points(cfg), eps=cfg.eps)
    if cfg.nv:
        kw["nv"] = cfg.nv
    if cfg.problem == "transport":
        sp = cfg.sampling
        return TransportFormulation(front_fraction=float(sp.get("front", 0.0)), front_span=float(sp.get("span", 2.0)), **kw)
    return BGKFormulation(case=cfg.case, **kw)


def _points(cfg: TrainConfig) -> dict:
    groups = TransportFormulation.groups if cfg.problem == "transport" else BGKFormulation.groups
    # a shared config may list a boundary count that BGK (Dirichlet built in) does not use
    return {g: n for g, n in cfg.points.items() if g in groups or g not in ("interior", "boundary", "initial")}


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


def _aggregator_state(agg: Aggregator) -> dict:
    return {k: v.get_state() for k, v in vars(agg).items() if isinstance(v, torch.Generator)}


def _load_aggregator_state(agg: Aggregator, state: dict) -> None:
    for k, s in state.items():
        getattr(agg, k).set_state(s)


class Trainer:
    """A training run: ``Trainer(cfg).run()``; ``Trainer.resume(dir).run()`` continues one.

    The run writes to ``cfg.out``: ``config.toml`` (resolved), ``metrics.jsonl``,
    ``checkpoint.pt``, ``summary.json`` and ``*.png``.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
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
        o = cfg.optim
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
            self.optimizer = cls(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _Schedule(o.schedule, cfg.iters, o.warmup, o.min_factor, o.gamma, o.step_size))
        # the parameter average that evaluation uses (optim.ema > 0)
        self.ema = [p.detach().clone() for p in self.params] if o.ema > 0 else None
        self.aggregator = make_aggregator(cfg.method, cfg.aggregator.get(cfg.method), cfg.seed)
        self.layout = TaskLayout(tuple(cfg.eps), self.form.groups, cfg.tasks)
        self.losses_fn = SegmentedLosses(self.model, self.form, self.layout,
                                         compile=None if cfg.compile == "off" else cfg.compile)
        self.eps_tensor = torch.tensor(cfg.eps, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.train_time = 0.0
        self.wall_time = 0.0
        self.running: list[float] | None = None
        self.last_eval: dict | None = None
        self.last_losses: list[float] | None = None

    # --- one optimisation step ----------------------------------------------------------

    def task_gradients(self, batch: dict):
        """``(losses [T], jacobians)`` for a batch, by the configured gradient mode."""
        if self.cfg.grad_mode == "segmented":
            losses, _, jac = segmented_task_gradients(self.model, self.form, batch, self.layout,
                                                      losses_fn=self.losses_fn)
        else:
            losses, jac = separate_task_gradients(self.model, self.form, batch, self.layout)
        return losses, jac

    def train_step(self):
        """Samples, computes task gradients, aggregates and steps. Returns
        ``(losses [T], G [T, T], w [T], status)`` (tensors on the device, not synced)."""
        batch = self.form.sample_batch(self.gen, self.eps_tensor, self.device, self.dtype)
        losses, jac = self.task_gradients(batch)
        G, w, status = aggregate_jacobians(self.aggregator, jac)
        self.optimizer.zero_grad(set_to_none=True)
        combine_into_grads(jac, w, self.params)
        if self.cfg.optim.clip_norm > 0:
            # foreach implementation, no host sync
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            # warm-up of the decay (as in TensorFlow's ExponentialMovingAverage), so that the
            # average does not hold on to the random initialisation for ~1/(1-decay) steps
            decay = min(self.cfg.optim.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        return losses, G, w, status

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
        return {
            "step": self.step,
            "train_time": self.train_time,
            "wall_time": self.wall_time,
            "running": self.running,
            "last_eval": self.last_eval,
            "model": self.model.state_dict(),
            "ema": self.ema,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler_rng": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "aggregator": _aggregator_state(self.aggregator),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.train_time = float(state["train_time"])
        self.wall_time = float(state["wall_time"])
        self.running = state["running"]
        self.last_eval = state["last_eval"]
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            saved = state.get("ema")
            if saved is None:
                raise ValueError("resume: optim.ema is on but the checkpoint holds no parameter average")
            for a, b in zip(self.ema, saved):
                a.copy_(b)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        _load_aggregator_state(self.aggregator, state["aggregator"])

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoint.pt`` atomically (temporary file, then ``os.replace``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CHECKPOINT
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None) -> "Trainer":
        """A trainer restored from ``run_dir`` (its ``config.toml`` and ``checkpoint.pt``).

        ``overrides`` (``key=value``) may change e.g. ``iters`` or ``log.progress``; changing
        the model or problem makes the checkpoint unloadable and raises.
        """
        from .config import apply_overrides

        run_dir = Path(run_dir)
        ckpt = run_dir / CHECKPOINT
        if not ckpt.is_file():
            raise FileNotFoundError(f"resume: no {CHECKPOINT} in {run_dir}")
        cfg = load_config(run_dir / CONFIG)
        cfg.out = str(run_dir)
        if overrides:
            cfg = apply_overrides(cfg, overrides)
            cfg.out = str(run_dir)
        trainer = cls(cfg)
        trainer.load_state_dict(torch.load(ckpt, map_location=trainer.device, weights_only=False))
        trainer._truncate_metrics()
        return trainer

    def _truncate_metrics(self) -> None:
        # records written after the checkpoint belong to steps that will be redone
        path = self.out / METRICS
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    # --- the loop -------------------------------------------------------------------------

    def _log_record(self, losses, G, w, status) -> dict:
        d = task_diagnostics(G, w, status)
        return {
            "step": self.step,
            "kind": "train",
            "lr": self.scheduler.get_last_lr()[0],
            "loss": losses.double().cpu().tolist(),
            "grad_norm": d.norms.cpu().tolist(),
            "cos_update": d.update_cosines.cpu().tolist(),
            "weight": w.double().cpu().tolist(),
            "update_norm": float(d.update_norm),
            "cosines": d.cosines.cpu().tolist(),
            "status": None if status is None else int(status),
            "time": self.train_time,
        }

    def evaluate(self) -> dict:
        """Relative L2 errors per eps and quantity against the references (with the parameter
        average when ``optim.ema`` is on)."""
        with self.averaged_weights() as model:
            return evaluate(model, self.form, self.cfg.eps)

    def run(self, max_steps: int | None = None, callback: Callable[["Trainer"], None] | None = None) -> dict | None:
        """Trains until ``cfg.iters`` (or ``max_steps``, then checkpoints and returns ``None``).

        ``callback(trainer)`` runs after every step. On ``KeyboardInterrupt`` a checkpoint is
        written before the exception propagates. Returns the summary dict when finished.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CONFIG).write_text(to_toml(cfg))
        names = self.layout.names
        start_wall = time.perf_counter() - self.wall_time
        bar = tqdm(total=cfg.iters, initial=self.step, disable=not cfg.log.progress, dynamic_ncols=True,
                   desc=f"{cfg.problem}/{cfg.method}")
        try:
            with open(self.out / METRICS, "a") as metrics:
                while self.step < cfg.iters:
                    if max_steps is not None and self.step >= max_steps:
                        self.wall_time = time.perf_counter() - start_wall
                        self.save_checkpoint()
                        return None
                    t0 = time.perf_counter()
                    losses, G, w, status = self.train_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.train_time += time.perf_counter() - t0
                    self.step += 1
                    vals = losses.double().cpu().tolist()
                    if not all(math.isfinite(v) for v in vals):
                        raise FloatingPointError(f"non-finite task loss at step {self.step}: {dict(zip(names, vals))}")
                    self.last_losses = vals
                    self.running = vals if self.running is None else [0.9 * r + 0.1 * v for r, v in zip(self.running, vals)]
                    bar.update(1)
                    bar.set_postfix_str(_postfix(self.running), refresh=False)
                    if self.step % cfg.log.log_every == 0 or self.step == cfg.iters:
                        metrics.write(json.dumps(self._log_record(losses, G, w, status)) + "\n")
                    if self.step % cfg.log.eval_every == 0 or self.step == cfg.iters:
                        self.last_eval = self.evaluate()
                        metrics.write(json.dumps({"step": self.step, "kind": "eval", "rel_l2": self.last_eval}) + "\n")
                        bar.write(f"step {self.step}: rel L2 " + _eval_line(self.last_eval))
                    metrics.flush()
                    self.wall_time = time.perf_counter() - start_wall
                    if self.step % cfg.log.checkpoint_every == 0:
                        self.save_checkpoint()
                    if callback is not None:
                        callback(self)
        except KeyboardInterrupt:
            self.wall_time = time.perf_counter() - start_wall
            path = self.save_checkpoint()
            bar.write(f"interrupted at step {self.step}: checkpoint saved to {path}; "
                      f"continue with: hrgrad-ext train --resume {self.out}")
            raise
        finally:
            bar.close()
        self.wall_time = time.perf_counter() - start_wall
        self.save_checkpoint()
        summary = self.write_summary()
        if cfg.log.plots:
            from .plots import write_plots

            write_plots(self)
        return summary

    def write_summary(self) -> dict:
        """Writes and returns ``summary.json``."""
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
        (self.out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        return summary



def _postfix(running: list[float]) -> str:
    if len(running) <= 8:
        return "L=" + " ".join(f"{v:.1e}" for v in running)
    return f"L max {max(running):.1e} mean {sum(running) / len(running):.1e}"


def _eval_line(ev: dict) -> str:
    return ", ".join(f"eps={k}: " + " ".join(f"{q} {v:.2e}" for q, v in d.items()) for k, d in ev.items())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
