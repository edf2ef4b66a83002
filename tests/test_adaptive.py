"""Residual-based adaptive sampling (config ``adaptive``, :mod:`hrgrad_ext.train.adaptive`)."""

import copy

import pytest
import torch

from hrgrad_ext.train.adaptive import ResidualSampler, rad_probabilities
from hrgrad_ext.train.rundir import CHECKPOINT
from hrgrad_ext.train.segmented import SegmentedLosses
from hrgrad_ext.train.trainer import Trainer

from test_train import tiny_config


def test_rad_probabilities_follow_the_residual_law():
    r = torch.tensor([[0.0, 1.0, 2.0, 5.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    # p ~ r^k / mean(r^k) + c, per task
    for k, c in ((1.0, 1.0), (2.0, 0.5), (1.0, 0.0), (0.5, 3.0)):
        rk = r ** k
        expect = rk / rk.mean(1, keepdim=True) + c
        torch.testing.assert_close(rad_probabilities(r, k, c), expect / expect.sum(1, keepdim=True), rtol=1e-14, atol=0)
    # c = 0, k = 1: proportional to the residual; a zero-residual point is never drawn
    p = rad_probabilities(r, 1.0, 0.0)
    torch.testing.assert_close(p[0], r[0] / r[0].sum(), rtol=1e-14, atol=0)
    # k = 0 or c -> infinity: the base density (equal probabilities over the pool)
    torch.testing.assert_close(rad_probabilities(r, 0.0, 1.0), torch.full_like(r, 0.25), rtol=1e-14, atol=0)
    assert (rad_probabilities(r, 1.0, 1e9) - 0.25).abs().max() < 1e-8
    # larger k concentrates on the largest residual
    assert rad_probabilities(r, 4.0, 0.0)[0, 3] > rad_probabilities(r, 1.0, 0.0)[0, 3]
    # nothing to go by (all zero with c = 0, or a non-finite residual): equal probabilities
    bad = torch.tensor([[0.0, 0.0, 0.0], [1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0]], dtype=torch.float64)
    torch.testing.assert_close(rad_probabilities(bad, 1.0, 0.0), torch.full_like(bad, 1 / 3), rtol=0, atol=1e-15)


@pytest.mark.parametrize("problem", ["transport", "bgk"])
def test_interior_rows_average_to_the_interior_loss(tmp_path, problem):
    # the rows that RAD scores (and causal weighting weighs) are the interior loss point by point
    tr = Trainer(tiny_config(tmp_path, problem, dtype="float64"))
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    fn = SegmentedLosses(tr.model, tr.form, tr.layout)
    expanded = [[p.detach().unsqueeze(0).expand(len(tr.cfg.eps), *p.shape) for p in tr.params]]
    sampler = ResidualSampler(every=1, pool=1)
    captured = {}
    real = tr.form.interior_rows

    def spy(out, inp, K):
        captured["rows"] = real(out, inp, K)
        return captured["rows"]

    tr.form.interior_rows = spy
    gen = torch.Generator().manual_seed(5)
    sampler.refresh(tr.model, tr.form, gen, tr.eps_tensor, 0, "cpu", torch.float64)
    pool = {k: v.clone() for k, v in sampler.points.items()}
    # score the batch's own interior points through the pool path: same points, same rows
    batch_gen = torch.Generator().manual_seed(5)
    again = tr.form.sample("interior", batch_gen, len(tr.cfg.eps), tr.form.points["interior"], tr.eps_tensor)
    torch.testing.assert_close(again["x"], pool["x"], rtol=0, atol=0)
    batch["interior"].update({k: v.to(torch.float64) for k, v in again.items()})
    _, groups = fn(expanded, batch)
    K = len(tr.cfg.eps)
    torch.testing.assert_close(captured["rows"].reshape(K, -1).mean(1), groups["interior"], rtol=1e-12, atol=0)
    assert bool((captured["rows"] >= 0).all()) and captured["rows"].std() > 0


def test_adaptive_points_come_from_the_pool_where_the_residual_is(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "transport", dtype="float64")
    tr = Trainer(cfg)
    K, n = len(cfg.eps), tr.form.points["interior"]
    # a residual that lives in x < 0.3 only: with c = 0 every drawn point lies there
    monkeypatch.setattr(tr.form, "interior_rows", lambda out, inp, K: (inp["x"].reshape(-1) < 0.3).double())
    sampler = ResidualSampler(every=10, pool=16, k=1.0, c=0.0)
    sampler.refresh(tr.model, tr.form, tr.gen, tr.eps_tensor, 0, "cpu", torch.float64)
    assert sampler.points["x"].shape == (K, 16 * n)
    assert int(((sampler.points["x"] < 0.3).sum(1) >= n).all())  # precondition: enough such points
    interior = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)["interior"]
    for _ in range(20):
        drawn = sampler.draw(tr.gen, interior)
        assert drawn["x"].shape == (K, n) and bool((drawn["x"] < 0.3).all())
        assert torch.equal(drawn["eps"], interior["eps"])
        for i in range(K):  # drawn from the pool, without replacement, (t, x) pairs kept together
            pairs = set(zip(sampler.points["t"][i].tolist(), sampler.points["x"][i].tolist()))
            got = list(zip(drawn["t"][i].tolist(), drawn["x"][i].tolist()))
            assert set(got) <= pairs and len(set(got)) == n
    # c = 1: the same residual draws about half of the mass there, the rest from the whole pool
    sampler.c = 1.0
    sampler.refresh(tr.model, tr.form, tr.gen, tr.eps_tensor, 0, "cpu", torch.float64)
    share = (sampler.points["x"] < 0.3).double().mean(1, keepdim=True)
    expect = (1 + share) / 2  # 1/2 (residual part) + 1/2 share (the base part)
    torch.testing.assert_close((sampler.probs * (sampler.points["x"] < 0.3)).sum(1, keepdim=True), expect,
                               rtol=1e-12, atol=0)
    assert not sampler.due(9) and sampler.due(10)


def test_adaptive_run_resumes_exactly(tmp_path):
    # the pool is checkpointed: an interrupted and resumed run draws the same points
    base = tiny_config(tmp_path, "bgk", iters=6)
    base.adaptive = {"every": 4, "pool": 3}
    base.log.checkpoint_every = 100
    full, cut = copy.deepcopy(base), copy.deepcopy(base)
    full.out, cut.out = str(tmp_path / "full"), str(tmp_path / "cut")
    t_full = Trainer(full)
    t_full.run()
    assert t_full.adaptive.built_at == 4
    assert Trainer(cut).run(max_steps=3) is None  # the pool of step 0 is in the checkpoint
    assert (tmp_path / "cut" / CHECKPOINT).is_file()
    resumed = Trainer.resume(cut.out)
    assert resumed.adaptive.built_at == 0 and resumed.step == 3
    resumed.run()
    for a, b in zip(t_full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(t_full.adaptive.probs, resumed.adaptive.probs)


def test_adaptive_changes_the_training_points(tmp_path):
    # precondition of the resume test: with the option on, the run is not the plain one
    plain = tiny_config(tmp_path / "plain", "transport", iters=2)
    rad = tiny_config(tmp_path / "rad", "transport", iters=2)
    rad.adaptive = {"every": 1, "k": 2.0}
    a, b = Trainer(plain), Trainer(rad)
    a.run()
    b.run()
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("bad", [{"every": 0}, {"pool": 0}, {"every": 1.5}, {"k": -1.0}, {"c": float("nan")},
                                 {"c": True}, {"period": 10}, [1, 2]])
def test_adaptive_config_is_checked(tmp_path, bad):
    cfg = tiny_config(tmp_path, "transport")
    cfg.adaptive = bad
    with pytest.raises(ValueError, match="adaptive"):
        cfg.validate()


def test_adaptive_sampling_is_refused_with_shares_of_the_points(tmp_path):
    cfg = tiny_config(tmp_path, "bgk")
    cfg.adaptive = {"every": 10}
    cfg.distributed.shards = 2
    with pytest.raises(ValueError, match="adaptive: the adaptive sampling runs in one process"):
        cfg.validate()
