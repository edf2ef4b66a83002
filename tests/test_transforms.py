"""The transform matrix: every op under every autograd mode and torch.func transform.

For each op and mode, the op's result is compared with the plain-PyTorch reference formula
(reference_impls.py) run through the same mode; first and second derivatives (reverse,
forward, forward-over-reverse, reverse-over-reverse, batched) are also checked against finite
differences by gradcheck / gradgradcheck, so a wrong derivative cannot pass by agreeing with
a wrong reference. Everything is float64 on tiny problems.

Tolerances: op against reference rtol 1e-9, atol 1e-10 (the op and the reference differ only
in summation order and in how the K x K solve is factorised; the values and derivatives here
are O(1)); finite differences: gradcheck's defaults (eps 1e-6, atol 1e-5, rtol 1e-3).

Modes an op refuses by design raise a clear error (tested at the end): gradients or tangents
of the quadrature nodes and weights, anything but plain use of the in-place
combine_accumulate_, direct differentiation of the fused *_backward kernels; and
hrgrad_weights away from its generic branch has NaN derivatives, never a silent number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from reference_impls import (
    hrgrad_pinv_ref,
    hrgrad_weights_ref,
    ref_bgk,
    ref_bgk_sq,
    ref_maxwellian,
    ref_moments,
    ref_transport,
    ref_transport_sq,
)
from torch import func
from torch.utils._pytree import tree_map

import hrgrad_ext
from hrgrad_ext import ops
from hrgrad_ext.ops import LENGTH_MODELS, Status

f64 = torch.float64
OPS = torch.ops.hrgrad_ext
RTOL, ATOL = 1e-9, 1e-10


def assert_tree_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=False)


def rand(gen, *shape, lo=-1.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(torch.Size(shape), generator=gen, dtype=f64)


# --- the ops, as functions of their differentiable inputs ------------------------------------------

N, V, K, NPAR = 3, 4, 3, 5
v_nodes, w_nodes = ops.gauss_legendre(V, -4.0, 4.0)


def nodes(like):
    """The quadrature rule on the device of ``like``."""
    return v_nodes.to(like.device), w_nodes.to(like.device)


@dataclass
class Case:
    name: str
    op: Callable  # differentiable inputs -> output(s), through hrgrad_ext
    ref: Callable  # the same from the plain-PyTorch formulas
    make: Callable  # torch.Generator -> the differentiable inputs

    def inputs(self, seed=0):
        return tuple(self.make(torch.Generator().manual_seed(seed)))


def _bgk_inputs(gen, kn_scalar):
    F, Ft, Fx = rand(gen, N, V, lo=0.0), rand(gen, N, V), rand(gen, N, V)
    rho, u, T = rand(gen, N, lo=0.5, hi=1.5), rand(gen, N, lo=-0.5, hi=0.5), rand(gen, N, lo=0.5, hi=1.5)
    kn = rand(gen, lo=0.1, hi=1.0) if kn_scalar else rand(gen, N, lo=0.1, hi=1.0)
    return F, Ft, Fx, rho, u, T, rand(gen, N), rand(gen, N), rand(gen, N), kn


def _transport_inputs(gen, eps_scalar):
    G, Gt, Gx = rand(gen, N, V) + 2.0, rand(gen, N, V), rand(gen, N, V) + 0.5
    eps = rand(gen, lo=0.1, hi=1.0) if eps_scalar else rand(gen, N, lo=0.1, hi=1.0)
    return G, Gt, Gx, rand(gen, N), rand(gen, N), eps


def _gram_input(gen):
    J = rand(gen, K, NPAR)
    return (J @ J.mT + 0.1 * torch.eye(K, dtype=f64),)


CASES = [
    Case("gram", lambda J: ops.gram(J), lambda J: J @ J.mT, lambda g: (rand(g, K, NPAR),)),
    Case("combine", ops.combine, lambda J, w: (w.unsqueeze(-1) * J).sum(-2), lambda g: (rand(g, K, NPAR), rand(g, K))),
    Case("hrgrad_weights", lambda G: ops.hrgrad_weights(G), hrgrad_weights_ref, _gram_input),
    Case("hrgrad", lambda J: hrgrad_ext.hrgrad(J), hrgrad_pinv_ref, lambda g: (rand(g, K, NPAR),)),
    Case(
        "velocity_moments",
        lambda F: ops.velocity_moments(F, *nodes(F), 3),
        lambda F: ref_moments(F, *nodes(F), 3),
        lambda g: (rand(g, N, V),),
    ),
    Case(
        "maxwellian",
        lambda rho, u, T: ops.maxwellian(rho, u, T, nodes(rho)[0]),
        lambda rho, u, T: ref_maxwellian(rho, u, T, nodes(rho)[0]),
        lambda g: (rand(g, N, lo=0.5, hi=1.5), rand(g, N, lo=-0.5, hi=0.5), rand(g, N, lo=0.5, hi=1.5)),
    ),
    Case(
        "bgk_residuals",
        lambda *a: ops.bgk_residuals(*a[:9], *nodes(a[0]), a[9]),
        lambda *a: ref_bgk(*a[:9], *nodes(a[0]), a[9]),
        lambda g: _bgk_inputs(g, kn_scalar=False),
    ),
    Case(  # the op itself (no wrapper), with one Knudsen number for every row
        "bgk_residuals[0-d kn]",
        lambda *a: OPS.bgk_residuals(*a[:9], *nodes(a[0]), a[9]),
        lambda *a: ref_bgk(*a[:9], *nodes(a[0]), a[9]),
        lambda g: _bgk_inputs(g, kn_scalar=True),
    ),
    Case(
        "transport_mm_residuals",
        lambda *a: ops.transport_mm_residuals(*a[:5], *nodes(a[0]), a[5]),
        lambda *a: ref_transport(*a[:5], *nodes(a[0]), a[5]),
        lambda g: _transport_inputs(g, eps_scalar=False),
    ),
    Case(
        "transport_mm_residuals[0-d eps]",
        lambda *a: OPS.transport_mm_residuals(*a[:5], *nodes(a[0]), a[5]),
        lambda *a: ref_transport(*a[:5], *nodes(a[0]), a[5]),
        lambda g: _transport_inputs(g, eps_scalar=True),
    ),
    Case(
        "bgk_residuals_sq",
        lambda *a: ops.bgk_residuals_sq(*a[:9], *nodes(a[0]), a[9]),
        lambda *a: ref_bgk_sq(*a[:9], *nodes(a[0]), a[9]),
        lambda g: _bgk_inputs(g, kn_scalar=False),
    ),
    Case(
        "bgk_residuals_sq[0-d kn]",
        lambda *a: OPS.bgk_residuals_sq(*a[:9], *nodes(a[0]), a[9]),
        lambda *a: ref_bgk_sq(*a[:9], *nodes(a[0]), a[9]),
        lambda g: _bgk_inputs(g, kn_scalar=True),
    ),
    Case(
        "transport_mm_residuals_sq",
        lambda *a: ops.transport_mm_residuals_sq(*a[:5], *nodes(a[0]), a[5]),
        lambda *a: ref_transport_sq(*a[:5], *nodes(a[0]), a[5]),
        lambda g: _transport_inputs(g, eps_scalar=False),
    ),
    Case(
        "transport_mm_residuals_sq[0-d eps]",
        lambda *a: OPS.transport_mm_residuals_sq(*a[:5], *nodes(a[0]), a[5]),
        lambda *a: ref_transport_sq(*a[:5], *nodes(a[0]), a[5]),
        lambda g: _transport_inputs(g, eps_scalar=True),
    ),
]
CASE_IDS = [c.name for c in CASES]


def outputs(out):
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def directions(case, seed):
    """Random tangents of the inputs and cotangents of the outputs (fixed per case)."""
    gen = torch.Generator().manual_seed(seed)
    xs = case.inputs()
    tangents = tuple(rand(gen, *x.shape) for x in xs)
    cotangents = tuple(rand(gen, *o.shape) for o in outputs(case.ref(*xs)))
    return xs, tangents, cotangents


def scalarised(fn, cotangents):
    """A scalar loss sum_k <out_k, c_k>: random weights, so no output or entry cancels."""
    return lambda *xs: sum((o * c).sum() for o, c in zip(outputs(fn(*xs)), cotangents))


def leaves(xs):
    return tuple(x.detach().clone().requires_grad_(True) for x in xs)


def stack_batch(case, seeds):
    return tuple(torch.stack(parts) for parts in zip(*(case.inputs(s) for s in seeds)))


# --- one function per mode: the same computation for the op and for the reference -----------------


def mode_backward(fn, xs, tangents, cots):
    ins = leaves(xs)
    return torch.autograd.grad(scalarised(fn, cots)(*ins), ins)


def mode_forward_ad(fn, xs, tangents, cots):
    with fwAD.dual_level():
        outs = outputs(fn(*(fwAD.make_dual(x, t) for x, t in zip(xs, tangents))))
        return tuple(fwAD.unpack_dual(o).tangent for o in outs)


def mode_func_grad(fn, xs, tangents, cots):
    return func.grad(scalarised(fn, cots), argnums=tuple(range(len(xs))))(*xs)


def mode_vjp(fn, xs, tangents, cots):
    out, pullback = func.vjp(fn, *xs)
    return out, pullback(cots if isinstance(out, tuple) else cots[0])


def mode_jvp(fn, xs, tangents, cots):
    return func.jvp(fn, xs, tangents)


def mode_jacrev(fn, xs, tangents, cots):
    return func.jacrev(fn, argnums=tuple(range(len(xs))))(*xs)


def mode_jacfwd(fn, xs, tangents, cots):
    return func.jacfwd(fn, argnums=tuple(range(len(xs))))(*xs)


def mode_hessian(fn, xs, tangents, cots):
    return func.hessian(scalarised(fn, cots), argnums=tuple(range(len(xs))))(*xs)


def mode_double_backward(fn, xs, tangents, cots):
    """Gradient of <grad L, t> with respect to the inputs and to the incoming gradient."""
    ins = leaves(xs)
    outs = outputs(fn(*ins))
    gouts = leaves(cots)
    grads = torch.autograd.grad(outs, ins, gouts, create_graph=True)
    inner = sum((g * t).sum() for g, t in zip(grads, tangents))
    return torch.autograd.grad(inner, ins + gouts, materialize_grads=True)


MODES = {
    "backward": mode_backward,
    "forward_ad": mode_forward_ad,
    "func.grad": mode_func_grad,
    "vjp": mode_vjp,
    "jvp": mode_jvp,
    "jacrev": mode_jacrev,
    "jacfwd": mode_jacfwd,
    "hessian": mode_hessian,
    "double_backward": mode_double_backward,
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mode_matches_reference(case, mode):
    xs, tangents, cots = directions(case, seed=1)
    assert_tree_close(MODES[mode](case.op, xs, tangents, cots), MODES[mode](case.ref, xs, tangents, cots))


# --- vmap: mixed batched / unbatched arguments, a non-leading batch dimension, nesting --------------


def per_sample(fn, batched, in_dims):
    """The reference for vmap: one call per batch entry, stacked."""
    size = next(x.shape[d] for x, d in zip(batched, in_dims) if d is not None)
    rows = [outputs(fn(*(x if d is None else x.select(d, b) for x, d in zip(batched, in_dims)))) for b in range(size)]
    return tuple(torch.stack(o) for o in zip(*rows))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vmap(case):
    xs = case.inputs(0)
    batched = stack_batch(case, (0, 1))
    # Every other argument batched (the rest shared); the first one along its last dimension.
    in_dims = tuple(None if i % 2 else 0 for i in range(len(xs)))
    args = [b if d is not None else x for x, b, d in zip(xs, batched, in_dims)]
    args[0] = args[0].movedim(0, -1)
    in_dims = (args[0].dim() - 1,) + in_dims[1:]
    got = outputs(func.vmap(case.op, in_dims=in_dims)(*args))
    assert_tree_close(got, per_sample(case.ref, args, in_dims))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_nested_vmap(case):
    batched = tuple(torch.stack(p) for p in zip(stack_batch(case, (0, 1)), stack_batch(case, (2, 3))))
    got = outputs(func.vmap(func.vmap(case.op))(*batched))
    want = tuple(torch.stack(o) for o in zip(*(per_sample(case.ref, tuple(x[i] for x in batched), (0,) * len(batched)) for i in range(2))))
    assert_tree_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vmap_of_grad(case):
    _, _, cots = directions(case, seed=1)
    batched = stack_batch(case, (0, 1))
    argnums = tuple(range(len(batched)))
    got = func.vmap(func.grad(scalarised(case.op, cots), argnums=argnums))(*batched)
    want = func.vmap(func.grad(scalarised(case.ref, cots), argnums=argnums))(*batched)
    assert_tree_close(got, want)


def test_vmap_over_quadrature_rules():
    """A different velocity grid per batch entry cannot be folded into rows: one call each."""
    F = torch.stack([rand(torch.Generator().manual_seed(s), N, V) for s in (0, 1)])
    rules = [ops.gauss_legendre(V, -a, a) for a in (3.0, 5.0)]
    v, w = torch.stack([r[0] for r in rules]), torch.stack([r[1] for r in rules])
    got = func.vmap(lambda F, v, w: ops.velocity_moments(F, v, w, 2))(F, v, w)
    assert_tree_close(got, torch.stack([ref_moments(F[b], v[b], w[b], 2) for b in range(2)]))
    rho = rand(torch.Generator().manual_seed(2), 2, N, lo=0.5, hi=1.5)
    got = func.vmap(ops.maxwellian, in_dims=(0, None, None, 0))(rho, rho[0] - 1.0, rho[1], v)
    assert_tree_close(got, torch.stack([ref_maxwellian(rho[b], rho[0] - 1.0, rho[1], v[b]) for b in range(2)]))


# --- finite differences --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradcheck_reverse_forward_batched(case):
    assert torch.autograd.gradcheck(
        case.op,
        leaves(case.inputs()),
        check_forward_ad=True,
        check_backward_ad=True,
        check_batched_grad=True,
        check_batched_forward_grad=True,
        check_undefined_grad=True,
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradgradcheck(case):
    # fast mode: finite differences of random projections of the second derivative (the full
    # Jacobian of the backward of bgk_residuals alone takes seconds)
    assert torch.autograd.gradgradcheck(
        case.op,
        leaves(case.inputs()),
        check_fwd_over_rev=True,
        check_rev_over_rev=True,
        check_batched_grad=True,
        fast_mode=True,
    )


# --- torch.compile(fullgraph=True) and torch.export: every op in one graph (one compilation) -------


def all_ops(fn_of_case):
    """One function of the inputs of every case returning every output, for one trace."""
    sizes = [len(c.inputs()) for c in CASES]

    def run(*flat):
        outs, start = [], 0
        for case, size in zip(CASES, sizes):
            outs.extend(outputs(fn_of_case(case)(*flat[start : start + size])))
            start += size
        return tuple(outs)

    return run


def all_inputs_and_cotangents():
    pairs = [directions(c, seed=1) for c in CASES]
    return sum((p[0] for p in pairs), ()), sum((p[2] for p in pairs), ())


def assert_per_op_close(got, want):
    names = [c.name for c in CASES for _ in outputs(c.ref(*c.inputs()))]
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_compile_fullgraph_forward_and_backward():
    xs, cots = all_inputs_and_cotangents()
    compiled = torch.compile(all_ops(lambda c: c.op), fullgraph=True, backend="aot_eager")
    ins, ref_ins = leaves(xs), leaves(xs)
    got, want = compiled(*ins), all_ops(lambda c: c.ref)(*ref_ins)
    assert_per_op_close(got, want)
    grads = torch.autograd.grad(got, ins, cots)
    ref_grads = torch.autograd.grad(want, ref_ins, cots)
    sizes = [len(c.inputs()) for c in CASES]
    names = [c.name for c, n in zip(CASES, sizes) for _ in range(n)]
    for name, g, w in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=lambda m: f"gradient through {name}: {m}")


def test_export():
    xs, _ = all_inputs_and_cotangents()
    fn = all_ops(lambda c: c.op)

    class AllOps(torch.nn.Module):
        def forward(self, *flat):
            return fn(*flat)

    program = torch.export.export(AllOps(), xs)
    called = {str(n.target).split(".")[1] for n in program.graph.nodes if str(n.target).startswith("hrgrad_ext.")}
    # the fused ops themselves, not a decomposition
    assert called >= {"gram", "combine", "hrgrad_weights", "velocity_moments", "maxwellian", "bgk_residuals",
                      "transport_mm_residuals", "bgk_residuals_sq", "transport_mm_residuals_sq"}, called
    assert_per_op_close(program.module()(*xs), all_ops(lambda c: c.ref)(*xs))


# --- CUDA: the same autograd code on the device -------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_modes_on_cuda_match_cpu(case):
    xs, tangents, cots = directions(case, seed=1)
    on_cuda = lambda t: tree_map(lambda x: x.cuda(), t)  # noqa: E731
    for mode in ("backward", "forward_ad", "double_backward", "jacrev", "jacfwd"):
        got = tree_map(lambda x: x.cpu(), MODES[mode](case.op, on_cuda(xs), on_cuda(tangents), on_cuda(cots)))
        torch.testing.assert_close(got, MODES[mode](case.op, xs, tangents, cots), rtol=1e-9, atol=1e-10)
    batched = on_cuda(stack_batch(case, (0, 1)))
    torch.testing.assert_close(
        tree_map(lambda x: x.cpu(), outputs(func.vmap(case.op)(*batched))), per_sample(case.ref, stack_batch(case, (0, 1)), (0,) * len(xs)),
        rtol=1e-9, atol=1e-10,
    )


# --- hrgrad_weights: every length model, and the points where it is not differentiable ----------------


@pytest.mark.parametrize("length_model", LENGTH_MODELS)
def test_hrgrad_weights_derivatives_every_length_model(length_model):
    (G,) = _gram_input(torch.Generator().manual_seed(3))
    tG = rand(torch.Generator().manual_seed(4), K, K)
    op = lambda G: ops.hrgrad_weights(G, length_model)  # noqa: E731
    ref = lambda G: hrgrad_weights_ref(G, length_model)  # noqa: E731
    for mode in ("backward", "forward_ad", "double_backward"):
        assert_tree_close(MODES[mode](op, (G,), (tG,), (tG[0],)), MODES[mode](ref, (G,), (tG,), (tG[0],)))
    assert torch.autograd.gradcheck(op, leaves((G,)), check_forward_ad=True)


def _status(G):
    return int(ops.hrgrad_weights_ex(G)[1])


def test_hrgrad_weights_nan_derivative_off_the_generic_branch():
    J_ok = rand(torch.Generator().manual_seed(5), K, NPAR)
    G_ok = J_ok @ J_ok.mT
    J_zero = J_ok.clone()
    J_zero[1] = 0.0  # a zero task: left out, weight 0, not differentiable there
    J_fallback = torch.tensor([[1.0, 0.0], [-0.9, 0.2], [0.0, 1.0]], dtype=f64)  # K > n: dual-cone fallback
    for G_bad in (J_zero @ J_zero.mT, J_fallback @ J_fallback.mT):
        assert _status(G_bad) != Status.OK
        G = leaves((G_bad,))[0]
        (g,) = torch.autograd.grad(ops.hrgrad_weights(G).sum(), G)
        assert torch.isnan(g).all()
        _, t = func.jvp(ops.hrgrad_weights, (G_bad,), (torch.ones_like(G_bad),))
        assert torch.isnan(t).all()
    # In a batch, the generic entry keeps its exact derivative; a bad entry that the loss does
    # not use gets zero, one that it uses gets NaN.
    Gb = leaves((torch.stack([G_ok, J_zero @ J_zero.mT]),))[0]
    w = ops.hrgrad_weights(Gb)
    (g_used,) = torch.autograd.grad(w.sum(), Gb, retain_graph=True)
    (g_unused,) = torch.autograd.grad(w[0].sum(), Gb)
    G_ref = leaves((G_ok,))[0]
    (want,) = torch.autograd.grad(hrgrad_weights_ref(G_ref).sum(), G_ref)
    assert torch.isnan(g_used[1]).all()
    assert torch.equal(g_unused[1], torch.zeros_like(g_unused[1]))
    assert_tree_close(g_used[0], want)
    assert_tree_close(g_unused[0], want)


# --- documented refusals: a clear error, never a silently zero derivative -------------------------------


def test_quadrature_nodes_refuse_derivatives():
    xs = CASES[CASE_IDS.index("bgk_residuals")].inputs()
    v = v_nodes.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="bgk_residuals is not differentiable with respect to v"):
        ops.bgk_residuals(*xs[:9], v, w_nodes, xs[9])
    with pytest.raises(RuntimeError, match="velocity_moments is not differentiable with respect to w .*tangent"):
        func.jvp(lambda w: ops.velocity_moments(xs[0], v_nodes, w, 2), (w_nodes,), (torch.ones_like(w_nodes),))
    with pytest.raises(RuntimeError, match="maxwellian is not differentiable with respect to v"):
        func.jacrev(lambda v: ops.maxwellian(xs[3], xs[4], xs[5], v))(v_nodes)
    with pytest.raises(RuntimeError, match="transport_mm_residuals is not differentiable with respect to w"):
        t = CASES[CASE_IDS.index("transport_mm_residuals")].inputs()
        func.grad(lambda w: ops.transport_mm_residuals(*t[:5], v_nodes, w, t[5])[1].sum())(w_nodes)
    # without grad mode a requires-grad node vector is just a value
    with torch.no_grad():
        ops.bgk_residuals(*xs[:9], v, w_nodes, xs[9])


def test_combine_accumulate_refuses_autograd_and_vmap():
    J, w = rand(torch.Generator().manual_seed(6), K, NPAR), torch.ones(K, dtype=f64)
    out = torch.zeros(NPAR, dtype=f64)
    OPS.combine_accumulate_(out, J, w)
    torch.testing.assert_close(out, w @ J, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="combine_accumulate_ is not differentiable with respect to J"):
        OPS.combine_accumulate_(out, J.clone().requires_grad_(True), w)
    with pytest.raises(RuntimeError, match="combine_accumulate_ is not differentiable with respect to w .*tangent"):
        func.jvp(lambda w: OPS.combine_accumulate_(out.clone(), J, w), (w,), (w,))
    with pytest.raises(RuntimeError, match="combine_accumulate_ does not support torch.vmap"):
        func.vmap(lambda o, J: OPS.combine_accumulate_(o, J, w))(out.expand(2, NPAR).clone(), J.expand(2, K, NPAR))
    version = out._version
    OPS.combine_accumulate_(out, J, w)
    assert out._version > version  # in-place: tensors saved for backward notice the change


def test_fused_backward_kernels_refuse_differentiation():
    F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn = CASES[CASE_IDS.index("bgk_residuals")].inputs()
    g = torch.ones(N, V, dtype=f64, requires_grad=True)
    with pytest.raises(RuntimeError, match="maxwellian_backward is the fused first-order backward kernel"):
        OPS.maxwellian_backward(g, rho, u, T, v_nodes)
    with pytest.raises(RuntimeError, match="bgk_residuals_backward is the fused first-order backward kernel"):
        z = torch.zeros(N, 3, dtype=f64)
        func.jvp(lambda Ft: OPS.bgk_residuals_backward(g.detach(), z, z, Ft, Fx, rho, u, T, rho_t, u_t, T_t,
                                                       v_nodes, w_nodes, kn)[0], (Ft,), (Ft,))
