"""Gram matrix, HRGrad rotation solve and combination: the three kernels of one HRGrad step.

    G = gram(J)                          # [..., K, n] -> [..., K, K], one pass over J
    w = hrgrad_weights(G)                # [..., K, K] -> [..., K], K x K work in float64
    w, status = hrgrad_weights_ex(G)     # the same and the solve's Status flags
    update = combine(J, w)               # J^T w, second pass over J

``hrgrad(J)`` composes them (``hrgrad_ex(J)`` also returns the weights and the status), as
``torch.linalg`` does with ``inv`` / ``inv_ex``. None of them synchronises with the host, so
they can be captured in CUDA graphs and compiled with ``torch.compile(fullgraph=True)``.

Derivatives (autograd in C++, ``csrc/autograd``): ``gram``, ``combine`` and therefore
``hrgrad`` are differentiable to any order in reverse and forward mode and under every
``torch.func`` transform. ``hrgrad_weights`` is differentiable in ``G`` where the solve took
its generic branch (status ``OK``); at the other points (zero tasks, rank deficiency,
dual-cone fallback, zero update, NaN/Inf) the weights are not differentiable and a non-zero
perturbation gets a NaN derivative rather than a silent number. ``combine_accumulate_`` (in
place, into ``.grad`` buffers) refuses gradients and tangents.
"""

from __future__ import annotations

import enum
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import _vmap
from .. import _C  # noqa: F401  (loading the compiled core registers torch.ops.hrgrad_ext)

__all__ = [
    "LENGTH_MODELS",
    "HRGradResult",
    "Status",
    "WeightsResult",
    "combine",
    "combine_into_grads",
    "gram",
    "gram_of_list",
    "hrgrad",
    "hrgrad_ex",
    "hrgrad_weights",
    "hrgrad_weights_ex",
]

LENGTH_MODELS = ("projection", "min", "max", "harmonic", "arithmetic", "geometric")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_gram = torch.ops.hrgrad_ext.gram.default
_weights = torch.ops.hrgrad_ext.hrgrad_weights.default
_combine = torch.ops.hrgrad_ext.combine.default
_combine_accumulate = torch.ops.hrgrad_ext.combine_accumulate_.default


class Status(enum.IntFlag):
    """Bit flags returned by :func:`hrgrad_weights_ex` (one int32 per batch entry)."""

    OK = 0
    ZERO_TASKS = 1  # tasks with a zero gradient were left out of the solve (weight 0)
    RANK_DEFICIENT = 2  # the pseudo-inverse dropped eigenvalues of the cosine matrix
    FALLBACK = 4  # C^+ 1 conflicted with a task: projected onto the dual cone instead
    ZERO_UPDATE = 8  # no non-zero non-conflicting update exists; the weights are 0
    NON_FINITE = 16  # G contained NaN or Inf; the weights are NaN


class WeightsResult(NamedTuple):
    """``hrgrad_weights_ex(G)``: the weights and the solve's :class:`Status` flags."""

    weights: Tensor
    status: Tensor


class HRGradResult(NamedTuple):
    """``hrgrad_ex(J)``: the update ``J^T w``, the weights ``w`` and the :class:`Status` flags."""

    update: Tensor
    weights: Tensor
    status: Tensor


# --- validation: the C++ kernels check every input; on failure these re-checks turn the
# common mistakes into TypeError / ValueError with Python spellings (no cost on success) ------


def _check_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_jacobian(J, op: str) -> None:
    _check_tensor(J, "J", op)
    if J.dim() not in (2, 3):
        raise ValueError(f"{op}: J must be [K, n] or [B, K, n], got shape {tuple(J.shape)}")
    if J.shape[-2] == 0:
        raise ValueError(f"{op}: J has K = 0 tasks (shape {tuple(J.shape)})")
    if J.shape[-1] == 0:
        raise ValueError(f"{op}: J has n = 0 parameters (shape {tuple(J.shape)})")


def _check_gram(J, dtype) -> None:
    _check_jacobian(J, "gram")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram: dtype must be torch.float32 or torch.float64, got {dtype}")


