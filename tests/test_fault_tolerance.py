"""Training runs that survive faults and untrusted files (issue 16): safe loading, durable
checkpoints with a fallback, preemption, kill -9 (``kill_drill.py``), the divergence policy,
concurrent use and a full disk. Bad numeric input to the ops: ``test_bad_numeric_inputs.py``.

All runs are tiny float64 CPU runs: resumed and uninterrupted runs are compared bit for bit.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hrgrad_ext.cli import EXIT_DIVERGED, EXIT_OUTPUT_ERROR, EXIT_PREEMPTED, EXIT_USAGE, main
from hrgrad_ext.reference import cache
from hrgrad_ext.train import rundir
from hrgrad_ext.train.config import METHODS, apply_overrides, load_config, to_toml
from hrgrad_ext.train.faults import NONFINITE_ENV
from hrgrad_ext.train.plots import plot_cosines, plot_errors, plot_losses
from hrgrad_ext.train.rundir import (CHECKPOINT, PREVIOUS_CHECKPOINT, CheckpointWriteError, RunDirectoryInUse,
                                     RunLock, UnsafeCheckpointError, read_checkpoint, read_metrics)
from hrgrad_ext.train.trainer import NonFiniteError, Preempted, Trainer
from test_cli import TINY as TINY_CLI
from test_train import run_dir_copy, tiny_config


TINY = [*TINY_CLI, "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # the runs here use one thread (tiny tensors); the rest of the session keeps its setting
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny(tmp_path, name: str = "run", iters: int = 6, method: str = "pcgrad", **kw):
    """A float64 one-thread transport run of ``iters`` steps into ``tmp_path / name`` that logs
    every step and checkpoints every 2 (PCGrad: the aggregator has RNG state too)."""
    cfg = tiny_config(tmp_path, "transport", method, iters=iters, dtype="float64", threads=1, **kw)
    cfg.out = str(tmp_path / name)
    cfg.log.log_every = 1
    cfg.log.checkpoint_every = 2
    cfg.log.eval_every = 10**6  # evaluated once, at the end
    return cfg


def params_of(tr: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tr.model.parameters()]


def assert_same_tensors(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def train_losses(run_dir) -> list[list[float]]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def checkpoint_step(path) -> int:
    return read_checkpoint(path)["step"]


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code in a hostile file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


# --- safe loading -----------------------------------------------------------------------------


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    cfg = tiny(tmp_path)
    cfg.optim.ema = 0.9
    tr = Trainer(cfg)
    tr.run(max_steps=2)
    rngs = (np.random.random(), __import__("random").random())
    path = Path(cfg.out) / CHECKPOINT
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)
    assert state["sha256"] == rundir.state_digest(state) and state["format"] == rundir.FORMAT
    assert state["numpy_rng"]["keys"].dtype == torch.int64 and state["aggregator"]["generator"].dtype == torch.uint8
    resumed = Trainer.resume(cfg.out)
    assert (np.random.random(), __import__("random").random()) == rngs  # numpy and Python RNGs restored
    assert_same_tensors(params_of(resumed), params_of(tr))
    with pytest.raises(TypeError, match="cannot store a ndarray"):
        rundir.write_checkpoint(tmp_path / "x", {"step": 0, "bad": np.zeros(2)})


@pytest.mark.parametrize("where", ["latest", "previous"])
def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, capsys, where):
    cfg = tiny(tmp_path)
    Trainer(cfg).run(max_steps=4)  # checkpoint.pt at step 4, checkpoint.prev.pt at 2
    run, marker = Path(cfg.out), tmp_path / "pwned"
    hostile = run / (CHECKPOINT if where == "latest" else PREVIOUS_CHECKPOINT)
    torch.save({"step": 4, "model": Payload(marker)}, hostile)
    if where == "previous":
        (run / CHECKPOINT).write_bytes((run / CHECKPOINT).read_bytes()[:100])  # torn: resume falls back to it
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*builtins\.exec"):
        Trainer.resume(run)
    assert main(["train", "--resume", str(run)]) == EXIT_USAGE
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(hostile, weights_only=False)  # the payload is live: loading it unsafely runs it
    assert marker.exists()


def test_reference_cache_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    params, version = {"eps": 1.0}, "v-test"
    path = cache.cache_path("transport", params, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, rho=np.array([Payload(marker)], dtype=object))
    assert cache.load("transport", params, version) is None  # refused (a cache miss), nothing run
    assert not marker.exists()
    np.load(path, allow_pickle=True)["rho"]
    assert marker.exists()
    path.unlink()


# --- durable checkpoints ----------------------------------------------------------------------


def test_checkpoint_write_is_flushed_renamed_and_the_directory_synced(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", Path(a).name, Path(b).name))
        real_replace(a, b)

    rundir.write_checkpoint(tmp_path, {"step": 1})
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rundir.write_checkpoint(tmp_path, {"step": 2})
    assert events == [("fsync", CHECKPOINT + ".tmp"), ("replace", CHECKPOINT, PREVIOUS_CHECKPOINT),
                      ("replace", CHECKPOINT + ".tmp", CHECKPOINT), ("fsync", tmp_path.name)]
    assert checkpoint_step(tmp_path / CHECKPOINT) == 2 and checkpoint_step(tmp_path / PREVIOUS_CHECKPOINT) == 1


def _flip_tensor_bytes(path: Path) -> None:
    """Zeroes 8 bytes inside the largest tensor record of a torch zip checkpoint: the container
    still reads (torch does not check CRCs), only the checksum can tell."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start:start + 8] = bytes(8) if data[start:start + 8] != bytes(8) else b"\xff" * 8
    path.write_bytes(bytes(data))


