"""Behaviour of the individual aggregators: published values, HRGrad's equal angles and its
exact fallback, the registry, seeding, CUDA. The properties every aggregator is checked for
(non-conflicting, permutation-invariant, ...) are in test_aggregator_properties.py."""

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_impls import dual_cone_projection_ref, hrgrad_pinv_ref, min_norm_hull_ref

import hrgrad_ext
from hrgrad_ext import ConFIG, HRGrad, MGDA, Mean, PCGrad, Sum, UPGrad
from hrgrad_ext.aggregators import AGGREGATORS, Aggregator, make_aggregator, register
from hrgrad_ext.ops import Status, hrgrad_weights_ex

ALL = [HRGrad(), HRGrad("min"), HRGrad("geometric"), ConFIG(), Sum(), Mean(), PCGrad(), UPGrad(), MGDA()]
NON_CONFLICTING = [HRGrad(), HRGrad("harmonic"), ConFIG(), UPGrad(), MGDA()]
EQUIANGULAR = [HRGrad(), HRGrad("max"), ConFIG()]
ids = [repr(a) for a in ALL]


def twin(agg):
    """A fresh copy of a seeded PCGrad (its generator advances with every call); others as is."""
    return PCGrad(seed=agg.seed) if isinstance(agg, PCGrad) else agg


