"""Fault injection for the tests of the trainer's fault handling (testing aids: inactive unless
their environment variable is set; ``tests/test_fault_tolerance.py`` uses them).

``HRGRAD_EXT_TEST_NONFINITE="STEP[:TASK],..."``
    At optimizer step ``STEP`` (1-based, as in ``metrics.jsonl``) the loss and the gradient of
    task ``TASK`` (an index into the run's task list, default 0) become NaN, as if training had
    diverged there. Each entry fires once per process: ``"7,7"`` fires the first two times the
    run reaches step 7 (again after a rollback, say).
``HRGRAD_EXT_TEST_CHECKPOINT_PAUSE=SECONDS``
    Every checkpoint write pauses this long halfway through writing its temporary file and
    again between its two renames, so that a test can kill a run in the middle of a write.
``HRGRAD_EXT_TEST_RANK_FAILURE="RANK:STEP[:raise|kill]"``
    In a distributed run, rank ``RANK`` fails when it starts optimizer step ``STEP``: it raises
    ``RuntimeError`` (default) or kills itself with SIGKILL, as a crash or a lost node would.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

import torch

__all__ = ["CHECKPOINT_PAUSE_ENV", "NONFINITE_ENV", "RANK_FAILURE_ENV", "NonfiniteInjection", "RankFailure",
           "checkpoint_pause"]

NONFINITE_ENV = "HRGRAD_EXT_TEST_NONFINITE"
CHECKPOINT_PAUSE_ENV = "HRGRAD_EXT_TEST_CHECKPOINT_PAUSE"
RANK_FAILURE_ENV = "HRGRAD_EXT_TEST_RANK_FAILURE"


def checkpoint_pause() -> float:
    """Seconds a checkpoint write pauses (0 unless the testing aid is set)."""
    return float(os.environ.get(CHECKPOINT_PAUSE_ENV) or 0.0)


class NonfiniteInjection:
    """Pending NaN injections ``(step, task) -> count`` read from :data:`NONFINITE_ENV`."""

    def __init__(self, entries: Counter):
        self.pending = entries

    @classmethod
    def from_env(cls, num_tasks: int) -> "NonfiniteInjection | None":
        text = os.environ.get(NONFINITE_ENV, "").strip()
        if not text:
            return None
        entries: Counter = Counter()
        for item in text.replace(" ", "").split(","):
            step, _, task = item.partition(":")
            try:
                key = (int(step), int(task or 0))
            except ValueError:
                raise ValueError(f"{NONFINITE_ENV}: expected STEP[:TASK],... got {text!r}") from None
            if not 0 <= key[1] < num_tasks:
                raise ValueError(f"{NONFINITE_ENV}: task index {key[1]} out of range (the run has {num_tasks} tasks)")
            entries[key] += 1
        return cls(entries)

    def apply(self, step: int, losses: torch.Tensor, jacobians: list) -> tuple[torch.Tensor, list]:
        """Makes the loss and gradient rows of the tasks due at ``step`` NaN."""
        due = [t for (s, t), n in self.pending.items() if s == step and n > 0]
        if not due:
            return losses, jacobians
        losses = losses.clone()
        jacobians = [j.clone() for j in jacobians]
        for t in due:
            self.pending[(step, t)] -= 1
            losses[t] = float("nan")
            for j in jacobians:
                j[t] = float("nan")
        return losses, jacobians


class RankFailure:
    """The failure of this rank read from :data:`RANK_FAILURE_ENV` (``None`` for other ranks)."""

    KINDS = ("raise", "kill")

    def __init__(self, step: int, kind: str):
        self.step, self.kind = step, kind

    @classmethod
    def from_env(cls, rank: int) -> "RankFailure | None":
        text = os.environ.get(RANK_FAILURE_ENV, "").strip()
        if not text:
            return None
        parts = text.split(":")
        try:
            which, step = int(parts[0]), int(parts[1])
            kind = parts[2] if len(parts) > 2 else "raise"
            if len(parts) > 3 or kind not in cls.KINDS:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"{RANK_FAILURE_ENV}: expected RANK:STEP[:raise|kill], got {text!r}") from None
        return cls(step, kind) if which == rank else None

    def at_step(self, step: int) -> None:
        """Fails if ``step`` (1-based, the step about to be taken) is the chosen one."""
        if step != self.step:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {step} ({RANK_FAILURE_ENV})")
