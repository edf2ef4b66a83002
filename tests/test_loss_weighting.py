"""The loss-weighting baselines of PINN practice, each against its defining rule on small cases:
ReLoBRaLo's weights follow the loss ratios, learning-rate annealing equalises the mean weighted
gradient magnitudes, GradNorm drives the weighted gradient norms to its targets, SoftAdapt is a
softmax of the loss slopes. Also: their state survives ``state_dict`` exactly, a non-finite step
leaves it alone, a step without losses raises, and the trainer, ``backward`` and a resumed run
feed them correctly. (The properties every aggregator is classified by are in
test_aggregator_properties.py.)"""

import copy
import math

import pytest
import torch
from test_train import run_dir_copy, tiny_config

import hrgrad_ext
from hrgrad_ext.aggregators import GradNorm, LearningRateAnnealing, ReLoBRaLo, SoftAdapt, make_aggregator
from hrgrad_ext.train.trainer import Trainer

f64 = torch.float64
LOSS_WEIGHTED = [ReLoBRaLo, GradNorm, SoftAdapt]
STATEFUL = [*LOSS_WEIGHTED, LearningRateAnnealing]


def gradients(norms, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(len(norms), n, generator=g, dtype=f64)
    return J / J.norm(dim=1, keepdim=True) * torch.tensor(norms, dtype=f64)[:, None]


def losses_of(*values):
    return torch.tensor(values, dtype=f64)


def step(agg, J, losses):
    """The weights of one step with these losses."""
    agg.observe_losses(losses)
    return agg.weights(J)


# --- ReLoBRaLo ----------------------------------------------------------------------------------


def relobralo_reference(history, alpha, temperature, rhos):
    """The three formulas of the paper in plain Python, for a list of loss vectors and the
    Bernoulli draws of each step."""
    m = len(history[0])

    def bal(now, then):
        e = [math.exp(a / (temperature * b)) for a, b in zip(now, then)]
        return [m * x / sum(e) for x in e]

    lam, out = [1.0] * m, []
    for t, now in enumerate(history):
        prev = history[t - 1] if t else now
        hist = [rhos[t] * l + (1 - rhos[t]) * b for l, b in zip(lam, bal(now, history[0]))]
        lam = [alpha * h + (1 - alpha) * b for h, b in zip(hist, bal(now, prev))]
        out.append(lam)
    return out


@pytest.mark.parametrize("expected_rho", [0.0, 1.0])
def test_relobralo_matches_the_papers_formulas(expected_rho):
    history = [[1.0, 2.0, 0.5], [0.8, 1.0, 0.45], [0.7, 0.9, 0.2], [0.75, 0.5, 0.19]]
    agg = ReLoBRaLo(alpha=0.9, expected_rho=expected_rho, temperature=0.5)
    J = gradients([1.0, 2.0, 3.0])
    got = [step(agg, J, losses_of(*L)) for L in history]
    want = relobralo_reference(history, 0.9, 0.5, [expected_rho] * len(history))
    torch.testing.assert_close(torch.stack(got), torch.tensor(want, dtype=f64), rtol=1e-12, atol=0)


def test_relobralo_weights_follow_the_loss_ratios():
    # without memory (alpha = 0) the weights are m softmax(L(t) / (T L(t-1))): ordered as the
    # ratios, whatever the losses themselves; with alpha = 1 and a lookback at every step they
    # follow the ratios to the first step instead
    agg = ReLoBRaLo(alpha=0.0)
    J = gradients([1.0, 1.0, 1.0, 1.0])
    agg(J, losses=losses_of(1.0, 1e-3, 10.0, 0.1))
    w = step(agg, J, losses_of(0.9, 0.5e-3, 9.99, 0.3))
    ratios = torch.tensor([0.9, 0.5, 0.999, 3.0], dtype=f64)
    assert torch.equal(torch.argsort(w), torch.argsort(ratios))
    torch.testing.assert_close(w, 4 * torch.softmax(ratios / 0.1, 0), rtol=1e-12, atol=0)
    assert float(w.sum()) == pytest.approx(4.0)

    lookback = ReLoBRaLo(alpha=1.0, expected_rho=0.0)
    for L in ([1.0, 1.0, 1.0], [0.5, 0.9, 0.1], [0.6, 0.2, 0.05]):
        w = step(lookback, J[:3], losses_of(*L))
    torch.testing.assert_close(w, 3 * torch.softmax(losses_of(0.6, 0.2, 0.05) / 0.1, 0), rtol=1e-12, atol=0)


def test_relobralo_lookback_draws_are_seeded_and_rare():
    # E[rho] = 0.999: about one lookback to the first step in a thousand
    agg = ReLoBRaLo(seed=3)
    draws = [float(torch.rand((), generator=agg.generator) < agg.expected_rho) for _ in range(20000)]
    assert 5 <= draws.count(0.0) <= 45
    a, b = ReLoBRaLo(seed=3), ReLoBRaLo(seed=3)
    J = gradients([1.0, 2.0])
    for t in range(50):
        L = losses_of(1.0 / (t + 1), 2.0 / (t + 1) ** 0.5)
        assert torch.equal(a(J, losses=L), b(J, losses=L))


# --- learning-rate annealing --------------------------------------------------------------------


def test_lra_balances_the_mean_gradient_magnitudes():
    J = gradients([1.0, 10.0, 0.01], n=50)
    # alpha = 1: the weights are the estimates of the step; every weighted gradient then has
    # mean |lam_i g_i| equal to the largest entry over all task gradients
    w = LearningRateAnnealing(alpha=1.0).weights(J)
    torch.testing.assert_close((w[:, None] * J).abs().mean(1), J.abs().max().expand(3), rtol=1e-12, atol=0)
    # the paper's form: a reference task (the PDE residual) keeps weight 1 and sets the scale
    w = LearningRateAnnealing(alpha=1.0, reference=1).weights(J)
    assert w[1] == 1.0
    torch.testing.assert_close((w[[0, 2], None] * J[[0, 2]]).abs().mean(1), J[1].abs().max().expand(2), rtol=1e-12,
                               atol=0)


def test_lra_moving_average_and_update_interval():
    J1, J2 = gradients([1.0, 3.0], n=20, seed=1), gradients([2.0, 0.5], n=20, seed=2)
    hat = lambda J: J.abs().max() / J.abs().mean(1)  # noqa: E731
    agg = LearningRateAnnealing()  # alpha = 0.9, every step
    w1, w2 = agg.weights(J1), agg.weights(J2)
    torch.testing.assert_close(w1, 0.1 + 0.9 * hat(J1), rtol=1e-12, atol=0)
    torch.testing.assert_close(w2, 0.1 * w1 + 0.9 * hat(J2), rtol=1e-12, atol=0)
    # the authors' code: every 10 steps, 0.1 on the new estimate
    agg = LearningRateAnnealing(alpha=0.1, every=10)
    ws = [agg.weights(J1 if t < 10 else J2) for t in range(12)]
    first = 0.9 + 0.1 * hat(J1)
    assert all(torch.equal(w, first) for w in ws[:10])
    torch.testing.assert_close(ws[10], 0.9 * first + 0.1 * hat(J2), rtol=1e-12, atol=0)
    assert torch.equal(ws[11], ws[10])


# --- GradNorm ------------------------------------------------------------------------------------


def test_gradnorm_drives_the_weighted_norms_to_the_targets():
    # equal training rates: the targets are equal, so the weighted norms w_i |g_i| converge to
    # their mean, from gradient norms a factor 4 apart; the weights always sum to K
    norms = torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    J = gradients(norms.tolist())
    agg = GradNorm(alpha=1.5, lr=0.01)
    for t in range(600):
        w = step(agg, J, losses_of(1.0, 2.0, 3.0) * 0.99**t)
        assert float(w.sum()) == pytest.approx(3.0)
    weighted = w * norms
    assert float(weighted.max() / weighted.min()) < 1.1
    # unequal rates: task 0's loss falls slowest (r_0 largest), so its target and its weighted
    # norm are the largest, and they match Eq. (1) with alpha = 1.5
    agg = GradNorm(alpha=1.5, lr=0.01)
    for t in range(500):
        L = losses_of(3.0 * 0.9995**t, 2.0 * 0.999**t, 1.0 * 0.998**t)
        w = step(agg, J, L)
    weighted = w * norms
    rates = L / losses_of(3.0, 2.0, 1.0)  # L_i(t) / L_i(0)
    target = weighted.mean() * (rates / rates.mean()) ** 1.5
    assert torch.equal(torch.argsort(weighted), torch.argsort(target))
    torch.testing.assert_close(weighted, target, rtol=0.1, atol=0)


def test_gradnorm_uses_the_weights_before_their_step():
    J = gradients([1.0, 5.0])
    agg = GradNorm()
    w0 = agg(J, losses=losses_of(1.0, 1.0))
    torch.testing.assert_close(w0, J.T @ torch.ones(2, dtype=f64))  # the first step is the sum
    assert not torch.equal(agg.task_weights, torch.ones(2, dtype=f64))  # then the weights moved
    # the larger gradient's weight went down (its weighted norm was above the mean)
    assert agg.task_weights[1] < 1.0 < agg.task_weights[0]


# --- SoftAdapt -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["original", "normalized", "loss_weighted"])
def test_softadapt_is_a_softmax_of_the_loss_slopes(variant):
    J = gradients([1.0, 1.0, 1.0])
    agg = SoftAdapt(beta=10.0, variant=variant)
    torch.testing.assert_close(step(agg, J, losses_of(1.0, 1.0, 1.0)), torch.full((3,), 1 / 3, dtype=f64), rtol=1e-14, atol=0)
    now = losses_of(1.2, 0.5, 0.9)
    w = step(agg, J, now)
    s = now - losses_of(1.0, 1.0, 1.0)
    if variant == "normalized":
        s = s / s.abs().sum()
    e = torch.exp(10.0 * s) * (now if variant == "loss_weighted" else 1.0)
    torch.testing.assert_close(w, e / e.sum(), rtol=1e-12, atol=0)
    assert int(w.argmax()) == 0  # the loss that rose gets the largest weight
    assert float(w.sum()) == pytest.approx(1.0)


def test_softadapt_default_beta_is_close_to_the_mean_for_small_slopes():
    agg = SoftAdapt()
    J = gradients([1.0, 2.0])
    agg(J, losses=losses_of(1e-2, 2e-2))
    w = step(agg, J, losses_of(0.9e-2, 1.5e-2))
    assert (w - 0.5).abs().max() < 1e-3


# --- shared behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", STATEFUL, ids=lambda c: c.__name__)
def test_state_dict_round_trip_continues_exactly(cls):
    J = gradients([1.0, 3.0, 0.3])
    a = cls()
    for t in range(4):
        a(J * (1 + t), losses=losses_of(1.0, 0.5, 2.0) / (1 + t) ** torch.tensor([1.0, 0.5, 2.0], dtype=f64))
    state = a.state_dict()
    assert all(v is None or isinstance(v, (torch.Tensor, int)) for v in state.values())
    b = cls()
    b.load_state_dict(copy.deepcopy(state))
    if isinstance(a, ReLoBRaLo):
        b.generator.set_state(a.generator.get_state())  # what a training checkpoint also restores
    for t in range(4):
        L = losses_of(0.3, 0.2, 0.1) * (t + 1)
        assert torch.equal(a(J, losses=L), b(J, losses=L))
    with pytest.raises(ValueError, match="expected the keys"):
        b.load_state_dict({})


@pytest.mark.parametrize("cls", STATEFUL, ids=lambda c: c.__name__)
def test_a_nonfinite_step_leaves_the_state_alone(cls):
    J = gradients([1.0, 3.0])
    a, b = cls(), cls()
    for agg in (a, b):
        agg(J, losses=losses_of(1.0, 2.0))
    before = a.state_dict()
    bad_J = J.clone()
    bad_J[0, 0] = float("nan")
    a(bad_J, losses=losses_of(float("nan"), 2.0))
    after = a.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor) else before[k] == after[k] - 1
        assert same, k
    if isinstance(a, ReLoBRaLo):
        torch.rand((), generator=b.generator)  # the bad step drew its lookback too
    if not isinstance(a, LearningRateAnnealing):
        L = losses_of(0.5, 1.5)
        assert torch.equal(a(J, losses=L), b(J, losses=L))


