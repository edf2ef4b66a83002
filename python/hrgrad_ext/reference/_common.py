"""Helpers shared by the reference solvers: argument checks, output-time lists, result storage."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import cache as _cache
from .._checks import is_integer


def check_positive(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number > 0, else a ValueError naming the argument."""
    try:
        val = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(val) or val <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return val


def check_int(name: str, value: Any, minimum: int) -> int:
    """``int(value)`` if it is an integer >= ``minimum``, else a ValueError naming the argument."""
    if not is_integer(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def output_times(t_final: Any) -> tuple[np.ndarray, bool]:
    """Normalise ``t_final`` (a scalar or a sequence) to a sorted float array.

    Returns the array and whether the caller asked for a scalar (then results drop the time axis).
    """
    scalar = np.ndim(t_final) == 0
    try:
        times = np.atleast_1d(np.asarray(t_final, dtype=float))
    except (TypeError, ValueError):
        raise ValueError(
            f"t_final must be a number or a sequence of numbers, got {t_final!r}") from None
    if times.ndim != 1 or times.size == 0:
        raise ValueError(f"t_final must be a number or a non-empty 1-D sequence, got {t_final!r}")
    if not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ValueError(f"t_final must be finite and >= 0, got {t_final!r}")
    if np.any(np.diff(times) < 0):
        raise ValueError(f"t_final times must be in increasing order, got {t_final!r}")
    return times, scalar


class ResultBase:
    """Mixin for the result dataclasses: flat array storage in ``.npz`` files and in the cache.

    Array fields are stored as they are; the remaining (scalar/string/None) fields go into one
    JSON string under the key ``_meta`` so a file round-trips to an equal object.
    """

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fields as a dict of numpy arrays (non-array fields as JSON under ``_meta``)."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"type": type(self).__name__}
        for fld in dataclasses.fields(self):
            val = getattr(self, fld.name)
            if isinstance(val, np.ndarray):
                arrays[fld.name] = val
            else:
                meta[fld.name] = val
        arrays["_meta"] = np.array(json.dumps(meta))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]):
        """Inverse of :meth:`to_arrays`."""
        meta = json.loads(str(arrays["_meta"]))
        if meta.pop("type") != cls.__name__:
            raise ValueError(f"stored arrays are not a {cls.__name__}")
        kwargs = {}
        for fld in dataclasses.fields(cls):
            if fld.name in arrays:
                kwargs[fld.name] = np.asarray(arrays[fld.name])
            elif fld.name in meta:
                kwargs[fld.name] = meta[fld.name]
        return cls(**kwargs)

    def save(self, path: str | Path) -> Path:
        """Write the result to an ``.npz`` file (loadable with :meth:`load`)."""
        path = Path(path)
        np.savez_compressed(path, **self.to_arrays())
        # np.savez appends .npz when missing; return the name actually written.
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path):
        """Read a result written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            return cls.from_arrays({k: data[k] for k in data.files})


def cached_solve(kind: str, params: dict, version: str, result_cls, compute, use_cache: bool):
    """Return ``result_cls`` loaded from the cache for ``params``, or ``compute()`` and store it."""
    if use_cache:
        hit = _cache.load(kind, params, version)
        if hit is not None:
            try:
                return result_cls.from_arrays(hit)
            except (KeyError, ValueError, TypeError):
                pass  # a stale layout: recompute and overwrite
    result = compute()
    if use_cache:
        _cache.save(kind, params, version, result.to_arrays())
    return result
