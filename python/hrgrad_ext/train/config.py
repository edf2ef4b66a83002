"""Training configuration: a dataclass tree read from TOML files and ``key=value`` overrides.

Unknown keys and invalid values raise ``ValueError`` with the offending key named, so a typo in
a config never silently trains something else.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# METHODS: the aggregation methods accepted by ``method``, i.e. the registry of
# hrgrad_ext.aggregators (see hrgrad_ext.aggregators.make_aggregator); re-exported here.
from ..aggregators import METHODS
from .._checks import is_finite_number, is_integer, is_number

__all__ = ["DISTRIBUTED_MODES", "DistributedConfig", "LBFGSConfig", "METHODS", "NONFINITE_POLICIES", "PROBLEMS", "DivergenceConfig", "TrainConfig", "default_config_path", "default_config", "presets", "load_config", "apply_overrides", "to_toml"]

PROBLEMS = ("transport", "bgk")
_DTYPES = ("float32", "float64")
#: ``compile`` values: off, or a torch.compile mode for the segmented loss function.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DEVICES = ("cpu", "cuda")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule.

    ``schedule``: ``"constant"``, ``"cosine"`` (to ``min_factor * lr`` at the last step),
    ``"exponential"`` (``gamma`` per ``step_size`` steps, smoothly) or ``"step"`` (``gamma``
    every ``step_size`` steps); ``warmup`` steps of linear warm-up precede any of them.
    ``ema``: decay of an exponential moving average of the parameters (0 = off), used for
    evaluation, plots and the summary. Collocation training with fresh random points each
    step is noisy (the errors of one run move by ~2x between evaluations); the average
    smooths that out at the cost of one parameter copy.
    ``clip_norm``: the aggregated update is rescaled to at most this 2-norm before the optimizer
    step (0 = off); collocation losses can spike by 100x within a few steps (seen on BGK late
    in a run), and one huge step also poisons Adam's moment estimates.
    ``lr_factors``: per network of the model (its attribute name: BGK ``f_net``, ``rho_net``,
    ``u_net``, ``T_net``; transport ``rho_net``, ``g_net``), a factor on the learning rate of
    its parameters (``{ rho_net = 0.5 }``; the others keep ``lr``). The schedule and the
    divergence policy's ``lr_factor`` scale every group alike; the L-BFGS phase ignores it.
    Not with a sharded distributed run (its optimizer steps one flat slice of all parameters).
    """

    name: str = "adam"
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0
    min_factor: float = 0.05
    gamma: float = 0.5
    step_size: int = 1000
    ema: float = 0.0
    clip_norm: float = 0.0
    lr_factors: dict = field(default_factory=dict)


@dataclass
class LogConfig:
    """Logging, evaluation, checkpointing and plotting cadence (in steps)."""

    log_every: int = 10
    eval_every: int = 500
    checkpoint_every: int = 500
    progress: bool = True
    plots: bool = True


#: ``divergence.on_nonfinite`` policies.
NONFINITE_POLICIES = ("stop", "skip", "rollback")


@dataclass
class DivergenceConfig:
    """What the trainer does when a task loss, a task gradient or the update is NaN or Inf.

    The check runs every step without a host synchronisation: the flags are computed on the
    device, the update of a bad step is dropped there (on CUDA by the fused optimizer's
    ``found_inf`` input, as in mixed-precision training), and the host reads the flags with the
    losses it already copies for the progress bar. Whatever the policy, a non-finite update
    never reaches the parameters or the optimizer state.

    ``on_nonfinite``:
        ``"stop"`` (default): stop with an error naming the task(s) and the step; no
        checkpoint of that step is written (exit code 3 from ``hrgrad-ext train``).
        ``"skip"``: drop the step's update, log it (a ``"skip"`` record in ``metrics.jsonl``)
        and go on; stop after ``max_skips`` consecutive skipped steps.
        ``"rollback"``: reload the last good checkpoint, multiply the learning rate by
        ``lr_factor``, log it (a ``"rollback"`` record) and go on; stop after
        ``max_rollbacks`` rollbacks in the run. A fresh run writes a checkpoint at step 0 so
        that there is always one to go back to.
    """

    on_nonfinite: str = "stop"
    max_skips: int = 10
    max_rollbacks: int = 3
    lr_factor: float = 0.5


