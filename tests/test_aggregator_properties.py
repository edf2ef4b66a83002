"""Properties of every aggregator, in the style of TorchJD's aggregator suite.

Each property test names the aggregators it applies to. The aggregators that do not have a
property are listed in ``LACKS`` with the reason, and ``test_lacking_properties_have_counterexamples``
shows each of those on one input, so that the lists cannot silently go stale;
``test_every_method_is_classified`` makes a newly registered method declare itself.

Inputs (float64 and float32): random full-rank, rank-deficient and K > n matrices, zero matrices,
collinear and duplicated tasks, and matrices that are / are not strongly stationary (some
w > 0 has J^T w = 0: then no update conflicts with no task and improves one).

``test_guarantees_on_random_inputs`` is the bulk check of the exact solvers: HRGrad, UPGrad and
MGDA on ``HRGRAD_PROPERTY_CASES`` (default 10,000) random rank-deficient and K > n inputs.
``python tests/test_aggregator_properties.py --cases 1000000`` runs a larger set.
"""

import os
import sys

import numpy as np
import pytest
import scipy.optimize
import torch

from hrgrad_ext import aggregators
from hrgrad_ext.aggregators import (ConFIG, GradNorm, HRGrad, LearningRateAnnealing, MGDA, Mean, PCGrad, ReLoBRaLo,
                                   SoftAdapt, Sum, UPGrad)
from hrgrad_ext.ops import LENGTH_MODELS, Status, dual_cone_weights, hrgrad_weights_ex, mgda_weights

f64 = torch.float64

# ------------------------------------------------------------------ aggregators under test
# Factories: PCGrad keeps a generator, so every comparison builds fresh twins with one seed.
UNDER_TEST = {
    **{("HRGrad" if lm == "projection" else f"HRGrad({lm})"): (lambda lm=lm: HRGrad(lm)) for lm in LENGTH_MODELS},
    "UPGrad": UPGrad,
    "MGDA": MGDA,
    "ConFIG": ConFIG,
    "Sum": Sum,
    "Mean": Mean,
    "PCGrad": lambda: PCGrad(seed=0),
    "ReLoBRaLo": lambda: ReLoBRaLo(seed=0),
    "LRA": LearningRateAnnealing,
    "GradNorm": GradNorm,
    "SoftAdapt": SoftAdapt,
}
HRGRADS = [name for name in UNDER_TEST if name.startswith("HRGrad")]
#: methods with state between steps; they are tested after a few steps (see ``aggregate``)
STATEFUL = ["ReLoBRaLo", "LRA", "GradNorm", "SoftAdapt"]
LOSS_WEIGHTED = ["ReLoBRaLo", "GradNorm", "SoftAdapt"]  # their weights follow the task losses

NON_CONFLICTING = [*HRGRADS, "UPGrad", "MGDA"]
PERMUTATION_INVARIANT = [*HRGRADS, "UPGrad", "MGDA", "ConFIG", "Sum", "Mean", "LRA"]
LINEAR_UNDER_SCALING = ["HRGrad", "HRGrad(arithmetic)", "UPGrad", "ConFIG", "Sum", "Mean", "PCGrad", "ReLoBRaLo",
                        "SoftAdapt"]
STRONGLY_STATIONARY = [*HRGRADS, "UPGrad", "ConFIG", "Sum", "Mean", *STATEFUL]


def loss_history(K, steps=4):
    """Task losses of a few steps, falling at a different rate for each task. They do not depend
    on J: in training the losses come with the gradients, not from them."""
    k = torch.arange(K, dtype=f64)
    return [(1 + k) * 0.5 ** (t * (1 + k) / K) for t in range(steps)]


