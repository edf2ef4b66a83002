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
    pool = {k: v.clone() for k, v in sampler.points["interior"].items()}
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
    pool = sampler.points["interior"]
    assert pool["x"].shape == (K, 16 * n)
    assert int(((pool["x"] < 0.3).sum(1) >= n).all())  # precondition: enough such points
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    interior = batch["interior"]
    for _ in range(20):
        out = sampler.draw(tr.gen, batch)
        drawn = out["interior"]
        assert all(out[g] is batch[g] for g in batch if g != "interior")  # the other groups as drawn
        assert drawn["x"].shape == (K, n) and bool((drawn["x"] < 0.3).all())
        assert torch.equal(drawn["eps"], interior["eps"])
        for i in range(K):  # drawn from the pool, without replacement, (t, x) pairs kept together
            pairs = set(zip(pool["t"][i].tolist(), pool["x"][i].tolist()))
            got = list(zip(drawn["t"][i].tolist(), drawn["x"][i].tolist()))
            assert set(got) <= pairs and len(set(got)) == n
    # c = 1: the same residual draws about half of the mass there, the rest from the whole pool
    sampler.c = 1.0
    sampler.refresh(tr.model, tr.form, tr.gen, tr.eps_tensor, 0, "cpu", torch.float64)
    inside = sampler.points["interior"]["x"] < 0.3
    share = inside.double().mean(1, keepdim=True)
    expect = (1 + share) / 2  # 1/2 (residual part) + 1/2 share (the base part)
    torch.testing.assert_close((sampler.probs["interior"] * inside).sum(1, keepdim=True), expect,
                               rtol=1e-12, atol=0)
    assert not sampler.due(9) and sampler.due(10)


def _bgk_cells_config(tmp_path, **kw):
    """A tiny BGK run with the integral conservation residual on (4 cells per task)."""
    cfg = tiny_config(tmp_path, "bgk", **kw)
    cfg.loss_weights = {"weak": 1.0}
    cfg.points = {**cfg.points, "cells": 4}
    return cfg


def test_bgk_cell_scores_are_the_squared_cell_residuals(tmp_path):
    # what RAD scores a cell by: its squared residual summed over the three conservation laws;
    # the per-task mean over 3 is the cells' loss (weight 1)
    tr = Trainer(_bgk_cells_config(tmp_path, dtype="float64"))
    K, n = len(tr.cfg.eps), tr.form.points["cells"]
    inp = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)["cells"]
    out = tr.form.forward_tasks("cells", tr.model, inp, "fast")
    scores = tr.form.residual_scores("cells", out, inp, K)
    assert scores.shape == (K, n) and scores.std() > 0
    torch.testing.assert_close(scores, tr.form.cell_residuals(out, inp, K).pow(2).sum(-1), rtol=1e-14, atol=0)
    torch.testing.assert_close(scores.mean(1) / 3, tr.form.loss("cells", out, inp, K), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="no residual scores for its 'initial' points"):
        tr.form.residual_scores("initial", out, inp, K)


def test_adaptive_cells_are_drawn_whole_where_their_residual_is(tmp_path, monkeypatch):
    tr = Trainer(_bgk_cells_config(tmp_path, dtype="float64"))
    K, n, unit = len(tr.cfg.eps), tr.form.points["cells"], 4 * tr.form.CELL_NODES
    real = tr.form.residual_scores

    def scores(group, out, inp, K):  # a cell residual that lives in the cells left of x = 0
        if group != "cells":
            return real(group, out, inp, K)
        return (inp["x"].reshape(K, -1, unit).amin(-1) < 0.0).double()

    monkeypatch.setattr(tr.form, "residual_scores", scores)
    sampler = ResidualSampler(every=10, pool=8, c=0.0, groups=("interior", "cells"))
    sampler.refresh(tr.model, tr.form, tr.gen, tr.eps_tensor, 0, "cpu", torch.float64)
    pool = sampler.points["cells"]
    assert pool["x"].shape == (K, 8 * n * unit) and sampler.probs["cells"].shape == (K, 8 * n)
    assert int(((pool["x"].reshape(K, -1, unit).amin(-1) < 0).sum(1) >= n).all())  # precondition
    blocks = [{tuple(b) for b in torch.cat([pool["t"][i].reshape(-1, unit), pool["x"][i].reshape(-1, unit)], 1).tolist()}
              for i in range(K)]
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    for _ in range(10):
        out = sampler.draw(tr.gen, batch)
        drawn = out["cells"]
        assert drawn["x"].shape == (K, n * unit) and torch.equal(drawn["eps"], batch["cells"]["eps"])
        assert bool((drawn["x"].reshape(K, n, unit).amin(-1) < 0).all())
        for i in range(K):  # whole cells of the pool (edges kept together), each at most once
            got = [tuple(b) for b in torch.cat([drawn["t"][i].reshape(n, unit), drawn["x"][i].reshape(n, unit)],
                                               1).tolist()]
            assert set(got) <= blocks[i] and len(set(got)) == n
        assert not torch.equal(out["interior"]["x"], batch["interior"]["x"])  # both groups drawn
        assert out["initial"] is batch["initial"]


