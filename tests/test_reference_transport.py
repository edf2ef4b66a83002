"""Checks of the linear-transport reference solvers: the diffusion series, the asymptotic limit,
agreement of independent schemes, convergence order, the first-collision split, positivity,
argument checking and caching.  Coarse grids keep it fast."""

import math

import numpy as np
import pytest

from hrgrad_ext.reference import (TransportResult, diffusion_limit, solve_transport,
                                  solve_transport_explicit, solve_transport_ld)
from hrgrad_ext.reference import transport as tr_mod


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HRGRAD_EXT_CACHE", str(tmp_path / "cache"))


def _rel(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2) / np.sum(b ** 2)))


def _restrict(a, n):
    return a.reshape(a.shape[:-1] + (n, -1)).mean(-1)


# -- the diffusion series ----------------------------------------------------------------------

def test_diffusion_limit_solves_the_heat_problem():
    x = np.linspace(0.05, 0.95, 19)
    t, h, k = 0.05, 1e-5, 1e-3
    rho = diffusion_limit(x, t)
    rho_t = (diffusion_limit(x, t + h) - diffusion_limit(x, t - h)) / (2 * h)
    rho_xx = (diffusion_limit(x + k, t) - 2 * rho + diffusion_limit(x - k, t)) / k ** 2
    # (the second difference has a truncation error ~ k^2 rho_xxxx / 12 ~ 3e-5 here)
    np.testing.assert_allclose(rho_t, rho_xx / 3.0, rtol=0, atol=1e-4)
    assert np.abs(rho_xx).max() > 1.0
    # boundary values and the (zero) initial value inside
    np.testing.assert_allclose(diffusion_limit(np.array([0.0, 1.0]), 0.02), [1.0, 0.0], atol=1e-12)
    assert np.abs(diffusion_limit(x, 0.0)).max() < 1e-3
    # steady state 1 - x, and the time axis for a sequence of times
    np.testing.assert_allclose(diffusion_limit(x, 50.0), 1.0 - x, atol=1e-14)
    assert diffusion_limit(x, [0.01, 0.02]).shape == (2, x.size)
    with pytest.raises(ValueError, match="t must be"):
        diffusion_limit(x, -1.0)


def test_small_eps_matches_diffusion_limit():
    # eps = 1e-6: the boundary layers are O(eps), so what remains is the discretisation error,
    # which must shrink under refinement (second order in the thick-diffusion limit).
    errs = []
    for nx in (25, 50, 100):
        res = solve_transport(1e-6, 0.1, nx=nx, cache=False, store_f=False)
        errs.append(np.abs(res.rho - diffusion_limit(res.x, 0.1)).max())
    assert errs[-1] < 2e-3, errs
    assert errs[0] > errs[1] > errs[2], errs
    # eps = 1e-3: the O(eps) boundary-layer/initial-layer correction is visible but small
    res = solve_transport(1e-3, 0.1, nx=50, cache=False, store_f=False)
    gap = np.abs(res.rho - diffusion_limit(res.x, 0.1)).max()
    assert 1e-4 < gap < 2e-2


# -- independent schemes -----------------------------------------------------------------------

@pytest.mark.parametrize("eps,t_final,nx,tol", [(1.0, 0.1, 60, 2e-3), (1e-3, 0.1, 60, 5e-4)])
def test_two_independent_schemes_agree(eps, t_final, nx, tol):
    dd = solve_transport(eps, t_final, nx=nx, nv=16, cache=False, store_f=False)
    ld = solve_transport_ld(eps, t_final, nx=nx, nv=16)
    assert dd.method == "dd-bdf2" and ld.method == "ld-sdirk2"
    assert _rel(dd.rho, ld.rho) < tol
    # and the gap closes under refinement (both converge to the same solution)
    dd2 = solve_transport(eps, t_final, nx=2 * nx, nv=16, cache=False, store_f=False)
    ld2 = solve_transport_ld(eps, t_final, nx=2 * nx, nv=16)
    assert _rel(dd2.rho, ld2.rho) < _rel(dd.rho, ld.rho)