def tiny_8(tmp_path):
    """The run that resume tests cut and continue: 8 steps, with a parameter average."""
    cfg = tiny(tmp_path, iters=8)
    cfg.optim.ema = 0.9
    return cfg


@pytest.fixture(scope="module")
def uninterrupted_8_steps(tmp_path_factory):
    """``(parameters, parameter average, train losses)`` of ``tiny_8`` run without a stop."""
    n = torch.get_num_threads()
    cfg = tiny_8(tmp_path_factory.mktemp("uninterrupted"))
    tr = Trainer(cfg)
    tr.run()
    torch.set_num_threads(n)
    return params_of(tr), tr.ema, train_losses(cfg.out)


def assert_same_as_uninterrupted(tr: Trainer, uninterrupted) -> None:
    params, ema, losses = uninterrupted
    assert_same_tensors(params_of(tr), params)
    assert_same_tensors(tr.ema, ema)
    assert train_losses(tr.out) == losses and len(losses) == 8


@pytest.mark.parametrize("damage", ["truncated", "empty", "torn", "missing"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, uninterrupted_8_steps):
    cut = tiny_8(tmp_path)
    Trainer(cut).run(max_steps=4)
    run = Path(cut.out)
    latest = run / CHECKPOINT
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size * 2 // 3])
    elif damage == "empty":
        latest.write_bytes(b"")
    elif damage == "torn":
        _flip_tensor_bytes(latest)
    else:
        latest.unlink()
    with pytest.warns(RuntimeWarning, match=r"resuming from the previous checkpoint .* \(step 2\)"):
        resumed = Trainer.resume(run)
    assert resumed.step == 2 and max(r["step"] for r in read_metrics(run)) == 2
    assert (run / (CHECKPOINT + ".bad")).exists() == (damage != "missing")  # kept aside, not rotated into prev
    resumed.run()
    assert_same_as_uninterrupted(resumed, uninterrupted_8_steps)
    assert checkpoint_step(run / PREVIOUS_CHECKPOINT) == 6


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, capsys):
    cfg = tiny(tmp_path)
    Trainer(cfg).run(max_steps=4)
    run = Path(cfg.out)
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        (run / name).write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(FileNotFoundError, match="no usable checkpoint .*unreadable"):
        Trainer.resume(run)
    assert main(["train", "--resume", str(run)]) == EXIT_USAGE
    assert "no usable checkpoint" in capsys.readouterr().err


# --- preemption -------------------------------------------------------------------------------


def _signal_during_step(monkeypatch, tr_or_cls, sig: int, step: int, times: int = 1) -> None:
    """Sends ``sig`` to this process ``times`` times in the middle of step ``step`` (while its
    task gradients are computed)."""
    original = tr_or_cls.task_gradients

    def task_gradients(self, batch):
        if self.step == step - 1:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return original(self, batch)

    monkeypatch.setattr(tr_or_cls, "task_gradients", task_gradients)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_the_next_step_boundary_and_resume_is_exact(tmp_path, monkeypatch, sig,
                                                                         uninterrupted_8_steps):
    cut = tiny_8(tmp_path)
    before = signal.getsignal(sig)
    _signal_during_step(monkeypatch, Trainer, sig, step=3)
    with pytest.raises(Preempted if sig == signal.SIGTERM else KeyboardInterrupt):
        Trainer(cut).run()
    monkeypatch.undo()
    assert signal.getsignal(sig) is before
    assert checkpoint_step(Path(cut.out) / CHECKPOINT) == 3  # the step in flight finished first
    resumed = Trainer.resume(cut.out)
    assert resumed.step == 3
    resumed.run()
    assert_same_as_uninterrupted(resumed, uninterrupted_8_steps)


