"""The trainer's state against closed forms: one optimizer step, the parameter average, resume.

* one SGD step from known parameters moves them by exactly ``-lr J^T w`` (``J`` from the
  one-backward-per-task path, ``w`` from a copy of the aggregator), for every aggregator, with
  update clipping off and binding;
* the parameter average after a few steps equals its closed form;
* a run resumed from a checkpoint equals the uninterrupted run in every stateful part (model,
  optimizer, LR schedule, parameter average, point sampler, torch / numpy / Python RNGs,
  aggregator RNG, running loss statistics, the divergence policy's skip counts), with an
  aggregator whose state matters (PCGrad on six (eps, point group) tasks, whose random
  projection order changes the update).

Tiny float64 models on transport tasks in the diffusion limit (cheap references).
"""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from test_train import run_dir_copy, tiny_config

from hrgrad_ext.train.config import METHODS
from hrgrad_ext.train.faults import NONFINITE_ENV
from hrgrad_ext.train.segmented import segmented_task_gradients, separate_task_gradients
from hrgrad_ext.train.trainer import Trainer, make_aggregator, read_metrics


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def six_task_config(tmp_path, method="pcgrad", **kw):
    """Transport, eps 1e-8 and 1e-7 x (interior, boundary, initial): six tasks."""
    return tiny_config(tmp_path, method=method, tasks="eps_group", dtype="float64", **kw)


@pytest.mark.parametrize("clip", ["off", "binding"])
def test_one_sgd_step_moves_the_parameters_by_minus_lr_times_the_update(tmp_path, clip):
    J = None
    for method in METHODS:
        cfg = six_task_config(tmp_path, method)
        cfg.optim.name, cfg.optim.momentum, cfg.optim.lr, cfg.optim.schedule = "sgd", 0.0, 0.05, "constant"
        tr = Trainer(cfg)  # the same seed: the same initial parameters and points for every method
        theta0 = flat(tr.params)
        if J is None:
            # the points of the step (from a copy of the sampler), one backward pass per task
            batch = tr.form.sample_batch(torch.Generator().set_state(tr.gen.get_state()), tr.eps_tensor, "cpu",
                                         torch.float64)
            losses, jac = separate_task_gradients(tr.model, tr.form, batch, tr.layout)
            J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)
            assert J.shape[0] == 6
        # a copy of the aggregator: PCGrad draws its projection order from its own generator;
        # the loss-weighting methods (ReLoBRaLo, GradNorm, SoftAdapt) take the step's losses
        agg = copy.deepcopy(tr.aggregator)
        agg.observe_losses(losses.detach())
        w = agg.weights(J).to(torch.float64)
        update = (w[:, None] * J).sum(0)
        scale, rtol = 1.0, 1e-9
        if clip == "binding":
            tr.cfg.optim.clip_norm = 0.3 * float(update.norm())
            # torch's clip_grad_norm_ divides by (norm + 1e-6)
            scale, rtol = 0.3, 1e-5
        tr.train_step()
        torch.testing.assert_close(flat(tr.params) - theta0, -0.05 * scale * update, rtol=rtol, atol=1e-13,
                                   msg=lambda m: f"{method}: {m}")


def test_the_second_sgd_step_starts_from_fresh_gradients(tmp_path):
    # each step's update is its own -lr J^T w, not added to the previous steps' gradients
    cfg = tiny_config(tmp_path, method="sum", dtype="float64")
    cfg.optim.name, cfg.optim.momentum, cfg.optim.lr, cfg.optim.schedule = "sgd", 0.0, 0.05, "constant"
    tr = Trainer(cfg)
    for _ in range(2):
        theta = flat(tr.params)
        batch = tr.form.sample_batch(torch.Generator().set_state(tr.gen.get_state()), tr.eps_tensor, "cpu",
                                     torch.float64)
        _, jac = separate_task_gradients(tr.model, tr.form, batch, tr.layout)
        update = torch.cat([j.sum(0).reshape(-1) for j in jac])  # Sum: w = 1
        tr.train_step()
        torch.testing.assert_close(flat(tr.params) - theta, -0.05 * update, rtol=1e-9, atol=1e-13)


def test_parameter_average_after_a_few_steps_equals_the_closed_form(tmp_path):
    cfg = tiny_config(tmp_path, iters=5, dtype="float64")
    cfg.optim.ema = 0.3
    tr = Trainer(cfg)
    thetas = [flat(tr.params)]
    tr.run(callback=lambda t: thetas.append(flat(t.params)))
    # decay of step k (0-based): min(ema, (1 + k) / (10 + k)) (warm-up: 0.1, 0.18, 0.25, then 0.3)
    d = [min(0.3, (1 + k) / (10 + k)) for k in range(5)]
    assert d[0] == 0.1 and d[3] == d[4] == 0.3
    # ema_n = prod_k d_k theta_0 + sum_k (1 - d_k) prod_{j > k} d_j theta_{k+1}
    want = math.prod(d) * thetas[0] + sum((1 - d[k]) * math.prod(d[k + 1:]) * thetas[k + 1] for k in range(5))
    torch.testing.assert_close(flat(tr.ema), want, rtol=1e-13, atol=1e-15)
    assert (want - thetas[-1]).abs().max() > 1e-6  # the average is not the last iterate


# --- resume ------------------------------------------------------------------------------------


def resume_config(tmp_path, name):
    cfg = six_task_config(tmp_path, iters=6)
    cfg.optim.schedule = "cosine"  # a new learning rate every step
    cfg.optim.ema = 0.5
    cfg.divergence.on_nonfinite = "skip"
    cfg.log.log_every = 1
    cfg.log.eval_every = cfg.log.checkpoint_every = 100
    return run_dir_copy(cfg, tmp_path, name)


