"""hrgrad-ext: HRGrad multi-task gradients and asymptotic-preserving neural networks for
kinetic equations, with fused C++/CUDA custom ops (``torch.ops.hrgrad_ext``).

Importing the package loads the compiled core, which registers the ops.
"""

from __future__ import annotations

import torch  # noqa: F401  (must precede the compiled module: it has no RPATH to torch/lib)

from ._build import build_info, cuda_available
from . import ops
from .ops import combine, gram, hrgrad, hrgrad_ex, hrgrad_weights, hrgrad_weights_ex
from .aggregators import (
    Aggregator,
    ConFIG,
    GradNorm,
    HRGrad,
    LearningRateAnnealing,
    MGDA,
    Mean,
    PCGrad,
    ReLoBRaLo,
    SoftAdapt,
    Sum,
    UPGrad,
)
from .backward import BackwardResult, backward

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "BackwardResult",
    "ConFIG",
    "GradNorm",
    "HRGrad",
    "LearningRateAnnealing",
    "MGDA",
    "Mean",
    "PCGrad",
    "ReLoBRaLo",
    "SoftAdapt",
    "Sum",
    "UPGrad",
    "backward",
    "build_info",
    "combine",
    "cuda_available",
    "gram",
    "hrgrad",
    "hrgrad_ex",
    "hrgrad_weights",
    "hrgrad_weights_ex",
    "ops",
]