def test_sigterm_exit_code_and_resume_through_the_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "sum", "--iters", "5", "--out", str(out), *TINY]
    _signal_during_step(monkeypatch, Trainer, signal.SIGTERM, step=2)
    assert main(args) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert "stopped by signal SIGTERM at step 2" in "".join(capsys.readouterr())
    assert checkpoint_step(out / CHECKPOINT) == 2
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["iters"] == 5


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    _signal_during_step(monkeypatch, Trainer, signal.SIGINT, step=3, times=2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg).run()
    assert checkpoint_step(Path(cfg.out) / CHECKPOINT) == 2  # nothing of the interrupted step 3


# --- kill -9 ----------------------------------------------------------------------------------


def test_kill_9_at_random_moments_and_during_checkpoint_writes(tmp_path):
    """``kill_drill.py``: at least 20 SIGKILLs of a training process, half of them in the middle
    of a checkpoint write; every restart resumes from a valid checkpoint and the finished run
    equals an uninterrupted one bit for bit (about 15-30 s: one torch import, forked lives)."""
    drill = Path(__file__).with_name("kill_drill.py")
    proc = subprocess.run([sys.executable, str(drill), str(tmp_path), "--kills", "20", "--seed", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    lives = report["lives"]
    # on failure: one line per life (how it ended, what the kill left) and the drill's own findings
    story = "\n".join(f"{x['life']:2d} {x['how']:15s} exit {x['exit']} resumed from {x['from']} -> {x['after'].get('checkpoint')}"
                      f" mid-write {x['mid_write']} between-renames {x['between_renames']}" for x in lives)
    story += f"\nerrors: {report['errors']}\ncomparison: {report.get('comparison')}"
    assert report["errors"] == [] and report["reference_exit"] == 0, story
    killed = [x for x in lives if x["exit"] == -signal.SIGKILL]
    assert len(killed) >= 20, story
    assert sum(x["how"] == "mid-write" and x["mid_write"] for x in killed) >= 2, story
    assert sum(x["how"] == "between-renames" and x["between_renames"] for x in killed) >= 2, story
    assert sum(x["resume"] for x in lives) >= 15, story
    (sigterm,) = [x for x in lives if x["how"] == "sigterm"]
    assert sigterm["exit"] == EXIT_PREEMPTED, story
    assert sigterm["after"]["checkpoint"]["step"] == sigterm["stopped_step"], story
    (lock,) = [x for x in lives if x["how"] == "lock-check"]
    assert lock["lock"].startswith("in use: run directory"), story
    assert lives[-1]["how"] == "final" and lives[-1]["exit"] == 0, story
    cmp = report["comparison"]
    assert cmp["checkpoint_differences"] == [] and cmp["metrics_equal"] and cmp["train_steps_complete"], story
    assert cmp["summary_rel_l2_equal"], story


# --- the divergence policy ---------------------------------------------------------------------


class DeviceGuardTrainer(Trainer):
    """The CUDA path of the guard on the CPU: fused optimizer, update dropped by ``found_inf``."""

    def _guards_on_device(self) -> bool:
        return True


def _snapshots() -> tuple[dict, callable]:
    """``(shots, callback)``: the callback records, per step, the parameters, the parameter
    average and the optimizer state after the step."""
    shots = {}

    def take(t):
        shots[t.step] = (params_of(t), [e.clone() for e in t.ema or []], copy.deepcopy(t.optimizer.state_dict()["state"]))

    return shots, take


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_stop_names_task_and_step_and_drops_the_update(tmp_path, monkeypatch, method):
    monkeypatch.setenv(NONFINITE_ENV, "3:1")
    cfg = tiny(tmp_path, method=method)
    cfg.log.checkpoint_every = 1
    tr = Trainer(cfg)
    shots, take = _snapshots()
    name = tr.layout.names[1]
    with pytest.raises(NonFiniteError, match=rf"step 3 in task {name} \(loss nan\).*no checkpoint of it written"):
        tr.run(callback=take)
    assert checkpoint_step(Path(cfg.out) / CHECKPOINT) == 2
    assert_same_tensors(params_of(tr), shots[2][0])  # the NaN update never reached the parameters


def test_nonfinite_stop_exit_code_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NONFINITE_ENV, "2")
    assert main(["train", "--iters", "4", "--out", str(tmp_path / "run"), *TINY]) == EXIT_DIVERGED
    assert "non-finite loss or gradient at step 2 in task eps=1e-08" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [Trainer, DeviceGuardTrainer], ids=["host-guard", "device-guard"])