def test_explicit_scheme_converges_to_implicit_at_eps_one():
    # The explicit MUSCL scheme resolves the uncollided fronts on the grid with plain S_N; the
    # implicit LD scheme run the same way (no first-collision split, same ordinates) must
    # approach it under refinement.  L1 because the fronts are discontinuities.
    def gap(nx):
        ex = solve_transport_explicit(1.0, 0.3, nx=nx, nv=8)
        ld = solve_transport_ld(1.0, 0.3, nx=nx, nv=8, first_collision=False, dt=0.5 / nx)
        return np.abs(ex.rho - ld.rho).sum() / np.abs(ld.rho).sum()

    g1, g2 = gap(100), gap(200)
    assert g2 < 0.85 * g1 and g2 < 0.03, (g1, g2)


def test_first_collision_removes_ray_effects():
    # At eps = 1 the plain S_N density depends strongly on the number of ordinates (ray effects
    # of the uncollided fronts); with the exact uncollided part it barely does.
    def run(nv, fc):
        return solve_transport(1.0, 0.1, nx=60, nv=nv, first_collision=fc, cache=False,
                               store_f=False).rho
    plain = _rel(run(8, False), run(16, False))
    split = _rel(run(8, True), run(16, True))
    assert plain > 1e-2
    assert split < plain / 5


def test_uncollided_formulas_agree():
    # exact cell averages vs Gauss quadrature of the pointwise closed form vs a fine S_N sum
    edges = np.linspace(0.0, 1.0, 21)
    cells = tr_mod.uncollided_rho_cells(0.3, 1.0, edges)
    gx, gw = np.polynomial.legendre.leggauss(40)
    pts = np.array([0.5 * gw @ tr_mod.uncollided_rho_points(0.3, 1.0, 0.5 * (a + b + (b - a) * gx))
                    for a, b in zip(edges[:-1], edges[1:])])
    np.testing.assert_allclose(cells, pts, atol=2e-6)
    mu, w = np.polynomial.legendre.leggauss(512)
    sn = tr_mod.uncollided_psi_cells(0.3, 1.0, edges, mu) @ (0.5 * w)
    np.testing.assert_allclose(cells, sn, atol=5e-5)
    assert cells[0] > 0.3 and cells[-1] == 0.0      # front at x = 0.3 / eps


# -- convergence -------------------------------------------------------------------------------

def test_observed_order_diffusive_regime():
    runs = [solve_transport(1e-3, 0.05, nx=nx, cache=False, store_f=False) for nx in (25, 50, 100)]
    d = [_rel(a.rho, _restrict(b.rho, a.nx)) for a, b in zip(runs[:-1], runs[1:])]
    order = math.log2(d[0] / d[1])
    assert order > 1.7, (order, d)


def test_time_step_convergence_bdf2():
    ref = solve_transport(1e-2, 0.05, nx=40, dt=1.25e-4, cache=False, store_f=False)
    e1 = _rel(solve_transport(1e-2, 0.05, nx=40, dt=2e-3, cache=False, store_f=False).rho, ref.rho)
    e2 = _rel(solve_transport(1e-2, 0.05, nx=40, dt=1e-3, cache=False, store_f=False).rho, ref.rho)
    assert math.log2(e1 / e2) > 1.5, (e1, e2)


# -- positivity / maximum principle ------------------------------------------------------------
# BGK keeps f >= 0 exactly.  Diamond differencing with BDF2 is not positivity preserving: small
# undershoots appear where the exact solution is ~0 (ahead of a front or a diffusion front).
# Measured: <= 7.5e-4 at t = 0.01 for eps = 0.1 (kinks of the collided flux), <= 1.5e-4 at eps = 1,
# <= 3e-5 in the diffusive regime; these bounds are asserted with a little margin.