@pytest.mark.parametrize("cls", LOSS_WEIGHTED, ids=lambda c: c.__name__)
def test_missing_or_mismatched_losses_raise(cls):
    J = gradients([1.0, 2.0])
    agg = cls()
    with pytest.raises(ValueError, match="observe_losses"):
        agg(J)
    agg(J, losses=losses_of(1.0, 1.0))
    with pytest.raises(ValueError, match="observe_losses"):  # each step's losses are used once
        agg.weights(J)
    with pytest.raises(ValueError, match="3 task losses for 2 task gradients"):
        agg(J, losses=losses_of(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="1-D"):
        agg.observe_losses(torch.ones(2, 2))


def test_bad_options_raise():
    for make, match in [(lambda: ReLoBRaLo(alpha=2.0), "alpha"), (lambda: ReLoBRaLo(temperature=0.0), "temperature"),
                        (lambda: GradNorm(lr=0.0), "lr"), (lambda: SoftAdapt(variant="x"), "variant"),
                        (lambda: LearningRateAnnealing(every=0), "every"),
                        (lambda: LearningRateAnnealing(reference=-1), "reference"),
                        # a bool is not a number (True is the int 1 to Python), a string is named
                        (lambda: ReLoBRaLo(alpha=True), "alpha"), (lambda: ReLoBRaLo(temperature="0.1"), "temperature"),
                        (lambda: ReLoBRaLo(seed=1.5), "seed"), (lambda: GradNorm(alpha=float("inf")), "alpha"),
                        (lambda: GradNorm(lr=True), "lr"), (lambda: SoftAdapt(beta=float("nan")), "beta"),
                        (lambda: SoftAdapt(beta="0.1"), "beta"), (lambda: LearningRateAnnealing(alpha=True), "alpha"),
                        (lambda: LearningRateAnnealing(alpha="0.9"), "alpha"),
                        (lambda: LearningRateAnnealing(every=True), "every"),
                        (lambda: LearningRateAnnealing(reference=True), "reference")]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="reference task 5 for 2 tasks"):
        LearningRateAnnealing(reference=5).weights(gradients([1.0, 2.0]))


