"""hrgrad_ext.distributed and distributed training on gloo (CPU), 2 and 3 processes (issue 12).

The library checks run in one set of 3 forked processes (with a 2-rank subgroup for world
size 2); the 20-step training comparison in 2 forked processes; the failure and resume checks
through ``hrgrad-ext train --nproc 2`` (torchrun's launcher, fresh interpreters). Every run is
float64; the references are single-process computations on the concatenated points.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hrgrad_ext
from hrgrad_ext import ConFIG, GradNorm, HRGrad, Mean, MGDA, PCGrad, ReLoBRaLo, Sum, UPGrad
from hrgrad_ext import distributed as hd
from hrgrad_ext.distributed._buckets import Layout
from hrgrad_ext.train.config import apply_overrides, to_toml
from hrgrad_ext.train.distributed import ShardSampler, shard_seed
from hrgrad_ext.train.faults import RANK_FAILURE_ENV, RankFailure
from hrgrad_ext.train.rundir import read_checkpoint, read_metrics
from hrgrad_ext.train.trainer import Trainer
from test_cli import TINY as TINY_CLI
from test_train import tiny_config

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def run_ranks(fn, world: int, *args, timeout: float = 300.0) -> None:
    """Runs ``fn(rank, world, store_path, *args)`` in ``world`` forked processes on a gloo group
    (file store: no ports); re-raises a rank's exception; kills them all after ``timeout``."""
    _import_before_fork()
    store = tempfile.mktemp(prefix="hrgrad-dist-")
    ctx = mp.start_processes(_rank_main, args=(world, store, fn, args), nprocs=world, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        if os.path.exists(store):
            os.unlink(store)


def _import_before_fork():
    # what the ranks import anyway (optimizers import dynamo, DDP the DTensor modules), once,
    # before forking, rather than once per rank in parallel
    import torch._dynamo  # noqa: F401
    import torch.distributed.tensor  # noqa: F401


def _rank_main(rank, world, store, fn, args):
    torch.set_num_threads(1)  # forked from a process that may have used OpenMP threads
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


# --- the library: updates equal the single-process update on the concatenated batch ------------

#: task k's loss is SCALE[k] times a mean squared error: task 1's gradient is ~1000x the others'
SCALE = [1.0, 1000.0, 1.0]


def _model():
    torch.manual_seed(0)
    # 3*7 + 7 + 7*3 + 3 = 52 parameters: not divisible by 3; chunk boundaries fall inside tensors
    return torch.nn.Sequential(torch.nn.Linear(3, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _points(counts):
    """``X[r][k]``: rank r's points of task k (``counts[r][k]`` of them), from one seed."""
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(n, 3, generator=g, dtype=torch.float64) for n in row] for row in counts]


def _losses(model, xs):
    # a rank with no point of a task has an empty mean: NaN, which must not matter
    return [SCALE[k] * ((model(x)[:, k] - torch.sin(x[:, 0])) ** 2).mean() for k, x in enumerate(xs)]


def _flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _reference_update(agg, counts):
    X = _points(counts)
    ref = _model()
    hrgrad_ext.backward(_losses(ref, [torch.cat([row[k] for row in X]) for k in range(len(SCALE))]), ref.parameters(),
                        agg)
    return _flat_grad(ref)


def _assert_close(got, expected, rtol):
    err = float((got - expected).norm() / expected.norm())
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


def _assert_same_on_every_rank(t, group):
    mine = t.detach().reshape(-1).to(torch.float64)
    R = dist.get_world_size(group)
    out = [torch.empty_like(mine) for _ in range(R)]
    dist.all_gather(out, mine, group=group)
    for o in out:
        assert torch.equal(o, mine), "ranks disagree"


def _second_step(agg, K):
    """A loss-weighting aggregator after one step on unit losses and gradients, so that its
    weights at the next step depend on that step's (global) losses."""
    agg.observe_losses(torch.ones(K, dtype=torch.float64))
    agg.weights_from_gram(torch.eye(K, dtype=torch.float64))
    return agg


def _check_group(group, world, rank):
    R = dist.get_world_size(group)
    K, n = len(SCALE), 52
    makers = {"hrgrad": HRGrad, "sum": Sum, "mean": Mean, "pcgrad": lambda: PCGrad(seed=3), "upgrad": UPGrad,
              "mgda": MGDA, "relobralo": lambda: _second_step(ReLoBRaLo(alpha=0.5), K),
              "gradnorm": lambda: _second_step(GradNorm(lr=0.2), K)}
    even = [[5] * K for _ in range(R)]
    uneven = [[3 + r + 2 * k for k in range(K)] for r in range(R)]
    uneven[R - 1][2] = 0  # the last rank holds no point of task 2
    for name, make in makers.items():
        main = name in ("hrgrad", "sum")  # every case; the other aggregators: uneven shares, one bucket
        for counts, how in [(even, None), (uneven, "counts")] if main else [(uneven, "counts")]:
            expected = _reference_update(make(), counts)
            for mode in hd.MODES:
                for bucket_mb in (hd.BUCKET_MB, 1e-4) if main else (hd.BUCKET_MB,):  # 1 bucket; 13 numbers each
                    m = _model()
                    res = hd.backward(_losses(m, _points(counts)[rank]), m.parameters(), make(), group=group, mode=mode,
                                      num_points=counts[rank] if how else None, bucket_mb=bucket_mb)
                    got = _flat_grad(m)
                    _assert_close(got, expected, 1e-10)
                    for t in (got, res.gram, res.weights, res.losses):
                        _assert_same_on_every_rank(t, group)
                    buckets = Layout([p.numel() for p in m.parameters()], R,
                                     hd.bucket_numel(bucket_mb, torch.float64)).buckets
                    chunk = sum(b.chunk for b in buckets)
                    if mode == "data_parallel":
                        assert res.task_gradient_bytes == K * n * 8
                        assert res.bytes_communicated == K * n * 8 + K * 8 + (K * 8 if how else 0)
                    else:
                        # the per-rank memory for task gradients: K n / R numbers, plus padding
                        assert res.task_gradient_bytes == K * chunk * 8 and R * chunk - n < R * len(buckets)
                        assert res.bytes_communicated == (K * R * chunk * 8 + K * K * 8 + K * 8 + R * chunk * 8
                                                          + (K * 8 if how else 0))
    # the global task losses are the means over all points
    X = _points(uneven)
    m = _model()
    res = hd.backward(_losses(m, X[rank]), m.parameters(), Sum(), group=group, num_points=uneven[rank])
    full = _losses(_model(), [torch.cat([row[k] for row in X]) for k in range(K)])
    torch.testing.assert_close(res.losses, torch.stack(full).detach(), rtol=1e-12, atol=0)

    # named losses, as hrgrad_ext.backward takes them
    m = _model()
    named = dict(zip("abc", _losses(m, X[rank])))
    res = hd.backward(named, m.parameters(), HRGrad(), group=group, mode="sharded",
                      num_points=dict(zip("abc", uneven[rank])))
    assert res.names == ("a", "b", "c") and set(res.named_weights) == {"a", "b", "c"}
    _assert_close(_flat_grad(m), _reference_update(HRGrad(), uneven), 1e-10)

    # a Shard: each rank steps its own slice, gather() re-assembles the parameters
    for bucket_mb in (hd.BUCKET_MB, 1e-4):
        ref = _model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
        m = _model()
        shard = hd.Shard(m.parameters(), group=group, bucket_mb=bucket_mb)
        assert shard.param.numel() == sum(b.chunk for b in shard.layout.buckets) < n
        opt = torch.optim.SGD([shard.param], lr=1e-3)
        for _ in range(2):
            hrgrad_ext.backward(_losses(ref, [torch.cat([row[k] for row in X]) for k in range(K)]), ref.parameters(),
                                HRGrad())
            ref_opt.step()
            ref_opt.zero_grad()
            hd.backward(_losses(m, X[rank]), shard, HRGrad(), group=group, mode="sharded", num_points=uneven[rank],
                        bucket_mb=bucket_mb)
            opt.step()
            opt.zero_grad()
            shard.gather()
        for p, q in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)

    # ConFIG needs the whole matrix: data-parallel yes, sharded refused
    expected = _reference_update(ConFIG(), even)
    m = _model()
    hd.backward(_losses(m, _points(even)[rank]), m.parameters(), ConFIG(), group=group, mode="data_parallel")
    _assert_close(_flat_grad(m), expected, 1e-10)
    with pytest.raises(ValueError, match="sharded.*Gram matrix.*ConFIG"):
        hd.backward(_losses(m, _points(even)[rank]), m.parameters(), ConFIG(), group=group, mode="sharded")

    # a DDP-wrapped model: distributed.backward uses torch.autograd.grad, which DDP's reducer
    # does not see, so with or without no_sync() the result is the same
    expected = _reference_update(HRGrad(), even)
    for use_no_sync in (False, True):
        ddp = torch.nn.parallel.DistributedDataParallel(_model(), process_group=group)
        for _ in range(2):  # a second forward pass after the first aggregated backward
            ddp.zero_grad()
            ctx = ddp.no_sync() if use_no_sync else torch.enable_grad()
            with ctx:
                losses = _losses(ddp, _points(even)[rank])
            hd.backward(losses, ddp.parameters(), HRGrad(), group=group)
        _assert_close(_flat_grad(ddp.module), expected, 1e-10)


