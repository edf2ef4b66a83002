"""Kill drill for the trainer: ``kill -9`` at random moments, during checkpoint writes too.

Run by ``tests/test_fault_tolerance.py`` in a subprocess (or by hand)::

    python tests/kill_drill.py WORKDIR [--kills 20] [--seed 0]

Trains one small float64 CPU run with ``hrgrad-ext train`` (the CLI's ``main``), one process
per "life", and kills each life with SIGKILL: every other life after a seeded random delay, the
others at a random moment of a checkpoint write, while its temporary file is being written or
between its two renames (the drill watches the files; ``HRGRAD_EXT_TEST_CHECKPOINT_PAUSE``
widens both phases so that the kill falls inside them). Each next life resumes with ``--resume`` (or starts afresh if no checkpoint was
written yet). One life is stopped with SIGTERM instead (exit code 143 and a checkpoint of the
step it stopped at), and during one the drill checks that the run directory's lock is held. The
last life runs to the end. An uninterrupted run of the same config is the reference.

Every life is a ``fork`` of this process, which imports torch once: a restart costs
milliseconds instead of a second interpreter's torch import, and a SIGKILL leaves the files
exactly as it would for a separate program. Prints a JSON report as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any work: forked children must not inherit a thread pool
import torch._dynamo  # noqa: E402,F401  (imported by every optimizer's constructor: seconds, paid once here)
import tqdm.auto  # noqa: E402,F401

from hrgrad_ext.cli import main  # noqa: E402
from hrgrad_ext.train import rundir  # noqa: E402
from hrgrad_ext.train.faults import CHECKPOINT_PAUSE_ENV  # noqa: E402

ITERS = 120  # more than 20 short lives can reach: the last life always has steps left
PAUSE = 0.04  # seconds, twice per checkpoint write
RUN_ARGS = ["--problem", "transport", "--method", "pcgrad", "--eps", "1e-8,1e-7", "--dtype", "float64",
            "--threads", "1", "--seed", "3", "--iters", str(ITERS), "--no-progress", "--no-plots",
            "--set", "model.rho={width = 8, depth = 1}", "--set", "model.g={width = 8, depth = 1}",
            "--set", "points={interior = 6, boundary = 4, initial = 4}", "--set", "nv=8",
            "--set", "log.checkpoint_every=2", "--set", "log.log_every=1", "--set", "log.eval_every=60"]


def spawn(argv: list[str], log: Path, env: dict) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 99
    try:
        os.environ.update(env)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = main(argv)
    except BaseException:  # noqa: BLE001 - report anything, then leave without cleanup
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, timeout: float, until=None) -> int | None:
    """The exit code of ``pid`` (-N for a signal) if it ends within ``timeout`` s (or before
    ``until()`` becomes true), else None."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= end or (until is not None and until()):
            return None
        time.sleep(0.001)


