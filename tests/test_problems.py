"""Problem definitions: quadrature, data, samplers and scoring against the references."""

import math

import numpy as np
import pytest
import torch

from hrgrad_ext.problems import BGK, LinearTransport, gauss_legendre, relative_l2
from hrgrad_ext.reference import bgk as bgk_ref


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HRGRAD_EXT_CACHE", str(tmp_path / "cache"))


# coarse references keep the tests fast
LT_OPTS = dict(nx=40)
BGK_OPTS = dict(nx=60, nv=32)


# -- quadrature and data -----------------------------------------------------------------------

def test_transport_quadrature():
    p = LinearTransport(dtype=torch.float64)
    v, w = p.quadrature
    assert v.shape == w.shape == (30,) and v.dtype == torch.float64
    assert torch.all((v > -1) & (v < 1))
    assert math.isclose(float(w.sum()), 2.0, rel_tol=1e-14)
    assert math.isclose(float(p.average(torch.ones(30, dtype=torch.float64))), 1.0, rel_tol=1e-14)
    assert math.isclose(float(p.average(v ** 2)), 1.0 / 3.0, rel_tol=1e-13)
    assert abs(float(p.average(v ** 3))) < 1e-15


def test_bgk_quadrature_reproduces_maxwellian_moments():
    p = BGK("IV", dtype=torch.float64)
    v, w = p.quadrature
    assert v.shape == (64,) and math.isclose(float(w.sum()), 20.0, rel_tol=1e-14)
    rho, u, T = (torch.tensor(a, dtype=torch.float64)
                 for a in ([1.5, 0.7], [0.3, -0.2], [1.5, 0.75]))
    f = p.maxwellian(rho[:, None], u[:, None], T[:, None], v[None, :])
    d, m, e = p.moments(f)
    torch.testing.assert_close(d, rho, rtol=1e-10, atol=0)
    torch.testing.assert_close(m, rho * u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e, 0.5 * rho * (u * u + T), rtol=1e-10, atol=0)


def test_gauss_legendre_arguments():
    x, w = gauss_legendre(5, 2.0, 4.0, dtype=torch.float64)
    assert math.isclose(float((w * x ** 3).sum()), (4 ** 4 - 2 ** 4) / 4, rel_tol=1e-13)
    with pytest.raises(ValueError, match="positive integer"):
        gauss_legendre(0, -1.0, 1.0)
    with pytest.raises(ValueError, match="b > a"):
        gauss_legendre(4, 1.0, -1.0)


@pytest.mark.parametrize("case", ["I", "II", "III", "IV", "V"])
def test_bgk_initial_data_matches_reference_solver(case):
    p = BGK(case, dtype=torch.float64)
    x = torch.linspace(-0.49, 0.49, 37, dtype=torch.float64)
    np.testing.assert_allclose(p.profile(x).numpy(), bgk_ref.case_profile(case)(x.numpy()),
                               rtol=1e-14, atol=1e-15)
    rho, u, T = p.initial_state(torch.tensor([-0.5, 0.5], dtype=torch.float64))
    if case in ("I", "V"):        # profiles that reach 0 and 1 exactly at the ends
        np.testing.assert_allclose(rho.numpy(), [1.5, 0.625], atol=1e-14)
        np.testing.assert_allclose(T.numpy(), [1.5, 0.75], atol=1e-14)
    assert torch.all(u == 0)
    f0 = p.initial_f(x[:, None], p.v[None, :])
    torch.testing.assert_close(p.moments(f0)[0], p.initial_state(x)[0], rtol=1e-9, atol=0)


# spec KINETIC.md section 2, written out: q0 = q_L + (q_R - q_L) s(x)
SPEC_PROFILES = {
    "I": lambda x: (1 + np.sin(np.pi * x)) / 2,
    "II": lambda x: (1 + np.sign(x) * np.abs(np.sin(np.pi * x)) ** (3 / 7)) / 2,
    "III": lambda x: (1 + np.tanh(10 * x)) / 2,
    "IV": lambda x: (1 + np.tanh(20 * x)) / 2,
    "V": lambda x: (x > 0).astype(float),  # Riemann step: the left state for x < 0
}


