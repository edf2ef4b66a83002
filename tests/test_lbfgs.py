"""The L-BFGS fine-tuning phase (``[lbfgs]``): it minimises the frozen-weight loss of its batch,
takes the aggregator's weights on that batch, starts from the parameter average, resumes
exactly from a checkpoint taken inside the phase, undoes a non-finite step, and a study or the
CLI counts its steps. Tiny float64 transport runs."""

import json
from pathlib import Path

import pytest
import torch
from test_train import run_dir_copy, tiny_config

from hrgrad_ext.cli import main
from hrgrad_ext.train import lbfgs as lbfgs_module
from hrgrad_ext.train.config import apply_overrides, default_config, presets
from hrgrad_ext.train.lbfgs import frozen_weights
from hrgrad_ext.train.trainer import NonFiniteError, Trainer, read_metrics


def lbfgs_config(tmp_path, method="hrgrad", steps=4, **kw):
    cfg = tiny_config(tmp_path, method=method, iters=4, dtype="float64", **kw)
    cfg.lbfgs.steps, cfg.lbfgs.inner, cfg.lbfgs.points, cfg.lbfgs.eval_every = steps, 3, 2, 2
    return cfg


def flat(tr):
    return torch.cat([p.detach().reshape(-1) for p in tr.params])


def test_phase_minimises_the_weighted_loss_of_its_batch(tmp_path):
    cfg = lbfgs_config(tmp_path, steps=3)
    cfg.optim.ema = 0.5
    tr = Trainer(cfg)
    starts = {}
    tr.run(callback=lambda t: starts.setdefault(t.step, flat(t)) if t.step == cfg.iters else None)
    phase = tr.lbfgs
    assert tr.step == 7 and phase.batch_step == 0
    # the batch has lbfgs.points times the points per task and group
    assert phase.batch["interior"]["t"].shape == (2, 2 * cfg.points["interior"])
    # the weights are HRGrad's on that batch: equal cosines to both task gradients (checked on
    # the weights alone: they are what an HRGrad step from the phase's start would use)
    records = [r for r in read_metrics(cfg.out) if r.get("phase") == "lbfgs"]
    objectives = [r["objective"] for r in records]
    assert len(records) == 2 and objectives == sorted(objectives, reverse=True)
    assert records[0]["weight"] == pytest.approx(phase.weights.tolist())
    with torch.no_grad():
        final = float(phase._objective())
    assert final < objectives[0]
    # the summary holds the evaluation at the end of the optimizer steps: the run without the phase
    summary = json.loads(Path(cfg.out, "summary.json").read_text())
    before = [r for r in read_metrics(cfg.out) if r["kind"] == "eval" and r["step"] == cfg.iters]
    assert summary["lbfgs"]["steps"] == 3 and summary["lbfgs"]["rel_l2_before"] == before[0]["rel_l2"]
    assert summary["lbfgs"]["rel_l2_before"] != summary["rel_l2"]
    assert 0 < summary["lbfgs"]["time_s"] < summary["train_time_s"]
    # the evaluation of the phase uses the current parameters (the average follows them)
    assert all(torch.equal(a, p.detach()) for a, p in zip(tr.ema, tr.params))


def test_phase_starts_from_the_parameter_average(tmp_path):
    cfg = lbfgs_config(tmp_path, method="sum", steps=1)
    cfg.optim.ema = 0.5
    tr = Trainer(cfg)
    assert tr.run(max_steps=4) is None
    average = [a.clone() for a in tr.ema]
    tr.lbfgs.start()
    assert all(torch.equal(p.detach(), a) for p, a in zip(tr.params, average))


def test_resume_inside_the_phase_is_exact(tmp_path):
    base = lbfgs_config(tmp_path, method="relobralo", steps=5)
    base.lbfgs.resample_every = 2  # a new batch and weights at phase steps 0, 2, 4
    full_cfg, cut_cfg = run_dir_copy(base, tmp_path, "full"), run_dir_copy(base, tmp_path, "cut")
    full = Trainer(full_cfg)
    full.run()
    assert Trainer(cut_cfg).run(max_steps=7) is None  # inside the phase, after a resample
    resumed = Trainer.resume(cut_cfg.out)
    assert resumed.lbfgs.batch_step == 2 and resumed.lbfgs.optimizer.state_dict()["state"]
    resumed.run()
    assert torch.equal(flat(full), flat(resumed))
    ra, rb = ([json.dumps({k: v for k, v in r.items() if k != "time"}) for r in read_metrics(c.out)]
              for c in (full_cfg, cut_cfg))
    assert ra == rb