@dataclass
class LBFGSConfig:
    """A quasi-Newton fine-tuning phase after the Adam steps (``[lbfgs]``; off by default).

    After ``iters`` optimizer steps the run takes ``steps`` more steps of
    :class:`torch.optim.LBFGS` (strong Wolfe line search, ``history`` pairs, up to ``inner``
    iterations per step) on the weighted loss ``sum_i w_i L_i`` of a fixed batch with
    ``points`` times the usual number of points per task and group. The weights ``w`` are the
    run's aggregator's on that batch at the start (HRGrad's: the equal-angle weights at the end
    of the Adam phase), frozen; every ``resample_every`` steps (0: never) a new batch is drawn,
    the weights are taken again and the L-BFGS history restarts. The phase starts from the
    parameter average when ``optim.ema`` is on; during it the evaluation uses the current
    parameters. ``eval_every``: evaluation and checkpoint interval of the phase, in its steps.

    ``min_weight``: every frozen weight is raised to at least ``min_weight`` times the mean of
    the weights' positive parts. HRGrad's (and PCGrad's, UPGrad's ...) weights can be negative on a
    batch (the direction still has a positive inner product with every task gradient), but a
    loss with a negative weight makes ``sum_i w_i L_i`` unbounded below, and L-BFGS then drives
    that task's loss up without bound (seen: a weight of -0.12 took its task loss from 0.6 to
    3.6e6 in two steps). A weight near 0 leaves its task unconstrained for a whole batch, hence
    a positive floor rather than 0.
    Collocation methods usually finish with L-BFGS; whether it pays here is measured in
    ``docs/RESULTS.md``.
    """

    steps: int = 0
    inner: int = 20
    points: int = 4
    history: int = 50
    resample_every: int = 0
    eval_every: int = 10
    min_weight: float = 0.1


#: ``distributed.mode`` values (:data:`hrgrad_ext.distributed.MODES`).
DISTRIBUTED_MODES = ("data_parallel", "sharded")


@dataclass
class DistributedConfig:
    """How a run started by ``torchrun`` or ``hrgrad-ext train --nproc N`` is distributed
    (ignored by a single process, except ``shards``).

    ``mode``: ``"data_parallel"`` (every rank holds the model and the optimizer; the per-task
    gradients are all-reduced) or ``"sharded"`` (the per-task gradients are reduce-scattered,
    each rank keeps them and the optimizer state for its share of the parameters only); both
    give the single-process update on the global batch (:mod:`hrgrad_ext.distributed`).
    ``backend``: ``"auto"`` (gloo on the CPU, NCCL on CUDA), ``"gloo"`` or ``"nccl"``.
    ``shards``: the points of a step come in this many equal shares (``points`` each), each
    drawn from its own random stream (seeded from ``seed`` and the share's index); each rank
    draws ``shards / world_size`` of them. 0 (default) means one per rank, fixed to the world
    size when the run starts and recorded in its ``config.toml``, so a resumed run draws the
    same points with any world size that divides it (one process included).
    ``timeout_s``: collectives wait at most this long for the other ranks (the process group's
    timeout); a rank that dies is normally noticed at once, this bounds the rest.
    ``bucket_mb``: size of one task's share of a gradient bucket (as DDP's ``bucket_cap_mb``).
    """

    mode: str = "data_parallel"
    backend: str = "auto"
    shards: int = 0
    timeout_s: float = 1800.0
    bucket_mb: float = 25.0


