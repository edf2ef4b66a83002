"""The files of a run directory, written to survive ``kill -9``, power loss, a full disk and a
second process, and read so that an untrusted file cannot run code.

A run directory holds ``config.toml``, ``metrics.jsonl``, ``checkpoint.pt`` (the latest
checkpoint), ``checkpoint.prev.pt`` (the one before it), ``run.lock``, ``summary.json`` and
the plots. Everything here writes from one process (the trainer that holds ``run.lock``); a
distributed trainer calls these functions from its rank 0 only.

Checkpoints
    :func:`write_checkpoint` serialises the state in memory, writes it to
    ``checkpoint.pt.tmp``, flushes and ``fsync``\\ s it, renames the current ``checkpoint.pt``
    to ``checkpoint.prev.pt``, renames the new file to ``checkpoint.pt`` and ``fsync``\\ s the
    directory. A kill at any moment leaves at least one complete checkpoint; a failed write
    (``ENOSPC``) leaves both earlier ones untouched and raises :class:`CheckpointWriteError`
    naming the path. Each checkpoint carries a SHA-256 of its contents (``sha256``: every
    tensor's bytes, dtype and shape and every plain value), so a file torn by a power loss or a
    faulty disk is detected even where the zip container still reads (torch does not check its
    CRCs). :func:`load_checkpoint` takes ``checkpoint.pt`` if it is complete and falls back to
    ``checkpoint.prev.pt`` with a warning.

Safe loading
    Checkpoints are read with ``torch.load(weights_only=True)``: the unpickler accepts only
    tensors, torch dtypes and containers of plain values (torch's ``weights_only``
    allow-list; hrgrad-ext adds nothing to it). Everything the trainer stores is of that kind
    (RNG states of numpy and Python as tensors, ints and floats; aggregator state as tensors or
    plain values). A file that references anything else is refused with
    :class:`UnsafeCheckpointError`; nothing in it is executed.

Metrics
    :class:`MetricsLog` appends each record as one complete line in one ``write`` call, so a
    kill cannot leave half a record in the middle of the file; :func:`read_metrics` ignores an
    unreadable *last* line (a write cut short by a power loss) and :func:`truncate_metrics`
    drops it with the records of steps after the checkpoint a run resumes from.

Concurrent use
    :class:`RunLock` takes an exclusive ``flock`` on ``run.lock`` and writes the owner's pid and
    host into it. The kernel drops the lock when its process dies (also under ``kill -9``), so
    a lock left by a dead run is stale by construction and the next run takes it over (with a
    warning naming the dead owner); a live owner makes :meth:`RunLock.acquire` raise
    :class:`RunDirectoryInUse`.

Testing aid: ``HRGRAD_EXT_TEST_CHECKPOINT_PAUSE`` (:mod:`.faults`) widens the window of a
checkpoint write so that a test can kill a run in the middle of one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import socket
import time
import warnings
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch

from .faults import checkpoint_pause

try:  # POSIX; without it (Windows) the run directory is not locked, with a warning
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None

__all__ = [
    "CHECKPOINT", "PREVIOUS_CHECKPOINT", "METRICS", "LOCK", "CheckpointWriteError", "CorruptCheckpointError", "MetricsLog",
    "RunDirectoryInUse", "RunLock", "UnsafeCheckpointError", "atomic_write", "load_checkpoint",
    "numpy_rng_state", "read_checkpoint", "read_metrics", "set_numpy_rng_state", "state_digest",
    "truncate_metrics", "write_checkpoint",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
LOCK = "run.lock"
#: version of the checkpoint contents; a checkpoint without it (or another) is not resumed from
FORMAT = 1


class UnsafeCheckpointError(ValueError):
    """A checkpoint references Python objects outside the ``weights_only`` allow-list."""


class CorruptCheckpointError(ValueError):
    """A checkpoint is truncated, torn, or not an hrgrad-ext checkpoint of this format."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions); earlier ones are intact."""


class RunDirectoryInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


# --- durable writes ---------------------------------------------------------------------------