def full_rank(K, n, seed, norm_ratio=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(K, n, generator=g, dtype=dtype)
    return J * torch.logspace(0, torch.log10(torch.tensor(norm_ratio)).item(), K, dtype=dtype)[:, None]


def cosines(J, update):
    return (J @ update) / (J.norm(dim=1) * update.norm())


shapes = st.tuples(st.integers(1, 8), st.integers(0, 10_000)).map(lambda t: (t[0], t[0] + 2 + t[1] % 40, t[1]))


@pytest.mark.parametrize("agg", ALL, ids=ids)
@settings(max_examples=10, deadline=None)
@given(shape=shapes, exponent=st.integers(-10, 15), float32=st.booleans())
def test_shape_and_finite_under_scaling(agg, shape, exponent, float32):
    # Under scaling by 10^exponent the update keeps J's shape and dtype, stays finite, and is the
    # unscaled update times the same factor (every aggregator is positively homogeneous); at
    # scale 0 it is exactly 0. The reference uses the same rounded numbers in float64.
    K, n, seed = shape
    dtype = torch.float32 if float32 else torch.float64
    J = (full_rank(K, n, seed, 10.0) * 10.0**exponent).to(dtype)
    out = twin(agg)(J)
    assert out.shape == (n,) and out.dtype == dtype and torch.isfinite(out).all()
    expected = twin(agg)(J.double() / 10.0**exponent) * 10.0**exponent
    atol = (1e-9 if dtype == torch.float64 else 2e-5) * float(J.double().norm(dim=1).sum())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    assert torch.all(agg(J * 0) == 0)


@pytest.mark.parametrize("agg", NON_CONFLICTING, ids=[repr(a) for a in NON_CONFLICTING])
@pytest.mark.parametrize("ratio", [1.0, 10.0, 100.0, 1000.0])
@settings(max_examples=15, deadline=None)
@given(shape=shapes)
def test_non_conflicting_on_full_rank(agg, ratio, shape):
    K, n, seed = shape
    J = full_rank(K, n, seed, ratio)
    out = agg(J)
    assert (J @ out >= -1e-9 * J.norm(dim=1) * out.norm()).all()


@pytest.mark.parametrize("agg", EQUIANGULAR, ids=[repr(a) for a in EQUIANGULAR])
@settings(max_examples=20, deadline=None)
@given(shape=shapes)
def test_equal_cosines(agg, shape):
    K, n, seed = shape
    J = full_rank(K, n, seed, 100.0)
    cos = cosines(J, agg(J))
    torch.testing.assert_close(cos, cos.mean().expand_as(cos), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("agg", EQUIANGULAR, ids=[repr(a) for a in EQUIANGULAR])
def test_direction_invariant_to_positive_row_scaling(agg):
    J = full_rank(4, 25, 7)
    scaled = J * torch.tensor([3.0, 0.1, 50.0, 1.0], dtype=torch.float64)[:, None]
    a, b = agg(J), agg(scaled)
    torch.testing.assert_close(a / a.norm(), b / b.norm(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("agg", [HRGrad(), ConFIG(), Sum(), Mean(), PCGrad(), UPGrad(), MGDA()], ids=str)
def test_single_task_gives_its_gradient(agg):
    J = torch.randn(1, 17, dtype=torch.float64)
    torch.testing.assert_close(agg(J), J[0], rtol=1e-12, atol=1e-12)


def test_hrgrad_equals_config_and_pinv_reference():
    for seed in range(5):
        J = full_rank(6, 50, seed, 1000.0)
        torch.testing.assert_close(HRGrad()(J), ConFIG()(J), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(HRGrad()(J), hrgrad_pinv_ref(J), rtol=1e-9, atol=1e-9)


deficient = st.tuples(st.integers(2, 9), st.integers(1, 9), st.integers(0, 10_000))


@settings(max_examples=60, deadline=None)
@given(shape=deficient)
def test_fallback_is_the_exact_dual_cone_projection(shape):
    # K tasks in a space of dimension r < K: C is singular and C^+ 1 may conflict. Then the
    # direction must be the projection of the mean unit gradient onto {x : J x >= 0}, checked
    # against scipy's NNLS (an independent Lawson-Hanson), and ZERO_UPDATE exactly when it is 0.
    K, r, seed = shape
    r = min(r, K - 1)
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(K, r, generator=g, dtype=torch.float64) @ torch.randn(r, r + 3, generator=g, dtype=torch.float64)
    update, _, status = hrgrad_ext.hrgrad_ex(J)
    if not int(status) & Status.FALLBACK:
        return
    units = (J / J.norm(dim=1, keepdim=True)).numpy()
    mu, residual = scipy.optimize.nnls(units.T, -units.sum(0), maxiter=50 * K)
    projection = torch.from_numpy(units.sum(0) + units.T @ mu)
    if residual <= 1e-6 * (K + mu.sum()):
        assert int(status) & Status.ZERO_UPDATE and torch.all(update == 0)
    else:
        assert not int(status) & Status.ZERO_UPDATE
        torch.testing.assert_close(update / update.norm(), projection / projection.norm(), rtol=0, atol=1e-8)
        assert (J @ update >= -1e-10 * J.norm(dim=1) * update.norm()).all()


def test_issue_17_random_rank_deficient_task_sets():
    # The reproduction of issue 17: J = A B with A K x r, B r x n, seeds 0-199. Before the exact
    # solver, 45 fallbacks conflicted (cosine down to -0.45) and 45 changed with the task order.
    fallbacks = 0
    for K, n, r in [(9, 11, 5), (20, 10, 10), (20, 10, 5), (6, 4, 4), (5, 50, 3)]:
        A, B = [], []
        for seed in range(200):
            g = torch.Generator().manual_seed(seed)
            A.append(torch.randn(K, r, generator=g, dtype=torch.float64))
            B.append(torch.randn(r, n, generator=g, dtype=torch.float64))
        J = torch.stack(A) @ torch.stack(B)  # one batched product: 200 small ones cost more
        w, status = hrgrad_weights_ex(J @ J.transpose(1, 2))
        perm = torch.argsort(torch.rand(200, K, generator=torch.Generator().manual_seed(K)), dim=1)
        Jp = torch.gather(J, 1, perm[:, :, None].expand_as(J))
        wp, status_p = hrgrad_weights_ex(Jp @ Jp.transpose(1, 2))
        wp = torch.zeros_like(wp).scatter_(1, perm, wp)
        u, up = torch.einsum("bk,bkn->bn", w, J), torch.einsum("bk,bkn->bn", wp, J)
        cos = torch.einsum("bkn,bn->bk", J, u) / (J.norm(dim=2) * u.norm(dim=1, keepdim=True)).clamp_min(1e-300)
        assert (cos >= -1e-10).all()
        assert torch.equal(status, status_p)
        torch.testing.assert_close(up, u, rtol=0, atol=1e-10 * float((w.abs() * J.norm(dim=2)).sum(1).max()))
        fallbacks += int(((status & Status.FALLBACK) != 0).sum())
    assert fallbacks > 100


@pytest.mark.parametrize("agg", [HRGrad(), UPGrad(), MGDA()], ids=str)
@pytest.mark.parametrize("seed", range(5))
def test_more_tasks_than_parameters_with_a_common_descent_direction(agg, seed):
    J = full_rank(6, 3, seed)
    J[:, 0] = J[:, 0].abs() + 0.5  # every task improves along +x: the dual cone is not {0}
    out = agg(J)
    assert out.norm() > 1e-3
    assert (J @ out >= -1e-7 * J.norm(dim=1) * out.norm()).all()


def test_duplicated_tasks_keep_equal_angles():
    J = full_rank(3, 20, 0)
    J = torch.cat([J, J[:1]])  # task 0 twice: rank 3 with K = 4, 1 stays in the range of C
    out, _, status = hrgrad_ext.hrgrad_ex(J)
    assert int(status) & hrgrad_ext.ops.Status.RANK_DEFICIENT
    assert not int(status) & hrgrad_ext.ops.Status.FALLBACK
    cos = cosines(J, out)
    torch.testing.assert_close(cos, cos.mean().expand_as(cos), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("agg", ALL, ids=ids)
def test_float32_matches_float64(agg):
    J = full_rank(4, 64, 5, 10.0)
    torch.testing.assert_close(twin(agg)(J.float()).double(), twin(agg)(J), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("agg", ALL, ids=ids)
def test_weights_reproduce_the_update(agg):
    J = full_rank(5, 40, 2, 10.0)
    if isinstance(agg, PCGrad):  # random projection order: two twins with the same seed
        w, expected = PCGrad(seed=1).weights(J), PCGrad(seed=1)(J)
    else:
        w, expected = agg.weights(J), agg(J)
    torch.testing.assert_close(J.T @ w, expected, rtol=1e-8, atol=1e-8)


def test_conflict_shrinks_the_step():
    # the more the two tasks conflict, the shorter the HRGrad step (unit gradients)
    lengths = []
    for angle in [0.2, 1.0, 2.0, 2.8]:
        J = torch.tensor([[1.0, 0.0], [torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))]], dtype=torch.float64)
        lengths.append(HRGrad()(J).norm().item())
    assert lengths == sorted(lengths, reverse=True)


def test_upgrad_and_mgda_published_example():
    # J = [[-4, 1, 1], [6, 1, 1]]: MGDA's minimum-norm point of the segment is (0, 1, 1); UPGrad
    # is the mean of the two exact projections (TorchJD, whose solver is regularised by 1e-4,
    # publishes [0.2929, 1.9004, 1.9004]).
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(MGDA()(J), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(MGDA()(J), min_norm_hull_ref(J), rtol=0, atol=1e-14)
    expected = (dual_cone_projection_ref(J, J[0]) + dual_cone_projection_ref(J, J[1])) / 2
    torch.testing.assert_close(UPGrad()(J), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(UPGrad()(J), torch.tensor([0.2924, 1.9006, 1.9006], dtype=torch.float64), rtol=0, atol=1e-4)


def test_solver_aggregators_report_status_and_reject_nan():
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    for agg in (HRGrad(), UPGrad(), MGDA()):
        assert torch.all(agg(J) == 0)
        assert int(agg.last_status) & Status.ZERO_UPDATE
        with pytest.raises(ValueError, match=f"{type(agg).__name__}: the task gradients contain NaN"):
            agg(torch.tensor([[1.0, float("nan")]]))
        # without the check: NaN weights, no host synchronisation
        assert type(agg)(check_finite=False).weights(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])).isnan().all()


def test_pcgrad_is_seeded():
    J = torch.tensor([[3.0, -1.0], [-2.0, 2.0], [0.0, -2.0], [1.0, 1.0]], dtype=torch.float64)
    a, b = PCGrad(seed=3), PCGrad(seed=3)
    first = [a(J) for _ in range(5)]
    assert all(torch.equal(x, b(J)) for x in first)  # the same seed, the same sequence
    assert any(not torch.equal(first[0], x) for x in first[1:])  # a fresh order at every call
    state = a.generator.get_state()
    nxt = a(J)
    a.generator.set_state(state)  # what a training checkpoint restores
    assert torch.equal(a(J), nxt)
    assert any(not torch.equal(PCGrad(seed=s)(J), first[0]) for s in range(4, 8))


def test_registry_and_make_aggregator():
    assert tuple(AGGREGATORS) == hrgrad_ext.aggregators.METHODS
    assert make_aggregator("pcgrad", seed=5).seed == 5
    assert make_aggregator("pcgrad", {"seed": 7}, seed=5).seed == 7
    assert make_aggregator("hrgrad", {"length_model": "min"}).length_model == "min"
    assert make_aggregator("upgrad", {"rcond": 1e-8}).rcond == 1e-8
    with pytest.raises(ValueError, match="unknown method 'nash'"):
        make_aggregator("nash")
    with pytest.raises(ValueError, match="aggregator options for 'sum'"):
        make_aggregator("sum", {"length_model": "min"})
    with pytest.raises(ValueError, match="already registered"):
        register("sum")(Sum)

    @register("test-constant")
    class Constant(Aggregator):
        def weights(self, J):
            return torch.ones(J.shape[0], dtype=torch.float64)

    try:
        assert isinstance(make_aggregator("test-constant"), Constant)
    finally:
        del AGGREGATORS["test-constant"]


def test_bad_aggregator_inputs():
    with pytest.raises(ValueError, match="matrix"):
        HRGrad()(torch.randn(3))
    with pytest.raises(ValueError, match="K >= 1"):
        Sum()(torch.randn(0, 3))
    with pytest.raises(ValueError, match="length_model"):
        HRGrad("longest")


@pytest.mark.cuda
@pytest.mark.parametrize("agg", ALL, ids=ids)
def test_cuda_matches_cpu(agg):
    J = full_rank(5, 1000, 4, 10.0).float()
    torch.testing.assert_close(twin(agg)(J.cuda()).cpu(), twin(agg)(J), rtol=1e-4, atol=1e-5)
    # K > n: HRGrad's fallback, the cone solves of UPGrad and MGDA; flags exactly as on the CPU
    J = full_rank(9, 4, 5, 10.0)
    a, b = twin(agg), twin(agg)
    torch.testing.assert_close(a(J.cuda()).cpu(), b(J), rtol=1e-9, atol=1e-9 * float(J.norm(dim=1).sum()))
    if hasattr(a, "last_status"):
        assert torch.equal(a.last_status.cpu(), b.last_status)


@pytest.mark.parametrize(
    "length_model,cf_name",
    [("projection", "ProjectionLength"), ("min", "TrackMinimum"), ("max", "TrackMaximum"),
     ("harmonic", "TrackHarmonicAverage"), ("arithmetic", "TrackArithmeticAverage"), ("geometric", "TrackGeometricAverage")],
)
def test_matches_conflictfree_package(length_model, cf_name):
    conflictfree = pytest.importorskip("conflictfree")
    from conflictfree.grad_operator import ConFIG_update
    import conflictfree.length_model as lm

    J = full_rank(5, 200, 11, 30.0, dtype=torch.float32)  # conflictfree works in float32 only
    expected = ConFIG_update(J, length_model=getattr(lm, cf_name)())
    # conflictfree's float32 pseudo-inverse of a condition-30 J has an absolute error that
    # scales with the update (4.7e-5 against float64 at |update| = 233) and differs between
    # BLAS builds (torch 2.13 CPU and 2.14 CUDA wheels: scripts/install_test.sh).
    atol = 1e-6 * float(expected.abs().max())
    torch.testing.assert_close(HRGrad(length_model)(J), expected, rtol=1e-4, atol=atol)
