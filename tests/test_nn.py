"""Tests of hrgrad_ext.nn: eps encoding, bodies, APNN models and input derivatives."""

import math

import pytest
import torch

from hrgrad_ext.nn import BGKAPNN, MLP, EpsEncoding, ResNet, TransportAPNN, make_body
from hrgrad_ext.train.losses import value_and_derivatives


@pytest.fixture(autouse=True)
def _float64():
    # finite-difference checks need float64; restore the default for other test modules
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_encoding_normalises_log_eps_to_unit_interval():
    enc = EpsEncoding(-8, 0)
    z = enc(torch.tensor([1e-8, 1e-4, 1.0]))
    assert enc.out_dim == 1
    torch.testing.assert_close(z[:, 0], torch.tensor([-1.0, 0.0, 1.0]))


def test_encoding_fourier_and_embedding_shapes_and_values():
    enc = EpsEncoding(-3, 0, fourier=2, embed_dim=5)
    assert enc.out_dim == 1 + 4 + 5
    eps = torch.tensor([1e-3, 1e-2, 1.0])
    out = enc(eps)
    assert out.shape == (3, 10)
    z = enc.normalised(eps)
    torch.testing.assert_close(out[:, 1], torch.sin(math.pi * z))
    torch.testing.assert_close(out[:, 3], torch.cos(math.pi * z))
    # the learned part is a function of the fixed features and has parameters
    assert sum(p.numel() for p in enc.parameters()) == 5 * 5 + 5
    assert torch.all(out[:, 5:].abs() < 1)


def test_encoding_single_point_range_and_bad_args():
    enc = EpsEncoding(-2, -2)
    assert torch.equal(enc(torch.tensor([0.01])), torch.zeros(1, 1))
    with pytest.raises(ValueError):
        EpsEncoding(0, -1)
    with pytest.raises(ValueError):
        EpsEncoding(-1, 0, fourier=-1)


# the activations written out (gelu: the exact erf form)
ACTIVATION_FORMULAS = {
    "tanh": torch.tanh,
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
    "sin": torch.sin,
    "softplus": lambda z: torch.log1p(torch.exp(z)),
}


