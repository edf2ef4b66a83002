"""The custom ops of ``torch.ops.hrgrad_ext`` with validated Python wrappers.

Importing this module registers the fake (meta) kernels and the autograd formulas of the
ops, so they work with ``torch.compile`` and ``torch.autograd``.
"""

from .gram import (
    LENGTH_MODELS,
    Status,
    combine,
    combine_into_grads,
    gram,
    gram_of_list,
    hrgrad,
    hrgrad_weights,
)

__all__ = [
    "LENGTH_MODELS",
    "Status",
    "combine",
    "combine_into_grads",
    "gram",
    "gram_of_list",
    "hrgrad",
    "hrgrad_weights",
]