def test_adaptive_state_of_an_interior_only_checkpoint_loads():
    # checkpoints written before the per-group pools held the interior pool's tensors directly
    pts = {"t": torch.rand(2, 6, dtype=torch.float64), "x": torch.rand(2, 6, dtype=torch.float64)}
    probs = torch.full((2, 6), 1 / 6, dtype=torch.float64)
    sampler = ResidualSampler()
    sampler.load_state_dict({"points": pts, "probs": probs, "built_at": 7})
    assert sampler.points["interior"] is pts and sampler.probs["interior"] is probs and sampler.built_at == 7
    assert not sampler.due(106) and sampler.due(107)


@pytest.mark.parametrize("groups", [("interior",), ("interior", "cells")])
def test_adaptive_run_resumes_exactly(tmp_path, groups):
    # the pools are checkpointed: an interrupted and resumed run draws the same points
    base = _bgk_cells_config(tmp_path, iters=6) if "cells" in groups else tiny_config(tmp_path, "bgk", iters=6)
    base.adaptive = {"every": 4, "pool": 3, "groups": list(groups)}
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
    for g in groups:
        assert torch.equal(t_full.adaptive.probs[g], resumed.adaptive.probs[g])


def test_adaptive_changes_the_training_points(tmp_path):
    # precondition of the resume test: with the option on, the run is not the plain one
    plain = tiny_config(tmp_path / "plain", "transport", iters=2)
    rad = tiny_config(tmp_path / "rad", "transport", iters=2)
    rad.adaptive = {"every": 1, "k": 2.0}
    a, b = Trainer(plain), Trainer(rad)
    a.run()
    b.run()
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_adaptive_cells_change_the_training_points(tmp_path):
    # precondition of the resume test with cells: placing the cells by their residual is not
    # the run that places only the interior points so
    runs = []
    for groups in (["interior"], ["interior", "cells"]):
        cfg = _bgk_cells_config(tmp_path / "-".join(groups), iters=2)
        cfg.adaptive = {"every": 1, "groups": groups}
        runs.append(Trainer(cfg))
        runs[-1].run()
    assert any(not torch.equal(p, q) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()))


@pytest.mark.parametrize("bad", [{"every": 0}, {"pool": 0}, {"every": 1.5}, {"k": -1.0}, {"c": float("nan")},
                                 {"c": True}, {"period": 10}, [1, 2], {"groups": []}, {"groups": "interior"},
                                 {"groups": ["interior", "interior"]}, {"groups": ["cells"]},
                                 {"groups": ["boundary"]}])
def test_adaptive_config_is_checked(tmp_path, bad):
    cfg = tiny_config(tmp_path, "transport")
    cfg.adaptive = bad
    with pytest.raises(ValueError, match="adaptive"):
        cfg.validate()


def test_adaptive_cells_need_the_integral_conservation_residual(tmp_path):
    cfg = tiny_config(tmp_path, "bgk")
    cfg.adaptive = {"groups": ["interior", "cells"]}
    with pytest.raises(ValueError, match="adaptive.groups: 'cells' .* set loss_weights.weak > 0"):
        cfg.validate()
    cfg.loss_weights = {"weak": 1.0}
    cfg.validate()


def test_adaptive_sampling_is_refused_with_shares_of_the_points(tmp_path):
    cfg = tiny_config(tmp_path, "bgk")
    cfg.adaptive = {"every": 10}
    cfg.distributed.shards = 2
    with pytest.raises(ValueError, match="adaptive: the adaptive sampling runs in one process"):
        cfg.validate()