def _library_checks(rank, world):
    assert world == 3
    pair = dist.new_group([0, 1])  # a collective: every rank takes part
    _check_group(None, world, rank)
    if rank < 2:
        _check_group(pair, world, rank)
    # bad input
    m = _model()
    with pytest.raises(ValueError, match="unknown mode"):
        hd.backward(_losses(m, _points([[2] * 3] * 3)[rank]), m.parameters(), mode="zero")
    with pytest.raises(ValueError, match="num_points"):
        hd.backward(_losses(m, _points([[2] * 3] * 3)[rank]), m.parameters(), num_points=[1, 2])
    # a run whose points come in 2 shares cannot continue on 3 ranks: refused, naming what works
    cfg = tiny_config(Path(tempfile.gettempdir()), "transport", dtype="float64")
    cfg.distributed.shards = 2
    with pytest.raises(ValueError, match=r"distributed.shards = 2.*3 ranks cannot split.*\(1, 2\)"):
        Trainer(cfg)


def test_distributed_updates_equal_the_single_process_update():
    """Data-parallel and sharded updates on 3 and 2 ranks equal the single-process update on
    the concatenated batch (float64, 1e-10 relative) for every Gramian aggregator, one task's
    gradient 1000x another's, equal and unequal shares of points (a rank with none of a task),
    one bucket and buckets of 13 numbers (chunk boundaries inside tensors; 52 parameters, not
    divisible by 3); G, w, the update and the losses agree bit for bit across ranks; the
    memory for task gradients falls as 1/world_size; bytes are counted; Shard steps; ConFIG;
    DDP-wrapped models."""
    run_ranks(_library_checks, 3)