def test_skip_drops_the_step_and_logs_it(tmp_path, monkeypatch, cls):
    monkeypatch.setenv(NONFINITE_ENV, "3")
    cfg = tiny(tmp_path, method="hrgrad")
    cfg.optim.ema = 0.9
    cfg.divergence.on_nonfinite = "skip"
    tr = cls(cfg)
    shots, take = _snapshots()
    assert tr.run(callback=take)["iters"] == 6
    p2, e2, o2 = shots[2]
    p3, e3, o3 = shots[3]
    assert_same_tensors(p3, p2)
    assert_same_tensors(e3, e2)
    for k in o2:  # moments and Adam's step count as if step 3 never happened
        for key in o2[k]:
            assert torch.equal(o3[k][key], o2[k][key]), key
    assert not torch.equal(shots[4][0][0], p3[0])
    skips = [r for r in read_metrics(cfg.out) if r["kind"] == "skip"]
    assert skips == [{"step": 3, "kind": "skip", "tasks": [tr.layout.names[0]], "consecutive": 1}]
    assert tr.skipped_steps == 1 and tr.consecutive_skips == 0


@pytest.mark.parametrize("first,then", [(Trainer, DeviceGuardTrainer), (DeviceGuardTrainer, Trainer)],
                         ids=["host-to-device-guard", "device-to-host-guard"])
def test_resume_switches_between_the_optimizer_implementations(tmp_path, first, then):
    # a run moved between CPU and CUDA: the checkpoint of one guard path resumes on the other
    cfg = tiny(tmp_path)
    first(cfg).run(max_steps=2)
    resumed = then.resume(cfg.out)
    assert resumed.optimizer.param_groups[0]["fused"] == (True if then is DeviceGuardTrainer else None)
    assert resumed.run()["iters"] == 6


def test_skip_gives_up_after_max_skips_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv(NONFINITE_ENV, "2,4,5,6")
    cfg = tiny(tmp_path, iters=8)
    cfg.divergence.on_nonfinite = "skip"
    cfg.divergence.max_skips = 3
    with pytest.raises(NonFiniteError, match="step 6 .*3 consecutive steps skipped"):
        Trainer(cfg).run()
    assert [r["consecutive"] for r in read_metrics(cfg.out) if r["kind"] == "skip"] == [1, 1, 2, 3]


def test_rollback_reloads_the_last_checkpoint_and_lowers_the_learning_rate(tmp_path, monkeypatch):
    base = tiny(tmp_path, iters=8)
    base.divergence.on_nonfinite = "rollback"
    clean = run_dir_copy(base, tmp_path, "clean")
    Trainer(clean).run()
    monkeypatch.setenv(NONFINITE_ENV, "5:1")
    bad = run_dir_copy(base, tmp_path, "bad")
    tr = Trainer(bad)
    tr.run()
    recs = read_metrics(bad.out)
    (rb,) = [r for r in recs if r["kind"] == "rollback"]
    assert rb == {"step": 4, "kind": "rollback", "nonfinite_step": 5, "tasks": [tr.layout.names[1]],
                  "checkpoint": CHECKPOINT, "lr_scale": 0.5, "rollbacks": 1}
    train, ref = [r for r in recs if r["kind"] == "train"], [r for r in read_metrics(clean.out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))  # the abandoned step 5 was dropped, then redone
    assert [r["loss"] for r in train[:4]] == [r["loss"] for r in ref[:4]]
    for a, b in zip(train[4:], ref[4:]):
        assert a["lr"] == pytest.approx(0.5 * b["lr"], rel=1e-12)
    state = read_checkpoint(Path(bad.out) / CHECKPOINT)
    assert state["divergence"]["rollbacks"] == 1 and state["divergence"]["lr_scale"] == 0.5
    assert Trainer.resume(bad.out).optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * ref[-1]["lr"], rel=1e-12)