def test_backward_feeds_the_losses():
    # hrgrad_ext.backward gives a loss-weighting aggregator the step's losses: the second step of
    # SoftAdapt weights by the slopes of the two losses
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=f64))
    agg = SoftAdapt(beta=100.0)
    first = hrgrad_ext.backward([(w**2).sum(), (w[0] - 3) ** 2], [w], agg)
    torch.testing.assert_close(first.weights, torch.full((2,), 0.5, dtype=f64))
    with torch.no_grad():
        w += torch.tensor([0.5, 0.0], dtype=f64)  # loss 0 rises (5 -> 6.25), loss 1 falls (4 -> 2.25)
    second = hrgrad_ext.backward([(w**2).sum(), (w[0] - 3) ** 2], [w], agg)
    s = torch.tensor([1.25, -1.75], dtype=f64)
    torch.testing.assert_close(second.weights, torch.softmax(100.0 * s, 0))


# --- in the trainer ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["relobralo", "lra", "gradnorm", "softadapt"])
def test_trainer_resume_continues_the_weighting_exactly(tmp_path, method):
    base = tiny_config(tmp_path, method=method, iters=6, dtype="float64")
    base.log.log_every = 1
    base.log.checkpoint_every = 100
    base.aggregator = {"softadapt": {"beta": 1e3}} if method == "softadapt" else {}
    full_cfg, cut_cfg = run_dir_copy(base, tmp_path, "full"), run_dir_copy(base, tmp_path, "cut")
    full = Trainer(full_cfg)
    full.run()
    assert Trainer(cut_cfg).run(max_steps=3) is None
    resumed = Trainer.resume(cut_cfg.out)
    for k, v in resumed.aggregator.state_dict().items():  # the state came back from the checkpoint
        assert v is not None, k
    resumed.run()
    flat = lambda t: torch.cat([p.detach().reshape(-1) for p in t.params])  # noqa: E731
    assert torch.equal(flat(full), flat(resumed))
    for k, v in full.aggregator.state_dict().items():
        other = resumed.aggregator.state_dict()[k]
        assert (torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other), k
    # the weights of the run moved away from their initial values (the method did something)
    from hrgrad_ext.train.trainer import read_metrics

    weights = [r["weight"] for r in read_metrics(full_cfg.out) if r["kind"] == "train"]
    assert weights[-1] != weights[0]


def test_trainer_takes_the_method_options(tmp_path):
    cfg = tiny_config(tmp_path, method="relobralo")
    cfg.aggregator = {"relobralo": {"alpha": 0.5, "temperature": 1.0}}
    tr = Trainer(cfg)
    assert (tr.aggregator.alpha, tr.aggregator.temperature, tr.aggregator.seed) == (0.5, 1.0, cfg.seed)
    assert make_aggregator("lra", {"reference": 0}).reference == 0