class Recorder:
    """A callback that records, after every step, draws from the global torch, numpy and
    Python RNGs (what a user callback or a stochastic layer would consume) and the state the
    trainer carries."""

    def __init__(self):
        self.steps = {}

    def __call__(self, tr):
        self.steps[tr.step] = {
            "draws": (torch.rand(2).tolist(), np.random.rand(2).tolist(), [random.random(), random.random()]),
            "lr": tr.scheduler.get_last_lr()[0],
            "running": list(tr.running),
            "last_losses": list(tr.last_losses),  # after a skipped step: the last finite step's
        }


def trainer_state(tr) -> dict:
    opt = tr.optimizer.state_dict()
    return {
        "params": flat(tr.params), "ema": flat(tr.ema),
        "adam": flat([v for s in opt["state"].values() for v in s.values()]),
        "scheduler": tr.scheduler.state_dict()["last_epoch"],
        "sampler": tr.gen.get_state(), "aggregator": tr.aggregator.generator.get_state(),
        "running": tr.running, "last_losses": tr.last_losses, "step": tr.step,
        "divergence": (tr.skipped_steps, tr.consecutive_skips, tr.lr_scale, tr.rollbacks),
    }


def test_resume_restores_every_stateful_part(tmp_path, monkeypatch):
    # steps 3 and 4 diverge (NaN in task 0) and are skipped: the checkpoint after step 3 holds
    # one skip in a row, which the skip record of step 4 must continue (2 in a row)
    monkeypatch.setenv(NONFINITE_ENV, "3,4")
    full_cfg = resume_config(tmp_path, "full")
    full, rec_full = Trainer(full_cfg), Recorder()
    full.run(callback=rec_full)

    cut_cfg = resume_config(tmp_path, "cut")
    rec_cut = Recorder()
    assert Trainer(cut_cfg).run(max_steps=3, callback=rec_cut) is None
    resumed = Trainer.resume(cut_cfg.out)
    assert resumed.step == 3

    # precondition: PCGrad's state matters here. On the next batch its restored generator and
    # a freshly seeded one give different weights (random projection order among 6 tasks).
    batch = resumed.form.sample_batch(torch.Generator().set_state(resumed.gen.get_state()), resumed.eps_tensor,
                                      "cpu", torch.float64)
    _, _, jac = segmented_task_gradients(resumed.model, resumed.form, batch, resumed.layout)
    G = sum(j.reshape(6, -1) @ j.reshape(6, -1).T for j in jac)
    restored = copy.deepcopy(resumed.aggregator).weights_from_gram(G)
    fresh = make_aggregator("pcgrad", seed=full_cfg.seed).weights_from_gram(G)
    assert (restored - fresh).abs().max() > 1e-3 * restored.abs().max()

    resumed.run(callback=rec_cut)
    assert sorted(rec_cut.steps) == sorted(rec_full.steps) == list(range(1, 7))
    for step in range(4, 7):  # the steps run after the resume
        assert rec_cut.steps[step] == rec_full.steps[step], f"step {step}"
    a, b = trainer_state(full), trainer_state(resumed)
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, f"resumed run differs from the uninterrupted one in {key}"
    skips = [(r["step"], r["consecutive"]) for r in read_metrics(full_cfg.out) if r["kind"] == "skip"]
    assert skips == [(3, 1), (4, 2)] and full.skipped_steps == 2
    # every metrics record but the timing (the NaN losses of the skipped steps compare as text)
    ra, rb = ([json.dumps({k: v for k, v in r.items() if k != "time"}) for r in read_metrics(c.out)]
              for c in (full_cfg, cut_cfg))
    assert ra == rb and sum('"kind": "train"' in r for r in ra) == 6


def test_resume_keeps_the_rollback_state(tmp_path, monkeypatch):
    # divergence.on_nonfinite = "rollback": NaN at steps 3 and 5. The first rollback (to the
    # checkpoint at step 2) halves the learning rate; a run cut after step 4 and resumed must
    # then halve it again at step 5 (lr x 0.25, rollback 2 of 3), as the uninterrupted run does.
    monkeypatch.setenv(NONFINITE_ENV, "3,5")

    def config(name):
        cfg = tiny_config(tmp_path, iters=6, dtype="float64")
        cfg.divergence.on_nonfinite = "rollback"
        cfg.log.log_every, cfg.log.checkpoint_every, cfg.log.eval_every = 1, 2, 100
        return run_dir_copy(cfg, tmp_path, name)

    full_cfg, cut_cfg = config("full"), config("cut")
    full = Trainer(full_cfg)
    full.run()
    assert Trainer(cut_cfg).run(max_steps=4) is None
    resumed = Trainer.resume(cut_cfg.out)
    resumed.run()
    rollbacks = [(r["nonfinite_step"], r["lr_scale"], r["rollbacks"]) for r in read_metrics(full_cfg.out)
                 if r["kind"] == "rollback"]
    assert rollbacks == [(3, 0.5, 1), (5, 0.25, 2)]
    assert [r for r in read_metrics(cut_cfg.out) if r["kind"] == "rollback"] == \
        [r for r in read_metrics(full_cfg.out) if r["kind"] == "rollback"]
    assert (resumed.lr_scale, resumed.rollbacks) == (full.lr_scale, full.rollbacks) == (0.25, 2)
    assert torch.equal(flat(resumed.params), flat(full.params))