def fsync_directory(path: Path) -> None:
    """Makes the renames in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _write_file(path: Path, data, pause: float = 0.0) -> None:
    """Writes ``data`` to ``path`` (created or truncated) and flushes it to the disk; ``pause``
    (a testing aid) sleeps halfway through."""
    view = memoryview(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        cut = len(view) // 2 if pause else len(view)
        _write_all(fd, view[:cut])
        if pause:
            time.sleep(pause)
        _write_all(fd, view[cut:])
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replaces ``path`` with ``data`` durably: a temporary file in the same directory, flushed
    and fsynced, renamed over ``path``, and the directory fsynced. Readers see the old or the new
    contents, never a mix, also after a crash or a power loss."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_file(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


# --- checkpoint contents ----------------------------------------------------------------------


def _update_digest(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _update_digest(h, k)
            _update_digest(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for v in obj:
            _update_digest(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, torch.dtype)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} (only tensors and plain values "
                        "load with weights_only=True); convert it to tensors or plain types")


def state_digest(state: dict) -> str:
    """SHA-256 over everything in ``state`` except its ``sha256`` entry (tensor bytes with dtype
    and shape, plain values by ``repr``, in order). Raises ``TypeError`` for values that would
    not load with ``weights_only=True``."""
    h = hashlib.sha256()
    _update_digest(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def numpy_rng_state() -> dict:
    """numpy's legacy global RNG state as a tensor and plain values (no numpy objects in the
    checkpoint)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].cpu().numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


# --- checkpoints ------------------------------------------------------------------------------


def write_checkpoint(run_dir: str | Path, state: dict) -> Path:
    """Writes ``state`` as the run's latest checkpoint (the previous latest becomes
    ``checkpoint.prev.pt``) durably; returns the path. Raises :class:`CheckpointWriteError`
    when the file cannot be written, with the earlier checkpoints untouched."""
    run_dir = Path(run_dir)
    path, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    state = {**state, "format": FORMAT}
    state["sha256"] = state_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    pause = checkpoint_pause()
    try:
        _write_file(tmp, buf.getbuffer(), pause)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(tmp)
        kept = [p.name for p in (path, prev) if p.is_file()]
        raise CheckpointWriteError(
            exc.errno, f"could not write checkpoint {path}: {exc.strerror or exc}; "
            + (f"the earlier checkpoint(s) {', '.join(kept)} are untouched" if kept else "no earlier checkpoint exists")
        ) from exc
    try:
        # a kill between the two renames leaves only checkpoint.prev.pt: resume falls back to it
        if path.exists():
            os.replace(path, prev)
        if pause:
            time.sleep(pause)
        os.replace(tmp, path)
        fsync_directory(run_dir)
    except OSError as exc:
        raise CheckpointWriteError(exc.errno, f"could not put checkpoint {path} in place: {exc.strerror or exc}") from exc
    return path


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - an unreadable container is a corrupt file, reported as such
        return []


