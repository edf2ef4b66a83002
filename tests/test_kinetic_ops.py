"""Tests of the fused velocity-quadrature ops (hrgrad_ext.ops.kinetic).

The references (reference_impls.py) are plain PyTorch written from the formulas of issue 3,
independent of the op implementations. Tolerances: float64 CPU vs reference rtol 1e-12 (the op sums in double
like the reference; only the summation order differs), float32 rtol ~1e-5. The CPU kernels are
compiled for AVX-512, AVX2 and SSE2 (``HRGRAD_EXT_CPU_ISA`` selects one); the tests taking the
``isa`` fixture run each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference_impls import ref_bgk, ref_bgk_sq, ref_maxwellian, ref_moments, ref_transport, ref_transport_sq

import hrgrad_ext  # noqa: F401  (registers the ops)
from hrgrad_ext.ops import kinetic as K

ops = torch.ops.hrgrad_ext
f64 = torch.float64

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and hrgrad_ext.build_info()["cuda"]),
    reason="needs a CUDA device and a CUDA build of hrgrad_ext",
)


# --- input factories ----------------------------------------------------------------------------


def bgk_inputs(N, V, dtype=f64, device="cpu", kn="row", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*s, generator=gen, dtype=f64)).to(dtype=dtype, device=device)

    v, w = K.gauss_legendre(V, -10.0, 10.0, dtype=dtype, device=device) if V > 0 else (r(0), r(0))
    F, Ft, Fx = r(N, V, lo=0.0), r(N, V), r(N, V)
    rho, u, T = r(N, lo=0.5, hi=1.5), r(N, lo=-0.5, hi=0.5), r(N, lo=0.5, hi=1.5)
    rho_t, u_t, T_t = r(N), r(N), r(N)
    if kn == "row":
        knv = r(N, lo=1e-3, hi=1.0)
    elif kn == "scalar":
        knv = torch.tensor(0.37, dtype=dtype, device=device)
    else:
        knv = kn
    args = [F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, knv]
    if requires_grad:
        for i, a in enumerate(args):
            if i not in (9, 10) and isinstance(a, torch.Tensor):
                a.requires_grad_(True)
    return args


def transport_inputs(N, V, dtype=f64, device="cpu", eps="row", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*s, generator=gen, dtype=f64)).to(dtype=dtype, device=device)

    v, w = K.gauss_legendre(V, dtype=dtype, device=device)
    # Non-zero row means so that the projection g = Graw - <Graw> matters.
    G, Gt, Gx = r(N, V) + 2.0, r(N, V) - 1.0, r(N, V) + 0.5
    rho_t, rho_x = r(N), r(N)
    if eps == "row":
        e = r(N, lo=1e-3, hi=1.0)
    elif eps == "scalar":
        e = torch.tensor(0.21, dtype=dtype, device=device)
    else:
        e = eps
    args = [G, Gt, Gx, rho_t, rho_x, v, w, e]
    if requires_grad:
        for i, a in enumerate(args):
            if i not in (5, 6) and isinstance(a, torch.Tensor):
                a.requires_grad_(True)
    return args


def assert_close(a, b, rtol, atol=0.0):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


SIZES = [(1, 30), (7, 64), (33, 30), (257, 64), (100, 5), (3, 1), (45, 100)]


@pytest.fixture(params=["avx512", "avx2", "sse2"])
def isa(request, monkeypatch):
    # A cap: on a CPU without AVX-512 "avx512" runs the best path it has.
    monkeypatch.setenv("HRGRAD_EXT_CPU_ISA", request.param)
    return request.param


# --- forward against the reference --------------------------------------------------------------


@pytest.mark.parametrize("N,V", [(13, 30), (9, 64), (3, 7), (17, 100)])
def test_every_isa_matches_reference(isa, N, V):
    # N not a multiple of the row block (8, 4 or 2 rows), V not a multiple of the vector:
    # the masked last vector of a row and the partial last block, forward and backward.
    gen = torch.Generator().manual_seed(N * V)
    for dtype, tol in ((f64, dict(rtol=1e-11, atol=1e-11)), (torch.float32, dict(rtol=1e-5, atol=2e-5))):
        for fn, ref, make in ((K.bgk_residuals, ref_bgk, bgk_inputs), (K.transport_mm_residuals, ref_transport,
                                                                      transport_inputs),
                              (K.bgk_residuals_sq, ref_bgk_sq, bgk_inputs),
                              (K.transport_mm_residuals_sq, ref_transport_sq, transport_inputs)):
            args = make(N, V, dtype, seed=N + V, requires_grad=True)
            args64 = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
            out, want = fn(*args), ref(*args64)
            for o, r in zip(out, want):
                assert_close(o.double(), r, **tol)
            up = [torch.randn(o.shape, generator=gen, dtype=f64) for o in out]
            got = _grads_of(fn, args, [u.to(dtype) for u in up])
            exp = _grads_of(ref, args64, up)
            gtol = tol if dtype == f64 else dict(rtol=1e-4, atol=1e-4)
            for a, b in zip(got, exp):
                assert_close(a.double(), b, **gtol)
        F, _, _, rho, u, T, *_r, v, w, _ = bgk_inputs(N, V, dtype, seed=7, requires_grad=True)
        assert_close(K.velocity_moments(F, v, w, 5).double(), ref_moments(*(x.double() for x in (F, v, w)), 5),
                     rtol=tol["rtol"], atol=10 * tol["atol"])
        got = torch.autograd.grad(K.maxwellian(rho, u, T, v).pow(2).sum(), (rho, u, T))
        exp = torch.autograd.grad(ref_maxwellian(rho, u, T, v).pow(2).sum(), (rho, u, T))
        for a, b in zip(got, exp):
            assert_close(a.double(), b.double(), rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


@pytest.mark.parametrize("dtype,N,V", [(torch.float32, 47000, 31), (torch.float64, 23500, 31),
                                       (torch.float32, 1_500_000, 1)])
def test_streamed_backward_outputs_equal_cached_ones(isa, dtype, N, V):
    # Backward outputs above 16 MiB in all (3 N V elements: 17.5-18 MB here) are written with
    # streaming stores from a block scratch (kStreamBytes); rows are independent, so the two
    # halves of the batch (each below the threshold: plain stores) must give the very same
    # numbers. V = 31: rows not aligned to any vector, so the copies' unaligned heads and tails
    # are exercised; V = 1: one element per row.
    a = bgk_inputs(N, V, dtype, seed=5)
    t = transport_inputs(N, V, dtype, seed=6)
    gen = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    q, g3, gN, gNV = r(N), r(N, 3), r(N), r(N, V)
    calls = [
        (ops.bgk_residuals_sq_backward, lambda s: (q[s], g3[s], g3[s], *[x[s] if x.dim() else x for x in a[:9]],
                                                    a[9], a[10], a[11][s])),
        (ops.bgk_residuals_backward, lambda s: (gNV[s], g3[s], g3[s], *[x[s] for x in a[1:9]], a[9], a[10], a[11][s])),
        (ops.transport_mm_residuals_sq_backward, lambda s: (q[s], gN[s], t[0][s], t[1][s], t[2][s], t[4][s], t[5], t[6],
                                                             t[7][s])),
        (ops.transport_mm_residuals_backward, lambda s: (gNV[s], gNV[s], gN[s], t[1][s], t[2][s], t[5], t[6], t[7][s])),
    ]
    halves = (slice(0, N // 2), slice(N // 2, N))
    for op, args in calls:
        whole = op(*args(slice(0, N)))
        parts = [op(*args(h)) for h in halves]
        for k, w in enumerate(whole):
            assert torch.equal(w, torch.cat([p[k] for p in parts])), (op, k)


@pytest.mark.parametrize("N,V", SIZES)
def test_moments_and_maxwellian_match_reference(N, V):
    F, _, _, rho, u, T, *_rest, v, w, _ = bgk_inputs(N, V, seed=N + V)
    for order in (0, 1, 4):
        assert_close(K.velocity_moments(F, v, w, order), ref_moments(F, v, w, order), rtol=1e-12, atol=1e-13)
    assert_close(K.maxwellian(rho, u, T, v), ref_maxwellian(rho, u, T, v), rtol=1e-12, atol=1e-300)


def test_maxwellian_extreme_exponents():
    # Exponents from 0 down to about -1e5 (the CPU kernel's own exp flushes below -708 to 0,
    # where the true value is < 3.3e-308) and a wide velocity range.
    v, w = K.gauss_legendre(64, -10.0, 10.0)
    T = torch.tensor([5e-4, 2e-3, 0.05, 0.7, 30.0, 400.0], dtype=f64)
    rho = torch.linspace(0.1, 2.0, 6, dtype=f64)
    u = torch.tensor([0.0, 9.9, -3.0, 0.4, 1.0, -10.0], dtype=f64)
    got, want = K.maxwellian(rho, u, T, v), ref_maxwellian(rho, u, T, v)
    assert (got == 0).sum() > 10  # the underflow branch is exercised
    assert_close(got, want, rtol=1e-12, atol=1e-300)
    for o, r in zip(K.bgk_residuals(want, want, want, rho, u, T, rho, u, T, v, w, 0.1),
                    ref_bgk(want, want, want, rho, u, T, rho, u, T, v, w, torch.tensor(0.1, dtype=f64))):
        assert_close(o, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kn", ["row", "scalar"])
@pytest.mark.parametrize("N,V", SIZES)
def test_bgk_matches_reference(N, V, kn):
    args = bgk_inputs(N, V, kn=kn, seed=3 * N + V)
    out = K.bgk_residuals(*args)
    ref = ref_bgk(*args)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == f64
        assert_close(o, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", ["row", "scalar"])
@pytest.mark.parametrize("N,V", SIZES)
def test_transport_matches_reference(N, V, eps):
    args = transport_inputs(N, V, eps=eps, seed=5 * N + V)
    out = K.transport_mm_residuals(*args)
    ref = ref_transport(*args)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_python_float_parameters_broadcast_like_0d():
    args = bgk_inputs(9, 30, kn="scalar")
    a = K.bgk_residuals(*args[:-1], 0.37)
    b = K.bgk_residuals(*args[:-1], torch.full((9,), 0.37, dtype=f64))
    for x, y in zip(a, b):
        assert_close(x, y, rtol=0, atol=0)
    targs = transport_inputs(9, 30, eps="scalar")
    a = K.transport_mm_residuals(*targs[:-1], 0.21)
    b = K.transport_mm_residuals(*targs[:-1], torch.full((9,), 0.21, dtype=f64))
    for x, y in zip(a, b):
        assert_close(x, y, rtol=0, atol=0)


def test_float32_against_float64_reference():
    args = bgk_inputs(65, 64, dtype=torch.float32)
    out = K.bgk_residuals(*args)
    ref = ref_bgk(*[a.double() for a in args])
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        assert_close(o.double(), r, rtol=1e-5, atol=2e-5)
    targs = transport_inputs(65, 30, dtype=torch.float32)
    out = K.transport_mm_residuals(*targs)
    ref = ref_transport(*[a.double() for a in targs])
    for o, r in zip(out, ref):
        assert_close(o.double(), r, rtol=1e-5, atol=2e-5)
    # The loss forms: float32 residuals squared and summed in float64, then rounded once.
    for fn, ref_fn, a in ((K.bgk_residuals_sq, ref_bgk_sq, args), (K.transport_mm_residuals_sq, ref_transport_sq, targs)):
        for o, r in zip(fn(*a), ref_fn(*[x.double() for x in a])):
            assert o.dtype == torch.float32
            assert_close(o.double(), r, rtol=1e-5, atol=2e-5)


def test_non_contiguous_inputs():
    args = bgk_inputs(12, 30)
    # Transposed copies: same values, column-major storage.
    nc = [a.t().contiguous().t() if a.dim() == 2 else a for a in args]
    nc[3] = torch.stack([args[3], args[3]], 1)[:, 0]  # strided [N]
    assert not nc[0].is_contiguous() and not nc[3].is_contiguous()
    for o, r in zip(K.bgk_residuals(*nc), ref_bgk(*args)):
        assert_close(o, r, rtol=1e-12, atol=1e-12)
    targs = transport_inputs(12, 30)
    nct = [a.t().contiguous().t() if a.dim() == 2 else a for a in targs]
    for o, r in zip(K.transport_mm_residuals(*nct), ref_transport(*targs)):
        assert_close(o, r, rtol=1e-12, atol=1e-12)
    for o, r in zip(K.bgk_residuals_sq(*nc), ref_bgk_sq(*args)):
        assert_close(o, r, rtol=1e-12, atol=1e-12)
    for o, r in zip(K.transport_mm_residuals_sq(*nct), ref_transport_sq(*targs)):
        assert_close(o, r, rtol=1e-12, atol=1e-12)
    # and their fused backward kernels, non-contiguous upstream gradients included
    for fn, ref_fn, a, nca in ((K.bgk_residuals_sq, ref_bgk_sq, args, nc),
                               (K.transport_mm_residuals_sq, ref_transport_sq, targs, nct)):
        a = [x.detach().requires_grad_(x.dtype.is_floating_point) if i < len(a) - 3 else x for i, x in enumerate(a)]
        nca = [x.detach().requires_grad_(True) if i < len(nca) - 3 else x for i, x in enumerate(nca)]
        got = torch.autograd.grad(sum(o.sum() for o in fn(*nca)), [x for x in nca if x.requires_grad])
        want = torch.autograd.grad(sum(o.sum() for o in ref_fn(*a)), [x for x in a if x.requires_grad])
        for g, h in zip(got, want):
            assert_close(g, h, rtol=1e-12, atol=1e-12)


def test_empty_batch():
    args = bgk_inputs(0, 30, requires_grad=True)
    kin, cons, consis = K.bgk_residuals(*args)
    assert kin.shape == (0, 30) and cons.shape == (0, 3) and consis.shape == (0, 3)
    (kin.sum() + cons.sum() + consis.sum()).backward()
    assert args[0].grad.shape == (0, 30)
    targs = transport_inputs(0, 30, requires_grad=True)
    g, micro, macro = K.transport_mm_residuals(*targs)
    assert g.shape == (0, 30) and micro.shape == (0, 30) and macro.shape == (0,)
    (micro.sum() + macro.sum()).backward()
    assert targs[0].grad.shape == (0, 30)
    assert K.velocity_moments(args[0].detach(), args[9], args[10], 2).shape == (0, 3)
    ksq, cons, consis = K.bgk_residuals_sq(*args)
    assert ksq.shape == (0,) and cons.shape == (0, 3)
    (ksq.sum() + cons.sum()).backward()
    msq, macro = K.transport_mm_residuals_sq(*targs)
    assert msq.shape == (0,) and macro.shape == (0,)
    (msq.sum() + macro.sum()).backward()


# --- gradients ----------------------------------------------------------------------------------


def _grads_of(fn, args, upstream):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = fn(*args)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("kn", ["row", "scalar"])
@pytest.mark.parametrize("N,V", [(1, 30), (37, 64), (20, 7)])
def test_bgk_gradients_match_reference(N, V, kn):
    args = bgk_inputs(N, V, kn=kn, seed=11, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    up = [torch.randn(N, V, generator=gen, dtype=f64), torch.randn(N, 3, generator=gen, dtype=f64),
          torch.randn(N, 3, generator=gen, dtype=f64)]
    got = _grads_of(K.bgk_residuals, args, up)
    want = _grads_of(ref_bgk, args, up)
    assert len(got) == 10
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("eps", ["row", "scalar"])
@pytest.mark.parametrize("N,V", [(1, 30), (37, 64), (20, 7)])
def test_transport_gradients_match_reference(N, V, eps):
    args = transport_inputs(N, V, eps=eps, seed=13, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    up = [torch.randn(N, V, generator=gen, dtype=f64), torch.randn(N, V, generator=gen, dtype=f64),
          torch.randn(N, generator=gen, dtype=f64)]
    got = _grads_of(K.transport_mm_residuals, args, up)
    want = _grads_of(ref_transport, args, up)
    assert len(got) == 6
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("param", ["row", "scalar"])
@pytest.mark.parametrize("N,V", [(1, 30), (37, 64), (20, 7)])
def test_loss_form_gradients_match_reference(N, V, param):
    gen = torch.Generator().manual_seed(3)
    args = bgk_inputs(N, V, kn=param, seed=15, requires_grad=True)
    up = [torch.randn(N, generator=gen, dtype=f64), torch.randn(N, 3, generator=gen, dtype=f64),
          torch.randn(N, 3, generator=gen, dtype=f64)]
    for a, b in zip(_grads_of(K.bgk_residuals_sq, args, up), _grads_of(ref_bgk_sq, args, up)):
        assert_close(a, b, rtol=1e-11, atol=1e-11)
    args = transport_inputs(N, V, eps=param, seed=16, requires_grad=True)
    up = [torch.randn(N, generator=gen, dtype=f64), torch.randn(N, generator=gen, dtype=f64)]
    got, want = _grads_of(K.transport_mm_residuals_sq, args, up), _grads_of(ref_transport_sq, args, up)
    assert len(got) == 6
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_loss_form_is_the_loss_of_the_residual_op():
    # What the training losses rely on: the mean of kinetic_sq / V is the mean squared residual,
    # with the same gradients, in one call and its fused backward.
    args = bgk_inputs(40, 64, seed=17, requires_grad=True)
    kin, cons, _ = K.bgk_residuals(*args)
    ksq, cons2, _ = K.bgk_residuals_sq(*args)
    a = kin.pow(2).mean() + cons.pow(2).mean()
    b = ksq.mean() / 64 + cons2.pow(2).mean()
    assert_close(b, a, rtol=1e-13, atol=0)
    for x, y in zip(torch.autograd.grad(a, args[:9]), torch.autograd.grad(b, args[:9])):
        assert_close(y, x, rtol=1e-12, atol=1e-14)


def test_only_some_outputs_used():
    # Unused outputs get zero gradients; the fused backward must still be right.
    args = bgk_inputs(10, 30, requires_grad=True)
    got = torch.autograd.grad(K.bgk_residuals(*args)[1].pow(2).sum(), args[2])
    want = torch.autograd.grad(ref_bgk(*args)[1].pow(2).sum(), args[2])
    assert_close(got[0], want[0], rtol=1e-11, atol=1e-11)
    targs = transport_inputs(10, 30, requires_grad=True)
    got = torch.autograd.grad(K.transport_mm_residuals(*targs)[2].sum(), targs[2])
    want = torch.autograd.grad(ref_transport(*targs)[2].sum(), targs[2])
    assert_close(got[0], want[0], rtol=1e-11, atol=1e-11)


def test_gradcheck_all_ops():
    for kn in ("row", "scalar"):
        args = bgk_inputs(3, 5, kn=kn, seed=21, requires_grad=True)
        assert torch.autograd.gradcheck(K.bgk_residuals, args)
    for eps in ("row", "scalar"):
        targs = transport_inputs(3, 5, eps=eps, seed=22, requires_grad=True)
        assert torch.autograd.gradcheck(K.transport_mm_residuals, targs)
        assert torch.autograd.gradcheck(K.transport_mm_residuals_sq, targs)
        assert torch.autograd.gradcheck(K.bgk_residuals_sq, args)
    F, _, _, rho, u, T, *_r, v, w, _ = bgk_inputs(3, 6, seed=23, requires_grad=True)
    assert torch.autograd.gradcheck(lambda F: K.velocity_moments(F, v, w, 3), (F,))
    assert torch.autograd.gradcheck(lambda a, b, c: K.maxwellian(a, b, c, v), (rho, u, T))


# --- opcheck (schemas, fake kernels, autograd registration, AOT dispatch) ------------------------


def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_forward_ops():
    args = bgk_inputs(6, 7, seed=31, requires_grad=True)
    _opcheck(ops.bgk_residuals.default, args)
    args = bgk_inputs(6, 7, kn="scalar", seed=32, requires_grad=True)
    _opcheck(ops.bgk_residuals.default, args)
    targs = transport_inputs(6, 7, seed=33, requires_grad=True)
    _opcheck(ops.transport_mm_residuals.default, targs)
    targs = transport_inputs(6, 7, eps="scalar", seed=34, requires_grad=True)
    _opcheck(ops.transport_mm_residuals.default, targs)
    for kind in ("row", "scalar"):
        _opcheck(ops.bgk_residuals_sq.default, bgk_inputs(6, 7, kn=kind, seed=38, requires_grad=True))
        _opcheck(ops.transport_mm_residuals_sq.default, transport_inputs(6, 7, eps=kind, seed=39, requires_grad=True))
    F, _, _, rho, u, T, *_r, v, w, _ = bgk_inputs(6, 7, seed=35, requires_grad=True)
    _opcheck(ops.velocity_moments.default, (F, v, w, 3))
    _opcheck(ops.maxwellian.default, (rho, u, T, v))


def test_opcheck_backward_ops():
    N, V = 6, 7
    a = bgk_inputs(N, V, seed=36)
    g = torch.randn(N, V, dtype=f64)
    _opcheck(ops.bgk_residuals_backward.default,
             (g, torch.randn(N, 3, dtype=f64), torch.randn(N, 3, dtype=f64), *a[1:]))
    t = transport_inputs(N, V, seed=37)
    _opcheck(ops.transport_mm_residuals_backward.default,
             (g, torch.randn(N, V, dtype=f64), torch.randn(N, dtype=f64), t[1], t[2], t[5], t[6], t[7]))
    _opcheck(ops.velocity_moments_backward.default, (torch.randn(N, 4, dtype=f64), a[9], a[10]))
    _opcheck(ops.maxwellian_backward.default, (g, a[3], a[4], a[5], a[9]))
    q = torch.randn(N, dtype=f64)
    _opcheck(ops.bgk_residuals_sq_backward.default,
             (q, torch.randn(N, 3, dtype=f64), torch.randn(N, 3, dtype=f64), *a))
    _opcheck(ops.transport_mm_residuals_sq_backward.default,
             (q, torch.randn(N, dtype=f64), t[0], t[1], t[2], t[4], t[5], t[6], t[7]))


# --- torch.compile ------------------------------------------------------------------------------
# backend="aot_eager" traces the ops through their fake kernels and the autograd formulas (the
# part that can break); inductor's C++ code generation for the surrounding sum-of-squares is
# skipped because it takes tens of seconds per graph on this 2-core machine.


def test_compile_fullgraph():
    torch._dynamo.reset()

    def bgk_loss(*a):
        kin, cons, consis = K.bgk_residuals(*a)
        return kin.pow(2).mean() + cons.pow(2).mean() + consis.pow(2).mean()

    def transport_loss(*a):
        g, micro, macro = K.transport_mm_residuals(*a)
        return micro.pow(2).mean() + macro.pow(2).mean() + g.mean()

    def moments_loss(F, rho, u, T, v, w):
        return K.velocity_moments(F, v, w, 2).pow(2).sum() + K.maxwellian(rho, u, T, v).sum()

    for fn, args in (
        (bgk_loss, bgk_inputs(16, 30, seed=41, requires_grad=True)),
        (bgk_loss, bgk_inputs(16, 30, kn="scalar", seed=42, requires_grad=True)),
        (transport_loss, transport_inputs(16, 30, seed=43, requires_grad=True)),
        (transport_loss, transport_inputs(16, 30, eps="scalar", seed=44, requires_grad=True)),
    ):
        cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        leaves = [a for a in args if a.requires_grad]
        want = torch.autograd.grad(fn(*args), leaves)
        got = torch.autograd.grad(cfn(*args), leaves)
        for x, y in zip(got, want):
            assert_close(x, y, rtol=1e-13, atol=1e-13)
    a = bgk_inputs(16, 30, seed=45, requires_grad=True)
    margs = (a[0], a[3], a[4], a[5], a[9], a[10])
    cfn = torch.compile(moments_loss, fullgraph=True, backend="aot_eager")
    leaves = [x for x in margs if x.requires_grad]
    for x, y in zip(torch.autograd.grad(cfn(*margs), leaves), torch.autograd.grad(moments_loss(*margs), leaves)):
        assert_close(x, y, rtol=1e-13, atol=1e-13)


# --- errors -------------------------------------------------------------------------------------


def test_errors_shapes_dtypes_devices():
    a = bgk_inputs(5, 30)
    bad = list(a)
    bad[1] = a[1][:, :29]
    with pytest.raises(ValueError, match="Ft has shape"):
        K.bgk_residuals(*bad)
    with pytest.raises(RuntimeError, match="Ft has shape"):
        ops.bgk_residuals(*bad)
    bad = list(a)
    bad[4] = a[4][:4]
    with pytest.raises(ValueError, match=r"u must be \[N\] = \[5\]"):
        K.bgk_residuals(*bad)
    with pytest.raises(RuntimeError, match=r"u must be \[N\] = \[5\]"):
        ops.bgk_residuals(*bad)
    bad = list(a)
    bad[11] = torch.ones(1, dtype=f64)
    with pytest.raises(RuntimeError, match=r"kn must be \[N\] = \[5\] or a 0-d tensor"):
        ops.bgk_residuals(*bad)
    bad = list(a)
    bad[9] = a[9][:20]
    with pytest.raises(ValueError, match=r"v must be \[V\] = \[30\]"):
        K.bgk_residuals(*bad)
    with pytest.raises(RuntimeError, match=r"v must be \[V\] = \[30\]"):
        ops.bgk_residuals(*bad)
    bad = list(a)
    bad[5] = a[5].float()
    with pytest.raises(TypeError, match="T has dtype torch.float32 but F has dtype torch.float64"):
        K.bgk_residuals(*bad)
    with pytest.raises(RuntimeError, match="T has dtype Float but F has dtype Double"):
        ops.bgk_residuals(*bad)
    half = [x.half() for x in a]
    with pytest.raises(TypeError, match="must be float32 or float64"):
        K.bgk_residuals(*half)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        ops.bgk_residuals(*half)
    # Device mismatch: meta stands in for a second device on a machine without a GPU.
    bad = list(a)
    bad[10] = a[10].to("meta")
    with pytest.raises(ValueError, match="w is on meta but F is on cpu"):
        K.bgk_residuals(*bad)
    with pytest.raises(ValueError, match="w is on meta but F is on cpu"):
        ops.bgk_residuals(*bad)  # dispatches to the fake (meta) kernel, which checks too
    # V = 0
    z = bgk_inputs(4, 0)
    with pytest.raises(ValueError, match="V = 0"):
        K.bgk_residuals(*z)
    with pytest.raises(RuntimeError, match="V = 0"):
        ops.bgk_residuals(*z)


def test_errors_transport_and_small_ops():
    t = transport_inputs(5, 30)
    bad = list(t)
    bad[2] = t[2][:4]
    with pytest.raises(ValueError, match="Graw_x has shape"):
        K.transport_mm_residuals(*bad)
    with pytest.raises(RuntimeError, match="Graw_x has shape"):
        ops.transport_mm_residuals(*bad)
    bad = list(t)
    bad[7] = torch.ones(5, 1, dtype=f64)
    with pytest.raises(ValueError, match="eps must be"):
        K.transport_mm_residuals(*bad)
    bad = list(t)
    bad[3] = t[3].to("meta")
    with pytest.raises(ValueError, match="rho_t is on meta"):
        K.transport_mm_residuals(*bad)
    z = torch.zeros(3, 0, dtype=f64)
    e = torch.zeros(0, dtype=f64)
    with pytest.raises(RuntimeError, match="V = 0"):
        ops.transport_mm_residuals(z, z, z, torch.zeros(3, dtype=f64), torch.zeros(3, dtype=f64), e, e,
                                   torch.tensor(0.1, dtype=f64))
    with pytest.raises(RuntimeError, match="order must be >= 0"):
        ops.velocity_moments(t[0], t[5], t[6], -1)
    with pytest.raises(RuntimeError, match="V = 0"):
        ops.maxwellian(t[3], t[3], t[3], e)
    with pytest.raises(RuntimeError, match=r"u must be \[N\]"):
        ops.maxwellian(t[3], t[3][:2], t[3], t[5])
    with pytest.raises(TypeError, match="order must be an int"):
        K.velocity_moments(t[0], t[5], t[6], 2.0)


def test_errors_loss_forms():
    # Every check names the op that was called, its own arguments included.
    a, t = bgk_inputs(5, 30), transport_inputs(5, 30)
    bad = list(a)
    bad[1] = a[1][:4]
    with pytest.raises(ValueError, match="bgk_residuals_sq: Ft has shape"):
        K.bgk_residuals_sq(*bad)
    with pytest.raises(RuntimeError, match="bgk_residuals_sq: Ft has shape"):
        ops.bgk_residuals_sq(*bad)
    bad = list(t)
    bad[7] = torch.ones(5, 1, dtype=f64)
    with pytest.raises(ValueError, match="transport_mm_residuals_sq: eps must be"):
        K.transport_mm_residuals_sq(*bad)
    q, g3 = torch.zeros(5, dtype=f64), torch.zeros(5, 3, dtype=f64)
    with pytest.raises(RuntimeError, match=r"bgk_residuals_sq_backward: grad_kinetic_sq must be \[N\]"):
        ops.bgk_residuals_sq_backward(torch.zeros(5, 30, dtype=f64), g3, g3, *a)
    with pytest.raises(RuntimeError, match=r"bgk_residuals_sq_backward: grad_consistency must be \[N, 3\]"):
        ops.bgk_residuals_sq_backward(q, g3, q, *a)
    with pytest.raises(RuntimeError, match=r"transport_mm_residuals_sq_backward: grad_macro must be \[N\]"):
        ops.transport_mm_residuals_sq_backward(q, q[:3], t[0], t[1], t[2], t[4], t[5], t[6], t[7])
    with pytest.raises(RuntimeError, match="transport_mm_residuals_sq_backward: rho_x has dtype"):
        ops.transport_mm_residuals_sq_backward(q, q, t[0], t[1], t[2], t[4].float(), t[5], t[6], t[7])
    with pytest.raises(RuntimeError, match="bgk_residuals_sq_backward is the fused first-order backward kernel"):
        ops.bgk_residuals_sq_backward(q.requires_grad_(), g3, g3, *a)


# --- properties of exact data -------------------------------------------------------------------


def _maxwellian_derivs(rho, u, T, v, rho_d, u_d, T_d):
    """d/ds M[rho(s), u(s), T(s)](v) by the chain rule."""
    M = ref_maxwellian(rho, u, T, v)
    d = v - u[:, None]
    return M * (rho_d / rho)[:, None] + M * d / T[:, None] * u_d[:, None] + M * (
        (d**2 - T[:, None]) / (2 * T[:, None] ** 2)
    ) * T_d[:, None]


def test_maxwellian_moments_property():
    # 64-node Gauss-Legendre on [-10, 10] integrates the Maxwellian's moments to round-off for
    # T <= 1.5, |u| <= 0.5 (the tails beyond |v| = 10 are below 1e-15).
    v, w = K.gauss_legendre(64, -10.0, 10.0)
    N = 50
    gen = torch.Generator().manual_seed(51)
    rho = 0.5 + torch.rand(N, generator=gen, dtype=f64)
    u = torch.rand(N, generator=gen, dtype=f64) - 0.5
    T = 0.5 + torch.rand(N, generator=gen, dtype=f64)
    m = K.velocity_moments(K.maxwellian(rho, u, T, v), v, w, 3)
    exact = torch.stack([rho, rho * u, rho * (u**2 + T), rho * (u**3 + 3 * u * T)], 1)
    assert_close(m, exact, rtol=1e-12, atol=1e-12)


def test_bgk_residuals_vanish_on_euler_data():
    """F = M[rho, u, T] with (rho_t, u_t, T_t) from the Euler equations (gamma = 3, p = rho T).

    Then consistency = 0 and conservation = 0 at quadrature accuracy, because
    sum w v^k M gives rho, rho u, rho (u^2 + T), rho (u^3 + 3 u T) and the conservation rows
    are the Euler equations; and kinetic = kn (Ft + v Fx) exactly since M - F = 0.
    """
    v, w = K.gauss_legendre(64, -10.0, 10.0)
    x = torch.linspace(-0.5, 0.5, 41, dtype=f64)
    # Smooth states of the case-I type (values in the range of the BGK test problems).
    rho = 1.0 + 0.4 * torch.sin(math.pi * x)
    rho_x = 0.4 * math.pi * torch.cos(math.pi * x)
    u = 0.3 * torch.cos(2 * x)
    u_x = -0.6 * torch.sin(2 * x)
    T = 1.1 - 0.3 * x**2
    T_x = -0.6 * x
    p_x = rho_x * T + rho * T_x
    rho_t = -(rho_x * u + rho * u_x)
    u_t = -(u * u_x + p_x / rho)
    p_t = -u * p_x - 3.0 * rho * T * u_x  # p_t + u p_x + gamma p u_x = 0
    T_t = (p_t - T * rho_t) / rho
    F = ref_maxwellian(rho, u, T, v)
    Fx = _maxwellian_derivs(rho, u, T, v, rho_x, u_x, T_x)
    Ft = _maxwellian_derivs(rho, u, T, v, rho_t, u_t, T_t)
    kn = torch.full_like(x, 1e-3)
    kin, cons, consis = K.bgk_residuals(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
    assert consis.abs().max() < 1e-12
    assert cons.abs().max() < 1e-11
    assert_close(kin, 1e-3 * (Ft + v * Fx), rtol=1e-10, atol=1e-15)
    # The same data with a wrong temperature derivative must not pass (the test can fail).
    _, cons_bad, _ = K.bgk_residuals(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t + 0.1, v, w, kn)
    assert cons_bad[:, 2].abs().min() > 1e-3


def _diffusion_solution(t, x, terms=80):
    """rho = 1 - x - sum 2/(n pi) sin(n pi x) exp(-n^2 pi^2 t / 3) and its derivatives."""
    n = torch.arange(1, terms + 1, dtype=f64)[:, None]
    a = (2.0 / (n * math.pi)) * torch.exp(-(n**2) * math.pi**2 * t / 3.0)
    s, c = torch.sin(n * math.pi * x), torch.cos(n * math.pi * x)
    k = n * math.pi
    rho_x = -1.0 - (a * k * c).sum(0)
    rho_xx = (a * k**2 * s).sum(0)
    # d a_n / dt = -(k^2 / 3) a_n, differentiated term by term (independently of rho_xx / 3).
    rho_t = (a * (k**2 / 3.0) * s).sum(0)
    rho_xt = (a * (k**2 / 3.0) * k * c).sum(0)
    return rho_t, rho_x, rho_xx, rho_xt


def test_transport_residuals_diffusion_limit():
    """g = -v rho_x (first-order Chapman-Enskog) with rho solving rho_t = rho_xx / 3.

    Derivation: with <v> = 0 and <v^2> = 1/3 (30-node Gauss-Legendre is exact for both),
        g = -v rho_x, g_t = -v rho_xt, g_x = -v rho_xx, <v g_x> = -rho_xx / 3, so
        macro = rho_t - rho_xx / 3 = 0                       (up to round-off)
        micro = -eps (v^2 - 1/3) rho_xx - eps^2 v rho_xt   = O(eps).
    A per-row constant added to g_raw (and its derivatives) must be projected out.
    """
    v, w = K.gauss_legendre(30)
    tt, xx = torch.meshgrid(torch.tensor([0.02, 0.05, 0.1], dtype=f64), torch.linspace(0.05, 0.95, 19, dtype=f64),
                            indexing="ij")
    t, x = tt.reshape(-1), xx.reshape(-1)
    rho_t, rho_x, rho_xx, rho_xt = _diffusion_solution(t, x)
    c, c_t, c_x = torch.sin(3 * x) + t, 1.0 + 0 * x, 3 * torch.cos(3 * x)  # the constant to project out
    Graw = -v * rho_x[:, None] + c[:, None]
    Graw_t = -v * rho_xt[:, None] + c_t[:, None]
    Graw_x = -v * rho_xx[:, None] + c_x[:, None]
    scale = rho_xx.abs().max()
    for eps in (1e-1, 1e-2, 1e-3):
        g, micro, macro = K.transport_mm_residuals(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps)
        assert_close(g, -v * rho_x[:, None], rtol=1e-12, atol=1e-12)
        assert macro.abs().max() < 1e-12 * scale
        lead = -eps * (v**2 - 1.0 / 3.0) * rho_xx[:, None]
        assert (micro - lead).abs().max() <= 1.01 * eps**2 * (v * rho_xt[:, None]).abs().max() + 1e-12 * scale
        assert micro.abs().max() <= 1.01 * eps * (2.0 / 3.0) * rho_xx.abs().max() + 1.01 * eps**2 * rho_xt.abs().max()
    # Wrong sign of the Chapman-Enskog closure: micro is O(1), not O(eps).
    _, micro_bad, _ = K.transport_mm_residuals(-Graw, -Graw_t, -Graw_x, rho_t, rho_x, v, w, 1e-3)
    assert micro_bad.abs().max() > 0.5


# --- CUDA -----------------------------------------------------------------------------------------


def _to(args, device):
    out = []
    for a in args:
        b = a.detach().to(device)
        if a.requires_grad:
            b.requires_grad_(True)
        out.append(b)
    return out


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,V", [(1, 30), (257, 64), (1000, 30), (33, 17), (70, 100), (19, 200), (0, 30)])
@pytest.mark.parametrize("param", ["row", "scalar"])
def test_cuda_matches_cpu(N, V, dtype, param):
    # float32: the CUDA kernels accumulate in float32, the CPU ones in float64; sums of up to
    # 200 terms of size ~10 (v up to 10) differ by ~1e-5 in absolute terms.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == f64 else dict(rtol=1e-4, atol=1e-4)
    for fn, make in ((K.bgk_residuals, lambda: bgk_inputs(N, V, dtype, kn=param, seed=61, requires_grad=True)),
                     (K.transport_mm_residuals,
                      lambda: transport_inputs(N, V, dtype, eps=param, seed=62, requires_grad=True))):
        cpu = make()
        dev = _to(cpu, "cuda")
        out_c, out_d = fn(*cpu), fn(*dev)
        for a, b in zip(out_c, out_d):
            torch.testing.assert_close(b.cpu(), a, **tol)
        gen = torch.Generator().manual_seed(3)
        up = [torch.randn(o.shape, generator=gen, dtype=f64).to(dtype) for o in out_c]
        lc = [a for a in cpu if a.requires_grad]
        ld = [a for a in dev if a.requires_grad]
        gc = torch.autograd.grad(sum((o * u).sum() for o, u in zip(out_c, up)), lc)
        gd = torch.autograd.grad(sum((o * u.cuda()).sum() for o, u in zip(out_d, up)), ld)
        for a, b in zip(gc, gd):
            torch.testing.assert_close(b.cpu(), a, **tol)
    F, _, _, rho, u, T, *_r, v, w, _ = bgk_inputs(N, V, dtype, seed=63, requires_grad=True)
    Fd, rd, ud, Td, vd, wd = _to([F, rho, u, T, v, w], "cuda")
    torch.testing.assert_close(K.velocity_moments(Fd, vd, wd, 4).cpu(), K.velocity_moments(F, v, w, 4), **tol)
    torch.testing.assert_close(K.maxwellian(rd, ud, Td, vd).cpu(), K.maxwellian(rho, u, T, v), **tol)
    g = torch.randn(N, 5, dtype=dtype)
    torch.testing.assert_close(ops.velocity_moments_backward(g.cuda(), vd, wd).cpu(),
                               ops.velocity_moments_backward(g, v, w), **tol)
    gm = torch.randn(N, V, dtype=dtype)
    for a, b in zip(ops.maxwellian_backward(gm.cuda(), rd.detach(), ud.detach(), Td.detach(), vd),
                    ops.maxwellian_backward(gm, rho.detach(), u.detach(), T.detach(), v)):
        torch.testing.assert_close(a.cpu(), b, **tol)


@cuda
@needs_cuda
def test_cuda_opcheck_and_errors():
    args = _to(bgk_inputs(6, 30, seed=71, requires_grad=True), "cuda")
    torch.library.opcheck(ops.bgk_residuals.default, args)
    targs = _to(transport_inputs(6, 30, seed=72, requires_grad=True), "cuda")
    torch.library.opcheck(ops.transport_mm_residuals.default, targs)
    bad = [a.detach() for a in args]
    bad[9] = bad[9].cpu()
    with pytest.raises(ValueError, match="v is on cpu but F is on cuda"):
        K.bgk_residuals(*bad)
    with pytest.raises(RuntimeError, match="v is on cpu but F is on cuda"):
        ops.bgk_residuals(*bad)


# --- the loss forms (*_sq ops), device against the residual ops' CPU kernels -----------------------


def loss_forms_match_references(sq_ops, device, N, V, param):
    """The four *_sq ops of ``sq_ops`` on ``device`` (float64) against (a) the residual ops' CPU
    kernels composed as the loss forms are defined and (b) autograd through the plain-PyTorch
    references. Tolerances: (a) rtol 1e-12 (only summation order and FMA contraction differ);
    (b) 1e-10, since autograd sums the same products in another order and the kn / eps
    gradients are sums of up to 200 terms of size ~1e2 that partly cancel."""
    exact, loose = dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-10, atol=1e-10)
    gen = torch.Generator().manual_seed(N * 1000 + V)
    q, gc = torch.rand(N, generator=gen, dtype=f64), torch.randn(N, generator=gen, dtype=f64)
    gC, gS = torch.randn(N, 3, generator=gen, dtype=f64), torch.randn(N, 3, generator=gen, dtype=f64)
    on = lambda args: [a.to(device) for a in args]  # noqa: E731

    def close(got, want, tol, what):
        assert len(got) == len(want), what
        for k, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a.cpu(), b, msg=lambda m: f"{what}, output {k}: {m}", **tol)

    bgk = bgk_inputs(N, V, kn=param, seed=81)
    kin, cons, consis = ops.bgk_residuals(*bgk)
    close(sq_ops.bgk_residuals_sq.default(*on(bgk)), ((kin**2).sum(1), cons, consis), exact, "bgk_residuals_sq")
    grads = sq_ops.bgk_residuals_sq_backward.default(*on([q, gC, gS, *bgk]))
    close(grads, ops.bgk_residuals_backward(2 * q[:, None] * kin, gC, gS, *bgk[1:]), exact, "bgk_residuals_sq_backward")
    leaves = [a.requires_grad_(True) for k, a in enumerate(bgk) if k not in (9, 10)]  # all but v, w
    kin, cons, consis = ref_bgk(*bgk)
    want = torch.autograd.grad((q * (kin**2).sum(1)).sum() + (gC * cons).sum() + (gS * consis).sum(), leaves)
    if param == "scalar":  # the op gives kn's gradient per row
        grads = (*grads[:-1], grads[-1].sum())
    close(grads, want, loose, "bgk_residuals_sq_backward vs autograd")

    tr = transport_inputs(N, V, eps=param, seed=82)
    G, Gt, Gx, rho_t, rho_x, v, w, eps = tr
    _, micro, macro = ops.transport_mm_residuals(*tr)
    close(sq_ops.transport_mm_residuals_sq.default(*on(tr)), ((micro**2).sum(1), macro), exact,
          "transport_mm_residuals_sq")
    grads = sq_ops.transport_mm_residuals_sq_backward.default(*on([q, gc, G, Gt, Gx, rho_x, v, w, eps]))
    want = ops.transport_mm_residuals_backward(torch.zeros_like(micro), 2 * q[:, None] * micro, gc, Gt, Gx, v, w, eps)
    close(grads, want, exact, "transport_mm_residuals_sq_backward")
    leaves = [a.requires_grad_(True) for a in (G, Gt, Gx, rho_x, eps)]
    _, micro, macro = ref_transport(G, Gt, Gx, rho_t, rho_x, v, w, eps)
    want = torch.autograd.grad((q * (micro**2).sum(1)).sum() + (gc * macro).sum(), leaves)
    if param == "scalar":
        grads = (*grads[:-1], grads[-1].sum())
    close(grads, want, loose, "transport_mm_residuals_sq_backward vs autograd")


@cuda
@pytest.mark.parametrize("N,V", [(1, 30), (257, 64), (19, 200), (0, 30)])
def test_cpu_loss_forms(N, V):
    loss_forms_match_references(ops, "cpu", N, V, "row")


@needs_cuda
@pytest.mark.parametrize("N,V", [(1, 30), (1000, 30), (257, 64), (70, 100), (19, 200), (0, 30)])
@pytest.mark.parametrize("param", ["row", "scalar"])
def test_cuda_loss_forms(N, V, param):
    # (1000, 30): several blocks; V = 100 / 200: 32 lanes per row, values in registers / re-read.
    loss_forms_match_references(ops, "cuda", N, V, param)