def test_a_nonfinite_step_of_the_phase_is_undone(tmp_path, monkeypatch):
    cfg = lbfgs_config(tmp_path, method="sum", steps=3)
    cfg.divergence.on_nonfinite = "skip"
    tr = Trainer(cfg)
    assert tr.run(max_steps=5) is None
    before = flat(tr)
    real = tr.lbfgs._objective
    monkeypatch.setattr(tr.lbfgs, "_objective", lambda: real() * float("nan"))
    tr.run(max_steps=6)
    assert torch.equal(flat(tr), before) and tr.skipped_steps == 1
    assert [r["kind"] for r in read_metrics(cfg.out) if r["step"] == 6][0] == "skip"
    cfg2 = lbfgs_config(tmp_path / "stop", method="sum", steps=3)
    tr = Trainer(cfg2)
    tr.run(max_steps=5)
    monkeypatch.setattr(tr.lbfgs, "_objective", lambda: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(NonFiniteError, match="step 6"):
        tr.run()


def test_frozen_weights_have_a_positive_floor():
    w = torch.tensor([2.0, -0.5, 0.01, 1.0], dtype=torch.float64)
    floor = 0.1 * (2.0 + 0.01 + 1.0) / 4  # min_weight times the mean of the positive parts
    assert frozen_weights(w, 0.1).tolist() == pytest.approx([2.0, floor, floor, 1.0])
    assert torch.equal(frozen_weights(torch.tensor([1.0, 3.0]), 0.1), torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="no positive weight"):
        frozen_weights(torch.tensor([-1.0, 0.0]), 0.1)


def test_a_negative_weight_does_not_make_the_objective_unbounded(tmp_path, monkeypatch):
    # An aggregator whose weights on the phase's batch have a negative entry (HRGrad's often do):
    # frozen as given, the phase would drive that task's loss up without bound.
    real = lbfgs_module.aggregate_jacobians

    def with_a_negative_weight(agg, jac):
        direction, w, extra = real(agg, jac)
        return direction, torch.tensor([1.0, -0.3], dtype=w.dtype), extra

    monkeypatch.setattr(lbfgs_module, "aggregate_jacobians", with_a_negative_weight)
    cfg = lbfgs_config(tmp_path, steps=3)
    tr = Trainer(cfg)
    assert tr.run(max_steps=cfg.iters) is None
    tr.run(max_steps=cfg.iters + 1)
    losses_before = tr.lbfgs.losses.clone()
    assert tr.lbfgs.weights.tolist() == pytest.approx([1.0, 0.1 * 1.0 / 2])
    tr.run()
    assert bool((tr.lbfgs.losses <= 10 * losses_before + 1e-3).all())


def test_config_cli_and_presets(tmp_path, capsys):
    for bad in ("0", "1.5", "true"):
        with pytest.raises(ValueError, match="lbfgs.min_weight"):
            apply_overrides(tiny_config(tmp_path), [f"lbfgs.min_weight={bad}"]).validate()
    with pytest.raises(ValueError, match="lbfgs.inner"):
        apply_overrides(tiny_config(tmp_path), ["lbfgs.inner=0"]).validate()
    with pytest.raises(ValueError, match="lbfgs.steps"):
        apply_overrides(tiny_config(tmp_path), ["lbfgs.steps=-1"]).validate()
    for problem in ("transport", "bgk"):
        assert "long" in presets(problem)
        long = default_config(problem, "long").validate()
        assert long.total_steps > default_config(problem).total_steps
    with pytest.raises(ValueError, match="no preset 'huge'"):
        default_config("bgk", "huge")
    from test_cli import TINY

    out = tmp_path / "cli"
    assert main(["train", "--iters", "2", "--set", "lbfgs.steps=2", "--set", "lbfgs.inner=2", "--out", str(out),
                 *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["iters"] == 4
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