@pytest.mark.parametrize("case", sorted(SPEC_PROFILES))
def test_bgk_initial_state_is_the_spec_formula(case):
    p = BGK(case, dtype=torch.float64)
    x = torch.linspace(-0.49, 0.49, 41, dtype=torch.float64)  # avoids x = 0 (the step's face)
    s = SPEC_PROFILES[case](x.numpy())
    want = [ql + (qr - ql) * s for ql, qr in zip((1.5, 0.0, 1.5), (0.625, 0.0, 0.75))]
    for got, q in zip(p.initial_state(x), want):
        np.testing.assert_allclose(got.numpy(), q, rtol=1e-14, atol=1e-15)
    rho, u, T = want
    v = p.v.numpy()
    f0 = rho[:, None] / np.sqrt(2 * np.pi * T[:, None]) * np.exp(-(v - u[:, None]) ** 2 / (2 * T[:, None]))
    np.testing.assert_allclose(p.initial_f(x[:, None], p.v[None, :]).numpy(), f0, rtol=1e-13, atol=1e-300)


def test_defaults_follow_the_spec():
    assert (BGK("I").kn, BGK("I").t_final) == (1e-3, 0.1)
    assert (BGK("IV").kn, BGK("V").kn, BGK("V").t_final) == (1.0, 1e-2, 0.05)
    assert BGK("iv", kn=0.1, t_final=0.05).kn == 0.1
    assert LinearTransport().t_range == (0.0, 0.1) and LinearTransport(t_final=1.0).t_final == 1.0


def test_transport_boundary_data():
    p = LinearTransport(dtype=torch.float64)
    x = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    v = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5], dtype=torch.float64)
    assert p.inflow_mask(x, v).tolist() == [True, False, False, True, False]
    assert p.boundary_f(torch.zeros(5, dtype=torch.float64), x, v).tolist() == [1, 0, 0, 0, 0]
    assert torch.all(p.initial_f(x[:, None], v[None, :]) == 0)
    rho = p.diffusion_limit(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0.1)
    assert abs(float(rho[0]) - 1) < 1e-12 and abs(float(rho[2])) < 1e-12 and 0 < float(rho[1]) < 0.5