def kill(pid: int, sig: int = signal.SIGKILL) -> int:
    os.kill(pid, sig)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def inspect(run: Path) -> dict:
    """What a resume would find in ``run``, and whether the metrics still read."""
    out = {"files": sorted(p.name for p in run.iterdir()) if run.is_dir() else []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state, path = rundir.load_checkpoint(run)
            out["checkpoint"] = {"file": path.name, "step": state["step"]}
        except FileNotFoundError as exc:
            out["checkpoint"] = None
            out["no_checkpoint"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported as a failure
            out["checkpoint_error"] = f"{type(exc).__name__}: {exc}"
    out["warnings"] = [str(w.message) for w in caught]
    try:
        out["metrics_records"] = len(rundir.read_metrics(run))
        raw = (run / rundir.METRICS).read_bytes() if (run / rundir.METRICS).is_file() else b""
        out["metrics_torn_tail"] = bool(raw) and not raw.endswith(b"\n")
    except Exception as exc:  # noqa: BLE001
        out["metrics_error"] = f"{type(exc).__name__}: {exc}"
    return out


def differences(x, y, where: str = "") -> list[str]:
    """Where ``x`` and ``y`` (checkpoint contents) differ: tensors bit for bit, the rest by ``==``."""
    if isinstance(x, torch.Tensor):
        same = isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        return [] if same else [where]
    if isinstance(x, dict):
        if not isinstance(y, dict) or list(x) != list(y):
            return [where]
        return [d for k in x for d in differences(x[k], y[k], f"{where}.{k}")]
    if isinstance(x, (list, tuple)):
        if type(x) is not type(y) or len(x) != len(y):
            return [where]
        return [d for i, (u, v) in enumerate(zip(x, y)) for d in differences(u, v, f"{where}[{i}]")]
    return [] if x == y else [where]


def compare(run: Path, ref: Path) -> dict:
    """The finished run against the reference: the final checkpoint bit for bit (but timings,
    checksum and the output path in the config), the metrics (but timings), the summary's
    errors."""
    a, b = (rundir.read_checkpoint(d / rundir.CHECKPOINT) for d in (run, ref))
    skip = {"train_time", "wall_time", "sha256", "config"}
    diffs = differences({k: v for k, v in a.items() if k not in skip}, {k: v for k, v in b.items() if k not in skip})

    def plain(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]

    ra, rb = rundir.read_metrics(run), rundir.read_metrics(ref)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    return {"checkpoint_differences": diffs, "metrics_equal": plain(ra) == plain(rb), "metrics_records": len(ra),
            "train_steps_complete": [r["step"] for r in ra if r["kind"] == "train"] == list(range(1, ITERS + 1)),
            "summary_rel_l2_equal": sa["rel_l2"] == sb["rel_l2"], "summary_iters": sa["iters"]}


def drill(work: Path, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    run, ref, logs = work / "run", work / "ref", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict = {"lives": [], "errors": []}

    t0 = time.monotonic()
    code = wait(spawn(["train", "--out", str(ref), *RUN_ARGS], logs / "reference.txt", {}), 600)
    report["reference_exit"] = code
    report["reference_s"] = round(time.monotonic() - t0, 2)
    pause_env = {CHECKPOINT_PAUSE_ENV: str(PAUSE)}
    sigterm_life = kills // 2
    lock_checked = False
    last_step = -1
    life = 0
    while True:
        before = inspect(run)
        (run / (rundir.CHECKPOINT + ".tmp")).unlink(missing_ok=True)  # so that a new one means "killed mid-write"
        resume = before.get("checkpoint") is not None
        argv = ["train", "--resume", str(run), "--no-progress", "--no-plots"] if resume else \
            ["train", "--out", str(run), *RUN_ARGS]
        n_killed = sum(1 for x in report["lives"] if x["exit"] == -signal.SIGKILL)
        final = n_killed >= kills and any(x["how"] == "sigterm" for x in report["lives"])
        log = logs / f"life{life:02d}.txt"
        log.touch()
        rec = {"life": life, "resume": resume, "from": before.get("checkpoint"), "warnings": before["warnings"]}
        if "checkpoint_error" in before:
            report["errors"].append(f"life {life}: no valid checkpoint to resume from: {before['checkpoint_error']}")
        if resume and before["checkpoint"]["step"] < last_step:
            report["errors"].append(f"life {life}: resume point went back from step {last_step} to {before['checkpoint']}")
        if resume:
            last_step = before["checkpoint"]["step"]
        pid = spawn(argv, log, {} if final else pause_env)
        try:
            start = time.monotonic()
            tmp, latest = run / (rundir.CHECKPOINT + ".tmp"), run / rundir.CHECKPOINT
            if final:
                rec["how"] = "final"
                rec["exit"] = wait(pid, 600)
            elif life == sigterm_life:
                rec["how"] = "sigterm"
                code = wait(pid, 60, until=tmp.exists)  # it is writing a checkpoint
                rec["exit"] = code if code is not None else kill(pid, signal.SIGTERM)
                text = log.read_text()
                rec["stopped_message"] = "stopped by signal SIGTERM at step" in text
                if rec["stopped_message"]:
                    stopped = int(text.split("stopped by signal SIGTERM at step")[1].split(":")[0])
                    rec["stopped_step"] = stopped
            elif life >= 3 and resume and not lock_checked:
                lock_checked = True
                rec["how"] = "lock-check"
                code = wait(pid, 60, until=lambda: "resuming" in log.read_text())  # it holds the lock
                if code is None:
                    lock = rundir.RunLock(run)
                    try:
                        lock.acquire()
                        rec["lock"] = "acquired while a live run held the directory"
                    except rundir.RunDirectoryInUse as exc:
                        rec["lock"] = f"in use: {exc}"
                    finally:
                        lock.release()
                rec["exit"] = code if code is not None else kill(pid)
            else:
                rec["how"] = ("random", "mid-write", "random", "between-renames")[life % 4]
                code = None
                if rec["how"] != "random":
                    code = wait(pid, 60, until=tmp.exists)  # a checkpoint write has begun
                if code is None and rec["how"] == "between-renames":
                    code = wait(pid, 60, until=lambda: not latest.exists())
                delay = rng.uniform(0.05, 0.6) if rec["how"] == "random" else rng.uniform(0.0, PAUSE / 2)
                rec["exit"] = code if code is not None else wait(pid, delay)
                if rec["exit"] is None:
                    rec["exit"] = kill(pid)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                kill(pid)  # never leave a child training behind
            raise
        rec["seconds"] = round(time.monotonic() - start, 3)
        after = inspect(run)
        rec["after"] = after
        rec["mid_write"] = (rundir.CHECKPOINT + ".tmp") in after["files"]
        rec["between_renames"] = rundir.CHECKPOINT not in after["files"] and rundir.PREVIOUS_CHECKPOINT in after["files"]
        for key in ("checkpoint_error", "metrics_error"):
            if key in after:
                report["errors"].append(f"life {life}: {after[key]}")
        report["lives"].append(rec)
        life += 1
        if final:
            break
        if life > 3 * kills + 10:
            report["errors"].append("the drill did not finish")
            break
    if report["lives"][-1]["exit"] == 0 and report["reference_exit"] == 0:
        report["comparison"] = compare(run, ref)
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(json.dumps(drill(Path(a.workdir), a.kills, a.seed)))