@pytest.mark.parametrize("kind,cls", [("mlp", MLP), ("resnet", ResNet)])
@pytest.mark.parametrize("act", sorted(ACTIVATION_FORMULAS))
def test_bodies_compute_their_documented_formula(kind, cls, act):
    net = make_body(kind, 3, 2, width=8, depth=2, activation=act)
    assert isinstance(net, cls)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    # MLP: depth hidden layers and an output layer; ResNet: input, two per block, output
    assert len(linears) == (2 + 1 if kind == "mlp" else 1 + 2 * 2 + 1)
    assert all(m.out_features == 8 for m in linears[:-1]) and linears[-1].out_features == 2

    def lin(m, z):
        return z @ m.weight.T + m.bias

    sigma = ACTIVATION_FORMULAS[act]
    x = torch.randn(4, 5, 3)
    if kind == "mlp":  # act(W_k ... act(W_1 x)) then a linear output
        h = x
        for m in linears[:-1]:
            h = sigma(lin(m, h))
    else:  # h = act(W_in x), then h <- h + act(W_2 act(W_1 h)) per block
        h = sigma(lin(linears[0], x))
        for l1, l2 in zip(linears[1:-1:2], linears[2:-1:2]):
            h = h + sigma(lin(l2, sigma(lin(l1, h))))
    torch.testing.assert_close(net(x), lin(linears[-1], h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_adaptive_tanh_is_tanh_of_a_trainable_slope_per_layer(kind):
    from hrgrad_ext.nn import AdaptiveTanh

    net = make_body(kind, 3, 2, width=8, depth=2, activation="adaptive_tanh").double()
    acts = [m for m in net.modules() if isinstance(m, AdaptiveTanh)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(acts) == len(linears) - 1  # one slope per hidden layer
    x = torch.randn(4, 3, dtype=torch.float64)
    # it starts as tanh: n a = 1
    plain = make_body(kind, 3, 2, width=8, depth=2, activation="tanh").double()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.endswith(".a")})
    torch.testing.assert_close(net(x), plain(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for i, m in enumerate(acts):
            m.a.fill_(0.05 * (i + 1))

    def lin(m, z):
        return z @ m.weight.T + m.bias

    def act(m, z):
        return torch.tanh(AdaptiveTanh.SCALE * m.a * z)

    if kind == "mlp":
        h = x
        for m, a in zip(linears[:-1], acts):
            h = act(a, lin(m, h))
    else:
        h = act(acts[0], lin(linears[0], x))
        for l1, l2, a1, a2 in zip(linears[1:-1:2], linears[2:-1:2], acts[1::2], acts[2::2]):
            h = h + act(a2, lin(l2, act(a1, lin(l1, h))))
    torch.testing.assert_close(net(x), lin(linears[-1], h), rtol=1e-12, atol=1e-12)
    net(x).square().sum().backward()
    assert all(m.a.grad is not None and m.a.grad.abs() > 0 for m in acts)


def test_body_errors():
    with pytest.raises(ValueError, match="unknown network body"):
        make_body("cnn", 3, 1, 8, 2, "tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        make_body("mlp", 3, 1, 8, 2, "relu6")
    with pytest.raises(ValueError):
        MLP(3, 1, width=0)


def _pts(n, x0, x1, t1=0.1):
    g = torch.Generator().manual_seed(0)
    return t1 * torch.rand(n, generator=g), x0 + (x1 - x0) * torch.rand(n, generator=g)


@pytest.mark.parametrize("n", [7, 6])  # n == V is where a mis-broadcast eps would pass unnoticed
def test_transport_per_node_coordinates_take_one_eps_per_point(n):
    m = TransportAPNN(EpsEncoding(-8, 0, 1), rho_net=dict(width=8, depth=2), g_net=dict(width=8, depth=1),
                      wall_layer=1e-3)
    t, x = _pts(n, 0, 1)
    v = torch.linspace(-1, 1, 6)
    eps = torch.logspace(-4, 0, n)  # the wall-layer features on for some points, off for others
    tg, xg = t[:, None].expand(n, 6), x[:, None].expand(n, 6)
    rho, G = m.rho(tg, xg, eps), m.g_raw(tg, xg, v, eps)
    for i in range(n):
        torch.testing.assert_close(rho[i], m.rho(t[i:i + 1], x[i:i + 1], eps[i]).expand(6))
        torch.testing.assert_close(G[i], m.g_raw(t[i:i + 1], x[i:i + 1], v, eps[i])[0])


def test_transport_model_shapes_and_dispatch():
    m = TransportAPNN(EpsEncoding(-8, 0, 1), rho_net=dict(width=8, depth=2), g_net=dict(kind="resnet", width=8, depth=1))
    t, x = _pts(7, 0, 1)
    v = torch.linspace(-1, 1, 6)
    eps = torch.full((7,), 1e-3)
    assert m.rho(t, x, eps).shape == (7,)
    assert m("g_raw", t, x, v, torch.tensor(1e-3)).shape == (7, 6)
    # [n] and pre-expanded [n, V] coordinates give the same values
    G1 = m.g_raw(t, x, v, eps)
    G2 = m.g_raw(t[:, None].expand(7, 6), x[:, None].expand(7, 6), v, eps)
    torch.testing.assert_close(G1, G2)
    assert set(m.macroscopic(t, x, eps)) == {"rho"}
    with pytest.raises(ValueError, match="unknown method"):
        m("nope", t)
    with pytest.raises(ValueError, match="unknown network option"):
        TransportAPNN(EpsEncoding(), rho_net=dict(widht=3))


def test_bgk_model_dirichlet_states_and_positive_f():
    m = BGKAPNN(EpsEncoding(-3, 0), f_net=dict(width=8, depth=1), macro_net=dict(width=8, depth=2))
    # make the macro networks far from zero so the built-in constraint is what holds the states
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5.0)
    t = torch.tensor([0.0, 0.05, 0.1, 0.03])
    for x_end, state in ((-0.5, m.left), (0.5, m.right)):
        x = torch.full((4,), x_end)
        rho, u, T = m.macro(t, x, torch.tensor(1e-2))
        torch.testing.assert_close(rho, torch.full((4,), state[0]))
        torch.testing.assert_close(u, torch.full((4,), state[1]))
        torch.testing.assert_close(T, torch.full((4,), state[2]))
    t, x = _pts(9, -0.5, 0.5)
    F = m.f(t, x, torch.linspace(-10, 10, 5), torch.full((9,), 0.1))
    assert F.shape == (9, 5) and torch.all(F > 0)
    mac = m.macroscopic(t, x, torch.tensor(1.0))
    torch.testing.assert_close(mac["energy"], 0.5 * mac["rho"] * (mac["u"] ** 2 + mac["T"]))
    # the interior is not pinned: the networks change the values there
    rho0 = m.macro(t, x, torch.tensor(1.0))[0]
    lin = torch.exp((0.5 - x) * math.log(1.5) + (0.5 + x) * math.log(0.625))
    assert (rho0 - lin).abs().max() > 1e-3


@pytest.mark.parametrize("deriv", ["jvp", "vjp", "autograd"])
@pytest.mark.parametrize("options", [{}, {"reach": 0.2, "half_range": True}, {"wall_layer": 0.1}])
def test_input_derivatives_match_finite_differences(deriv, options):
    m = TransportAPNN(EpsEncoding(-8, 0), rho_net=dict(width=8, depth=2), g_net=dict(width=8, depth=2), **options)
    t, x = _pts(5, 0, 1)
    v = torch.linspace(-1, 1, 4)
    eps = torch.tensor(0.3)
    fn = lambda t, x: m.g_raw(t, x, v, eps)
    G, (Gt, Gx) = value_and_derivatives(fn, (t, x), (0, 1), deriv, grid=4)
    h = 1e-6
    torch.testing.assert_close(Gt, (fn(t + h, x) - fn(t - h, x)) / (2 * h), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(Gx, (fn(t, x + h) - fn(t, x - h)) / (2 * h), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(G, fn(t, x))


@pytest.mark.parametrize("deriv", ["jvp", "autograd"])
def test_tuple_output_time_derivatives(deriv):
    m = BGKAPNN(EpsEncoding(-3, 0), f_net=dict(width=8, depth=1), macro_net=dict(width=8, depth=2))
    t, x = _pts(6, -0.5, 0.5)
    eps = torch.tensor(0.01)
    fn = lambda t: m.macro(t, x, eps)
    val, (dt,) = value_and_derivatives(fn, (t,), (0,), deriv)
    h = 1e-6
    for a, ap, am, d in zip(val, fn(t + h), fn(t - h), dt):
        torch.testing.assert_close(d, (ap - am) / (2 * h), atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown derivative mode"):
        value_and_derivatives(fn, (t,), (0,), "symbolic")


def test_transport_reach_scales_x_to_the_distance_the_inflow_travels():
    # eps = 1 at t = 0.1: the solution lives in x < 0.1. With reach = 0.2 the network's x input
    # spans [-1, 1] over x in [0, 0.2] for eps = 1 (it spanned [-1, -0.6] with the slab
    # scaling, which smeared the eps = 1 front), and the slab for eps <= 0.2.
    m = TransportAPNN(EpsEncoding(-8, 0), rho_net=dict(width=4, depth=1), g_net=dict(width=4, depth=1), reach=0.2)
    t = torch.full((3,), 0.05)
    x = torch.tensor([0.0, 0.2, 1.0])
    xs = m.point_features(t, x, torch.tensor(1.0))[:, 1]
    torch.testing.assert_close(xs, torch.tensor([-1.0, 1.0, 9.0]))
    for e in (0.2, 1e-2, 1e-8):
        xs = m.point_features(t, x, torch.tensor(e))[:, 1]
        torch.testing.assert_close(xs, torch.tensor([-1.0, -0.6, 1.0]))
    # per-point eps on the velocity grid (the [n, V] layout of reverse-mode derivatives)
    v = torch.linspace(-1, 1, 4)
    h = m.grid_features(t.unsqueeze(-1).expand(3, 4), x.unsqueeze(-1).expand(3, 4), v, torch.tensor([1.0, 1.0, 1e-3]))
    torch.testing.assert_close(h[:, 0, 1], torch.tensor([-1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="reach"):
        TransportAPNN(EpsEncoding(), reach=-1.0)


def test_transport_wall_layer_inputs_are_the_layer_shapes_above_the_threshold():
    m = TransportAPNN(EpsEncoding(-8, 0), rho_net=dict(width=4, depth=1), g_net=dict(width=4, depth=1), wall_layer=0.05)
    e = m.encoding.out_dim
    assert m.rho_net.net[0].in_features == 2 + e + 2 and m.g_net.net[0].in_features == 3 + e + 2
    x = torch.tensor([0.0, 0.05, 0.5, 1.0], dtype=torch.float64)
    for eps in (1.0, 0.1, 0.05):
        feats = m.wall_layer_features(x, torch.tensor(eps, dtype=torch.float64))
        torch.testing.assert_close(feats, torch.stack([torch.exp(-x / eps), torch.exp(-(1 - x) / eps)], -1))
    # below the threshold the layer is not resolved: zeros, not a spike at the wall
    for eps in (0.049, 1e-8):
        assert (m.wall_layer_features(x, torch.tensor(eps, dtype=torch.float64)) == 0).all()
    # per-point eps on the [n, V] grid layout; the networks see exactly these inputs
    xg = x.unsqueeze(-1).expand(4, 3)
    eps_pts = torch.tensor([1.0, 1e-3, 0.1, 1e-8], dtype=torch.float64)
    feats = m.wall_layer_features(xg, eps_pts)
    assert feats.shape == (4, 3, 2)
    torch.testing.assert_close(feats[0, :, 0], torch.ones(3, dtype=torch.float64))
    assert (feats[1] == 0).all() and (feats[3] == 0).all()
    torch.testing.assert_close(feats[2, :, 0], torch.full((3,), math.exp(-5.0), dtype=torch.float64))
    t = torch.full((4,), 0.05)
    captured = {}
    m.rho_net.register_forward_hook(lambda mod, inp, out: captured.update(rho=inp[0]))
    m.g_net.register_forward_hook(lambda mod, inp, out: captured.update(g=inp[0]))
    m.rho(t, x, torch.tensor(0.1))
    m.g_raw(t, x, torch.linspace(-1, 1, 3), torch.tensor(0.1))
    torch.testing.assert_close(captured["rho"][:, -2:], m.wall_layer_features(x, torch.tensor(0.1)))
    torch.testing.assert_close(captured["g"][:, 1, -2:], m.wall_layer_features(x, torch.tensor(0.1)))
    # off (the default), the networks' inputs are those of before
    assert TransportAPNN(EpsEncoding(-8, 0), rho_net=dict(width=4, depth=1)).rho_net.net[0].in_features == 2 + e
    with pytest.raises(ValueError, match="wall_layer"):
        TransportAPNN(EpsEncoding(), wall_layer=-0.1)
    with pytest.raises(ValueError, match="wall_layer"):
        TransportAPNN(EpsEncoding(), wall_layer=float("nan"))


def test_transport_uncollided_density_is_the_exact_velocity_average_of_the_uncollided_flux():
    # against the exponential-integral form of the reference solver (an independent formula:
    # closed-form primitives, scipy's E1), float64, absolute 1e-11; including x = 0, the front
    # x = t / eps from either side, the far side of the front (0) and t = 0 (0)
    import numpy as np

    from hrgrad_ext.reference.transport import uncollided_rho_points

    m = TransportAPNN(EpsEncoding(-8, 0), t_range=(0.0, 1.0), rho_net=dict(width=4, depth=1),
                      g_net=dict(width=4, depth=1), first_collision=0.5)
    for eps in (1.0, 0.7, 0.5):
        for t in (1e-3, 0.05, 0.3, 1.0):
            front = t / eps
            x = np.unique(np.concatenate([[0.0, 1e-9, 1e-5, 1e-3], np.linspace(0.0, 1.0, 201),
                                          [front * (1 - 1e-9), front, front * (1 + 1e-6)]]))
            x = x[x <= 1.0]
            want = uncollided_rho_points(t, eps, x)
            got = m.uncollided_density(torch.full((len(x),), t, dtype=torch.float64), torch.tensor(x),
                                       torch.tensor(eps, dtype=torch.float64))
            assert got.dtype == torch.float64
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-11)
            assert (got[torch.tensor(x) > front * (1 + 1e-6)] == 0).all()
    x = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    # at x = 0 half of the velocities carry the inflow: 1/2 for every t > 0; at t = 0, nothing
    assert float(m.uncollided_density(torch.tensor([0.2]), torch.tensor([0.0]), torch.tensor(1.0))) == pytest.approx(0.5)
    assert (m.uncollided_density(torch.zeros(5, dtype=torch.float64), x, torch.tensor(1.0)) == 0).all()
    # below the threshold (and with the split off) there is no uncollided part
    assert (m.uncollided_density(torch.full((5,), 0.5), x, torch.tensor(0.49)) == 0).all()
    off = TransportAPNN(EpsEncoding(-8, 0), t_range=(0.0, 1.0), rho_net=dict(width=4, depth=1), g_net=dict(width=4, depth=1))
    assert (off.uncollided_density(torch.full((5,), 0.5), x, torch.tensor(1.0)) == 0).all()
    # per-point eps (the layout of a batch of several tasks), float32 in and out
    t32, x32 = torch.full((4,), 0.5, dtype=torch.float32), torch.tensor([0.1, 0.1, 0.3, 0.3], dtype=torch.float32)
    got = m.uncollided_density(t32, x32, torch.tensor([1.0, 1e-3, 0.7, 1e-8], dtype=torch.float32))
    assert got.dtype == torch.float32
    assert got[1] == 0 and got[3] == 0 and got[0] > 0.2 and got[2] > 0.1
    torch.testing.assert_close(got[0], m.uncollided_density(t32[:1], x32[:1], torch.tensor(1.0, dtype=torch.float32))[0])
    # the density scored against the references is the collided density plus this
    t = torch.full((5,), 0.4, dtype=torch.float64)
    m.double()
    for eps in (1.0, 1e-3):
        e = torch.tensor(eps, dtype=torch.float64)
        torch.testing.assert_close(m.macroscopic(t, x, e)["rho"], m.rho(t, x, e) + m.uncollided_density(t, x, e))
    assert m.uncollided_density(t, x, torch.tensor(1.0, dtype=torch.float64)).abs().sum() > 0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="first_collision"):
            TransportAPNN(EpsEncoding(), first_collision=bad)


def test_transport_half_range_lets_g_jump_at_v_zero():
    # f(t, 0, v) jumps from ~0 (v < 0, outgoing) to 1 (v > 0, inflow) at eps = 1: with sign(v)
    # as an input, g can jump across v = 0 with no steep slope in v.
    torch.manual_seed(0)
    m = TransportAPNN(EpsEncoding(-8, 0), rho_net=dict(width=4, depth=1), g_net=dict(width=8, depth=2), half_range=True)
    assert m.g_net.net[0].in_features == 3 + m.encoding.out_dim + 1
    with torch.no_grad():
        m.g_net.net[0].weight.zero_()
        m.g_net.net[0].weight[:, -1] = 1.0  # depend on sign(v) only
    t, x = _pts(2, 0, 1)
    G = m.g_raw(t, x, torch.tensor([-1e-3, 1e-3]), torch.tensor(1.0))
    assert (G[:, 1] - G[:, 0]).abs().min() > 1e-2


# --- BGK parametrisations: hard initial data, f as a Maxwellian times a learned deviation ----


def _bgk_model(case="IV", **opts):
    from hrgrad_ext.reference.bgk import case_profile

    m = BGKAPNN(EpsEncoding(-3, 0, 1), f_net=dict(width=8, depth=1), macro_net=dict(width=8, depth=1),
                initial_profile=case_profile(case), **opts)
    # networks far from zero, so the parametrisation (not small outputs) is what holds the data
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(5.0)
    return m


@pytest.mark.parametrize("f_form", ["free", "maxwellian"])
def test_bgk_hard_ic_gives_the_initial_state_and_the_wall_states(f_form):
    from hrgrad_ext.ops import maxwellian

    m = _bgk_model("III", hard_ic=True, f_form=f_form)
    x = torch.cat([torch.linspace(-0.5, 0.5, 11), _pts(9, -0.5, 0.5)[1]])
    n = x.shape[0]
    v = torch.linspace(-10, 10, 12)
    for kn in (1.0, 1e-3):
        eps = torch.tensor(kn)
        rho, u, T = m.macro(torch.zeros(n), x, eps)
        rho0, u0, T0 = m.initial_state(x)
        torch.testing.assert_close(rho, rho0, rtol=1e-14, atol=0)
        torch.testing.assert_close(u, u0, rtol=0, atol=1e-15)
        torch.testing.assert_close(T, T0, rtol=1e-14, atol=0)
        F0 = m.f(torch.zeros(n), x, v, eps)
        if f_form == "maxwellian":  # f(0) = f0 = M[rho0, u0, T0] exactly
            torch.testing.assert_close(F0, maxwellian(rho0, u0, T0, v), rtol=1e-13, atol=1e-300)
        # walls: q0(-+0.5), within 1e-4 of the Dirichlet states (case III: tanh(5) = 1 - 9e-5)
        t = torch.tensor([0.0, 0.03, 0.1])
        for x_end, state in ((-0.5, m.left), (0.5, m.right)):
            got = m.macro(t, torch.full((3,), x_end), eps)
            for q, s in zip(got, state):
                torch.testing.assert_close(q, torch.full((3,), s), rtol=0, atol=1e-4)
        # the interior moves away from the initial data at t > 0
        rho1 = m.macro(torch.full((n,), 0.1), x, eps)[0]
        assert (rho1 - rho0).abs().max() > 1e-2
        t, x2 = _pts(9, -0.5, 0.5)
        assert torch.all(m.f(t, x2, v, eps) > 0)
    # cases I, II, IV: the walls are the Dirichlet states (IV within 2e-9)
    for case in ("I", "II", "IV"):
        m = _bgk_model(case, hard_ic=True)
        for x_end, state in ((-0.5, m.left), (0.5, m.right)):
            for q, s in zip(m.macro(torch.tensor([0.05]), torch.tensor([x_end]), torch.tensor(0.1)), state):
                assert abs(q.item() - s) < 1e-8


def test_bgk_maxwellian_f_is_m_times_exp_deviation_and_its_derivatives_are_exact():
    from hrgrad_ext.ops import maxwellian

    m = _bgk_model(f_form="maxwellian")
    t, x = _pts(6, -0.5, 0.5)
    v = torch.linspace(-10, 10, 7)
    eps = torch.tensor(0.1)
    rho, u, T = m.macro(t, x, eps)
    F = m.f(t, x, v, eps)
    assert torch.all(F > 0)
    torch.testing.assert_close(F, maxwellian(rho, u, T, v) * torch.exp(m.f_dev(t, x, v, eps)))
    # per-node [n, V] coordinates (reverse-mode layout) give the same values
    torch.testing.assert_close(m.f(t[:, None].expand(6, 7), x[:, None].expand(6, 7), v, eps), F)
    # the chain rule used by the formulation equals finite differences of f
    from hrgrad_ext.nn import maxwellian_exp_derivatives

    (r, uu, TT), (dt, dx) = value_and_derivatives(lambda t, x: m.macro(t, x, eps), (t, x), (0, 1), "jvp")
    D, (Dt, Dx) = value_and_derivatives(lambda t, x: m.f_dev(t, x, v, eps), (t, x), (0, 1), "vjp", grid=7)
    F2, (Ft, Fx) = maxwellian_exp_derivatives(r, uu, TT, (dt, dx), D, (Dt, Dx), v)
    fn = lambda t, x: m.f(t, x, v, eps)
    h = 1e-6
    torch.testing.assert_close(F2, F)
    torch.testing.assert_close(Ft, (fn(t + h, x) - fn(t - h, x)) / (2 * h), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(Fx, (fn(t, x + h) - fn(t, x - h)) / (2 * h), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [7, 5])  # n == V is where a mis-broadcast eps would pass unnoticed
@pytest.mark.parametrize("opts", [dict(f_form="free"), dict(f_form="maxwellian", chapman_enskog=0.03, peculiar=True,
                                                                 deviation_knee=0.1, uncollided=True, characteristic=True)])
def test_bgk_per_node_coordinates_take_one_kn_per_point(n, opts):
    # per-node [n, V] coordinates with a per-point [n] Kn give each row its own Kn, as the
    # point-by-point calls do
    m = _bgk_model(**opts)
    t, x = _pts(n, -0.5, 0.5)
    v = torch.linspace(-5, 5, 5)
    eps = torch.logspace(-3, 0, n)
    grid = m.f(t[:, None].expand(n, 5), x[:, None].expand(n, 5), v, eps)
    for i in range(n):
        torch.testing.assert_close(grid[i], m.f(t[i:i + 1], x[i:i + 1], v, eps[i])[0])
    torch.testing.assert_close(grid, m.f(t, x, v, eps))


def test_bgk_model_option_errors():
    with pytest.raises(ValueError, match="f_form"):
        BGKAPNN(EpsEncoding(), f_form="gaussian")
    with pytest.raises(ValueError, match="initial profile"):
        BGKAPNN(EpsEncoding(), hard_ic=True)
    with pytest.raises(ValueError, match="hard_ic"):
        BGKAPNN(EpsEncoding(), hard_ic="yes")


# --- Taylor mode (hrgrad_ext.nn.jets) -------------------------------------------------------

def _nested_jets(fn, t, x, pairs):
    """Values, first derivatives along (t, x) and the second derivatives of ``pairs`` of the
    pointwise ``fn(t, x)`` (a tuple of tensors) by nested torch.func.jvp: the reference."""
    unit = lambda i: (torch.ones_like(t), torch.zeros_like(x)) if i == 0 else (torch.zeros_like(t), torch.ones_like(x))
    along = lambda i: (lambda a, b: torch.func.jvp(fn, (a, b), unit(i))[1])
    value = fn(t, x)
    first = [along(i)(t, x) for i in range(2)]
    second = [torch.func.jvp(along(i), (t, x), unit(k))[1] for i, k in pairs]
    return value, first, second


def test_every_activation_has_a_jet_rule():
    from hrgrad_ext.nn.bodies import ACTIVATIONS
    from hrgrad_ext.nn.jets import ACTIVATION_DERIVATIVES, Jet, body_jet

    assert set(ACTIVATIONS.values()) <= set(ACTIVATION_DERIVATIVES)
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        body_jet(torch.nn.LayerNorm(3), Jet(torch.zeros(2, 3), torch.zeros(2, 2, 3)))


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@pytest.mark.parametrize("act", ["tanh", "adaptive_tanh", "silu", "gelu", "sin", "softplus"])
def test_body_jets_equal_nested_forward_mode(kind, act):
    # an input with second derivatives of its own (h quadratic in t and x), so that every term
    # of the chain rule through the layers is exercised; values bit for bit the body's forward
    from hrgrad_ext.nn.jets import Jet, body_jet

    torch.manual_seed(0)
    body = make_body(kind, 3, 2, 5, 2, act)
    with torch.no_grad():  # slopes off their initial 1 / n, so that they enter the derivatives
        for name, p in body.named_parameters():
            if name.endswith(".a"):
                p.mul_(1.7)
    A, B, C, E = (torch.randn(3) for _ in range(4))
    h = lambda t, x: t[:, None] * A + x[:, None] * B + (t * x)[:, None] * C + (x * x)[:, None] * E
    t, x = torch.rand(9), torch.rand(9) * 2 - 1
    if act == "softplus":  # across torch's threshold, where softplus turns linear
        x = x * 30
    pairs = ((1, 0), (1, 1), (0, 0))
    inp = Jet(h(t, x), torch.stack([A + x[:, None] * C, B + t[:, None] * C + 2 * x[:, None] * E]),
              torch.stack([C.expand(9, 3), 2 * E.expand(9, 3), torch.zeros(9, 3)]), pairs)
    out = body_jet(body, inp)
    value, first, second = _nested_jets(lambda t, x: (body(h(t, x)),), t, x, pairs)
    assert torch.equal(out.value, value[0])
    torch.testing.assert_close(out.first, torch.stack([f[0] for f in first]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.second, torch.stack([s[0] for s in second]), rtol=1e-10, atol=1e-10)
    first_only = body_jet(body, Jet(inp.value, inp.first))
    assert first_only.second is None and torch.equal(first_only.first, out.first)


@pytest.mark.parametrize("hard_ic", [False, True])
@pytest.mark.parametrize("windows", [False, True])
def test_bgk_macro_jets_and_chapman_enskog_derivatives_equal_nested_forward_mode(hard_ic, windows):
    # the Taylor-mode pass through the macro networks (the formulation's fast path) against
    # nested forward mode through the model's own log fields: values, (t, x) derivatives, the
    # second derivatives d_t d_x and d_x d_x of the Chapman-Enskog term, and the term itself
    from hrgrad_ext.nn import TimeWindows

    tw = TimeWindows([1.0, 1e-2], [0.1, 0.05]) if windows else None
    m = _bgk_model(hard_ic=hard_ic, f_form="maxwellian", chapman_enskog=0.03, time_windows=tw)
    t, x = _pts(7, -0.5, 0.5)
    v = torch.linspace(-5, 5, 6)
    pairs = ((1, 0), (1, 1))
    for eps in (torch.tensor(1e-2), torch.logspace(-3, 0, 7)):
        jets = m.macro_log_jets(t, x, eps, pairs)
        value, first, second = _nested_jets(lambda t, x: m._macro_log(t, x, eps), t, x, pairs)
        for q in range(3):
            assert torch.equal(jets[q].value, value[q])
            torch.testing.assert_close(jets[q].first, torch.stack([f[q] for f in first]), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(jets[q].second, torch.stack([s[q] for s in second]), rtol=1e-10, atol=1e-10)
        macro, d_macro = value_and_derivatives(lambda t, x: m.macro(t, x, eps), (t, x), (0, 1), "jvp")
        for got in (m.macro_derivatives(t, x, eps), m.macro_and_chapman_enskog_derivatives(t, x, v, eps)[0]):
            torch.testing.assert_close(got[0], macro, rtol=1e-14, atol=0)
            torch.testing.assert_close(got[1], tuple(d_macro), rtol=1e-12, atol=1e-12)
        # the term's derivatives by reverse mode over the [n, V] grid of its own definition
        C, (Ct, Cx) = value_and_derivatives(lambda t, x: m.chapman_enskog_term(t, x, v, eps), (t, x), (0, 1), "vjp",
                                            grid=6)
        _, (C2, (Ct2, Cx2)) = m.macro_and_chapman_enskog_derivatives(t, x, v, eps)
        assert C.abs().max() > 1e-3 and Cx.abs().max() > 1e-2  # preconditions: a term that counts
        torch.testing.assert_close(C2, C, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(Ct2, Ct, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(Cx2, Cx, rtol=1e-10, atol=1e-12)
