"""Multi-eps APNN training with segmented task gradients and multi-task aggregation.

* :mod:`.config` - :class:`TrainConfig` (TOML + overrides, validation);
* :mod:`.losses` - the transport and BGK APNN loss formulations per point group;
* :mod:`.segmented` - per-task gradients in one backward pass (and the K-pass reference);
* :mod:`.trainer` - :class:`Trainer` (steps, metrics, evaluation, checkpoints, resume,
  signals, the divergence policy);
* :mod:`.rundir` - the run directory's files: durable, verified checkpoints loaded with
  ``weights_only=True``, metrics lines, the lock; :mod:`.faults` - fault injection for tests;
* :mod:`.distributed` - runs on several processes (``--nproc``, torchrun): shares of the points,
  the step's communication, rank-0 outputs, the launcher;
* :mod:`.evaluation`, :mod:`.plots`, :mod:`.compare` - scoring, figures, method comparison.
"""

from .config import METHODS, PROBLEMS, TrainConfig, apply_overrides, default_config, load_config
from .losses import BGKFormulation, TransportFormulation
from .segmented import TaskLayout, segmented_task_gradients, separate_task_gradients
from .trainer import Trainer, make_aggregator, make_formulation

__all__ = ["BGKFormulation", "METHODS", "PROBLEMS", "TaskLayout", "Trainer", "TrainConfig", "TransportFormulation",
           "apply_overrides", "default_config", "load_config", "make_aggregator", "make_formulation",
           "segmented_task_gradients", "separate_task_gradients"]
