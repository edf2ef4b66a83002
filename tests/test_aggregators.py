"""Property tests of the aggregators (adapted from TorchJD's suite, plus what the spec adds)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_impls import hrgrad_pinv_ref

import hrgrad_ext
from hrgrad_ext import ConFIG, HRGrad, MGDA, Mean, PCGrad, Sum, UPGrad

ALL = [HRGrad(), HRGrad("min"), HRGrad("geometric"), ConFIG(), Sum(), Mean(), PCGrad(), UPGrad(), MGDA()]
NON_CONFLICTING = [HRGrad(), HRGrad("harmonic"), ConFIG(), UPGrad(), MGDA()]
EQUIANGULAR = [HRGrad(), HRGrad("max"), ConFIG()]
ids = [repr(a) for a in ALL]


def full_rank(K, n, seed, norm_ratio=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(K, n, generator=g, dtype=dtype)
    return J * torch.logspace(0, torch.log10(torch.tensor(norm_ratio)).item(), K, dtype=dtype)[:, None]


def cosines(J, update):
    return (J @ update) / (J.norm(dim=1) * update.norm())


shapes = st.tuples(st.integers(1, 8), st.integers(0, 10_000)).map(lambda t: (t[0], t[0] + 2 + t[1] % 40, t[1]))


@pytest.mark.parametrize("agg", ALL, ids=ids)
@pytest.mark.parametrize("scale", [0.0, 1e-10, 1e3, 1e10, 1e15])
def test_shape_and_finite_under_scaling(agg, scale):
    J = full_rank(5, 30, 1) * scale
    out = agg(J)
    assert out.shape == (30,)
    assert torch.isfinite(out).all()
    if scale == 0.0:
        assert torch.all(out == 0)


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


@pytest.mark.parametrize("agg", [a for a in ALL if not isinstance(a, PCGrad)], ids=[repr(a) for a in ALL if not isinstance(a, PCGrad)])
def test_permutation_invariance(agg):
    J = full_rank(6, 40, 3, 10.0)
    perm = torch.randperm(6)
    torch.testing.assert_close(agg(J[perm]), agg(J), rtol=1e-7, atol=1e-9)


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


@pytest.mark.parametrize("seed", range(8))
def test_more_tasks_than_parameters_hrgrad_never_conflicts(seed):
    # K > n: C is singular and C^+ 1 may conflict; HRGrad must fall back to a safe update.
    # The dual cone of 6 random vectors in R^3 is often {0}: then only a round-off-sized
    # update is safe, so the tolerance is relative to the gradients' scale.
    J = full_rank(6, 3, seed)
    out = HRGrad()(J)
    assert torch.isfinite(out).all()
    scale = J.norm(dim=1).max()
    assert (J @ out >= -1e-9 * J.norm(dim=1) * scale).all()


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
    torch.testing.assert_close(agg(J.float()).double(), agg(J), rtol=2e-4, atol=2e-4)


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
    torch.testing.assert_close(agg(J.cuda()).cpu(), agg(J), rtol=1e-4, atol=1e-5)


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
    torch.testing.assert_close(HRGrad(length_model)(J), expected, rtol=1e-4, atol=1e-5)
