"""The CUDA kernels against the CPU kernels, on every CI run, without a GPU.

Each test runs on two CUDA backends: ``emulated`` (every csrc/**/*_cuda.cu compiled for the
CPU emulator of tests/cuda_emu, ops ``torch.ops.hrgrad_ext_emu`` on CPU tensors; marker
``cuda_emu``) and ``gpu`` (the real kernels on a CUDA device; marker ``cuda``, skipped without
one). The reference is always the CPU kernel of the same op (``torch.ops.hrgrad_ext`` on CPU
tensors), itself tested against plain PyTorch in test_gram_ops.py / test_kinetic_ops.py.

Outputs are allocated filled with NaN (``fill_uninitialized_memory``), so an element that no
thread writes fails. Tolerances: float64 1e-12 (CUDA contracts FMAs and sums in another
order); float32 1e-5 relative (the CUDA kinetic kernels accumulate in float32, the CPU ones in
float64); float16/bfloat16 inputs 1e-2 where the output is in that type.
Self-tests of the emulator (planted bugs, launch limits) are at the end.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import test_bad_numeric_inputs as bad_inputs
from cuda_emu import emulation

CPU = torch.ops.hrgrad_ext
f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LENGTH_MODELS = ("projection", "min", "max", "harmonic", "arithmetic", "geometric")
ASAN = os.environ.get("HRGRAD_CUDA_EMU_ASAN") == "1"


class Backend:
    """A CUDA implementation of the ops: ``ops`` taking tensors on ``device``."""

    def __init__(self, name, ops, device):
        self.name, self.ops, self.device = name, ops, device

    def __call__(self, op, *args, **kwargs):
        """Runs op on this backend (tensor arguments moved there) and returns CPU tensors."""
        moved = [a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args]
        return _to_cpu(getattr(self.ops, op)(*moved, **kwargs))


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(y) for y in x)
    return x


@pytest.fixture(scope="module")
def emulated_ops():
    return emulation.load(asan=ASAN)


@pytest.fixture(params=[pytest.param("emulated", marks=pytest.mark.cuda_emu), pytest.param("gpu", marks=pytest.mark.cuda)])
def backend(request):
    if request.param == "gpu":
        return Backend("gpu", torch.ops.hrgrad_ext, "cuda")
    return Backend("emulated", request.getfixturevalue("emulated_ops"), "cpu")


@pytest.fixture(scope="module")
def control(emulated_ops):
    return emulation.control()


@pytest.fixture(autouse=True, scope="module")
def _unwritten_outputs_are_nan():
    # warn_only: on a GPU, cuBLAS matmul would otherwise demand CUBLAS_WORKSPACE_CONFIG
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


def tol(dtype):
    return {f64: dict(rtol=1e-12, atol=1e-12), f32: dict(rtol=1e-5, atol=1e-5)}.get(dtype, dict(rtol=1e-2, atol=1e-2))


def assert_same(got, want, what, **tolerance):
    """Tensors or tuples of tensors; integer tensors (status flags) exactly."""
    if isinstance(want, (tuple, list)):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{what}, output {i}", **tolerance)
        return
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    if want.is_floating_point():
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{what}: {m}", **tolerance)
    else:
        assert torch.equal(got, want), f"{what}: {got.flatten()[:8]} vs {want.flatten()[:8]}"


def describe(**tensors):
    return " ".join(
        f"{k}{list(t.shape)} {str(t.dtype)[6:]}{'' if t.is_contiguous() else ' strided'}" for k, t in tensors.items()
    )


# ==== gram ===========================================================================================
# Paths: K <= 8 registers, K <= 16 / 32 / 64 shared-memory tiles, K > 64 chunked float64 GEMM.


@pytest.mark.parametrize("K", [1, 2, 3, 8, 9, 16, 17, 32, 33, 64, 65, 130])
def test_gram(backend, K):
    gen = torch.Generator().manual_seed(K)
    for n in (1, 7, 1000, 3000):  # 3000: several blocks per entry on every path
        for dtype in (f32, f64, f16, bf16):
            J = torch.randn(K, n, generator=gen, dtype=f64).to(dtype)
            for out in (None, f32, f64):
                want = CPU.gram(J, out)
                # the CPU and (since issue 9) the CUDA kernels accumulate in float64
                t = dict(rtol=1e-12, atol=1e-12 * n) if want.dtype == f64 else dict(rtol=2e-7, atol=1e-7 * n)
                assert_same(backend("gram", J, out), want, describe(J=J) + f" dtype={out}", **t)


def test_gram_batched_strided_one_sm(backend, request):
    # One multiprocessor (emulated): each block strides over many chunks of columns.
    control = request.getfixturevalue("control") if backend.name == "emulated" else None
    if control:
        control.configure(1)
    try:
        gen = torch.Generator().manual_seed(1)
        for K in (3, 8, 16, 20, 40):
            J = torch.randn(3, 2 * 2100, K, generator=gen, dtype=f64)[:, ::2, :].transpose(1, 2)
            for dtype in (f64, f32):
                Jd = J.to(dtype)
                assert_same(backend("gram", Jd, f64), CPU.gram(Jd, f64), describe(J=Jd), rtol=1e-12, atol=1e-11)
    finally:
        if control:
            control.configure()


def test_gram_empty_batch(backend):
    J = torch.randn(0, 3, 10)
    assert_same(backend("gram", J), CPU.gram(J), "empty batch")


# ==== hrgrad_weights =================================================================================


def gram_batch(K, dtype, gen):
    """[6, K, K]: full rank, rank deficient, a zero task, scales 1e-3..1e3, cancelling pairs, NaN."""
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=f64)

    zero, cancel = r(K, 30), r(1, 30).repeat(K, 1)
    zero[0] = 0
    cancel[1::2] *= -1
    scaled = r(K, 30) * torch.logspace(-3, 3, K, dtype=f64)[:, None]
    G = torch.stack([J @ J.T for J in (r(K, 50), r(K, max(1, K // 2)), zero, scaled, cancel, r(K, 30))])
    G[5, 0, 0] = float("nan")
    return G.to(dtype)


def assert_weights(got, want, what, rtol):
    """Status flags exactly, weights within rtol, those of the dual-cone fallback included (an
    exact active-set solve: a rounding-level change of G, such as an FMA, moves them by a
    rounding-level amount)."""
    (w, status), (w0, status0) = got, want
    assert_same(status, status0, what + ": status")
    K = w.shape[-1]
    for b, (wb, wb0, sb) in enumerate(zip(w.reshape(-1, K), w0.reshape(-1, K), status0.flatten())):
        assert_same(wb, wb0, f"{what}: entry {b} (status {int(sb)})", rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 16, 17, 33, 42, 43, 60])
def test_hrgrad_weights(backend, K):
    # 16 / 17: one thread / a warp solves (17: most lanes idle in each rotation; 33: a lane
    # updates two elements); 42 / 43: the solver's scratch (3 K^2 + 15 K doubles) fits in 48 KB
    # of shared memory / goes to global memory
    gen = torch.Generator().manual_seed(K)
    for dtype in (f32, f64):
        G = gram_batch(K, dtype, gen)
        for lm in LENGTH_MODELS:
            assert_weights(backend("hrgrad_weights", G, lm), CPU.hrgrad_weights(G, lm), describe(G=G) + " " + lm,
                           rtol=1e-9 if dtype == f64 else 1e-6)
        assert_weights(backend("hrgrad_weights", G[0], "projection", 1e-6), CPU.hrgrad_weights(G[0], "projection", 1e-6),
                       describe(G=G[0]) + " rcond=1e-6", rtol=1e-9)
    G = torch.zeros(0, 3, 3)
    assert_weights(backend("hrgrad_weights", G), CPU.hrgrad_weights(G), "empty batch", rtol=0)


# ==== dual_cone_weights, mgda_weights (the exact cone solves of UPGrad and MGDA) ======================


def cone_batch(K, dtype, gen):
    """gram_batch plus task sets of rank K // 2 with and without a common descent direction
    (non-trivial and trivial dual cones)."""
    wide = torch.randn(2, K, max(1, K // 2), generator=gen, dtype=f64)
    wide[0, :, 0] = wide[0, :, 0].abs()
    return torch.cat([gram_batch(K, f64, gen), wide @ wide.transpose(1, 2)]).to(dtype)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 8, 16, 33, 60])
def test_cone_weights(backend, K):
    gen = torch.Generator().manual_seed(K)
    for dtype in (f32, f64):
        G = cone_batch(K, dtype, gen)
        r = dict(rtol=1e-9, atol=1e-11) if dtype == f64 else dict(rtol=1e-5, atol=1e-6)
        U = torch.rand(G.shape[0], 3, K, generator=gen, dtype=f64).to(dtype)
        eye = torch.eye(K, dtype=dtype).expand(G.shape[0], K, K).contiguous()
        for targets in (eye, U):
            assert_same(backend("dual_cone_weights", G, targets), CPU.dual_cone_weights(G, targets),
                        "dual_cone_weights " + describe(G=G, U=targets), **r)
        assert_same(backend("dual_cone_weights", G[0], U[0], 1e-6), CPU.dual_cone_weights(G[0], U[0], 1e-6),
                    "dual_cone_weights rcond=1e-6 " + describe(G=G[0]), **r)
        assert_same(backend("mgda_weights", G), CPU.mgda_weights(G), "mgda_weights " + describe(G=G), **r)
    empty = torch.zeros(0, 3, 3)
    assert_same(backend("dual_cone_weights", empty, torch.zeros(0, 2, 3)), CPU.dual_cone_weights(empty, torch.zeros(0, 2, 3)),
                "empty batch")
    assert_same(backend("mgda_weights", empty), CPU.mgda_weights(empty), "empty batch")


def test_cone_weights_threads_stride_over_the_problems(backend):
    # 64 x 64 projections at K = 64 need more scratch than the budget of one thread per
    # projection: fewer threads each solve several.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 64, 20, generator=gen, dtype=f64)
    G = X @ X.transpose(1, 2)
    eye = torch.eye(64, dtype=f64).expand(64, 64, 64).contiguous()
    assert_same(backend("dual_cone_weights", G, eye), CPU.dual_cone_weights(G, eye), describe(G=G), rtol=1e-9, atol=1e-11)


# ==== combine, combine_accumulate_ ===================================================================


def accumulate(cuda_or_cpu, out, J, w):
    out = out.clone()
    if isinstance(cuda_or_cpu, Backend):
        dev = out.to(cuda_or_cpu.device)
        cuda_or_cpu.ops.combine_accumulate_(dev, J.to(cuda_or_cpu.device), w.to(cuda_or_cpu.device))
        return dev.cpu()
    cuda_or_cpu.combine_accumulate_(out, J, w)
    return out


@pytest.mark.parametrize("K", [1, 3, 8, 64, 100])
def test_combine(backend, K):
    gen = torch.Generator().manual_seed(K)
    for n in (1, 5, 1025):
        for dtype in (f32, f64, f16, bf16):
            J = torch.randn(2, K, n, generator=gen, dtype=f64).to(dtype)
            w = torch.randn(K, 2, generator=gen, dtype=f64).T  # strided [2, K]
            for wd in (f64, f32):
                wb = w.to(wd)
                assert_same(backend("combine", J, wb), CPU.combine(J, wb), describe(J=J, w=wb), **tol(dtype))
            assert_same(backend("combine", J[0], w[0]), CPU.combine(J[0], w[0]), describe(J=J[0], w=w[0]), **tol(dtype))
            Jp, out = J[0].reshape(K, 1, n), torch.randn(1, n, generator=gen, dtype=f64).to(dtype)
            assert_same(accumulate(backend, out, Jp, w[0]), accumulate(CPU, out, Jp, w[0]),
                        "combine_accumulate_ " + describe(out=out, J=Jp), **tol(dtype))
    J, w = torch.randn(0, K, 10), torch.randn(0, K)
    assert_same(backend("combine", J, w), CPU.combine(J, w), "empty batch")


# ==== kinetic ops, forward and backward ==============================================================


def rand(gen, *shape, lo=-1.0, hi=1.0, dtype=f64):
    return (lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=f64)).to(dtype)


def strided(t):
    """The same values in a non-contiguous tensor."""
    if t.dim() == 0:
        return t
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def kinetic_cases():
    # V: one node; 16, the transport (30) and BGK (64) rules, 100 and 128 (issue 10's range of
    # lanes kept busy); each side of the V at which the lanes per row change (16 | 17: 4 | 8,
    # 32 | 33: 8 | 16, 64 | 65: 16 | 32) and of the re-read variant (128 | 129), and 200. N
    # leaves the last warp's row segments partly past N (8 / 4 / 2 / 1 rows per warp).
    for N, V in ((0, 30), (1, 1), (13, 16), (6, 17), (33, 30), (5, 33), (9, 64), (7, 65), (5, 100), (3, 128),
                 (7, 129), (3, 200)):
        for dtype in (f32, f64):
            yield N, V, dtype


def _f64(args):
    return [a.to(f64) if isinstance(a, torch.Tensor) else a for a in args]


def _cast(outs, dtype):
    return tuple(o.to(dtype) for o in outs)


# The loss forms (*_sq ops) against compositions of the residual ops' CPU kernels, computed in
# float64 and rounded to the dtype at the end: kinetic_sq = (kin ** 2).sum(1), and the fused
# backward = the residual op's backward with grad_kinetic = 2 q[:, None] kin (transport: grad_g
# = 0, grad_micro = 2 q[:, None] micro).
def bgk_sq_reference(bgk, q, gC, gS):
    bgk, (q, gC, gS) = _f64(bgk), _f64((q, gC, gS))
    kin, cons, consis = CPU.bgk_residuals(*bgk)
    forward = ((kin**2).sum(1), cons, consis)
    backward = CPU.bgk_residuals_backward(2 * q[:, None] * kin, gC, gS, *bgk[1:])
    return forward, backward


def transport_sq_reference(tr, q, gc):
    tr, (q, gc) = _f64(tr), _f64((q, gc))
    G, Gt, Gx, rho_t, rho_x, v, w, eps = tr
    _, micro, macro = CPU.transport_mm_residuals(*tr)
    forward = ((micro**2).sum(1), macro)
    backward = CPU.transport_mm_residuals_backward(torch.zeros_like(micro), 2 * q[:, None] * micro, gc, Gt, Gx, v, w,
                                                   eps)
    return forward, backward


@pytest.mark.parametrize("N,V,dtype", list(kinetic_cases()))
def test_kinetic_ops(backend, N, V, dtype):
    gen = torch.Generator().manual_seed(N * 1000 + V)
    t = tol(dtype)
    if dtype == f32:
        t = dict(rtol=1e-4, atol=1e-4)  # float32 sums of up to 200 terms of size ~10 (v up to 10)
    v = torch.linspace(-10.0, 10.0, V, dtype=f64).to(dtype) if V > 1 else torch.zeros(1, dtype=dtype)
    w = rand(gen, V, lo=0.1, hi=1.0, dtype=dtype)
    rows = lambda lo=-1.0, hi=1.0: rand(gen, N, lo=lo, hi=hi, dtype=dtype)  # noqa: E731
    field = lambda: rand(gen, N, V, dtype=dtype)  # noqa: E731
    rho, u, T = rows(0.5, 1.5), rows(-0.5, 0.5), rows(0.5, 1.5)
    for layout in (lambda x: x, strided):
        F, Ft, Fx = layout(field()), layout(field()), layout(field())
        for kn in (rows(1e-3, 1.0), torch.tensor(0.37, dtype=dtype)):
            what = describe(F=F, kn=kn)
            bgk = (F, Ft, Fx, layout(rho), u, T, rows(), rows(), rows(), v, w, kn)
            assert_same(backend("bgk_residuals", *bgk), CPU.bgk_residuals(*bgk), "bgk_residuals " + what, **t)
            grads = (field(), rand(gen, N, 3, dtype=dtype), layout(rand(gen, N, 3, dtype=dtype)))
            back = (*grads, Ft, Fx, *bgk[3:])
            assert_same(backend("bgk_residuals_backward", *back), CPU.bgk_residuals_backward(*back),
                        "bgk_residuals_backward " + what, **t)
            tr = (F + 2.0, Ft - 1.0, layout(Fx + 0.5), rows(), rows(), v, w, kn)
            assert_same(backend("transport_mm_residuals", *tr), CPU.transport_mm_residuals(*tr),
                        "transport_mm_residuals " + what, **t)
            tback = (field(), layout(field()), rows(), Ft, Fx, v, w, kn)
            assert_same(backend("transport_mm_residuals_backward", *tback), CPU.transport_mm_residuals_backward(*tback),
                        "transport_mm_residuals_backward " + what, **t)
            # The loss forms, same tolerances: a sum of squares has no cancellation, so its
            # relative error is at most about twice the elements' (float32: ~1e-6 at V = 200).
            q = layout(rows(0.0, 1.0))
            forward, backward = bgk_sq_reference(bgk, q, *grads[1:])
            assert_same(backend("bgk_residuals_sq", *bgk), _cast(forward, dtype), "bgk_residuals_sq " + what, **t)
            assert_same(backend("bgk_residuals_sq_backward", q, *grads[1:], *bgk), _cast(backward, dtype),
                        "bgk_residuals_sq_backward " + what, **t)
            gc = rows()
            forward, backward = transport_sq_reference(tr, q, gc)
            assert_same(backend("transport_mm_residuals_sq", *tr), _cast(forward, dtype),
                        "transport_mm_residuals_sq " + what, **t)
            assert_same(backend("transport_mm_residuals_sq_backward", q, gc, *tr[:3], *tr[4:]), _cast(backward, dtype),
                        "transport_mm_residuals_sq_backward " + what, **t)
        for order in (0, 4):
            assert_same(backend("velocity_moments", F, v, w, order), CPU.velocity_moments(F, v, w, order),
                        f"velocity_moments order={order} " + describe(F=F), **t)
        g = layout(rand(gen, N, 5, dtype=dtype))
        assert_same(backend("velocity_moments_backward", g, v, w), CPU.velocity_moments_backward(g, v, w),
                    "velocity_moments_backward " + describe(grad=g), **t)
        assert_same(backend("maxwellian", layout(rho), u, T, v), CPU.maxwellian(layout(rho), u, T, v),
                    "maxwellian " + describe(rho=rho), **t)
        gm = layout(field())
        assert_same(backend("maxwellian_backward", gm, rho, u, T, v), CPU.maxwellian_backward(gm, rho, u, T, v),
                    "maxwellian_backward " + describe(grad=gm), **t)


def test_loss_forms_reject_bad_inputs(backend):
    # The checks of the *_sq ops (kinetic_common.h, shared with the CPU kernels): the grads of
    # the row sums are [N] rows, grad_conservation [N, 3], and the messages name the op.
    gen = torch.Generator().manual_seed(5)
    N, V = 4, 30
    field = lambda: torch.rand(N, V, generator=gen, dtype=f64)  # noqa: E731
    row = lambda lo=0.5: lo + torch.rand(N, generator=gen, dtype=f64)  # noqa: E731
    v, w = torch.linspace(-1.0, 1.0, V, dtype=f64), torch.full((V,), 2.0 / V, dtype=f64)
    bgk = (field(), field(), field(), row(), row(-0.5), row(), row(), row(), row(), v, w, row())
    q, g3 = row(), torch.zeros(N, 3, dtype=f64)
    tr = (field(), field(), field(), row(), row(), v, w, row())
    cases = [
        ("bgk_residuals_sq", (*bgk[:9], v[:-1], w, bgk[11]), r"v must be \[V\] = \[30\]"),
        ("bgk_residuals_sq_backward", (q[:-1], g3, g3, *bgk), r"grad_kinetic_sq must be \[N\]"),
        ("bgk_residuals_sq_backward", (q, g3[:, :2], g3, *bgk), r"grad_conservation must be \[N, 3\]"),
        ("bgk_residuals_sq_backward", (q, g3, g3.float(), *bgk), r"grad_consistency has dtype"),
        ("transport_mm_residuals_sq", (*tr[:7], torch.ones(2, dtype=f64)), r"eps must be \[N\]"),
        ("transport_mm_residuals_sq_backward", (q, q[:2], *tr[:3], *tr[4:]), r"grad_macro must be \[N\]"),
        ("transport_mm_residuals_sq_backward", (q[:, None], q, *tr[:3], *tr[4:]), r"grad_micro_sq must be \[N\]"),
    ]
    for op, args, message in cases:
        with pytest.raises((RuntimeError, ValueError), match=f"{op}: {message}"):
            backend(op, *args)
    # N = 0: empty outputs of the right shapes
    empty = [a[:0] if a.dim() and a.shape[0] == N else a for a in (*bgk, *tr)]
    assert [tuple(o.shape) for o in backend("bgk_residuals_sq", *empty[:12])] == [(0,), (0, 3), (0, 3)]
    assert [tuple(o.shape) for o in backend("transport_mm_residuals_sq_backward", q[:0], q[:0], *empty[12:15],
                                            *empty[16:])] == [(0, V)] * 3 + [(0,)] * 2


def test_maxwellian_extreme_exponents_and_nan(backend):
    # Exponents from 0 down to about -1e6 (exp underflows to 0) and a NaN u: the values, the
    # NaN rows and the backward sums as on the CPU.
    nan = float("nan")
    for dtype in (f32, f64):
        rho = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0], dtype=dtype)
        u = torch.tensor([0.0, 0.5, nan, 0.0, 3.0], dtype=dtype)
        T = torch.tensor([1e-4, 1.0, 1.0, 1e-6, 25.0], dtype=dtype)
        v = torch.linspace(-10.0, 10.0, 30, dtype=dtype)
        grad = torch.randn(5, 30, generator=torch.Generator().manual_seed(4), dtype=f64).to(dtype)
        t = dict(rtol=1e-12, atol=1e-300) if dtype == f64 else dict(rtol=1e-5, atol=1e-30)
        assert_same(backend("maxwellian", rho, u, T, v), CPU.maxwellian(rho, u, T, v), f"maxwellian {dtype}", **t)
        assert_same(backend("maxwellian_backward", grad, rho, u, T, v), CPU.maxwellian_backward(grad, rho, u, T, v),
                    f"maxwellian_backward {dtype}", rtol=t["rtol"] * 10, atol=1e-10 if dtype == f64 else 1e-4)


@pytest.mark.cuda_emu
@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c.name for c in bad_inputs.CASES])
def test_bad_numeric_input_like_the_formula(emulated_ops, case):
    # The cases of test_bad_numeric_inputs.py (NaN, Inf, T <= 0, kn = 0, eps = 0) on the
    # emulated CUDA kernels: the same non-finite entries as the formula, the rest equal to it.
    got, expected = bad_inputs.run_case(case, ops=emulated_ops, device="cpu")
    bad_inputs.check_case(case, got, expected)


# ==== defects of issue 9: each of these failed before its fix ======================================


def min_cosine(J, update):
    """Smallest cosine between the update and a task gradient (< 0: the update conflicts)."""
    J, update = J.double(), update.double()
    return (J @ update / (J.norm(dim=-1) * update.norm())).min().item()


RANK_DEFICIENT = {
    "K=3 > n=2": lambda g: torch.tensor([[1.0, 0.1], [0.3, 1.0], [-0.7, 0.4]], dtype=f64),
    "K=5 > n=3": lambda g: torch.randn(5, 3, generator=g, dtype=f64),
    "g3 = 3 g1": lambda g: (lambda a: torch.stack([a, torch.randn(1000, generator=g, dtype=f64), 3 * a]))(
        torch.randn(1000, generator=g, dtype=f64)),
    "g2 = -3 g1": lambda g: (lambda a: torch.stack([a, -3 * a]))(torch.randn(1000, generator=g, dtype=f64)),
    "g3 = g1 + g2": lambda g: (lambda a, b: torch.stack([a, b, a + b]))(
        torch.randn(4096, generator=g, dtype=f64), torch.randn(4096, generator=g, dtype=f64)),
}


@pytest.mark.parametrize("case", list(RANK_DEFICIENT))
@pytest.mark.parametrize("dtype", [f32, f64])
def test_rank_deficient_step_agrees_with_cpu(backend, case, dtype):
    # The HRGrad step G = gram(J, float64) -> hrgrad_weights(G) -> combine(J, w). CUDA used to
    # accumulate a float32 J in float32: G then carried ~1e-7 relative noise, far above the
    # default rcond of a float64 G, and a conflicting update came out with no RANK_DEFICIENT flag.
    J = RANK_DEFICIENT[case](torch.Generator().manual_seed(5)).to(dtype)
    G = backend("gram", J, f64)
    w, status = backend("hrgrad_weights", G, "projection")
    update = backend("combine", J, w)
    G0 = CPU.gram(J, f64)
    w0, status0 = CPU.hrgrad_weights(G0, "projection")
    assert int(status) == int(status0), f"{case}: status CUDA {int(status)}, CPU {int(status0)}"
    update0 = CPU.combine(J, w0)
    if update0.abs().max() > 0:
        assert min_cosine(J, update) > -1e-6, f"{case}: the CUDA update conflicts with a task"
    torch.testing.assert_close(update.double(), update0.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("K,dtype", [(6145, f64), (12289, f32), (40000, f64)])
def test_combine_many_tasks(backend, K, dtype):
    # The weights used to be staged in dynamic shared memory: more than 48 KB from 6145 float64
    # (12289 float32) tasks, and the launch failed. Every K the CPU accepts must work.
    gen = torch.Generator().manual_seed(K)
    J, w = torch.randn(K, 3, generator=gen, dtype=dtype), torch.randn(K, generator=gen, dtype=dtype)
    out = torch.randn(3, generator=gen, dtype=dtype)
    t = dict(rtol=1e-10, atol=1e-10) if dtype == f64 else dict(rtol=1e-4, atol=1e-4)
    assert_same(backend("combine", J, w), CPU.combine(J, w), describe(J=J), **t)
    assert_same(accumulate(backend, out, J, w), accumulate(CPU, out, J, w), "combine_accumulate_ " + describe(J=J), **t)


def test_batch_above_grid_limit(backend):
    # gram and combine used to put the batch on gridDim.y (at most 65535 blocks).
    B = 65537
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(B, 1, 2, generator=gen)
    assert_same(backend("gram", J, f64), CPU.gram(J, f64), describe(J=J), rtol=1e-12, atol=1e-12)
    w = torch.randn(B, 1, generator=gen)
    assert_same(backend("combine", J, w), CPU.combine(J, w), describe(J=J, w=w), rtol=1e-6, atol=1e-6)
    G = torch.rand(B, 1, 1, generator=gen, dtype=f64) + 0.5
    assert_weights(backend("hrgrad_weights", G, "projection"), CPU.hrgrad_weights(G, "projection"), describe(G=G),
                   rtol=1e-12)


def test_gram_many_tasks_full_precision_in_chunks(backend):
    # K > 64 goes to a GEMM. It used to convert the whole J to float64 first (52 GB at K = 65,
    # n = 1e8) and, for a float32 output, to run the GEMM in float32 (TF32 when enabled).
    # Now it converts chunks of columns and accumulates in float64: at most a chunk of extra
    # memory, and the CPU kernel's precision.
    K, n = 65, 300_000
    J = torch.randn(K, n, generator=torch.Generator().manual_seed(2))
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        exact = CPU.gram(J, f64)  # float64 products and sums on the CPU too
        assert_same(backend("gram", J, f64), exact, describe(J=J) + " dtype=float64", rtol=1e-12, atol=1e-9)
        # A float32 result: the CUDA GEMM path rounds its float64 sum once, so it is compared
        # with the float64 result at the rounding of float32. (The CPU kernel's float32 lanes
        # are documented looser, 33 u32 of sum |J_i J_k|: it is not the yardstick here.)
        assert_same(backend("gram", J, f32), exact.float(), describe(J=J) + " dtype=float32", rtol=2.0**-22, atol=1e-30)  # 1 ulp apart at most
        if backend.name == "gpu":
            torch.cuda.reset_peak_memory_stats()
            Jd = J.cuda()
            base = torch.cuda.max_memory_allocated()
            torch.ops.hrgrad_ext.gram(Jd, f64)
            extra = torch.cuda.max_memory_allocated() - base
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                backend.ops.gram(J, f64)
            extra = peak_allocated(prof)
        assert extra < 0.5 * J.numel() * 8, f"gram allocated {extra} bytes for a {K} x {n} float32 J"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def peak_allocated(prof):
    """Largest number of bytes the profiled code held at once (CPU allocations)."""
    events = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.cpu_memory_usage
        peak = max(peak, held)
    return peak


def test_python_float_param_is_not_copied_from_the_host():
    # kn / eps given as a Python float used to become torch.tensor(x, device=...): a blocking
    # host-to-device copy on every call, which also breaks CUDA-graph capture. The value must
    # reach the device as the argument of a fill (aten::full), never as host data (a tensor
    # made from Python data: aten::lift_fresh / detach_ on a host-made tensor, then a copy).
    from hrgrad_ext.ops import kinetic

    def aten_ops(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn()
        return out, [e.name for e in prof.events()]

    for device in ("meta", "cpu"):
        ref = torch.empty(4, 30, device=device, dtype=f64)
        p, names = aten_ops(lambda: kinetic._as_param(0.25, ref, "bgk_residuals", "kn"))
        assert p.device == ref.device and p.dim() == 0 and p.dtype == ref.dtype
        assert "aten::full" in names and not {"aten::detach_", "aten::_to_copy", "aten::copy_"} & set(names), names
    assert p.item() == 0.25


@pytest.mark.cuda
def test_python_float_param_in_cuda_graph():
    from hrgrad_ext.ops import kinetic

    N, V = 64, 30
    args = [torch.rand(N, V, device="cuda") for _ in range(3)] + [torch.rand(N, device="cuda") for _ in range(2)]
    v, w = kinetic.gauss_legendre(V, dtype=f32, device="cuda")
    kinetic.transport_mm_residuals(*args, v, w, 0.1)  # warm-up outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kinetic.transport_mm_residuals(*args, v, w, 0.1)  # raises on a synchronising copy
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kinetic.transport_mm_residuals(*args, v, w, 0.1)
    graph.replay()
    want = kinetic.transport_mm_residuals(*[a.cpu() for a in args], v.cpu(), w.cpu(), 0.1)
    for a, b in zip(out, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


# ==== self-test of the emulator: planted bugs are caught, launch limits enforced ===================

@pytest.fixture(scope="module")
def selftest(emulated_ops):
    return torch.ops.hrgrad_cuda_emu_selftest


@pytest.mark.cuda_emu
def test_planted_missing_barrier_is_caught(selftest, control):
    x = torch.arange(100, dtype=f32)
    assert torch.equal(selftest.reverse(x, True), x.flip(0))
    for order in ("forward", "reverse"):
        control.configure(thread_order=order)
        try:
            # a reader that runs before its writer reads the poisoned (NaN) shared memory
            assert selftest.reverse(x, False).isnan().any(), order
        finally:
            control.configure()


@pytest.mark.cuda_emu
def test_planted_divergent_shuffle_is_caught(selftest):
    x = torch.randn(3, 32)
    torch.testing.assert_close(selftest.row_sums(x, 32), x.sum(1))
    with pytest.raises(RuntimeError, match=r"kernel hrgrad_cuda_emu_selftest::row_sum_kernel, block \(0,0,0\): "
                                           r"divergent __shfl_xor_sync at tests/cuda_emu/selftest_cuda.cu:\d+: "
                                           r"thread \(0,0,0\) .* thread \(16,0,0\) \(lane 16\) has exited"):
        selftest.row_sums(x, 16)


@pytest.mark.cuda_emu
def test_warp_intrinsics(selftest):
    x = torch.randn(32, generator=torch.Generator().manual_seed(6))
    out = selftest.warp_intrinsics(x)
    lanes = torch.arange(32)
    want = torch.stack([
        x[3].expand(32),
        x.cumsum(0),
        x.reshape(4, 8).sum(1).repeat_interleave(8),
        x[lanes ^ 1],
        torch.full((32,), float(sum(1 << i for i in range(16) if x[i] > 0))),
        torch.full((32,), 1.0),
        x[lanes ^ 8],
        x[(lanes + 8) % 32],
    ], 1)
    segment_starts = lanes % 8 == 0  # __shfl_down_sync with width 8: only lane 8k has the whole sum
    torch.testing.assert_close(out[segment_starts, 2], want[segment_starts, 2])
    keep = [0, 1, 3, 4, 5, 6, 7]
    torch.testing.assert_close(out[:, keep], want[:, keep])


@pytest.mark.cuda_emu
def test_barrier_divergence_is_caught(selftest):
    with pytest.raises(RuntimeError, match=r"split_barrier_kernel, block \(0,0,0\): missing __syncthreads: thread "
                                           r"\(0,0,0\) waits at __syncthreads at tests/cuda_emu/selftest_cuda.cu:\d+, "
                                           r"but thread \(32,0,0\) waits at __syncthreads at .*selftest_cuda.cu:\d+"):
        selftest.split_barrier(64)
    with pytest.raises(RuntimeError, match=r"early_exit_kernel.*missing __syncthreads.*thread \(0,0,0\) has exited"):
        selftest.early_exit(64)


@pytest.mark.cuda_emu
@pytest.mark.parametrize("grid,block,smem,opt_in,error", [
    ([0, 1, 1], [32, 1, 1], 0, 0, "a grid dimension is 0"),
    ([1, 65536, 1], [32, 1, 1], 0, 0, "exceeds"),
    ([1, 1, 65536], [32, 1, 1], 0, 0, "exceeds"),
    ([2**31, 1, 1], [32, 1, 1], 0, 0, "exceeds"),
    ([1, 1, 1], [1025, 1, 1], 0, 0, "at most 1024 threads"),
    ([1, 1, 1], [32, 32, 2], 0, 0, "at most 1024 threads"),
    ([1, 1, 1], [1, 1, 65], 0, 0, "at most 1024 threads"),
    ([1, 1, 1], [32, 1, 1], 49153, 0, "without the opt-in"),
    ([1, 1, 1], [32, 1, 1], 60001, 60000, "more than 60000 bytes"),
    ([1, 1, 1], [32, 1, 1], 0, 232449, "at most 232448 bytes"),
    ([1, 65535, 1], [1, 1, 1], 0, 0, None),  # the largest valid ones
    ([1, 1, 65535], [1, 1, 1], 0, 0, None),
    ([1, 1, 1], [1024, 1, 1], 49152, 0, None),
    ([1, 1, 1], [1, 1, 64], 0, 0, None),
    ([1, 1, 1], [32, 1, 1], 60000, 60000, None),
])
def test_launch_limits(selftest, grid, block, smem, opt_in, error):
    if error is None:
        selftest.launch_noop(grid, block, smem, opt_in)
        return
    with pytest.raises(RuntimeError, match=error):
        selftest.launch_noop(grid, block, smem, opt_in)


@pytest.mark.cuda_emu
def test_static_plus_dynamic_shared_memory_limit(selftest):
    assert selftest.static_shared(8 * 1024).eq(1).all()  # 40 KB static + 8 KB dynamic: 48 KB
    with pytest.raises(RuntimeError, match="exceed the 49152 bytes of a block"):
        selftest.static_shared(8 * 1024 + 1)


def source_line(path, pattern, after):
    """Line number of the first match of pattern after the first match of after."""
    lines = (emulation.ROOT / path).read_text().splitlines()
    start = next(i for i, s in enumerate(lines) if re.search(after, s))
    return next(i for i in range(start, len(lines)) if re.search(pattern, lines[i])) + 1


@pytest.mark.cuda_emu
def test_barrier_removed_from_a_shipped_kernel_is_caught(control):
    # The barrier between loading a chunk of J into shared memory and using it, removed at run
    # time: the gram of the tile path then reads poisoned shared memory.
    line = source_line("csrc/gram/gram_cuda.cu", r"__syncthreads\(\)", r"gram_tiles_kernel\(")
    ops = emulation.load()
    J = torch.randn(20, 500, dtype=f64)
    control.plant("skip_barrier", "csrc/gram/gram_cuda.cu", line)
    try:
        G = ops.gram(J, f64)
    finally:
        control.clear_plants()
    assert not torch.allclose(G, CPU.gram(J, f64), equal_nan=False)
    torch.testing.assert_close(ops.gram(J, f64), CPU.gram(J, f64), rtol=1e-12, atol=1e-12)


@pytest.mark.cuda_emu
def test_lanes_leaving_a_shipped_warp_reduction_are_caught(control):
    # Lanes 16..31 (the row segments of 2 of the 4 rows of a warp at V = 30) return before the
    # row sums of the kinetic kernels: a divergent shuffle.
    line = source_line("csrc/kinetic/kinetic_cuda.cu", r"__shfl_xor_sync", r"T row_sum\(")
    ops = emulation.load()
    F, v, w = torch.rand(4, 30, dtype=f64), torch.linspace(-1, 1, 30, dtype=f64), torch.rand(30, dtype=f64)
    control.plant("exit_before", "csrc/kinetic/kinetic_cuda.cu", line, 16)
    try:
        with pytest.raises(RuntimeError, match=r"velocity_moments_kernel<double[^>]*>, block \(0,0,0\): divergent "
                                               r"__shfl_xor_sync at csrc/kinetic/kinetic_cuda.cu:%d: .*has exited" % line):
            ops.velocity_moments(F, v, w, 2)
    finally:
        control.clear_plants()
    torch.testing.assert_close(ops.velocity_moments(F, v, w, 2), CPU.velocity_moments(F, v, w, 2))


def test_cuda_sources_follow_the_emulation_conventions(tmp_path):
    sources = emulation.cuda_sources()
    assert sources, "no csrc/**/*_cuda.cu"
    problems = [p for cu in [*sources, emulation.HERE / "selftest_cuda.cu"] for p in emulation.convention_problems(cu)]
    assert not problems, "\n".join(problems)
    bad = tmp_path / "bad_cuda.cu"
    bad.write_text('#include <c10/cuda/CUDAGuard.h>\n// k<<<1, 1>>>() in a comment is fine\n'
                   '__global__ void k() { __shared__ float s[4]; }\nvoid f() { k<<<1, 32>>>(); }\n'
                   'TORCH_LIBRARY_IMPL(hrgrad_ext, CUDA, m) {}\n')
    found = emulation.convention_problems(bad)
    assert [p.split(":")[1] for p in found] == ["1", "3", "4", "5", " include \"common/cuda_kernel.h\""], found


def shipped_kernels():
    """Names of the __global__ functions of csrc/**/*_cuda.cu."""
    names = set()
    for cu in emulation.cuda_sources():
        code = emulation._without_comments(cu.read_text())
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", code))
    return names


@pytest.mark.cuda_emu
def test_every_shipped_kernel_was_emulated(request, control):
    # Last in this file: every kernel of every *_cuda.cu ran in the emulator in the tests above.
    module_items = [i for i in request.session.items if i.path == request.node.path and "emulated" in i.name]
    if len(module_items) < 10:
        pytest.skip("run the whole file: this checks what the other tests launched")
    launched = {re.sub(r"<.*", "", name).split("::")[-1] for name in control.launched_kernels()}
    missing = shipped_kernels() - launched
    assert shipped_kernels() and not missing, f"never launched in the emulator: {sorted(missing)}"
