"""Multi-task gradient aggregators with one interface, one small module per method.

Every aggregator maps a Jacobian ``J`` (``[K, n]``, one task gradient per row) to an update
``[n]`` via :meth:`Aggregator.__call__`, and can report the weights ``w`` with
``update = J^T w`` (:meth:`Aggregator.weights`). Aggregators whose weights depend on ``J`` only
through its Gram matrix ``G = J J^T`` derive from :class:`GramianAggregator` and also accept
``G`` directly (:meth:`GramianAggregator.weights_from_gram`): that is what lets
:func:`hrgrad_ext.backward` work on models whose parameters live in many tensors without ever
concatenating their gradients.

Loss-weighting methods (ReLoBRaLo, GradNorm, SoftAdapt: ``needs_losses``) also take each step's
task losses through :meth:`Aggregator.observe_losses`; stateful ones (those and learning-rate
annealing) keep their state as tensors (``state_dict()``), which training checkpoints hold.

Adding a method: a module here with a class decorated ``@register("name")`` and one import
line below; the training config (``method = "name"``), the CLI (``--method``, ``compare
--methods``, ``demo``) and :func:`make_aggregator` pick it up from :data:`AGGREGATORS`.
"""

from ._base import AGGREGATORS, Aggregator, GramianAggregator, make_aggregator, register
from ._cone import SolverAggregator

# Registration order is the order of METHODS (the CLI's and the demo's listing).
from .hrgrad import HRGrad
from .sum import Sum
from .mean import Mean
from .pcgrad import PCGrad
from .config import ConFIG
from .mgda import MGDA
from .upgrad import UPGrad
# loss-weighting methods of PINN practice (need the task losses / keep state between steps)
from .relobralo import ReLoBRaLo
from .lra import LearningRateAnnealing
from .gradnorm import GradNorm
from .softadapt import SoftAdapt
from ._weighting import LossWeighting

#: The registered method names, in registration order.
METHODS: tuple[str, ...] = tuple(AGGREGATORS)

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "ConFIG",
    "GradNorm",
    "GramianAggregator",
    "HRGrad",
    "LearningRateAnnealing",
    "LossWeighting",
    "METHODS",
    "MGDA",
    "Mean",
    "PCGrad",
    "ReLoBRaLo",
    "SoftAdapt",
    "SolverAggregator",
    "Sum",
    "UPGrad",
    "make_aggregator",
    "register",
]
