"""The cone ops (dual_cone_weights, mgda_weights) against plain-PyTorch float64 references, their
flags, validation, opcheck, compile, and CUDA against CPU."""

import pytest
import torch
from reference_impls import dual_cone_projection_ref, min_norm_hull_ref

import hrgrad_ext
from hrgrad_ext import ops
from hrgrad_ext.ops import Status, dual_cone_weights, mgda_weights

OPS = torch.ops.hrgrad_ext
f64 = torch.float64


def jacobian(kind, K, n, seed, dtype=f64):
    """Random task gradients: 'full' (rank K <= n), 'deficient' (rank K // 2 < K <= n),
    'wide' (K > n), 'imbalanced' (norms spread over three decades)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "deficient":
        r = max(1, K // 2)
        return (torch.randn(K, r, generator=g, dtype=f64) @ torch.randn(r, n, generator=g, dtype=f64)).to(dtype)
    J = torch.randn(K, n, generator=g, dtype=f64)
    if kind == "imbalanced":
        J = J * torch.logspace(0, 3, K, dtype=f64)[:, None]
    return J.to(dtype)


CASES = [(kind, K, n, seed) for seed in range(3) for kind, K, n in
         [("full", 4, 9), ("deficient", 6, 8), ("wide", 6, 3), ("wide", 7, 2), ("imbalanced", 5, 7), ("deficient", 5, 40)]]


# ------------------------------------------------------------------ against the references
@pytest.mark.parametrize("kind,K,n,seed", CASES)
def test_dual_cone_weights_match_projection_reference(kind, K, n, seed):
    # tolerance: both are exact; the reference's pseudo-inverses and ours agree to ~1e-12
    J = jacobian(kind, K, n, seed)
    U = torch.cat([torch.eye(K, dtype=f64), torch.rand(2, K, dtype=f64, generator=torch.Generator().manual_seed(seed))])
    W, status = dual_cone_weights(J @ J.T, U)
    assert W.shape == U.shape and status.shape == (K + 2,)
    for t in range(U.shape[0]):
        expected = dual_cone_projection_ref(J, J.T @ U[t])
        scale = (U[t].abs() * J.norm(dim=1)).sum()
        torch.testing.assert_close(J.T @ W[t], expected, rtol=0, atol=1e-10 * scale)
        assert bool(status[t] & Status.ZERO_UPDATE) == bool(expected.norm() <= 1e-6 * scale)
        # the weights have the documented form u + D^-1 mu with mu >= 0 (unless the projection is 0)
        if not status[t] & Status.ZERO_UPDATE:
            assert (W[t] - U[t] >= -1e-12 * W[t].abs().max()).all()


@pytest.mark.parametrize("kind,K,n,seed", CASES)
def test_mgda_weights_match_min_norm_reference(kind, K, n, seed):
    J = jacobian(kind, K, n, seed)
    w, status = mgda_weights(J @ J.T)
    expected = min_norm_hull_ref(J)
    scale = J.norm(dim=1).max()
    if expected.norm() <= 1e-6 * scale:
        assert status & Status.ZERO_UPDATE and torch.all(w == 0)
    else:
        assert not status & Status.ZERO_UPDATE
        assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12
        torch.testing.assert_close(J.T @ w, expected, rtol=0, atol=1e-10 * scale)


def test_upgrad_is_the_mean_of_the_projections():
    J = jacobian("wide", 6, 4, 1)
    J[:, 0] = J[:, 0].abs() + 0.5  # a common descent direction: no projection is trivial
    expected = torch.stack([dual_cone_projection_ref(J, g) for g in J]).mean(0)
    torch.testing.assert_close(hrgrad_ext.UPGrad()(J), expected, rtol=1e-10, atol=1e-12)


def test_scale_free():
    # G -> s^2 G (every gradient times s) leaves the weights unchanged, down to 1e-10 and up to 1e15
    J = jacobian("wide", 6, 3, 4)
    G = J @ J.T
    U = torch.eye(6, dtype=f64)
    W, st = dual_cone_weights(G, U)
    w, s = mgda_weights(G)
    for scale in (1e-10, 1e15):
        Ws, sts = dual_cone_weights(G * scale**2, U)
        torch.testing.assert_close(Ws, W, rtol=1e-9, atol=1e-12)
        assert torch.equal(sts, st)
        ws, ss = mgda_weights(G * scale**2)
        torch.testing.assert_close(ws, w, rtol=1e-9, atol=1e-12)
        assert torch.equal(ss, s)


def test_batched_equals_per_entry_and_float32():
    J = torch.stack([jacobian(k, 5, 4, s) for k, s in [("wide", 0), ("full", 1), ("deficient", 2)]])
    G = J @ J.transpose(1, 2)
    U = torch.rand(3, 4, 5, dtype=f64, generator=torch.Generator().manual_seed(0))
    W, status = dual_cone_weights(G, U)
    w, s = mgda_weights(G)
    assert W.shape == (3, 4, 5) and status.shape == (3, 4) and w.shape == (3, 5) and s.shape == (3,)
    for b in range(3):
        Wb, sb = dual_cone_weights(G[b], U[b])
        torch.testing.assert_close(W[b], Wb, rtol=0, atol=0)
        assert torch.equal(status[b], sb)
        torch.testing.assert_close(w[b], mgda_weights(G[b])[0], rtol=0, atol=0)
    # float32 G: the same solve in float64 on the float32 numbers, weights returned in float32
    W32, _ = dual_cone_weights(G.float(), U.float())
    w32, _ = mgda_weights(G.float())
    assert W32.dtype == torch.float32 and w32.dtype == torch.float32
    torch.testing.assert_close(W32.double(), W, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w32.double(), w, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ flags and edge cases
def test_status_flags():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=f64)
    W, status = dual_cone_weights(J @ J.T, torch.eye(4, dtype=f64))
    # task 1 is zero (no constraint; its own projection is 0 and keeps its weight); 0 and 2 are
    # opposite: their projections vanish
    assert [int(s) for s in status] == [1 | 2 | 8, 1 | 2 | 8, 1 | 2 | 8, 1 | 2]
    assert torch.all(W[0] == 0) and torch.all(W[2] == 0) and W[1, 1] == 1.0
    torch.testing.assert_close(J.T @ W[3], torch.tensor([0.0, 1.0], dtype=f64))
    # MGDA: the hull of +e1, -e1, e2 contains 0, although e2 conflicts with nothing
    w, s = mgda_weights(J[[0, 2, 3]] @ J[[0, 2, 3]].T)
    assert int(s) & Status.ZERO_UPDATE and torch.all(w == 0)
    # a zero gradient puts 0 in the hull
    w, s = mgda_weights(J @ J.T)
    assert int(s) & Status.ZERO_UPDATE
    w, s = mgda_weights(torch.zeros(3, 3, dtype=f64))
    assert int(s) == Status.ZERO_UPDATE and torch.all(w == 0)
    nan = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=f64)
    W, status = dual_cone_weights(nan, torch.eye(2, dtype=f64))
    assert torch.isnan(W).all() and (status & Status.NON_FINITE).all()
    w, s = mgda_weights(nan)
    assert torch.isnan(w).all() and int(s) == Status.NON_FINITE


def test_empty_batch_and_no_targets():
    W, status = dual_cone_weights(torch.zeros(0, 3, 3, dtype=f64), torch.zeros(0, 2, 3, dtype=f64))
    assert W.shape == (0, 2, 3) and status.shape == (0, 2)
    W, status = dual_cone_weights(torch.eye(3, dtype=f64), torch.zeros(0, 3, dtype=f64))
    assert W.shape == (0, 3) and status.shape == (0,)
    w, s = mgda_weights(torch.zeros(0, 4, 4))
    assert w.shape == (0, 4) and s.shape == (0,)


def test_bad_inputs():
    G = torch.eye(3, dtype=f64)
    with pytest.raises(TypeError, match="G must be a torch.Tensor"):
        dual_cone_weights([[1.0]], G)
    with pytest.raises(TypeError, match="float32 or float64"):
        mgda_weights(G.half())
    with pytest.raises(ValueError, match="square"):
        mgda_weights(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="K = 0"):
        mgda_weights(torch.zeros(0, 0))
    with pytest.raises(TypeError, match="U has dtype"):
        dual_cone_weights(G, G.float())
    with pytest.raises(ValueError, match="U must be"):
        dual_cone_weights(G, torch.eye(4, dtype=f64))
    with pytest.raises(ValueError, match="U must be"):
        dual_cone_weights(G.expand(2, 3, 3), torch.eye(3, dtype=f64).expand(3, 3, 3))
    with pytest.raises(ValueError, match="rcond"):
        mgda_weights(G, rcond=1.5)
    # direct op calls (no Python wrapper) are checked by the kernels
    with pytest.raises(RuntimeError, match="dual_cone_weights: U has 4 weights per target"):
        OPS.dual_cone_weights(G, torch.eye(4, dtype=f64))
    with pytest.raises(RuntimeError, match="mgda_weights: G must be square"):
        OPS.mgda_weights(torch.zeros(2, 3, dtype=f64))
    with pytest.raises(RuntimeError, match="mgda_weights: rcond"):
        OPS.mgda_weights(G, -1.0)


# ------------------------------------------------------------------ opcheck / compile
def _opcheck_cases():
    J = jacobian("wide", 5, 3, 0)
    G = J @ J.T
    Gb = torch.stack([G, G.flip(0).flip(1)]).float()
    return [
        (OPS.dual_cone_weights.default, (G, torch.eye(5, dtype=f64)), {}),
        (OPS.dual_cone_weights.default, (Gb, torch.rand(2, 3, 5)), {"rcond": 1e-6}),
        (OPS.mgda_weights.default, (G,), {}),
        (OPS.mgda_weights.default, (Gb,), {"rcond": 1e-6}),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args, kwargs = _opcheck_cases()[case]
    torch.library.opcheck(op, args, kwargs)


def test_compiles_fullgraph():
    def step(J):
        G = ops.gram(J, dtype=f64)
        W, _ = dual_cone_weights(G, torch.eye(J.shape[0], dtype=f64))
        w, _ = mgda_weights(G)
        return ops.combine(J, W.mean(0)), ops.combine(J, w)

    J = jacobian("wide", 4, 3, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(J), step(J)):
        torch.testing.assert_close(got, expected)


def test_vmap_folds_into_the_batch():
    G = torch.stack([(lambda J: J @ J.T)(jacobian("wide", 5, 3, s)) for s in range(3)])
    U = torch.rand(3, 2, 5, dtype=f64, generator=torch.Generator().manual_seed(0))
    got = torch.func.vmap(dual_cone_weights)(G, U)
    assert all(torch.equal(a, b) for a, b in zip(got, dual_cone_weights(G, U)))
    got = torch.func.vmap(dual_cone_weights, in_dims=(0, None))(G, U[0])  # one U for every G
    assert all(torch.equal(a, b) for a, b in zip(got, dual_cone_weights(G, U[0].expand(3, 2, 5).contiguous())))
    got = torch.func.vmap(mgda_weights)(G)
    assert all(torch.equal(a, b) for a, b in zip(got, mgda_weights(G)))


def test_not_differentiable_raises():
    # an active-set solve without an implemented derivative: a gradient or tangent raises, it is
    # never silently zero; UPGrad and MGDA inherit this (as in TorchJD), and work under no_grad
    J = jacobian("wide", 5, 3, 0)
    G = J @ J.T
    with pytest.raises(RuntimeError, match="dual_cone_weights is not differentiable with respect to U"):
        dual_cone_weights(G, torch.eye(5, dtype=f64).requires_grad_())
    with pytest.raises(RuntimeError, match="mgda_weights is not differentiable with respect to G .* tangent"):
        torch.func.jvp(lambda g: mgda_weights(g)[0], (G,), (G,))
    for agg in (hrgrad_ext.UPGrad(), hrgrad_ext.MGDA()):
        with pytest.raises(RuntimeError, match="is not differentiable with respect to G"):
            agg(J.clone().requires_grad_())
        with torch.no_grad():
            torch.testing.assert_close(agg(J.clone().requires_grad_()), agg(J))


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_cuda_matches_cpu():
    # five problems of K = 12 tasks, with gradients of different lengths: stacked as Gram matrices
    Js = [jacobian(kind, 12, n, s) for kind, n, s in
          [("wide", 5, 0), ("deficient", 20, 1), ("full", 30, 2), ("imbalanced", 15, 3), ("wide", 2, 4)]]
    G = torch.stack([J @ J.T for J in Js])
    G[4, 3] = 0.0  # a zero task
    G[4, :, 3] = 0.0
    U = torch.eye(12, dtype=f64).expand(5, 12, 12)
    for dtype in (f64, torch.float32):
        W, st = dual_cone_weights(G.to(dtype), U.to(dtype))
        Wg, stg = dual_cone_weights(G.to(dtype).cuda(), U.to(dtype).cuda())
        assert torch.equal(stg.cpu(), st)
        torch.testing.assert_close(Wg.cpu(), W, rtol=1e-9 if dtype == f64 else 1e-5, atol=1e-12 if dtype == f64 else 1e-6)
        w, s = mgda_weights(G.to(dtype))
        wg, sg = mgda_weights(G.to(dtype).cuda())
        assert torch.equal(sg.cpu(), s)
        torch.testing.assert_close(wg.cpu(), w, rtol=1e-9 if dtype == f64 else 1e-5, atol=1e-12 if dtype == f64 else 1e-6)
    for op, args, kwargs in _opcheck_cases():
        torch.library.opcheck(op, tuple(a.cuda() for a in args), kwargs)
