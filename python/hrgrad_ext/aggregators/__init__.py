"""Multi-task gradient aggregators with one interface, one small module per method.

Every aggregator maps a Jacobian ``J`` (``[K, n]``, one task gradient per row) to an update
``[n]`` via :meth:`Aggregator.__call__`, and can report the weights ``w`` with
``update = J^T w`` (:meth:`Aggregator.weights`). Aggregators whose weights depend on ``J`` only
through its Gram matrix ``G = J J^T`` derive from :class:`GramianAggregator` and also accept
``G`` directly (:meth:`GramianAggregator.weights_from_gram`): that is what lets
:func:`hrgrad_ext.backward` work on models whose parameters live in many tensors without ever
concatenating their gradients.

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

#: The registered method names, in registration order.
METHODS: tuple[str, ...] = tuple(AGGREGATORS)

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "ConFIG",
    "GramianAggregator",
    "HRGrad",
    "METHODS",
    "MGDA",
    "Mean",
    "PCGrad",
    "SolverAggregator",
    "Sum",
    "UPGrad",
    "make_aggregator",
    "register",
]