def test_layout_splits_every_parameter_exactly_once():
    for numels, R, cap in [([21, 7, 21, 3], 3, 52), ([21, 7, 21, 3], 2, 13), ([5], 4, 100), ([1, 1], 3, 1),
                           ([10, 0, 6], 4, 7)]:
        layout = Layout(numels, R, cap)
        seen = {i: [] for i, n in enumerate(numels) if n}
        for bk in layout.buckets:
            assert bk.chunk * R >= bk.numel > (bk.chunk - 1) * R
            for i, o, n in zip(bk.params, bk.offsets, bk.numels):
                for r, start, stop in bk.pieces[i]:
                    assert r * bk.chunk <= start < stop <= (r + 1) * bk.chunk
                    seen[i] += list(range(start - o, stop - o))
        assert all(sorted(v) == list(range(numels[i])) for i, v in seen.items())
        assert layout.shard_numel == sum(b.chunk for b in layout.buckets)


def test_backward_needs_a_process_group():
    m = _model()
    with pytest.raises(RuntimeError, match="not initialised"):
        hd.backward(_losses(m, _points([[2] * 3])[0]), m.parameters())


# --- training -----------------------------------------------------------------------------------

ITERS = 20


def _train_config(tmp_path: Path, name: str, mode: str = "data_parallel", problem: str = "transport"):
    cfg = tiny_config(tmp_path, problem, "hrgrad", iters=ITERS, dtype="float64", threads=1)
    cfg.out = str(tmp_path / name)
    cfg.log.log_every = 5
    cfg.log.checkpoint_every = 5
    cfg.log.eval_every = 10**6  # evaluated once, at the end
    cfg.distributed.mode = mode
    return cfg


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The reference: one process drawing both shares of the points (20 steps)."""
    tmp = tmp_path_factory.mktemp("one-rank")
    cfg = _train_config(tmp, "one")
    cfg.distributed.shards = 2
    Trainer(cfg).run()
    return read_checkpoint(Path(cfg.out) / "checkpoint.pt")


def _assert_same_parameters(state, ref, rtol=1e-8):
    for k, v in ref["model"].items():
        torch.testing.assert_close(state["model"][k], v, rtol=rtol, atol=rtol * float(v.abs().max()) + 1e-300)


def _train_rank(rank, world, cfg):
    tr = Trainer(cfg)
    assert tr.dist is not None and tr.is_writer == (rank == 0)
    summary = tr.run()
    assert (summary is not None) == (rank == 0)


def test_two_rank_training_equals_one_rank_on_the_same_points(tmp_path, one_rank_run):
    """20 steps on 2 ranks (data-parallel) equal 20 steps of one process on the same global
    points, float64, 1e-8; rank 0 alone writes, with per-rank timings and bytes."""
    cfg = _train_config(tmp_path, "two")
    run_ranks(_train_rank, 2, cfg)
    out = Path(cfg.out)
    state = read_checkpoint(out / "checkpoint.pt")
    assert state["step"] == ITERS and state["world_size"] == 2 and len(state["sampler_rng"]) == 2
    _assert_same_parameters(state, one_rank_run)
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, ITERS + 1, 5))  # written once, by rank 0
    last = train[-1]
    assert last["world_size"] == 2 and last["distributed_mode"] == "data_parallel"
    assert len(last["rank_train_time_s"]) == 2 and all(t > 0 for t in last["rank_train_time_s"])
    n = sum(p.numel() for p in Trainer(_train_config(tmp_path, "count")).params)
    assert last["bytes_communicated"] == 2 * n * 8 + (2 + 2 + 2 * 2) * 8  # K x plain DDP, plus the losses etc.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["rank_step_time_ms"]) == 2
    assert "shards = 2" in (out / "config.toml").read_text()


def _bgk_weak_config(tmp_path: Path, name: str):
    # BGK with the two per-point / per-cell options whose layout has to survive the shares:
    # the integral conservation cells (12 contiguous points per cell) and the compression weights
    cfg = _train_config(tmp_path, name, problem="bgk")
    cfg.iters = 10
    cfg.loss_weights = {"weak": 1.0}
    cfg.points = {**cfg.points, "cells": 3}
    cfg.compression = {"k": 1.0, "knee": 0.1}
    return cfg


def test_two_rank_bgk_with_integral_cells_and_compression_equals_one_rank(tmp_path):
    """The BGK options that add a point group (``loss_weights.weak``: cells) or weight the
    points (``compression``) on 2 data-parallel ranks equal one process drawing both shares
    (float64, 1e-8): each rank's cells are whole cells, so the shares concatenate."""
    one = _bgk_weak_config(tmp_path, "one")
    one.distributed.shards = 2
    Trainer(one).run()
    ref = read_checkpoint(Path(one.out) / "checkpoint.pt")
    two = _bgk_weak_config(tmp_path, "two")
    run_ranks(_train_rank, 2, two)
    state = read_checkpoint(Path(two.out) / "checkpoint.pt")
    assert state["step"] == 10 and state["world_size"] == 2
    _assert_same_parameters(state, ref)
    # not vacuous: the cells change the run
    off = _bgk_weak_config(tmp_path, "off")
    off.loss_weights = {"weak": 0.0}
    off.distributed.shards = 2
    Trainer(off).run()
    moved = read_checkpoint(Path(off.out) / "checkpoint.pt")["model"]
    assert any((moved[k] - v).abs().max() > 1e-6 for k, v in ref["model"].items())


