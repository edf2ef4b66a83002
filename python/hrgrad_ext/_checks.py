"""Type checks for user-given numbers, shared by the config, the models, the losses, the
aggregators and the reference solvers.

A bool is not a number here: ``True`` is the int 1 to Python and TOML's ``true`` reaches us as
one, so without the explicit test a typo like ``ema = true`` would be a silently different run
instead of an error that names the option.
"""
from __future__ import annotations

import math
import numbers


def is_number(value) -> bool:
    """A real number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A real number (not a bool) that is neither infinite nor NaN."""
    return is_number(value) and math.isfinite(value)


def is_integer(value, low: int) -> bool:
    """An integer (Python's or NumPy's, not a bool) >= ``low``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and bool(value >= low)
