"""Bad numeric input to the ops (issue 16): NaN, +-Inf, T <= 0 in the Maxwellian, eps = 0, kn = 0.

The ops never look at the values of their inputs (that would synchronise with the GPU), so each
behaves like its formula in IEEE arithmetic (README, "Bad numeric input"):

* a NaN or Inf in an input makes exactly those outputs non-finite whose formula involves it,
  and only in its row (collocation point) or task: other rows stay exact;
* ``T <= 0`` makes that row of the Maxwellian, of the BGK kinetic residual and of their
  gradients NaN (the conservation and consistency residuals do not involve the Maxwellian);
* ``kn = 0`` and ``eps = 0`` are the limit equations (Euler, diffusion): finite residuals and
  gradients, equal to the formulas;
* ``hrgrad_weights`` flags a non-finite Gram matrix (``Status.NON_FINITE``) and returns NaN
  weights for that batch entry only (``HRGrad(check_finite=True)`` raises instead).

Each case is checked against the plain-PyTorch formula on the same float64 inputs: the same
entries non-finite, the finite ones equal to 1e-12. :func:`run_case` takes the op namespace and
the device, so the ``cuda`` variants here (and the emulation tests of the CUDA kernels, with
their own namespace) run the same cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import hrgrad_ext  # noqa: F401  (registers the ops)
from hrgrad_ext.ops import Status
from reference_impls import combine_ref, gram_ref
from test_kinetic_ops import bgk_inputs, ref_bgk, ref_maxwellian, ref_moments, ref_transport, transport_inputs

NAN, INF = float("nan"), float("inf")
ROW = 1  # the row (or task) that gets the bad value


@dataclass(frozen=True)
class Case:
    """``op(*make())`` against ``reference(*make())``; the outputs listed in ``nonfinite`` must
    hold NaN/Inf (for the kinetic ops: in row ``ROW`` only), every other output must be finite
    everywhere."""

    name: str
    op: str
    make: Callable[[], tuple]
    reference: Callable[..., tuple]
    nonfinite: tuple[int, ...]


def _set(t: torch.Tensor, value: float, index=ROW) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _residual_case(op: str, names: tuple[str, ...], inputs: Callable[[], tuple], reference, name: str,
                   nonfinite: tuple[int, ...], bad: dict) -> Case:
    """A residual op with ``bad = {input: value}`` put into row ``ROW`` (``<param>_scalar``: the
    per-row parameter as a 0-d tensor of that value)."""

    def make():
        args = dict(zip(names, inputs()))
        for key, value in bad.items():
            if key.endswith("_scalar"):
                args[key.removesuffix("_scalar")] = torch.tensor(value, dtype=torch.float64)
            else:
                args[key] = _set(args[key], value, (ROW, 3) if args[key].dim() == 2 else ROW)
        return tuple(args[n] for n in names)

    return Case(f"{op}-{name}", op, make, reference, nonfinite)


def _bgk(name: str, nonfinite: tuple[int, ...], **bad) -> Case:
    names = ("F", "Ft", "Fx", "rho", "u", "T", "rho_t", "u_t", "T_t", "v", "w", "kn")
    return _residual_case("bgk_residuals", names, lambda: bgk_inputs(4, 12, seed=5), ref_bgk, name, nonfinite, bad)


def _transport(name: str, nonfinite: tuple[int, ...], **bad) -> Case:
    names = ("Graw", "Graw_t", "Graw_x", "rho_t", "rho_x", "v", "w", "eps")
    return _residual_case("transport_mm_residuals", names, lambda: transport_inputs(4, 10, seed=6), ref_transport,
                          name, nonfinite, bad)


def _maxwellian(name: str, nonfinite: tuple[int, ...], **bad) -> Case:
    def make():
        _, _, _, rho, u, T, *_, v, _, _ = bgk_inputs(4, 12, seed=7)
        args = {"rho": rho, "u": u, "T": T}
        for key, value in bad.items():
            args[key] = _set(args[key], value)
        return args["rho"], args["u"], args["T"], v

    return Case(f"maxwellian-{name}", "maxwellian", make, lambda *a: (ref_maxwellian(*a),), nonfinite)


def _moments(name: str, value: float) -> Case:
    def make():
        F, *_, v, w, _ = bgk_inputs(4, 12, seed=8)
        return _set(F, value, (ROW, 5)), v, w, 3

    return Case(f"velocity_moments-{name}", "velocity_moments", make, lambda *a: (ref_moments(*a),), (0,))


def _jacobian(seed: int = 9) -> torch.Tensor:
    return torch.randn(3, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gram(name: str, value: float) -> Case:
    return Case(f"gram-{name}", "gram", lambda: (_set(_jacobian(), value, (ROW, 7)),),
                lambda J: (gram_ref(J),), (0,))


def _combine(name: str, op: str, bad_w: bool, value: float) -> Case:
    def make():
        J = _jacobian(10)
        w = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
        if bad_w:
            w = _set(w, value)
        else:
            J = _set(J, value, (ROW, 7))
        return (torch.zeros(40, dtype=torch.float64), J, w) if op == "combine_accumulate_" else (J, w)

    def ref(*args):
        J, w = args[-2:]
        return (combine_ref(J, w),)

    return Case(f"{op}-{name}", op, make, ref, (0,))


def _bgk_backward(name: str, nonfinite: tuple[int, ...], **bad) -> Case:
    forward = _bgk(name, (), **bad)

    def make():
        F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn = forward.make()
        g = torch.Generator().manual_seed(11)
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in (F.shape, (F.shape[0], 3), (F.shape[0], 3))]
        return (*grads, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, F)

    def reference(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, F):
        kn_row = kn.expand(F.shape[0]) if kn.dim() == 0 else kn
        xs = [t.clone().requires_grad_() for t in (F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, kn_row)]
        out = ref_bgk(*xs[:9], v, w, xs[9])
        return torch.autograd.grad(out, xs, (gK, gC, gS))

    # the op takes no F (the residuals are linear in it): drop the trailing F for the op
    return Case(f"bgk_residuals_backward-{name}", "bgk_residuals_backward", make, reference, nonfinite)


def _transport_backward(name: str, nonfinite: tuple[int, ...], **bad) -> Case:
    forward = _transport(name, (), **bad)

    def make():
        Graw, Gt, Gx, rho_t, rho_x, v, w, eps = forward.make()
        g = torch.Generator().manual_seed(12)
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in (Graw.shape, Graw.shape, (Graw.shape[0],))]
        return (*grads, Gt, Gx, v, w, eps, Graw, rho_t, rho_x)

    def reference(gg, gm, gc, Gt, Gx, v, w, eps, Graw, rho_t, rho_x):
        eps_row = eps.expand(Graw.shape[0]) if eps.dim() == 0 else eps
        xs = [t.clone().requires_grad_() for t in (Graw, Gt, Gx, rho_x, eps_row)]
        out = ref_transport(xs[0], xs[1], xs[2], rho_t, xs[3], v, w, xs[4])
        return torch.autograd.grad(out, xs, (gg, gm, gc))

    return Case(f"transport_mm_residuals_backward-{name}", "transport_mm_residuals_backward", make, reference,
                nonfinite)


def _maxwellian_backward(name: str, **bad) -> Case:
    forward = _maxwellian(name, (), **bad)

    def make():
        rho, u, T, v = forward.make()
        grad = torch.randn(rho.shape[0], v.shape[0], generator=torch.Generator().manual_seed(13), dtype=torch.float64)
        return grad, rho, u, T, v

    def reference(grad, rho, u, T, v):
        xs = [t.clone().requires_grad_() for t in (rho, u, T)]
        return torch.autograd.grad(ref_maxwellian(*xs, v), xs, grad)

    return Case(f"maxwellian_backward-{name}", "maxwellian_backward", make, reference, (0, 1, 2))


# Extra trailing inputs that only the reference needs (the backward ops take no F / Graw /
# rho_t / rho_x): how many to drop before calling the op.
_REFERENCE_ONLY = {"bgk_residuals_backward": 1, "transport_mm_residuals_backward": 3}

CASES = [
    _moments("nan-F", NAN),
    _moments("inf-F", INF),
    _maxwellian("T-zero", (0,), T=0.0),
    _maxwellian("T-negative", (0,), T=-0.5),
    _maxwellian("nan-rho", (0,), rho=NAN),
    _maxwellian("inf-u", (), u=INF),  # exp(-inf) = 0: that row is 0
    _bgk("T-zero", (0,), T=0.0),
    _bgk("T-negative", (0,), T=-0.5),
    _bgk("kn-zero", (), kn=0.0),
    _bgk("kn-zero-scalar", (), kn_scalar=0.0),
    _bgk("nan-kn", (0,), kn=NAN),
    _bgk("nan-F", (0, 2), F=NAN),
    _bgk("inf-Fx", (0, 1), Fx=INF),
    _bgk("nan-rho", (0, 1, 2), rho=NAN),
    _transport("eps-zero", (), eps=0.0),
    _transport("eps-zero-scalar", (), eps_scalar=0.0),
    _transport("nan-eps", (1,), eps=NAN),
    _transport("nan-Graw", (0, 1), Graw=NAN),
    _transport("inf-Graw_x", (1, 2), Graw_x=INF),
    _transport("inf-rho_x", (1,), rho_x=INF),
    _gram("nan-J", NAN),
    _gram("inf-J", INF),
    _combine("nan-w", "combine", True, NAN),
    _combine("inf-J", "combine", False, INF),
    _combine("nan-J", "combine_accumulate_", False, NAN),
    _maxwellian_backward("T-zero", T=0.0),
    _maxwellian_backward("T-negative", T=-0.5),
    _bgk_backward("kn-zero", (), kn=0.0),
    _bgk_backward("kn-zero-scalar", (), kn_scalar=0.0),
    _bgk_backward("T-negative", (3, 4, 5), T=-0.5),
    _bgk_backward("nan-Fx", (9,), Fx=NAN),
    _transport_backward("eps-zero", (), eps=0.0),
    _transport_backward("eps-zero-scalar", (), eps_scalar=0.0),
    _transport_backward("nan-Graw_x", (4,), Graw_x=NAN),
]


def run_case(case: Case, ops=torch.ops.hrgrad_ext, device: str = "cpu") -> tuple[tuple, tuple]:
    """``(outputs of the op on device, outputs of the formula)``, both on the CPU. An in-place op
    (``combine_accumulate_``) returns its first argument."""
    args = case.make()
    ours = args[: len(args) - _REFERENCE_ONLY.get(case.op, 0)]
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in ours]
    out = getattr(ops, case.op)(*moved)
    if case.op.endswith("_"):
        out = moved[0]
    out = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(o.cpu() for o in out), tuple(case.reference(*args))


def check_case(case: Case, got: tuple, expected: tuple) -> None:
    """Same non-finite entries as the formula, finite ones equal to it; the outputs of
    ``case.nonfinite`` hold NaN/Inf (kinetic ops: in row ``ROW`` only), the others none."""
    per_row = case.op not in ("gram", "combine", "combine_accumulate_")
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, (case.name, i)
        fin = torch.isfinite(g)
        assert torch.equal(fin, torch.isfinite(e)), f"{case.name}: output {i} is non-finite elsewhere than the formula"
        torch.testing.assert_close(g[fin], e[fin], rtol=1e-12, atol=1e-11, msg=f"{case.name}: output {i}")
        rows = (~fin).reshape(g.shape[0], -1).any(1) if g.dim() else (~fin).reshape(1)
        if i in case.nonfinite:
            assert rows.any(), f"{case.name}: output {i} should be non-finite"
            assert not per_row or rows.nonzero().flatten().tolist() == [ROW], f"{case.name}: output {i} rows"
        else:
            assert not rows.any(), f"{case.name}: output {i} should stay finite"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_behaves_like_the_formula(case, device):
    got, expected = run_case(case, device=device)
    check_case(case, got, expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_hrgrad_weights_flags_a_non_finite_gram_matrix_per_batch_entry(device, bad):
    J = torch.stack([_jacobian(14), _jacobian(15)])
    G = gram_ref(J).to(device)
    w_clean, s_clean = torch.ops.hrgrad_ext.hrgrad_weights(G[0].clone(), "projection", None)
    G[1, ROW, ROW] = bad
    w, status = torch.ops.hrgrad_ext.hrgrad_weights(G, "projection", None)
    assert int(status[1]) & Status.NON_FINITE and not int(status[0]) & Status.NON_FINITE
    assert torch.isnan(w[1]).all()
    assert torch.equal(w[0], w_clean) and int(status[0]) == int(s_clean)
    J_bad = _set(J[1], bad, (ROW, 3)).to(device)
    with pytest.raises(ValueError, match="NaN or Inf"):
        hrgrad_ext.HRGrad()(J_bad)  # the aggregator's default check_finite=True
