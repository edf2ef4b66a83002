"""Per-task gradients of segmented APNN losses in one backward pass.

Each task k (an eps value, or an (eps, point group) pair) has its own segment of the batch and
its own loss L_k. To get every dL_k/dtheta from one reverse pass, the parameters are expanded
to per-task copies ``P[k] = theta`` (``p.unsqueeze(0).expand(K, ...)``: a view, no copy), the
network runs on task k's segment with copy k (``torch.func.vmap`` over tasks of
``torch.func.functional_call``), input derivatives come from ``torch.func`` inside that
(``deriv="fast"``: a reverse-mode pullback for the scalar-per-node f / g networks, whose t and x
derivatives it gives in one pass, and for the three macro outputs BGK's Taylor-mode pass
(:mod:`hrgrad_ext.nn.jets`) or forward-mode ``jvp``; ``deriv="jvp"``: forward mode throughout), and the outputs of all tasks are flattened to one ``[K*n, ...]`` batch for the fused residual
ops. Since L_k depends on copy k only, the gradient of ``sum_k L_k`` with respect to the
expanded copies is the stack of the task gradients: the per-parameter Jacobians ``[K, *p.shape]``.

:func:`separate_task_gradients` computes the same Jacobians the plain way (one eager forward
with reverse-mode input derivatives and one backward per task); it is the reference for the
tests and the baseline of the benchmark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses import Formulation

__all__ = ["TASK_MODES", "SegmentedLosses", "TaskLayout", "keep_freed_memory", "segmented_task_gradients",
           "separate_task_gradients", "task_losses"]

TASK_MODES = ("eps", "eps_group")

_KEPT = None  # result of keep_freed_memory(), once per process


def keep_freed_memory() -> bool:
    """Lets glibc's malloc keep freed memory in the process instead of returning it to the OS.

    Why: one segmented pass holds the activations of all K tasks, K times the size of a
    per-task pass (64 MB each for the BGK benchmark network at 512 points x 64 nodes, K = 4).
    glibc serves allocations above its mmap threshold (at most 32 MB) with fresh mappings and
    trims freed heap memory beyond 2x that threshold, so every step page-faults and zeroes
    them again: on the CPU that kernel time (measured 2.8 s of 7.4 s per step, 1.1M minor
    faults, against 0.6 s for the K separate passes) was all that made the segmented step
    slower; its user time equals theirs. With mmap off and trimming off, the allocations of
    one step are reused by the next.

    Process-wide (it changes malloc for everything in the process) and irreversible: the
    resident size stays at its peak. So the library never calls it on its own: the training job
    (:class:`~hrgrad_ext.train.trainer.Trainer`, which owns its process) and the benchmarks do,
    for CPU training with the segmented gradients; set ``HRGRAD_EXT_KEEP_FREED_MEMORY=0`` to leave
    malloc alone there too. A user who builds a CPU loop on :class:`SegmentedLosses` may call it. A no-op (returns False) on other
    C libraries; preloading jemalloc or tcmalloc has the same effect.
    """
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    _KEPT = False
    if os.environ.get("HRGRAD_EXT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # trim only beyond 2 GB of free heap; never mmap (brk heap, reused in place)
    _KEPT = bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(M_MMAP_MAX, 0))
    return _KEPT


@dataclass(frozen=True)
class TaskLayout:
    """How tasks map to (eps, group): ``mode="eps"`` gives K tasks (all groups of one eps);
    ``mode="eps_group"`` gives K*G tasks, task ``k*G + g`` = (eps_k, group g)."""

    eps: tuple[float, ...]
    groups: tuple[str, ...]
    mode: str = "eps"

    def __post_init__(self):
        if self.mode not in TASK_MODES:
            raise ValueError(f"unknown task mode {self.mode!r}; expected one of {TASK_MODES}")

    @property
    def num_tasks(self) -> int:
        return len(self.eps) * (len(self.groups) if self.mode == "eps_group" else 1)

    @property
    def names(self) -> list[str]:
        if self.mode == "eps":
            return [f"eps={e:g}" for e in self.eps]
        return [f"eps={e:g}/{g}" for e in self.eps for g in self.groups]

    def combine(self, group_losses: dict[str, Tensor]) -> Tensor:
        """Per-group ``[K]`` losses -> task losses ``[num_tasks]``."""
        stacked = torch.stack([group_losses[g] for g in self.groups], 1)  # [K, G]
        return stacked.sum(1) if self.mode == "eps" else stacked.reshape(-1)


class SegmentedLosses:
    """The per-task losses as a function of the per-task parameter copies:
    ``fn(expanded, batch) -> (losses [T], {group: [K]})``, where ``expanded[c]`` lists the
    trainable parameters expanded to ``[K, *p.shape]`` (copy ``c`` per point group in
    ``"eps_group"`` mode, one copy otherwise).

    With ``compile`` set (a :func:`torch.compile` mode: ``"default"``, ``"reduce-overhead"``
    (CUDA graphs on a GPU), ``"max-autotune"``, ...) this forward function is compiled; the
    backward pass stays outside, a plain ``torch.autograd.grad`` through the compiled graph
    (AOTAutograd), whose gradients agree with the eager ones to rounding. (Compiling the
    ``autograd.grad`` call itself together with the forward gave wrong gradients with torch
    2.14, so it is not done.) Shapes are fixed within a run, so it compiles once.
    """

    def __init__(self, model: nn.Module, form: Formulation, layout: TaskLayout, deriv: str = "fast",
                 compile: str | None = None):
        self.model, self.form, self.layout, self.deriv = model, form, layout, deriv
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.copies = 1 if layout.mode == "eps" else len(layout.groups)
        self.compile = compile or None
        self._fn = torch.compile(self._losses, mode=None if compile == "default" else compile) if self.compile else self._losses

    def _losses(self, expanded: list[list[Tensor]], batch: dict):
        model, form, layout = self.model, self.form, self.layout
        K = len(layout.eps)
        group_losses = {}
        for gi, group in enumerate(layout.groups):
            P = dict(zip(self.names, expanded[0 if self.copies == 1 else gi]))
            flat = form.forward_tasks(group, model, batch[group], self.deriv, params=P)
            group_losses[group] = form.task_loss(group, flat, batch[group], K)
        return layout.combine(group_losses), group_losses

    def __call__(self, expanded: list[list[Tensor]], batch: dict):
        if self.compile in ("reduce-overhead", "max-autotune"):
            # CUDA-graph modes: outputs live in graph-owned memory that the next replay
            # overwrites; one call per training step, and everything derived from it (losses,
            # Jacobians, the update) is consumed before the next call
            torch.compiler.cudagraph_mark_step_begin()
        return self._fn(expanded, batch)


def segmented_task_gradients(model: nn.Module, form: Formulation, batch: dict, layout: TaskLayout,
                             deriv: str = "fast", losses_fn: SegmentedLosses | None = None, grad_hook=None):
    """Task losses and per-parameter Jacobians from one forward and one backward pass.

    Args:
        model: an APNN with ``forward(method, *args)``.
        form: the loss formulation.
        batch: ``form.sample_batch(...)``: per group, tensors with a leading task axis K.
        layout: the task layout.
        deriv: input-derivative mode (see :func:`hrgrad_ext.train.losses.value_and_derivatives`).
        losses_fn: a :class:`SegmentedLosses` to reuse (e.g. a compiled one); built from the
            other arguments when omitted.
        grad_hook: ``grad_hook(copy, i, grad)`` is called with each ``[K, *params[i].shape]``
            block of task gradients (copy ``copy`` of parameter ``i``) as soon as the backward
            pass has produced it, and takes it over (a distributed run sends it to the other
            ranks while the backward pass goes on); ``jacobians`` is then ``None``.

    Returns ``(losses [T] detached, group_losses {group: [K] detached}, jacobians)`` with
    ``jacobians[i]`` of shape ``[T, *params[i].shape]`` for ``params = list(model.parameters())``.
    """
    if losses_fn is None:
        losses_fn = SegmentedLosses(model, form, layout, deriv)
    params = [p for p in model.parameters() if p.requires_grad]
    K = len(layout.eps)
    copies = losses_fn.copies
    expanded = [[p.unsqueeze(0).expand(K, *p.shape) for p in params] for _ in range(copies)]
    losses, group_losses = losses_fn(expanded, batch)
    leaves = [e for copy in expanded for e in copy]
    if grad_hook is not None:
        for c, copy in enumerate(expanded):
            for i, e in enumerate(copy):
                e.register_hook(functools.partial(_hand_over, grad_hook, c, i))
        torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        return losses.detach(), {g: v.detach() for g, v in group_losses.items()}, None
    grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
    grads = [torch.zeros_like(e) if g is None else g for g, e in zip(grads, leaves)]
    n = len(params)
    if copies == 1:
        jacobians = grads
    else:
        # [G][n] of [K, ...] -> per parameter [K, G, ...] -> [K*G, ...] (task k*G + g)
        jacobians = [torch.stack([grads[c * n + i] for c in range(copies)], 1).reshape(K * copies, *params[i].shape)
                     for i in range(n)]
    return losses.detach(), {g: v.detach() for g, v in group_losses.items()}, jacobians


def _hand_over(grad_hook, copy: int, i: int, grad: Tensor) -> Tensor:
    grad_hook(copy, i, grad)
    # what autograd.grad returns for this leaf: a zero view (no memory), so that the full
    # block is freed as soon as the hook has copied it
    return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)


def task_losses(model: nn.Module, form: Formulation, batch: dict, layout: TaskLayout, k: int,
                deriv: str = "autograd") -> dict[str, Tensor]:
    """Group losses of eps-task ``k`` alone (0-d each), evaluated eagerly with the model's own
    parameters: the plain single-task APNN loss."""
    out = {}
    for group in layout.groups:
        inp = {name: t[k] for name, t in batch[group].items()}
        res = form.forward(group, lambda method, *a: model(method, *a), inp, deriv)
        one = {name: t.unsqueeze(0) for name, t in inp.items()}
        out[group] = form.task_loss(group, res, one, 1, task=k)[0]
    return out


def separate_task_gradients(model: nn.Module, form: Formulation, batch: dict, layout: TaskLayout,
                            deriv: str = "autograd"):
    """The same as :func:`segmented_task_gradients` the plain way: per task, an eager forward
    on its segment and its own backward pass (K or K*G backward passes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses, per_task = [], []
    for k in range(len(layout.eps)):
        groups = task_losses(model, form, batch, layout, k, deriv)
        items = [sum(groups.values())] if layout.mode == "eps" else [groups[g] for g in layout.groups]
        for j, L in enumerate(items):
            g = torch.autograd.grad(L, params, allow_unused=True, retain_graph=j < len(items) - 1)
            per_task.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
            losses.append(L.detach())
    jacobians = [torch.stack([per_task[t][i] for t in range(len(per_task))]) for i in range(len(params))]
    return torch.stack(losses), jacobians