def aggregate(name, J):
    """The update of a fresh aggregator ``name`` on J. The stateful ones first take a few steps
    on the same J with the losses of ``loss_history``, so that their state (weights moved away
    from their initial values, loss histories) matters; the properties are those of the map
    J -> update at that state."""
    agg = UNDER_TEST[name]()
    if name not in STATEFUL:
        return agg(J)
    history = loss_history(J.shape[0])
    for losses in history[:-1]:
        agg(J, losses=losses)
    return agg(J, losses=history[-1])

LACKS = {
    "non_conflicting": {
        **{name: "a positive weighting of the task gradients follows the largest weighted ones whatever the others"
           for name in STATEFUL},
        "ConFIG": "pinv(Jhat) 1 of the conflictfree package conflicts when the gradients are linearly dependent "
                  "(it has no fallback); on full-rank inputs it is non-conflicting (test_config_non_conflicting_on_full_rank)",
        "Sum": "the sum follows the largest gradients whatever the others",
        "Mean": "the mean follows the largest gradients whatever the others",
        "PCGrad": "for K >= 3 the sum of the projected gradients can conflict with a task",
    },
    "permutation_invariant": {
        "PCGrad": "the projection order is drawn per task index",
        **{name: "the weights belong to the tasks through their losses: permuting the gradients without their "
                 "losses changes the update (permuting both permutes the weights)" for name in LOSS_WEIGHTED},
    },
    "linear_under_scaling": {
        **{name: "the common length is a non-linear mean (min, max, harmonic, geometric) of the task norms"
           for name in HRGRADS if name not in LINEAR_UNDER_SCALING},
        "MGDA": "the minimum-norm point of the convex hull moves non-linearly when one gradient is scaled",
        "LRA": "the weights are ratios of gradient magnitudes (max over mean |g_i|)",
        "GradNorm": "the weights are trained towards equal weighted gradient norms, so they follow the norms",
    },
    "strongly_stationary": {
        "MGDA": "its update is 0 whenever the convex hull contains 0, even if an update improves some task "
                "and conflicts with none",
        "PCGrad": "not claimed: no proof for K >= 3 (the projections follow a random order); "
                  "for K = 2 it is twice UPGrad (test_pcgrad_two_tasks_is_twice_upgrad)",
    },
}
HAS = {
    "non_conflicting": NON_CONFLICTING,
    "permutation_invariant": PERMUTATION_INVARIANT,
    "linear_under_scaling": LINEAR_UNDER_SCALING,
    "strongly_stationary": STRONGLY_STATIONARY,
}

# ------------------------------------------------------------------ inputs
# Entries on a grid of 1/8 (and products of such): every input below is exactly representable in
# float32, so the float32 runs test the same matrices, with the same exact structure (rank,
# collinearity, stationarity), as the float64 runs.
def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=f64)


def _grid(g, *shape):
    return torch.round(8 * _randn(g, *shape)) / 8


def _positive(g, *shape):
    return torch.round(8 * _randn(g, *shape).abs()) / 8 + 0.125


def _mix(g, J):
    """Rows and columns permuted and columns sign-flipped: exact, so the structure survives."""
    K, n = J.shape
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(f64)
    return (J * signs)[torch.randperm(K, generator=g)][:, torch.randperm(n, generator=g)]


