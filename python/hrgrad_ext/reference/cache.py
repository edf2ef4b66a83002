"""On-disk cache of reference solutions.

A cached result is one ``.npz`` file whose name is ``<kind>-<key>.npz``, where ``key`` is the first
20 hex digits of the SHA-256 of the canonical JSON of the solver's parameter dict together with the
solver's version string.  Bumping a solver's ``VERSION`` therefore invalidates its old entries
without anyone having to clear the directory.

The directory is ``$HRGRAD_EXT_CACHE`` if that variable is set, else ``~/.cache/hrgrad_ext``.
Writes are atomic (temporary file in the same directory, then :func:`os.replace`), so concurrent
training processes that compute the same reference never read a half-written file; the worst case
is that both compute it and the last writer wins with an identical file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["cache_dir", "cache_key", "cache_path", "load", "save"]

ENV_VAR = "HRGRAD_EXT_CACHE"


def cache_dir() -> Path:
    """The cache directory (not created here): ``$HRGRAD_EXT_CACHE`` or ``~/.cache/hrgrad_ext``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hrgrad_ext"


def _canonical(obj: Any) -> Any:
    """Make ``obj`` JSON-serialisable in a unique way (floats by ``repr``, exactly)."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return repr(float(obj))
    raise TypeError(f"cannot use a {type(obj).__name__} in a cache key")


def cache_key(kind: str, params: Mapping[str, Any], version: str) -> str:
    """Hex digest identifying ``(kind, params, version)``."""
    blob = json.dumps({"kind": kind, "version": version, "params": _canonical(params)},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(kind: str, params: Mapping[str, Any], version: str) -> Path:
    """Path of the cache file for these parameters (it may not exist)."""
    return cache_dir() / f"{kind}-{cache_key(kind, params, version)}.npz"


def load(kind: str, params: Mapping[str, Any], version: str) -> dict[str, np.ndarray] | None:
    """The stored arrays for these parameters, or ``None`` when absent or unreadable.

    An unreadable file (truncated by a crash of an older, non-atomic writer, or from another numpy)
    is treated as a miss rather than an error: the caller recomputes and overwrites it.
    """
    path = cache_path(kind, params, version)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception:  # noqa: BLE001 - any unreadable file is a cache miss
        return None


def save(kind: str, params: Mapping[str, Any], version: str,
         arrays: Mapping[str, np.ndarray]) -> Path | None:
    """Store ``arrays`` atomically under the key of ``params``; returns the path.

    Failure to write (read-only home, full disk) is not fatal for a cache: it returns ``None``.
    """
    path = cache_path(kind, params, version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError:
        return None
    return path