def test_bgk_boundary_state():
    p = BGK("III", dtype=torch.float64)
    rho, u, T = p.boundary_state(torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert rho.tolist() == [1.5, 0.625] and u.tolist() == [0, 0] and T.tolist() == [1.5, 0.75]


# -- samplers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", [LinearTransport(t_final=0.3), BGK("V")])
def test_sampler_shapes_and_ranges(problem):
    g = torch.Generator().manual_seed(1)
    lo, hi = problem.x_range
    T = problem.t_final
    pts = problem.sample_interior(500, generator=g)
    assert pts.shape == (500, 2) and pts.dtype == torch.get_default_dtype()
    assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= T and pts[:, 0].max() > 0.9 * T
    assert pts[:, 1].min() >= lo and pts[:, 1].max() <= hi
    assert pts[:, 1].max() - pts[:, 1].min() > 0.9 * (hi - lo)
    b = problem.sample_boundary(7, generator=g)
    assert b.shape == (14, 2)
    assert torch.all(b[:7, 1] == lo) and torch.all(b[7:, 1] == hi)
    assert torch.all((b[:, 0] >= 0) & (b[:, 0] <= T))
    i = problem.sample_initial(9, generator=g)
    assert i.shape == (9, 2) and torch.all(i[:, 0] == 0)
    assert torch.all((i[:, 1] >= lo) & (i[:, 1] <= hi))


def test_sampler_tasks_and_reproducibility():
    p = LinearTransport()
    tasks = [1.0, 1e-2, 1e-4]
    a = p.sample_interior(5, generator=torch.Generator().manual_seed(3), eps=tasks)
    b = p.sample_interior(5, generator=torch.Generator().manual_seed(3), eps=tasks)
    c = p.sample_interior(5, generator=torch.Generator().manual_seed(4), eps=tasks)
    assert a.shape == (15, 3)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    # task-major segments with the same (t, x) points in each
    for k, eps in enumerate(tasks):
        seg = a[5 * k:5 * (k + 1)]
        assert torch.all(seg[:, 2] == torch.tensor(eps, dtype=a.dtype))
        torch.testing.assert_close(seg[:, :2], a[:5, :2])
    assert p.sample_boundary(2, eps=0.5).shape == (4, 3)
    with pytest.raises(ValueError, match="positive integer"):
        p.sample_interior(0)
    with pytest.raises(ValueError, match="eps / Kn"):
        p.sample_initial(3, eps=[1.0, -1.0])


# -- scoring -----------------------------------------------------------------------------------

def _interp_model(ref, fields, perturb=0.0):
    """A 'model' that interpolates the reference (exact on the reference's own grid)."""
    def model_fn(t, x, eps):
        assert torch.all(t == t[0])
        xs = x.detach().cpu().double().numpy()
        bump = 1 + perturb * np.sin(7 * xs)
        return {name: torch.as_tensor(np.interp(xs, ref.x, getattr(ref, attr)) * bump)
                for name, attr in fields.items()}
    return model_fn


def test_transport_evaluate():
    p = LinearTransport(dtype=torch.float64, reference_options=LT_OPTS)
    ref = p.reference(1e-2)
    assert ref.x.shape == (40,) and ref.rho.shape == (40,)
    assert p.reference(1e-2) is ref                       # kept in memory
    exact = p.evaluate(_interp_model(ref, {"rho": "rho"}), 1e-2)
    assert set(exact) == {"rho"} and exact["rho"] < 1e-14
    bad = p.evaluate(_interp_model(ref, {"rho": "rho"}, perturb=0.05), 1e-2)
    assert 5e-3 < bad["rho"] < 0.1
    # scoring a different eps against this eps's reference gives a visible error
    other = p.evaluate(_interp_model(ref, {"rho": "rho"}), 1.0)
    assert other["rho"] > 1e-2


def test_transport_reference_diffusion_limit_and_cache(tmp_path):
    p = LinearTransport(dtype=torch.float64, reference_options=LT_OPTS)
    lim = p.reference(1e-8)
    assert lim.method == "diffusion-limit" and lim.rho.shape == (40,)
    err = p.evaluate(lambda t, x, eps: {"rho": p.diffusion_limit(x, 0.1)}, 1e-8)
    assert err["rho"] < 1e-12
    p.reference(1e-3)
    assert len(list((tmp_path / "cache").glob("transport-*.npz"))) == 1
    # a fresh problem object finds it on disk
    q = LinearTransport(dtype=torch.float64, reference_options=LT_OPTS)
    np.testing.assert_array_equal(q.reference(1e-3).rho, p.reference(1e-3).rho)


def test_bgk_evaluate_conserved_and_primitive_outputs():
    p = BGK("IV", dtype=torch.float64, reference_options=BGK_OPTS)
    ref = p.reference()
    assert ref.density.shape == (60,) and ref.kn == 1.0
    cons = {"density": "density", "momentum": "momentum", "energy": "energy"}
    exact = p.evaluate(_interp_model(ref, cons))
    assert set(exact) == {"density", "momentum", "energy"}
    assert max(exact.values()) < 1e-14
    prim = p.evaluate(_interp_model(ref, {"rho": "density", "u": "velocity", "T": "temperature"}))
    assert max(prim.values()) < 1e-12
    bad = p.evaluate(_interp_model(ref, cons, perturb=0.02))
    assert min(bad.values()) > 1e-3
    assert p.evaluate(_interp_model(ref, cons), 0.1)["density"] > 1e-4   # other Kn


def test_evaluate_rejects_bad_model_output():
    p = LinearTransport(reference_options=LT_OPTS)
    with pytest.raises(KeyError, match="rho"):
        p.evaluate(lambda t, x, eps: {"density": x}, 1e-2)
    with pytest.raises(ValueError, match="values"):
        p.evaluate(lambda t, x, eps: {"rho": x[:3]}, 1e-2)
    with pytest.raises(TypeError, match="dict"):
        p.evaluate(lambda t, x, eps: x, 1e-2)
    b = BGK("IV", reference_options=BGK_OPTS)
    with pytest.raises(KeyError, match="density"):
        b.evaluate(lambda t, x, eps: {"rho": x})


def test_bad_problem_arguments():
    with pytest.raises(ValueError, match="unknown BGK case"):
        BGK("VII")
    with pytest.raises(ValueError, match="kn"):
        BGK("I", kn=-1.0)
    with pytest.raises(ValueError, match="t_final"):
        LinearTransport(t_final=0.0)
    with pytest.raises(ValueError, match="eps"):
        LinearTransport().reference(-1.0)


def test_relative_l2():
    assert relative_l2(torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert math.isclose(relative_l2(torch.tensor([0.0, 0.0]), np.array([3.0, 4.0])), 1.0)
