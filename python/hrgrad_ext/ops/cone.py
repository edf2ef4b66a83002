"""Exact cone solves on the Gram matrix: the building blocks of UPGrad and MGDA.

    W, status = dual_cone_weights(G, U)   # J^T W[t] = projection of J^T U[t] onto {x : J x >= 0}
    w, status = mgda_weights(G)           # J^T w = minimum-norm point of the convex hull of the g_i

Both are finite active-set solves (Lawson-Hanson non-negative least squares on a factor of the
Gram matrix, float64, ``csrc/gram/cone_solve.h``), shared by the CPU and the CUDA kernel (one
thread per problem), with no host synchronisation. They are exact to working precision, not
iterative approximations: the projection satisfies ``J x >= 0`` up to rounding, and since the
projection onto a convex cone is unique it does not depend on the order of the tasks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _vmap
from .. import _C  # noqa: F401  (loading the compiled core registers torch.ops.hrgrad_ext)
from .gram import _check_gram_matrix

__all__ = ["dual_cone_weights", "mgda_weights"]

_dual_cone = torch.ops.hrgrad_ext.dual_cone_weights.default
_mgda = torch.ops.hrgrad_ext.mgda_weights.default

# --- validation: the C++ kernels check every input; on failure these re-checks turn the
# common mistakes into TypeError / ValueError with Python spellings (no cost on success) ------


def _check_dual_cone(G, U, rcond) -> None:
    op = "dual_cone_weights"
    _check_gram_matrix(G, rcond, op)
    if not isinstance(U, Tensor):
        raise TypeError(f"{op}: U must be a torch.Tensor, got {type(U).__name__}")
    if U.dtype != G.dtype:
        raise TypeError(f"{op}: U has dtype {U.dtype} but G has {G.dtype}")
    if U.device != G.device:
        raise ValueError(f"{op}: G is on {G.device} but U is on {U.device}")
    if U.dim() != G.dim() or U.shape[-1] != G.shape[-1] or (U.dim() == 3 and U.shape[0] != G.shape[0]):
        raise ValueError(
            f"{op}: U must be [T, K] for G [K, K] or [B, T, K] for G [B, K, K]; got G {tuple(G.shape)} and U {tuple(U.shape)}"
        )


def _check_mgda(G, rcond) -> None:
    _check_gram_matrix(G, rcond, "mgda_weights")


# --- public ops -----------------------------------------------------------------------------


def dual_cone_weights(G: Tensor, U: Tensor, rcond: float | None = None) -> tuple[Tensor, Tensor]:
    """Weights of the projections of ``J^T U[t]`` onto the dual cone ``{x : J x >= 0}``.

    For each weight vector ``u = U[..., t, :]`` returns ``w = u + D^-1 mu`` with ``mu >= 0``
    (``D`` the task norms) such that ``J^T w`` is the Euclidean projection of ``J^T u`` onto
    the cone of updates that conflict with no task gradient. UPGrad is
    ``dual_cone_weights(G, eye(K)).mean(-2)``.

    The projection is computed exactly (finite active-set solve, float64) in normalised
    coordinates, so scaling a task's gradient does not change the cone. Tasks with a zero
    gradient (norm below ``1e-12`` of the largest) impose no constraint and keep their weight
    (flag ``ZERO_TASKS``); eigenvalues of the cosine matrix below ``rcond`` times the largest are
    treated as zero (``RANK_DEFICIENT``). When the projection is zero its weights are 0
    (``ZERO_UPDATE``); NaN/Inf in ``G`` give NaN weights (``NON_FINITE``).

    Args:
        G: ``[K, K]`` or ``[B, K, K]`` float32/float64 Gram matrices ``J J^T``.
        U: ``[T, K]`` or ``[B, T, K]`` weight vectors (same dtype and device as ``G``).
        rcond: eigenvalue cut-off; default ``10 * K * eps(G.dtype)``.

    Returns ``(W, status)``: ``W`` like ``U``, ``status`` int32 ``[T]`` or ``[B, T]`` with
    :class:`~hrgrad_ext.ops.Status` bit flags per target. Not differentiable (a gradient or
    tangent on ``G`` or ``U`` raises); ``torch.vmap`` folds into the batch dimension.
    """
    try:
        return _dual_cone(G, U, rcond)
    except RuntimeError:
        _check_dual_cone(G, U, rcond)
        raise


def mgda_weights(G: Tensor, rcond: float | None = None) -> tuple[Tensor, Tensor]:
    """MGDA: convex weights ``w`` (``w >= 0``, ``sum(w) = 1``) with ``J^T w`` the minimum-norm
    point of the convex hull of the task gradients.

    Solved exactly (finite active-set solve, float64) through the least-distance form
    ``min |x| s.t. J x >= 1``. When the hull contains 0 (to the resolution of a float64 Gram
    matrix: ``|J^T w| <= 1e-6 max_i |g_i|``), the weights are 0 and the flag ``ZERO_UPDATE`` is
    set. NaN/Inf in ``G`` give NaN weights (``NON_FINITE``).

    Args:
        G: ``[K, K]`` or ``[B, K, K]`` float32/float64 Gram matrices.
        rcond: eigenvalue cut-off relative to the largest eigenvalue of ``G``; default
            ``10 * K * eps(G.dtype)``.

    Returns ``(w, status)``: ``w`` ``[..., K]`` in ``G``'s dtype, ``status`` int32 ``[...]``.
    Not differentiable (a gradient or tangent on ``G`` raises); ``torch.vmap`` folds into the
    batch dimension.
    """
    try:
        return _mgda(G, rcond)
    except RuntimeError:
        _check_mgda(G, rcond)
        raise


# --- fake kernels (shapes and dtypes, and the same checks as the C++ kernels) for
# torch.compile / meta tensors ---------------------------------------------------------------


@torch.library.register_fake("hrgrad_ext::dual_cone_weights")
def _dual_cone_weights_fake(G, U, rcond=None):
    _check_dual_cone(G, U, rcond)
    return U.new_empty(U.shape), U.new_empty(U.shape[:-1], dtype=torch.int32)


@torch.library.register_fake("hrgrad_ext::mgda_weights")
def _mgda_weights_fake(G, rcond=None):
    _check_mgda(G, rcond)
    return G.new_empty(G.shape[:-1]), G.new_empty(G.shape[:-2], dtype=torch.int32)


# --- vmap rules: a vmapped dimension becomes (part of) the leading batch dimension ----------

_vmap.register_leading_batch_rule(_dual_cone, bases=(2, 2, None))
_vmap.register_leading_batch_rule(_mgda, bases=(2, None))
