"""The shared number checks (hrgrad_ext._checks) that every option validation goes through."""
import math

import numpy as np
import pytest

from hrgrad_ext._checks import is_finite_number, is_integer, is_number


@pytest.mark.parametrize("value, number, finite", [
    (1, True, True), (0.5, True, True), (np.float32(0.5), True, True), (np.int64(3), True, True),
    (math.inf, True, False), (math.nan, True, False), (True, False, False), (np.bool_(True), False, False),
    ("1", False, False), (None, False, False), ([1.0], False, False), (1j, False, False),
])
def test_numbers_exclude_bools_strings_and_complex(value, number, finite):
    assert is_number(value) is number
    assert is_finite_number(value) is finite


@pytest.mark.parametrize("value, low, expected", [
    (0, 0, True), (5, 1, True), (np.int32(2), 1, True), (0, 1, False), (-1, 0, False),
    (True, 0, False), (False, 0, False), (np.bool_(False), 0, False), (1.0, 0, False), ("2", 0, False),
])
def test_integers_exclude_bools_floats_and_strings(value, low, expected):
    assert is_integer(value, low) is expected