def full_rank(g):
    # norms spread over two decades
    return [_grid(g, K, n) * torch.tensor([4.0**i for i in range(K)], dtype=f64)[:, None] / 4 ** (K // 2)
            for K, n in [(1, 1), (2, 5), (4, 9), (7, 12)]]


def rank_deficient(g):
    return [_grid(g, K, r) @ _grid(g, r, n) for K, n, r in [(4, 6, 2), (9, 11, 5), (6, 20, 3), (8, 8, 1)]]


def wide(g):  # more tasks than parameters
    return [_grid(g, K, n) for K, n in [(3, 2), (6, 3), (9, 5), (12, 4), (20, 10)]]


def zero(g):
    return [torch.zeros(K, n, dtype=f64) for K, n in [(1, 1), (4, 3), (9, 11)]]


def collinear(g):
    v = _grid(g, 7)
    same_sign = _positive(g, 5)[:, None] * v
    mixed = _grid(g, 5)[:, None] * v
    B = _grid(g, 3, 7)
    duplicated = torch.cat([B, B[:1], 2.5 * B[1:2]])  # task 0 twice, task 1 and a positive multiple
    return [same_sign, mixed, duplicated]


def strongly_stationary(g):
    """Some w > 0 has J^T w = 0: no non-zero update in the span of the gradients conflicts with
    none of them."""
    out = []
    for K, n, r in [(5, 3, 3), (9, 11, 6), (7, 13, 2)]:
        B = _grid(g, K - 1, r) @ _grid(g, r, n)
        w = _positive(g, K - 1)
        out.append(_mix(g, torch.cat([B, -(w[:, None] * B).sum(0, keepdim=True)])))
    return out


def not_strongly_stationary(g):
    """Some update improves a task and conflicts with none (the first basis vector, before the
    columns are mixed); the 'weak' ones also have 0 in their convex hull (rows orthogonal to it
    that cancel)."""
    out = []
    for K_flat, K_up, n in [(3, 2, 4), (4, 3, 6), (0, 5, 4), (0, 12, 3)]:
        flat = torch.zeros(0, n - 1, dtype=f64)
        if K_flat:
            b = _grid(g, K_flat - 1, n - 1)
            flat = torch.cat([b, -(_positive(g, K_flat - 1)[:, None] * b).sum(0, keepdim=True)])
        flat = torch.cat([torch.zeros(K_flat, 1, dtype=f64), flat], 1)
        up = torch.cat([_positive(g, K_up, 1), _grid(g, K_up, n - 1)], 1)
        out.append(_mix(g, torch.cat([flat, up])))
    return out


FAMILIES = {f.__name__: f for f in [full_rank, rank_deficient, wide, zero, collinear, strongly_stationary,
                                     not_strongly_stationary]}
DTYPES = [f64, torch.float32]
SCALES = [0.0, 1e-10, 1e-5, 1e3, 1e10, 1e15]


def matrices(family, dtype, seed=0):
    return [J.to(dtype) for J in FAMILIES[family](torch.Generator().manual_seed(seed))]


def tol(dtype):
    """Relative tolerance of a property check on an update computed in ``dtype``."""
    return 1e-9 if dtype == f64 else 2e-5


def assert_close_update(a, b, J, dtype):
    # relative to the size of the gradients: updates of a cancelling set can be tiny
    scale = J.to(f64).norm(dim=1).sum()
    torch.testing.assert_close(a.to(f64), b.to(f64), rtol=0, atol=tol(dtype) * float(scale) + 1e-300)


def params(names, families=tuple(FAMILIES), dtypes=DTYPES):
    return [pytest.param(a, f, d, id=f"{a}-{f}-{str(d)[6:]}") for a in names for f in families for d in dtypes]


# ------------------------------------------------------------------ the properties
@pytest.mark.parametrize("name", list(UNDER_TEST))
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_expected_structure(name, family, dtype):
    """Every aggregator, every input, scales 0 and 1e-10 ... 1e15: an update of J's shape and
    dtype, finite, zero for a zero input, and A(s J) = s A(J) (every aggregator here is
    positively homogeneous of degree one). The reference is computed in float64 from the same
    rounded numbers s J, so that only the aggregator's own arithmetic is compared."""
    for J in matrices(family, dtype):
        for scale in SCALES:
            Js = J * scale
            out = aggregate(name, Js)
            assert out.shape == J.shape[1:] and out.dtype == dtype
            assert torch.isfinite(out).all()
            if scale == 0.0 or not J.any():
                assert torch.all(out == 0)
            else:
                reference = aggregate(name, Js.to(f64) / scale)
                assert_close_update(out.to(f64) / scale, reference, J, dtype)


@pytest.mark.parametrize("name,family,dtype", params(NON_CONFLICTING))
def test_non_conflicting(name, family, dtype):
    """g_i . u >= -tol |g_i| |u| for every task."""
    for J in matrices(family, dtype):
        u = aggregate(name, J).to(f64)
        J64 = J.to(f64)
        assert (J64 @ u >= -tol(dtype) * J64.norm(dim=1) * u.norm()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_config_non_conflicting_on_full_rank(dtype):
    for J in matrices("full_rank", dtype):
        u = ConFIG()(J).to(f64)
        J64 = J.to(f64)
        assert (J64 @ u >= -tol(dtype) * J64.norm(dim=1) * u.norm()).all()


@pytest.mark.parametrize("name,family,dtype", params(PERMUTATION_INVARIANT))
def test_permutation_invariant(name, family, dtype):
    g = torch.Generator().manual_seed(1)
    for J in matrices(family, dtype):
        expected = aggregate(name, J)
        for _ in range(3):
            perm = torch.randperm(J.shape[0], generator=g)
            assert_close_update(aggregate(name, J[perm]), expected, J, dtype)


@pytest.mark.parametrize("name,family,dtype", params(LINEAR_UNDER_SCALING))
def test_linear_under_scaling(name, family, dtype):
    """A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J) for c1, c2 > 0 and a, b > 0
    (powers of two in float32, so that the scaled inputs are exact and keep their structure)."""
    g = torch.Generator().manual_seed(2)
    for J in matrices(family, dtype):
        K = J.shape[0]
        if dtype == f64:
            c1, c2 = (torch.rand(K, generator=g, dtype=f64) + 0.05 for _ in range(2))
            a, b = torch.rand(2, generator=g, dtype=f64) + 0.05
        else:
            c1, c2 = (2.0 ** torch.randint(-3, 4, (K,), generator=g).to(f64) for _ in range(2))
            a, b = 2.0 ** torch.randint(-2, 3, (2,), generator=g).to(f64)
        A = lambda c: aggregate(name, c.to(dtype)[:, None] * J).to(f64)  # noqa: E731
        assert_close_update(A(a * c1 + b * c2), a * A(c1) + b * A(c2), J, dtype)


@pytest.mark.parametrize("name,dtype", [(a, d) for a in STRONGLY_STATIONARY for d in DTYPES])
def test_strongly_stationary(name, dtype):
    """A(J) = 0 only if J is strongly stationary: on inputs where some update improves a task and
    conflicts with none, the update is not zero."""
    for J in matrices("not_strongly_stationary", dtype):
        assert aggregate(name, J).to(f64).norm() > 1e-3 * J.to(f64).norm(dim=1).max()


@pytest.mark.parametrize("name,dtype", [(a, d) for a in NON_CONFLICTING for d in DTYPES])
def test_zero_on_strongly_stationary(name, dtype):
    """The converse for non-conflicting aggregators: when w > 0 has J^T w = 0, the only update in
    the span of the gradients that conflicts with none of them is 0."""
    for J in matrices("strongly_stationary", dtype):
        assert aggregate(name, J).to(f64).norm() <= 1e3 * tol(dtype) * J.to(f64).norm(dim=1).max()


# ------------------------------------------------------------------ bookkeeping of the lists
COUNTEREXAMPLES = {
    # (property, aggregator): input on which the aggregator does not have the property
    ("non_conflicting", "ConFIG"): [[-2.0, 2.0], [-1.0, 1.0], [1.0, -1.0]],
    ("non_conflicting", "Sum"): [[1.0, 0.0], [-2.0, 0.1]],
    ("non_conflicting", "Mean"): [[1.0, 0.0], [-2.0, 0.1]],
    ("non_conflicting", "PCGrad"): [[3.0, -1.0], [-2.0, 2.0], [0.0, -2.0]],
    ("permutation_invariant", "PCGrad"): [[-1.0, 0.0], [1.0, -1.0], [3.0, -2.0]],
    **{("non_conflicting", name): [[1.0, 0.0], [-2.0, 0.1]] for name in STATEFUL},
    **{("permutation_invariant", name): [[1.0, 0.0], [0.0, 1.0]] for name in LOSS_WEIGHTED},
    ("strongly_stationary", "MGDA"): [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]],
    **{("linear_under_scaling", name): [[1.0, 0.0], [0.0, 1.0]] for name in LACKS["linear_under_scaling"]},
}


def has_property(prop, name, J):
    u = aggregate(name, J)
    if prop == "non_conflicting":
        return bool((J @ u >= -1e-9 * J.norm(dim=1) * u.norm()).all())
    if prop == "permutation_invariant":
        return torch.allclose(aggregate(name, J.flip(0)), u, atol=1e-9)
    if prop == "linear_under_scaling":
        c1, c2 = torch.tensor([1.0, 2.0], dtype=f64)[:, None], torch.tensor([3.0, 1.0], dtype=f64)[:, None]
        return torch.allclose(aggregate(name, (c1 + c2) * J), aggregate(name, c1 * J) + aggregate(name, c2 * J),
                              atol=1e-9)
    if prop == "strongly_stationary":  # the input is not strongly stationary
        return bool(u.norm() > 1e-6)
    raise KeyError(prop)


@pytest.mark.parametrize("prop,name", [(p, a) for p in LACKS for a in LACKS[p] if (p, a) in COUNTEREXAMPLES])
def test_lacking_properties_have_counterexamples(prop, name):
    assert not has_property(prop, name, torch.tensor(COUNTEREXAMPLES[prop, name], dtype=f64))


def test_every_method_is_classified():
    registered = {type(UNDER_TEST[n]()) for n in UNDER_TEST}
    assert registered == set(aggregators.AGGREGATORS.values()), "a registered method has no property tests here"
    for prop, names in HAS.items():
        assert set(names) | set(LACKS[prop]) == set(UNDER_TEST), prop
        assert not set(names) & set(LACKS[prop]), prop


def test_pcgrad_two_tasks_is_twice_upgrad():
    # K = 2: each gradient projected off the other when they conflict = its projection onto the cone
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        J = _randn(g, 2, 6)
        torch.testing.assert_close(PCGrad(seed=0)(J), 2 * UPGrad()(J), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ bulk check of the exact solvers
def _shapes(k_max):
    """(K, n, r): r = n < K (more tasks than parameters) or r < K <= n (rank-deficient)."""
    out = []
    for K in range(2, k_max + 1):
        out += [(K, n, n) for n in sorted({1, max(1, K // 2), K - 1})]
        out += [(K, K + 3, r) for r in sorted({1, max(1, K // 2), K - 1})]
    return out


def _upgrad(G):
    K = G.shape[-1]
    W, status = dual_cone_weights(G, torch.eye(K, dtype=G.dtype).expand_as(G).contiguous())
    return W.mean(1), ((status & Status.ZERO_UPDATE) != 0).all(1).to(torch.int32) * int(Status.ZERO_UPDATE)


SOLVERS = {"HRGrad": lambda G: hrgrad_weights_ex(G), "UPGrad": _upgrad, "MGDA": lambda G: mgda_weights(G)}


def check_random_inputs(cases, seed=0, k_max=12):
    """Runs HRGrad, UPGrad and MGDA on about ``cases`` random rank-deficient and K > n float64
    inputs and on the same inputs with their tasks permuted; asserts the guarantees and returns
    the worst values seen. Zero updates are checked against scipy's NNLS (Lawson-Hanson, an
    independent implementation): the projection of the mean unit gradient onto the cone must
    vanish there."""
    g = torch.Generator().manual_seed(seed)
    shapes = _shapes(k_max)
    per_shape = max(1, cases // len(shapes))
    worst = {name: {"cos": 0.0, "update_order": 0.0, "weight_order": 0.0, "zero": 0} for name in SOLVERS}
    total = 0
    for K, n, r in shapes:
        J = _randn(g, per_shape, K, r) @ _randn(g, per_shape, r, n) if r < n else _randn(g, per_shape, K, n)
        perm = torch.argsort(torch.rand(per_shape, K, generator=g), dim=1)
        Jp = torch.gather(J, 1, perm[:, :, None].expand_as(J))
        norms = J.norm(dim=2)
        zero_flags = {}
        for name, solve in SOLVERS.items():
            w, status = solve(J @ J.transpose(1, 2))
            wp, status_p = solve(Jp @ Jp.transpose(1, 2))
            wp = torch.zeros_like(wp).scatter_(1, perm, wp)  # back to the original task order
            zero = (status & Status.ZERO_UPDATE) != 0
            assert torch.equal(zero, (status_p & Status.ZERO_UPDATE) != 0), f"{name}: ZERO_UPDATE depends on the order"
            assert torch.all(w[zero] == 0)
            u, up = torch.einsum("bk,bkn->bn", w, J), torch.einsum("bk,bkn->bn", wp, J)
            magnitude = (w.abs() * norms).sum(1)  # the sizes of the terms that formed u
            cos = torch.einsum("bkn,bn->bk", J, u) / (norms * u.norm(dim=1, keepdim=True)).clamp_min(1e-300)
            cos_min = cos[~zero].min().item() if bool((~zero).any()) else 0.0
            update_order = ((u - up).norm(dim=1) / magnitude.clamp_min(1e-300)).max().item()
            weight_order = ((w - wp).abs().amax(1) / w.abs().amax(1).clamp_min(1e-300)).max().item()
            assert cos_min >= -1e-10, f"{name} conflicts: cosine {cos_min} at shape {(K, n, r)}"
            assert update_order <= 1e-10, f"{name}: the update depends on the task order ({update_order})"
            assert weight_order <= 1e-7, f"{name}: the weights depend on the task order ({weight_order})"
            w_ = worst[name]
            w_["cos"] = min(w_["cos"], cos_min)
            w_["update_order"] = max(w_["update_order"], update_order)
            w_["weight_order"] = max(w_["weight_order"], weight_order)
            w_["zero"] += int(zero.sum())
            zero_flags[name] = zero
        # HRGrad and UPGrad are zero exactly when J is strongly stationary, and then 0 is in the
        # convex hull: MGDA is zero too (MGDA alone may also be zero, when 0 lies within the
        # cancellation level of the hull's boundary).
        assert torch.equal(zero_flags["HRGrad"], zero_flags["UPGrad"])
        assert not (zero_flags["HRGrad"] & ~zero_flags["MGDA"]).any()
        for b in torch.nonzero(zero_flags["HRGrad"]).flatten().tolist():
            units = (J[b] / norms[b, :, None]).numpy()
            mu, residual = scipy.optimize.nnls(units.T, -units.sum(0), maxiter=50 * K)
            assert residual <= 1e-6 * (K + mu.sum()), f"zero update, but scipy's projection is {residual}"
        total += per_shape
    return total, worst


def test_guarantees_on_random_inputs():
    cases = int(os.environ.get("HRGRAD_PROPERTY_CASES", "10000"))
    total, worst = check_random_inputs(cases)
    assert total >= 0.99 * cases
    assert all(w["zero"] > 0 for w in worst.values())  # the degenerate cones are exercised


if __name__ == "__main__":
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser(description="bulk check of HRGrad / UPGrad / MGDA on random degenerate inputs")
    parser.add_argument("--cases", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k-max", type=int, default=24)
    args = parser.parse_args()
    t0 = time.perf_counter()
    total, worst = check_random_inputs(args.cases, args.seed, args.k_max)
    print(json.dumps({"cases": total, "k_max": args.k_max, "seed": args.seed, "threads": torch.get_num_threads(),
                      "seconds": round(time.perf_counter() - t0, 1), "worst": worst}, indent=1))
    sys.exit(0)
