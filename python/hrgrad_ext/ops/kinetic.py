"""Fused velocity-quadrature ops for the residuals of asymptotic-preserving neural networks.

An APNN loss for a kinetic equation evaluates, at every collocation point (row) ``i`` and
velocity node ``v_j`` with quadrature weight ``w_j``, a handful of element-wise terms and a
few velocity sums. Written in PyTorch that is dozens of small kernels per step (and as many
again in the backward); these ops do one pass over the ``[N, V]`` inputs forward and one
backward. Each can replace its plain-PyTorch counterpart on its own.

Conventions (all ops):
    * ``N`` rows, ``V`` velocity nodes; ``v`` and ``w`` are ``[V]``.
    * Every tensor argument has the same dtype, float32 or float64, and the same device (CPU
      or CUDA). float16/bfloat16 are rejected (a ``TypeError``): the residuals are small
      differences of O(1) terms which half precision cannot resolve; cast to float32.
      Velocity sums are accumulated in float64 on CPU and in the input dtype on CUDA (a row
      has at most a few hundred terms).
    * Per-row parameters ``kn`` / ``eps`` are ``[N]`` tensors (rows of a multi-task batch may
      belong to different tasks), 0-d tensors, or Python floats (broadcast to every row).
    * ``N = 0`` is allowed and gives empty outputs; ``V = 0`` is an error.
    * Inputs may be non-contiguous (they are made contiguous inside the op); outputs are new
      contiguous tensors.
    * Every output is differentiable with respect to every floating input except ``v`` and
      ``w`` (fixed quadrature rules: a gradient or tangent on them raises a clear error rather
      than being silently dropped). Autograd lives in C++ (``csrc/autograd``): the first-order
      backward is one call of a fused op of its own (``*_backward``, so it also runs under
      ``torch.compile``); double backward, forward mode (``torch.func.jvp``,
      ``torch.autograd.forward_ad``) and every ``torch.func`` transform (``grad``, ``vjp``,
      ``jacrev``, ``jacfwd``, ``hessian``) are exact through differentiable formulas.
    * ``torch.vmap`` folds the vmapped dimension into the rows (one kernel call).
    * ``torch.compile(fullgraph=True)`` works (fake kernels are registered below).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_integer
from . import _vmap
from .. import _C  # noqa: F401  (loading the compiled core registers torch.ops.hrgrad_ext)

__all__ = [
    "bgk_residuals",
    "bgk_residuals_sq",
    "gauss_legendre",
    "maxwellian",
    "transport_mm_residuals",
    "transport_mm_residuals_sq",
    "velocity_moments",
]

_ops = torch.ops.hrgrad_ext
_DTYPES = (torch.float32, torch.float64)


# --- validation (the fake kernels; and the public wrappers when the C++ checks refuse an input,
# to raise TypeError / ValueError with Python spellings: no cost when the input is valid) -------


def _check_dtype(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32 or float64, got {t.dtype} (float16/bfloat16 are not "
            "supported: the residuals cancel O(1) terms; cast to float32)"
        )


def _check_like(op: str, name: str, t, ref_name: str, ref: Tensor) -> None:
    _check_dtype(op, name, t)
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all tensors must have the same dtype"
        )
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_field(op: str, name: str, t, ref_name: str | None = None, ref: Tensor | None = None) -> None:
    if ref is None:
        _check_dtype(op, name, t)
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D [N, V] tensor, got shape {tuple(t.shape)}")
        if t.shape[1] == 0:
            raise ValueError(f"{op}: {name} has V = 0 velocity nodes (shape {tuple(t.shape)})")
        return
    _check_like(op, name, t, ref_name, ref)
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(
            f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
            "they must be the same [N, V]"
        )


def _check_nodes(op: str, v, w, V, ref_name: str, ref: Tensor) -> None:
    for name, t in (("v", v), ("w", w)):
        _check_like(op, name, t, ref_name, ref)
        if t.dim() != 1 or t.shape[0] != V:
            raise ValueError(
                f"{op}: {name} must be [V] = [{V}] to match {ref_name} {tuple(ref.shape)}, got shape {tuple(t.shape)}"
            )


def _check_row(op: str, name: str, t, N, ref_name: str, ref: Tensor, allow_scalar: bool = False) -> None:
    _check_like(op, name, t, ref_name, ref)
    if allow_scalar and t.dim() == 0:
        return
    if t.dim() != 1 or t.shape[0] != N:
        extra = " or a 0-d tensor" if allow_scalar else ""
        raise ValueError(f"{op}: {name} must be [N] = [{N}]{extra}, got shape {tuple(t.shape)}")


def _check_moments(F, v, w, order) -> None:
    op = "velocity_moments"
    _check_field(op, "F", F)
    _check_nodes(op, v, w, F.shape[1], "F", F)
    if order < 0:
        raise ValueError(f"{op}: order must be >= 0, got {order}")


def _check_maxwellian(op, rho, u, T, v) -> None:
    _check_dtype(op, "rho", rho)
    if rho.dim() != 1:
        raise ValueError(f"{op}: rho must be [N], got shape {tuple(rho.shape)}")
    N = rho.shape[0]
    _check_row(op, "u", u, N, "rho", rho)
    _check_row(op, "T", T, N, "rho", rho)
    _check_like(op, "v", v, "rho", rho)
    if v.dim() != 1:
        raise ValueError(f"{op}: v must be [V], got shape {tuple(v.shape)}")
    if v.shape[0] == 0:
        raise ValueError(f"{op}: v has V = 0 velocity nodes")


def _check_bgk_rows(op, ref_name, ref, rho, u, T, rho_t, u_t, T_t, v, w, kn) -> None:
    N, V = ref.shape
    for name, t in (("rho", rho), ("u", u), ("T", T), ("rho_t", rho_t), ("u_t", u_t), ("T_t", T_t)):
        _check_row(op, name, t, N, ref_name, ref)
    _check_nodes(op, v, w, V, ref_name, ref)
    _check_row(op, "kn", kn, N, ref_name, ref, allow_scalar=True)


def _check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, op="bgk_residuals") -> None:
    _check_field(op, "F", F)
    _check_field(op, "Ft", Ft, "F", F)
    _check_field(op, "Fx", Fx, "F", F)
    _check_bgk_rows(op, "F", F, rho, u, T, rho_t, u_t, T_t, v, w, kn)


def _check_transport(G, Gt, Gx, rho_t, rho_x, v, w, eps, op="transport_mm_residuals") -> None:
    _check_field(op, "Graw", G)
    _check_field(op, "Graw_t", Gt, "Graw", G)
    _check_field(op, "Graw_x", Gx, "Graw", G)
    N = G.shape[0]
    _check_row(op, "rho_t", rho_t, N, "Graw", G)
    _check_row(op, "rho_x", rho_x, N, "Graw", G)
    _check_nodes(op, v, w, G.shape[1], "Graw", G)
    _check_row(op, "eps", eps, N, "Graw", G, allow_scalar=True)


def _as_param(x, ref: Tensor, op: str, name: str) -> Tensor:
    """kn / eps given as a Python number become a 0-d tensor of ref's dtype and device.

    Made by a fill on the device (the value is an argument of the fill kernel), not copied
    from host memory: ``torch.tensor(x, device="cuda")`` would be a blocking host-to-device
    copy on every call, and an error inside CUDA-graph capture.
    """
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (int, float)):
        return torch.full((), float(x), dtype=ref.dtype, device=ref.device)
    raise TypeError(f"{op}: {name} must be a tensor ([N] or 0-d) or a float, got {type(x).__name__}")


# --- public wrappers ----------------------------------------------------------------------------


def velocity_moments(F: Tensor, v: Tensor, w: Tensor, order: int) -> Tensor:
    """Velocity moments ``m[i, k] = sum_j w_j v_j^k F[i, j]`` for ``k = 0..order``.

    Args:
        F: ``[N, V]`` values of the distribution at the velocity nodes.
        v, w: ``[V]`` quadrature nodes and weights.
        order: highest moment, ``>= 0``.

    Returns ``[N, order + 1]``. Differentiable with respect to ``F``.
    """
    if not isinstance(order, int) or isinstance(order, bool):
        raise TypeError(f"velocity_moments: order must be an int, got {type(order).__name__}")
    try:
        return _ops.velocity_moments.default(F, v, w, order)
    except RuntimeError:
        _check_moments(F, v, w, order)
        raise


def maxwellian(rho: Tensor, u: Tensor, T: Tensor, v: Tensor) -> Tensor:
    """Maxwellian at the nodes: ``M[i, j] = rho_i / sqrt(2 pi T_i) exp(-(v_j - u_i)^2 / (2 T_i))``.

    Args:
        rho, u, T: ``[N]`` density, velocity and temperature (``T > 0``; not checked, since
            that would synchronise with the GPU: ``T <= 0`` gives NaN/Inf).
        v: ``[V]`` velocity nodes.

    Returns ``[N, V]``. Differentiable with respect to ``rho``, ``u`` and ``T``.
    """
    try:
        return _ops.maxwellian.default(rho, u, T, v)
    except RuntimeError:
        _check_maxwellian("maxwellian", rho, u, T, v)
        raise


def bgk_residuals(
    F: Tensor,
    Ft: Tensor,
    Fx: Tensor,
    rho: Tensor,
    u: Tensor,
    T: Tensor,
    rho_t: Tensor,
    u_t: Tensor,
    T_t: Tensor,
    v: Tensor,
    w: Tensor,
    kn: Tensor | float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Residuals of the BGK APNN (1D x 1D, Euler scaling) at ``N`` collocation points.

    With ``M = M[rho, u, T](v)`` (see :func:`maxwellian`), ``E = rho (u^2 + T) / 2``,
    ``(rho u)_t = rho_t u + rho u_t`` and ``E_t = rho_t (u^2 + T) / 2 + rho (2 u u_t + T_t) / 2``::

        kinetic      = kn (Ft + v Fx) - (M - F)                                      [N, V]
        conservation = (rho_t + sum w v Fx, (rho u)_t + sum w v^2 Fx,
                        E_t + 1/2 sum w v^3 Fx)                                      [N, 3]
        consistency  = (rho - sum w F, rho u - sum w v F, E - 1/2 sum w v^2 F)       [N, 3]

    Args:
        F, Ft, Fx: ``[N, V]`` f, f_t and f_x at the velocity nodes.
        rho, u, T, rho_t, u_t, T_t: ``[N]`` macroscopic fields and their time derivatives.
        v, w: ``[V]`` quadrature nodes and weights (integrals are ``sum w phi``, no 1/2).
        kn: Knudsen number, ``[N]``, 0-d or a float.

    Returns ``(kinetic, conservation, consistency)``. Differentiable with respect to every
    input except ``v`` and ``w``.
    """
    kn = _as_param(kn, F, "bgk_residuals", "kn") if isinstance(F, Tensor) else kn
    try:
        return _ops.bgk_residuals.default(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
    except RuntimeError:
        _check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
        raise


def transport_mm_residuals(
    Graw: Tensor,
    Graw_t: Tensor,
    Graw_x: Tensor,
    rho_t: Tensor,
    rho_x: Tensor,
    v: Tensor,
    w: Tensor,
    eps: Tensor | float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Micro-macro residuals of the linear-transport APNN (diffusive scaling).

    With the normalised average ``<phi> = sum w phi / sum w`` and ``g = Graw - <Graw>``
    (likewise ``g_t``, ``g_x``; so ``<g> = 0`` exactly)::

        g                                                                           [N, V]
        micro = eps^2 g_t + eps (v g_x - <v g_x>) + v rho_x + g                     [N, V]
        macro = rho_t + <v g_x>                                                     [N]

    Args:
        Graw, Graw_t, Graw_x: ``[N, V]`` the raw network output g_raw and its t/x derivatives.
        rho_t, rho_x: ``[N]``.
        v, w: ``[V]`` nodes and weights (``sum w`` must be non-zero; not checked on the device).
        eps: ``[N]``, 0-d or a float.

    Returns ``(g, micro, macro)``. Differentiable with respect to every input except ``v``
    and ``w``.
    """
    eps = _as_param(eps, Graw, "transport_mm_residuals", "eps") if isinstance(Graw, Tensor) else eps
    try:
        return _ops.transport_mm_residuals.default(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps)
    except RuntimeError:
        _check_transport(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps)
        raise


def bgk_residuals_sq(
    F: Tensor,
    Ft: Tensor,
    Fx: Tensor,
    rho: Tensor,
    u: Tensor,
    T: Tensor,
    rho_t: Tensor,
    u_t: Tensor,
    T_t: Tensor,
    v: Tensor,
    w: Tensor,
    kn: Tensor | float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss form of :func:`bgk_residuals`: the kinetic residual as its row sums of squares.

    Returns ``(kinetic_sq, conservation, consistency)`` with ``kinetic_sq[i] = sum_j
    kinetic[i, j]^2`` (``[N]``, accumulated in float64) and the other two as in
    :func:`bgk_residuals`. What an APNN loss needs (``kinetic_sq.sum() / (N V)`` is the mean
    squared kinetic residual) without the ``[N, V]`` residual: it is never written, and the
    backward recomputes it, so a step reads the ``[N, V]`` fields once forward and once
    backward, where the residual op plus an eager loss reads and writes ``[N, V]`` buffers
    several times more. Same arguments, differentiability and transforms as
    :func:`bgk_residuals`.
    """
    kn = _as_param(kn, F, "bgk_residuals_sq", "kn") if isinstance(F, Tensor) else kn
    try:
        return _ops.bgk_residuals_sq.default(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
    except RuntimeError:
        _check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, "bgk_residuals_sq")
        raise


def transport_mm_residuals_sq(
    Graw: Tensor,
    Graw_t: Tensor,
    Graw_x: Tensor,
    rho_t: Tensor,
    rho_x: Tensor,
    v: Tensor,
    w: Tensor,
    eps: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """The loss form of :func:`transport_mm_residuals`: ``(micro_sq, macro)``.

    ``micro_sq[i] = sum_j micro[i, j]^2`` (``[N]``, accumulated in float64); ``macro`` as in
    :func:`transport_mm_residuals`; ``g`` is not returned. The ``[N, V]`` micro residual is
    never written and the backward recomputes it (see :func:`bgk_residuals_sq`). Same
    arguments, differentiability and transforms as :func:`transport_mm_residuals`.
    """
    eps = _as_param(eps, Graw, "transport_mm_residuals_sq", "eps") if isinstance(Graw, Tensor) else eps
    try:
        return _ops.transport_mm_residuals_sq.default(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps)
    except RuntimeError:
        _check_transport(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps, "transport_mm_residuals_sq")
        raise


def gauss_legendre(
    n: int, lo: float = -1.0, hi: float = 1.0, *, dtype: torch.dtype = torch.float64, device=None
) -> tuple[Tensor, Tensor]:
    """``n``-point Gauss-Legendre nodes and weights on ``[lo, hi]`` (``sum w = hi - lo``).

    The rules of the anchor papers: 30 nodes on ``[-1, 1]`` for linear transport, 64 nodes on
    ``[-10, 10]`` for BGK. Computed in float64 by numpy and then cast, so float32 rules are
    correctly rounded.
    """
    import numpy as np

    if not is_integer(n, 1):
        raise ValueError(f"gauss_legendre: number of nodes must be a positive integer, got {n!r}")
    if not hi > lo:
        raise ValueError(f"gauss_legendre: interval must have b > a, got [{lo}, {hi}]")
    x, wt = np.polynomial.legendre.leggauss(int(n))
    half = 0.5 * (hi - lo)
    v = torch.as_tensor(lo + half * (x + 1.0), dtype=dtype, device=device)
    w = torch.as_tensor(half * wt, dtype=dtype, device=device)
    return v, w


# --- fake kernels (shapes only) for torch.compile and meta tensors ------------------------------


@torch.library.register_fake("hrgrad_ext::velocity_moments")
def _velocity_moments_fake(F, v, w, order):
    _check_moments(F, v, w, order)
    return F.new_empty(F.shape[0], order + 1)


@torch.library.register_fake("hrgrad_ext::velocity_moments_backward")
def _velocity_moments_backward_fake(grad, v, w):
    _check_dtype("velocity_moments_backward", "grad", grad)
    _check_like("velocity_moments_backward", "v", v, "grad", grad)
    _check_like("velocity_moments_backward", "w", w, "grad", grad)
    return grad.new_empty(grad.shape[0], v.shape[0])


@torch.library.register_fake("hrgrad_ext::maxwellian")
def _maxwellian_fake(rho, u, T, v):
    _check_maxwellian("maxwellian", rho, u, T, v)
    return rho.new_empty(rho.shape[0], v.shape[0])


@torch.library.register_fake("hrgrad_ext::maxwellian_backward")
def _maxwellian_backward_fake(grad, rho, u, T, v):
    _check_maxwellian("maxwellian_backward", rho, u, T, v)
    _check_like("maxwellian_backward", "grad", grad, "rho", rho)
    return rho.new_empty(rho.shape), rho.new_empty(rho.shape), rho.new_empty(rho.shape)


@torch.library.register_fake("hrgrad_ext::bgk_residuals")
def _bgk_residuals_fake(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    _check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn)
    N = F.shape[0]
    return F.new_empty(F.shape), F.new_empty(N, 3), F.new_empty(N, 3)


@torch.library.register_fake("hrgrad_ext::bgk_residuals_backward")
def _bgk_residuals_backward_fake(gK, gC, gS, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    op = "bgk_residuals_backward"
    _check_field(op, "Ft", Ft)
    _check_field(op, "Fx", Fx, "Ft", Ft)
    _check_field(op, "grad_kinetic", gK, "Ft", Ft)
    _check_bgk_rows(op, "Ft", Ft, rho, u, T, rho_t, u_t, T_t, v, w, kn)
    N = Ft.shape[0]
    return (Ft.new_empty(Ft.shape), Ft.new_empty(Ft.shape), Ft.new_empty(Ft.shape)) + tuple(
        Ft.new_empty(N) for _ in range(7)
    )


@torch.library.register_fake("hrgrad_ext::transport_mm_residuals")
def _transport_fake(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps):
    _check_transport(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps)
    return Graw.new_empty(Graw.shape), Graw.new_empty(Graw.shape), Graw.new_empty(Graw.shape[0])


@torch.library.register_fake("hrgrad_ext::transport_mm_residuals_backward")
def _transport_backward_fake(gg, gm, gc, Graw_t, Graw_x, v, w, eps):
    op = "transport_mm_residuals_backward"
    _check_field(op, "Graw_t", Graw_t)
    for name, t in (("Graw_x", Graw_x), ("grad_g", gg), ("grad_micro", gm)):
        _check_field(op, name, t, "Graw_t", Graw_t)
    N = Graw_t.shape[0]
    _check_row(op, "grad_macro", gc, N, "Graw_t", Graw_t)
    _check_nodes(op, v, w, Graw_t.shape[1], "Graw_t", Graw_t)
    _check_row(op, "eps", eps, N, "Graw_t", Graw_t, allow_scalar=True)
    S = Graw_t.shape
    return Graw_t.new_empty(S), Graw_t.new_empty(S), Graw_t.new_empty(S), Graw_t.new_empty(N), Graw_t.new_empty(N)


@torch.library.register_fake("hrgrad_ext::bgk_residuals_sq")
def _bgk_residuals_sq_fake(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    _check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, "bgk_residuals_sq")
    N = F.shape[0]
    return F.new_empty(N), F.new_empty(N, 3), F.new_empty(N, 3)


@torch.library.register_fake("hrgrad_ext::bgk_residuals_sq_backward")
def _bgk_residuals_sq_backward_fake(gQ, gC, gS, F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn):
    op = "bgk_residuals_sq_backward"
    _check_bgk(F, Ft, Fx, rho, u, T, rho_t, u_t, T_t, v, w, kn, op)
    N = F.shape[0]
    _check_row(op, "grad_kinetic_sq", gQ, N, "F", F)
    for name, t in (("grad_conservation", gC), ("grad_consistency", gS)):
        _check_like(op, name, t, "F", F)
        if tuple(t.shape) != (N, 3):
            raise ValueError(f"{op}: {name} must be [N, 3] = [{N}, 3], got shape {list(t.shape)}")
    return (F.new_empty(F.shape), F.new_empty(F.shape), F.new_empty(F.shape)) + tuple(F.new_empty(N) for _ in range(7))


@torch.library.register_fake("hrgrad_ext::transport_mm_residuals_sq")
def _transport_sq_fake(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps):
    _check_transport(Graw, Graw_t, Graw_x, rho_t, rho_x, v, w, eps, "transport_mm_residuals_sq")
    N = Graw.shape[0]
    return Graw.new_empty(N), Graw.new_empty(N)


@torch.library.register_fake("hrgrad_ext::transport_mm_residuals_sq_backward")
def _transport_sq_backward_fake(gQ, gc, Graw, Graw_t, Graw_x, rho_x, v, w, eps):
    op = "transport_mm_residuals_sq_backward"
    _check_field(op, "Graw", Graw)
    N = Graw.shape[0]
    _check_row(op, "grad_micro_sq", gQ, N, "Graw", Graw)
    _check_row(op, "grad_macro", gc, N, "Graw", Graw)
    _check_transport(Graw, Graw_t, Graw_x, gc, rho_x, v, w, eps, op)
    S = Graw.shape
    return Graw.new_empty(S), Graw.new_empty(S), Graw.new_empty(S), Graw.new_empty(N), Graw.new_empty(N)


# --- vmap rules: the vmapped dimension is folded into the rows ----------------------------------

_R, _N, _P, _O = _vmap.ROWS, _vmap.NODES, _vmap.PARAM, _vmap.OTHER
for _op, _kinds in (
    (_ops.velocity_moments.default, (_R, _N, _N, _O)),
    (_ops.velocity_moments_backward.default, (_R, _N, _N)),
    (_ops.maxwellian.default, (_R, _R, _R, _N)),
    (_ops.maxwellian_backward.default, (_R, _R, _R, _R, _N)),
    (_ops.bgk_residuals.default, (_R,) * 9 + (_N, _N, _P)),
    (_ops.bgk_residuals_backward.default, (_R,) * 11 + (_N, _N, _P)),
    (_ops.transport_mm_residuals.default, (_R,) * 5 + (_N, _N, _P)),
    (_ops.transport_mm_residuals_backward.default, (_R,) * 5 + (_N, _N, _P)),
    (_ops.bgk_residuals_sq.default, (_R,) * 9 + (_N, _N, _P)),
    (_ops.bgk_residuals_sq_backward.default, (_R,) * 12 + (_N, _N, _P)),
    (_ops.transport_mm_residuals_sq.default, (_R,) * 5 + (_N, _N, _P)),
    (_ops.transport_mm_residuals_sq_backward.default, (_R,) * 6 + (_N, _N, _P)),
):
    _vmap.register_row_fold_rule(_op, _kinds)