def read_checkpoint(path: str | Path) -> dict:
    """The state in checkpoint ``path`` (tensors on the CPU), read with ``weights_only=True``
    and checked against its SHA-256.

    Raises :class:`UnsafeCheckpointError` when the file references Python objects outside the
    allow-list (nothing in it runs), :class:`CorruptCheckpointError` when it is truncated, torn
    or not a checkpoint of this format, ``FileNotFoundError`` when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure is classified below
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it references Python objects outside the checkpoint allow-list "
                f"({', '.join(sorted(unsafe))}). An hrgrad-ext checkpoint holds only tensors and plain values, "
                "so this file was written by something else or altered; nothing in it was run. Load only "
                "checkpoints from sources you trust.") from None
        raise CorruptCheckpointError(f"{path} is unreadable (truncated or torn?): {type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "sha256" not in state:
        raise CorruptCheckpointError(f"{path} is not an hrgrad-ext checkpoint of format {FORMAT}")
    try:
        digest = state_digest(state)
    except TypeError as exc:
        raise CorruptCheckpointError(f"{path}: {exc}") from None
    if digest != state["sha256"]:
        raise CorruptCheckpointError(f"{path} is torn: its contents do not match its SHA-256")
    return state


def load_checkpoint(run_dir: str | Path) -> tuple[dict, Path]:
    """``(state, path)`` of the newest complete checkpoint in ``run_dir``: ``checkpoint.pt``,
    or ``checkpoint.prev.pt`` with a warning when the latest is missing, truncated or torn.

    Raises :class:`UnsafeCheckpointError` at once for a file outside the allow-list (an
    unsafe file is not skipped over silently), ``FileNotFoundError`` when no usable checkpoint
    exists (with the reason for each file).
    """
    run_dir = Path(run_dir)
    problems = []
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        path = run_dir / name
        try:
            state = read_checkpoint(path)
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resuming from the previous checkpoint {path} (step {state['step']})",
                          RuntimeWarning, stacklevel=2)
        return state, path
    raise FileNotFoundError(f"no usable checkpoint in {run_dir}: " + "; ".join(problems))


# --- metrics ----------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl`` opened for appending; :meth:`write` appends one record as one whole
    line with one ``write`` call (unbuffered), so records are complete on disk as soon as
    written and a kill never leaves a partial record followed by others."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = open(self.path, "ab", buffering=0)

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record) + "\n").encode())
        try:
            while data:
                data = data[self._fh.write(data):]
        except OSError as exc:
            raise OSError(exc.errno, f"could not append to {self.path}: {exc.strerror or exc}") from exc

    def truncate(self, step: int) -> None:
        """Drops the records of steps after ``step`` (see :func:`truncate_metrics`)."""
        self._fh.close()
        truncate_metrics(self.path, step)
        self._fh = open(self.path, "ab", buffering=0)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_lines(path: Path) -> list[dict]:
    lines = path.read_bytes().split(b"\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if all(not rest.strip() for rest in lines[i + 1:]):
                break  # the last line was cut short (kill or power loss during its write)
            raise ValueError(f"{path}: line {i + 1} is not a JSON record; the file is damaged") from None
    return records


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (empty if there is none). An unreadable last
    line (a write cut short) is ignored; an unreadable line before others raises ``ValueError``."""
    path = Path(run_dir) / METRICS
    return _parse_lines(path) if path.is_file() else []


def truncate_metrics(path: str | Path, step: int) -> None:
    """Rewrites ``path`` (atomically) with the records of steps ``<= step``: the others belong to
    steps a resumed run redoes. An unreadable last line is dropped with them."""
    path = Path(path)
    if not path.is_file():
        return
    records = _parse_lines(path)
    keep = [r for r in records if r.get("step", 0) <= step]
    data = "".join(json.dumps(r) + "\n" for r in keep)
    if len(keep) == len(records) and path.read_bytes() == data.encode():
        return
    atomic_write(path, data)


# --- the lock ---------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory (``run.lock``, holding the owner's pid and host)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock (no-op if this object holds it). Raises :class:`RunDirectoryInUse`
        when a live process holds it; a lock left by a dead process is taken over."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:  # pragma: no cover
                warnings.warn(f"{self.path}: file locking is not available on this platform; "
                              "nothing stops a second run from writing to this directory", RuntimeWarning)
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise RunDirectoryInUse(
                        f"run directory {self.path.parent} is in use by another training process "
                        f"({_read_owner(fd) or 'owner unknown'}; lock file {self.path}); wait for it to finish "
                        "or stop it, or write to another directory") from None
            previous = _read_owner(fd)
            me = f"pid {os.getpid()} on {socket.gethostname()}"
            if previous and previous != me:
                warnings.warn(f"{self.path}: taking over the lock left by {previous}, which no longer holds it "
                              "(that run was killed or crashed)", RuntimeWarning, stacklevel=2)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (me + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Releases the lock. The file stays, emptied: a lock file that still names an owner
        who does not hold the lock was left by a run that was killed or crashed."""
        if self._fd is not None:
            with suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        with suppress(Exception):  # e.g. at interpreter shutdown
            self.release()


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:  # pragma: no cover
        return ""
