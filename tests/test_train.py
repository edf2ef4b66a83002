"""Tests of hrgrad_ext.train: segmented task gradients, losses, trainer, checkpoints, configs."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from apnn_reference import reference_task_gradients

from hrgrad_ext.ops import combine_into_grads, kinetic
from hrgrad_ext.train.config import (METHODS, TrainConfig, apply_overrides, default_config_path, default_config,
                                     load_config, to_toml)
from hrgrad_ext.train.segmented import TaskLayout, segmented_task_gradients, separate_task_gradients
from hrgrad_ext.backward import aggregate_jacobians
from hrgrad_ext.train.trainer import CHECKPOINT, Trainer, make_aggregator, read_metrics

TINY = {
    "transport": {"rho": {"width": 8, "depth": 2}, "g": {"width": 8, "depth": 2}, "reach": 0.2, "half_range": True},
    "bgk": {"f": {"kind": "resnet", "width": 8, "depth": 1}, "macro": {"width": 8, "depth": 1}},
}
# the BGK parametrisations (spec: hard_ic false, f_form free)
BGK_FORMS = [{"hard_ic": False, "f_form": "free"}, {"hard_ic": True, "f_form": "free"},
             {"hard_ic": False, "f_form": "maxwellian"}, {"hard_ic": True, "f_form": "maxwellian"}]
# eps sets whose references are cheap: the diffusion-limit series for transport, two BGK runs
EVAL_EPS = {"transport": [1e-8, 1e-7], "bgk": [1.0, 1e-3]}


def tiny_config(tmp_path, problem="transport", method="hrgrad", iters=3, **kw) -> TrainConfig:
    cfg = TrainConfig(problem=problem, method=method, eps=list(EVAL_EPS[problem]), iters=iters,
                      points={"interior": 8, "boundary": 4, "initial": 4} if problem == "transport"
                      else {"interior": 6, "initial": 4},
                      nv=8 if problem == "transport" else 16,
                      model={"encoding": {"fourier": 1}, **TINY[problem]}, out=str(tmp_path / f"{problem}-{method}"))
    cfg.log.progress = False
    cfg.log.plots = False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def assert_same_task_gradients(L, J, L_ref, J_ref, rtol=1e-12):
    """Task losses to ``rtol`` and every Jacobian row to ``rtol`` of the Jacobians' overall
    scale (some biases have zero true gradient, g = g_raw - <g_raw>, so an elementwise
    relative test would divide by ~0); the rows differ between tasks."""
    torch.testing.assert_close(L, L_ref, rtol=rtol, atol=0)
    scale = torch.sqrt(sum((j ** 2).sum() for j in J_ref))
    for a, b in zip(J, J_ref):
        assert a.shape == b.shape and a.shape[0] == L_ref.shape[0]
        assert (a - b).abs().max() <= rtol * scale
    assert (J[0][0] - J[0][1]).abs().max() > 0


def task_gradient_references(tr, batch):
    """The two references for task losses and gradients: the formulation's own K-pass path (one
    eager backward per task) and the spec losses written out in plain PyTorch
    (``tests/apnn_reference.py``: no ``form.forward`` / ``form.loss``, no fused ops)."""
    return (separate_task_gradients(tr.model, tr.form, batch, tr.layout),
            reference_task_gradients(tr.model, tr.form, batch, tr.layout))


def assert_task_gradients_match_references(L, J, refs, rtol=1e-12):
    (L_sep, J_sep), (L_spec, J_spec) = refs
    assert_same_task_gradients(L, J, L_sep, J_sep, rtol)
    assert_same_task_gradients(L, J, L_spec, J_spec, max(rtol, 1e-10))


# --- per-segment gradients --------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["transport", "bgk"])
@pytest.mark.parametrize("mode", ["eps", "eps_group"])
def test_segmented_gradients_equal_separate_backward_passes(tmp_path, problem, mode):
    eps = [1.0, 1e-2, 1e-8] if problem == "transport" else [1.0, 1e-1, 1e-3]
    cfg = tiny_config(tmp_path, problem, eps=eps, tasks=mode, dtype="float64")
    tr = Trainer(cfg)
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    T = tr.layout.num_tasks
    assert T == len(eps) * (len(tr.form.groups) if mode == "eps_group" else 1)
    refs = task_gradient_references(tr, batch)
    for deriv in ("fast", "jvp"):
        L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, deriv)
        assert J[0].shape[0] == T
        assert_task_gradients_match_references(L, J, refs)


# the long preset's model options with the Chapman-Enskog term, whose fast path splits D into the
# f network's part (reverse mode) and the term (forward mode on the points)
BGK_CE_FORMS = [{"hard_ic": hard_ic, "f_form": "maxwellian", "chapman_enskog": 0.03, "uncollided": True,
                 "deviation_knee": 0.1, "characteristic": True} for hard_ic in (False, True)]


@pytest.mark.parametrize("opts", BGK_FORMS[2:] + BGK_CE_FORMS,
                         ids=lambda o: f"hard_ic={o['hard_ic']}-{o['f_form']}" + ("-ce" if "chapman_enskog" in o else ""))
def test_bgk_parametrisations_segmented_gradients_equal_separate_backward_passes(tmp_path, opts):
    cfg = tiny_config(tmp_path, "bgk", eps=[1.0, 1e-1, 1e-3], dtype="float64")
    cfg.model = {**cfg.model, **opts}
    tr = Trainer(cfg)
    assert tr.model.hard_ic == opts["hard_ic"] and tr.form.f_form == opts["f_form"]
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    refs = task_gradient_references(tr, batch)
    for deriv in ("fast", "jvp"):
        L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, deriv)
        assert_task_gradients_match_references(L, J, refs)
        if opts == {"hard_ic": True, "f_form": "maxwellian"}:
            # every initial-data term vanishes identically
            assert groups["initial"].abs().max() < 1e-24


@pytest.mark.parametrize("characteristic,knee,uncollided,peculiar,ce",
                         [(False, 0.0, False, False, 0.0), (True, 0.0, False, False, 0.0), (False, 0.1, False, False, 0.0),
                          (True, 0.1, True, False, 0.0), (False, 0.0, False, True, 0.0), (False, 0.0, False, False, 0.03),
                          (True, 0.1, True, True, 0.03)],
                         ids=["plain", "characteristic", "deviation_knee", "uncollided", "peculiar", "chapman_enskog", "all"])
def test_bgk_maxwellian_interior_forward_equals_differentiating_f(tmp_path, characteristic, knee, uncollided, peculiar, ce):
    # the formulation's chain-rule path gives the numbers that differentiating the model's f
    # on the [n, V] grid (the "free" path, valid for any model) gives; with the
    # characteristic input, whose t and x derivatives go through the per-node foot x - v t,
    # with the uncollided part, whose weight exp(-t / Kn) has a t derivative of its own, with
    # the peculiar velocity, whose derivatives go through the macro networks' u and T, and with
    # the Chapman-Enskog term, whose derivatives hold the macro networks' second derivatives
    from hrgrad_ext.train.losses import BGKFormulation

    cfg = tiny_config(tmp_path, "bgk", dtype="float64", eps=[0.1, 1e-2])
    cfg.model = {**cfg.model, "hard_ic": True, "f_form": "maxwellian", "characteristic": characteristic,
                 "deviation_knee": knee, "uncollided": uncollided, "peculiar": peculiar, "chapman_enskog": ce}
    tr = Trainer(cfg)
    assert tr.model.characteristic is characteristic and tr.model.deviation_knee == knee
    assert tr.model.uncollided_part is uncollided and tr.form.uncollided is uncollided
    assert tr.model.peculiar is peculiar and tr.model.chapman_enskog == ce
    assert tr.form.reads_macro is (peculiar or ce > 0)
    assert tr.form.macro_jets  # the fast path under test is the Taylor-mode one
    inp = {k: v[0] for k, v in tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)["interior"].items()}
    call = lambda method, *a: tr.model(method, *a)
    fast = tr.form.forward("interior", call, inp, "fast")
    plain = BGKFormulation.forward(BGKFormulation(points={"interior": 6, "initial": 4}, nv=16).to("cpu", torch.float64),
                                   "interior", call, inp, "fast")
    for k in fast:
        torch.testing.assert_close(fast[k], plain[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("problem", ["transport", "bgk"])
def test_adaptive_activation_slopes_get_their_task_gradients(tmp_path, problem):
    # the trainable slopes of "adaptive_tanh" are parameters like the weights: the segmented
    # pass gives their per-task gradients as the K separate passes and the spec losses do
    cfg = tiny_config(tmp_path, problem, eps=[1.0, 1e-2], dtype="float64")
    nets = ("rho", "g") if problem == "transport" else ("f", "macro")
    cfg.model = {**cfg.model, **{k: {**cfg.model.get(k, {}), "activation": "adaptive_tanh"} for k in nets}}
    tr = Trainer(cfg)
    slopes = [n for n, _ in tr.model.named_parameters() if n.endswith(".a")]
    assert slopes
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    assert_task_gradients_match_references(L, J, task_gradient_references(tr, batch))


def test_default_bgk_model_is_the_maxwellian_form():
    # With the spec's free softplus f the BGK defaults did not learn the velocity (momentum rel
    # L2 0.6-1.0 at 1500 steps); f = M[rho, u, T] exp(N_f) did (docs/RESULTS.md). Keep it.
    tr = Trainer(apply_overrides(default_config("bgk"), ["log.progress=false", "log.plots=false"]))
    assert tr.model.f_form == "maxwellian" and tr.form.f_form == "maxwellian" and not tr.model.hard_ic
    # without update clipping plain Sum stayed at u ~ 0 on 2 seeds of 3 (docs/RESULTS.md)
    assert tr.cfg.optim.clip_norm > 0 and tr.ema is not None


def test_bgk_model_option_validation(tmp_path):
    cfg = tiny_config(tmp_path, "bgk")
    for bad, match in (({"f_form": "gauss"}, "f_form"), ({"hard_ic": 1}, "hard_ic"), ({"hardic": True}, "hardic"),
                       ({"uncollided": 1}, "uncollided must be"), ({"uncollided": "yes"}, "uncollided must be")):
        c = copy.deepcopy(cfg)
        c.model = {**c.model, **bad}
        with pytest.raises(ValueError, match=match):
            Trainer(c)
    # case V's Riemann step: neither the built-in initial data nor the free-streamed step
    for option in ("hard_ic", "uncollided"):
        c = copy.deepcopy(cfg)
        c.case = "V"
        c.model = {**c.model, option: True}
        with pytest.raises(ValueError, match=f"{option} needs continuous"):
            Trainer(c)


def test_task_layout_names_and_combination():
    lay = TaskLayout((1.0, 0.01), ("interior", "initial"), "eps_group")
    assert lay.names == ["eps=1/interior", "eps=1/initial", "eps=0.01/interior", "eps=0.01/initial"]
    gl = {"interior": torch.tensor([1.0, 2.0]), "initial": torch.tensor([10.0, 20.0])}
    assert lay.combine(gl).tolist() == [1.0, 10.0, 2.0, 20.0]
    assert TaskLayout((1.0, 0.01), ("interior", "initial")).combine(gl).tolist() == [11.0, 22.0]
    with pytest.raises(ValueError, match="task mode"):
        TaskLayout((1.0,), ("interior",), "groups")


def test_transport_loss_vanishes_on_diffusion_limit_structure(tmp_path):
    # With g_raw = -v rho_x (the eps -> 0 closure) and rho solving rho_t = rho_xx / 3 the micro
    # and macro residuals are O(eps): check the formulation's loss through the fused op.
    import math

    from hrgrad_ext.train.losses import TransportFormulation

    form = TransportFormulation(points={"interior": 4, "boundary": 2, "initial": 2}, nv=30)
    t = torch.rand(5, dtype=torch.float64) * 0.1 + 0.01
    x = torch.rand(5, dtype=torch.float64)
    k = math.pi
    rho_x = k * torch.cos(k * x) * torch.exp(-k * k * t / 3)
    rho_xx = -k * k * torch.sin(k * x) * torch.exp(-k * k * t / 3)
    rho_t = rho_xx / 3
    v = form.v
    G = -v * rho_x[:, None]
    Gx = -v * rho_xx[:, None]
    Gt = -v * (k * torch.cos(k * x) * (-k * k / 3) * torch.exp(-k * k * t / 3))[:, None]
    out = {"G": G, "G_t": Gt, "G_x": Gx, "rho_t": rho_t, "rho_x": rho_x}
    eps = 1e-6
    loss = form.loss("interior", out, {"eps": torch.tensor([eps], dtype=torch.float64)}, 1)
    assert loss.item() < 1e-9
    # and is O(1) when the closure is wrong
    out["G"] = -out["G"]
    assert form.loss("interior", out, {"eps": torch.tensor([eps], dtype=torch.float64)}, 1).item() > 1e-2


def test_front_sampling_puts_points_where_the_inflow_has_reached():
    from hrgrad_ext.train.losses import TransportFormulation

    form = TransportFormulation(points={"interior": 400, "boundary": 2, "initial": 400}, nv=8, front_fraction=0.5)
    eps = torch.tensor([1.0, 1e-8], dtype=torch.float64)
    b = form.sample_batch(torch.Generator().manual_seed(0), eps, "cpu", torch.float64)
    t, x = b["interior"]["t"], b["interior"]["x"]
    front = slice(0, 200)
    # eps = 1: transport at speed <= 1, x < 2 t; eps -> 0: diffusion, x < 2 sqrt(t)
    assert (x[0, front] <= 2 * t[0, front] + 1e-12).all()
    assert (x[1, front] <= 2 * t[1, front].sqrt() + 1e-12).all()
    assert (x >= 0).all() and (x <= 1).all()
    assert (x[0, 200:] > 0.5).any()  # the rest stays uniform
    xi = b["initial"]["x"]
    assert (xi[0, :200] <= 0.2 + 1e-12).all() and (xi[0, 200:] > 0.5).any()
    # eps = 1 with uniform sampling puts ~1 point in 5 below x = 2 t; the front half at least 1/2
    assert ((x[0] <= 2 * t[0]).double().mean() > 0.5)
    with pytest.raises(ValueError, match="front_fraction"):
        TransportFormulation(points={"interior": 4, "boundary": 2, "initial": 2}, front_fraction=1.5)
    with pytest.raises(ValueError, match="sampling"):
        TrainConfig(sampling={"fron": 0.5}).validate()


def test_wall_sampling_puts_points_in_the_inflow_boundary_layer():
    from hrgrad_ext.train.losses import TransportFormulation

    n = 8000
    pts = {"interior": n, "boundary": 2, "initial": 4}
    eps = torch.tensor([1.0, 0.1, 1e-2, 1e-8], dtype=torch.float64)
    plain = TransportFormulation(points=pts, nv=8, front_fraction=0.25).sample_batch(
        torch.Generator().manual_seed(0), eps, "cpu", torch.float64)["interior"]["x"]
    form = TransportFormulation(points=pts, nv=8, front_fraction=0.25, wall_fraction=0.5, wall_span=2.0)
    x = form.sample_batch(torch.Generator().manual_seed(0), eps, "cpu", torch.float64)["interior"]["x"]
    # the front quarter is drawn as before; the next half is exponential with mean 2 eps,
    # truncated to [0, 1] (mean of the truncated law: lam - L / (exp(L / lam) - 1))
    assert torch.equal(x[:, : n // 4], plain[:, : n // 4])
    wall = x[:, n // 4: 3 * n // 4]
    assert (wall >= 0).all() and (wall < 1).all()  # eps = 1: a layer wider than the domain, none at x = 1
    for k, e in enumerate(eps.tolist()):
        lam = 2 * e
        mean = lam - 1.0 / math.expm1(min(1.0 / lam, 700.0))
        assert abs(wall[k].mean().item() - mean) < 0.06 * mean, (e, wall[k].mean().item(), mean)  # ~4 standard errors
        if lam <= 0.2:  # the median of an exponential, lam ln 2 (truncation moves it by < 1 %)
            assert abs(wall[k].median().item() - lam * math.log(2)) < 0.1 * lam
    # the last quarter stays uniform
    assert abs(x[1, 3 * n // 4:].mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="wall_fraction"):
        TransportFormulation(points=pts, front_fraction=0.6, wall_fraction=0.5)
    with pytest.raises(ValueError, match="wall_span"):
        TransportFormulation(points=pts, wall_fraction=0.5, wall_span=0.0)
    with pytest.raises(ValueError, match="unknown option.*for bgk"):
        TrainConfig(problem="bgk", sampling={"wall": 0.5}).validate()


def test_wall_layer_option_reaches_the_transport_model():
    cfg = apply_overrides(default_config("transport"), ["model.wall_layer=0.01", "log.progress=false", "log.plots=false"])
    m = Trainer(cfg).model
    assert m.wall_layer == 0.01 and m.rho_net.net[0].in_features == 2 + m.encoding.out_dim + 2
    assert Trainer(apply_overrides(default_config("transport"), ["log.progress=false", "log.plots=false"])).model.wall_layer == 0.0


def test_first_collision_option_reaches_the_model_the_loss_and_the_scores(tmp_path):
    from hrgrad_ext.train.evaluation import evaluate

    cfg = tiny_config(tmp_path, "transport", eps=[1.0, 1e-3], t_final={"1": 1.0, "0.1": 0.1})
    cfg = apply_overrides(cfg, ["model.first_collision=0.5"])
    tr = Trainer(cfg)
    assert tr.model.first_collision == 0.5 and tr.form.first_collision == 0.5
    s = tr.run()
    assert all(0 < v < float("inf") for d in s["rel_l2"].values() for v in d.values())
    # the scores see the collided density plus the uncollided one at eps = 1 only
    with_split = evaluate(tr.model, tr.form, [1.0, 1e-3])
    tr.model.first_collision = 0.0
    without = evaluate(tr.model, tr.form, [1.0, 1e-3])
    assert with_split["0.001"] == without["0.001"]
    assert abs(with_split["1"]["rho"] - without["1"]["rho"]) > 1e-3
    assert Trainer(tiny_config(tmp_path / "off", "transport")).form.first_collision == 0.0


def test_default_transport_config_gives_eps1_its_own_window_half_range_and_front_sampling():
    # Root cause of the eps = 1 failure (rel L2 0.78-0.89 at t = 0.1 for any width or step
    # count): at t = 0.1 its solution is a wedge in x < 0.1, behind the incompatible corner of
    # the data, which smooth networks smear, plus the inflow jump in v at v = 0 that g could
    # not represent. The defaults give eps = 1 the anchor's window [0, 1] (the solution then
    # fills the slab), keep the half-range input and the front sampling, and every smaller eps
    # the window [0, 0.1]. This checks the configuration only; that it resolves the front is a
    # measurement of a full run (docs/RESULTS.md), too long for a test.
    cfg = default_config("transport")
    tr = Trainer(apply_overrides(cfg, ["log.progress=false", "log.plots=false"]))
    m = tr.model
    assert m.half_range
    assert tr.form.t_final_for(1.0) == 1.0 and all(tr.form.t_final_for(e) == 0.1 for e in cfg.eps[1:])
    assert float(m.time_windows(torch.tensor(1.0))) == 1.0 and float(m.time_windows(torch.tensor(1e-8))) == pytest.approx(0.1)
    assert tr.form.front_fraction > 0
    assert tr.ema is not None


def test_ic_corner_ramps_the_initial_residual_in_next_to_the_wall():
    from hrgrad_ext.train.losses import TransportFormulation

    pts = {"interior": 4, "boundary": 2, "initial": 3}
    plain = TransportFormulation(points=pts, nv=8)
    ramped = TransportFormulation(points=pts, nv=8, weights={"ic_corner": 0.1})
    # f = rho = 1 at x = 0, xi / 2 and 0.5 for eps = 1e-8 (xi = 0.1) and eps = 1 (xi = 0.01 / 1.1)
    for eps, xi in ((1e-8, 0.1), (1.0, 0.01 / 1.1)):
        x = torch.tensor([[0.0, xi / 2, 0.5]], dtype=torch.float64)
        out = {"rho": torch.ones(3, dtype=torch.float64), "G": torch.zeros(3, 8, dtype=torch.float64)}
        inp = {"x": x, "eps": torch.tensor([eps], dtype=torch.float64)}
        assert plain.loss("initial", out, inp, 1).item() == pytest.approx(10.0)
        assert ramped.loss("initial", out, inp, 1).item() == pytest.approx(10.0 * (0 + 0.5 + 1) / 3)


# --- HRGrad vs Sum on conflicting tasks -------------------------------------------------------


def test_hrgrad_decreases_every_task_loss_where_sum_lets_one_grow(tmp_path):
    # transport, tasks = (eps, point group). Whether the plain sum of the nine task gradients
    # conflicts with one of them depends on the initial network (it does for about half the
    # seeds), so the test takes the first seed of several where it clearly does (cosine < -0.05),
    # instead of relying on one seed's numbers. Then one small SGD step along each update
    # (small: first order, the change of L_i is -lr g_i . update): Sum's raises the loss of the
    # task it conflicts with most, HRGrad's lowers every task loss (its update makes the same
    # positive angle with every task gradient).
    for seed in range(12):
        cfg = tiny_config(tmp_path, eps=[1.0, 1e-2, 1e-8], tasks="eps_group", dtype="float64", seed=seed,
                          points={"interior": 16, "boundary": 8, "initial": 8}, nv=30)
        cfg.model = {"rho": {"width": 8, "depth": 2}, "g": {"width": 8, "depth": 2}}
        tr = Trainer(cfg)
        batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
        L0, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout)
        Jf = torch.cat([j.reshape(j.shape[0], -1) for j in J], 1)
        cos_sum = (Jf @ Jf.sum(0)) / (Jf.norm(dim=1) * Jf.sum(0).norm())
        if cos_sum.min() < -0.05:
            break
    else:
        pytest.fail(f"the summed gradient conflicts with no task at seeds 0-11 (expected at about half of them)")
    change = {}
    for method in ("sum", "hrgrad"):
        model = copy.deepcopy(tr.model)
        params = list(model.parameters())
        _, w, _ = aggregate_jacobians(make_aggregator(method), J)
        update_norm = float((w[:, None] * Jf).sum(0).norm())
        opt = torch.optim.SGD(params, lr=1e-6 / update_norm)  # a step of length 1e-6
        combine_into_grads(J, w, params)
        opt.step()
        L1, _, _ = segmented_task_gradients(model, tr.form, batch, tr.layout)
        change[method] = L1 - L0
    worst = int(cos_sum.argmin())
    assert change["sum"][worst] > 0, f"seed {seed}: Sum should raise the loss of task {worst}: {change['sum']}"
    assert (change["hrgrad"] < 0).all(), f"seed {seed}: HRGrad should lower every task loss: {change['hrgrad']}"


# --- training runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["hrgrad", "sum", "pcgrad", "config", "mgda"])
def test_transport_runs_with_each_method(tmp_path, method):
    cfg = tiny_config(tmp_path, "transport", method)
    s = Trainer(cfg).run()
    out = Path(cfg.out)
    for name in ("config.toml", "metrics.jsonl", "summary.json", CHECKPOINT):
        assert (out / name).is_file()
    assert s["iters"] == 3 and s["method"] == method
    assert set(s["rel_l2"]) == {"1e-08", "1e-07"}
    assert all(0 < v < float("inf") for d in s["rel_l2"].values() for v in d.values())
    rec = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert rec and all(len(r["loss"]) == 2 and len(r["cosines"]) == 2 for r in rec)
    assert all(torch.isfinite(torch.tensor(r["loss"])).all() for r in rec)


@pytest.mark.parametrize("method", ["hrgrad", "sum", "pcgrad", "config", "mgda"])
def test_bgk_runs_with_each_method(tmp_path, method):
    cfg = tiny_config(tmp_path, "bgk", method, iters=2)
    s = Trainer(cfg).run()
    assert s["iters"] == 2 and set(s["rel_l2"]["1"]) == {"density", "momentum", "energy"}
    assert all(v == v for d in s["rel_l2"].values() for v in d.values())


def test_bgk_characteristic_input_is_constant_along_characteristics(tmp_path):
    # a network that reads only the characteristic input draws a free-streaming f:
    # f_dev(t + dt, x + v dt, v) = f_dev(t, x, v) at every node, which the (t, x, v) inputs
    # alone cannot give a first layer; the segmented task gradients stay exact with it
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.model = {**cfg.model, "f_form": "maxwellian", "characteristic": True}
    tr = Trainer(cfg)
    first = next(m for m in tr.model.f_net.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 3 + tr.model.encoding.out_dim + 1
    v = tr.form.v
    gen = torch.Generator().manual_seed(3)
    t = 0.05 * torch.rand(5, generator=gen, dtype=torch.float64)
    x = torch.rand(5, generator=gen, dtype=torch.float64) - 0.5
    eps = torch.tensor(0.1, dtype=torch.float64)
    before = tr.model.f_dev(t, x, v, eps)
    with torch.no_grad():
        first.weight[:, :-1] = 0.0
    dt = 0.03
    a = tr.model.f_dev(t, x, v, eps)
    b = tr.model.f_dev((t + dt)[:, None].expand(5, v.shape[0]), x[:, None] + v * dt, v, eps)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert (a - before).abs().max() > 1e-3 and (a[:, 0] - a[:, -1]).abs().max() > 1e-3  # precondition
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    refs = task_gradient_references(tr, batch)
    L, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    assert_task_gradients_match_references(L, J, refs)


def test_bgk_deviation_knee_scales_the_log_deviation_by_the_chapman_enskog_factor(tmp_path):
    # D = Kn / (Kn + knee) N_f: the same network without the knee, times the factor; in the
    # Euler limit f is the Maxwellian of the macro fields whatever the network; the segmented
    # task gradients stay exact
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.model = {**cfg.model, "f_form": "maxwellian", "deviation_knee": 0.1}
    tr = Trainer(cfg)
    m, v = tr.model, tr.form.v
    gen = torch.Generator().manual_seed(4)
    t = 0.1 * torch.rand(6, generator=gen, dtype=torch.float64)
    x = torch.rand(6, generator=gen, dtype=torch.float64) - 0.5
    with torch.no_grad():
        for layer in m.f_net.modules():  # a deviation of order one, not the initialisation's
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(3.0)
    for kn in (1.0, 0.1, 1e-3):
        e = torch.full((6,), kn, dtype=torch.float64)
        scaled = m.f_dev(t, x, v, e)
        m.deviation_knee = 0.0
        plain = m.f_dev(t, x, v, e)
        m.deviation_knee = 0.1
        torch.testing.assert_close(scaled, kn / (kn + 0.1) * plain, rtol=1e-13, atol=0)
        assert plain.abs().max() > 0.1
    e = torch.tensor(1e-8, dtype=torch.float64)
    rho, u, T = m.macro(t, x, e)
    M = kinetic.maxwellian(rho, u, T, v)
    assert ((m.f(t, x, v, e) / M - 1).abs().max()) < 1e-6
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    refs = task_gradient_references(tr, batch)
    L, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    assert_task_gradients_match_references(L, J, refs)
    for bad, match in (({"f_form": "free", "deviation_knee": 0.1}, "f_form = 'maxwellian'"),
                       ({"f_form": "maxwellian", "deviation_knee": -1.0}, "deviation_knee must be"),
                       ({"f_form": "maxwellian", "deviation_knee": True}, "deviation_knee must be")):
        cfg.model = {**cfg.model, **bad}
        with pytest.raises(ValueError, match=match):
            Trainer(cfg)


def test_bgk_peculiar_input_is_the_velocity_relative_to_the_macro_flow(tmp_path):
    # the extra input of the f network is (v - u) / sqrt(T) / 4 of the macro networks: a network
    # that reads only it draws D = g(xi), the one shape of the Chapman-Enskog deviation; D then
    # moves with u (D at u + du is D at v - du), its derivatives go through the macro networks
    # and the segmented task gradients stay exact; f(v) and f_dev agree in every layout
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.model = {**cfg.model, "f_form": "maxwellian", "peculiar": True}
    tr = Trainer(cfg)
    m, v = tr.model, tr.form.v
    first = next(layer for layer in m.f_net.modules() if isinstance(layer, torch.nn.Linear))
    assert first.in_features == 3 + m.encoding.out_dim + 1
    gen = torch.Generator().manual_seed(5)
    t = 0.1 * torch.rand(5, generator=gen, dtype=torch.float64)
    x = torch.rand(5, generator=gen, dtype=torch.float64) - 0.5
    eps = torch.tensor(0.1, dtype=torch.float64)
    rho, u, T = m.macro(t, x, eps)
    xi = (v - u[:, None]) / T.sqrt()[:, None]
    torch.testing.assert_close(m.peculiar_velocity(v, u, T.log()), xi / 4, rtol=1e-13, atol=1e-15)
    before = m.f_dev(t, x, v, eps)
    with torch.no_grad():
        first.weight[:, :-1] = 0.0
        first.weight[:, -1].mul_(5.0)  # an input slope of order one at the nodes near u
    D = m.f_dev(t, x, v, eps)
    assert (D - before).abs().max() > 1e-3  # precondition: the other inputs counted before
    # reading only xi: one function of xi, so nodes at the same xi give the same D
    g = lambda z: m.f_net(torch.cat([torch.zeros(*z.shape, 3 + m.encoding.out_dim, dtype=z.dtype),
                                     (z / 4).unsqueeze(-1)], -1)).squeeze(-1)
    torch.testing.assert_close(D, g(xi), rtol=1e-12, atol=1e-12)
    assert (D[:, 0] - D[:, -1]).abs().max() > 1e-3 and (D[0] - D[1]).abs().max() > 1e-3
    # f uses the same deviation as f_dev, on [n] and on per-node [n, V] coordinates
    M = kinetic.maxwellian(rho, u, T, v)
    torch.testing.assert_close(m.f(t, x, v, eps), M * torch.exp(D), rtol=1e-12, atol=1e-14)
    tg, xg = t[:, None].expand(5, v.shape[0]), x[:, None].expand(5, v.shape[0])
    torch.testing.assert_close(m.f(tg, xg, v, eps), m.f(t, x, v, eps), rtol=1e-12, atol=1e-14)
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    refs = task_gradient_references(tr, batch)
    for deriv in ("fast", "jvp"):
        L, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, deriv)
        assert_task_gradients_match_references(L, J, refs)
    for bad, match in (({"f_form": "free", "peculiar": True}, "f_form = 'maxwellian'"),
                       ({"f_form": "maxwellian", "peculiar": 1}, "peculiar must be true or false")):
        cfg.model = {**cfg.model, **bad}
        with pytest.raises(ValueError, match=match):
            Trainer(cfg)


def test_bgk_chapman_enskog_term_is_the_first_order_deviation_of_the_macro_fields(tmp_path):
    # D = N_f part + 3 tanh(g A (xi^3 - 3 xi) / 3), A = -Kn T_x / (2 sqrt(T)) from the macro
    # networks (T_x here by central differences), g = kappa^2 / (kappa^2 + Kn^2) (9e-4 at Kn =
    # 1 for kappa = 0.03); it vanishes with Kn (f -> M in the Euler limit), and the segmented task
    # gradients stay exact with the second derivatives it brings into the kinetic residual
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.model = {**cfg.model, "f_form": "maxwellian", "chapman_enskog": 0.03}
    tr = Trainer(cfg)
    m, v = tr.model, tr.form.v
    assert m.reads_macro and tr.form.reads_macro and not m.peculiar
    gen = torch.Generator().manual_seed(6)
    t = 0.1 * torch.rand(5, generator=gen, dtype=torch.float64)
    x = torch.rand(5, generator=gen, dtype=torch.float64) - 0.5
    with torch.no_grad():  # a temperature gradient of order one, not the initialisation's
        for layer in m.T_net.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(4.0)
    h = 1e-5
    for kn in (1e-3, 1e-2, 0.1, 1.0):
        eps = torch.tensor(kn, dtype=torch.float64)
        rho, u, T = m.macro(t, x, eps)
        T_x = (m.macro(t, x + h, eps)[2] - m.macro(t, x - h, eps)[2]) / (2 * h)
        xi = (v - u[:, None]) / T.sqrt()[:, None]
        g = 0.03 ** 2 / (0.03 ** 2 + kn ** 2)
        expected = 3 * torch.tanh(g * (-kn * T_x / (2 * T.sqrt()))[:, None] * (xi ** 3 - 3 * xi) / 3)
        ce = m.chapman_enskog_deviation(t, x, v, eps)
        torch.testing.assert_close(ce, expected, rtol=1e-7, atol=1e-9)
        m.chapman_enskog = 0.0
        plain = m.f_dev(t, x, v, eps)
        m.chapman_enskog = 0.03
        torch.testing.assert_close(m.f_dev(t, x, v, eps), plain + expected, rtol=1e-7, atol=1e-9)
        if kn == 1e-2:
            assert ce.abs().max() > 0.05  # precondition: a term that counts
    e = torch.tensor(1e-8, dtype=torch.float64)
    assert m.chapman_enskog_deviation(t, x, v, e).abs().max() < 1e-4  # O(Kn): 1e-5 at the outer nodes
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    refs = task_gradient_references(tr, batch)
    for deriv in ("fast", "jvp"):
        L, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, deriv)
        assert_task_gradients_match_references(L, J, refs)
    for bad, match in (({"f_form": "free", "chapman_enskog": 0.03}, "f_form = 'maxwellian'"),
                       ({"f_form": "maxwellian", "chapman_enskog": -0.1}, "chapman_enskog must be"),
                       ({"f_form": "maxwellian", "chapman_enskog": True}, "chapman_enskog must be")):
        cfg.model = {**cfg.model, **bad}
        with pytest.raises(ValueError, match=match):
            Trainer(cfg)


@pytest.mark.parametrize("f_form", ["maxwellian", "free"])
def test_bgk_uncollided_part_is_the_free_streamed_initial_data_damped_at_the_collision_rate(tmp_path, f_form):
    # f = a U + (1 - a) f_c, a = exp(-t / Kn), U = f0(x - v t, v): U streams freely, a U decays
    # at the collision rate (Kn (d_t + v d_x)(a U) = -a U), f(0) = f0 whatever the networks, a
    # foot beyond a wall carries the wall state, and as Kn -> 0 f is the f_form's own f
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.model = {**cfg.model, "f_form": f_form, "uncollided": True}
    tr = Trainer(cfg)
    m, v = tr.model, tr.form.v
    gen = torch.Generator().manual_seed(5)
    n, V = 7, v.shape[0]
    t = 0.01 * torch.rand(n, generator=gen, dtype=torch.float64)  # feet x - v t inside the domain
    x = 0.6 * torch.rand(n, generator=gen, dtype=torch.float64) - 0.3
    for kn in (1.0, 0.1, 0.01):
        e = torch.tensor(kn, dtype=torch.float64)
        tg = t[:, None].expand(n, V).clone().requires_grad_(True)
        xg = x[:, None].expand(n, V).clone().requires_grad_(True)
        aU = m.uncollided(tg, xg, v, e)
        aU_t, aU_x = torch.autograd.grad(aU.sum(), (tg, xg))
        torch.testing.assert_close(kn * (aU_t + v * aU_x), -aU, rtol=1e-10, atol=1e-14)
        assert aU_x.abs().max() > 1.0  # precondition: case IV's tanh(20 x) data are steep
    U = m.uncollided(t, x, v, torch.tensor(1.0, dtype=torch.float64)) * torch.exp(t)[:, None]
    later = m.uncollided(t + 0.02, x[:, None] + v * 0.02, v, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(later * torch.exp(t + 0.02)[:, None], U, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        for layer in m.modules():  # networks far from the initial data
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(3.0)
    x0 = torch.linspace(-0.5, 0.5, n, dtype=torch.float64)
    rho0, u0, T0 = tr.form.initial_state(x0)
    M0 = kinetic.maxwellian(rho0, u0, T0, v)
    for kn in (1.0, 1e-3):
        f0 = m.f(torch.zeros(n, dtype=torch.float64), x0, v, torch.tensor(kn, dtype=torch.float64))
        torch.testing.assert_close(f0, M0, rtol=1e-12, atol=1e-14)
    # from beyond a wall: the wall state (reservoir), not the initial profile continued (case
    # I's (1 + sin(pi x)) / 2 turns back beyond the walls; case IV's tanh(20 x) is flat there)
    c = copy.deepcopy(cfg)
    c.case = "I"
    m1 = Trainer(c).model
    tw = torch.full((2,), 0.1, dtype=torch.float64)
    wall = m1.uncollided(tw, torch.tensor([-0.5, 0.5], dtype=torch.float64), v, torch.tensor(1.0, dtype=torch.float64))
    for row, state, inward in ((0, m1.left, v > 0), (1, m1.right, v < 0)):
        M = kinetic.maxwellian(*(torch.full((1,), q, dtype=torch.float64) for q in state), v)[0]
        torch.testing.assert_close(wall[row][inward], math.exp(-0.1) * M[inward], rtol=1e-12, atol=1e-14)
    e = torch.tensor(1e-3, dtype=torch.float64)
    ts = 0.05 + 0.05 * torch.rand(n, generator=gen, dtype=torch.float64)
    with_part = m.f(ts, x, v, e)
    m.uncollided_part = False
    torch.testing.assert_close(with_part, m.f(ts, x, v, e), rtol=1e-14, atol=0)
    # in between (Kn = 0.1 over t in [0.05, 0.1]: a from 0.37 to 0.61), both parts by hand
    e = torch.tensor(0.1, dtype=torch.float64)
    a = torch.exp(-ts / 0.1)[:, None]
    f_c = m.f(ts, x, v, e)
    m.uncollided_part = True
    torch.testing.assert_close(m.f(ts, x, v, e), m.uncollided(ts, x, v, e) + (1 - a) * f_c, rtol=1e-13, atol=0)
    torch.testing.assert_close(m.uncollided(ts, x, v, e), a * m.streamed_initial(ts, x, v), rtol=1e-14, atol=0)
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    refs = task_gradient_references(tr, batch)
    L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    assert_task_gradients_match_references(L, J, refs)


@pytest.mark.parametrize("opts", [BGK_FORMS[1], BGK_FORMS[3]], ids=lambda o: f"hard_ic={o['hard_ic']}-{o['f_form']}")
def test_bgk_runs_with_each_parametrisation(tmp_path, opts):
    cfg = tiny_config(tmp_path, "bgk", iters=3)
    cfg.model = {**cfg.model, **opts}
    tr = Trainer(cfg)
    s = tr.run()
    assert all(0 < v < float("inf") for d in s["rel_l2"].values() for v in d.values())
    rec = [r for r in read_metrics(cfg.out) if r["kind"] == "train"]
    assert rec and all(torch.isfinite(torch.tensor(r["loss"])).all() for r in rec)


def test_bgk_inflow_term_adds_a_boundary_group(tmp_path):
    # bc_f > 0: a boundary group with its own point count, per-(eps, group) tasks included, the
    # task gradients still those of separate backward passes; a missing count is an error
    cfg = tiny_config(tmp_path, "bgk", eps=[1.0, 1e-1], dtype="float64", tasks="eps_group")
    cfg.loss_weights = {"bc_f": 10.0}
    with pytest.raises(ValueError, match="no point count given for group.*boundary"):
        Trainer(cfg)
    cfg.points = {**cfg.points, "boundary": 4}
    tr = Trainer(cfg)
    assert tr.form.groups == ("interior", "initial", "boundary") and tr.form.points["boundary"] == 4
    assert tr.layout.names[2] == "eps=1/boundary"
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    refs = task_gradient_references(tr, batch)
    L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    assert_task_gradients_match_references(L, J, refs)
    assert bool((groups["boundary"] > 0).all())
    # off (the default): a boundary count in a shared config is ignored
    cfg2 = tiny_config(tmp_path / "off", "bgk")
    cfg2.points = {**cfg2.points, "boundary": 4}
    assert Trainer(cfg2).form.groups == ("interior", "initial")


@pytest.mark.parametrize("problem", ["transport", "bgk"])
def test_causal_weighting_keeps_the_task_gradients_exact(tmp_path, problem):
    # causal = {bins, tol}: the segmented task gradients equal separate backward passes (the
    # bins are per task, so one task alone gets the same weights), and they change the losses
    cfg = tiny_config(tmp_path, problem, dtype="float64")
    cfg.causal = {"bins": 4, "tol": 5.0}
    tr = Trainer(cfg.validate())
    assert tr.form.causal == (4, 5.0)
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    L_sep, J_sep = separate_task_gradients(tr.model, tr.form, batch, tr.layout)
    assert_same_task_gradients(L, J, L_sep, J_sep)
    tr.form.causal = None
    L_off, _, _ = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    assert bool((L < L_off).all())
    for bad in ({"bins": 1, "tol": 1.0}, {"bins": 4, "tol": 0}, {"bins": 4, "tol": 1.0, "x": 1}):
        cfg.causal = bad
        with pytest.raises(ValueError, match="causal"):
            cfg.validate()
    # per-rank bin losses would not be the loss of one process: refused with shares of the points
    cfg.causal = {"bins": 4, "tol": 5.0}
    cfg.distributed.shards = 2
    with pytest.raises(ValueError, match="causal: the causal weighting runs in one process"):
        cfg.validate()


def test_compression_weights_keep_the_task_gradients_exact(tmp_path):
    # compression = {k, knee} (BGK): the per-point weights depend on the point alone, so the
    # segmented task gradients equal separate backward passes; with causal weighting on top too
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    # the long preset's model: at initialisation its free-streamed part compresses the flow
    cfg.model = {**cfg.model, "f_form": "maxwellian", "uncollided": True, "deviation_knee": 0.1, "characteristic": True}
    cfg.compression = {"k": 5.0, "knee": 0.1}
    tr = Trainer(cfg.validate())
    assert tr.form.compression == (5.0, 0.1)
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    for causal in (None, (4, 5.0)):
        tr.form.causal = causal
        L, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
        L_sep, J_sep = separate_task_gradients(tr.model, tr.form, batch, tr.layout)
        assert_same_task_gradients(L, J, L_sep, J_sep)
    tr.form.causal = None
    L, _, _ = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    tr.form.compression = None
    L_off, _, _ = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    assert bool((L <= L_off).all()) and bool((L < L_off).any())
    for bad in ({"k": 0.0}, {"knee": 0.1}, {"k": 1.0, "knee": -1.0}, {"k": float("nan")}, {"k": True},
                {"k": 1.0, "x": 1}):
        cfg.compression = bad
        with pytest.raises(ValueError, match="compression"):
            cfg.validate()
    tcfg = tiny_config(tmp_path, "transport")
    tcfg.compression = {"k": 1.0}
    with pytest.raises(ValueError, match="compression: the compression weights are BGK's"):
        tcfg.validate()


def task_losses_on_and_off(tr, option):
    """A batch (drawn from seed 0) and the segmented task losses and group losses of ``tr`` on
    it, with the formulation's ``option`` as set (the task gradients checked against separate
    backward passes) and with it 0 (then restored)."""
    batch = tr.form.sample_batch(torch.Generator().manual_seed(0), tr.eps_tensor, "cpu", torch.float64)
    L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    L_sep, J_sep = separate_task_gradients(tr.model, tr.form, batch, tr.layout)
    assert_same_task_gradients(L, J, L_sep, J_sep)
    value = getattr(tr.form, option)
    setattr(tr.form, option, 0.0)
    L_off, groups_off, _ = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    setattr(tr.form, option, value)
    return batch, (L, groups), (L_off, groups_off)


def assert_option_round_trips(tmp_path, cfg, key, other):
    """``cfg``'s top-level option ``key`` survives the TOML round trip, and the override
    ``key=other`` (``--set``) sets it to ``other``."""
    p = tmp_path / f"{key}.toml"
    p.write_text(to_toml(cfg))
    assert getattr(load_config(p), key) == getattr(cfg, key)
    assert getattr(apply_overrides(copy.deepcopy(cfg), [f"{key}={other}"]).validate(), key) == other


def test_kinetic_knee_in_configs_keeps_the_task_gradients_exact(tmp_path):
    # kinetic_knee (BGK): per-point weights of the kinetic residual by the point's Kn, so the
    # segmented task gradients equal separate backward passes; the option reaches the
    # formulation, survives the TOML round trip, raises the small-Kn task losses and nothing at
    # Kn = 1, and bad values are named
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.eps = [1.0, 1e-2]
    cfg.kinetic_knee = 0.1
    tr = Trainer(cfg.validate())
    assert tr.form.kinetic_knee == 0.1
    assert_option_round_trips(tmp_path, cfg, "kinetic_knee", 0.03)
    _, (L, _), (L_off, _) = task_losses_on_and_off(tr, "kinetic_knee")
    torch.testing.assert_close(L[0], L_off[0], rtol=1e-13, atol=0)  # Kn = 1: weight 1
    assert float(L[1]) > float(L_off[1])
    for bad in (-0.1, float("inf"), True, "0.1"):
        cfg.kinetic_knee = bad
        with pytest.raises(ValueError, match="kinetic_knee"):
            cfg.validate()
    tcfg = tiny_config(tmp_path, "transport")
    tcfg.kinetic_knee = 0.1
    with pytest.raises(ValueError, match="kinetic_knee: the kinetic residual's Kn weights are BGK's"):
        tcfg.validate()


def test_integral_conservation_cells_keep_the_task_gradients_exact(tmp_path):
    # loss weight weak > 0 (BGK): a "cells" point group whose loss is the integral form of the
    # conservation laws; its task gradients segmented equal separate backward passes, and the
    # group adds to the task loss
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.model = {**cfg.model, "f_form": "maxwellian", "uncollided": True, "characteristic": True}
    cfg.loss_weights = {"weak": 1.0}
    cfg.points = {**cfg.points, "cells": 3}
    cfg.sampling = {"cell_dx": 0.1, "cell_dt": 0.5}
    tr = Trainer(cfg.validate())
    assert tr.form.groups == ("interior", "initial", "cells") and tr.form.cell == (0.1, 0.5)
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    assert batch["cells"]["t"].shape == (len(cfg.eps), 4 * 3 * tr.form.CELL_NODES)
    L, groups, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, "fast")
    L_sep, J_sep = separate_task_gradients(tr.model, tr.form, batch, tr.layout)
    assert_same_task_gradients(L, J, L_sep, J_sep)
    assert bool((groups["cells"] > 0).all())
    torch.testing.assert_close(L, sum(groups.values()), rtol=1e-12, atol=0)
    # the macro networks on the bottom and top edges of each cell, f on its sides
    cells = {k: v[0] for k, v in batch["cells"].items()}
    out = tr.form.forward("cells", tr.model, cells, "fast")
    t, x = (cells[k].reshape(3, 2, -1) for k in ("t", "x"))  # [cell, macro / f, edge points]
    torch.testing.assert_close(out["rho"], tr.model("macro", t[:, 0].reshape(-1), x[:, 0].reshape(-1), cells["eps"])[0],
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(out["F"], tr.model("f", t[:, 1].reshape(-1), x[:, 1].reshape(-1), tr.form.v, cells["eps"]),
                               rtol=1e-12, atol=0)
    # a cell count without the weight is ignored (a shared config), the weight without one is an error
    cfg.loss_weights = {}
    assert Trainer(cfg.validate()).form.groups == ("interior", "initial")
    cfg.loss_weights = {"weak": 1.0}
    cfg.points = {"interior": 6, "initial": 4}
    with pytest.raises(ValueError, match="cells"):
        Trainer(cfg.validate())
    cfg.sampling = {"front": 0.5}
    with pytest.raises(ValueError, match="sampling: unknown option"):
        cfg.validate()
    tcfg = tiny_config(tmp_path, "transport")
    tcfg.sampling = {"cell_dx": 0.1}
    with pytest.raises(ValueError, match="sampling: unknown option"):
        tcfg.validate()


def test_weak_closure_takes_the_small_kn_cell_fluxes_from_the_macro_closure(tmp_path):
    # weak_closure = c (BGK): the cells of the tasks with Kn < c take their fluxes from f without
    # the f network's deviation (M exp(C) with the Chapman-Enskog term C, plus the uncollided
    # part), so that the f network cannot carry a flux that makes a smeared shock conservative:
    # those cells reach the f network not at all. The tasks with Kn >= c are unchanged, the task
    # gradients stay exact, the option survives the TOML round trip, and bad values are named
    cfg = tiny_config(tmp_path, "bgk", dtype="float64")
    cfg.eps = [1.0, 1e-3]
    cfg.model = {**cfg.model, **BGK_CE_FORMS[0]}
    cfg.loss_weights = {"weak": 1.0}
    cfg.points = {**cfg.points, "cells": 3}
    cfg.weak_closure = 0.03
    tr = Trainer(cfg.validate())
    assert tr.form.weak_closure == 0.03
    assert_option_round_trips(tmp_path, cfg, "weak_closure", 0.003)
    batch, (_, groups), (_, groups_off) = task_losses_on_and_off(tr, "weak_closure")
    torch.testing.assert_close(groups["cells"][0], groups_off["cells"][0], rtol=1e-13, atol=0)  # Kn = 1
    assert abs(float(groups["cells"][1] - groups_off["cells"][1])) > 1e-6 * float(groups_off["cells"][1])
    # the fluxes: at Kn = 1 the model's f, at Kn = 1e-3 its f with the network's deviation zeroed
    closure = copy.deepcopy(tr.model)
    net_part = closure._network_deviation
    closure._network_deviation = lambda *a: 0.0 * net_part(*a)
    f_net = [q for name, q in tr.model.named_parameters() if name.startswith("f_net.")]
    macro = [q for name, q in tr.model.named_parameters() if not name.startswith("f_net.")]
    v = tr.form.v
    for k, model in ((0, tr.model), (1, closure)):
        cells = {key: val[k] for key, val in batch["cells"].items()}
        out = tr.form.forward("cells", tr.model, cells, "fast")
        t, x = (cells[key].reshape(3, 2, -1)[:, 1].reshape(-1) for key in ("t", "x"))
        torch.testing.assert_close(out["F"], model("f", t, x, v, cells["eps"]), rtol=1e-12, atol=0)
        loss = tr.form.loss("cells", out, {key: val[k:k + 1] for key, val in batch["cells"].items()}, 1)
        g_f = torch.autograd.grad(loss.sum(), f_net, retain_graph=True, allow_unused=True, materialize_grads=True)
        g_macro = torch.autograd.grad(loss.sum(), macro, allow_unused=True, materialize_grads=True)
        assert max(float(g.abs().max()) for g in g_macro) > 0
        assert (max(float(g.abs().max()) for g in g_f) > 0) is (k == 0)
    with pytest.raises(ValueError, match="network_share needs f_form='maxwellian'"):
        free = copy.deepcopy(tr.model)
        free.f_form = "free"
        free.f(t, x, v, cells["eps"], torch.zeros(()))
    for bad in (-0.1, float("nan"), True, "0.1"):
        cfg.weak_closure = bad
        with pytest.raises(ValueError, match="weak_closure: must be"):
            cfg.validate()
    cfg.weak_closure = 0.03
    for field, value, match in (("loss_weights", {}, "loss_weights.weak > 0"),
                                ("model", {**cfg.model, "f_form": "free"}, "f_form = 'maxwellian'")):
        bad = copy.deepcopy(cfg)
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=match):
            bad.validate()
    tcfg = tiny_config(tmp_path, "transport")
    tcfg.weak_closure = 0.03
    with pytest.raises(ValueError, match="weak_closure: the cells' flux closure is BGK's"):
        tcfg.validate()


@pytest.mark.parametrize("problem", ["transport", "bgk"])
def test_outputs_and_plots(tmp_path, problem):
    cfg = tiny_config(tmp_path, problem, iters=4, tasks="eps_group")
    cfg.log.plots = True
    cfg.log.log_every = 2
    cfg.log.eval_every = 2
    Trainer(cfg).run()
    out = Path(cfg.out)
    for png in ("profiles.png", "losses.png", "errors.png", "cosines.png"):
        assert (out / png).stat().st_size > 1000
    recs = read_metrics(out)
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 4]
    train = [r for r in recs if r["kind"] == "train"]
    T = len(cfg.eps) * (3 if problem == "transport" else 2)
    for key in ("loss", "grad_norm", "cos_update", "weight"):
        assert len(train[-1][key]) == T
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cpu") and summary["wall_time_s"] > 0
    assert load_config(out / "config.toml").to_dict() == cfg.to_dict()


def run_dir_copy(cfg: TrainConfig, tmp_path, name: str) -> TrainConfig:
    """A copy of ``cfg`` writing to ``tmp_path / name`` (an uninterrupted and a resumed run)."""
    out = copy.deepcopy(cfg)
    out.out = str(tmp_path / name)
    return out


def test_resume_after_ctrl_c_equals_uninterrupted_run(tmp_path):
    base = tiny_config(tmp_path, "transport", "pcgrad", iters=6)  # PCGrad: the aggregator has RNG state
    base.log.log_every = 1
    base.log.checkpoint_every = 100
    full = run_dir_copy(base, tmp_path, "full")
    t_full = Trainer(full)
    t_full.run()

    cut = run_dir_copy(base, tmp_path, "cut")

    def interrupt(tr):
        if tr.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(cut).run(callback=interrupt)
    assert (Path(cut.out) / CHECKPOINT).is_file()
    resumed = Trainer.resume(cut.out)
    assert resumed.step == 3
    resumed.run()
    for a, b in zip(t_full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    la = [r["loss"] for r in read_metrics(full.out) if r["kind"] == "train"]
    lb = [r["loss"] for r in read_metrics(cut.out) if r["kind"] == "train"]
    assert la == lb and len(la) == 6


def test_resume_truncates_metrics_written_after_the_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, iters=4)
    cfg.log.log_every = 1
    cfg.log.checkpoint_every = 2
    tr = Trainer(cfg)
    assert tr.run(max_steps=3) is None  # stops after step 3 with a checkpoint at 3
    # simulate a crash after step 2's checkpoint: roll the checkpoint back is not possible, so
    # append a stray record beyond the checkpoint and check it is dropped
    with open(Path(cfg.out) / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 99, "kind": "train", "loss": [0.0, 0.0]}) + "\n")
    r = Trainer.resume(cfg.out)
    assert max(x["step"] for x in read_metrics(cfg.out)) == 3
    r.run()
    assert [x["step"] for x in read_metrics(cfg.out) if x["kind"] == "train"] == [1, 2, 3, 4]


def test_lr_schedule_and_float64(tmp_path):
    cfg = tiny_config(tmp_path, iters=4, dtype="float64")
    cfg.optim.schedule = "step"
    cfg.optim.step_size = 2
    cfg.optim.gamma = 0.5
    cfg.log.log_every = 1
    tr = Trainer(cfg)
    tr.run()
    assert next(tr.model.parameters()).dtype == torch.float64
    lrs = [r["lr"] for r in read_metrics(cfg.out) if r["kind"] == "train"]
    assert lrs == pytest.approx([1e-3, 5e-4, 5e-4, 2.5e-4])


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("change,match", [
    ({"method": "adam"}, "unknown method"),
    ({"eps": []}, "task set is empty"),
    ({"eps": [1.0, 0.0]}, "> 0"),
    ({"eps": [1.0, -1e-3]}, "> 0"),
    ({"iters": 0}, "iters"),
    ({"problem": "boltzmann"}, "unknown problem"),
    ({"tasks": "group"}, "tasks"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_configs_raise_clear_errors(tmp_path, change, match):
    cfg = tiny_config(tmp_path)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=match):
        Trainer(cfg)


def test_bad_model_and_override_errors(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model = {"rho": {"width": 8}, "h": {"width": 8}}
    with pytest.raises(ValueError, match="unknown network"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(tiny_config(tmp_path), ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(tiny_config(tmp_path), ["iters"])
    with pytest.raises(ValueError, match="unknown method"):
        make_aggregator("nash")


def test_overrides_and_toml_roundtrip(tmp_path):
    cfg = apply_overrides(tiny_config(tmp_path), ["optim.lr=5e-4", "eps=[1.0, 0.5]", "model.g.width=16", "log.progress=false"])
    assert cfg.optim.lr == 5e-4 and cfg.eps == [1.0, 0.5] and cfg.model["g"]["width"] == 16
    assert cfg.model["rho"]["width"] == 8  # merged, not replaced
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("problem", ["transport", "bgk"])
def test_packaged_defaults_load_and_validate(problem):
    assert default_config_path(problem).is_file()
    assert default_config(problem).validate().problem == problem


def test_all_methods_construct():
    for m in METHODS:
        assert make_aggregator(m) is not None


# --- per-task time windows and the parameter average -------------------------------------------


def test_time_window_tables_in_configs(tmp_path):
    from hrgrad_ext.train.config import task_windows

    cfg = apply_overrides(tiny_config(tmp_path), ['t_final={"1" = 1.0, "0.1" = 0.1}', "eps=[1.0, 0.5, 0.01]"])
    assert task_windows(cfg.validate()) == [1.0, 1.0, 0.1]  # nearest key in log10 eps
    p = tmp_path / "w.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p).validate().t_final == {"1": 1.0, "0.1": 0.1}
    # an override replaces a table as a whole
    assert apply_overrides(cfg, ['t_final={"1e-3" = 0.2}']).validate().t_final == {"1e-3": 0.2}
    assert apply_overrides(cfg, ["t_final=0.2"]).validate().t_final == 0.2
    for bad in ('t_final={"x" = 1.0}', 't_final={"1" = -1.0}', "t_final={}", 't_final="long"'):
        with pytest.raises(ValueError, match="t_final"):
            apply_overrides(cfg, [bad]).validate()


def test_group_weight_tables_in_configs(tmp_path):
    # a per-task factor on a whole group loss, as a number or a table eps -> weight resolved by
    # the nearest key in log10 eps (as t_final's), round-tripped through TOML and handed to the
    # formulation per task
    from hrgrad_ext.train.config import task_group_weights
    from hrgrad_ext.train.trainer import make_formulation

    cfg = apply_overrides(default_config("bgk", "long"), ['group_weights.cells={"1" = 3.0, "0.1" = 3.0, "0.01" = 1.0}',
                                                         "group_weights.initial=0.5"]).validate()
    assert cfg.eps == [1.0, 0.1, 0.01, 0.001]
    want = {"cells": [3.0, 3.0, 1.0, 1.0], "initial": 0.5}
    assert task_group_weights(cfg) == want
    assert make_formulation(cfg).group_weights == {"cells": [3.0, 3.0, 1.0, 1.0], "initial": [0.5] * 4}
    p = tmp_path / "g.toml"
    p.write_text(to_toml(cfg))
    assert task_group_weights(load_config(p).validate()) == want
    for bad, match in (("group_weights.boundary=2.0", "unknown point group 'boundary'"),
                       ('group_weights.cells={"x" = 1.0}', "table keys"), ("group_weights.cells=-1.0", ">= 0"),
                       ("group_weights.cells={}", "empty table"), ("group_weights=3", "expected a table"),
                       ('group_weights.cells={"1" = 3.0, "1e0" = 1.0}', "same eps"),
                       ("loss_weights=[1.0]", "loss_weights: expected a table"),
                       ('loss_weights.weak="x"', "loss_weights: expected a table")):
        with pytest.raises(ValueError, match=match):
            apply_overrides(default_config("bgk", "long"), [bad]).validate()
    # with one task per (eps, group) a weight 0 would be a zero task (MGDA's update is then 0)
    assert apply_overrides(cfg, ['group_weights.cells={"1" = 0.0, "0.1" = 1.0}']).validate()
    with pytest.raises(ValueError, match="weight 0 at eps = 1 makes"):
        apply_overrides(cfg, ['group_weights.cells={"1" = 0.0, "0.1" = 1.0}', 'tasks="eps_group"']).validate()


def test_overrides_replace_whole_values_and_merge_dotted_keys():
    # `--set causal={}` must turn off the causal weighting the BGK long preset ships with (it used
    # to merge into the preset's table and leave it on); a dotted key changes one entry only
    cfg = default_config("bgk", "long")
    assert cfg.causal == {"bins": 16, "tol": 10.0}
    assert apply_overrides(cfg, ["causal={}"]).validate().causal == {}
    assert apply_overrides(cfg, ["causal.tol=5.0"]).causal == {"bins": 16, "tol": 5.0}
    assert apply_overrides(cfg, ["loss_weights={}"]).loss_weights == {}
    # the option tables with defaults of their own keep merging: the other optim fields stay
    over = apply_overrides(cfg, ["optim={lr = 1e-4}"])
    assert over.optim.lr == 1e-4 and over.optim.schedule == cfg.optim.schedule


def test_time_windows_lookup_and_vmap():
    from hrgrad_ext.nn import TimeWindows

    w = TimeWindows([1.0, 1e-1, 1e-8], [1.0, 0.1, 0.1])
    e = torch.tensor([1.0, 1e-1, 1e-8, 0.5, 1e-3, 1e-12], dtype=torch.float64)
    # the task's own window, else the window of the task nearest in log10 eps
    assert w(e).tolist() == [1.0, 0.1, 0.1, 1.0, 0.1, 0.1]
    assert [w.end(v) for v in (1.0, 0.5, 0.2, 1e-9)] == [1.0, 1.0, 0.1, 0.1]
    assert torch.func.vmap(w)(e).tolist() == w(e).tolist()
    assert w(e.float()).dtype == torch.float32
    same = TimeWindows([1.0, 1e-3], 0.1)
    assert same.constant == 0.1 and same(e) == 0.1 and same.end(3.0) == 0.1
    with pytest.raises(ValueError, match="one per eps"):
        TimeWindows([1.0, 1e-3], [1.0])
    with pytest.raises(ValueError, match="> 0"):
        TimeWindows([1.0, 1e-3], [1.0, 0.0])


def test_per_task_time_windows_sampling_scaling_and_scoring(tmp_path):
    from hrgrad_ext.problems import LinearTransport
    from hrgrad_ext.train.evaluation import evaluate

    # the diffusion-limit references are cheap at any time
    cfg = tiny_config(tmp_path, t_final=[0.3, 0.1], iters=2)
    tr = Trainer(cfg)
    assert tr.form.t_range == (0.0, 0.3) and tr.form.t_final_for(1e-8) == 0.3 and tr.form.t_final_for(1e-7) == 0.1
    b = tr.form.sample_batch(torch.Generator().manual_seed(0), tr.eps_tensor, "cpu", torch.float64)
    for group in ("interior", "boundary"):
        t = b[group]["t"]
        assert t[0].max() > 0.2 and t[0].max() <= 0.3 and t[1].max() <= 0.1
    # each task's window maps onto the whole time input [-1, 1]
    m = tr.model
    for eps, t1 in ((1e-8, 0.3), (1e-7, 0.1)):
        ts, _ = m._scale(torch.tensor([0.0, t1]), torch.tensor([0.5, 0.5]), torch.tensor(eps))
        torch.testing.assert_close(ts, torch.tensor([-1.0, 1.0]))
    # scored at the end of each task's own window
    ev = evaluate(tr.model, tr.form, cfg.eps)
    for eps, t1 in ((1e-8, 0.3), (1e-7, 0.1)):
        want = LinearTransport(t_final=t1).evaluate(lambda t, x, e: tr.model.macroscopic(t.float(), x.float(), torch.tensor(e)), eps)
        assert ev[f"{eps:g}"]["rho"] == pytest.approx(want["rho"], rel=1e-5)
    tr.run()
    # the per-task gradients stay exact with windows in the model
    tr64 = Trainer(tiny_config(tmp_path, eps=[1.0, 1e-2], t_final=[1.0, 0.1], dtype="float64"))
    batch = tr64.form.sample_batch(tr64.gen, tr64.eps_tensor, "cpu", torch.float64)
    L, _, J = segmented_task_gradients(tr64.model, tr64.form, batch, tr64.layout)
    assert_task_gradients_match_references(L, J, task_gradient_references(tr64, batch))
    with pytest.raises(ValueError, match="t_final"):
        Trainer(tiny_config(tmp_path, t_final=[0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="t_final"):
        Trainer(tiny_config(tmp_path, t_final=[0.1, -1.0]))


def test_parameter_average_is_evaluated_checkpointed_and_resumed(tmp_path):
    base = tiny_config(tmp_path, iters=6)
    base.optim.ema = 0.9
    base.log.checkpoint_every = 100
    full = run_dir_copy(base, tmp_path, "full")
    t_full = Trainer(full)
    t_full.run()
    live = [p.detach().clone() for p in t_full.params]
    assert any(not torch.equal(a, p) for a, p in zip(t_full.ema, live))
    with t_full.averaged_weights() as model:
        assert all(torch.equal(a, p) for a, p in zip(t_full.ema, model.parameters()))
    # the live parameters come back after the block
    assert all(torch.equal(a, p) for a, p in zip(live, t_full.params))
    summary = json.loads((Path(full.out) / "summary.json").read_text())
    assert "ema" in summary["weights_evaluated"]

    cut = run_dir_copy(base, tmp_path, "cut")
    assert Trainer(cut).run(max_steps=3) is None
    resumed = Trainer.resume(cut.out)
    resumed.run()
    for a, b in zip(t_full.ema, resumed.ema):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ema"):
        _bad_ema(tmp_path)


@pytest.mark.parametrize("key, value, match", [
    ("optim.lr", True, "optim.lr"), ("optim.lr", "1e-3", "optim.lr"), ("optim.lr", float("inf"), "optim.lr"),
    ("optim.ema", True, "optim.ema"), ("optim.clip_norm", True, "optim.clip_norm"),
    ("optim.clip_norm", "5", "optim.clip_norm"), ("optim.warmup", 1.5, "warmup"), ("optim.step_size", True, "step_size"),
    ("optim.gamma", "0.5", "gamma"), ("optim.min_factor", 1.5, "min_factor"), ("optim.betas", [0.9], "betas"),
    ("optim.betas", [0.9, 1.0], "betas"), ("optim.betas", [True, 0.999], "betas"), ("optim.momentum", -0.1, "momentum"),
    ("optim.weight_decay", False, "weight_decay"), ("nv", 1.5, "nv"), ("threads", True, "threads"),
    ("eps", [True, 0.1], "eps"),
])
def test_optimizer_and_size_options_reject_bools_strings_and_out_of_range(tmp_path, key, value, match):
    # TOML's `true` is the int 1 to Python: an ema or clip of 1 from a typo must be an error, not
    # a silently different run; strings and non-integers are named, never a TypeError from a comparison
    cfg = tiny_config(tmp_path)
    target, name = (cfg.optim, key.split(".")[1]) if key.startswith("optim.") else (cfg, key)
    setattr(target, name, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def _bad_ema(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.optim.ema = 1.0
    Trainer(cfg)


@pytest.mark.inductor
def test_compiled_segmented_losses_give_the_eager_gradients(tmp_path):
    # torch.compile of the segmented forward (inductor on the CPU here, with CUDA graphs on a GPU
    # in "reduce-overhead" mode); the backward is autograd.grad through the compiled graph
    from hrgrad_ext.train.segmented import SegmentedLosses

    torch._dynamo.reset()
    cfg = tiny_config(tmp_path, "transport", eps=[1.0, 1e-8], dtype="float64", compile="default")
    tr = Trainer(cfg)
    assert tr.losses_fn.compile == "default"
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    eager = SegmentedLosses(tr.model, tr.form, tr.layout)
    L_ref, _, J_ref = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, losses_fn=eager)
    L, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout, losses_fn=tr.losses_fn)
    assert_same_task_gradients(L, J, L_ref, J_ref, rtol=1e-10)
    L_spec, J_spec = reference_task_gradients(tr.model, tr.form, batch, tr.layout)
    assert_same_task_gradients(L, J, L_spec, J_spec, rtol=1e-10)
    tr.run()  # a compiled run trains (2 more steps, same shapes: no recompilation)
    assert tr.step == cfg.iters
    with pytest.raises(ValueError, match="compile"):
        Trainer(tiny_config(tmp_path, compile="fast"))
    with pytest.raises(ValueError, match="segmented"):
        Trainer(tiny_config(tmp_path, compile="default", grad_mode="separate"))


def test_bgk_per_task_windows_keep_the_task_gradients_exact(tmp_path):
    cfg = tiny_config(tmp_path, "bgk", eps=[1.0, 1e-3], t_final=[0.05, 0.1], dtype="float64")
    cfg.model = {**cfg.model, "f_form": "maxwellian"}
    tr = Trainer(cfg)
    batch = tr.form.sample_batch(tr.gen, tr.eps_tensor, "cpu", torch.float64)
    assert batch["interior"]["t"][0].max() <= 0.05 < batch["interior"]["t"][1].max()
    L, _, J = segmented_task_gradients(tr.model, tr.form, batch, tr.layout)
    assert_task_gradients_match_references(L, J, task_gradient_references(tr, batch))


def test_lr_factors_scale_each_named_networks_step(tmp_path):
    # optim.lr_factors: with plain SGD the first step of each parameter is -lr * factor * its
    # update, so against the same run without factors the named networks' steps are scaled by
    # their factors and every other step is unchanged; the logged lr stays the base lr, the
    # divergence policy's scale keeps the ratios, and the groups survive a resume
    def run(factors, name):
        cfg = tiny_config(tmp_path, "bgk", method="sum", iters=2, dtype="float64")
        cfg.out = str(tmp_path / name)
        cfg.optim.name, cfg.optim.momentum, cfg.optim.lr, cfg.optim.schedule = "sgd", 0.0, 1e-4, "constant"
        cfg.optim.lr_factors = factors
        cfg.log.log_every = 1
        tr = Trainer(cfg.validate())
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.train_step()
        return tr, {n: p.detach() - before[n] for n, p in tr.model.named_parameters()}

    factors = {"u_net": 0.5, "f_net": 2.0}
    _, plain = run({}, "plain")
    tr, scaled = run(factors, "scaled")
    for n, d in plain.items():
        assert d.abs().max() > 0, n
        # atol: p_new - p_old of a parameter of size ~1 rounds at ~1e-17
        torch.testing.assert_close(scaled[n], d * factors.get(n.split(".")[0], 1.0), rtol=1e-8, atol=1e-14)
    assert sorted(g["lr"] for g in tr.optimizer.param_groups) == pytest.approx([5e-5, 1e-4, 2e-4])
    tr.lr_scale = 0.25
    tr._apply_lr_scale()
    assert sorted(g["lr"] for g in tr.optimizer.param_groups) == pytest.approx([1.25e-5, 2.5e-5, 5e-5])
    tr.lr_scale = 1.0
    tr._apply_lr_scale()
    tr.run()  # the second step and a checkpoint
    assert [r["lr"] for r in read_metrics(tr.cfg.out) if r["kind"] == "train"] == pytest.approx([1e-4, 1e-4])
    resumed = Trainer.resume(tr.cfg.out)
    assert sorted((g["lr"], g["lr_factor"]) for g in resumed.optimizer.param_groups) == \
        sorted((g["lr"], g["lr_factor"]) for g in tr.optimizer.param_groups)
    # the TOML round trip and a dotted override
    p = tmp_path / "lr_factors.toml"
    p.write_text(to_toml(tr.cfg))
    assert load_config(p).optim.lr_factors == factors
    assert apply_overrides(tr.cfg, ["optim.lr_factors.rho_net=0.25"]).optim.lr_factors == {**factors, "rho_net": 0.25}
    # bad values and names are named
    for bad, match in (({"u_net": 0.0}, "lr_factors"), ({"u_net": True}, "lr_factors"), ([0.5], "lr_factors"),
                       ({"macro": 0.5}, "unknown network.*'f_net', 'rho_net'")):
        cfg = tiny_config(tmp_path, "bgk")
        cfg.optim.lr_factors = bad
        with pytest.raises(ValueError, match=match):
            Trainer(cfg)


def test_update_clipping(tmp_path):
    cfg = tiny_config(tmp_path, iters=1, method="sum")
    cfg.optim.clip_norm = 1e-6
    cfg.optim.name = "sgd"
    cfg.optim.momentum = 0.0
    cfg.optim.lr = 1.0
    tr = Trainer(cfg)
    before = [p.detach().clone() for p in tr.params]
    tr.train_step()
    # SGD with lr 1: the step is the clipped update itself
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(tr.params, before)))
    assert 0 < step <= 1e-6 * (1 + 1e-4)
    bad = tiny_config(tmp_path)
    bad.optim.clip_norm = -1.0
    with pytest.raises(ValueError, match="clip_norm"):
        Trainer(bad)