def _resume_rank(rank, world, out):
    tr = Trainer.resume(out)
    assert tr.step == 10 and tr.shard is not None
    tr.run()


def _survivor_or_victim(rank, world, cfg, report):
    if rank == 1:
        os.environ[RANK_FAILURE_ENV] = "1:8:kill"  # SIGKILL at step 8: no Python cleanup at all
    t0 = time.monotonic()
    try:
        Trainer(cfg).run()
    except hd.PeerFailureError as exc:
        Path(report).write_text(f"{time.monotonic() - t0:.1f}\n{exc}")
        return
    raise AssertionError("rank 0 finished although rank 1 was killed")


def test_killed_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    """A rank killed with SIGKILL: the other's next collective fails at once (gloo) with
    :class:`PeerFailureError` naming it; the step-5 checkpoint stays intact."""
    cfg = _train_config(tmp_path, "kill")
    report = tmp_path / "report.txt"
    _import_before_fork()
    ctx = mp.get_context("fork")
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, store, _survivor_or_victim, (cfg, str(report))))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung after its peer was killed"
    assert procs[1].exitcode == -9 and procs[0].exitcode == 0
    text = report.read_text()
    assert "failed on rank 0: another rank probably stopped, died or timed out" in text
    assert read_checkpoint(Path(cfg.out) / "checkpoint.pt")["step"] == 5