def test_rollback_gives_up_after_max_rollbacks(tmp_path, monkeypatch):
    monkeypatch.setenv(NONFINITE_ENV, "3,3,3")
    cfg = tiny(tmp_path)
    cfg.divergence.on_nonfinite = "rollback"
    cfg.divergence.max_rollbacks = 2
    with pytest.raises(NonFiniteError, match="step 3 .*after 2 rollbacks"):
        Trainer(cfg).run()
    assert [r["lr_scale"] for r in read_metrics(cfg.out) if r["kind"] == "rollback"] == [0.5, 0.25]


def test_rollback_before_the_first_periodic_checkpoint_goes_back_to_step_0(tmp_path, monkeypatch):
    monkeypatch.setenv(NONFINITE_ENV, "1")
    cfg = tiny(tmp_path, iters=3)
    cfg.divergence.on_nonfinite = "rollback"
    cfg.log.checkpoint_every = 100
    assert Trainer(cfg).run()["iters"] == 3
    assert [(r["step"], r["nonfinite_step"]) for r in read_metrics(cfg.out) if r["kind"] == "rollback"] == [(0, 1)]


@pytest.mark.parametrize("key,value,match", [
    ("divergence.on_nonfinite", '"retry"', "divergence.on_nonfinite: expected one of"),
    ("divergence.max_skips", "0", "divergence.max_skips"),
    ("divergence.max_rollbacks", "1.5", "divergence.max_rollbacks"),
    ("divergence.lr_factor", "1.0", "divergence.lr_factor"),
    ("divergence.patience", "3", "unknown config key 'divergence.patience'"),
])
def test_divergence_config_is_validated(tmp_path, capsys, key, value, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(tiny(tmp_path), [f"{key}={value}"]).validate()
    assert main(["train", "--out", str(tmp_path / "x"), "--set", f"{key}={value}", *TINY]) == EXIT_USAGE
    assert match.split(":")[0].strip("'") in capsys.readouterr().err


def test_divergence_table_round_trips_through_toml(tmp_path):
    cfg = apply_overrides(tiny(tmp_path), ["divergence.on_nonfinite=rollback", "divergence.lr_factor=0.25"])
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "c.toml").divergence == cfg.divergence


# --- a fresh run into a directory that holds a run ------------------------------------------------


def test_train_into_a_directory_with_a_checkpoint_needs_resume_or_overwrite(tmp_path, capsys):
    # a fresh run clears its directory: a forgotten --resume must not wipe a long run's checkpoint
    out = tmp_path / "run"
    argv = ["train", "--method", "sum", "--iters", "2", "--out", str(out), *TINY]
    assert main(argv) == 0
    saved = (out / CHECKPOINT).read_bytes()
    capsys.readouterr()
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "holds the checkpoint of an earlier run" in err and f"--resume {out}" in err and "--overwrite" in err
    assert (out / CHECKPOINT).read_bytes() == saved  # untouched
    assert not (out / rundir.LOCK).exists() or (out / rundir.LOCK).read_text() == ""  # the probe let go
    assert main([*argv, "--iters", "1", "--overwrite"]) == 0  # starts afresh, here for one step
    assert read_checkpoint(out / CHECKPOINT)["step"] == 1
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1]


# --- concurrent use ---------------------------------------------------------------------------


def test_second_train_into_a_running_directory_gets_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    results = []

    def second(tr):
        if tr.step == 2:  # after the first checkpoint
            results.append(main(["train", "--method", "sum", "--out", str(out), *TINY]))
            with pytest.raises(RunDirectoryInUse, match=f"in use by another training process \\(pid {os.getpid()}"):
                Trainer.resume(out)

    cfg = tiny(tmp_path, iters=3, method="sum")
    cfg.out = str(out)
    Trainer(cfg).run(callback=second)
    assert results == [EXIT_USAGE]
    assert f"is in use by another training process (pid {os.getpid()}" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3]  # the first run is untouched
    assert (out / rundir.LOCK).read_text() == ""  # released


def test_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    cfg = tiny(tmp_path, iters=2)
    lock_path = Path(cfg.out) / rundir.LOCK
    lock_path.parent.mkdir(parents=True)
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'pid {os.getpid()} on test'.encode()); "
              "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(lock_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryInUse, match=f"pid {proc.pid} on test"):
            RunLock(cfg.out).acquire()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with pytest.warns(RuntimeWarning, match=f"taking over the lock left by pid {proc.pid} on test"):
        Trainer(cfg).run()
    assert lock_path.read_text() == ""