def _check_gram_matrix(G, rcond, op: str) -> None:
    """G [K, K] or [B, K, K] float32/float64 with K >= 1, rcond in [0, 1): the K x K solvers' inputs."""
    if not isinstance(G, Tensor):
        raise TypeError(f"{op}: G must be a torch.Tensor, got {type(G).__name__}")
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: G must be float32 or float64, got {G.dtype}")
    if G.dim() not in (2, 3) or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"{op}: G must be square, [K, K] or [B, K, K], got shape {tuple(G.shape)}")
    if G.shape[-1] == 0:
        raise ValueError(f"{op}: G has K = 0 tasks")
    if rcond is not None and not 0.0 <= rcond < 1.0:
        raise ValueError(f"{op}: rcond must be in [0, 1), got {rcond}")


def _check_weights(G, length_model, rcond) -> None:
    _check_gram_matrix(G, rcond, "hrgrad_weights")
    if length_model not in LENGTH_MODELS:
        raise ValueError(f"hrgrad_weights: unknown length_model {length_model!r}; expected one of {LENGTH_MODELS}")


def _check_combine(J, w) -> None:
    _check_jacobian(J, "combine")
    _check_tensor(w, "w", "combine")
    if w.device != J.device:
        raise ValueError(f"combine: J is on {J.device} but w is on {w.device}")
    if tuple(w.shape) != tuple(J.shape[:-1]):
        raise ValueError(f"combine: w must have shape {tuple(J.shape[:-1])} to match J {tuple(J.shape)}, got {tuple(w.shape)}")


# --- public ops -----------------------------------------------------------------------------