@pytest.mark.parametrize("eps,bound", [(1.0, 3e-4), (1e-1, 1.5e-3), (1e-2, 1e-4), (1e-4, 1e-4)])
def test_density_bounds(eps, bound):
    res = solve_transport(eps, [0.01, 0.1], nx=100, cache=False)
    assert res.rho.min() > -bound
    assert res.rho.max() <= 1.0
    assert res.rho[-1].max() > 0.4            # not trivially satisfied
    assert res.f.shape[:2] == (2, 100)


# -- interface ---------------------------------------------------------------------------------

def test_result_shapes():
    res = solve_transport(1e-2, [0.0, 0.05, 0.1], nx=20, nv=8, cache=False)
    assert res.x.shape == (20,) and res.rho.shape == (3, 20) and res.f.shape == (3, 20, 8)
    np.testing.assert_allclose(res.x, (np.arange(20) + 0.5) / 20)
    assert np.all(res.rho[0] == 0.0)
    one = solve_transport(1e-2, 0.1, nx=20, nv=8, cache=False)
    np.testing.assert_allclose(one.rho, res.rho[-1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(res.f[-1] @ (0.5 * res.w), res.rho[-1], atol=1e-14)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps=-1e-3), "eps"),
    (dict(eps=0.0), "eps"),
    (dict(eps=1e-9), "diffusion_limit"),
    (dict(eps=1e-3, nx=3), "nx"),
    (dict(eps=1e-3, nv=7), "even"),
    (dict(eps=1e-3, dt=-1.0), "dt"),
    (dict(eps=1e-3, t_final=-0.1), "t_final"),
    (dict(eps=1e-3, t_final=[0.1, 0.0]), "increasing"),
    (dict(eps=1e-3, first_collision=True), "first_collision"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_transport(**{"nx": 20, "cache": False, **kwargs})


def test_bad_arguments_check_schemes():
    with pytest.raises(ValueError, match="nx"):
        solve_transport_ld(1.0, 0.1, nx=2)
    with pytest.raises(ValueError, match="cfl"):
        solve_transport_explicit(1.0, 0.1, cfl=2.0)


def test_cache_round_trip(tmp_path, monkeypatch):
    first = solve_transport(1e-2, 0.02, nx=20, nv=8)
    assert len(list((tmp_path / "cache").glob("transport-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(tr_mod, "_run", boom)
    second = solve_transport(1e-2, 0.02, nx=20, nv=8)
    assert isinstance(second, TransportResult)
    for name in ("x", "t", "rho", "f", "mu", "w"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert (second.eps, second.nx, second.nv, second.method) == (1e-2, 20, 8, "dd-bdf2")
    with pytest.raises(AssertionError, match="recomputed"):
        solve_transport(2e-2, 0.02, nx=20, nv=8)


def test_save_and_load(tmp_path):
    res = solve_transport(1e-2, 0.02, nx=20, nv=8, cache=False)
    path = res.save(tmp_path / "ref")
    assert path.suffix == ".npz"
    back = TransportResult.load(path)
    np.testing.assert_array_equal(back.rho, res.rho)
    assert back.method == res.method and back.steps == res.steps


def test_cli_transport(tmp_path, capsys):
    import argparse

    from hrgrad_ext.reference import cli

    # wired into a parent parser the way the console script does it
    parser = argparse.ArgumentParser(prog="hrgrad-ext")
    cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "t.npz"
    args = parser.parse_args(["reference", "transport", "--eps", "1e-2", "--nx", "20",
                              "--out", str(out), "--plot", str(tmp_path / "t.png")])
    assert args.func(args) == 0
    res = TransportResult.load(out)
    assert res.eps == 1e-2 and res.rho.shape == (20,)
    assert (tmp_path / "t.png").exists()
    assert cli.main(["transport", "--eps", "-1", "--out", str(out)]) == 2
    assert "eps" in capsys.readouterr().err