def test_fresh_run_into_an_old_run_directory_replaces_it(tmp_path):
    cfg = tiny(tmp_path, iters=4)
    Trainer(cfg).run()
    run = Path(cfg.out)
    assert {CHECKPOINT, PREVIOUS_CHECKPOINT, "summary.json"} <= {p.name for p in run.iterdir()}
    cfg2 = copy.deepcopy(cfg)
    cfg2.seed = 7
    Trainer(cfg2).run(max_steps=1)
    names = {p.name for p in run.iterdir()}
    assert PREVIOUS_CHECKPOINT not in names and "summary.json" not in names  # nothing of the old run to fall back to
    assert checkpoint_step(run / CHECKPOINT) == 1 and [r["step"] for r in read_metrics(run)] == [1]


# --- a full disk ------------------------------------------------------------------------------


def _fail_checkpoint_writes(monkeypatch, how: str, after: int = 1) -> None:
    """Makes the checkpoint writes after the first ``after`` fail with ENOSPC: ``write`` after
    writing half of the file, or ``fsync``."""
    real = {"write": os.write, "fsync": os.fsync}
    calls = {"n": 0}

    def is_tmp(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(CHECKPOINT + ".tmp")
        except OSError:
            return False

    def write(fd, data):
        if is_tmp(fd):
            if os.lseek(fd, 0, os.SEEK_CUR) == 0:  # the first write of a checkpoint
                calls["n"] += 1
                if calls["n"] > after:
                    return real["write"](fd, memoryview(data)[: len(data) // 2])
            elif calls["n"] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real["write"](fd, data)

    def fsync(fd):
        if is_tmp(fd):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real["fsync"](fd)

    monkeypatch.setattr(os, how, write if how == "write" else fsync)


@pytest.mark.parametrize("how", ["write", "fsync"])
def test_failed_checkpoint_write_keeps_the_previous_one_and_names_the_path(tmp_path, monkeypatch, how):
    cfg = tiny(tmp_path)
    _fail_checkpoint_writes(monkeypatch, how)
    latest = Path(cfg.out) / CHECKPOINT
    with pytest.raises(CheckpointWriteError, match=rf"could not write checkpoint {latest}: No space left on device"):
        Trainer(cfg).run()
    monkeypatch.undo()
    assert checkpoint_step(latest) == 2 and not (Path(cfg.out) / (CHECKPOINT + ".tmp")).exists()


def test_full_disk_exit_code_through_the_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_checkpoint_writes(monkeypatch, "fsync", after=0)
    assert main(["train", "--iters", "3", "--set", "log.checkpoint_every=1", "--out", str(out), *TINY]) == EXIT_OUTPUT_ERROR
    err = capsys.readouterr().err
    assert f"could not write checkpoint {out / CHECKPOINT}" in err and "no earlier checkpoint exists" in err


# --- metrics ----------------------------------------------------------------------------------


def test_torn_last_metrics_line_is_ignored_and_dropped_on_resume(tmp_path):
    cfg = tiny(tmp_path)
    tr = Trainer(cfg)
    tr.run(max_steps=4)
    path = Path(cfg.out) / rundir.METRICS
    good = read_metrics(cfg.out)
    with open(path, "a") as fh:
        fh.write('{"step": 5, "kind": "train", "loss": [0.1')  # a write cut short
    assert read_metrics(cfg.out) == good
    records = read_metrics(cfg.out) + [{"step": 4, "kind": "eval", "rel_l2": {"1e-08": {"rho": 0.5}}}]
    plot_losses(records, tr.layout.names, tmp_path / "l.png")
    plot_errors(records, tmp_path / "e.png")
    plot_cosines(records, tr.layout.names, tmp_path / "c.png")
    assert all((tmp_path / f).stat().st_size > 0 for f in ("l.png", "e.png", "c.png"))
    Trainer.resume(cfg.out).run()
    text = path.read_text()
    assert text.endswith("\n") and [json.loads(line)["step"] for line in text.splitlines()
                                     if json.loads(line)["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_damaged_metrics_line_before_others_is_an_error(tmp_path):
    (tmp_path / rundir.METRICS).write_text('{"step": 1, "kind": "train"}\n{"step": 2, "ki\n{"step": 3, "kind": "train"}\n')
    with pytest.raises(ValueError, match="line 2 is not a JSON record"):
        read_metrics(tmp_path)