def gram(J: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Gram matrix ``G = J J^T`` of task gradients.

    Args:
        J: ``[K, n]`` or ``[B, K, n]`` (float16/bfloat16/float32/float64), one task gradient
            per row.
        dtype: output dtype, ``torch.float32`` or ``torch.float64``. Default: float64 for a
            float64 ``J``, else float32. Accumulation is at least float32 on CUDA (partial sums
            combined in float64) and float64 on CPU.

    Returns ``[K, K]`` or ``[B, K, K]``. Differentiable with respect to ``J`` (any order).
    """
    try:
        return _gram(J, dtype)
    except RuntimeError:
        _check_gram(J, dtype)
        raise


def hrgrad_weights(G: Tensor, length_model: str = "projection", rcond: float | None = None) -> Tensor:
    """The HRGrad rotation solve: weights ``w`` with ``update = J^T w``.

    With ``d_i = sqrt(G_ii)`` and the cosine matrix ``C = D^-1 G D^-1``, ``a = C^+ 1`` and
    ``w_i = len * a_i / (d_i |x|)`` where ``|x|^2 = a^T C a`` and ``len`` is the length model:
    ``"projection"`` (sum of the projections of the task gradients on the update direction) or
    one of the ConFIG family ``"min"``, ``"max"``, ``"harmonic"``, ``"arithmetic"``,
    ``"geometric"`` (a common norm, that mean of the ``d_i``, times the sum of the cosines).

    Zero gradients are left out (weight 0). When ``C`` is singular and ``C^+ 1`` would conflict
    with a task, the mean unit gradient is projected onto the dual cone ``{x: J x >= 0}``
    instead (flag :attr:`Status.FALLBACK`). All of it runs in float64 without host
    synchronisation.

    Args:
        G: ``[K, K]`` or ``[B, K, K]`` float32/float64 Gram matrices.
        length_model: see above.
        rcond: eigenvalues of ``C`` below ``rcond * max eigenvalue`` count as zero; default
            ``10 * K * eps(G.dtype)``.

    Returns ``w`` ``[..., K]`` in ``G``'s dtype; :func:`hrgrad_weights_ex` also returns the
    :class:`Status` flags. Differentiable in ``G`` where the status is ``OK`` (NaN derivative
    elsewhere, see the module docstring).
    """
    return hrgrad_weights_ex(G, length_model, rcond)[0]


def hrgrad_weights_ex(G: Tensor, length_model: str = "projection", rcond: float | None = None) -> WeightsResult:
    """:func:`hrgrad_weights` with the solve's status: ``(weights, status)``.

    ``status`` is int32 ``[...]`` (one per batch entry) with :class:`Status` bit flags. It stays
    on the device: nothing is synchronised (read it when convenient, as with
    ``torch.linalg.inv_ex``).
    """
    try:
        return WeightsResult(*_weights(G, length_model, rcond))
    except RuntimeError:
        _check_weights(G, length_model, rcond)
        raise


def combine(J: Tensor, w: Tensor) -> Tensor:
    """``J^T w``: ``[..., K, n]`` and ``[..., K]`` -> ``[..., n]`` in ``J``'s dtype.

    Accumulates in float32 for float16/bfloat16/float32 and float64 for float64.
    Differentiable with respect to ``J`` and ``w`` (any order).
    """
    try:
        return _combine(J, w)
    except RuntimeError:
        _check_combine(J, w)
        raise


def hrgrad(J: Tensor, length_model: str = "projection", rcond: float | None = None) -> Tensor:
    """The HRGrad update ``J^T w`` of task gradients ``J`` (``[K, n]`` or ``[B, K, n]``).

    Two passes over ``J`` (Gram matrix, then combination) and a float64 K x K solve between.
    Differentiable with respect to ``J`` where the solve's status is ``OK``.
    """
    return hrgrad_ex(J, length_model, rcond)[0]


def hrgrad_ex(J: Tensor, length_model: str = "projection", rcond: float | None = None) -> HRGradResult:
    """:func:`hrgrad` with the weights and the solve's status: ``(update, weights, status)``."""
    G = gram(J, dtype=torch.float64)
    w, status = hrgrad_weights_ex(G, length_model, rcond)
    return HRGradResult(combine(J, w), w, status)


# --- per-parameter path: never concatenates the Jacobian of a many-tensor model ------------


def gram_of_list(jacobians: Iterable[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """``sum_p J_p J_p^T`` for per-parameter Jacobians ``J_p`` of shape ``[K, *param.shape]``.

    Equal to ``gram(cat([J_p.flatten(1)], 1))`` without building the concatenation.
    """
    total = None
    for Jp in jacobians:
        _check_tensor(Jp, "jacobian", "gram_of_list")
        if Jp.dim() < 1:
            raise ValueError("gram_of_list: each jacobian needs a leading task dimension K")
        flat = Jp.reshape(Jp.shape[0], -1)
        if flat.shape[1] == 0:
            continue
        Gp = gram(flat, dtype=dtype)
        total = Gp if total is None else total + Gp
    if total is None:
        raise ValueError("gram_of_list: no (non-empty) jacobians given")
    return total


def combine_into_grads(jacobians: Sequence[Tensor], w: Tensor, params: Sequence[Tensor]) -> None:
    """Accumulates ``J_p^T w`` into ``p.grad`` for each parameter (creating it if missing).

    ``jacobians[i]`` has shape ``[K, *params[i].shape]``. Runs one fused kernel per parameter
    that adds straight into the gradient buffer (no temporary of the parameter's size).
    """
    if len(jacobians) != len(params):
        raise ValueError(f"combine_into_grads: {len(jacobians)} jacobians for {len(params)} params")
    for Jp, p in zip(jacobians, params):
        if tuple(Jp.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"combine_into_grads: jacobian of shape {tuple(Jp.shape)} does not match parameter {tuple(p.shape)}"
            )
        if p.grad is None:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        if p.numel() == 0:
            continue
        _combine_accumulate(p.grad, Jp.to(p.grad.dtype), w.to(Jp.device))


# --- fake kernels (shapes and dtypes, and the same checks as the C++ kernels) for
# torch.compile / meta tensors ---------------------------------------------------------------


@torch.library.register_fake("hrgrad_ext::gram")
def _gram_fake(J, dtype=None):
    _check_gram(J, dtype)
    out = dtype if dtype is not None else (torch.float64 if J.dtype == torch.float64 else torch.float32)
    return J.new_empty((*J.shape[:-1], J.shape[-2]), dtype=out)


@torch.library.register_fake("hrgrad_ext::hrgrad_weights")
def _hrgrad_weights_fake(G, length_model="projection", rcond=None):
    _check_weights(G, length_model, rcond)
    return G.new_empty(G.shape[:-1]), G.new_empty(G.shape[:-2], dtype=torch.int32)


@torch.library.register_fake("hrgrad_ext::combine")
def _combine_fake(J, w):
    _check_combine(J, w)
    return J.new_empty((*J.shape[:-2], J.shape[-1]))


@torch.library.register_fake("hrgrad_ext::combine_accumulate_")
def _combine_accumulate_fake(out, J, w):
    return None


# --- vmap rules: a vmapped dimension becomes (part of) the leading batch dimension ----------

_vmap.register_leading_batch_rule(_gram, bases=(2, None))
_vmap.register_leading_batch_rule(_combine, bases=(2, 1))
_vmap.register_leading_batch_rule(_weights, bases=(2, None, None))
_vmap.register_refusal(
    _combine_accumulate,
    "it accumulates in place into one (unbatched) gradient buffer; use combine, which supports vmap, and add",
)