@dataclass
class TrainConfig:
    """Everything a training run depends on (the resolved config is saved next to its outputs).

    Attributes:
        problem: ``"transport"`` or ``"bgk"``.
        method: aggregation method, one of :data:`METHODS` (``"sum"`` is plain APNN training).
        eps: the task set (eps for transport, Kn for BGK); all > 0, at least one.
        iters: optimizer steps (>= 1).
        tasks: ``"eps"`` (one task per eps) or ``"eps_group"`` (one per eps and point group).
        seed, device, dtype: reproducibility and placement.
        threads: CPU threads for torch (0: leave torch's default).
        t_final: end of the time window: one number; or per-task windows, as one number per
            eps or as a table eps -> window end (each task takes the window of the nearest key
            in log10 eps, so the table survives a change of the eps list), e.g. the anchor's
            [0, 1] for transport at eps = 1 and [0, 0.1] below: ``{"1" = 1.0, "0.1" = 0.1}``.
            Each task's points, time input scaling and scoring time follow its window.
            ``nv``: velocity nodes (0: the problem's default).
        case: BGK initial data case ("I" .. "V").
        points: points per task and group (``interior``, ``boundary``, ``initial``; BGK has a
            boundary group only with its inflow term ``bc_f`` on, and ``cells``, the number of
            space-time cells of its integral conservation residual, only with ``weak`` on).
        loss_weights: overrides of the formulation's loss weights (the names in
            ``TransportFormulation.WEIGHTS`` / ``BGKFormulation.WEIGHTS``).
        group_weights: per-task factors on whole point-group losses, ``{group: weight}`` with
            the weight a number (every task) or a table eps -> number (each task takes the
            value of the nearest key in log10 eps, as in ``t_final``), e.g. BGK's integral
            conservation residual at 3x for Kn >= 0.1 only: ``{cells = {"1" = 3.0, "0.1" =
            3.0, "0.01" = 1.0}}``. Task k's loss is then ``sum_g w_g(eps_k) L_g(eps_k)``;
            ``loss_weights`` weigh terms within a group, the same for every task.
        sampling: point placement options; transport: ``front`` (fraction of the interior and
            initial points drawn where the inflow can have reached by time t,
            x < span min(t / eps, sqrt(t));
            0 = uniform) and ``span`` (the factor on that reach); ``wall`` (fraction of the
            interior points in the inflow wall's boundary layer, x exponential with mean
            ``wall_span * eps``; 0 = none) and ``wall_span``. BGK: the cells of the integral
            conservation residual (loss weight ``weak``), ``cell_dx`` (x width, default 0.05)
            and ``cell_dt`` (height as a fraction of the task window, default 0.25).
        causal: causal weighting in time of the interior loss (Wang, Sankaran & Perdikaris
            2022, "Respecting causality"; empty = off): ``bins`` time bins per task window,
            the points of bin i weighted by ``exp(-tol * sum_{j < i} L_j)`` (L_j: the mean
            interior loss of bin j, not differentiated), so later times count once earlier
            ones are fitted.
        compression: BGK only (empty = off): the interior residuals weighted by ``1 / (k_Kn
            (|u_x| - u_x) + 1)`` where the flow is compressed, ``k_Kn = k knee / (Kn + knee)``
            (``knee`` 0 or absent: ``k``), so that the networks' smeared shocks are not held
            back by the residuals inside them (weighted equations, Liu et al. 2024), see
            :meth:`hrgrad_ext.train.losses.BGKFormulation.compression_weights`.
        kinetic_knee: BGK only (0 = off): the squared kinetic residual of every interior
            point weighted by ``((1 + knee) / (Kn + knee))^2`` (1 at Kn = 1). The AP residual
            ``Kn (f_t + v f_x) - (M - f)`` is O(Kn) at small Kn, where f's deviation from M is
            what it is about, so its square falls like Kn^2 beside the conservation terms and
            the kinetic equation no longer pins that deviation (the Navier-Stokes-like stress
            and heat flux at intermediate Kn); the weight restores it down to Kn ~ knee and
            stays bounded below (asymptotic preservation), see
            :meth:`hrgrad_ext.train.losses.BGKFormulation.kinetic_weights`.
        weak_closure: BGK only (0 = off; needs ``loss_weights.weak`` and the maxwellian f form):
            the cells of the integral conservation residual of the tasks with Kn below it take
            their fluxes from f without the f network's deviation, ``M exp(C)`` (C the
            Chapman-Enskog term when ``model.chapman_enskog`` is on) plus the uncollided part.
            At small Kn the kinetic residual is O(Kn) and barely prices the f network's share
            of f, which can then carry a flux that makes a smeared shock conservative; the
            closure is f's to O(Kn^2) there, see
            :meth:`hrgrad_ext.train.losses.BGKFormulation.cell_residuals`.
        adaptive: residual-based adaptive sampling of the interior points (RAD, Wu et al.
            2023; empty = off): every ``every`` steps (default 100) a pool of ``pool`` (8) times
            the interior points per task is drawn from the problem's own density and scored by
            the per-point residual loss r; each step draws its points from the pool with
            probability ~ ``r^k / mean(r^k) + c`` (``k`` = 1, ``c`` = 1), see
            :mod:`hrgrad_ext.train.adaptive`. ``groups`` (default ``["interior"]``): BGK with
            ``weak`` on also places its cells this way with ``"cells"`` (each scored by its
            squared integral conservation residual).
        model: ``encoding`` (``fourier``, ``embed_dim``, optional ``log10_min/max``) and the
            networks (transport ``rho``, ``g``; BGK ``f``, ``macro``) as ``kind``/``width``/
            ``depth``/``activation``; transport also ``reach`` (x input scaled by
            min(1, reach / eps)), ``half_range`` (sign(v) as a g input) and ``wall_layer``
            (the wall boundary-layer shapes exp(-distance / eps) as inputs for eps >= it) and
            ``first_collision`` (for eps >= it, f = the exact uncollided flux + the collided
            part the networks draw), see :class:`hrgrad_ext.nn.TransportAPNN`.
        aggregator: options per method, e.g. ``{hrgrad = {length_model = "min"}}`` (the
            aggregator's constructor arguments: HRGrad ``length_model``, ``rcond``; UPGrad and
            MGDA ``rcond``; ReLoBRaLo ``alpha``, ``expected_rho``, ``temperature``; lra
            ``alpha``, ``reference``, ``every``; GradNorm ``alpha``, ``lr``; SoftAdapt ``beta``,
            ``variant``; PCGrad and ReLoBRaLo take the run's ``seed``); methods not listed get
            their defaults, so one config serves every method of a comparison.
        grad_mode: ``"segmented"`` (per-task gradients in one pass) or ``"separate"`` (K
            eager backward passes; the baseline).
        compile: ``"off"`` or a :func:`torch.compile` mode (``"default"``,
            ``"reduce-overhead"``: CUDA graphs on a GPU, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``) for the segmented loss function (forward and its
            backward graph); the first step pays the compilation (about a minute).
        optim, log, divergence, distributed, lbfgs: see :class:`OptimConfig`,
            :class:`LogConfig`, :class:`DivergenceConfig`, :class:`DistributedConfig`,
            :class:`LBFGSConfig` (``[optim]``, ``[log]``, ``[divergence]``, ``[distributed]``,
            ``[lbfgs]`` tables).
        out: output directory.
    """

    problem: str = "transport"
    method: str = "hrgrad"
    eps: list = field(default_factory=lambda: [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-8])
    iters: int = 2000
    tasks: str = "eps"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    t_final: float | list | dict = 0.1
    nv: int = 0
    case: str = "IV"
    points: dict = field(default_factory=lambda: {"interior": 64, "boundary": 16, "initial": 32})
    loss_weights: dict = field(default_factory=dict)
    group_weights: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    causal: dict = field(default_factory=dict)
    compression: dict = field(default_factory=dict)
    kinetic_knee: float = 0.0
    weak_closure: float = 0.0
    adaptive: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    aggregator: dict = field(default_factory=dict)
    grad_mode: str = "segmented"
    compile: str = "off"
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lbfgs: LBFGSConfig = field(default_factory=LBFGSConfig)
    out: str = "runs/run"

    @property
    def total_steps(self) -> int:
        """The steps of the whole run: ``iters`` optimizer steps and the L-BFGS phase's."""
        return self.iters + self.lbfgs.steps

    def _check_bgk_knee(self, name: str, what_is: str) -> bool:
        """Checks the BGK-only Kn threshold ``name`` (a finite number >= 0, 0 = off); whether
        it is on."""
        value = getattr(self, name)
        if not (is_finite_number(value) and value >= 0):
            raise ValueError(f"{name}: must be a finite number >= 0 (0 = off), got {value!r}")
        if value > 0 and self.problem != "bgk":
            raise ValueError(f"{name}: {what_is} BGK's; {self.problem} has none")
        return value > 0

    def validate(self) -> "TrainConfig":
        """Checks every field; returns ``self`` (raises ``ValueError`` with the key named)."""
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem: unknown problem {self.problem!r}; expected one of {PROBLEMS}")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; expected one of {METHODS}")
        if not isinstance(self.eps, (list, tuple)) or len(self.eps) == 0:
            raise ValueError("eps: the task set is empty; give at least one eps value, e.g. eps = [1.0, 1e-3]")
        try:
            if any(isinstance(e, bool) for e in self.eps):
                raise TypeError("a bool is not an eps")
            eps = [float(e) for e in self.eps]
        except (TypeError, ValueError):
            raise ValueError(f"eps: values must be numbers, got {self.eps!r}") from None
        bad = [e for e in eps if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(f"eps: every value must be a finite number > 0, got {bad}")
        if len(set(eps)) != len(eps):
            raise ValueError(f"eps: duplicate values in {eps}")
        self.eps = eps
        if not is_integer(self.iters, 1):
            raise ValueError(f"iters: must be an integer >= 1, got {self.iters!r}")
        if self.tasks not in ("eps", "eps_group"):
            raise ValueError(f"tasks: expected 'eps' or 'eps_group', got {self.tasks!r}")
        if self.device.split(":")[0] not in _DEVICES:
            raise ValueError(f"device: expected 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")
        if self.grad_mode not in ("segmented", "separate"):
            raise ValueError(f"grad_mode: expected 'segmented' or 'separate', got {self.grad_mode!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile: expected one of {COMPILE_MODES}, got {self.compile!r}")
        if self.compile != "off" and self.grad_mode != "segmented":
            raise ValueError("compile: only the segmented gradient path is compiled; set grad_mode = 'segmented'")
        self.t_final = _check_windows(self.t_final, eps)
        if not isinstance(self.loss_weights, dict) or not all(map(is_finite_number, self.loss_weights.values())):
            raise ValueError(f"loss_weights: expected a table name -> finite number, e.g. loss_weights = {{ bc = 10.0 }}; "
                             f"got {self.loss_weights!r}")
        self.group_weights = _check_group_weights(self.group_weights, self.problem, self.loss_weights)
        if self.tasks == "eps_group":
            for g, ws in task_group_weights(self).items():
                for e, w in zip(eps, ws if isinstance(ws, list) else [ws] * len(eps)):
                    if w == 0:
                        raise ValueError(f"group_weights.{g}: weight 0 at eps = {e:g} makes that (eps, group) task "
                                         f"of tasks = 'eps_group' a zero task (MGDA's update is then 0); leave "
                                         f"the group out with tasks = 'eps', or give it a weight > 0")
        for key in ("nv", "threads"):
            if not is_integer(getattr(self, key), 0):
                raise ValueError(f"{key}: must be an integer >= 0, got {getattr(self, key)!r}")
        o = self.optim
        if o.name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optim.name: expected 'adam', 'adamw' or 'sgd', got {o.name!r}")
        if not (is_finite_number(o.lr) and o.lr > 0):
            raise ValueError(f"optim.lr: must be a finite number > 0, got {o.lr!r}")
        if o.schedule not in ("constant", "cosine", "exponential", "step"):
            raise ValueError(f"optim.schedule: expected constant, cosine, exponential or step, got {o.schedule!r}")
        # the bool test matters here: TOML's `true` is the int 1 to Python, and a decay of 1 or a
        # clip of 1 taken from a typo is a silently different run
        if not (is_integer(o.warmup, 0) and is_integer(o.step_size, 1) and is_number(o.gamma) and 0 < o.gamma <= 1
                and is_number(o.min_factor) and 0 <= o.min_factor <= 1):
            raise ValueError("optim: need integers warmup >= 0 and step_size >= 1, numbers 0 < gamma <= 1 and "
                             f"0 <= min_factor <= 1; got warmup = {o.warmup!r}, step_size = {o.step_size!r}, "
                             f"gamma = {o.gamma!r}, min_factor = {o.min_factor!r}")
        if not (isinstance(o.betas, (list, tuple)) and len(o.betas) == 2
                and all(is_number(b) and 0 <= b < 1 for b in o.betas)):
            raise ValueError(f"optim.betas: expected two numbers in [0, 1), e.g. [0.9, 0.999]; got {o.betas!r}")
        for key in ("momentum", "weight_decay"):
            if not (is_finite_number(getattr(o, key)) and getattr(o, key) >= 0):
                raise ValueError(f"optim.{key}: must be a finite number >= 0, got {getattr(o, key)!r}")
        if not (is_finite_number(o.clip_norm) and o.clip_norm >= 0):
            raise ValueError(f"optim.clip_norm: must be a finite number >= 0 (0 = off), got {o.clip_norm!r}")
        if not (is_number(o.ema) and 0.0 <= o.ema < 1.0):
            raise ValueError(f"optim.ema: the decay must be a number in [0, 1) (0 = off), got {o.ema!r}")
        if not isinstance(o.lr_factors, dict) or not all(
                is_finite_number(f) and f > 0 for f in o.lr_factors.values()):
            raise ValueError(f"optim.lr_factors: expected a table network -> finite number > 0, e.g. "
                             f"lr_factors = {{ rho_net = 0.5 }}; got {o.lr_factors!r}")
        if not isinstance(self.aggregator, dict) or any(not isinstance(v, dict) for v in self.aggregator.values()):
            raise ValueError("aggregator: expected a table of per-method option tables, e.g. aggregator.hrgrad.length_model")
        unknown = set(self.aggregator) - set(METHODS)
        if unknown:
            raise ValueError(f"aggregator: unknown method(s) {sorted(unknown)}; expected some of {METHODS}")
        if not isinstance(self.sampling, dict):
            raise ValueError("sampling: expected a table, e.g. sampling = { front = 0.5, span = 2.0 }")
        own = {"transport": ("front", "span", "wall", "wall_span"), "bgk": ("cell_dx", "cell_dt")}[self.problem]
        unknown = set(self.sampling) - set(own)
        if unknown:
            raise ValueError(f"sampling: unknown option(s) {sorted(unknown)} for {self.problem}; expected some of "
                             + ", ".join(repr(k) for k in own))
        if not isinstance(self.causal, dict) or set(self.causal) - {"bins", "tol"}:
            raise ValueError(f"causal: expected a table with 'bins' and 'tol', e.g. causal = {{ bins = 16, tol = 1.0 }}; "
                             f"got {self.causal!r}")
        if self.causal:
            bins, tol = self.causal.get("bins"), self.causal.get("tol")
            if not is_integer(bins, 2):
                raise ValueError(f"causal.bins: the number of time bins must be an integer >= 2, got {bins!r}")
            if not (is_number(tol) and tol > 0):
                raise ValueError(f"causal.tol: the causality tolerance must be > 0, got {tol!r}")
        if not isinstance(self.compression, dict) or set(self.compression) - {"k", "knee"}:
            raise ValueError("compression: expected a table with 'k' and optionally 'knee', e.g. "
                             f"compression = {{ k = 1.0, knee = 0.1 }}; got {self.compression!r}")
        if self.compression:
            if self.problem != "bgk":
                raise ValueError(f"compression: the compression weights are BGK's (shocks); {self.problem} has none")
            for key, positive in (("k", True), ("knee", False)):
                v = self.compression.get(key, 0.0)
                if not (is_finite_number(v) and (v > 0 if positive else v >= 0)):
                    raise ValueError(f"compression.{key}: must be a finite number {'> 0' if positive else '>= 0'}, "
                                     f"got {v!r}")
        self._check_bgk_knee("kinetic_knee", "the kinetic residual's Kn weights are")
        if self._check_bgk_knee("weak_closure", "the cells' flux closure is"):
            if not float(self.loss_weights.get("weak", 0.0)) > 0:
                raise ValueError("weak_closure: needs the integral conservation residual on (loss_weights.weak > 0)")
            if self.model.get("f_form", "free") != "maxwellian":
                raise ValueError("weak_closure: needs model.f_form = 'maxwellian' (the free f form has no closure)")
        if not isinstance(self.adaptive, dict) or set(self.adaptive) - {"every", "pool", "k", "c", "groups"}:
            raise ValueError("adaptive: expected a table with some of 'every', 'pool', 'k', 'c', 'groups', e.g. "
                             f"adaptive = {{ every = 100, pool = 8 }}; got {self.adaptive!r}")
        groups = self.adaptive.get("groups", ["interior"])
        own = ("interior", "cells") if self.problem == "bgk" else ("interior",)
        if (not isinstance(groups, (list, tuple)) or not groups or len(set(map(str, groups))) != len(groups)
                or any(g not in own for g in groups)):
            raise ValueError(f"adaptive.groups: expected distinct point groups out of {list(own)} for {self.problem}, "
                             f"got {groups!r}")
        if "cells" in groups and not float(self.loss_weights.get("weak", 0.0)) > 0:
            raise ValueError("adaptive.groups: 'cells' places the cells of BGK's integral conservation residual, "
                             "which is off: set loss_weights.weak > 0")
        for key in ("every", "pool"):
            v = self.adaptive.get(key, 1)
            if not is_integer(v, 1):
                raise ValueError(f"adaptive.{key}: must be an integer >= 1, got {v!r}")
        for key in ("k", "c"):
            v = self.adaptive.get(key, 1.0)
            if not (is_finite_number(v) and v >= 0):
                raise ValueError(f"adaptive.{key}: must be a finite number >= 0, got {v!r}")
        lg = self.log
        for k in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(lg, k) < 1:
                raise ValueError(f"log.{k}: must be >= 1, got {getattr(lg, k)}")
        ds = self.distributed
        if ds.mode not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed.mode: expected one of {DISTRIBUTED_MODES}, got {ds.mode!r}")
        if ds.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"distributed.backend: expected 'auto', 'gloo' or 'nccl', got {ds.backend!r}")
        if not is_integer(ds.shards, 0):
            raise ValueError(f"distributed.shards: must be an integer >= 0 (0: one per rank), got {ds.shards!r}")
        for k in ("timeout_s", "bucket_mb"):
            v = getattr(ds, k)
            if not (is_finite_number(v) and v > 0):
                raise ValueError(f"distributed.{k}: must be a number > 0, got {v!r}")
        dv = self.divergence
        if dv.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"divergence.on_nonfinite: expected one of {NONFINITE_POLICIES}, got {dv.on_nonfinite!r}")
        for k in ("max_skips", "max_rollbacks"):
            v = getattr(dv, k)
            if not is_integer(v, 1):
                raise ValueError(f"divergence.{k}: must be an integer >= 1, got {v!r}")
        if not (is_number(dv.lr_factor) and 0 < dv.lr_factor < 1):
            raise ValueError(f"divergence.lr_factor: the learning rate factor of a rollback must be in (0, 1), "
                             f"got {dv.lr_factor!r}")
        lb = self.lbfgs
        for k in ("steps", "inner", "points", "history", "resample_every", "eval_every"):
            v = getattr(lb, k)
            low = 0 if k in ("steps", "resample_every") else 1
            if not is_integer(v, low):
                raise ValueError(f"lbfgs.{k}: must be an integer >= {low}, got {v!r}")
        if not (is_number(lb.min_weight) and 0 < lb.min_weight <= 1):
            raise ValueError(f"lbfgs.min_weight: the weights' floor, relative to the mean of their positive parts, must be in (0, 1], "
                             f"got {lb.min_weight!r}")
        if self.causal and self.distributed.shards > 1:
            raise ValueError("causal: the causal weighting runs in one process; it is not available with "
                             "distributed.shards > 1")
        if self.adaptive and self.distributed.shards > 1:
            raise ValueError("adaptive: the adaptive sampling runs in one process; it is not available with "
                             "distributed.shards > 1")
        if lb.steps and self.distributed.shards > 1:
            raise ValueError("lbfgs: the L-BFGS phase runs in one process; it is not available with distributed.shards > 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_windows(t_final, eps: list[float]):
    """Validates ``t_final`` (a number, one number per eps, or a table eps -> window end) by
    building the windows it describes, and returns it normalised (floats; table keys as
    written)."""
    from ..nn import TimeWindows

    table = isinstance(t_final, dict)
    try:
        if table:
            TimeWindows([float(k) for k in t_final], list(t_final.values()))
        else:
            TimeWindows(eps, t_final)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if not msg.startswith("t_final"):
            msg = f"t_final: expected a number > 0, one per eps, or a table eps -> window end such as {{\"1\" = 1.0, \"0.1\" = 0.1}} ({msg})"
        raise ValueError(msg) from None
    if table:
        return {str(k): float(v) for k, v in t_final.items()}
    return [float(t) for t in t_final] if isinstance(t_final, (list, tuple)) else float(t_final)


def task_windows(cfg: "TrainConfig") -> float | list[float]:
    """``cfg.t_final`` resolved for the task set: a number, or one window end per eps (a table
    gives each eps the window of its nearest key in log10 eps)."""
    if isinstance(cfg.t_final, dict):
        from ..nn import TimeWindows

        table = TimeWindows([float(k) for k in cfg.t_final], list(cfg.t_final.values()))
        return [table.end(e) for e in cfg.eps]
    return cfg.t_final


def _check_group_weights(group_weights, problem: str, loss_weights: dict) -> dict:
    """Validates ``group_weights`` ({group: number or table eps -> number}) against the point
    groups of ``problem`` with ``loss_weights`` and returns it normalised (floats; table keys as
    written)."""
    from .losses import BGKFormulation, TransportFormulation

    if not isinstance(group_weights, dict):
        raise ValueError(f"group_weights: expected a table group -> weight, e.g. group_weights = {{ cells = 3.0 }}; "
                         f"got {group_weights!r}")
    groups = (TransportFormulation if problem == "transport" else BGKFormulation).point_groups(loss_weights)
    out = {}
    for g, val in group_weights.items():
        if g not in groups:
            raise ValueError(f"group_weights: unknown point group {g!r} for {problem}; expected some of {list(groups)}")
        table = val if isinstance(val, dict) else {"1": val}
        if not table:
            raise ValueError(f"group_weights.{g}: an empty table; give a number or a table eps -> weight")
        seen = {}
        for k, w in table.items():
            try:
                e = float(k)
            except ValueError:
                e = float("nan")
            if not (math.isfinite(e) and e > 0):
                raise ValueError(f"group_weights.{g}: table keys are task eps values > 0, got {k!r} (a table is "
                                 f"given whole: group_weights.{g}={{\"0.1\" = 2.0}})")
            if e in seen:
                raise ValueError(f"group_weights.{g}: the keys {seen[e]!r} and {k!r} are the same eps")
            seen[e] = k
            if not (is_finite_number(w) and w >= 0):
                raise ValueError(f"group_weights.{g}: weights must be finite numbers >= 0, got {w!r}")
        out[g] = {str(k): float(w) for k, w in val.items()} if isinstance(val, dict) else float(val)
    return out


def task_group_weights(cfg: "TrainConfig") -> dict:
    """``cfg.group_weights`` resolved for the task set: per group, a number or one weight per
    eps (a table gives each eps the weight of its nearest key in log10 eps)."""
    from ..nn.windows import nearest_in_log10

    out = {}
    for g, val in cfg.group_weights.items():
        if isinstance(val, dict):
            keys, weights = [float(k) for k in val], list(val.values())
            out[g] = [weights[nearest_in_log10(keys, float(e))] for e in cfg.eps]
        else:
            out[g] = val
    return out


_TABLES = {"optim": OptimConfig, "log": LogConfig, "divergence": DivergenceConfig, "distributed": DistributedConfig,
           "lbfgs": LBFGSConfig}


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown config key {prefix + key!r}; expected one of {sorted(fields)}")
        sub = _TABLES.get(key) if cls is TrainConfig else None
        kwargs[key] = _from_dict(sub, value, f"{prefix}{key}.") if sub else value
    return cls(**kwargs)


def default_config(problem: str = "transport", preset: str = "default") -> TrainConfig:
    """The packaged config of ``problem`` and ``preset``: ``"default"`` is
    ``hrgrad_ext/configs/<problem>.toml`` (sized for a laptop CPU, minutes), another preset
    ``<problem>_<preset>.toml`` (e.g. ``"long"``: the accuracy runs, see :func:`presets`)."""
    if problem not in PROBLEMS:
        raise ValueError(f"problem: unknown problem {problem!r}; expected one of {PROBLEMS}")
    path = default_config_path(problem, preset)
    if not path.is_file():
        raise ValueError(f"preset: no preset {preset!r} for {problem}; expected one of {presets(problem)}")
    return load_config(path)


def default_config_path(problem: str, preset: str = "default") -> Path:
    """Path of a packaged config file of ``problem`` (shipped inside the wheel)."""
    name = problem if preset == "default" else f"{problem}_{preset}"
    return _CONFIGS / f"{name}.toml"


def presets(problem: str) -> list[str]:
    """The packaged presets of ``problem``: ``"default"`` and one per ``<problem>_<name>.toml``."""
    found = sorted(p.stem[len(problem) + 1:] for p in _CONFIGS.glob(f"{problem}_*.toml"))
    return ["default", *found]


_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Reads a TOML config and applies ``overrides`` (a nested dict)."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    if overrides:
        data = _merge(data, overrides)
    return _from_dict(TrainConfig, data)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_value(text: str) -> Any:
    """A TOML value (``1e-3``, ``[1, 0.1]``, ``true``, ``"x"``), or the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Applies ``key.sub=value`` strings (values parsed as TOML) and returns a new config.

    A dotted key changes one entry of a table (``causal.tol=5``). A plain key given a whole value
    replaces it, as the same line in a config file would: ``causal={}`` turns causal weighting
    off, ``t_final={"1" = 1.0}`` is the whole window table. The option tables with defaults of
    their own (``optim``, ``log``, ...) are the exception: ``optim={lr=1e-3}`` changes ``lr`` only.
    """
    data = cfg.to_dict()
    for a in assignments:
        if "=" not in a:
            raise ValueError(f"override {a!r}: expected key=value (e.g. optim.lr=5e-4)")
        key, text = a.split("=", 1)
        parts = key.strip().split(".")
        node = {}
        cur = node
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = parse_value(text.strip())
        if len(parts) == 1 and parts[0] not in _TABLES:
            # merging could not drop a key: `causal={}` must clear the preset's table
            data[parts[0]] = node[parts[0]]
        else:
            data = _merge(data, node)
    return _from_dict(TrainConfig, data)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not (isinstance(v, float) and not math.isfinite(v)) else ("inf" if v > 0 else "nan")
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(a) for a in v) + "]"
    if isinstance(v, dict):
        # quoted keys: a bare "0.1" would be read back as a dotted key
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(a)}" for k, a in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML text (readable back with :func:`load_config`)."""
    data = cfg.to_dict()
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict) and k in _TABLES:
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