def _cli_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **extra}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def test_failing_rank_stops_the_job_and_the_run_resumes(tmp_path, one_rank_run):
    """``hrgrad-ext train --nproc 2`` (sharded): rank 1 raises at step 13; the job ends with
    its exit code and a clear error, no hang, the step-10 checkpoint intact. The run then
    resumes on 2 ranks, and a copy of it on 1 process (another world size), both
    reaching the one-process result. (The launcher runs once here: fresh interpreters cost
    seconds; the resumed run uses the forked ranks of the other tests.)"""
    cfg = _train_config(tmp_path, "fail", "sharded")
    (tmp_path / "fail.toml").write_text(to_toml(cfg))
    out = Path(cfg.out)
    args = ["train", "--nproc", "2", "--config", str(tmp_path / "fail.toml"), "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "hrgrad_ext.cli", *args], capture_output=True, text=True,
                          timeout=300, env=_cli_env(**{RANK_FAILURE_ENV: "1:13"}))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "injected failure at step 13" in proc.stderr
    assert "rank 1 of 2 exited with code 1" in proc.stderr
    state = read_checkpoint(out / "checkpoint.pt")  # complete, verified by its SHA-256
    assert state["step"] == 10
    single = tmp_path / "single"
    shutil.copytree(out, single)
    run_ranks(_resume_rank, 2, out)
    final = read_checkpoint(out / "checkpoint.pt")
    assert final["step"] == ITERS
    _assert_same_parameters(final, one_rank_run)
    # the same run continued by one process: it draws both shares of the points itself
    tr = Trainer.resume(single)
    assert tr.dist is None and tr.sampler.shards == 2 and tr.step == 10
    tr.run()
    _assert_same_parameters(read_checkpoint(single / "checkpoint.pt"), one_rank_run)


def main_cli(argv):
    from hrgrad_ext.cli import main

    old = {k: os.environ.pop(k, None) for k in ("WORLD_SIZE", "RANK")}
    try:
        return main(argv)
    finally:
        os.environ.update({k: v for k, v in old.items() if v is not None})


# --- pieces -------------------------------------------------------------------------------------


def test_shard_sampler_draws_the_same_global_points_on_any_world_size(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "transport", dtype="float64"))
    eps = tr.eps_tensor
    one = ShardSampler(0, 4).sample(tr.form, eps, "cpu", torch.float64)
    parts = [ShardSampler(0, 4, r, 2).sample(tr.form, eps, "cpu", torch.float64) for r in range(2)]
    for group, pts in one.items():
        for k, v in pts.items():
            if v.dim() >= 2:
                torch.testing.assert_close(torch.cat([p[group][k] for p in parts], 1), v, rtol=0, atol=0)
                assert v.shape[1] == 4 * tr.form.points[group]
    # share 0 is the single-process stream (seed + 1); the others differ
    assert shard_seed(7, 0) == 8 and len({shard_seed(7, s) for s in range(8)}) == 8
    with pytest.raises(ValueError, match="3 ranks cannot split"):
        ShardSampler(0, 4, 0, 3)


def test_distributed_config_and_failure_injection_are_validated(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    for key, bad in [("mode", '"zero"'), ("backend", '"mpi"'), ("shards", "-1"), ("timeout_s", "0"),
                     ("bucket_mb", "-1")]:
        with pytest.raises(ValueError, match=f"distributed.{key}"):
            apply_overrides(cfg, [f"distributed.{key}={bad}"]).validate()
    monkeypatch.setenv(RANK_FAILURE_ENV, "1:3:explode")
    with pytest.raises(ValueError, match="RANK:STEP"):
        RankFailure.from_env(1)
    monkeypatch.setenv(RANK_FAILURE_ENV, "1:3")
    assert RankFailure.from_env(0) is None and RankFailure.from_env(1).step == 3
    assert main_cli(["train", "--nproc", "0", "--out", str(tmp_path / "x"), *TINY_CLI]) == 2
